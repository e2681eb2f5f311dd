"""Per-device memory of train.py's own train step with each row's T split over n devices (`mesh.sequence = n`):
XLA's compiled memory analysis, nothing run or allocated. Prints a markdown table; can write JSON.

    python benchmarks/train_step_memory.py --config=configs/gsa_340m.py --cpu_devices=1,2,4,8 \
        --lengths=16384,65536,262144 --config.train.loss_chunk=4096
    python benchmarks/train_step_memory.py --config=configs/gsa_1p3b.py --lengths=32768,65536,131072   # real GPU

The step is exactly train.py's (`gsa_jax.train.trainer.TrainRun`: model, AdamW state, shardings, donation), with
batch_size 1 and mesh data = fsdp = tensor = 1, sequence = n (the config's batch and mesh are replaced). With
--cpu_devices each n runs in its own process on n fake CPU devices (set before JAX starts), so the figures are XLA
CPU's buffer assignment, not a GPU's; without it the step is compiled for the real devices (n = 1 on one GPU).

Columns, per device: "state" the parameters + optimizer state (donated, so the updated state reuses it), "temp" the
scratch XLA assigns (activations kept for the backward, gradients, kernels' workspace), "total" = arguments + outputs
- aliased + temp: what the step needs resident at its peak. "x n / n = 1" compares n devices' total memory with one
device's (1.0: nothing duplicated; the state is replicated along the sequence axis, so it grows with n unless fsdp
shards it).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", "configs/gsa_340m.py", "training config", lock_config=True)
_LENGTHS = flags.DEFINE_list("lengths", ["16384", "65536", "262144"], "T, tokens per row")
_CPU_DEVICES = flags.DEFINE_list("cpu_devices", [], "n values, each compiled on n fake CPU devices in its own "
                                 "process; empty: compile once for the real devices (sequence = device count)")
_CELL_TIMEOUT = flags.DEFINE_float("cell_timeout_s", 1800.0, "wall-clock limit of each n's process")
_JSON = flags.DEFINE_string("json", "", "write the rows to this JSON file")
_RESULT_JSON = flags.DEFINE_string("result_json", "", "internal: where a child writes its rows")

GIB = 2**30


def step_memory(config, seq_len: int) -> dict:
  """Compiles the train step for one row of `seq_len` tokens split over every device; per-device bytes."""
  import jax  # noqa: PLC0415

  from gsa_jax.train.config import check_mesh, validate_config  # noqa: PLC0415
  from gsa_jax.train.trainer import TrainRun  # noqa: PLC0415

  n = jax.device_count()
  with config.unlocked():
    config.train.batch_size, config.train.seq_len, config.train.grad_accum_steps = 1, seq_len, 1
    config.mesh.data, config.mesh.fsdp, config.mesh.sequence, config.mesh.tensor = 1, 1, n, 1
  model_cfg = validate_config(config, check_data=False)
  run = TrainRun(config, model_cfg, check_mesh(config, n, jax.process_count()))
  m = run.train_step.lower(run.abstract_state, run.abstract_batch()).compile().memory_analysis()
  state = m.alias_size_in_bytes  # the donated train state: every output except the metrics reuses its input
  total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  return {"n": n, "seq_len": seq_len, "params_b": model_cfg.num_params() / 1e9, "device": jax.devices()[0].device_kind,
          "backend": model_cfg.backend, "remat": model_cfg.remat, "loss_chunk": config.train.loss_chunk,
          "state_gib": state / GIB, "temp_gib": m.temp_size_in_bytes / GIB, "total_gib": total / GIB}


def print_table(rows: list[dict]) -> None:
  one = {r["seq_len"]: r["total_gib"] for r in rows if r.get("n") == 1}
  print("| T | n | tokens per device | state GiB | temp GiB | total GiB per device | x n / n = 1 |")
  print("|---|---|---|---|---|---|---|")
  for r in sorted(rows, key=lambda r: (r["seq_len"], r["n"])):
    if r.get("status", "ok") != "ok":
      print(f"| {r['seq_len']} | {r['n']} | | {r['status']}: {r.get('detail', '')} | | | |")
      continue
    ratio = f"{r['n'] * r['total_gib'] / one[r['seq_len']]:.2f}" if r["seq_len"] in one else "n/a"
    print(f"| {r['seq_len']:,} | {r['n']} | {r['seq_len'] // r['n']:,} | {r['state_gib']:.2f} | {r['temp_gib']:.2f} "
          f"| {r['total_gib']:.2f} | {ratio} |")


def child_argv(argv: list[str]) -> list[str]:
  own = ("--cpu_devices", "--json", "--cell_timeout_s", "--result_json")
  return [os.path.abspath(__file__), *(a for a in argv[1:] if a.split("=", 1)[0] not in own)]


def fail(message: str) -> None:
  print(f"train_step_memory: {message}", file=sys.stderr)
  sys.exit(2)


def main(argv):
  lengths = [int(x) for x in _LENGTHS.value]
  for n in (int(x) for x in _CPU_DEVICES.value):
    bad = [t for t in lengths if t % n]
    if bad:
      fail(f"--lengths {bad} are not divisible by {n} (--cpu_devices): each of n devices holds T / n tokens.")
  if _CPU_DEVICES.value:
    from benchmarks.cells import run_cell  # noqa: PLC0415

    rows = []
    for n in (int(x) for x in _CPU_DEVICES.value):
      os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
      os.environ["JAX_PLATFORMS"] = "cpu"
      result = run_cell(child_argv(sys.argv), _CELL_TIMEOUT.value)
      if result["status"] == "ok":
        rows += result["rows"]
      else:
        rows += [{"n": n, "seq_len": t, **result} for t in lengths]
      print(f"n = {n}: {result['status']}", flush=True)
  else:
    rows = []
    from gsa_jax.train.config import ConfigError  # noqa: PLC0415

    for t in lengths:
      try:
        rows.append(step_memory(_CONFIG.value, t))
      except ConfigError as e:
        fail(str(e))
      print(f"T = {t}: {rows[-1]['total_gib']:.2f} GiB per device", flush=True)
    if _RESULT_JSON.value:
      with open(_RESULT_JSON.value, "w") as f:
        json.dump({"rows": rows}, f)
  r = next((x for x in rows if x.get("status", "ok") == "ok"), {})
  c = _CONFIG.value
  print(f"{r.get('params_b', 0):.3f}B parameters, device {r.get('device', 'n/a')}, backend {r.get('backend', 'n/a')}, "
        f"remat {r.get('remat', 'n/a')}, loss_chunk {c.train.loss_chunk}, dtype {c.model.dtype}/{c.model.param_dtype}")
  print_table(rows)
  if _JSON.value:
    os.makedirs(os.path.dirname(os.path.abspath(_JSON.value)), exist_ok=True)
    with open(_JSON.value, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  app.run(main)
