"""Math shared by the Pallas GPU (`gsa_gpu`) and TPU (`gsa_tpu`) kernels of GSA, all of it plain XLA.

- The sub-chunk scheme: a chunk of C rows is split into sub-chunks of `SUB` = 16 rows. Every decay a kernel
  exponentiates is a sum of log gates of one sign (prefix sums inside a sub-chunk or chunk, suffix sums to its
  end, and whole sub-chunks in between), never a difference of two large cumulative sums, so every exponent is
  <= 0 for any g in (-inf, 0]. `chunk_gate_sums` defines these sums.
- The softmax over padded slots, the segmented reverse cumsum and the gate-gradient identity of the backward
  (spec section 2): dg_t = reverse cumsum per document of  sum_group(z * dz + p * dp) - s * ds, plus the
  final-state term sum(dhk_T * hk_T) + sum(dhv_T * hv_T) on the last document.
- Padding helpers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from gsa_jax.ops.common import segment_masks

SUB = 16  # rows of a sub-chunk: the smallest matrix-unit tile.


def _window_sums(g, size):
  """g [b, tp, h, m] -> (F, B): inclusive prefix and exclusive suffix sums of g inside each window of `size` rows."""
  b, tp, h, m = g.shape
  gs = g.reshape(b, tp // size, size, h, m)
  fwd = jnp.cumsum(gs, axis=2)
  rev = jnp.flip(jnp.cumsum(jnp.flip(gs, 2), axis=2), 2)
  bwd = jnp.concatenate([rev[:, :, 1:], jnp.zeros_like(rev[:, :, :1])], axis=2)
  return fwd.reshape(g.shape), bwd.reshape(g.shape)


def chunk_gate_sums(g, chunk):
  """g [b, tp, h, m] float32 -> (f16, b16, f64, b64): inclusive prefix and exclusive suffix sums of g inside each
  16-row sub-chunk and inside each chunk. Each is a sum of terms of one sign (no cancellation)."""
  return _window_sums(g, SUB) + _window_sums(g, chunk)


def softmax(z, m):
  """Softmax over the first m of the (padded) slots, float32; padded slots get p = 0."""
  mp = z.shape[-1]
  if mp != m:
    z = jnp.where(jnp.arange(mp) < m, z, -jnp.inf)
  return jax.nn.softmax(z, axis=-1)


def segmented_reverse_cumsum(x, doc):
  """sum_{i >= t, doc_i == doc_t} x_i along axis 1; x [b, t, ...], doc [b, t] nondecreasing."""
  d = jnp.broadcast_to(doc.reshape(doc.shape + (1,) * (x.ndim - 2)), x.shape)

  def combine(a, b):
    (xa, da), (xb, db) = a, b
    return jnp.where(da == db, xa + xb, xb), db

  out, _ = lax.associative_scan(combine, (x, d), reverse=True, axis=1)
  return out


def gate_grad(gsum, s, ds, doc, dhkt, hkt, dhvt, hvt):
  """The gradient of the log gates from the other gradients (spec section 2's identity).

  gsum [b, t, h, m]: sum over the query heads of a kv head of (z * dz + p * dp) (z the scaled slot logits, p the
  slot weights, dz/dp their gradients); s, ds [b, t, h, m]; doc [b, t] nondecreasing document index; dhkt, hkt
  [b, h, dk, m] and dhvt, hvt [b, h, m, dv]: the final states and their cotangents. Returns dg [b, t, h, m] f32.
  """
  dg = segmented_reverse_cumsum(gsum - s.astype(jnp.float32) * ds, doc)
  final = jnp.sum(dhkt * hkt, axis=2) + jnp.sum(dhvt * hvt, axis=3)  # [b, h, m]
  last_doc = (doc == doc[:, -1:])[:, :, None, None]
  return dg + jnp.where(last_doc, final[:, None], 0.0)


def documents(s, g, segment_ids):
  """Packed-row preprocessing shared by the kernel wrappers. s, g [b, t, h, m]; segment_ids None or int [b, t].

  Returns (s, g, reset, valid, doc): s and g zeroed at padding (padding neither writes nor decays the state), reset
  [b, t] bool where a new document starts, valid [b, t] bool or None, doc [b, t] int32 (0, then +1 at each reset).
  """
  b, t = s.shape[:2]
  if segment_ids is None:
    reset, valid = jnp.zeros((b, t), bool), None
  else:
    reset, valid = segment_masks(segment_ids)
    s = jnp.where(valid[..., None, None], s, 0)
    g = jnp.where(valid[..., None, None], g, 0)
  return s, g, reset, valid, jnp.cumsum(reset, axis=1, dtype=jnp.int32)


def pad_to(x, shape):
  """Zero-pads x at the end of every axis up to `shape`."""
  pads = [(0, n - d) for d, n in zip(x.shape, shape)]
  return jnp.pad(x, pads) if any(p for _, p in pads) else x
