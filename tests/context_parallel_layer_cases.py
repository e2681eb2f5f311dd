"""The GSA layer, hybrid GSALMs and prefill with T split over a mesh axis "sequence", on 8 fake CPU devices,
against one device; run by tests/test_context_parallel.py in a subprocess (the device count is fixed when JAX
starts). Prints one JSON line: case name -> the largest relative error of the outputs, caches and every gradient
(parameters and input), or the error message where a case raised."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
if os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # executables for 8 devices kept apart from 1-device ones
  os.environ["JAX_COMPILATION_CACHE_DIR"] += "-8-devices"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from gsa_jax.generate import prefill  # noqa: E402
from gsa_jax.layers import GatedSlotAttention  # noqa: E402
from gsa_jax.models import GSALM, GSAConfig  # noqa: E402
from sharded_op_cases import rel_err  # noqa: E402

B, T, D = 4, 32, 16  # shards of 16, 8 and 4 tokens
# Grouped heads, the short convolution (3 taps back), RoPE: every piece of the layer that reaches across tokens.
LAYER = dict(num_heads=4, num_kv_heads=2, num_slots=4, chunk_size=4, use_short_conv=True, conv_size=4,
             use_rope=True, gate_logit_normalizer=2.0)
MODEL = dict(vocab_size=64, hidden_size=D, num_layers=2, num_heads=2, num_slots=4, chunk_size=4, intermediate_size=32,
             use_short_conv=True, use_rope=True, gate_logit_normalizer=2.0, attn_layers=(1,), attn_num_heads=2,
             attn_implementation="xla")

# Boundaries for 8 shards fall at multiples of 4, for 4 at multiples of 8, for 2 at 16.
SEGMENT_IDS = [
    [1] * 3 + [2] * 14 + [3] * 15,  # document 2 spans shards 0-4 of 8 (0-2 of 4); 3 starts inside a shard
    [1] * 8 + [0] * 4 + [1] * 4 + [2] * 8 + [0] * 8,  # padding at a shard's start inside document 1; document 2
                                                      # starts exactly at a boundary; all-padding last shards
    [5] * 9 + [0] * 3 + [5] * 20,  # a shard of 8 with one token of document 5: the convolution's taps reach
                                   # two shards back
    [0] * 5 + [4] * 3 + [6] * 24,  # leading padding; document 6 starts exactly at a boundary (of 8 and 4 shards)
]


def sequence_mesh(n, kind=AxisType.Auto):
  return jax.make_mesh((8 // n, n), ("data", "sequence"), axis_types=(kind,) * 2)


def place(mesh, tree, spec):
  return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec)), tree)


def layer_loss(graphdef, params, x, seg):
  """The layer's output and the gradients (parameters, input) of an elementwise loss of it."""
  def f(params, x):
    y = nnx.merge(graphdef, params)(x, seg)
    return jnp.sum(jnp.sin(3 * y)), y
  (_, y), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, x)
  return y, grads


def layer_prefill(graphdef, params, x, seg, cache):
  return nnx.merge(graphdef, params).prefill(x, seg, cache)


def model_loss(graphdef, params, tokens, seg):
  """The model's logits and the gradients of an elementwise loss of them with respect to every parameter."""
  def f(params):
    logits = nnx.merge(graphdef, params)(tokens, seg)
    return jnp.sum(jnp.sin(logits)), logits
  (_, logits), grads = jax.value_and_grad(f, has_aux=True)(params)
  return logits, grads


def run(name, fn, results):
  try:
    results[name] = fn()
  except Exception as e:  # a case that raises is reported, not fatal: the test names it
    results[name] = f"{type(e).__name__}: {str(e)[:500]}"


def split(fn, n, args, specs, kind=AxisType.Auto):
  """fn(*args) jitted under a (data, sequence) mesh of 8 / n x n devices, args laid out by specs."""
  mesh = sequence_mesh(n, kind)
  with jax.set_mesh(mesh):
    placed = [a if spec is None else place(mesh, a, spec) for a, spec in zip(args, specs)]
    return jax.jit(fn)(*placed)


def main(grid):
  """grid "short" (the default suite) leaves out layer/4, layer/prefill/4, abc/2 and layer/plain/4 (covered by their
  neighbours: splits 2 and 8, prefill from a cache, ABC at 8, the packed rows' padding); "full" runs them and the
  hybrid model."""
  full = grid == "full"
  results = {}
  seg = jnp.array(SEGMENT_IDS, jnp.int32)
  row = P("data", "sequence")
  layer = GatedSlotAttention(D, **LAYER, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(layer)
  x = jax.random.normal(jax.random.key(1), (B, T, D))
  loss = lambda p, x, s: layer_loss(graphdef, p, x, s)
  want = jax.jit(loss)(params, x, seg)
  want_plain = jax.jit(loss)(params, x, None) if full else None
  for n in (2, 4, 8) if full else (2, 8):
    run(f"layer/{n}", lambda: rel_err(split(loss, n, (params, x, seg), (P(), row, row)), want), results)
  if full:
    run("layer/plain/4", lambda: rel_err(split(loss, 4, (params, x, None), (P(), row, None)), want_plain), results)
  run("layer/Explicit/4", lambda: rel_err(split(loss, 4, (params, x, seg), (P(), row, row), AxisType.Explicit), want),
      results)

  def in_users_shard_map():
    mesh = jax.make_mesh((2, 4), ("data", "sequence"), axis_types=(AxisType.Explicit,) * 2)
    f = jax.shard_map(loss, mesh=mesh, in_specs=(P(), row, row), out_specs=(row, (P(), row)))
    with jax.set_mesh(mesh):
      return rel_err(jax.jit(f)(params, place(mesh, x, row), place(mesh, seg, row)), want)
  run("layer/shard_map", in_users_shard_map, results)

  # Prefill: outputs and the whole cache (state, convolution tails, position, segment id); from an empty past and
  # continuing a cache (the first 8 tokens prefilled on one device).
  pre = lambda p, x, s, c: layer_prefill(graphdef, p, x, s, c)
  want_pre = jax.jit(pre)(params, x, seg, None)
  if full:
    run("layer/prefill/4", lambda: rel_err(split(pre, 4, (params, x, seg, None), (P(), row, row, None)), want_pre),
        results)
  _, first = jax.jit(pre)(params, x[:, :8], seg[:, :8], None)
  rest_x, rest_seg = x[:, 8:16].repeat(2, axis=1), seg[:, 8:16].repeat(2, axis=1)  # 16 more tokens
  want_cont = jax.jit(pre)(params, rest_x, rest_seg, first)
  run("layer/prefill_cache/4", lambda: rel_err(
      split(pre, 4, (params, rest_x, rest_seg, first), (P(), row, row, P("data"))), want_cont), results)

  # ABC: its running normalizer (log Z) folded across shards like the state; the loss and every gradient, and
  # prefill from a cache (log Z included).
  abc = GatedSlotAttention(D, **LAYER, slot_control="abc", rngs=nnx.Rngs(0))
  a_graph, a_params = nnx.split(abc)
  a_loss = lambda p, x, s: layer_loss(a_graph, p, x, s)
  want_abc = jax.jit(a_loss)(a_params, x, seg)
  for n in (2, 8) if full else (8,):
    run(f"abc/{n}", lambda: rel_err(split(a_loss, n, (a_params, x, seg), (P(), row, row)), want_abc), results)
  a_pre = lambda p, x, s, c: layer_prefill(a_graph, p, x, s, c)
  _, a_first = jax.jit(a_pre)(a_params, x[:, :8], seg[:, :8], None)
  want_a_cont = jax.jit(a_pre)(a_params, rest_x, rest_seg, a_first)
  run("abc/prefill_cache/4", lambda: rel_err(
      split(a_pre, 4, (a_params, rest_x, rest_seg, a_first), (P(), row, row, P("data"))), want_a_cont), results)

  if full:
    cfg = GSAConfig(**MODEL)
    model = GSALM(cfg, rngs=nnx.Rngs(0))
    m_graph, m_params = nnx.split(model)
    tokens = jax.random.randint(jax.random.key(2), (B, T), 1, cfg.vocab_size)
    m_loss = lambda p, tok, s: model_loss(m_graph, p, tok, s)
    want_model = jax.jit(m_loss)(m_params, tokens, seg)
    for n in (2, 4, 8):
      run(f"hybrid/{n}", lambda: rel_err(split(m_loss, n, (m_params, tokens, seg), (P(), row, row)), want_model),
          results)

    # gsa_jax.generate.prefill of the hybrid model: logits and every layer's cache (GSA and KV).
    want_gen = prefill(model, tokens, segment_ids=seg, max_len=T + 4)

    def generate_prefill():
      mesh = sequence_mesh(4)
      with jax.set_mesh(mesh):
        return prefill(model, place(mesh, tokens, row), segment_ids=place(mesh, seg, row), max_len=T + 4)
    run("hybrid/generate_prefill/4", lambda: rel_err(generate_prefill(), want_gen), results)
  print("RESULTS" + json.dumps(results))


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "short")
