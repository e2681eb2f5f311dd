"""The GSA layer and a GSALM inside `jax.shard_map` (check_vma=True) and on Explicit and Auto meshes with the
parameters replicated or their heads sharded, on 8 fake CPU devices (tests/sharded_layer_cases.py, in a
subprocess): outputs and every gradient (parameters and inputs) equal one device's."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cases(*kinds):
  result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sharded_layer_cases.py"), *kinds],
                          capture_output=True, text=True, cwd=ROOT, timeout=900, env={**os.environ, "PYTHONPATH": ROOT})
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.split("RESULTS")[-1])


def check(results, names):
  assert set(results) == set(names)
  bad = {name: err for name, err in results.items() if not (isinstance(err, float) and err <= 1e-5)}
  assert not bad, bad


def test_layer_and_model_under_shard_map_and_explicit_meshes():
  names = ["layer/shard_map", "model/shard_map"] + [f"{what}/Explicit/{params}" for what in ("layer", "model")
                                                    for params in ("replicated", "heads")]
  check(run_cases("shard_map", "Explicit"), names)


@pytest.mark.slow
def test_layer_and_model_on_auto_meshes():
  check(run_cases("Auto"), [f"{what}/Auto/{params}" for what in ("layer", "model") for params in ("replicated", "heads")])


# -- logical axis names on parameters ----------------------------------------------------------------------------

USER_RULES = (("heads", "tp"), ("embed", "fsdp"), ("mlp", "tp"), ("vocab", None))


def test_parameters_carry_logical_axes_that_users_map_to_their_mesh():
  import jax
  from flax import nnx
  from flax.core import spmd
  from jax.sharding import PartitionSpec as P

  from gsa_jax.models import GSALM, GSAConfig
  model = GSALM(GSAConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, num_slots=4,
                          intermediate_size=32, use_short_conv=True, feature_map="t2r", attn_layers=(1,)),
                rngs=nnx.Rngs(0))
  with spmd.logical_axis_rules(USER_RULES):
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  flat = {jax.tree_util.keystr(path).removesuffix(".value"): spec
          for path, spec in jax.tree_util.tree_leaves_with_path(specs)}
  want = {
      "['embed']['embedding']": P(None, "fsdp"), "['lm_head']['kernel']": P("fsdp", None),
      "['blocks'][0]['mixer']['q_proj']['kernel']": P("fsdp", "tp"),
      "['blocks'][0]['mixer']['f_proj']['kernel']": P("fsdp", "tp"),
      "['blocks'][0]['mixer']['o_proj']['kernel']": P("tp", "fsdp"),
      "['blocks'][0]['mixer']['k_conv']['weight']": P(None, "tp"),
      "['blocks'][0]['mixer']['g_norm']['scale']": P("tp"),
      "['blocks'][0]['mixer']['t2r']['kernel']": P(None, None),
      "['blocks'][0]['mlp']['down_proj']['kernel']": P("tp", "fsdp"),
      "['blocks'][1]['mixer']['v_proj']['kernel']": P("fsdp", "tp"),
      "['blocks'][1]['mixer']['o_proj']['kernel']": P("tp", "fsdp"),
      "['blocks'][0]['mixer_norm']['scale']": P(None),  # named replicated: the residual stream's norms
  }
  assert {name: flat[name] for name in want} == want


def test_warns_when_heads_do_not_divide_their_mesh_axes():
  import warnings

  import jax
  import jax.numpy as jnp
  from flax import nnx
  from flax.core import spmd

  from gsa_jax.layers import GatedSlotAttention
  mesh = jax.sharding.AbstractMesh((2,), ("tp",), axis_types=(jax.sharding.AxisType.Auto,))

  def trace(num_heads):
    layer = GatedSlotAttention(24, num_heads=num_heads, num_slots=4, rngs=nnx.Rngs(0))
    with warnings.catch_warnings(record=True) as caught, spmd.logical_axis_rules(USER_RULES), \
        jax.sharding.use_abstract_mesh(mesh):
      warnings.simplefilter("always")
      jax.eval_shape(layer, jnp.zeros((1, 5, 24)))
    return [str(w.message) for w in caught if "GatedSlotAttention" in str(w.message)]

  (message,) = trace(3)
  assert "num_kv_heads=3" in message and "('tp',)" in message
  assert trace(2) == []
