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
import functools
import json
import os
import subprocess
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import mqar  # noqa: E402  (the repository root is put on the path above)
from gsa_jax.data import make_iterator  # noqa: E402
from gsa_jax.data.mqar import SPLIT_IDS, mqar_batch  # noqa: E402
from gsa_jax.models import GSALM  # noqa: E402
from gsa_jax.train.config import validate_config  # noqa: E402
from gsa_jax.train.optimizer import learning_rate_schedule, make_optimizer  # noqa: E402
from gsa_jax.train.trainer import make_eval_step, make_train_step  # noqa: E402

GRIDS = {
    # About 10 minutes on 2 shared CPU cores: short training, a small vocabulary (faster to learn), one length.
    "cpu": dict(seq_lens=[64], kv_pairs=[4, 8], widths=[64, 128], models=["attention", "gsa:8", "gsa:32", "nogate:8",
                                                                           "nogate:32"],
                steps=300, batch_size=16, learning_rates=[1e-2], warmup_steps=20, eval_batches=16, vocab_size=64,
                backend="chunked", chunk_size=8, time_budget_s=560.0),
    # What two 10-minute H100 calls train (docs/results.md, session 4): the shortest length, two widths, every
    # model, 3 learning rates x 2 seeds vmapped per cell. A cell of 6 runs takes 24-102 s there, mostly compilation;
    # the time budget leaves the rest "not run", and a rerun on the same --out continues where it stopped.
    # bfloat16 compute and the Pallas kernels (parameters stay float32). lr 1e-3 left every model on the plateau in
    # 3000 steps (a float32 call), and 3e-2 was GSA's best rate at width 64.
    "gpu": dict(seq_lens=[128], kv_pairs=[8], widths=[64, 128],
                models=["attention", "gsa:16", "gsa:32", "gsa:64", "gsa:128", "nogate:16", "nogate:64"], steps=3000,
                batch_size=64, learning_rates=[3e-3, 1e-2, 3e-2], seeds=[0, 1], warmup_steps=150, eval_batches=8,
                vocab_size=256, backend="pallas_gpu", dtype="bfloat16", chunk_size=64, time_budget_s=480.0),
    # The whole grid: every (length, kv) pair with room for the queries (L >= 4 kv), every width; 231 cells,
    # hours of H100 time: run it as many 10-minute calls continuing one --out (copy the results*.jsonl back in before
    # each). A cell at L = 512 may not fit in one call (600 steps of 6 runs at width 256 took 156-217 s in float32).
    "full": dict(seq_lens=[128, 256, 512], kv_pairs=[8, 16, 32, 64], widths=[64, 128, 256],
                 models=["attention", "gsa:16", "gsa:32", "gsa:64", "gsa:128", "nogate:16", "nogate:64"], steps=3000,
                 batch_size=64, learning_rates=[3e-3, 1e-2, 3e-2], seeds=[0, 1], warmup_steps=150, eval_batches=8,
                 vocab_size=256, backend="pallas_gpu", dtype="bfloat16", chunk_size=64, time_budget_s=480.0),
}


def parse_model(spec: str) -> tuple[str, int | None]:
  """'attention' | 'gsa:M' | 'nogate:M' | 'abc:M' -> (kind, slots)."""
  if spec == "attention":
    return "attention", None
  kind, _, slots = spec.partition(":")
  if kind not in ("gsa", "nogate", "abc") or not slots.isdigit() or int(slots) < 1:
    raise ValueError(f"--models: {spec!r} is not 'attention', 'gsa:SLOTS', 'nogate:SLOTS' or 'abc:SLOTS'")
  return kind, int(slots)


def model_order(spec: str) -> tuple[int, int]:
  """Sort key for tables and legends: attention, then GSA, the ablation, ABC, each by slot count."""
  kind, slots = parse_model(spec)
  return ("attention", "gsa", "nogate", "abc").index(kind), slots or 0


class Run(NamedTuple):
  """One training run of the sweep."""
  seq_len: int
  width: int
  kv: int
  model: str
  lr: float
  seed: int


def run_config(run: Run, a: argparse.Namespace):
  """The MQAR preset with this run's fields."""
  kind, slots = parse_model(run.model)
  c = mqar.get_config()
  c.workdir = os.path.join(a.out, "unused")  # nothing is written there: this script keeps no checkpoints
  c.train.seq_len, c.train.batch_size, c.train.steps = run.seq_len, a.batch_size, a.steps
  c.train.seed = run.seed
  c.optim.learning_rate, c.optim.warmup_steps = run.lr, a.warmup_steps
  c.data.mqar_num_kv_pairs = run.kv
  c.data.mqar_vocab_size = c.model.vocab_size = a.vocab_size
  c.data.mqar_num_eval_examples = a.eval_batches * a.batch_size
  m = c.model
  m.hidden_size, m.intermediate_size = run.width, 2 * run.width
  m.backend, m.chunk_size, m.dtype = a.backend, a.chunk_size, a.dtype
  if kind == "attention":
    m.attn_layers = tuple(range(m.num_layers))
  else:
    m.num_slots = slots
  if kind == "nogate":
    m.forget_gate = False
  if kind == "abc":
    m.slot_control = "abc"
  return c


def state_size(config) -> int:
  """Recurrent state numbers per layer per sequence: GSA H (dk M + M dv) = M (key_dim + value_dim); attention's
  KV cache 2 L d at the sequence length."""
  m = config.model
  if m.attn_layers:
    return 2 * config.train.seq_len * m.hidden_size
  return m.num_slots * int(m.hidden_size * (m.expand_k + m.expand_v))


def member_optimizer(config) -> optax.GradientTransformation:
  """The config's optimizer with its peak learning rate moved into the optimizer state.

  `make_optimizer` at peak 1, then `optax.scale` by the run's rate (an injected hyperparameter, so a traced value):
  AdamW's update is -lr_t (adam + wd p) with lr_t = peak x schedule shape, so this is the same update, and runs at
  several learning rates can share one program under `jax.vmap`.
  """
  unit = config.optim.copy_and_resolve_references()
  unit.learning_rate = 1.0
  return optax.chain(make_optimizer(unit, config.train.steps), optax.inject_hyperparams(optax.scale)(step_size=1.0))


class CellTrainer:
  """One sweep cell's jitted programs, training all its runs (learning rate x seed) at once under `jax.vmap`.

  A cell's runs share the model's shapes, so one program trains them together and compiles once: the tiny MQAR
  models leave a GPU mostly idle (H100, L = 128, width 64: 500 steps of 6 runs in 2.5 s, after a compilation of
  tens of seconds; docs/results.md). Each run keeps its own parameters, optimizer state, learning rate and seed
  (init and data); runs with the same seed see the same training batches.
  """

  def __init__(self, config, members: list[tuple[float, int]]):
    model_cfg = validate_config(config)
    self.num_params = model_cfg.num_params()
    self.members = members
    self.lrs = jnp.asarray([lr for lr, _ in members], jnp.float32)
    self.seeds = jnp.asarray([seed for _, seed in members], jnp.uint32)
    steps = config.train.steps
    tx = member_optimizer(config)
    self.graphdef = nnx.graphdef(nnx.eval_shape(lambda: GSALM(model_cfg, rngs=nnx.Rngs(0))))

    def init(lr, seed):
      params = nnx.state(GSALM(model_cfg, rngs=nnx.Rngs(jax.random.key(seed))), nnx.Param)
      inner, scale = tx.init(params)
      zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731 (separate buffers: the state is donated)
      return {"step": zero(), "params": params, "opt_state": (inner, scale._replace(hyperparams={"step_size": lr})),
              "nonfinite_in_a_row": zero(), "nonfinite_total": zero()}

    # The logged learning rate is not used here; the schedule only has to be a function of the step.
    train_step = make_train_step(self.graphdef, tx, learning_rate_schedule(config.optim, steps), 1)
    d = config.data
    make_batch = functools.partial(
        mqar_batch, batch_size=config.train.batch_size, seq_len=config.train.seq_len, vocab_size=d.mqar_vocab_size,
        num_kv_pairs=d.mqar_num_kv_pairs, power_a=float(d.mqar_power_a), random_non_queries=d.mqar_random_non_queries)

    def train(state, keys):
      """A block of steps of one run in one program: (state, keys [n, 2]) -> (state, loss of each step [n])."""
      def step(state, key):
        state, metrics = train_step(state, make_batch(key))
        return state, metrics["loss"]
      return jax.lax.scan(step, state, keys)

    self.init = jax.jit(jax.vmap(init))
    self.train = jax.jit(jax.vmap(train), donate_argnums=0)
    self.eval_step = jax.jit(jax.vmap(make_eval_step(self.graphdef), in_axes=(0, None)))


TRAIN_BLOCK = 500  # training steps per jitted call (at most two programs a cell: this and the remainder)


def as_batch(batch) -> dict:
  return {"tokens": jnp.asarray(batch["tokens"], jnp.int32), "targets": jnp.asarray(batch["targets"], jnp.int32),
          "segment_ids": jnp.asarray(batch["segment_ids"], jnp.int32),
          "loss_mask": jnp.asarray(batch["loss_mask"], jnp.float32)}


def train_keys(seed: int, steps: int) -> jax.Array:
  """The PRNG keys of a run's training batches [steps, 2] (a stream apart from the init's)."""
  return jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), SPLIT_IDS["train"]), steps)


def train_and_score(config, trainer: CellTrainer) -> list[dict]:
  """Trains the cell's runs from scratch for config.train.steps, then scores the held-out split (the same examples
  for every run). Returns each run's metrics, in the order of trainer.members."""
  t, d = config.train, config.data
  start = time.perf_counter()
  keys = jnp.stack([train_keys(seed, t.steps) for _, seed in trainer.members])  # [runs, steps, 2]
  state, losses = trainer.init(trainer.lrs, trainer.seeds), []
  for begin in range(0, t.steps, TRAIN_BLOCK):  # blocks of steps, so that a slow cell (CPU) can show progress
    state, block = trainer.train(state, keys[:, begin:begin + TRAIN_BLOCK])
    losses.append(block)
    if time.perf_counter() - start > 30 and begin + TRAIN_BLOCK < t.steps:
      last = np.array2string(np.asarray(block[:, -1]), precision=3)  # each run's loss
      print(f"    step {begin + block.shape[1]}/{t.steps}: loss {last} ({time.perf_counter() - start:.0f} s)",
            flush=True)
  losses = np.concatenate(jax.device_get(losses), axis=1)
  train_s = time.perf_counter() - start
  eval_it = make_iterator(d, split="eval", batch_size=t.batch_size, seq_len=t.seq_len, seed=0)
  sums = np.zeros((len(trainer.members), 3))
  try:
    for _ in range(t.eval_batches):
      out = jax.device_get(trainer.eval_step(state["params"], as_batch(next(eval_it))))
      sums += np.stack([out["total"], out["count"], out["correct"]], axis=1)
  finally:
    eval_it.close()  # stops its read-ahead threads (a sweep builds one per cell)
  nonfinite = jax.device_get(state["nonfinite_total"])
  return [{"accuracy": float(s[2] / s[1]), "eval_loss": float(s[0] / s[1]),
           "train_loss": float(np.mean(loss[-20:])),  # the mean of the last 20 steps' loss
           "train_s": train_s, "nonfinite_steps": int(n)} for s, loss, n in zip(sums, losses, nonfinite)]


def plan(a: argparse.Namespace) -> list[Run]:
  """The runs in order: short sequences first, so a time budget cuts the long ones; each (width, model) runs all
  its learning rates and seeds before the next starts, so a cut drops models rather than learning rates."""
  runs = []
  for i, seq_len in enumerate(a.seq_lens):
    kvs = [a.kv_pairs[i]] if a.pair_kv_with_len else a.kv_pairs
    for width in a.widths:
      for model in a.models:
        for lr in a.learning_rates:
          for seed in a.seeds:
            for kv in kvs:
              if seq_len >= 4 * kv:  # the MQAR generator needs room for the pairs and the queries
                runs.append(Run(seq_len, width, kv, model, lr, seed))
  return runs


def cell_key(row) -> tuple:
  """The table cell of a row: (model, width, seq_len, kv_pairs)."""
  return (row["model"], row["width"], row["seq_len"], row["kv_pairs"])


def run_key(row) -> tuple:
  return (*cell_key(row), row["learning_rate"], row["seed"])


# The training settings shared by every row: a rerun reuses a finished row only when they are all the same. (The
# backend is recorded but not compared: every backend computes the same op.)
SETTING_KEYS = ("steps", "batch_size", "warmup_steps", "vocab_size", "eval_batches", "train_data", "dtype")
# What a row written before a setting existed means: "train_data" absent = the grain pipeline, "dtype" absent = float32.
SETTING_DEFAULTS = {"train_data": "pipeline", "dtype": "float32"}


def settings(a: argparse.Namespace) -> dict:
  """This sweep's settings (training batches always come from `mqar_batch`: "device")."""
  current = {**vars(a), "train_data": "device"}
  return {k: current[k] for k in SETTING_KEYS}


def row_settings(row: dict) -> dict:
  return {k: row.get(k, SETTING_DEFAULTS.get(k)) for k in SETTING_KEYS}


def read_rows(out: str, match: dict | None = None) -> list[dict]:
  """The rows in out's results*.jsonl (results.jsonl and the shards' files), one per run and settings: a finished
  row wins over a "not run" one, otherwise the last one read (files in name order). match: keep only rows with
  these settings (`settings`). A line cut short by a killed process is skipped with a warning."""
  rows: dict[tuple, dict] = {}
  for name in sorted(f for f in os.listdir(out) if f.startswith("results") and f.endswith(".jsonl")):
    with open(os.path.join(out, name)) as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          print(f"warning: {name}:{number} is not a JSON row (a run killed while writing?); skipped", flush=True)
          continue
        if match is not None and row_settings(row) != match:
          continue
        key = (run_key(row), json.dumps(row_settings(row), sort_keys=True))
        if row["status"] == "ok" or rows.get(key, {}).get("status") != "ok":
          rows[key] = row
  return list(rows.values())


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


def planned_row(r: Run) -> dict:
  """A run's identifying fields, as its row names them (what `run_key` reads)."""
  return {"model": r.model, "width": r.width, "seq_len": r.seq_len, "kv_pairs": r.kv, "learning_rate": r.lr,
          "seed": r.seed}


def cells_of(runs: list[Run]) -> list[list[Run]]:
  """The runs grouped by table cell (every learning rate and seed of a (length, kv, width, model)), in plan order."""
  cells: dict[tuple, list[Run]] = {}
  for r in runs:
    cells.setdefault((r.seq_len, r.kv, r.width, r.model), []).append(r)
  return list(cells.values())


def group(rows: list[dict]) -> dict[tuple, list[dict]]:
  """Table cell -> its rows (every learning rate and seed)."""
  cells: dict[tuple, list[dict]] = {}
  for r in rows:
    cells.setdefault(cell_key(r), []).append(r)
  return cells


def accuracies(rows: list[dict]) -> dict[float, list[float]]:
  """Learning rate -> the accuracies of its finished runs (one per seed)."""
  out: dict[float, list[float]] = {}
  for r in rows:
    if r["status"] == "ok":
      out.setdefault(r["learning_rate"], []).append(r["accuracy"])
  return out


def best(rows: list[dict]) -> tuple[float, list[float]] | None:
  """Among a cell's finished runs: the learning rate with the highest mean accuracy over seeds, and its accuracies."""
  accs = accuracies(rows)
  return max(accs.items(), key=lambda item: np.mean(item[1])) if accs else None


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


def sweep_text(lrs: list[float], seeds: list[int]) -> str:
  """'lr 0.001, 0.01 (best per cell), seeds 0, 1' for the results header."""
  return f"lr {', '.join(f'{lr:g}' for lr in lrs)}" + (" (best per cell)" if len(lrs) > 1 else "") + (
      f", seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else "")


def shard(text: str) -> tuple[int, int]:
  """'I/N' -> (I, N), with 0 <= I < N."""
  index, _, count = text.partition("/")
  if not (index.isdigit() and count.isdigit() and 0 <= int(index) < int(count)):
    raise argparse.ArgumentTypeError(f"{text!r} is not I/N with 0 <= I < N (e.g. 0/4)")
  return int(index), int(count)


def without_option(argv: list[str], name: str) -> list[str]:
  """argv less `name VALUE` / `name=VALUE`."""
  out, skip = [], False
  for arg in argv:
    if skip:
      skip = False
    elif arg == name:
      skip = True
    elif not arg.startswith(name + "="):
      out.append(arg)
  return out


def run_workers(count: int, argv: list[str], out: str, poll_s: float = 2.0) -> list[int]:
  """Runs this sweep as `count` processes sharing the device, the i-th with `--shard i/count`, each given
  0.9 / count of the GPU's memory (unless XLA_PYTHON_CLIENT_MEM_FRACTION is set) and logging to out/workerI.log.
  Echoes every finished run's line as it is logged; returns the processes' exit codes."""
  os.makedirs(out, exist_ok=True)
  env = {**os.environ}
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / count:.3f}")
  args = [sys.executable, os.path.abspath(__file__), *without_option(without_option(argv, "--workers"), "--out"),
          "--out", out]
  logs = [os.path.join(out, f"worker{i}.log") for i in range(count)]
  procs = []
  try:
    for i, log in enumerate(logs):
      with open(log, "w") as f:
        procs.append(subprocess.Popen([*args, "--shard", f"{i}/{count}"], stdout=f, stderr=subprocess.STDOUT,
                                      env=env))
    print(f"{count} workers started; their logs: {os.path.join(out, 'worker*.log')}", flush=True)
    seen = [0] * count
    while True:
      running = any(proc.poll() is None for proc in procs)
      for i, log in enumerate(logs):
        with open(log) as f:
          lines = f.read().split("\n")[:-1]  # whole lines only: the last may still be being written
        for line in lines[seen[i]:]:
          if line.startswith("[") or "runs in" in line:
            print(f"worker {i}: {line}", flush=True)
        seen[i] = len(lines)
      if not running:
        break
      time.sleep(poll_s)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.terminate()
  for i, proc in enumerate(procs):
    if proc.returncode:
      with open(logs[i]) as f:
        tail = f.read().splitlines()[-15:]
      print(f"worker {i} failed (exit {proc.returncode}); the end of {logs[i]}:\n  " + "\n  ".join(tail), flush=True)
  return [proc.returncode for proc in procs]


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
    codes = run_workers(a.workers, sys.argv[1:] if argv is None else list(argv), a.out)
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
