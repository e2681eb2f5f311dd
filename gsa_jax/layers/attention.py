"""Causal softmax attention with RoPE and grouped kv heads, for the attention layers of hybrid models and the
Transformer baseline of the decoding benchmark. Same packed-row semantics as the GSA layer (layers/common.py)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gsa_jax.layers.common import (apply_rope, check_layer_input, fan_in_init, logical_axes, next_positions,
                                   token_layout)
from gsa_jax.layers.fused_attention import ATTENTION_IMPLEMENTATIONS, causal_attention


class KVCache(NamedTuple):
  """Decode cache of one attention layer, sized to the longest sequence it will hold.

  k, v: [b, max_len, h, dh] in the compute dtype (k after RoPE).
  mask: [b, max_len] bool, True for the entries the next token may read (its document's non-padding tokens).
  pos: [b] int32, RoPE position of the next token.  index: [] int32, the slot the next token is written to.
  """

  k: jax.Array
  v: jax.Array
  mask: jax.Array
  pos: jax.Array
  index: jax.Array


class CausalSelfAttention(nnx.Module):
  """Multi-head causal softmax attention: x [b, t, d] -> y [b, t, d]; head width d / num_heads, no biases.

  implementation: how the sequence form attends (`gsa_jax.layers.fused_attention`: "auto" = the fused kernel of the
  platform, "xla" = the explicit-mask reference). The decode step always reads its cache with XLA.
  """

  def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None, *,
               rope_theta: float = 10000.0, implementation: str = "auto", out_init=fan_in_init, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads <= 0 or hidden_size % num_heads:
      raise ValueError(f"num_heads: hidden_size={hidden_size} must be a positive multiple of num_heads={num_heads}.")
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
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
    b, t, _ = x.shape
    layout = token_layout(segment_ids, b, t)
    q, k, v = self._qkv(x, layout.positions)
    o = causal_attention(q, k, v, layout, self.implementation, packed=segment_ids is not None)
    return self.o_proj(o.reshape(b, t, -1)), layout, k, v

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """x [b, t, d], segment_ids None or int [b, t] (0 = padding) -> y [b, t, d] (0 at padding)."""
    check_layer_input(x, self.q_proj.in_features, 3)
    return self._sequence(x, segment_ids)[0]

  def prefill(self, x: jax.Array, segment_ids: jax.Array | None = None, *,
              max_len: int) -> tuple[jax.Array, KVCache]:
    """The sequence form plus a cache of `max_len` slots holding this prompt's keys and values."""
    check_layer_input(x, self.q_proj.in_features, 3)
    b, t, _ = x.shape
    if max_len < t:
      raise ValueError(f"max_len={max_len} must be at least the prompt length {t}.")
    y, layout, k, v = self._sequence(x, segment_ids)
    pad = ((0, 0), (0, max_len - t), (0, 0), (0, 0))
    last = jnp.max(jnp.where(layout.valid, jnp.arange(t), -1), axis=1)
    last_doc = jnp.take_along_axis(layout.doc, jnp.maximum(last, 0)[:, None], axis=1)
    mask = jnp.pad(layout.valid & (layout.doc == last_doc), ((0, 0), (0, max_len - t)))
    cache = KVCache(k=jnp.pad(k, pad), v=jnp.pad(v, pad), mask=mask, pos=next_positions(layout),
                    index=jnp.asarray(t, jnp.int32))
    return y, cache

  def step(self, x: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """One token per row: x [b, d] -> (y [b, d], new cache). The cache must have a free slot."""
    check_layer_input(x, self.q_proj.in_features, 2)
    b = x.shape[0]
    q, k, v = self._qkv(x[:, None], cache.pos[:, None])  # [b, 1, heads, dh]
    zero = jnp.zeros((), jnp.int32)
    kc = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (zero, cache.index, zero, zero))
    vc = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (zero, cache.index, zero, zero))
    mask = jax.lax.dynamic_update_slice(cache.mask, jnp.ones((b, 1), bool), (zero, cache.index))
    o = jax.nn.dot_product_attention(q, kc.astype(q.dtype), vc.astype(q.dtype), mask=mask[:, None, None, :],
                                     implementation=None)
    y = self.o_proj(o.reshape(b, -1))
    return y, KVCache(k=kc, v=vc, mask=mask, pos=cache.pos + 1, index=cache.index + 1)

  def init_cache(self, batch_size: int, max_len: int) -> KVCache:
    """The cache of an empty prompt."""
    dtype = self.dtype or jnp.float32
    shape = (batch_size, max_len, self.num_kv_heads, self.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), mask=jnp.zeros((batch_size, max_len), bool),
                   pos=jnp.zeros((batch_size,), jnp.int32), index=jnp.zeros((), jnp.int32))
