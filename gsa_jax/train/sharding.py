"""The device mesh (data, fsdp, tensor) and the rules that place parameters and batches on it."""

from __future__ import annotations

import math
import re

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both; fsdp additionally shards parameters

# Parameter rules by the parameter's path, first match wins: one mesh axis (or None) per array dimension.
# Input projections shard their output features over "tensor" and their input over "fsdp"; output projections
# the other way round, so a block's matmuls need one reduction over "tensor" (the Megatron layout).
_RULES = (
    (r"\['embed'\]\['embedding'\]", ("tensor", "fsdp")),  # [vocab, hidden]
    (r"\['lm_head'\]\['kernel'\]", ("fsdp", "tensor")),  # [hidden, vocab]
    (r"\['(o_proj|down_proj)'\]\['kernel'\]", ("tensor", "fsdp")),  # [features, hidden]
    (r"_proj'\]\['kernel'\]", ("fsdp", "tensor")),  # [hidden, features]
    (r"_conv'\]\['weight'\]", (None, "tensor")),  # [width, features]
)


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, device_count: int) -> tuple[int, int, int]:
  """Fills a -1 axis with the devices left over; raises ValueError naming the keys if the product is wrong."""
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  auto = [k for k, v in sizes.items() if v == -1]
  bad = [k for k, v in sizes.items() if v == 0 or v < -1]
  if bad or len(auto) > 1:
    raise ValueError(f"config.mesh: each axis must be a positive size, and at most one may be -1; got {sizes}.")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if auto:
    if device_count % fixed:
      raise ValueError(f"config.mesh: the fixed axes {sizes} multiply to {fixed}, which does not divide the "
                       f"{device_count} devices; choose sizes whose product divides {device_count}.")
    sizes[auto[0]] = device_count // fixed
  elif fixed != device_count:
    raise ValueError(f"config.mesh: data x fsdp x tensor = {fixed} but there are {device_count} devices; make the "
                     "product equal the device count, or set one axis to -1.")
  return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(shape: tuple[int, int, int]) -> Mesh:
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
  """The PartitionSpec of a parameter; an axis that does not divide its dimension is dropped (replicated)."""
  for pattern, axes in _RULES:
    if re.search(pattern, path) and len(axes) == len(shape):
      return P(*(a if a is not None and dim % mesh.shape[a] == 0 else None for a, dim in zip(axes, shape)))
  return P()


def param_shardings(abstract_params, mesh: Mesh):
  """NamedShardings for a pytree of parameters (arrays or ShapeDtypeStructs), by `param_spec`."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, param_spec(jax.tree_util.keystr(path), x.shape, mesh)), abstract_params)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
