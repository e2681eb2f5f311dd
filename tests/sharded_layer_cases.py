"""The GSA layer and a GSALM under every kind of mesh JAX offers, on 8 fake CPU devices; run by
tests/test_layer_sharding.py in a subprocess (the device count is fixed when JAX starts). Prints one JSON line:
case name -> the largest relative error of the output and every gradient (parameters and input) against one
device, or the error message where a case raised."""

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

from gsa_jax.layers import GatedSlotAttention  # noqa: E402
from gsa_jax.models import GSALM, GSAConfig  # noqa: E402
from tests.sharded_op_cases import rel_err  # noqa: E402

B, T, D = 4, 11, 32
# Every piece of the layer that could meet a sharded axis: grouped heads (4 query, 2 kv heads... then 4 and 4 so
# that kv heads divide the model axis), the short convolution, RoPE, t2r, segment ids.
LAYER = dict(num_heads=4, num_kv_heads=4, num_slots=4, chunk_size=8, use_short_conv=True, use_rope=True,
             feature_map="t2r", gate_logit_normalizer=2.0)
MODEL = dict(vocab_size=64, hidden_size=D, num_layers=2, num_heads=4, num_slots=4, chunk_size=8,
             intermediate_size=64, use_short_conv=True, gate_logit_normalizer=2.0)
SEGMENTS = jnp.array([[1] * 5 + [2] * 6, [3] * 11, [1] * 8 + [0] * 3, [4] * 2 + [5] * 9], jnp.int32)


def head_spec(path, x):
  """Megatron-style placement by parameter name: input projections and convolutions split their output features
  (heads) over "model", the output projection its input features; the rest (norm scale, t2r map) replicated."""
  name = jax.tree_util.keystr(path)
  if "o_proj" in name:
    return P("model", None)
  if any(f"{p}_proj" in name for p in "qkvf") or "_conv" in name:
    return P(None, "model")
  return P()


def loss_fn(model, x, seg):
  """Output and gradients (parameters, input) of an elementwise loss of a GatedSlotAttention or GSALM."""
  def f(params, x):
    y = nnx.merge(graphdef, params)(x, seg)
    return jnp.sum(jnp.sin(3 * y.astype(jnp.float32))), y
  graphdef, params = nnx.split(model)
  (_, y), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, x)
  return y, grads


def layer_loss(params_and_graph, x, seg):
  graphdef, params = params_and_graph
  return loss_fn(nnx.merge(graphdef, params), x, seg)


def run(name, fn, results):
  try:
    results[name] = fn()
  except Exception as e:  # a case that raises is reported, not fatal: the test names it
    results[name] = f"{type(e).__name__}: {str(e)[:300]}"


def main(kinds):
  results = {}
  layer = GatedSlotAttention(D, **LAYER, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (B, T, D))
  graphdef, params = nnx.split(layer)
  want = jax.jit(lambda p, x, seg: loss_fn(nnx.merge(graphdef, p), x, seg))(params, x, SEGMENTS)
  model = GSALM(GSAConfig(**MODEL), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(2), (B, T), 1, 64)
  m_graph, m_params = nnx.split(model)
  model_loss = lambda p, tok, seg: jax.grad(
      lambda p: jnp.sum(jnp.sin(nnx.merge(m_graph, p)(tok, seg))))(p)
  want_model = jax.jit(model_loss)(m_params, tokens, SEGMENTS)

  if "shard_map" in kinds:
    # Rows over data, replicated over model; parameters replicated (check_vma=True, the default).
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    place = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))

    def layer_under_shard_map():
      def per_shard(p, x, seg):
        # The parameters are invariant over data, so autodiff already sums their gradient over the shards' rows
        # (with check_vma=True): no psum here.
        return loss_fn(nnx.merge(graphdef, p), x, seg)
      f = jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                        out_specs=(P("data"), (P(), P("data"))))
      with jax.set_mesh(mesh):
        return rel_err(jax.jit(f)(params, place(x, P("data")), place(SEGMENTS, P("data"))), want)

    def model_under_shard_map():
      f = jax.shard_map(model_loss, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P())
      with jax.set_mesh(mesh):
        return rel_err(jax.jit(f)(m_params, place(tokens, P("data")), place(SEGMENTS, P("data"))), want_model)

    run("layer/shard_map", layer_under_shard_map, results)
    run("model/shard_map", model_under_shard_map, results)

  for kind in (AxisType.Explicit, AxisType.Auto):
    if kind.name not in kinds:
      continue
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind,) * 2)
    place = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    for label, spec_of in (("replicated", lambda path, x: P()), ("heads", head_spec)):
      def layer_case(spec_of=spec_of):
        with jax.set_mesh(mesh):
          p = jax.tree_util.tree_map_with_path(lambda path, a: place(a, spec_of(path, a)), params)
          got = jax.jit(lambda p, x, seg: loss_fn(nnx.merge(graphdef, p), x, seg))(
              p, place(x, P("data")), place(SEGMENTS, P("data")))
        return rel_err(got, want)

      def model_case(spec_of=spec_of):
        with jax.set_mesh(mesh):
          p = jax.tree_util.tree_map_with_path(lambda path, a: place(a, spec_of(path, a)), m_params)
          got = jax.jit(model_loss)(p, place(tokens, P("data")), place(SEGMENTS, P("data")))
        return rel_err(got, want_model)

      run(f"layer/{kind.name}/{label}", layer_case, results)
      run(f"model/{kind.name}/{label}", model_case, results)
  print("RESULTS" + json.dumps(results))


if __name__ == "__main__":
  main(sys.argv[1:] or ("shard_map", "Explicit", "Auto"))
