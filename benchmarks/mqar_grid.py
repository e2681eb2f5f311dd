"""The MQAR sweep's grid (`benchmarks/mqar_sweep.py`): the presets, the model specs, the runs in the order they
train, grouped into table cells, and each run's training config."""

from __future__ import annotations

import argparse
import os
from typing import NamedTuple

from configs import mqar


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
