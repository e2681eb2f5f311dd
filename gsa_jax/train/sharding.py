"""The device mesh (data, fsdp, sequence, tensor) and the rules that place parameters and batches on it."""

from __future__ import annotations

import math
import re

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "sequence", "tensor")  # tensor last: neighbouring devices, the most traffic
BATCH_AXES = ("data", "fsdp")  # the batch is split over both; fsdp additionally shards parameters
SEQUENCE_AXIS = "sequence"  # splits every row's T (context parallelism: gsa_jax.layers.context_parallel)

# Logical axes -> mesh axes. Parameters and activations name logical axes; this table alone decides placement.
LOGICAL_AXIS_RULES = {
    "batch": BATCH_AXES,  # sequences of a batch
    "embed": "fsdp",  # the model width, on parameters (fully sharded data parallel)
    "features": "tensor",  # projected features: heads x head width, MLP hidden units (Megatron tensor parallel)
    "vocab": "tensor",
    "conv_width": None,
    "length": SEQUENCE_AXIS,
}

# Parameter logical axes by the parameter's path, first match wins. Input projections shard their output features
# over "tensor" and output projections their input features, so a block's matmuls need one reduction over
# "tensor" (the Megatron layout).
_PARAM_AXES = (
    (r"\['embed'\]\['embedding'\]", ("vocab", "embed")),
    (r"\['lm_head'\]\['kernel'\]", ("embed", "vocab")),
    (r"\['(o_proj|down_proj)'\]\['kernel'\]", ("features", "embed")),
    (r"_proj'\]\['kernel'\]", ("embed", "features")),
    (r"_conv'\]\['weight'\]", ("conv_width", "features")),
)

# Activation logical axes, for the largest activations the train step constrains.
LOGITS_AXES = ("batch", "length", "vocab")


def resolve_mesh_shape(sizes: dict[str, int], device_count: int) -> tuple[int, ...]:
  """The mesh shape in AXES order from {axis: size} (a missing axis is 1); fills a -1 axis with the devices left
  over. Raises ValueError naming the keys if the product is wrong."""
  unknown = sorted(set(sizes) - set(AXES))
  if unknown:
    raise ValueError(f"config.mesh: unknown axes {unknown}; the axes are {AXES}.")
  sizes = {a: sizes.get(a, 1) for a in AXES}
  auto = [k for k, v in sizes.items() if v == -1]
  bad = [k for k, v in sizes.items() if v == 0 or v < -1]
  if bad or len(auto) > 1:
    raise ValueError(f"config.mesh: each axis must be a positive size, and at most one may be -1; got {sizes}.")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  product = " x ".join(AXES)
  if auto:
    if device_count % fixed:
      raise ValueError(f"config.mesh: the fixed axes {sizes} multiply to {fixed}, which does not divide the "
                       f"{device_count} devices; choose sizes whose product divides {device_count}.")
    sizes[auto[0]] = device_count // fixed
  elif fixed != device_count:
    raise ValueError(f"config.mesh: {product} = {fixed} but there are {device_count} devices; make the "
                     "product equal the device count, or set one axis to -1.")
  return tuple(sizes[a] for a in AXES)


def make_mesh(shape: tuple[int, ...]) -> Mesh:
  """The Auto mesh of `shape` (AXES order)."""
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def logical_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
  """Mesh PartitionSpec of logical axes; a mesh axis that does not divide its dimension is dropped (replicated)."""
  def mesh_axes(name, dim):
    target = LOGICAL_AXIS_RULES[name] if name is not None else None
    if target is None:
      return None
    size = math.prod(mesh.shape[a] for a in ((target,) if isinstance(target, str) else target))
    return target if dim % size == 0 else None

  return P(*(mesh_axes(a, d) for a, d in zip(axes, shape)))


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
  """The PartitionSpec of a parameter, from its logical axes (norm scales and unlisted parameters: replicated)."""
  for pattern, axes in _PARAM_AXES:
    if re.search(pattern, path) and len(axes) == len(shape):
      return logical_spec(axes, shape, mesh)
  return P()


def param_shardings(abstract_params, mesh: Mesh):
  """NamedShardings for a pytree of parameters (arrays or ShapeDtypeStructs), by `param_spec`."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, param_spec(jax.tree_util.keystr(path), x.shape, mesh)), abstract_params)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches [b, t]: rows over BATCH_AXES, each row's T over the sequence axis."""
  return NamedSharding(mesh, P(BATCH_AXES, SEQUENCE_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
