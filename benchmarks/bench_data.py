"""Throughput of train.py's data pipeline alone (no model, no accelerator): does it keep up with the train step?

    python benchmarks/bench_data.py --config=configs/code_lm.py:gsa \
        --config.data.path='corpus/code/train-*.jsonl' --config.data.tokenizer=corpus/code/tokenizer.json
    python benchmarks/bench_data.py --config=configs/mqar.py --read_threads=1,4,8

Builds the training iterator exactly as train.py does (`gsa_jax.data.make_iterator` with the config's data section,
batch size and sequence length, one process's share), takes --warmup batches untimed (the read-ahead threads start),
then times --batches batches for each value of --read_threads and prints one table: tokens/s and ms a batch. Compare
the tokens/s with bench_train.py's for the same config: below it, training waits for data.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gsa_jax.data import make_iterator  # noqa: E402



def define_flags() -> dict:
  """The command line's flags (defined when run as a script, so that importing `time_pipeline` defines none)."""
  return {
      "config": config_flags.DEFINE_config_file("config", "configs/mqar.py", "training config", lock_config=False),
      "batches": flags.DEFINE_integer("batches", 40, "timed batches per setting"),
      "warmup": flags.DEFINE_integer("warmup", 3, "untimed batches first"),
      "read_threads": flags.DEFINE_list("read_threads", [], "data.read_threads values to time (default: the config's)"),
  }


def time_pipeline(data_config, *, batch_size: int, seq_len: int, seed: int, batches: int, warmup: int) -> dict:
  """Tokens/s and seconds a batch of the training iterator built from `data_config`."""
  it = make_iterator(data_config, split="train", batch_size=batch_size, seq_len=seq_len, seed=seed)
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  tokens = sum(next(it)["tokens"].size for _ in range(batches))
  seconds = time.perf_counter() - start
  return {"tokens_per_s": tokens / seconds, "batch_ms": 1e3 * seconds / batches}


def main(argv, flag):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = flag["config"].value
  t = config.train
  batches, warmup = flag["batches"].value, flag["warmup"].value
  threads = [int(n) for n in flag["read_threads"].value] or [config.data.read_threads]
  if min(threads) < 1 or batches < 1 or warmup < 0:
    raise app.UsageError("--read_threads must be >= 1, --batches >= 1 and --warmup >= 0")
  print(f"data.source={config.data.source}, {t.batch_size} x {t.seq_len} tokens a batch, {batches} batches "
        f"after {warmup} untimed")
  print("read_threads | tokens/s | ms a batch")
  print("-------------|----------|-----------")
  for n in threads:
    data = config.data.copy_and_resolve_references()
    data.read_threads = n
    try:
      row = time_pipeline(data, batch_size=t.batch_size, seq_len=t.seq_len, seed=t.seed, batches=batches,
                          warmup=warmup)
    except ValueError as e:  # the data config's own checks: a missing path or tokenizer, bad values
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    print(f"{n:<12} | {row['tokens_per_s']:>8,.0f} | {row['batch_ms']:.1f}", flush=True)


if __name__ == "__main__":
  _flags = define_flags()
  app.run(lambda argv: main(argv, _flags))
