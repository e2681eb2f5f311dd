"""The chunked form of GSA (spec section 2) in plain `jax.numpy`: exact, differentiable, the kernels' oracle.

Every chunk materializes its full decay tensor exp(G_t - G_j) [c, c, m] with the upper triangle (and pairs
from different documents) masked to -inf *before* the exponential, so every exponent that is evaluated is <= 0
and nothing overflows for any g in (-inf, 0]. This costs O(c^2 m) memory per chunk: the form is built to be
obviously right, not fast; the Pallas kernels are the fast path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gsa_jax.ops.common import DEFAULT_CHUNK_SIZE, GSAState, accumulation_dtype, segment_masks, to_varying, varying_axes

_HIGHEST = jax.lax.Precision.HIGHEST


def _einsum(spec, *xs):
  return jnp.einsum(spec, *xs, precision=_HIGHEST)


def _scan_states(h0: jax.Array, decay: jax.Array, update: jax.Array, decay_axis: int):
  """Chains chunk states: h_{n+1} = h_n * decay_n (broadcast along the non-slot axis) + update_n.

  h0: [b, h, x, y]; decay: [b, n, h, m]; update: [b, n, h, x, y]; decay_axis: the slot axis of h (2 or 3).
  Returns the state entering every chunk, [b, n, h, x, y], and the final state.
  """

  def step(h_in, xs):
    d, u = xs
    d = jnp.expand_dims(d, 5 - decay_axis)
    return h_in * d + u, h_in

  h_final, h_in = jax.lax.scan(step, h0, (jnp.moveaxis(decay, 1, 0), jnp.moveaxis(update, 1, 0)))
  return jnp.moveaxis(h_in, 0, 1), h_final


def chunk_gsa(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    s: jax.Array,
    g: jax.Array,
    *,
    scale: float,
    initial_state: GSAState | None = None,
    segment_ids: jax.Array | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[jax.Array, GSAState]:
  """GSA in chunks of `chunk_size`. Arguments as in `gated_slot_attention` (already validated).

  q [b, t, hq, dk]; k [b, t, h, dk]; v [b, t, h, dv]; s, g [b, t, h, m].
  Returns o [b, t, hq, dv] in q's dtype and the final state in the accumulation dtype.
  """
  b, t, hq, dk = q.shape
  h, dv, m = k.shape[2], v.shape[3], s.shape[3]
  grp, c = hq // h, chunk_size
  n = -(-t // c)
  acc = accumulation_dtype(q.dtype, k.dtype, v.dtype, s.dtype, g.dtype)
  out_dtype = q.dtype

  if segment_ids is None:
    reset = jnp.zeros((b, t), bool)
    valid = jnp.ones((b, t), bool)
  else:
    reset, valid = segment_masks(segment_ids)
  q, k, v, s, g = (x.astype(acc) for x in (q, k, v, s, g))
  # Padding (and the tail that fills the last chunk) writes nothing and decays nothing.
  s = jnp.where(valid[..., None, None], s, 0)
  g = jnp.where(valid[..., None, None], g, 0)

  def to_chunks(x):
    x = jnp.pad(x, [(0, 0), (0, n * c - t)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(b, n, c, *x.shape[2:])

  q = to_chunks(q).reshape(b, n, c, h, grp, dk)
  k, v, s, g, reset = map(to_chunks, (k, v, s, g, reset))

  # Document index of every token; a token may read the state entering its chunk only if it is in the same
  # document, and only the last document of a chunk reaches the state leaving it.
  doc = jnp.cumsum(reset.reshape(b, n * c), axis=1, dtype=jnp.int32).reshape(b, n, c)
  doc_in = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), doc[:, :-1, -1]], axis=1)  # [b, n]
  reads_state = doc == doc_in[:, :, None]  # [b, n, c]
  carries_state = doc[:, :, -1] == doc_in  # [b, n]
  reaches_end = doc == doc[:, :, -1:]  # [b, n, c]
  causal = jnp.tril(jnp.ones((c, c), bool))
  pair = causal & (doc[:, :, :, None] == doc[:, :, None, :])  # [b, n, t, j]

  gcum = jnp.cumsum(g, axis=2)  # [b, n, c, h, m]
  g_last = gcum[:, :, -1]  # [b, n, h, m]
  # G_t - G_j = sum of g_i for j < i <= t, summed directly rather than subtracted: all terms share a sign, so
  # the result is accurate relative to itself even when G_t and G_j are both huge (g = -1e3 next to g = 0).
  # Row t holds g_i for i <= t; a reverse cumulative sum along i then gives sum_{i >= j'} at column j'.
  idx = jnp.arange(c)
  upto_t = (idx[None, :] <= idx[:, None])[None, None, :, :, None, None]  # [1, 1, t, i, 1, 1]
  tail = jax.lax.cumsum(jnp.where(upto_t, g[:, :, None], 0), axis=3, reverse=True)  # [b, n, t, j', h, m]
  diff = jnp.pad(tail[:, :, :, 1:], [(0, 0)] * 3 + [(0, 1), (0, 0), (0, 0)])  # column j reads j' = j + 1
  decay_tj = jnp.exp(jnp.where(pair[..., None, None], diff, -jnp.inf))
  decay_in = jnp.exp(gcum) * reads_state[..., None, None]  # state entering the chunk -> token t
  decay_out = jnp.exp(diff[:, :, -1]) * reaches_end[..., None, None]  # token j -> chunk end
  decay_chunk = jnp.exp(g_last) * carries_state[..., None, None]  # whole chunk, [b, n, h, m]

  if initial_state is None:
    hk0 = jnp.zeros((b, h, dk, m), acc)
    hv0 = jnp.zeros((b, h, m, dv), acc)
  else:
    hk0, hv0 = (x.astype(acc) for x in initial_state)
  axes = varying_axes(q, k, v, s, g)  # the scan carries must vary over the mesh axes their updates do
  hk0, hv0 = to_varying(hk0, axes), to_varying(hv0, axes)

  # Pass 1: key memory hk [dk, m], slot logits; the gate acts on the slot (value) side.
  qk = _einsum("bntHgk,bnjHk->bnHgtj", q, k)
  logits = _einsum("bnhgtj,bnjhm,bntjhm->bnthgm", qk, s, decay_tj)
  hk_in, hk_final = _scan_states(hk0, decay_chunk, _einsum("bnjhk,bnjhm->bnhkm", k, s * decay_out), 3)
  logits += _einsum("bnthgk,bnhkm->bnthgm", q, hk_in) * decay_in[:, :, :, :, None, :]
  p = jax.nn.softmax(scale * logits, axis=-1)

  # Pass 2: value memory hv [m, dv]; p is the query and s the key, the gate acts on the slot (key) side.
  ps = _einsum("bnthgm,bnjhm,bntjhm->bnhgtj", p, s, decay_tj)
  o = _einsum("bnhgtj,bnjhv->bnthgv", ps, v)
  hv_in, hv_final = _scan_states(hv0, decay_chunk, _einsum("bnjhm,bnjhv->bnhmv", s * decay_out, v), 2)
  o += _einsum("bnthgm,bnhmv->bnthgv", p * decay_in[:, :, :, :, None, :], hv_in)

  o = o.reshape(b, n * c, hq, dv)[:, :t] * valid[..., None, None]
  return o.astype(out_dtype), GSAState(hk_final, hv_final)
