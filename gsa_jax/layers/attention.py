"""Causal softmax attention with RoPE and grouped kv heads, for the attention layers of hybrid models and the
Transformer baseline of the decoding benchmark. Same packed-row semantics as the GSA layer (layers/common.py)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from gsa_jax.layers.common import (apply_rope, as_matrix_rows, check_cache, check_compute_dtype, check_layer_input,
                                   check_segment_ids, check_sizes, fan_in_init, first_doc_continues,
                                   last_doc_continues, logical_axes, next_positions, next_segment_id, token_layout)
from gsa_jax.layers.context_parallel import gather_time, per_shard, row_spec, sequence_axis
from gsa_jax.layers.fused_attention import ATTENTION_IMPLEMENTATIONS, causal_attention, reference_mask
from gsa_jax.ops.common import as_segment_ids


class KVCache(NamedTuple):
  """Decode cache of one attention layer, sized to the longest sequence it will hold.

  k, v: [b, max_len, h, dh] in the compute dtype (k after RoPE).
  mask: [b, max_len] bool, True for the entries the next token may read (its document's non-padding tokens).
  pos: [b] int32, RoPE position of the next token.  index: [] int32, the slot the next token is written to.
  segment_id: [b] int32, the segment id of the document the cache ends in; 0: any (plain rows, an empty past).
    A prefill from this cache continues it only where its first document has this id (or either id is 0).
  """

  k: jax.Array
  v: jax.Array
  mask: jax.Array
  pos: jax.Array
  index: jax.Array
  segment_id: jax.Array


def continued_kv_cache(cache: KVCache, segment_ids: jax.Array | None) -> KVCache:
  """The part of `cache` a piece with `segment_ids [b, t]` continues: rows whose first document has another id
  than the cache's last one read none of its entries and start at position 0 (as the GSA layer's
  `continued_cache`)."""
  keep = first_doc_continues(cache.segment_id, segment_ids)
  if keep is None:
    return cache
  return cache._replace(mask=cache.mask & keep[:, None], pos=jnp.where(keep, cache.pos, 0))


def grown_kv_cache(cache: KVCache, max_len: int) -> KVCache:
  """`cache` with max_len slots when it has fewer (the new ones empty); never smaller."""
  extra = max_len - cache.k.shape[1]
  if extra <= 0:
    return cache
  time = lambda a: jnp.pad(a, ((0, 0), (0, extra)) + ((0, 0),) * (a.ndim - 2))
  return cache._replace(k=time(cache.k), v=time(cache.v), mask=time(cache.mask))


def check_room(cache: KVCache, t: int) -> None:
  """ValueError when a piece of t tokens does not fit behind the cache's entries. Checked only when the index is
  concrete (not under jit, where XLA would clamp a write past the end)."""
  if isinstance(cache.index, jax.core.Tracer):
    return
  max_len, index = cache.k.shape[1], int(cache.index)
  if index + t > max_len:
    raise ValueError(f"max_len: the KV cache has max_len={max_len} slots and holds {index} tokens; {t} more need "
                     f"max_len >= {index + t} (pass a larger max_len).")


def _last_doc_mask(layout) -> jax.Array:
  """[b, t] bool: the non-padding tokens of each row's last document (what a next token may read)."""
  return layout.valid & (layout.doc == layout.doc[:, -1:])


class CausalSelfAttention(nnx.Module):
  """Multi-head causal softmax attention: x [b, t, d] -> y [b, t, d]; head width d / num_heads, no biases.

  implementation: how the sequence form attends (`gsa_jax.layers.fused_attention`: "auto" = the fused kernel of the
  platform, "xla" = the explicit-mask reference). The decode step always reads its cache with XLA.
  """

  def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None, *,
               rope_theta: float = 10000.0, implementation: str = "auto", out_init=fan_in_init, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    check_sizes(hidden_size=hidden_size, num_heads=num_heads, num_kv_heads=num_kv_heads)
    check_compute_dtype(dtype)
    if not rope_theta > 0:
      raise ValueError(f"rope_theta: must be positive; got {rope_theta}.")
    if hidden_size % num_heads:
      raise ValueError(f"num_heads: hidden_size={hidden_size} must be a positive multiple of num_heads={num_heads}.")
    if num_heads % num_kv_heads:
      raise ValueError(f"num_kv_heads: must be a positive divisor of num_heads={num_heads}; got {num_kv_heads}.")
    if implementation not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"implementation: {implementation!r} is unknown; expected one of {ATTENTION_IMPLEMENTATIONS}.")
    dh = hidden_size // num_heads
    if dh % 2:
      raise ValueError(f"num_heads: RoPE needs an even head width; hidden_size / num_heads = {dh}.")
    self.num_heads, self.num_kv_heads, self.head_dim, self.rope_theta = num_heads, num_kv_heads, dh, rope_theta
    self.dtype, self.implementation = dtype, implementation
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    proj = dict(kernel_init=fan_in_init, kernel_metadata=logical_axes("embed", "heads"), **kw)
    self.q_proj = nnx.Linear(hidden_size, num_heads * dh, **proj)
    self.k_proj = nnx.Linear(hidden_size, num_kv_heads * dh, **proj)
    self.v_proj = nnx.Linear(hidden_size, num_kv_heads * dh, **proj)
    self.o_proj = nnx.Linear(num_heads * dh, hidden_size, kernel_init=out_init,
                             kernel_metadata=logical_axes("heads", "embed"), **kw)

  def _qkv(self, x, positions):
    """x [b, t, d], positions [b, t] -> q [b, t, hq, dh], k, v [b, t, h, dh] (RoPE applied to q, k)."""
    lead = x.shape[:-1]
    q = self.q_proj(x).reshape(lead + (self.num_heads, self.head_dim))
    k = self.k_proj(x).reshape(lead + (self.num_kv_heads, self.head_dim))
    v = self.v_proj(x).reshape(lead + (self.num_kv_heads, self.head_dim))
    return apply_rope(q, positions, self.rope_theta), apply_rope(k, positions, self.rope_theta), v

  def _sequence(self, x, segment_ids):
    """x [b, t, d] -> (y [b, t, d], the rows' TokenLayout, k, v [b, t, h, dh]). Under a mesh with a "sequence"
    axis each device attends from its slice of T to the keys of the whole row (`_shard`)."""
    b, t, _ = x.shape
    layout = token_layout(segment_ids, b, t)
    axis = sequence_axis(t)
    if axis is not None:
      graphdef, variables = nnx.split(self)
      shard = lambda variables, x, segment_ids: nnx.merge(graphdef, variables)._shard(x, segment_ids, axis)
      row = row_spec(axis)
      y, k, v = per_shard(shard, axis, in_specs=(P(), row, None if segment_ids is None else row),
                          out_specs=(row, row, row))(variables, x, segment_ids)
      return y, layout, k, v
    q, k, v = self._qkv(x, layout.positions)
    o = causal_attention(q, k, v, layout, self.implementation, packed=segment_ids is not None)
    return self.o_proj(o.reshape(b, t, -1)), layout, k, v

  def _shard(self, x, segment_ids, axis):
    """The sequence form on this device's slice x [b, t, d] of rows split over the mesh axis `axis` (inside a
    shard_map over it): the row's keys, values and segment ids are gathered from every shard ([b, n t, h, dh]
    each) and the slice's queries attend to them with an explicit mask through XLA ([b, hq, t, n t] scores).
    Returns (y, k, v), this slice's."""
    b, t, _ = x.shape
    start = jax.lax.axis_index(axis) * t
    whole = token_layout(None if segment_ids is None else gather_time(segment_ids, axis), b,
                         t * jax.lax.axis_size(axis))
    mine = lambda a: jax.lax.dynamic_slice_in_dim(a, start, t, axis=1)
    q, k, v = self._qkv(x, mine(whole.positions))
    # reference_mask's rows of this slice: the key is not after the query, in its document, not padding.
    causal = jnp.arange(whole.valid.shape[1])[None, None, :] <= (start + jnp.arange(t))[None, :, None]
    mask = causal & (mine(whole.doc)[:, :, None] == whole.doc[:, None, :]) & whole.valid[:, None, :]
    o = jax.nn.dot_product_attention(q, gather_time(k, axis), gather_time(v, axis), mask=mask[:, None],
                                     implementation="xla")
    o = o * mine(whole.valid)[:, :, None, None].astype(o.dtype)  # padding queries read nothing
    return self.o_proj(o.reshape(b, t, -1)), k, v

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """x [b, t, d], segment_ids None or int [b, t] (0 = padding) -> y [b, t, d] (0 at padding)."""
    check_layer_input(x, self.q_proj.in_features, 3)
    check_segment_ids(segment_ids, *x.shape[:2])
    return self._sequence(x, segment_ids)[0]

  def prefill(self, x: jax.Array, segment_ids: jax.Array | None = None, cache: KVCache | None = None, *,
              max_len: int | None = None) -> tuple[jax.Array, KVCache]:
    """The sequence form plus the cache to continue each row's last document with `step` or another `prefill`.

    max_len: the slots of the returned cache (this piece, what came before, the tokens to come). Required without
      `cache`; with one, None keeps its size and a larger max_len grows it.
    cache: None (an empty past), or the cache of the tokens before x (`init_cache`, `prefill`, `step`): x's keys
      and values are written from its index on; each row's first document continues it (reads its entries, RoPE
      positions go on from its position), a later document of the row starts fresh, as in
      GatedSlotAttention.prefill. So a prompt prefilled in pieces of any sizes gives the outputs and the cache of
      the prompt prefilled at once. The cache must have room for the t tokens (index + t <= max_len; ValueError
      otherwise, checked where the index is concrete, i.e. not under jit).
    Without a cache the sequence form runs `implementation` (a fused kernel where there is one); with a cache the
    queries attend over the cache's max_len slots and the t new tokens with an explicit mask through XLA
    ([b, t, max_len + t] scores).
    """
    check_layer_input(x, self.q_proj.in_features, 3)
    check_segment_ids(segment_ids, *x.shape[:2])
    segment_ids = None if segment_ids is None else as_segment_ids(segment_ids)
    b, t, _ = x.shape
    if cache is None:
      if max_len is None:
        raise ValueError("max_len: prefill without a cache needs max_len, the tokens the new cache holds.")
      if max_len < t:
        raise ValueError(f"max_len={max_len} must be at least the prompt length {t}.")
      y, layout, k, v = self._sequence(x, segment_ids)
      return y, self._next_cache(self.init_cache(b, max_len, k.dtype), layout, k, v, segment_ids)
    self._check_cache(cache, b)
    cache = grown_kv_cache(cache, max_len or 0)
    check_room(cache, t)
    return self._continue(x, segment_ids, continued_kv_cache(cache, segment_ids))

  def _continue(self, x, segment_ids, cache):
    """The sequence form of x [b, t, d] after `cache` (already continued_kv_cache): explicit mask over [cache + x]."""
    b, t, _ = x.shape
    layout = token_layout(segment_ids, b, t)
    first_doc = layout.doc <= 1  # (0: padding before the row's first token, whose output is zeroed)
    q, k, v = self._qkv(x, layout.positions + jnp.where(first_doc, cache.pos[:, None], 0))
    k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)  # as the cache holds them (and `step` reads them)
    mask = jnp.concatenate([cache.mask[:, None, :] & first_doc[:, :, None], reference_mask(layout)], axis=2)
    read = lambda cached, new: jnp.concatenate([cached, new], axis=1).astype(q.dtype)
    o = jax.nn.dot_product_attention(q, read(cache.k, k), read(cache.v, v), mask=mask[:, None],
                                     implementation="xla")
    o = o * layout.valid[:, :, None, None].astype(o.dtype)  # padding queries read nothing
    y = self.o_proj(o.reshape(b, t, -1))
    # Under jit a piece that does not fit (check_room cannot see the index) would be written clamped over earlier
    # entries: NaN instead of a wrong output.
    y = jnp.where(cache.index + t <= cache.k.shape[1], y, jnp.nan)
    return y, self._next_cache(cache, layout, k, v, segment_ids)

  def _next_cache(self, cache, layout, k, v, segment_ids) -> KVCache:
    """`cache` (continued_kv_cache, or empty) with a piece's k, v [b, t, h, dh] written at its index; its mask,
    position and segment id moved to each row's last document (which continues the cache's where it is the
    piece's first)."""
    t = k.shape[1]
    zero = jnp.zeros((), jnp.int32)
    write = lambda a, new, *rest: jax.lax.dynamic_update_slice(a, new.astype(a.dtype), (zero, cache.index) + rest)
    goes_on = last_doc_continues(layout)
    pos = next_positions(layout) + jnp.where(goes_on, cache.pos, 0)
    return KVCache(k=write(cache.k, k, zero, zero), v=write(cache.v, v, zero, zero),
                   mask=write(cache.mask & goes_on[:, None], _last_doc_mask(layout)), pos=pos,
                   index=cache.index + t,
                   segment_id=next_segment_id(cache.segment_id, segment_ids, pos.shape[0]))

  def _check_cache(self, cache, batch: int) -> None:
    length = cache.k.shape[1] if isinstance(cache, KVCache) else 1  # any max_len
    check_cache(cache, jax.eval_shape(lambda: self.init_cache(batch, length)), "CausalSelfAttention", batch)

  def step(self, x: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """One token per row: x [b, d] -> (y [b, d], new cache). The cache must have a free slot: a full one raises
    ValueError where its index is concrete, and under jit (where a write past the end would be clamped onto the
    last slot) the step returns NaN instead of a wrong output."""
    check_layer_input(x, self.q_proj.in_features, 2)
    self._check_cache(cache, x.shape[0])
    check_room(cache, 1)
    b = x.shape[0]
    q, k, v = (a[:b] for a in self._qkv(as_matrix_rows(x)[:, None], as_matrix_rows(cache.pos)[:, None]))
    zero = jnp.zeros((), jnp.int32)
    kc = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (zero, cache.index, zero, zero))
    vc = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (zero, cache.index, zero, zero))
    mask = jax.lax.dynamic_update_slice(cache.mask, jnp.ones((b, 1), bool), (zero, cache.index))
    o = jax.nn.dot_product_attention(q, kc.astype(q.dtype), vc.astype(q.dtype), mask=mask[:, None, None, :],
                                     implementation=None)
    y = self.o_proj(as_matrix_rows(o.reshape(b, -1)))[:b]
    y = jnp.where(cache.index < cache.k.shape[1], y, jnp.nan)
    return y, cache._replace(k=kc, v=vc, mask=mask, pos=cache.pos + 1, index=cache.index + 1)

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
    """The cache of an empty prompt; k, v in `dtype` (default: the layer's dtype, else float32)."""
    dtype = dtype or self.dtype or jnp.float32
    shape = (batch_size, max_len, self.num_kv_heads, self.head_dim)
    zeros = jnp.zeros((batch_size,), jnp.int32)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), mask=jnp.zeros((batch_size, max_len), bool),
                   pos=zeros, index=jnp.zeros((), jnp.int32), segment_id=zeros)
