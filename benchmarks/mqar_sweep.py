"""MQAR recall sweep (Zoology-style): accuracy of GSA, softmax attention and ungated GSA against model width.

    python benchmarks/mqar_sweep.py --grid cpu --out runs/mqar_sweep_cpu          # reduced grid, ~10 CPU minutes
    python benchmarks/mqar_sweep.py --grid gpu --out $OUT/mqar     # L = 128 on an H100: two 10-minute calls in one
                                                                   # process, the second continuing the first's rows
    python benchmarks/mqar_sweep.py --grid gpu --workers 8 --out $OUT/mqar   # 8 processes share the GPU (overlapping
                                                                             # compilations: docs/benchmarks.md)
    python benchmarks/mqar_sweep.py --models attention,gsa:32 --seq-lens 64 --kv-pairs 4 --widths 64 --steps 300
    python benchmarks/mqar_sweep.py ... --learning-rates 1e-3,3e-3,1e-2 --seeds 0,1   # best lr per model, as Zoology

Models (`--models`, comma-separated):
  attention  every layer is causal softmax attention (`model.attn_layers` = all layers): the recall ceiling.
  gsa:M      GSA with M slots per head (the paper's layer: forget gate g = logsigmoid(x W_f) / normalizer, s = 1 - e^g).
  nogate:M   GSA with the forget gate disabled (`GSAConfig.forget_gate=False`: g = 0, s = sigmoid(x W_f)), the
             ablation towards GSA's ungated ancestor ABC (ABC as published also normalizes its writes by their
             running sum, which this ablation does not).
  abc:M      ABC exactly (`GSAConfig.slot_control="abc"`: writes normalized by their running sum, no learned
             forgetting), the rest of the layer as GSA's.

Every run is the MQAR preset `configs/mqar.py` with the swept fields replaced: 2 layers, 2 heads, SwiGLU width
2 x hidden, short convolutions, vocabulary 256. Training uses the project's own pieces (config validation,
`gsa_jax.train.trainer.make_train_step` / `make_eval_step`, the optimizer), in one process. Training batches are
fresh examples generated on the device (`gsa_jax.data.mqar.mqar_batch`, the MQAR pipeline's construction) inside
jitted scans over blocks of `TRAIN_BLOCK` steps, so a run never waits on the host: every step sees new examples
(`data.mqar_num_train_examples`, the pipeline's fixed training set, is not used). The score is the accuracy on the
query positions of the grain pipeline's held-out split (`eval_batches` x `batch_size` examples, the same ones for
every run).

Learning rates and seeds (`--learning-rates`, `--seeds`): every (model, length, kv, width) cell is trained at each
learning rate with each seed, all of them at once in one vmapped program (`CellTrainer`). A cell's score is the
mean accuracy over seeds at its best learning rate (Zoology sweeps the learning rate per model and reports the
best); the tables name the winning rate, and a second table lists every rate.

Writes into --out: results.jsonl (one row per run, appended as each cell ends; a rerun skips the runs already there),
results.md (tables) and mqar_sweep.png (best-lr accuracy vs width, one panel per sequence length and key-value
count).

A cell's time on a GPU is mostly compilation (a CPU job), so several processes can share one GPU: `--workers N`
starts N processes of this script, each training every N-th cell (`--shard I/N`, its own results.shardIofN.jsonl),
and merges their rows into the tables as `--report-only` does:

    python benchmarks/mqar_sweep.py --grid gpu --workers 8 --out $OUT/mqar     # docs/benchmarks.md: the speed-up
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The repository root is put on the path above.
from benchmarks.mqar_grid import GRIDS, cells_of, parse_model, plan, planned_row, run_config, state_size  # noqa: E402
from benchmarks.mqar_plot import plot  # noqa: E402
from benchmarks.mqar_results import read_rows, row_settings, run_key, settings  # noqa: E402
from benchmarks.mqar_tables import sweep_text, tables  # noqa: E402
from benchmarks.mqar_trainer import CellTrainer, train_and_score  # noqa: E402
from benchmarks.worker_pool import run_workers, shard  # noqa: E402


def sweep(a: argparse.Namespace) -> list[dict]:
  os.makedirs(a.out, exist_ok=True)
  index, count = a.shard
  results_path = os.path.join(a.out, "results.jsonl" if count == 1 else f"results.shard{index}of{count}.jsonl")
  done = {run_key(row): row for row in read_rows(a.out, settings(a)) if row["status"] == "ok"}
  cells = cells_of(plan(a))[index::count]
  runs = [r for cell in cells for r in cell]
  device = jax.devices()[0].device_kind
  shard_text = f" in shard {index}/{count}" if count > 1 else ""
  print(f"{len(runs)} runs in {len(cells)} cells{shard_text}, "
        f"{sum(1 for r in runs if run_key(planned_row(r)) in done)} of them already in {a.out}; device: {device}",
        flush=True)
  sweep_start, longest_cell = time.perf_counter(), 0.0
  rows, n = [], 0
  for cell_runs in cells:
    first = cell_runs[0]
    base = [{**planned_row(r), **settings(a), "device": device, "backend": a.backend} for r in cell_runs]
    todo = [i for i, b in enumerate(base) if run_key(b) not in done]
    cell_rows = [done.get(run_key(b)) for b in base]
    # Start a cell only if it should end within the budget (as long as the longest so far): a cell cut by the
    # caller's time limit loses all its runs.
    if todo and a.time_budget_s and time.perf_counter() - sweep_start + longest_cell > a.time_budget_s:
      for i in todo:
        cell_rows[i] = {**base[i], "status": "not run", "reason": f"time budget of {a.time_budget_s:.0f} s spent"}
    elif todo:
      config = run_config(first, a)
      compile_start = time.perf_counter()
      trainer = CellTrainer(config, [(cell_runs[i].lr, cell_runs[i].seed) for i in todo])
      results = train_and_score(config, trainer)
      wall_s = time.perf_counter() - compile_start
      longest_cell = max(longest_cell, wall_s)
      for i, result in zip(todo, results):
        cell_rows[i] = {**base[i], "status": "ok", **result, "params": trainer.num_params,
                        "state_size": state_size(config), "wall_s": wall_s, "runs_together": len(todo)}
    if todo:
      with open(results_path, "a") as f:
        f.write("".join(json.dumps(cell_rows[i]) + "\n" for i in todo))
    rows += cell_rows
    for r, row in zip(cell_runs, cell_rows):
      n += 1
      if row is done.get(run_key(row)):
        continue
      acc = f"acc {row['accuracy']:.3f} (train loss {row['train_loss']:.3f}, {row['wall_s']:.0f} s for " \
          f"{row['runs_together']} runs)" if row["status"] == "ok" else row["status"]
      print(f"[{n}/{len(runs)}] L={r.seq_len} kv={r.kv} d={r.width} {r.model} lr={r.lr:g} seed={r.seed}: {acc}; "
            f"{time.perf_counter() - sweep_start:.0f} s elapsed", flush=True)
  return rows


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--grid", choices=sorted(GRIDS), default="cpu", help="preset; the flags below override its fields")
  p.add_argument("--out", default=None, help="output directory (default runs/mqar_sweep_GRID)")
  ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
  floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
  p.add_argument("--seq-lens", type=ints)
  p.add_argument("--kv-pairs", type=ints)
  p.add_argument("--widths", type=ints)
  p.add_argument("--models", type=lambda s: s.split(","))
  p.add_argument("--pair-kv-with-len", action=argparse.BooleanOptionalAction, default=None,
                 help="the i-th kv count goes with the i-th length only (instead of every kv with every length)")
  p.add_argument("--learning-rates", type=floats, help="every cell is trained at each; tables report the best")
  p.add_argument("--learning-rate", dest="learning_rates", type=lambda s: [float(s)], help="one learning rate")
  p.add_argument("--seeds", type=ints, help="every cell is trained with each; tables report the mean (default 0)")
  p.add_argument("--seed", dest="seeds", type=lambda s: [int(s)], help="one seed")
  for name, kind in (("steps", int), ("batch-size", int), ("warmup-steps", int),
                     ("eval-batches", int), ("backend", str), ("chunk-size", int), ("vocab-size", int)):
    p.add_argument(f"--{name}", type=kind)
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                 help="the models' compute dtype (parameters stay float32; default float32)")
  p.add_argument("--shard", type=shard, default=(0, 1), metavar="I/N",
                 help="train only every N-th cell, from the I-th (0-based), into results.shardIofN.jsonl: N "
                 "processes sharing one GPU overlap their compilations; then --report-only merges them")
  p.add_argument("--workers", type=int, default=1,
                 help="run the sweep as this many processes sharing the GPU (each a --shard; their compilations "
                 "overlap), then merge their results as --report-only does")
  p.add_argument("--report-only", action="store_true",
                 help="train nothing: rewrite results.md and the plot from --out's results*.jsonl")
  p.add_argument("--time-budget-s", type=float, default=None,
                 help="start no new run after this many seconds; the rest are reported as 'not run' (0: no limit; "
                 "default: the grid's)")
  a = p.parse_args(argv)
  for key, value in {"pair_kv_with_len": False, "seeds": [0], "dtype": "float32", **GRIDS[a.grid]}.items():
    if getattr(a, key, None) is None:
      setattr(a, key, value)
  if a.pair_kv_with_len and len(a.kv_pairs) != len(a.seq_lens):
    p.error("--pair-kv-with-len needs as many kv counts as lengths")
  for model in a.models:
    try:
      parse_model(model)
    except ValueError as e:
      p.error(str(e))
  a.out = a.out or os.path.join("runs", f"mqar_sweep_{a.grid}")
  if os.path.exists(a.out) and not os.path.isdir(a.out):
    p.error(f"--out {a.out}: is a file; give a directory for the results")
  failed = []
  if a.workers < 1:
    p.error(f"--workers {a.workers}: give 1 or more processes")
  if a.workers > 1:
    if a.report_only or a.shard != (0, 1):
      p.error("--workers starts its own --shard processes: give it without --shard and --report-only")
    codes = run_workers(os.path.abspath(__file__), a.workers, sys.argv[1:] if argv is None else list(argv), a.out,
                        echo=lambda line: line.startswith("[") or "runs in" in line)
    failed = [i for i, code in enumerate(codes) if code]
    a.report_only = True  # the merged tables, below
  failed_text = f"workers {', '.join(map(str, failed))} failed (see {a.out}/worker*.log)"
  start = time.time()
  if a.report_only:
    if not os.path.isdir(a.out):
      p.error(f"--out {a.out}: no such directory (it should hold a sweep's results*.jsonl)")
    rows = read_rows(a.out)
    kinds_of_settings = {json.dumps(row_settings(r), sort_keys=True) for r in rows}
    if len(kinds_of_settings) > 1:
      p.error(f"{a.out} holds rows trained with different settings; report them from separate directories:\n  "
              + "\n  ".join(sorted(kinds_of_settings)))
    first = next((r for r in rows if r["status"] == "ok"), None)
    if first is None:
      if failed:
        sys.exit(failed_text)
      p.error(f"{a.out} holds no finished run")
    lrs, seeds = sorted({r["learning_rate"] for r in rows}), sorted({r["seed"] for r in rows})
    kinds = lambda key, default: ", ".join(sorted({str(r.get(key, default)) for r in rows}))  # noqa: E731
    header = (f"MQAR sweep from {a.out}: {first['steps']} steps x batch {first['batch_size']}, "
              f"{sweep_text(lrs, seeds)}, {kinds('dtype', 'float32')}, backend {kinds('backend', 'not recorded')}, "
              f"{first['device']}\n\n")
  else:
    rows = sweep(a)
    header = (f"MQAR sweep, grid {a.grid!r}: vocab {a.vocab_size}, {a.steps} steps x batch {a.batch_size}, "
              f"{sweep_text(a.learning_rates, a.seeds)} (warm-up {a.warmup_steps}), "
              f"backend {a.backend} (chunk {a.chunk_size}), {a.dtype}, {jax.devices()[0].device_kind}, "
              f"{time.strftime('%Y-%m-%d', time.gmtime(start))}, {time.time() - start:.0f} s\n\n")
  text = tables(rows)
  if a.shard[1] > 1 and not a.report_only:  # one shard's cells: the merged tables come from --report-only
    print(f"\nshard {a.shard[0]}/{a.shard[1]} only; merge the shards with --report-only --out {a.out}", flush=True)
  else:
    with open(os.path.join(a.out, "results.md"), "w") as f:
      f.write(header + text)
    plot(rows, os.path.join(a.out, "mqar_sweep.png"))
  print("\n" + header + text, flush=True)
  if failed:
    sys.exit(failed_text + "; the tables hold what finished")



if __name__ == "__main__":
  main()
