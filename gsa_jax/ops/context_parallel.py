"""Context parallelism: one sequence split along T over a mesh axis, exact, every backend of the op.

Both GSA states follow gated recurrences whose inputs do not depend on the state (spec section 1), so the state
leaving a shard is an affine function of the state entering it, diagonal in the slot axis:

    H_out(j) = H_in(j) * A_j + L_j      (A_j scales the slot axis M of hk [K, M] and of hv [M, V])

with L_j the state the shard builds from zero and A_j = exp(sum of its gates) per slot, exactly 0 when a document
starts inside the shard (nothing before that start reaches the shard's end). Each shard computes (L_j, A_j) in
closed form (two matmuls over its tokens: no softmax, no second run of the op), one `all_gather` over the
sequence axis brings every shard's pair to every device, a local fold gives the state entering each shard, and
the op runs once on the shard with that state as `initial_state`. The traffic is one state per shard, whatever T
is (docs/context_parallel.md). Gradients flow through the fold and the gather by autodiff.

Packed rows: a shard's first document continues the previous shards' last one only when their segment ids match
(a token is compared with the previous non-padding token of the row, across shards, as the op does on one
device); padding decays nothing, so an all-padding shard passes its incoming state on unchanged, and the final
state is the state after the last non-padding token of the row.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from gsa_jax.ops.api import gated_slot_attention, parse_kernel_block_sizes, static_scale, validate_inputs
from gsa_jax.ops.common import DEFAULT_CHUNK_SIZE, GSAState, accumulation_dtype, segment_masks, to_varying, varying_axes

_HIGHEST = jax.lax.Precision.HIGHEST


class ShardSummary(NamedTuple):
  """What one shard tells the others: its state map H -> H * decay + state, and the ids at its two ends.

  state: GSAState(hk [b, h, dk, m], hv [b, h, m, dv]), the state the shard builds from a zero state.
  decay: [b, h, m] the product of the shard's gates per slot; exactly 0 where a document starts inside it.
  first_id, last_id: [b] segment ids of the shard's first and last non-padding tokens (0: it has none).
  """

  state: GSAState
  decay: jax.Array
  first_id: jax.Array
  last_id: jax.Array


def _documents(segment_ids: jax.Array):
  """What a shard's segment ids [b, t] mean for its summary.

  Returns reaches_end [b, t] (no document starts after the token), cut [b] (a document starts inside the shard),
  and the ids [b] of its first and last non-padding tokens (0: it has none).
  """
  t = segment_ids.shape[1]
  reset, valid = segment_masks(segment_ids)
  pos = jnp.arange(t, dtype=jnp.int32)[None, :]
  last_start = jnp.max(jnp.where(reset, pos, 0), axis=1)  # 0 when no document starts inside
  ids = jnp.where(valid, segment_ids, 0).astype(jnp.int32)
  first_id = jnp.take_along_axis(ids, jnp.argmax(valid, axis=1)[:, None], axis=1)[:, 0]
  last_id = jnp.take_along_axis(ids, (t - 1 - jnp.argmax(valid[:, ::-1], axis=1))[:, None], axis=1)[:, 0]
  return pos >= last_start[:, None], jnp.any(reset, axis=1), first_id, last_id


def shard_summary(k, v, s, g, segment_ids=None) -> ShardSummary:
  """The affine map one shard applies to the state entering it, in closed form.

  k [b, t, h, dk]; v [b, t, h, dv]; s, g [b, t, h, m]; segment_ids None or [b, t] (the shard's own tokens).
  A token j reaches the shard's end scaled by exp(sum of g_i for j < i), if no document starts after it.
  """
  b = k.shape[0]
  acc = accumulation_dtype(k.dtype, v.dtype, s.dtype, g.dtype)
  k, v, s, g = (x.astype(acc) for x in (k, v, s, g))
  if segment_ids is not None:
    valid = (segment_ids > 0)[..., None, None]
    # Padding writes nothing and decays nothing.
    s, g = jnp.where(valid, s, 0), jnp.where(valid, g, 0)
  # sum_{i > j} g_i as a reverse cumulative sum of the gates after j, never as a difference of two large sums:
  # g = -1e3 next to g = 0 would cancel.
  later = jnp.pad(g[:, 1:], [(0, 0), (0, 1), (0, 0), (0, 0)])
  w = s * jnp.exp(jax.lax.cumsum(later, axis=1, reverse=True))  # [b, t, h, m]
  decay = jnp.exp(jnp.sum(g, axis=1))  # [b, h, m]
  if segment_ids is None:
    first_id = last_id = jnp.ones((b,), jnp.int32)
  else:
    reaches_end, cut, first_id, last_id = _documents(segment_ids)
    w = w * reaches_end[..., None, None]
    decay = jnp.where(cut[:, None, None], 0, decay)
  hk = jnp.einsum("bthk,bthm->bhkm", k, w, precision=_HIGHEST)
  hv = jnp.einsum("bthm,bthv->bhmv", w, v, precision=_HIGHEST)
  return ShardSummary(GSAState(hk, hv), decay, first_id, last_id)


def fold_states(initial: GSAState, summaries: ShardSummary) -> tuple[GSAState, GSAState]:
  """The state entering every shard, and the state after the last one, from all shards' summaries.

  initial: GSAState(hk [b, h, dk, m], hv [b, h, m, dv]), the state before the row's first document.
  summaries: ShardSummary with a leading shard axis n on every leaf, in sequence order.
  Returns (GSAState [n, b, h, dk, m] / [n, b, h, m, dv] entering each shard, zeroed where the shard's first token
  starts a new document; the final GSAState).
  """

  def step(carry, shard: ShardSummary):
    state, prev_id = carry
    # A shard continues the state it receives unless its first token starts a document: its id differs from the
    # last non-padding token before it (none before it: the initial state applies to the row's first document).
    keep = (prev_id == 0) | (shard.first_id == 0) | (shard.first_id == prev_id)
    keep = keep.astype(state.hk.dtype)[:, None, None, None]
    entering = GSAState(state.hk * keep, state.hv * keep)
    leaving = GSAState(entering.hk * shard.decay[:, :, None, :] + shard.state.hk,
                       entering.hv * shard.decay[:, :, :, None] + shard.state.hv)
    prev_id = jnp.where(shard.last_id > 0, shard.last_id, prev_id)
    return (leaving, prev_id), entering

  prev_id = jnp.zeros_like(summaries.first_id[0])
  axes = varying_axes(*jax.tree.leaves(summaries))  # the scan carry must vary over the axes its updates do
  initial = GSAState(*(to_varying(x.astype(summaries.state.hk.dtype), axes) for x in initial))
  (final, _), entering = jax.lax.scan(step, (initial, to_varying(prev_id, axes)), summaries)
  return entering, final


def _context_parallel_shard(q, k, v, s, g, *, axis_name, scale, initial_state, output_final_state, segment_ids,
                            chunk_size, backend, kernel_block_sizes):
  """The body that runs on each shard of `axis_name` (inside shard_map); arguments are the shard's arrays."""
  b, _, _, dk = q.shape
  h, dv, m = k.shape[2], v.shape[3], s.shape[3]
  summary = shard_summary(k, v, s, g, segment_ids)
  acc = summary.state.hk.dtype
  if initial_state is None:
    initial_state = GSAState(jnp.zeros((b, h, dk, m), acc), jnp.zeros((b, h, m, dv), acc))
  # Varying gather: its transpose is a reduce-scatter of the same size (an invariant gather transposes to an
  # all-reduce of every shard's state).
  summaries = jax.lax.all_gather(summary, axis_name)
  entering, final = fold_states(GSAState(*initial_state), summaries)
  index = jax.lax.axis_index(axis_name)
  mine = GSAState(*(x[index] for x in entering))
  o, _ = gated_slot_attention(q, k, v, s, g, scale=scale, initial_state=mine, segment_ids=segment_ids,
                              chunk_size=chunk_size, backend=backend, kernel_block_sizes=kernel_block_sizes)
  if not output_final_state:
    return o, None
  # Every shard folded the same final state; the last one's copy is summed to type it invariant over the axis.
  last = index == jax.lax.axis_size(axis_name) - 1
  return o, GSAState(*(jax.lax.psum(jnp.where(last, x, 0), axis_name) for x in final))


def _mesh_axes(entry) -> tuple:
  """Mesh axis names of one PartitionSpec entry (None, a name, or a tuple of names)."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _explicit_spec_entry(x, dim: int):
  """The mesh axes of dimension `dim` of `x`'s sharding on an Explicit mesh, else None."""
  spec = tuple(jax.typeof(x).sharding.spec) + (None,) * x.ndim
  return spec[dim]


def _place(x, mesh, spec):
  """`x` laid out as `spec` on `mesh`: Explicit meshes need it before shard_map, Auto ones reshard themselves."""
  if x is None or AxisType.Explicit not in mesh.axis_types:
    return x
  return jax.sharding.reshard(x, NamedSharding(mesh, spec))


def context_parallel_gsa(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    s: jax.Array,
    g: jax.Array,
    *,
    axis_name: str = "sequence",
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    batch_axes: str | tuple[str, ...] | None = None,
    head_axes: str | tuple[str, ...] | None = None,
    scale: float | jax.Array | None = None,
    initial_state: tuple[jax.Array, jax.Array] | None = None,
    output_final_state: bool = False,
    segment_ids: jax.Array | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    backend: str = "auto",
    kernel_block_sizes: str | Mapping[str, Any] | None = None,
) -> tuple[jax.Array, GSAState | None]:
  """`gated_slot_attention` with the sequence split over the mesh axis `axis_name`; the same results.

  Two ways to call it:
  - Inside `jax.shard_map` where `axis_name` is a manual axis: q, k, v, s, g, segment_ids are this device's
    contiguous slice of T (shard i holds tokens [i * T / n, (i + 1) * T / n)), in axis-index order;
    `initial_state` must be the same on every shard of the axis (replicated); the final state returned is the
    whole row's, invariant over `axis_name`.
  - Anywhere else, on whole arrays: the function runs the shard_map itself over `mesh` (default: the mesh set by
    `jax.set_mesh`), splitting T over `axis_name`, batch rows over `batch_axes` and kv heads over `head_axes`
    (None: the axes that already split q's batch / k's heads on an Explicit mesh; not split on an Auto mesh).
    T must be a multiple of the axis size.

  Args as `gated_slot_attention` (shapes [B, T, ...] of the whole row, or of the shard inside shard_map), plus
    axis_name: the mesh axis that splits T.  mesh, batch_axes, head_axes: for the second way only.

  Returns:
    o [B, T, HQ, V] in q's dtype (the shard's slice inside shard_map), and the state after the last non-padding
    token of each row, GSAState(hk [B, H, K, M], hv [B, H, M, V]) in float32, or None.
  """
  validate_inputs(q, k, v, s, g, initial_state=initial_state, segment_ids=segment_ids, chunk_size=chunk_size,
                  scale=scale)
  parse_kernel_block_sizes(kernel_block_sizes)  # bad tiles fail here, not inside the shard_map
  q, scale = static_scale(q, scale)
  shard = lambda q, k, v, s, g, state, seg: _context_parallel_shard(
      q, k, v, s, g, axis_name=axis_name, scale=scale, initial_state=state, output_final_state=output_final_state,
      segment_ids=seg, chunk_size=chunk_size, backend=backend, kernel_block_sizes=kernel_block_sizes)
  if axis_name in jax.sharding.get_abstract_mesh().manual_axes:
    return shard(q, k, v, s, g, initial_state, segment_ids)

  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh.empty or axis_name not in mesh.axis_names:
    got = "no mesh is set" if mesh.empty else f"the mesh has axes {mesh.axis_names}"
    raise ValueError(f"axis_name={axis_name!r} is not an axis of the mesh ({got}); pass mesh=, call under "
                     f"jax.set_mesh(mesh), or call inside a jax.shard_map over {axis_name!r}.")
  n = mesh.shape[axis_name]
  if q.shape[1] % n:
    raise ValueError(f"q has T = {q.shape[1]} tokens, which the {n} shards of mesh axis {axis_name!r} do not "
                     f"divide; pad T to a multiple of {n} (padding with segment id 0 changes nothing).")
  explicit = AxisType.Explicit in mesh.axis_types
  if batch_axes is None and explicit:
    batch_axes = _explicit_spec_entry(q, 0)
  if head_axes is None and explicit:
    head_axes = _explicit_spec_entry(k, 2)
  if axis_name in _mesh_axes(batch_axes) + _mesh_axes(head_axes):
    raise ValueError(f"mesh axis {axis_name!r} splits T; it cannot also split the batch (batch_axes={batch_axes!r}) "
                     f"or the heads (head_axes={head_axes!r}).")
  row, state_spec = P(batch_axes, axis_name, head_axes, None), P(batch_axes, head_axes, None, None)
  seg_spec = P(batch_axes, axis_name)
  q, k, v, s, g = (_place(x, mesh, row) for x in (q, k, v, s, g))
  segment_ids = _place(segment_ids, mesh, seg_spec)
  if initial_state is not None:
    initial_state = GSAState(*(_place(x, mesh, state_spec) for x in initial_state))
  in_specs = ((row,) * 5 + (None if initial_state is None else GSAState(state_spec, state_spec),
                            None if segment_ids is None else seg_spec))
  out_specs = (row, GSAState(state_spec, state_spec) if output_final_state else None)
  return jax.shard_map(shard, mesh=mesh, in_specs=in_specs, out_specs=out_specs)(
      q, k, v, s, g, initial_state, segment_ids)
