"""Context-parallel GSA on 8 fake CPU devices against the op on one device; run by tests/test_context_parallel.py
in a subprocess (the device count is fixed when JAX starts). Prints one JSON line: case name -> the largest
relative error of the output, final states and every gradient (q, k, v, s, g and the initial state)."""

import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
if os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # executables for 8 devices kept apart from 1-device ones
  os.environ["JAX_COMPILATION_CACHE_DIR"] += "-8-devices"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from gsa_jax.ops import gated_slot_attention  # noqa: E402
from gsa_jax.ops.context_parallel import context_parallel_gsa  # noqa: E402
from sharded_op_cases import loss_and_grads, rel_err  # noqa: E402

B, T, HQ, H, K, V, M = 4, 32, 4, 2, 6, 5, 3  # grouped heads; shards of 16, 8 and 4 tokens
CHUNK = 8  # chunked backends: shards of 16, 8 and 4 tokens hold two chunks, one, and half of one (a ragged chunk)

# Boundaries for 8 shards fall at multiples of 4, for 4 at multiples of 8, for 2 at 16.
SEGMENT_IDS = [
    [1] * 3 + [2] * 14 + [3] * 15,  # document 2 spans shards 0-4 of 8 (0-2 of 4); 3 starts inside a shard
    [1] * 8 + [0] * 4 + [1] * 4 + [2] * 8 + [0] * 8,  # padding at a shard's start inside document 1; document 2
                                                      # starts exactly at a boundary; all-padding last shards
    [0] * 5 + [4] * 27,  # all-padding first shard of 8: the initial state passes to document 4
    [1] * 4 + [0] * 4 + [2] * 24,  # document 2 starts at a boundary after padding (an all-padding shard of 8)
]


def inputs():
  ks = jax.random.split(jax.random.key(0), 8)
  q = jax.random.normal(ks[0], (B, T, HQ, K))
  k = jax.random.normal(ks[1], (B, T, H, K))
  v = jax.random.normal(ks[2], (B, T, H, V))
  s = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H, M)))
  g = jax.nn.log_sigmoid(jax.random.normal(ks[4], (B, T, H, M)))
  # Extreme gates across shard boundaries: a slot that forgets everything next to one that keeps everything.
  g = g.at[:, 11, 0].set(-1e3).at[:, 12, 0].set(0.0).at[:, 15:17, 1, 1].set(jnp.array([0.0, -1e3]))
  state = (jax.random.normal(ks[5], (B, H, K, M)), jax.random.normal(ks[6], (B, H, M, V)))
  return (q, k, v, s, g), state, jnp.array(SEGMENT_IDS, jnp.int32)


# What each backend runs as inside shard_map on a CPU: Pallas' interpreter cannot run there, so 'pallas_gpu' runs
# 'chunked' (tests/test_op_sharding.py) and is compared with 'chunked' on one device. Its kernels' agreement with
# the references is tests/test_pallas_gpu.py's to check.
RUNS_AS_ON_CPU = {"pallas_gpu": "chunked"}


def single_device(backend, args, state, seg):
  op = lambda *a, **kw: gated_slot_attention(*a, backend=backend, chunk_size=CHUNK, output_final_state=True, **kw)
  return jax.jit(lambda a, st, sg: loss_and_grads(op, a, st, sg))(args, state, seg)


def wrapped(backend, n, kind, args, state, seg):
  """The function running the shard_map itself, on a (data, sequence) mesh with rows over data."""
  mesh = jax.make_mesh((8 // n, n), ("data", "sequence"), axis_types=(kind,) * 2)
  op = lambda *a, **kw: context_parallel_gsa(*a, axis_name="sequence", batch_axes="data", backend=backend,
                                             chunk_size=CHUNK, output_final_state=True, **kw)
  with jax.set_mesh(mesh):
    if kind == AxisType.Explicit:
      place = lambda x, spec: None if x is None else jax.device_put(x, NamedSharding(mesh, spec))
      args = tuple(place(x, P("data", "sequence")) for x in args)
      state = None if state is None else tuple(place(x, P("data")) for x in state)
      seg = place(seg, P("data", "sequence"))
    return jax.jit(lambda a, st, sg: loss_and_grads(op, a, st, sg))(args, state, seg)


def in_users_shard_map(backend, args, state, seg):
  """Called inside the caller's shard_map: T over 4 shards, kv heads over 2 (grouped query heads follow)."""
  mesh = jax.make_mesh((4, 2), ("sequence", "model"), axis_types=(AxisType.Explicit,) * 2)
  row, state_spec, seg_spec = P(None, "sequence", "model"), P(None, "model"), P(None, "sequence")

  def op(*a, initial_state, segment_ids):
    body = lambda a, st, sg: context_parallel_gsa(*a, axis_name="sequence", initial_state=st, segment_ids=sg,
                                                  backend=backend, chunk_size=CHUNK, output_final_state=True)
    return jax.shard_map(body, mesh=mesh, in_specs=((row,) * 5, state_spec, seg_spec),
                         out_specs=(row, state_spec))(a, initial_state, segment_ids)

  with jax.set_mesh(mesh):
    place = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    return jax.jit(lambda a, st, sg: loss_and_grads(op, a, st, sg))(
        tuple(place(x, row) for x in args), tuple(place(x, state_spec) for x in state), place(seg, seg_spec))


def collectives(t, n=4):
  """[(collective, result shape)] of the compiled forward + backward (final state used) at sequence length t."""
  mesh = jax.make_mesh((8 // n, n), ("data", "sequence"), axis_types=(AxisType.Explicit,) * 2)
  laid = lambda shape, spec, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))
  row = P("data", "sequence")
  args = tuple(laid((B, t, heads, width), row) for heads, width in ((HQ, K), (H, K), (H, V), (H, M), (H, M)))
  state = (laid((B, H, K, M), P("data")), laid((B, H, M, V), P("data")))
  seg = laid((B, t), row, jnp.int32)
  op = lambda *a, **kw: context_parallel_gsa(*a, axis_name="sequence", backend="chunked", chunk_size=CHUNK,
                                             output_final_state=True, **kw)
  with jax.set_mesh(mesh):
    text = jax.jit(lambda a, st, sg: loss_and_grads(op, a, st, sg)).lower(args, state, seg).compile().as_text()
  pattern = r"= (.+?) (all-gather|reduce-scatter|all-reduce|collective-permute|all-to-all)(?:-start)?\("
  found = (re.search(pattern, line) for line in text.splitlines())
  return sorted((m[2], re.sub(r"\{[^}]*\}", "", m[1])) for m in found if m)


def main(backends, full):
  args, state, seg = inputs()
  results = {}
  for backend in backends:
    reference = RUNS_AS_ON_CPU.get(backend, backend)
    want = single_device(reference, args, state, seg)
    for n in (2, 4, 8):
      results[f"{backend}/Explicit/{n}"] = rel_err(wrapped(backend, n, AxisType.Explicit, args, state, seg), want)
    results[f"{backend}/shard_map"] = rel_err(in_users_shard_map(backend, args, state, seg), want)
    plain = single_device(reference, args, None, None)
    results[f"{backend}/plain/4"] = rel_err(wrapped(backend, 4, AxisType.Explicit, args, None, None), plain)
    if full:
      results[f"{backend}/Auto/4"] = rel_err(wrapped(backend, 4, AxisType.Auto, args, state, seg), want)
  print("RESULTS" + json.dumps(results))


if __name__ == "__main__":
  # argv: "full" or "short", then the backends; or "collectives".
  if sys.argv[1] == "collectives":
    sizes = {"shards": 4, "rows": B // 2, "H": H, "K": K, "V": V, "M": M}  # as in `collectives`
    print("RESULTS" + json.dumps({"sizes": sizes, "collectives": {t: collectives(t) for t in (T, 2 * T)}}))
  else:
    main(sys.argv[2:], sys.argv[1] == "full")
