"""Pieces shared by every GSA backend: packed-sequence masks and dtype rules.

Shape legend used across `gsa_jax.ops` and `pallas_kernels`:
  b batch, t time, hq query heads, h kv heads, g = hq // h query heads per kv head,
  dk key width, dv value width, m slots, c chunk length, n number of chunks.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


# The chunk length of the chunked form (`chunk_size` of the op, the layer and GSAConfig) when none is given. The
# Pallas kernels have their own chunk (their BlockSizes), a tuning parameter of each kernel.
DEFAULT_CHUNK_SIZE = 64

# Names the Pallas kernels give what their forward leaves for the backward, for remat policies (`jax.checkpoint`
# with `save_only_these_names`; gsa_jax.models: remat="matmuls_gsa" / "matmuls_gsa_keys" / "matmuls_gsa_states").
# RESIDUALS_NAME: the float32 slot logits [b, t, hq, m] and final states, small; a policy that keeps them spares
# the remat backward a rerun of the logits kernel (GPU) or of the whole forward kernel (TPU). KEY_STATES_NAME /
# VALUE_STATES_NAME: the GPU kernels' float32 states entering every chunk, [b, h, t / c, dk, m] / [b, h, t / c, m,
# dv], large; keeping one spares the rerun of the state kernel that makes it. The inputs are left to the caller's
# policy (cheap functions of its matmuls).
RESIDUALS_NAME = "gsa_residuals"
KEY_STATES_NAME = "gsa_key_states"
VALUE_STATES_NAME = "gsa_value_states"


class GSAState(NamedTuple):
  """The recurrent state of one GSA layer, always kept in float32 (float64 under x64 references).

  hk: [b, h, dk, m]  key memory (pass 1).
  hv: [b, h, m, dv]  value memory (pass 2).
  """

  hk: jax.Array
  hv: jax.Array


class SegmentMasks(NamedTuple):
  """Per-token view of `segment_ids` that every backend consumes.

  reset: [b, t] bool. True where a token starts a new document: the state is zeroed before the token is added.
  valid: [b, t] bool. False for padding (segment id 0): the token leaves the state unchanged and its output is 0.
  """

  reset: jax.Array
  valid: jax.Array


def as_segment_ids(segment_ids_or_mask: jax.Array) -> jax.Array:
  """segment_ids [b, t] as they are, or a Hugging Face-style attention mask (bool: True = token, False = padding)
  as segment ids int32 (1 = the row's one document, 0 = padding). A 0/1 integer mask already is such ids."""
  if segment_ids_or_mask.dtype == jnp.bool_:
    return segment_ids_or_mask.astype(jnp.int32)
  return segment_ids_or_mask


def segment_masks(segment_ids: jax.Array) -> SegmentMasks:
  """Turns `segment_ids [b, t]` into reset/valid masks.

  A non-padding token starts a new document when its id differs from the id of the previous non-padding token
  of the row. The first non-padding token of a row never resets: it continues from `initial_state`. Padding is
  transparent, so `a, 0, a` is one document.
  """
  valid = segment_ids > 0
  t = segment_ids.shape[1]
  pos = jnp.arange(t, dtype=jnp.int32)[None, :]
  # Position of the last non-padding token at or before t (-1 if none), carried forward by a running max.
  last_pos = jax.lax.cummax(jnp.where(valid, pos, -1), axis=1)
  prev_pos = jnp.pad(last_pos[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  prev_id = jnp.take_along_axis(segment_ids, jnp.maximum(prev_pos, 0), axis=1)
  reset = valid & (prev_pos >= 0) & (segment_ids != prev_id)
  return SegmentMasks(reset=reset, valid=valid)


def accumulation_dtype(*dtypes) -> jnp.dtype:
  """float32, or float64 when any input is float64 (x64 references)."""
  return jnp.result_type(jnp.float32, *dtypes)


# Inside `jax.shard_map` (with its default check_vma=True) every value is typed with the mesh axes it varies over.
# A scan carry must keep that type from step to step and a Pallas kernel must declare it for its outputs, so a
# zero state made inside the op, or an input that is replicated while the others are sharded, would not match the
# state the first step returns. Outside shard_map these sets are empty and everything below is the identity.


def varying_axes(*xs) -> frozenset:
  """The shard_map mesh axes that any of the arrays `xs` varies over (None entries are skipped)."""
  axes = frozenset()
  for x in xs:
    if x is not None:
      axes |= jax.typeof(x).manual_axis_type.varying
  return axes


def to_varying(x: jax.Array, axes: frozenset) -> jax.Array:
  """`x` typed as varying over `axes` (it must not vary over others); a no-op when it already does."""
  missing = axes - jax.typeof(x).manual_axis_type.varying
  return jax.lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x


def kernel_output(shape, dtype, axes: frozenset) -> jax.ShapeDtypeStruct:
  """A Pallas kernel's `out_shape` entry that varies over `axes` like the kernel's inputs."""
  if not axes:
    return jax.ShapeDtypeStruct(shape, dtype)
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=axes))
