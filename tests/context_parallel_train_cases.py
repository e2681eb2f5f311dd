"""The trainer's train step on meshes with a sequence axis (with data, fsdp and tensor), on 8 fake CPU devices,
against the same step on one device; run by tests/test_context_parallel.py in a subprocess. Prints one JSON line:
case name -> the largest relative error of the summed loss, token count, correct predictions and every parameter's
gradient, and of one train step's metrics and updated parameters (or the error message where a case raised, or
where the layers did not split T themselves)."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
if os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # executables for 8 devices kept apart from 1-device ones
  os.environ["JAX_COMPILATION_CACHE_DIR"] += "-8-devices"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gsa_jax.train.config import check_mesh, validate_config  # noqa: E402
from gsa_jax.train.trainer import TrainRun, _loss_sums, activation_constraint, make_train_step, under_mesh  # noqa: E402
from sharded_op_cases import rel_err  # noqa: E402
from test_train import tiny_config  # noqa: E402

B, T = 8, 32
# Rows of the batch (each twice): boundaries of 8 sequence shards at multiples of 4, of 4 at 8, of 2 at 16.
SEGMENT_IDS = [
    [1] * 3 + [2] * 14 + [3] * 15,  # a document across several shards, one starting inside a shard
    [1] * 8 + [0] * 4 + [1] * 4 + [2] * 8 + [0] * 8,  # padding inside a document, one starting at a boundary
    [5] * 9 + [0] * 3 + [5] * 20,  # a shard holding one token of its document
    [0] * 5 + [4] * 3 + [6] * 24,  # leading padding; a document starting at a boundary
]


def batch(vocab):
  rng = np.random.default_rng(0)
  seg = np.array(SEGMENT_IDS * 2, np.int32)
  return {"tokens": rng.integers(1, vocab, (B, T)).astype(np.int32) * (seg > 0),
          "targets": rng.integers(1, vocab, (B, T)).astype(np.int32), "segment_ids": seg,
          "loss_mask": (seg > 0).astype(np.float32)}


def config(name, mesh, **train):
  c = tiny_config(f"/tmp/unused/{name}", train__seq_len=T, train__batch_size=B, **train)
  c.model.use_short_conv, c.model.use_rope = True, True
  if name.startswith("hybrid"):
    c.model.attn_layers = (1,)
  if name.startswith("bfloat16"):  # bfloat16 compute, float32 parameters, as the paper presets
    c.model.dtype = "bfloat16"
  c.mesh.data, c.mesh.fsdp, c.mesh.sequence, c.mesh.tensor = mesh
  return c


def sums_and_grads(graphdef, params, batch, constrain, loss_chunk):
  loss = lambda p: _loss_sums(graphdef, p, batch, constrain, loss_chunk)
  return jax.value_and_grad(loss, has_aux=True)(params)


def one_case(name, mesh, **train):
  c = config(name, mesh, **train)
  model_cfg = validate_config(c, check_data=False)
  run = TrainRun(c, model_cfg, check_mesh(c, jax.device_count(), 1))
  data = batch(model_cfg.vocab_size)
  state = run.init_state()
  host_state = jax.device_get(state)
  chunk, accum = c.train.loss_chunk, c.train.grad_accum_steps

  # One device: the same functions, no mesh.
  want_grads = jax.jit(lambda p, b: sums_and_grads(run.graphdef, p, b, lambda x, axes: x, chunk))(
      host_state["params"], data)
  step = make_train_step(run.graphdef, run.tx, run.schedule, accum, loss_chunk=chunk)
  want_new, want_metrics = jax.jit(step)(host_state, data)

  # The layers split T themselves (a shard_map manual over "sequence"), not XLA by gathering it.
  lowered = run.train_step.lower(run.abstract_state, run.abstract_batch()).as_text()
  if 'manual_axes={"sequence"}' not in lowered:
    raise AssertionError("the train step has no computation manual over 'sequence': the layers did not split T")
  global_batch = run.global_batch(data)
  got_grads = jax.jit(under_mesh(run.mesh, lambda p, b: sums_and_grads(
      run.graphdef, p, b, activation_constraint(run.mesh), chunk)),
      in_shardings=(run.state_shardings["params"], run.batch_sharding))(state["params"], global_batch)
  got_new, got_metrics = run.train_step(state, global_batch)
  keys = ("loss", "accuracy", "grad_norm")
  return max(rel_err(got_grads, want_grads),
             rel_err((got_new["params"], [got_metrics[k] for k in keys]),
                     (want_new["params"], [want_metrics[k] for k in keys])))


CASES = {  # name: (data, fsdp, sequence, tensor), train options
    "sequence8": ((1, 1, 8, 1), {}),
    "data2_sequence4": ((2, 1, 4, 1), {}),
    "fsdp2_sequence4": ((1, 2, 4, 1), {}),
    "data2_fsdp2_sequence2": ((2, 2, 2, 1), {}),
    "fsdp2_sequence2_tensor2_loss_chunk_accum": ((1, 2, 2, 2), {"train__loss_chunk": 8, "train__grad_accum_steps": 2}),
    "hybrid_data2_sequence4": ((2, 1, 4, 1), {}),
    "bfloat16_data2_sequence4": ((2, 1, 4, 1), {}),
}


def main(names):
  results = {}
  for name in names or CASES:
    mesh, train = CASES[name]
    try:
      results[name] = one_case(name, mesh, **train)
    except Exception as e:  # a case that raises is reported, not fatal: the test names it
      results[name] = f"{type(e).__name__}: {str(e)[:500]}"
  print("RESULTS" + json.dumps(results))


if __name__ == "__main__":
  main(sys.argv[1:])
