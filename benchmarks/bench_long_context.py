"""Training throughput and memory against sequence length: GSA, the hybrid and the all-attention model of a preset.

    python benchmarks/bench_long_context.py --out runs/long_context                 # 1.3B, T = 4K..64K
    python benchmarks/bench_long_context.py --layouts gsa,attention --seq_lens 16384,32768 --budget_s 600
    python benchmarks/bench_long_context.py --out runs/long_context --report_only   # table + plot again

Each cell (layout, T) is `benchmarks/bench_train.py --layout=...` in its own process (exactly train.py's step on
synthetic tokens, see that file for what is timed and how MFU is counted) at B x T with B = tokens_per_step / T
(B = 1 once T reaches tokens_per_step). A cell that runs out of memory is retried with the next policy of --remat;
one that runs out with every policy is reported as "does not fit (remat ...)". --cell_timeout_s bounds each
process and --budget_s the whole run (cells not started in time are left out and named). Results are appended to
OUT/long_context.json after every cell, and a rerun on the same --out skips the cells already measured, so a sweep
can be spread over several short device sessions. Writes OUT/long_context.md and, when matplotlib is importable,
OUT/long_context.png (tokens/s and peak memory against T).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.cells import run_cell  # noqa: E402

BENCH_TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_train.py")
LAYOUTS = ("gsa", "hybrid", "attention")


def batch_size(seq_len: int, tokens_per_step: int) -> int:
  return max(1, tokens_per_step // seq_len)


def plan(layouts, seq_lens, tokens_per_step):
  """Cells in the order they run: short sequences first, every layout at one length before the next length."""
  return [(layout, t, batch_size(t, tokens_per_step)) for t in sorted(seq_lens) for layout in layouts]


def cell_argv(a, layout: str, seq_len: int, batch: int, remat: str) -> list[str]:
  return [BENCH_TRAIN, f"--config={a.config}", f"--layout={layout}", f"--config.train.batch_size={batch}",
          f"--config.train.seq_len={seq_len}", f"--config.model.remat={remat}", f"--warmup={a.warmup}",
          f"--steps={a.steps}", *a.extra]


def measure_cell(a, layout, seq_len, batch, deadline, run=run_cell) -> dict:
  """One (layout, T) cell: the first remat policy of a.remat that fits. The row says which policies ran out of
  memory ("oom_remat") and, if none fit, status "oom"."""
  ooms = []
  for remat in a.remat:
    left = deadline - time.monotonic()
    if left <= 0:
      return {"status": "skipped", "detail": "time budget spent", "oom_remat": ooms}
    row = run(cell_argv(a, layout, seq_len, batch, remat), min(a.cell_timeout_s, left))
    row = {**row, "remat": remat, "oom_remat": ooms}
    if row["status"] != "oom":
      return row
    ooms = ooms + [remat]
  return {**row, "oom_remat": ooms, "detail": f"does not fit with remat {', '.join(ooms)}"}


def cell_text(row) -> str:
  if row is None:
    return "not run"
  if row["status"] == "ok":
    peak = "n/a" if row.get("peak_gib") is None else f"{row['peak_gib']:.1f}"  # no memory stats on CPU
    text = f"{row['tokens_per_s']:,.0f} tok/s, {peak} GiB, {row['step_ms']:.0f} ms"
    return text + (f" (remat {row['remat']}; OOM with {', '.join(row['oom_remat'])})" if row["oom_remat"] else "")
  if row["status"] == "oom":
    return f"does not fit (OOM with remat {', '.join(row['oom_remat'])})"
  return f"{row['status']}: {row.get('detail', '')}"


def report(rows, layouts) -> str:
  """Markdown: one line per T, one column per layout, and GSA's speed-up over the all-attention model."""
  by_cell = {(r["layout"], r["seq_len"]): r for r in rows}
  seq_lens = sorted({r["seq_len"] for r in rows})
  ratio = "gsa" in layouts and "attention" in layouts
  head = ["T", "B"] + list(layouts) + (["gsa / attention tok/s"] if ratio else [])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for t in seq_lens:
    cells = [by_cell.get((layout, t)) for layout in layouts]
    batch = next((r["batch_size"] for r in cells if r), "")
    line = [str(t), str(batch)] + [cell_text(r) for r in cells]
    if ratio:
      g, s = by_cell.get(("gsa", t)), by_cell.get(("attention", t))
      ok = g and s and g["status"] == s["status"] == "ok"
      line.append(f"{g['tokens_per_s'] / s['tokens_per_s']:.2f}x" if ok else "")
    lines.append("| " + " | ".join(line) + " |")
  device = next((r["device"] for r in rows if r.get("device")), "unknown device")
  return f"Training step at a fixed number of tokens per step, {device}.\n\n" + "\n".join(lines) + "\n"


def plot(rows, layouts, path) -> bool:
  try:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
  except ImportError:
    print("matplotlib is not installed: no plot (long_context.json has the numbers).")
    return False
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for layout in layouts:
    pts = sorted((r["seq_len"], r["tokens_per_s"], r["peak_gib"] or float("nan")) for r in rows
                 if r["layout"] == layout and r["status"] == "ok")
    for ax, i in zip(axes, (1, 2)):
      ax.plot([p[0] for p in pts], [p[i] for p in pts], marker="o", label=layout)
  for ax, label in zip(axes, ("tokens / s", "peak memory (GiB)")):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length T")
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return True


def load(path):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)


def save_report(a, rows):
  text = report(rows, a.layouts)
  with open(os.path.join(a.out, "long_context.md"), "w") as f:
    f.write(text)
  plot(rows, a.layouts, os.path.join(a.out, "long_context.png"))
  print(text)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/gsa_1p3b.py")
  p.add_argument("--layouts", type=lambda s: s.split(","), default=list(LAYOUTS))
  p.add_argument("--seq_lens", type=lambda s: [int(x) for x in s.split(",")],
                 default=[4096, 8192, 16384, 32768, 65536])
  p.add_argument("--tokens_per_step", type=int, default=16384)
  p.add_argument("--remat", type=lambda s: s.split(","), default=["matmuls_gsa_keys", "block"],
                 help="remat policies to try in order when a cell runs out of memory")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--cell_timeout_s", type=float, default=300.0)
  p.add_argument("--budget_s", type=float, default=1200.0, help="no cell starts after this many seconds")
  p.add_argument("--out", default="runs/long_context")
  p.add_argument("--report_only", action="store_true")
  p.add_argument("extra", nargs="*", help="more bench_train.py flags, after --, e.g. -- --config.train.loss_chunk=2048")
  a = p.parse_args(argv)
  bad = [x for x in a.layouts if x not in LAYOUTS]
  if bad:
    p.error(f"--layouts: {bad} unknown; expected some of {', '.join(LAYOUTS)}")
  if any(t <= 0 for t in a.seq_lens) or a.tokens_per_step <= 0:
    p.error(f"--seq_lens and --tokens_per_step must be positive; got {a.seq_lens}, {a.tokens_per_step}")
  return a


def main(argv=None, run=run_cell):
  a = parse_args(argv)
  os.makedirs(a.out, exist_ok=True)
  path = os.path.join(a.out, "long_context.json")
  rows = load(path)
  if not a.report_only:
    done = {(r["layout"], r["seq_len"]) for r in rows if r["status"] in ("ok", "oom")}
    deadline = time.monotonic() + a.budget_s
    for layout, t, b in plan(a.layouts, a.seq_lens, a.tokens_per_step):
      if (layout, t) in done:
        continue
      row = measure_cell(a, layout, t, b, deadline, run)
      if row["status"] == "skipped":
        print(f"{layout} T={t}: not run (time budget of {a.budget_s:.0f} s spent)", flush=True)
        continue
      row = {**row, "layout": layout, "seq_len": t, "batch_size": b}
      rows = [r for r in rows if (r["layout"], r["seq_len"]) != (layout, t)] + [row]
      with open(path, "w") as f:
        json.dump(rows, f, indent=1)
      print(f"{layout} T={t} B={b}: {cell_text(row)}", flush=True)
  save_report(a, rows)


if __name__ == "__main__":
  main()
