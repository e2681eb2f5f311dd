"""The MQAR sweep's figure (`benchmarks/mqar_sweep.py`): best-learning-rate accuracy against width."""

from __future__ import annotations

import numpy as np

from benchmarks.mqar_grid import model_order
from benchmarks.mqar_results import best, group


def plot(rows: list[dict], path: str) -> None:
  """Best-lr accuracy vs width, one panel per (length, kv), one line per model (Zoology's figure layout); each
  point is labelled with its winning learning rate when several were swept."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
  except ImportError:  # e.g. the GPU image: draw it later with --report-only where matplotlib is installed
    print("matplotlib is not installed: no plot (rerun with --report-only elsewhere)", flush=True)
    return
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  found = {key: b for key, cell_rows in group(rows).items() if (b := best(cell_rows)) is not None}
  panels = sorted({(seq_len, kv) for _, _, seq_len, kv in found})
  if not panels:
    return
  models = sorted({model for model, *_ in found}, key=model_order)
  show_lr = len({r["learning_rate"] for r in rows}) > 1
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False, sharey=True)
  for ax, (seq_len, kv) in zip(axes[0], panels):
    for i, model in enumerate(models):
      points = sorted((w, float(np.mean(accs)), lr) for (m, w, length, k), (lr, accs) in found.items()
                      if (m, length, k) == (model, seq_len, kv))
      if points:
        style = "--" if model == "attention" else ("-" if model.startswith("gsa") else ":")
        widths, accs, lrs = zip(*points)
        ax.plot(widths, accs, linestyle=style, marker="o", label=model,
                color="k" if model == "attention" else f"C{i}")
        for w, acc, lr in zip(widths, accs, lrs) if show_lr else ():
          ax.annotate(f"{lr:g}", (w, acc), textcoords="offset points", xytext=(4, -8), fontsize=6)
    ax.set_xscale("log", base=2)
    ax.set_title(f"L = {seq_len}, {kv} kv pairs" + (" (best lr)" if show_lr else ""))
    ax.set_xlabel("model width")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("MQAR accuracy")
  legend = {}  # every model once, whichever panel drew it (a model may be missing from the last panel)
  for ax in axes[0]:
    for handle, label in zip(*ax.get_legend_handles_labels()):
      legend.setdefault(label, handle)
  ordered = sorted(legend, key=model_order)
  axes[0][-1].legend([legend[m] for m in ordered], ordered, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
