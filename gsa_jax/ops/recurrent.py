"""The exact step-by-step GSA recurrence (spec section 1): the ground truth and the decoding path."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gsa_jax.ops.common import GSAState, accumulation_dtype, segment_masks, to_varying, varying_axes


def gsa_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    s: jax.Array,
    g: jax.Array,
    state: GSAState,
    *,
    scale: float,
) -> tuple[jax.Array, GSAState]:
  """One token of GSA for a whole batch; the state keeps its dtype.

  Args:
    q: [b, hq, dk]; k: [b, h, dk]; v: [b, h, dv]; s, g: [b, h, m] (g <= 0, log forget gate).
    state: hk [b, h, dk, m], hv [b, h, m, dv].
    scale: multiplies the slot logits.

  Returns:
    o [b, hq, dv] in the state's dtype, and the new state.
  """
  acc = state.hk.dtype
  b, hq, dk = q.shape
  h = k.shape[1]
  q, k, v, s, g = (x.astype(acc) for x in (q, k, v, s, g))
  alpha = jnp.exp(g)
  hk = state.hk * alpha[:, :, None, :] + k[:, :, :, None] * s[:, :, None, :]
  hv = state.hv * alpha[:, :, :, None] + s[:, :, :, None] * v[:, :, None, :]
  # Grouped heads: query head hq reads kv head hq // (hq_total // h); reshape instead of repeating the state.
  qg = q.reshape(b, h, hq // h, dk)
  # Full float32 products: this is the reference, and TF32 (a GPU's default for float32) would blur it.
  logits = scale * jnp.einsum("bhgk,bhkm->bhgm", qg, hk, precision=jax.lax.Precision.HIGHEST)
  p = jax.nn.softmax(logits, axis=-1)
  o = jnp.einsum("bhgm,bhmv->bhgv", p, hv, precision=jax.lax.Precision.HIGHEST)
  return o.reshape(b, hq, -1), GSAState(hk, hv)


def zero_state(b: int, h: int, dk: int, dv: int, m: int, dtype=jnp.float32) -> GSAState:
  return GSAState(jnp.zeros((b, h, dk, m), dtype), jnp.zeros((b, h, m, dv), dtype))


def recurrent_gsa(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    s: jax.Array,
    g: jax.Array,
    *,
    scale: float,
    initial_state: GSAState | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, GSAState]:
  """GSA as a `lax.scan` over time. Arguments as in `gated_slot_attention` (already validated).

  q [b, t, hq, dk]; k [b, t, h, dk]; v [b, t, h, dv]; s, g [b, t, h, m].
  Returns o [b, t, hq, dv] in q's dtype and the final state in the accumulation dtype (float32, or float64 for
  float64 inputs).
  """
  b, t, hq, dk = q.shape
  h, dv, m = k.shape[2], v.shape[3], s.shape[3]
  acc = accumulation_dtype(q.dtype, k.dtype, v.dtype, s.dtype, g.dtype)
  if initial_state is None:
    state = zero_state(b, h, dk, dv, m, acc)
  else:
    state = GSAState(*(x.astype(acc) for x in initial_state))
  axes = varying_axes(q, k, v, s, g, segment_ids)  # the scan carry must vary over the mesh axes its updates do
  state = GSAState(*(to_varying(x, axes) for x in state))
  if segment_ids is None:
    reset = jnp.zeros((b, t), bool)
    valid = jnp.ones((b, t), bool)
  else:
    reset, valid = segment_masks(segment_ids)
  # Padding leaves the state unchanged: a zero write (s = 0) with no decay (g = 0).
  s = jnp.where(valid[..., None, None], s, 0)
  g = jnp.where(valid[..., None, None], g, 0)

  def step(state, xs):
    q_t, k_t, v_t, s_t, g_t, reset_t = xs
    keep = jnp.logical_not(reset_t)[:, None, None, None].astype(acc)
    state = GSAState(state.hk * keep, state.hv * keep)
    o_t, state = gsa_step(q_t, k_t, v_t, s_t, g_t, state, scale=scale)
    return state, o_t

  time_major = lambda x: jnp.moveaxis(x, 1, 0)
  state, o = jax.lax.scan(step, state, tuple(map(time_major, (q, k, v, s, g, reset))))
  o = jnp.moveaxis(o, 0, 1) * valid[..., None, None]
  return o.astype(q.dtype), state
