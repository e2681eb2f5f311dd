"""Training throughput of train.py's own train step on synthetic tokens; prints a table.

    python benchmarks/bench_train.py --config=configs/gsa_1p3b.py --config.train.batch_size=4 \
        --config.train.seq_len=4096

The model, optimizer, sharding, jit and donation are exactly train.py's (`gsa_jax.train.trainer.TrainRun`); only
the data differs: uniformly random tokens generated on the host (no data pipeline, so the figure is the device's).
Warm-up steps are excluded; the timed steps run back to back with one synchronization at the end, as in training.
Peak memory is the device's `peak_bytes_in_use` over the whole process (compilation and warm-up included).
"""

from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gsa_jax.train.config import check_mesh, model_flops_per_token, validate_config  # noqa: E402
from gsa_jax.train.metrics import peak_flops  # noqa: E402
from gsa_jax.train.trainer import TrainRun  # noqa: E402
from benchmarks.profiling import print_profile_summary  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/gsa_1p3b.py", "training config", lock_config=True)
_WARMUP = flags.DEFINE_integer("warmup", 3, "untimed steps after compilation")
_STEPS = flags.DEFINE_integer("steps", 10, "timed steps")
_PROFILE = flags.DEFINE_string("profile_dir", "", "if set, a jax.profiler trace of 3 steps is written here")


def synthetic_batch(rng, batch_size, seq_len, vocab):
  tokens = rng.integers(0, vocab, (batch_size, seq_len + 1), dtype=np.int32)
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((batch_size, seq_len), np.int32),
          "loss_mask": np.ones((batch_size, seq_len), np.float32)}


def main(argv):
  del argv
  config = _CONFIG.value
  model_cfg = validate_config(config, check_data=False)
  mesh_shape = check_mesh(config, jax.device_count(), jax.process_count())
  run = TrainRun(config, model_cfg, mesh_shape)
  t = config.train
  rng = np.random.default_rng(0)
  # A few distinct batches, cycled: host-side generation stays out of the timed loop.
  batches = [run.global_batch(synthetic_batch(rng, t.batch_size // jax.process_count(), t.seq_len,
                                              model_cfg.vocab_size)) for _ in range(4)]
  state = run.init_state()
  start = time.perf_counter()
  step = run.train_step.lower(run.abstract_state, run.abstract_batch()).compile()
  compile_s = time.perf_counter() - start
  temp = step.memory_analysis()
  for i in range(_WARMUP.value):
    state, metrics = step(state, batches[i % 4])
  jax.block_until_ready(metrics["loss"])
  if _PROFILE.value:
    with jax.profiler.trace(_PROFILE.value, create_perfetto_trace=True):
      for i in range(3):
        state, metrics = step(state, batches[i % 4])
      jax.block_until_ready(metrics["loss"])
    print_profile_summary(_PROFILE.value, steps=3, unit="step", top=60)
  start = time.perf_counter()
  for i in range(_STEPS.value):
    state, metrics = step(state, batches[i % 4])
  loss = float(metrics["loss"])
  step_s = (time.perf_counter() - start) / _STEPS.value

  tokens = t.batch_size * t.seq_len
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = peak_flops(jax.devices()[0].device_kind)
  flops = model_flops_per_token(model_cfg, t.seq_len)
  rows = [
      ("device", f"{jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}"),
      ("model", f"{model_cfg.num_params() / 1e9:.3f}B params, {model_cfg.num_layers} layers, backend "
                f"{model_cfg.backend}, remat {model_cfg.remat}, dtype {model_cfg.dtype}/{model_cfg.param_dtype}"),
      ("batch", f"{t.batch_size} x {t.seq_len} tokens, grad_accum {t.grad_accum_steps}, mesh {mesh_shape}"),
      ("compile s", f"{compile_s:.1f}"),
      ("step ms", f"{1e3 * step_s:.1f}"),
      ("tokens/s", f"{tokens / step_s:,.0f}"),
      ("tokens/s/device", f"{tokens / step_s / jax.device_count():,.0f}"),
      ("MFU (6N + mixing)", f"{100 * flops * tokens / step_s / jax.device_count() / peak:.1f}%" if peak else "n/a"),
      ("peak GiB (device)", f"{stats.get('peak_bytes_in_use', float('nan')) / 2**30:.2f}"),
      ("XLA temp GiB", f"{temp.temp_size_in_bytes / 2**30:.2f}" if temp is not None else "n/a"),
      ("final loss", f"{loss:.4f}"),
  ]
  width = max(len(k) for k, _ in rows)
  for key, value in rows:
    print(f"{key.ljust(width)} | {value}")


if __name__ == "__main__":
  app.run(main)
