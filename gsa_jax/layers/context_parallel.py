"""The layers with each row's T split over the mesh axis "sequence" (context parallelism; docs/context_parallel.md).

When the current mesh (`jax.set_mesh`, the trainer's, or a `shard_map` manual over it) has an axis named
"sequence" of more than one device, the layers run on each device's contiguous slice of T, in a `shard_map` that
is manual over that axis only (the other axes keep splitting rows, heads and parameters as before):
- GSA layers pass on the GSA state (`gsa_jax.ops.context_parallel_gsa`) and, per row, what a cache would hold
  besides it (a `ShardCarry`: the short convolutions' last `w - 1` inputs, the RoPE position and the segment id
  of the document in progress, and ABC's running normalizer). Every device gathers all shards' carries and folds
  them in order, exactly as a prefill in pieces continues each piece's cache, so a document crossing a boundary
  continues (across any number of shards, padding included) and one starting exactly at a boundary takes nothing.
- Attention layers gather every shard's keys and values (and the row's segment ids) and attend to them from
  their own queries.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec as P

from gsa_jax.layers.common import (TokenLayout, carry_tail, last_doc_continues, last_token_taps, next_positions,
                                   next_segment_id)
from gsa_jax.ops.abc import NO_PAST
from gsa_jax.ops.common import to_varying, varying_axes

SEQUENCE_AXIS = "sequence"


def sequence_axis(t: int) -> str | None:
  """The mesh axis that splits T here: "sequence" when the current mesh has it with more than one device, else None.

  t: the sequence length the layer sees (the whole row's, or the device's slice inside a shard_map over the axis).
  Raises ValueError when the axis does not divide a whole row's t.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or SEQUENCE_AXIS not in mesh.axis_names or mesh.shape[SEQUENCE_AXIS] == 1:
    return None
  n = mesh.shape[SEQUENCE_AXIS]
  if dict(zip(mesh.axis_names, mesh.axis_types))[SEQUENCE_AXIS] == AxisType.Explicit:
    raise ValueError(f"mesh axis {SEQUENCE_AXIS!r} is Explicit; the layers split T over it on an Auto mesh "
                     f"(jax.make_mesh(..., axis_types=(AxisType.Auto, ...))) or inside a jax.shard_map over it.")
  if SEQUENCE_AXIS not in mesh.manual_axes and t % n:
    raise ValueError(f"x has T = {t} tokens, which the {n} devices of mesh axis {SEQUENCE_AXIS!r} do not divide; "
                     f"pad T to a multiple of {n} (padding with segment id 0 changes nothing).")
  return SEQUENCE_AXIS


def per_shard(fn, axis: str, in_specs, out_specs):
  """`fn` run on each device's slice: a shard_map manual over `axis` only, or `fn` itself inside a shard_map that
  already is. Inputs given as P() (replicated: parameters, caches) enter `fn` typed as varying over `axis`."""
  if axis in jax.sharding.get_abstract_mesh().manual_axes:
    return fn

  def body(*args):
    # The gradient of a replicated input is summed over `axis` where the input first meets the shard's tokens.
    # Marking it varying here puts that sum on the input as given (float32 parameters); left to JAX it lands after
    # the cast to the compute dtype: a bfloat16 all-reduce, less exact, and one that XLA:CPU (jax 0.11.2) aborts
    # on while promoting it to float32 ("Invalid binary instruction opcode copy").
    return fn(*(jax.tree.map(lambda x: jax.lax.pcast(x, (axis,), to="varying"), a) if spec == P() else a
                for a, spec in zip(args, in_specs)))

  return jax.shard_map(body, in_specs=in_specs, out_specs=out_specs, axis_names={axis})


def row_spec(axis: str) -> P:
  """[b, t, ...] with t split over `axis` (and rows, features left as the other mesh axes have them)."""
  return P(None, axis)


def from_last_shard(tree, axis: str):
  """Values every shard of `axis` computed alike (from gathered data), typed invariant over it: the last shard's
  copy, summed."""
  last = jax.lax.axis_index(axis) == jax.lax.axis_size(axis) - 1
  return jax.tree.map(lambda x: jax.lax.psum(jnp.where(last, x, jnp.zeros_like(x)), axis), tree)


def gather_time(x: jax.Array, axis: str) -> jax.Array:
  """Every shard's x [b, t, ...] joined along time: [b, n t, ...] (the whole row), on every device."""
  return jax.lax.all_gather(x, axis, axis=1, tiled=True)


# ---------------------------------------------------------------------------------------------------------------
# GSA layers: the carry of the short convolutions and RoPE across shards.


class ShardCarry(NamedTuple):
  """What a row's tokens leave to the tokens after them, besides the GSA state (a GSACache without its state).

  conv: None, or the short convolutions' last inputs (q [b, w-1, hq*dk], k [b, w-1, h*dk], v [b, w-1, h*dv]).
  pos: [b] int32, the RoPE position of the next token.  segment_id: [b] int32, the document in progress (0: any).
  log_normalizer: None, or ABC's log Z of the document in progress [b, h, m] float32 (`gsa_jax.ops.abc.NO_PAST`:
  none).
  """

  conv: tuple[jax.Array, ...] | None
  pos: jax.Array
  segment_id: jax.Array
  log_normalizer: jax.Array | None = None


class ShardPiece(NamedTuple):
  """One shard as a piece of its row.

  carry: the ShardCarry the shard leaves from an empty past.  first_id: [b] int32, the id of its first
  non-padding token (0: none, or plain rows: it continues whatever came before).  continues: [b] bool, its last
  document is its first (or it has no tokens): that document continues the carry it receives.  count: [b] int32,
  the entries of carry.conv that are its own tokens (at most w - 1).
  """

  carry: ShardCarry
  first_id: jax.Array
  continues: jax.Array
  count: jax.Array


def shard_piece(layout: TokenLayout, segment_ids: jax.Array | None, convs, conv_in,
                log_normalizer: jax.Array | None = None) -> ShardPiece:
  """The ShardPiece of a shard: layout and segment_ids [b, t] of its tokens, convs the ShortConvolutions (or None)
  and conv_in their inputs [b, t, d_i]; log_normalizer: ABC's log Z after the shard's tokens from an empty past
  (None: not ABC)."""
  b = layout.valid.shape[0]
  conv = count = None
  if convs is not None:
    conv = tuple(c.tail(a, layout) for c, a in zip(convs, conv_in))
    count = jnp.sum(last_token_taps(layout, convs[0].width - 1)[1], axis=1, dtype=jnp.int32)
  if segment_ids is None:
    first_id = jnp.zeros((b,), jnp.int32)
  else:
    first = jnp.take_along_axis(segment_ids, jnp.argmax(layout.valid, axis=1)[:, None], axis=1)[:, 0]
    first_id = jnp.where(jnp.any(layout.valid, axis=1), first, 0).astype(jnp.int32)
  carry = ShardCarry(conv, next_positions(layout), next_segment_id(None, segment_ids, b), log_normalizer)
  return ShardPiece(carry, first_id, last_doc_continues(layout), jnp.zeros((b,), jnp.int32) if count is None else count)


def fold_carries(start: ShardCarry, pieces: ShardPiece) -> tuple[ShardCarry, ShardCarry]:
  """The carry entering every shard and the one after the last, from `start` (what came before the row) and all
  shards' pieces (a leading shard axis n on every leaf, in sequence order). A shard whose first document has
  another id than the carry's is given an empty past (as `continued_cache`)."""

  def step(carry: ShardCarry, piece: ShardPiece):
    keep = (carry.segment_id == 0) | (piece.first_id == 0) | (piece.first_id == carry.segment_id)
    zero_other = lambda a: jnp.where(keep.reshape((-1,) + (1,) * (a.ndim - 1)), a, jnp.zeros_like(a))
    z = carry.log_normalizer
    if z is not None:  # an empty past is NO_PAST, not 0
      z = jnp.where(keep[:, None, None], z, NO_PAST)
    entering = ShardCarry(jax.tree.map(zero_other, carry.conv), zero_other(carry.pos), carry.segment_id, z)
    conv = None
    if entering.conv is not None:
      conv = tuple(carry_tail(prev, new, piece.count, piece.continues)
                   for prev, new in zip(entering.conv, piece.carry.conv))
    pos = piece.carry.pos + jnp.where(piece.continues, entering.pos, 0)
    segment_id = jnp.where(piece.carry.segment_id > 0, piece.carry.segment_id, entering.segment_id)
    if z is not None:  # the shard's last document sums onto the past when it is its first
      z = jnp.where(piece.continues[:, None, None], jnp.logaddexp(z, piece.carry.log_normalizer),
                    piece.carry.log_normalizer)
    return ShardCarry(conv, pos, segment_id, z), entering

  axes = varying_axes(*jax.tree.leaves(pieces))  # the scan carry must vary over the axes its updates do
  start = jax.tree.map(lambda x: to_varying(x, axes), start)
  final, entering = jax.lax.scan(step, start, pieces)
  return entering, final


def carry_across_shards(start: ShardCarry | None, layout: TokenLayout, segment_ids: jax.Array | None, convs,
                        conv_in, axis: str, log_normalizer: jax.Array | None = None) -> tuple[ShardCarry, ShardCarry]:
  """Inside a shard_map over `axis`: the carry entering this shard and the one after the whole row (the same on
  every shard), from what came before the row (`start`; None: nothing) and every shard's piece (one all_gather).

  layout, segment_ids [b, t], conv_in, log_normalizer: this shard's (see shard_piece).
  """
  piece = shard_piece(layout, segment_ids, convs, conv_in, log_normalizer)
  if start is None:
    z = None if log_normalizer is None else jnp.full_like(log_normalizer, NO_PAST)
    start = ShardCarry(jax.tree.map(jnp.zeros_like, piece.carry.conv), jnp.zeros_like(piece.carry.pos),
                       jnp.zeros_like(piece.carry.segment_id), z)
  # Floating leaves (the convolution tails) travel as float32: their gradient is a reduce-scatter over the axis,
  # which in bfloat16 XLA:CPU (jax 0.11.2) aborts on while promoting it ("Invalid binary instruction opcode copy").
  # They are w - 1 tokens a row, so the wider gather costs nothing.
  wide = lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x
  gathered = jax.tree.map(lambda g, x: g.astype(x.dtype), jax.lax.all_gather(jax.tree.map(wide, piece), axis), piece)
  entering, final = fold_carries(start, gathered)
  index = jax.lax.axis_index(axis)
  return jax.tree.map(lambda x: x[index], entering), final
