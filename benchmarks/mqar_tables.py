"""The MQAR sweep's markdown (`benchmarks/mqar_sweep.py`): the best-learning-rate table and the every-rate table
of each (length, key-value count), and the header's sweep description."""

from __future__ import annotations

import numpy as np

from benchmarks.mqar_grid import model_order
from benchmarks.mqar_results import accuracies, best, group


def score(accs: list[float]) -> str:
  """Mean accuracy in %, with the range over seeds when there are several."""
  text = f"{100 * np.mean(accs):.1f}"
  return f"{text} [{100 * min(accs):.1f}-{100 * max(accs):.1f}]" if len(accs) > 1 else text


def unfinished(rows: list[dict]) -> str:
  """The text of a cell with no finished run."""
  return rows[0]["status"] if rows else ""


def best_cell(rows: list[dict], show_lr: bool) -> str:
  """Best-lr accuracy, the winning lr when several were swept, '*' when some of the cell's runs did not run."""
  found = best(rows)
  if found is None:
    return unfinished(rows)
  lr, accs = found
  partial = "*" if any(r["status"] != "ok" for r in rows) else ""
  return score(accs) + (f" (lr {lr:g})" if show_lr else "") + partial


def lr_cell(rows: list[dict], lr: float) -> str:
  """Accuracy of a cell's runs at one learning rate."""
  rows = [r for r in rows if r["learning_rate"] == lr]
  accs = accuracies(rows).get(lr)
  return score(accs) if accs else unfinished(rows)


def markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
  return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
          *("| " + " | ".join(line) + " |" for line in body), ""]


def tables(rows: list[dict]) -> str:
  """Per (length, kv): the best-lr table (models down, widths across; accuracy in %) and, when several learning
  rates were swept, every rate's accuracy."""
  if not rows:
    return "No runs.\n"
  cells = group(rows)
  models = sorted({r["model"] for r in rows}, key=model_order)
  widths = sorted({r["width"] for r in rows})
  lrs = sorted({r["learning_rate"] for r in rows})
  several_seeds = len({r["seed"] for r in rows}) > 1
  what = ("mean over seeds [range], " if several_seeds else "") + (
      "best learning rate per cell" if len(lrs) > 1 else f"lr {lrs[0]:g}")
  out = []
  for seq_len, kv in sorted({(r["seq_len"], r["kv_pairs"]) for r in rows}):
    out.append(f"**L = {seq_len}, {kv} key-value pairs** (query accuracy on held-out examples, %; {what})\n")
    planned = [(m, w) for m in models for w in widths if (m, w, seq_len, kv) in cells]
    out += markdown_table(["model", *(f"d = {w}" for w in widths)],
                          [[m, *(best_cell(cells.get((m, w, seq_len, kv), []), len(lrs) > 1) or "-" for w in widths)]
                           for m in dict.fromkeys(m for m, _ in planned)])
    if len(lrs) > 1:
      out.append(f"Every learning rate, L = {seq_len}, {kv} key-value pairs:\n")
      out += markdown_table(["model", "width", *(f"lr {lr:g}" for lr in lrs)],
                            [[m, str(w), *(lr_cell(cells[(m, w, seq_len, kv)], lr) for lr in lrs)]
                             for m, w in planned])
  missing = [r for r in rows if r["status"] != "ok"]
  if missing:
    reasons = sorted({f"{r['status']}: {r['reason']}" for r in missing})
    partial = " (*: only some of the cell's learning rates / seeds ran)" if len(lrs) > 1 or several_seeds else ""
    out.append(f"not run{partial}: " + "; ".join(reasons) + "\n")
  return "\n".join(out)


def sweep_text(lrs: list[float], seeds: list[int]) -> str:
  """'lr 0.001, 0.01 (best per cell), seeds 0, 1' for the results header."""
  return f"lr {', '.join(f'{lr:g}' for lr in lrs)}" + (" (best per cell)" if len(lrs) > 1 else "") + (
      f", seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else "")
