"""MQAR recall sweep (Zoology-style): accuracy of GSA, softmax attention and ungated GSA against model width.

    python benchmarks/mqar_sweep.py --grid cpu --out runs/mqar_sweep_cpu          # reduced grid, ~10 CPU minutes
    python benchmarks/mqar_sweep.py --grid gpu --out $OUT/mqar                   # the GPU grid (one device call)
    python benchmarks/mqar_sweep.py --models attention,gsa:32 --seq-lens 64 --kv-pairs 4 --widths 64 --steps 300

Models (`--models`, comma-separated):
  attention  every layer is causal softmax attention (`model.attn_layers` = all layers): the recall ceiling.
  gsa:M      GSA with M slots per head (the paper's layer: forget gate g = logsigmoid(x W_f) / normalizer, s = 1 - e^g).
  nogate:M   GSA with the forget gate disabled (`GSAConfig.forget_gate=False`: g = 0, s = sigmoid(x W_f)), the
             ablation towards GSA's ungated ancestor ABC (see `nogate_available`); reported as "not available"
             (nothing trained) on a model without that option.

Every run is the MQAR preset `configs/mqar.py` with the swept fields replaced: 2 layers, 2 heads, SwiGLU width
2 x hidden, short convolutions, vocabulary 256. Training uses the project's own pieces (config validation, the
grain MQAR pipeline, `gsa_jax.train.trainer.make_train_step` / `make_eval_step`, the optimizer), in one process:
runs that differ only in the number of key-value pairs share one compiled step. The score is the accuracy on the
query positions of the held-out split (`eval_batches` x `batch_size` examples).

Writes into --out: results.jsonl (one row per run, appended as each run ends; a rerun skips the runs already there),
results.md (tables) and mqar_sweep.png (accuracy vs width, one panel per sequence length and key-value count).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import mqar  # noqa: E402  (the repository root is put on the path above)
from gsa_jax.data import make_iterator  # noqa: E402
from gsa_jax.models import GSALM, GSAConfig  # noqa: E402
from gsa_jax.train.config import validate_config  # noqa: E402
from gsa_jax.train.optimizer import learning_rate_schedule, make_optimizer  # noqa: E402
from gsa_jax.train.trainer import make_eval_step, make_train_step  # noqa: E402

# Grids. "gpu" is the grid cut to what one 10-minute device call can train (see docs/results.md):
# one key-value count per length (kv = L/8, as Zoology scales them), all widths and slot counts.
GRIDS = {
    # About 10 minutes on 2 shared CPU cores: short training, a small vocabulary (faster to learn), one length.
    "cpu": dict(seq_lens=[64], kv_pairs=[4, 8], widths=[64, 128], models=["attention", "gsa:8", "gsa:32", "nogate:8",
                                                                           "nogate:32"],
                steps=300, batch_size=16, learning_rate=1e-2, warmup_steps=20, eval_batches=16, vocab_size=64,
                backend="chunked", chunk_size=8, time_budget_s=560.0),
    # The grid cut to what one 10-minute device call can train: one key-value count per length
    # (kv = L/16, Zoology's scaling), every width, GSA at 16..128 slots; runs go length by length, and the time
    # budget leaves the rest "not run".
    "gpu": dict(seq_lens=[128, 256, 512], kv_pairs=[8, 16, 32], widths=[64, 128, 256],
                models=["attention", "gsa:16", "gsa:32", "gsa:64", "gsa:128", "nogate:16", "nogate:64"], steps=1000,
                batch_size=64, learning_rate=3e-3, warmup_steps=100, eval_batches=8, vocab_size=256,
                backend="chunked", chunk_size=64, pair_kv_with_len=True, time_budget_s=420.0),
    # The full grid of the issue: every (length, kv) pair with room for the queries (L >= 4 kv). Hours of GPU.
    "full": dict(seq_lens=[128, 256, 512], kv_pairs=[8, 16, 32, 64], widths=[64, 128, 256],
                 models=["attention", "gsa:16", "gsa:32", "gsa:64", "gsa:128", "nogate:16", "nogate:32",
                         "nogate:64", "nogate:128"], steps=3000, batch_size=64, learning_rate=3e-3, warmup_steps=300, eval_batches=16,
                 vocab_size=256, backend="auto", chunk_size=64, time_budget_s=0.0),
}


def nogate_available() -> bool:
  """Whether the model has the no-forgetting option (`GSAConfig.forget_gate=False`: g = 0, s = sigmoid(x W_f)).

  That is GSA with its gate disabled, the ablation towards ABC (Peng et al. 2022), which has no learned forgetting.
  ABC proper also normalizes the writes by their running sum (z_t = logcumsumexp(s~_t), g_t = z_{t-1} - z_t,
  s_t = exp(s~_t - z_t); fla `naive_recurrent_abc`); the model has no option for that variant.
  """
  return "forget_gate" in {f.name for f in dataclasses.fields(GSAConfig)}


def parse_model(spec: str) -> tuple[str, int | None]:
  """'attention' | 'gsa:M' | 'nogate:M' -> (kind, slots)."""
  if spec == "attention":
    return "attention", None
  kind, _, slots = spec.partition(":")
  if kind not in ("gsa", "nogate") or not slots.isdigit() or int(slots) < 1:
    raise ValueError(f"--models: {spec!r} is not 'attention', 'gsa:SLOTS' or 'nogate:SLOTS'")
  return kind, int(slots)


def run_config(spec: str, width: int, seq_len: int, kv: int, a: argparse.Namespace):
  """The MQAR preset with this run's fields."""
  kind, slots = parse_model(spec)
  c = mqar.get_config()
  c.workdir = os.path.join(a.out, "unused")  # nothing is written there: this script keeps no checkpoints
  c.train.seq_len, c.train.batch_size, c.train.steps = seq_len, a.batch_size, a.steps
  c.train.seed = a.seed
  c.optim.learning_rate, c.optim.warmup_steps = a.learning_rate, a.warmup_steps
  c.data.mqar_num_kv_pairs = kv
  c.data.mqar_vocab_size = c.model.vocab_size = a.vocab_size
  c.data.mqar_num_eval_examples = a.eval_batches * a.batch_size
  m = c.model
  m.hidden_size, m.intermediate_size = width, 2 * width
  m.backend, m.chunk_size = a.backend, a.chunk_size
  if kind == "attention":
    m.attn_layers = tuple(range(m.num_layers))
  else:
    m.num_slots = slots
  if kind == "nogate":
    m.forget_gate = False
  return c


def state_size(config) -> int:
  """Recurrent state numbers per layer per sequence: GSA H (dk M + M dv) = M (key_dim + value_dim); attention's
  KV cache 2 L d at the sequence length."""
  m = config.model
  if m.attn_layers:
    return 2 * config.train.seq_len * m.hidden_size
  return m.num_slots * int(m.hidden_size * (m.expand_k + m.expand_v))


class Compiled:
  """Jitted init/train/eval functions for one (model, width, length): kv counts only change the data."""

  def __init__(self, config):
    model_cfg = validate_config(config)
    self.num_params = model_cfg.num_params()
    seed, steps = config.train.seed, config.train.steps
    tx = make_optimizer(config.optim, steps)
    self.graphdef = nnx.graphdef(nnx.eval_shape(lambda: GSALM(model_cfg, rngs=nnx.Rngs(seed))))

    def init():
      params = nnx.state(GSALM(model_cfg, rngs=nnx.Rngs(seed)), nnx.Param)
      zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731 (separate buffers: the state is donated)
      return {"step": zero(), "params": params, "opt_state": tx.init(params), "nonfinite_in_a_row": zero(),
              "nonfinite_total": zero()}

    self.init = jax.jit(init)
    self.train_step = jax.jit(make_train_step(self.graphdef, tx, learning_rate_schedule(config.optim, steps), 1),
                              donate_argnums=0)
    self.eval_step = jax.jit(make_eval_step(self.graphdef))


def as_batch(batch) -> dict:
  return {"tokens": jnp.asarray(batch["tokens"], jnp.int32), "targets": jnp.asarray(batch["targets"], jnp.int32),
          "segment_ids": jnp.asarray(batch["segment_ids"], jnp.int32),
          "loss_mask": jnp.asarray(batch["loss_mask"], jnp.float32)}


def train_and_score(config, compiled: Compiled) -> dict:
  """Trains from scratch for config.train.steps, then scores the held-out split. Returns the metrics."""
  t, d = config.train, config.data
  it = make_iterator(d, split="train", batch_size=t.batch_size, seq_len=t.seq_len, seed=t.seed)
  start = time.perf_counter()
  state = compiled.init()
  losses = []
  for step in range(t.steps):
    state, metrics = compiled.train_step(state, as_batch(next(it)))
    if step >= t.steps - 20:  # the mean of the last 20 steps' loss, read once at the end
      losses.append(metrics["loss"])
  train_loss = float(np.mean(jax.device_get(losses)))
  train_s = time.perf_counter() - start
  eval_it = make_iterator(d, split="eval", batch_size=t.batch_size, seq_len=t.seq_len, seed=t.seed)
  sums = np.zeros(3)
  for _ in range(t.eval_batches):
    out = jax.device_get(compiled.eval_step(state["params"], as_batch(next(eval_it))))
    sums += [float(out["total"]), float(out["count"]), float(out["correct"])]
  return {"accuracy": sums[2] / sums[1], "eval_loss": sums[0] / sums[1], "train_loss": train_loss,
          "train_s": train_s, "nonfinite_steps": int(state["nonfinite_total"])}


def plan(a: argparse.Namespace) -> list[tuple[int, int, int, str]]:
  """(seq_len, width, kv, model) in run order: short sequences first, so a time budget cuts the long ones."""
  runs = []
  for i, seq_len in enumerate(a.seq_lens):
    kvs = [a.kv_pairs[i]] if a.pair_kv_with_len else a.kv_pairs
    for width in a.widths:
      for model in a.models:
        for kv in kvs:
          if seq_len >= 4 * kv:  # the MQAR generator needs room for the pairs and the queries
            runs.append((seq_len, width, kv, model))
  return runs


def run_key(row) -> tuple:
  return (row["model"], row["width"], row["seq_len"], row["kv_pairs"])


def settings(a: argparse.Namespace) -> dict:
  """The training settings of a row: a rerun reuses a finished row only when they are all the same."""
  return {"steps": a.steps, "batch_size": a.batch_size, "learning_rate": a.learning_rate,
          "warmup_steps": a.warmup_steps, "vocab_size": a.vocab_size, "seed": a.seed, "eval_batches": a.eval_batches}


def sweep(a: argparse.Namespace) -> list[dict]:
  os.makedirs(a.out, exist_ok=True)
  results_path = os.path.join(a.out, "results.jsonl")
  done = {}
  if os.path.exists(results_path):
    with open(results_path) as f:
      for line in f:
        row = json.loads(line)
        same = all(row.get(k) == v for k, v in settings(a).items())
        if same and row["status"] == "ok":
          done[run_key(row)] = row
  nogate = nogate_available()
  runs = plan(a)
  print(f"{len(runs)} runs ({len(done)} already in {results_path}); device: {jax.devices()[0].device_kind}; "
        f"no-gate option: {'GSAConfig.forget_gate' if nogate else 'not available'}", flush=True)
  sweep_start = time.perf_counter()
  cache: dict[tuple, Compiled] = {}
  rows = []
  for n, (seq_len, width, kv, model) in enumerate(runs, 1):
    key = (model, width, seq_len, kv)
    base = {"model": model, "width": width, "seq_len": seq_len, "kv_pairs": kv, **settings(a),
            "device": jax.devices()[0].device_kind}
    if key in done:
      rows.append(done[key])
      continue
    if model.startswith("nogate") and not nogate:
      row = {**base, "status": "not available", "reason": "the model has no option to disable the forget gate"}
    elif a.time_budget_s and time.perf_counter() - sweep_start > a.time_budget_s:
      row = {**base, "status": "not run", "reason": f"time budget of {a.time_budget_s:.0f} s spent"}
    else:
      config = run_config(model, width, seq_len, kv, a)
      shape_key = (model, width, seq_len)
      compile_start = time.perf_counter()
      if shape_key not in cache:
        cache.clear()  # one compiled model at a time keeps memory flat over a long sweep
        cache[shape_key] = Compiled(config)
      result = train_and_score(config, cache[shape_key])
      row = {**base, "status": "ok", **result, "params": cache[shape_key].num_params,
             "state_size": state_size(config), "wall_s": time.perf_counter() - compile_start}
    rows.append(row)
    with open(results_path, "a") as f:
      f.write(json.dumps(row) + "\n")
    acc = f"acc {row['accuracy']:.3f} (train loss {row['train_loss']:.3f}, {row['wall_s']:.0f} s)" \
        if row["status"] == "ok" else row["status"]
    print(f"[{n}/{len(runs)}] L={seq_len} kv={kv} d={width} {model}: {acc}; "
          f"{time.perf_counter() - sweep_start:.0f} s elapsed", flush=True)
  return rows


def cell(row) -> str:
  if row is None:
    return ""
  if row["status"] == "ok":
    return f"{100 * row['accuracy']:.1f}"
  return {"not available": "n/a", "not run": "not run"}[row["status"]]


def tables(rows: list[dict]) -> str:
  """One markdown table per (length, kv): models down, widths across; accuracy in %."""
  index = {run_key(r): r for r in rows}
  models = list(dict.fromkeys(r["model"] for r in rows))
  widths = sorted({r["width"] for r in rows})
  out = []
  for seq_len, kv in sorted({(r["seq_len"], r["kv_pairs"]) for r in rows}):
    out.append(f"**L = {seq_len}, {kv} key-value pairs** (query accuracy on held-out examples, %)\n")
    out.append("| model | " + " | ".join(f"d = {w}" for w in widths) + " |")
    out.append("|---|" + "---|" * len(widths))
    for model in models:
      out.append(f"| {model} | " + " | ".join(cell(index.get((model, w, seq_len, kv))) for w in widths) + " |")
    out.append("")
  missing = [r for r in rows if r["status"] != "ok"]
  if missing:
    reasons = sorted({f"{r['status']}: {r['reason']}" for r in missing})
    out.append("n/a / not run: " + "; ".join(reasons) + "\n")
  return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
  """Accuracy vs width, one panel per (length, kv), one line per model (Zoology's figure layout)."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
  except ImportError:  # e.g. the GPU image: draw it later with --report-only where matplotlib is installed
    print("matplotlib is not installed: no plot (rerun with --report-only elsewhere)", flush=True)
    return
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  ok = [r for r in rows if r["status"] == "ok"]
  panels = sorted({(r["seq_len"], r["kv_pairs"]) for r in ok})
  if not panels:
    return
  models = list(dict.fromkeys(r["model"] for r in ok))
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False, sharey=True)
  for ax, (seq_len, kv) in zip(axes[0], panels):
    for i, model in enumerate(models):
      points = sorted((r["width"], r["accuracy"]) for r in ok if r["model"] == model and r["seq_len"] == seq_len
                      and r["kv_pairs"] == kv)
      if points:
        style = "--" if model == "attention" else ("-" if model.startswith("gsa") else ":")
        ax.plot(*zip(*points), linestyle=style, marker="o", label=model, color="k" if model == "attention" else f"C{i}")
    ax.set_xscale("log", base=2)
    ax.set_title(f"L = {seq_len}, {kv} kv pairs")
    ax.set_xlabel("model width")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("MQAR accuracy")
  axes[0][-1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--grid", choices=sorted(GRIDS), default="cpu", help="preset; the flags below override its fields")
  p.add_argument("--out", default=None, help="output directory (default runs/mqar_sweep_GRID)")
  ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
  p.add_argument("--seq-lens", type=ints)
  p.add_argument("--kv-pairs", type=ints)
  p.add_argument("--widths", type=ints)
  p.add_argument("--models", type=lambda s: s.split(","))
  p.add_argument("--pair-kv-with-len", action=argparse.BooleanOptionalAction, default=None,
                 help="the i-th kv count goes with the i-th length only (instead of every kv with every length)")
  for name, kind in (("steps", int), ("batch-size", int), ("learning-rate", float), ("warmup-steps", int),
                     ("eval-batches", int), ("backend", str), ("chunk-size", int), ("vocab-size", int)):
    p.add_argument(f"--{name}", type=kind)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--report-only", action="store_true",
                 help="train nothing: rewrite results.md and the plot from --out's results.jsonl")
  p.add_argument("--time-budget-s", type=float, default=None,
                 help="start no new run after this many seconds; the rest are reported as 'not run' (0: no limit; "
                 "default: the grid's)")
  a = p.parse_args(argv)
  for key, value in {"pair_kv_with_len": False, **GRIDS[a.grid]}.items():
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
  start = time.time()
  if a.report_only:
    with open(os.path.join(a.out, "results.jsonl")) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    r = next(r for r in rows if r["status"] == "ok")
    header = (f"MQAR sweep from {a.out}: {r['steps']} steps x batch {r['batch_size']}, lr {r['learning_rate']}, "
              f"{r['device']}\n\n")
  else:
    rows = sweep(a)
    header = (f"MQAR sweep, grid {a.grid!r}: vocab {a.vocab_size}, {a.steps} steps x batch {a.batch_size}, "
              f"lr {a.learning_rate} (warm-up {a.warmup_steps}), "
              f"backend {a.backend} (chunk {a.chunk_size}), {jax.devices()[0].device_kind}, "
              f"{time.strftime('%Y-%m-%d', time.gmtime(start))}, {time.time() - start:.0f} s\n\n")
  text = tables(rows)
  with open(os.path.join(a.out, "results.md"), "w") as f:
    f.write(header + text)
  plot(rows, os.path.join(a.out, "mqar_sweep.png"))
  print("\n" + header + text, flush=True)


if __name__ == "__main__":
  main()
