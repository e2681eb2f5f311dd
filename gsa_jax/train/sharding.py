"""The device mesh (data, fsdp, sequence, tensor) and the rules that place parameters and batches on it."""

from __future__ import annotations

import math

import flax
import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "sequence", "tensor")  # tensor last: neighbouring devices, the most traffic
BATCH_AXES = ("data", "fsdp")  # the batch is split over both; fsdp additionally shards parameters
SEQUENCE_AXIS = "sequence"  # splits every row's T (context parallelism: gsa_jax.layers.context_parallel)

# Logical axes -> mesh axes: this table alone decides placement. Parameters name their logical axes where they are
# created (flax `out_sharding` metadata, `gsa_jax.layers.common.logical_axes`), activations where the train step
# constrains them. Input projections shard their outputs ("heads", "mlp") over "tensor" and output projections
# their inputs, so a block's matmuls need one reduction over "tensor" (the Megatron layout); "embed" on parameters
# is fully sharded data parallel.
LOGICAL_AXIS_RULES = {
    "batch": BATCH_AXES,  # sequences of a batch
    "embed": "fsdp",  # the model width
    "heads": "tensor",  # heads x head width (GSA and attention projections, convolutions, GSA's output norm)
    "mlp": "tensor",  # MLP hidden units
    "vocab": "tensor",
    "length": SEQUENCE_AXIS,
}

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


def axis_rules() -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
  """LOGICAL_AXIS_RULES as flax's logical axis rules (`flax.core.spmd.logical_axis_rules(axis_rules())`)."""
  return tuple(LOGICAL_AXIS_RULES.items())


def logical_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
  """Mesh PartitionSpec of logical axes (None: replicated); a mesh axis that does not divide its dimension is
  dropped (replicated). Raises ValueError for a logical name that LOGICAL_AXIS_RULES does not list."""
  unknown = [a for a in axes if a is not None and a not in LOGICAL_AXIS_RULES]
  if unknown:
    raise ValueError(f"logical axes {unknown} are not in gsa_jax.train.sharding.LOGICAL_AXIS_RULES "
                     f"{sorted(LOGICAL_AXIS_RULES)}; add a rule mapping them to mesh axes (or None).")
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {axes} name {len(axes)} dimensions; the array has shape {tuple(shape)}.")

  def divides(target, dim):
    names = () if target is None else ((target,) if isinstance(target, str) else target)
    return dim % math.prod(mesh.shape[a] for a in names) == 0

  targets = flax.core.spmd.from_sharding_rules(axes, axis_rules())
  return P(*(t if divides(t, d) else None for t, d in zip(targets, shape)))


def param_logical_axes(param: nnx.Variable, path: str) -> tuple[str | None, ...]:
  """The logical axes a parameter was created with (its `out_sharding` metadata); ValueError naming `path` when
  it has none, so that no parameter is replicated by omission."""
  axes = param.get_metadata().get("out_sharding")
  if axes is None:
    raise ValueError(f"parameter {path} {tuple(param.shape)} names no logical axes; create it with "
                     "gsa_jax.layers.common.logical_axes(...) metadata (None for a replicated axis).")
  return tuple(axes)


def param_shardings(abstract_params: nnx.State, mesh: Mesh) -> nnx.State:
  """NamedShardings for an nnx.State of parameters (arrays or ShapeDtypeStructs), from each parameter's logical
  axes through LOGICAL_AXIS_RULES (`logical_spec`)."""
  def sharding(path, param):
    name = jax.tree_util.keystr(path)
    return param.replace(NamedSharding(mesh, logical_spec(param_logical_axes(param, name), param.shape, mesh)))

  return jax.tree_util.tree_map_with_path(sharding, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches [b, t]: rows over BATCH_AXES, each row's T over the sequence axis."""
  return NamedSharding(mesh, P(BATCH_AXES, SEQUENCE_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
