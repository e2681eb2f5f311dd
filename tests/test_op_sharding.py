"""The op inside `jax.shard_map` (check_vma=True) and on Explicit and Auto meshes, every backend, on 8 fake CPU
devices (tests/sharded_op_cases.py, in a subprocess: the device count is fixed when JAX starts): outputs, final
states and every gradient equal the same backend's on one device. Under shard_map pallas_gpu is interpreted on a
CPU, which Pallas' interpreter cannot do there, so it runs 'chunked' (logged); the compiled kernels are checked
by tests/test_pallas_gpu.py on a GPU."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cases(layouts, *backends):
  result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sharded_op_cases.py"), str(layouts),
                           *backends], capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={**os.environ, "PYTHONPATH": ROOT})
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.split("RESULTS")[-1])


def check(results, backends, layouts):
  names = {f"{b}/shard_map" for b in backends} | {f"{b}/{kind}/{label}" for b in backends
                                                   for kind in ("Explicit", "Auto")
                                                   for label in ("rows_heads", "rows", "heads")[:layouts]}
  assert set(results) == names
  bad = {name: err for name, err in results.items() if not err <= 1e-5}
  assert not bad, bad


@pytest.mark.slow  # the kernels' test below runs the same wrapper in the default suite
def test_references_under_every_mesh():
  check(run_cases(1, "recurrent", "chunked"), ("recurrent", "chunked"), 1)


@pytest.mark.slow
def test_references_under_every_mesh_every_layout():
  check(run_cases(3, "recurrent", "chunked"), ("recurrent", "chunked"), 3)


def test_kernels_under_every_mesh():
  # The TPU kernels go through the same wrapper: the slow test below runs them (and every layout).
  check(run_cases(1, "pallas_gpu"), ("pallas_gpu",), 1)


@pytest.mark.slow
def test_kernels_under_every_mesh_every_layout():
  check(run_cases(3, "pallas_gpu", "pallas_tpu"), ("pallas_gpu", "pallas_tpu"), 3)


def one_device_shard_map_error(backend, with_state):
  """The relative error of `backend` inside shard_map over a one-device mesh (which keeps the mesh axis in the
  values' types) against the same backend outside it: output, final states and every gradient, bfloat16 inputs,
  with a given initial state or the op's own zero state."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from gsa_jax.ops import gated_slot_attention

  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import sharded_op_cases as cases  # noqa: PLC0415

  args, state, seg = cases.inputs()
  args = tuple(x.astype(jnp.bfloat16) for x in args)
  state = state if with_state else None
  op = lambda *a, **kw: gated_slot_attention(*a, backend=backend, output_final_state=True, **kw)
  expected = jax.jit(lambda a, st, sg: cases.loss_and_grads(op, a, st, sg))(args, state, seg)
  mesh = jax.make_mesh((1,), ("data",))
  row = P("data")
  sharded = jax.shard_map(lambda a, st, sg: cases.loss_and_grads(op, a, st, sg), mesh=mesh,
                          in_specs=row, out_specs=row)  # every array is [b, ...]
  with jax.set_mesh(mesh):
    place = lambda tree: jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, row)), tree)
    got = jax.jit(sharded)(place(args), place(state), place(seg))
  return cases.rel_err(got, expected)


@pytest.mark.parametrize("with_state", [True, False])
def test_one_device_shard_map_harness(with_state):
  """The harness of the compiled GPU test below, on the CPU with the chunked backend."""
  assert one_device_shard_map_error("chunked", with_state) <= 1e-6


@pytest.mark.skipif(not any(d.platform == "gpu" for d in __import__("jax").devices()), reason="needs a GPU")
@pytest.mark.parametrize("with_state", [True, False])
def test_compiled_gpu_kernels_inside_shard_map(with_state):
  """The compiled Pallas GPU kernels declare their outputs' varying mesh axes, forward and backward."""
  assert one_device_shard_map_error("pallas_gpu", with_state) <= 1e-6
