"""Plots a run's metrics: `python -m gsa_jax.plot RUN_DIR [RUN_DIR ...]` writes PNGs into the first RUN_DIR.

loss.png: training loss and held-out loss against the step; accuracy.png: training and held-out accuracy on the
targets that count (the recall accuracy for MQAR); throughput.png: tokens per second. Several run directories are
drawn on the same axes, one colour each, for comparing runs.
"""

from __future__ import annotations

import argparse
import os
import sys

from gsa_jax.train.metrics import read_jsonl


def _series(rows, key):
  points = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
  return [p[0] for p in points], [p[1] for p in points]


def plot_runs(run_dirs: list[str], out_dir: str | None = None) -> list[str]:
  """Writes the PNGs and returns their paths. Raises FileNotFoundError for a run without metrics.jsonl and
  ValueError for an output directory that cannot be made (a file, or under one)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = {}
  for run_dir in run_dirs:
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = read_jsonl(path)
    if not rows:
      raise FileNotFoundError(f"{path} does not exist or is empty: is {run_dir!r} a run directory of train.py?")
    runs[os.path.basename(os.path.normpath(run_dir)) or run_dir] = rows
  out_dir = out_dir or run_dirs[0]
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ValueError(f"--out {out_dir!r} is a file; give a directory for the PNGs")
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise ValueError(f"--out {out_dir!r}: cannot create the directory ({e.strerror or e})") from None
  panels = {
      "loss.png": ("loss (cross-entropy, nats)", [("loss", "train", "-"), ("eval_loss", "eval", "o--")], True),
      "accuracy.png": ("accuracy on counted targets", [("accuracy", "train", "-"), ("eval_accuracy", "eval", "o--")],
                       False),
      "throughput.png": ("tokens / s (all devices)", [("tokens_per_s", "train", "-")], False),
  }
  written = []
  for filename, (ylabel, series, log_y) in panels.items():
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, rows) in enumerate(runs.items()):
      for key, label, style in series:
        x, y = _series(rows, key)
        if x:
          ax.plot(x, y, style, color=f"C{i}", label=f"{name} {label}" if len(runs) > 1 else label, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if log_y:
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, filename)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
  return written


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("run_dirs", nargs="+")
  parser.add_argument("--out", default=None, help="directory for the PNGs (default: the first run directory)")
  args = parser.parse_args(argv)
  try:
    for path in plot_runs(args.run_dirs, args.out):
      print(path)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
