"""ABC's slot control (Peng et al. 2022, "ABC: Attention with Bounded-memory Control", arXiv 2110.02488) as GSA's
gates, so that every GSA backend (the references and the Pallas kernels) computes ABC exactly.

ABC writes slot m of the key memory as the running average of the keys weighted by exp(e[m]), e = x W_s the slot
logits, normalized over the document so far (the causal form of ABC's softmax over time):

    Hk_t[:, m] = sum_{j<=t} exp(e_j[m]) k_j / Z_t[m],   Z_t[m] = sum_{j<=t} exp(e_j[m])      (Hv_t likewise)

which is GSA's recurrence Hk_t = Hk_{t-1} * alpha_t + outer(k_t, s_t) with

    alpha_t = Z_{t-1} / Z_t,   s_t = exp(e_t) / Z_t = 1 - alpha_t,

a forget gate that is not learned: it only shrinks each old write as newer ones arrive (the GSA paper, section 2).
In logs, with z = log Z and d_t = z_{t-1} - e_t: g_t = log alpha_t = log_sigmoid(d_t), s_t = sigmoid(-d_t). These
are computed from d_t rather than as z_{t-1} - z_t, which would cancel (z grows like log t while g shrinks like -1/t).
A document's first token has no past (Z_{t-1} = 0): s = 1 and g = 0 (the state it multiplies is zero).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gsa_jax.ops.common import accumulation_dtype, segment_masks

# log Z of an empty past. Finite, not -inf, so that logaddexp and its gradient stay finite everywhere (-inf next to
# -inf gives NaN gradients even where a `where` discards the value); exp(NO_PAST - e) is exactly 0 in float32.
NO_PAST = -1e30


def _is_empty(z: jax.Array) -> jax.Array:
  return z < NO_PAST / 2


def _segmented_logaddexp(a, b):
  """The associative step of a log-sum-exp scan that restarts where a reset flag is set: (reset, z) pairs."""
  (reset_a, z_a), (reset_b, z_b) = a, b
  return reset_a | reset_b, jnp.where(reset_b[..., None, None], z_b, jnp.logaddexp(z_a, z_b))


def abc_gates(e: jax.Array, segment_ids: jax.Array | None = None,
              past: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """ABC's write strengths and log retentions from its slot logits, per document of a packed row.

  Args:
    e: [b, t, h, m] slot logits (any float dtype; computed in float32, or float64 for float64 e).
    segment_ids: None (one document a row) or int [b, t] as the op takes them (0 = padding; the running sum
      restarts where the op's state resets, and padding adds nothing).
    past: None or [b, h, m] float32, log Z of the document each row's first token continues (`NO_PAST`: none),
      the value returned for the previous piece.

  Returns:
    s, g: [b, t, h, m] float32 (float64), for `gated_slot_attention(q, k, v, s, g)` (g <= 0; values at padding are unused).
    z: [b, h, m] float32 (float64), log Z after each row's last non-padding token (the next piece's `past`).
  """
  b, t, h, m = e.shape
  acc = accumulation_dtype(e.dtype)
  e = e.astype(acc)
  if past is None:
    past = no_past(b, h, m, acc)
  if segment_ids is None:
    reset = jnp.zeros((b, t), bool)
    written = e
  else:
    reset, valid = segment_masks(segment_ids)
    written = jnp.where(valid[..., None, None], e, NO_PAST)  # padding: exp(NO_PAST) adds nothing to Z
  # The past enters as one more element before the row, so that z[:, j] is log Z after j tokens.
  flags = jnp.concatenate([jnp.zeros((b, 1), bool), reset], axis=1)
  values = jnp.concatenate([past.astype(acc)[:, None], written], axis=1)
  _, z = jax.lax.associative_scan(_segmented_logaddexp, (flags, values), axis=1)
  z_prev = z[:, :-1]
  start = reset[..., None, None] | _is_empty(z_prev)
  d = jnp.where(start, 0.0, z_prev - e)
  g = jnp.where(start, 0.0, jax.nn.log_sigmoid(d))
  s = jnp.where(start, 1.0, jax.nn.sigmoid(-d))
  return s, g, z[:, -1]


def no_past(b: int, h: int, m: int, dtype=jnp.float32) -> jax.Array:
  """log Z of an empty past, [b, h, m] (an empty ABC cache)."""
  return jnp.full((b, h, m), NO_PAST, dtype)
