"""Training throughput of train.py's own train step on synthetic tokens; prints a table and can write JSON.

    python benchmarks/bench_train.py --config=configs/gsa_1p3b.py --config.train.batch_size=4 \
        --config.train.seq_len=4096
    python benchmarks/bench_train.py --config=configs/gsa_1p3b.py --config.train.batch_size=4 \
        --config.train.seq_len=4096 --compare=gsa,hybrid,attention --json=runs/bench_train.json

The model, optimizer, sharding, jit and donation are exactly train.py's (`gsa_jax.train.trainer.TrainRun`); only
the data differs: uniformly random tokens generated on the host (no data pipeline, so the figure is the device's),
one document per row (all segment ids 1; on GPU the attention layers then take cuDNN, see
gsa_jax/layers/fused_attention.py), or with --documents_per_row=N, N documents packed into each row as a text
corpus gives (GSA's kernels reset their state at each boundary; attention takes its packed-document kernel).
Warm-up steps are excluded; the timed steps run back to back with one synchronization at the end, as in training.
Peak memory is the device's `peak_bytes_in_use` over the whole process (compilation and warm-up included);
compile s is the train step's lower + compile, cold unless --compilation_cache names JAX's persistent cache (run twice
to time a second start); lower s is the part before XLA: tracing the model and lowering it, the Pallas kernels
included.

--compare=LAYOUTS times the config's model with each mixer layout (`gsa_jax.models.MIXER_LAYOUTS`: "gsa" GSA at
every layer, "hybrid" softmax attention at every sixth layer, "attention" softmax attention at every layer: the
Transformer++ of the same size, attention heads of width 128), each in its own process (its own peak memory and
compilation; --cell_timeout_s bounds each, and a model that runs out of memory is reported as such), then prints
one table. --layout=NAME times one layout in this process.

MFU is counted the same way for every model (`gsa_jax.train.config.model_flops_per_token`): 6 FLOPs per matmul
parameter per token (the embedding lookup excluded, the output head included) plus 3 x the forward FLOPs of token
mixing: GSA's chunked form (chunk 64: intra-chunk scores and state reads/writes, spec section 2), softmax attention
2 x 2 x T/2 x d per layer (QK^T and PV over the causal half, so padding-free causal attention at T costs T/2 keys a
query). Recomputation (remat) is not counted: MFU is useful work over the device's dense bf16 peak.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gsa_jax.models import MIXER_LAYOUTS, mixer_layout  # noqa: E402
from gsa_jax.train.config import check_mesh, model_flops_per_token, validate_config  # noqa: E402
from gsa_jax.train.metrics import peak_flops  # noqa: E402
from gsa_jax.train.trainer import TrainRun  # noqa: E402
from benchmarks.cells import run_cell  # noqa: E402
from benchmarks.profiling import print_profile_summary  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/gsa_1p3b.py", "training config", lock_config=True)
_WARMUP = flags.DEFINE_integer("warmup", 3, "untimed steps after compilation")
_STEPS = flags.DEFINE_integer("steps", 10, "timed steps")
_PROFILE = flags.DEFINE_string("profile_dir", "", "if set, a jax.profiler trace of 3 steps is written here (with the "
                               "compiled step's HLO, train_step.hlo.txt); prints the top ops and source lines")
_DOCUMENTS = flags.DEFINE_integer("documents_per_row", 1, "packed rows: this many documents per row, cut at random "
                                  "places (segment ids 1..n), as a text corpus gives; 1: one document a row")
_LAYOUT = flags.DEFINE_string("layout", "", "time the config's model with this mixer layout "
                              f"({', '.join(MIXER_LAYOUTS)}); empty: the config's attn_layers as they are")
_COMPARE = flags.DEFINE_list("compare", [], "mixer layouts to time one after another, each in its own process")
_CELL_TIMEOUT = flags.DEFINE_float("cell_timeout_s", 600.0, "with --compare: wall-clock limit of each model's process")
_JSON = flags.DEFINE_string("json", "", "write the results (a list of rows) to this JSON file")
_CACHE = flags.DEFINE_string("compilation_cache", "", "JAX's persistent compilation cache directory (default: none, "
                             "so compile s is a cold compile); run twice to time a second start")
_RESULT_JSON = flags.DEFINE_string("result_json", "", "internal: where a --compare child writes its row")

# Columns of the comparison table: (header, row key, format).
TABLE = (("model", "model", "{}"), ("params B", "params_b", "{:.3f}"), ("attn layers", "attn_layers", "{}"),
         ("compile s", "compile_s", "{:.1f}"), ("lower s", "lower_s", "{:.1f}"), ("step ms", "step_ms", "{:.1f}"), ("tokens/s", "tokens_per_s", "{:,.0f}"),
         ("MFU %", "mfu_pct", "{:.1f}"), ("peak GiB", "peak_gib", "{:.2f}"), ("loss", "loss", "{:.4f}"))


def synthetic_batch(rng, batch_size, seq_len, vocab, documents_per_row: int = 1):
  """Uniform random tokens; each row one document, or `documents_per_row` documents cut at random distinct places
  (segment ids 1..n, no padding: the kernels' and attention's packed-document paths)."""
  tokens = rng.integers(0, vocab, (batch_size, seq_len + 1), dtype=np.int32)
  segment_ids = np.ones((batch_size, seq_len), np.int32)
  for row in segment_ids:
    cuts = rng.choice(np.arange(1, seq_len), size=documents_per_row - 1, replace=False)
    row += np.isin(np.arange(seq_len), cuts).cumsum(dtype=np.int32)
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids,
          "loss_mask": np.ones((batch_size, seq_len), np.float32)}


def with_layout(config, layout: str):
  """The training config with its model's mixers replaced by `layout` (config.model updated, not copied: the child
  process owns it)."""
  model = mixer_layout(validate_config(config, check_data=False), layout)
  with config.unlocked():
    config.model.attn_layers = model.attn_layers
    config.model.attn_num_heads = model.attn_num_heads
  return config


def measure(config, warmup: int, steps: int, profile_dir: str = "") -> dict:
  """Compiles and times `config`'s train step in this process: one result row (see TABLE for its keys)."""
  model_cfg = validate_config(config, check_data=False)
  mesh_shape = check_mesh(config, jax.device_count(), jax.process_count())
  run = TrainRun(config, model_cfg, mesh_shape)
  t = config.train
  rng = np.random.default_rng(0)
  # A few distinct batches, cycled: host-side generation stays out of the timed loop.
  batches = [run.global_batch(synthetic_batch(rng, t.batch_size // jax.process_count(), t.seq_len,
                                              model_cfg.vocab_size, _DOCUMENTS.value)) for _ in range(4)]
  state = run.init_state()
  start = time.perf_counter()
  lowered = run.train_step.lower(run.abstract_state, run.abstract_batch())
  lower_s = time.perf_counter() - start
  step = lowered.compile()
  compile_s = time.perf_counter() - start
  temp = step.memory_analysis()
  for i in range(warmup):
    state, metrics = step(state, batches[i % 4])
  jax.block_until_ready(state)
  if profile_dir:
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
      for i in range(3):
        state, metrics = step(state, batches[i % 4])
      jax.block_until_ready(metrics["loss"])
    hlo_text = step.as_text()
    with open(os.path.join(profile_dir, "train_step.hlo.txt"), "w") as f:
      f.write(hlo_text)
    print_profile_summary(profile_dir, steps=3, unit="step", top=60, hlo_text=hlo_text)
  start = time.perf_counter()
  for i in range(steps):
    state, metrics = step(state, batches[i % 4])
  loss = float(metrics["loss"])
  step_s = (time.perf_counter() - start) / steps

  tokens = t.batch_size * t.seq_len
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = peak_flops(jax.devices()[0].device_kind)
  flops = model_flops_per_token(model_cfg, t.seq_len)
  n_attn = len(model_cfg.attn_layers)
  return {
      "model": _LAYOUT.value or ("gsa" if not n_attn else "attention" if n_attn == model_cfg.num_layers else
                                 "hybrid"),
      "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "jax": jax.__version__,
      "params_b": model_cfg.num_params() / 1e9, "num_layers": model_cfg.num_layers, "attn_layers": n_attn,
      "backend": model_cfg.backend, "attn_implementation": model_cfg.attn_implementation, "remat": model_cfg.remat,
      "dtype": f"{model_cfg.dtype}/{model_cfg.param_dtype}", "batch_size": t.batch_size, "seq_len": t.seq_len,
      "grad_accum_steps": t.grad_accum_steps, "mesh": list(mesh_shape), "compile_s": compile_s,
      "lower_s": lower_s, "compilation_cache": _CACHE.value,
      "step_ms": 1e3 * step_s, "tokens_per_s": tokens / step_s, "tokens_per_s_per_device": tokens / step_s /
      jax.device_count(), "flops_per_token": flops,
      "mfu_pct": 100 * flops * tokens / step_s / jax.device_count() / peak if peak else None,
      "peak_gib": stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None,
      "xla_temp_gib": temp.temp_size_in_bytes / 2**30 if temp is not None else None, "loss": loss,
  }


def format_cell(row: dict, key: str, fmt: str) -> str:
  value = row.get(key)
  if row.get("status", "ok") != "ok" and key not in ("model", "params_b", "attn_layers"):
    return row["status"] if key == "compile_s" else ""
  return "n/a" if value is None else fmt.format(value)


def print_table(rows: list[dict]) -> None:
  """One line per model: the TABLE columns; failed cells show their status (oom, timeout, error) and reason."""
  cells = [[format_cell(r, key, fmt) for _, key, fmt in TABLE] for r in rows]
  widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _, _) in enumerate(TABLE)]
  print(" | ".join(h.ljust(w) for (h, _, _), w in zip(TABLE, widths)))
  print("-|-".join("-" * w for w in widths))
  for row, c in zip(rows, cells):
    line = " | ".join(x.ljust(w) for x, w in zip(c, widths))
    print(line + (f"  ({row['detail']})" if row.get("detail") else ""))


def write_json(path: str, rows: list[dict]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(rows, f, indent=1)


def child_argv(argv: list[str], layout: str) -> list[str]:
  """This script's command line for one layout of a --compare run (the comparison's own flags left out)."""
  own = ("--compare", "--json", "--layout", "--cell_timeout_s", "--result_json")
  kept = [a for a in argv[1:] if not a.split("=", 1)[0] in own]
  return [os.path.abspath(__file__), *kept, f"--layout={layout}"]


def main(argv):
  config = _CONFIG.value
  if _CACHE.value:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(_CACHE.value))
  for layout in _COMPARE.value + ([_LAYOUT.value] if _LAYOUT.value else []):
    if layout not in MIXER_LAYOUTS:
      print(f"bench_train: --compare/--layout: {layout!r} is unknown; expected some of {', '.join(MIXER_LAYOUTS)}.",
            file=sys.stderr)
      sys.exit(2)
  if not 1 <= _DOCUMENTS.value <= config.train.seq_len:
    print(f"bench_train: --documents_per_row must be in [1, seq_len={config.train.seq_len}]; got "
          f"{_DOCUMENTS.value}.", file=sys.stderr)
    sys.exit(2)
  if _COMPARE.value:
    rows = []
    for layout in _COMPARE.value:
      row = run_cell(child_argv(sys.argv, layout), _CELL_TIMEOUT.value)
      rows.append({"model": layout, **row})
      print(f"{layout}: {row['status']}", flush=True)
  else:
    if _LAYOUT.value:
      config = with_layout(config, _LAYOUT.value)
    rows = [measure(config, _WARMUP.value, _STEPS.value, _PROFILE.value)]
    if _RESULT_JSON.value:
      write_json(_RESULT_JSON.value, rows[0])
  r = rows[-1] if not _COMPARE.value else next((x for x in rows if x["status"] == "ok"), rows[0])
  print(f"device {r.get('device', 'n/a')}, jax {jax.__version__}; {config.train.batch_size} x "
        f"{config.train.seq_len} tokens, remat {config.model.remat}, dtype {config.model.dtype}/"
        f"{config.model.param_dtype}, backend {config.model.backend}, attention {config.model.attn_implementation}, "
        f"{_DOCUMENTS.value} document(s) a row")
  print_table(rows)
  if _JSON.value:
    write_json(_JSON.value, rows)


if __name__ == "__main__":
  app.run(main)
