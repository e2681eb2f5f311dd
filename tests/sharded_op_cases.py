"""The op under every kind of mesh JAX offers, on 8 fake CPU devices; run by tests/test_op_sharding.py in a
subprocess (the device count is fixed when JAX starts). Prints one JSON line: case name -> the largest relative
error of the output, final states and every gradient against the same backend on one device."""

import json
import os
import sys

if __name__ == "__main__":  # imported (by test_op_sharding's GPU test), it must not change the process's devices
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  os.environ["JAX_PLATFORMS"] = "cpu"
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # executables for 8 devices kept apart from 1-device ones
    os.environ["JAX_COMPILATION_CACHE_DIR"] += "-8-devices"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from gsa_jax.ops import gated_slot_attention  # noqa: E402

B, T, HQ, H, K, V, M = 4, 19, 8, 4, 6, 5, 3  # grouped heads, T not a multiple of the chunk


def inputs():
  ks = jax.random.split(jax.random.key(0), 8)
  q = jax.random.normal(ks[0], (B, T, HQ, K))
  k = jax.random.normal(ks[1], (B, T, H, K))
  v = jax.random.normal(ks[2], (B, T, H, V))
  s = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H, M)))
  g = jax.nn.log_sigmoid(jax.random.normal(ks[4], (B, T, H, M)))
  state = (jax.random.normal(ks[5], (B, H, K, M)), jax.random.normal(ks[6], (B, H, M, V)))
  seg = jnp.array([[1] * 7 + [2] * 9 + [0] * 3, [0, 0] + [3] * 17, [1] * 19, [5] * 10 + [4] * 9], jnp.int32)
  return (q, k, v, s, g), state, seg


def loss_and_grads(op, args, state, seg):
  """The op's output, final state and the gradients of a random projection of both, in one tree."""
  def f(args, state):
    o, (hk, hv) = op(*args, initial_state=state, segment_ids=seg)
    # Elementwise, so a shard's part of the loss is the loss of its part of the arrays.
    return jnp.sum(jnp.sin(3 * o)) + jnp.sum(jnp.sin(hk)) + jnp.sum(jnp.cos(hv)), (o, hk, hv)
  (_, outs), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(args, state)
  return outs, grads


def rel_err(a, b):
  def one(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.linalg.norm(x - y) / (np.linalg.norm(y) + 1e-30))
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  return max(one(x, y) for x, y in zip(leaves_a, leaves_b))


def main(backends, layouts):
  args, state, seg = inputs()
  results = {}
  for backend in backends:
    op = lambda *a, **kw: gated_slot_attention(*a, backend=backend, output_final_state=True, **kw)
    expected = jax.jit(lambda a, st, sg: loss_and_grads(op, a, st, sg))(args, state, seg)

    # shard_map (check_vma=True by default): rows over data, heads over model, the initial state replicated over
    # model and so cast inside the op; its gradient is summed over model by autodiff.
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    row, state_spec = P("data", None, "model", None), P("data", "model")
    local_state = tuple(x[:, :1] for x in state)  # one kv head's state, the same on every model shard

    def sharded(a, st, sg):
      return jax.shard_map(lambda a, st, sg: loss_and_grads(op, a, st, sg), mesh=mesh,
                           in_specs=((row,) * 5, P("data"), P("data")),
                           out_specs=((row, state_spec, state_spec), ((row,) * 5, P("data"))))(a, st, sg)

    if H % 4 == 0:
      with jax.set_mesh(mesh):
        place = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
        got = jax.jit(sharded)(tuple(place(x, row) for x in args), tuple(place(x, P("data")) for x in local_state),
                               place(seg, P("data")))
      want_args, want_state = args, tuple(jnp.tile(x, (1, H, 1, 1)) for x in local_state)
      want = jax.jit(lambda a, st, sg: loss_and_grads(op, a, st, sg))(want_args, want_state, seg)
      (o, hk, hv), (d_args, d_state) = got
      (o_w, hk_w, hv_w), (d_args_w, d_state_w) = want
      d_state_w = tuple(x.reshape(B, 4, H // 4, *x.shape[2:]).sum(1) for x in d_state_w)
      results[f"{backend}/shard_map"] = rel_err(((o, hk, hv), d_args, d_state), ((o_w, hk_w, hv_w), d_args_w, d_state_w))

    for kind in (AxisType.Explicit, AxisType.Auto):
      mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind,) * 2)
      for label, spec_row in (("rows_heads", P("data", None, "model")), ("rows", P("data")),
                              ("heads", P(None, None, "model")))[:layouts]:
        spec_state = P(spec_row[0], *spec_row[2:3])
        with jax.set_mesh(mesh):
          place = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
          got = jax.jit(lambda a, st, sg: loss_and_grads(op, a, st, sg))(
              tuple(place(x, spec_row) for x in args), tuple(place(x, spec_state) for x in state),
              place(seg, P(spec_row[0])))
        results[f"{backend}/{kind.name}/{label}"] = rel_err(got, expected)
  print("RESULTS" + json.dumps(results))


if __name__ == "__main__":
  # argv: the number of layouts tried on Explicit and Auto meshes (1-3), then the backends.
  main(sys.argv[2:], int(sys.argv[1]))
