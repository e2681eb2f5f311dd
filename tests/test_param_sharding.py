"""The trainer's parameter placement (gsa_jax/train/sharding.py): every parameter of every preset in configs/ is
placed by the logical axes it was created with, mapped through LOGICAL_AXIS_RULES; nothing is replicated by
omission. Shapes only (nnx.eval_shape) on an abstract (data 2, fsdp 2, tensor 2) mesh: no devices needed."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from gsa_jax.layers.common import logical_axes
from gsa_jax.models import GSALM
from gsa_jax.train import sharding as shd
from gsa_jax.train.config import model_config
from tests.test_configs import CONFIG_FILES

MESH = AbstractMesh((2, 2, 2, 2), shd.AXES)  # every preset's sharded dimensions are even


def _flat(tree):
  return jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]


def _mesh_axes(target) -> tuple[str, ...]:
  return () if target is None else ((target,) if isinstance(target, str) else tuple(target))


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_parameter_of_every_preset_is_placed_by_its_logical_axes(name):
  model_cfg = model_config(importlib.import_module(f"configs.{name}").get_config())
  params = nnx.state(nnx.eval_shape(lambda: GSALM(model_cfg, rngs=nnx.Rngs(0))), nnx.Param)
  shardings = _flat(shd.param_shardings(params, MESH))
  assert len(shardings) == len(_flat(params))
  for (path, param), (_, sharding) in zip(_flat(params), shardings):
    where = f"{name}: {jax.tree_util.keystr(path)}"
    axes = param.get_metadata()["out_sharding"]
    assert len(axes) == param.ndim, where
    expected = tuple(shd.LOGICAL_AXIS_RULES[a] if a is not None else None for a in axes)
    assert tuple(sharding.get_value().spec) == expected, where
  # Replicated are only the parameters whose axes all map to no mesh axis (norm scales, the t2r map).
  replicated = [jax.tree_util.keystr(p) for p, s in shardings if not any(map(_mesh_axes, s.get_value().spec))]
  assert all(p.endswith("_norm']['scale']") or p.endswith("['norm']['scale']") or "['t2r']" in p
             for p in replicated), replicated


def test_a_mesh_axis_that_does_not_divide_its_dimension_is_dropped():
  mesh = AbstractMesh((1, 2, 2, 4), shd.AXES)
  assert shd.logical_spec(("embed", "heads"), (6, 10), mesh) == P("fsdp", None)  # 10 over 4 devices: replicated
  assert shd.logical_spec(("batch", "length", "vocab"), (4, 3, 8), mesh) == P(("data", "fsdp"), None, "tensor")
  assert shd.logical_spec(("batch", "length", "vocab"), (4, 6, 8), mesh) == P(("data", "fsdp"), "sequence", "tensor")


def test_a_parameter_without_logical_axes_or_with_an_unknown_name_is_an_error():
  with pytest.raises(ValueError, match=r"parameter .* \(4, 4\) names no logical axes"):
    shd.param_shardings({"w": nnx.Param(jnp.zeros((4, 4)))}, MESH)
  with pytest.raises(ValueError, match=r"logical axes \['rows'\] are not in .*LOGICAL_AXIS_RULES"):
    shd.param_shardings({"w": nnx.Param(jnp.zeros((4, 4)), **logical_axes("rows", None))}, MESH)
  with pytest.raises(ValueError, match=r"logical axes \('embed',\) name 1 dimensions; the array has shape \(4, 4\)"):
    shd.param_shardings({"w": nnx.Param(jnp.zeros((4, 4)), **logical_axes("embed"))}, MESH)
