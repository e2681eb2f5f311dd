"""Gated Slot Attention on GPU: Pallas kernels lowered through Triton, with a `jax.custom_vjp`.

Decomposition (spec sections 1-2)
---------------------------------
GSA is two gated linear attentions that share the log gate g over the M slots:

  pass 1, "GV" (gate on the value side):  z = scale * GV(q, k, s)          state hk [dk, m]
  pass 2, "GK" (gate on the key side):    o = GK(p, s, v)                  state hv [m, dv]

with p = softmax(z) over the slots, in float32, in XLA between the kernels. The backward needs nothing but the
same two attentions, run forwards or backwards in time (`reverse=True` lets a query see the keys at and after it):

  dp = GV(do, v, s)                 dl = scale * p * (dp - sum(p * dp))     dq = GK(dl, s, k)
  dv = GK_rev(s, p, do)             dk = GK_rev(s, dl, q)                   (their final states: dhv0, dhk0)
  ds = GV_rev(k, q, dl) + GV_rev(v, do, p)
  dg = reverse cumsum, per document, of  sum_group(z * dz + p * dp) - s * ds,  plus the final-state term
       sum(dhk_T * hk_T) + sum(dhv_T * hv_T) on the last document (spec section 2's identity, done in XLA).

The kernels (docs/kernels.md has the measurements behind each choice)
----------------------------------------------------------------------
Each attention is two kernels. `_state_kernel`: one program per (state slice, batch, kv head) walks the chunks
(64 tokens) and writes the float32 state entering every chunk to memory ([b, h, n_chunks, ., .]); its only work
per chunk is one state update (a [64 x slice] product). `_out_kernel`: one program per (chunk, batch, kv head),
fully parallel, computes that chunk's outputs with chunk-wide products: the intra-chunk scores as one [64, 64]
matrix (decays normalised per 16-row sub-chunk, see below) plus the inter-chunk part from the stored state,
walking the wide feature axis (dk or dv) in blocks. The forward writes two state tensors (hk, hv) and keeps them
for the backward (`recompute_states=True` recomputes them instead), which writes the two reverse ones (dhk, dhv:
dk and ds1 share one, dv and ds2 the other): 2 state kernels + 6 output kernels. Grouped-query heads of one kv
head are handled inside one program (k, v, s, g are never repeated); the group's query heads are summed inside the
reverse state kernels.

Numerical safety
----------------
XLA computes, per 16-row sub-chunk and per chunk, F (inclusive cumsum of g from the start) and B (exclusive
reverse cumsum to the end). Every decay a kernel exponentiates is then a sum of terms of one sign, never a
difference of two large cumulative sums, so every exponent is <= 0 and none loses precision, except one: inside a
diagonal 16 x 16 sub-block the decay between two rows is F_t - F_j (a difference inside one sub-chunk of 16
tokens), walked row by row. With g = -1e3 next to g = 0 that difference cancels to an absolute error of about
|F_j| * 6e-8 (at most 1e-3 with sixteen -1e3 gates); it never overflows.

Padding inside the kernels: T to a multiple of the chunk, dk/dv/m to powers of two (at least 16) or multiples of
the feature block; padded slots are masked out of the softmax. Documents: `doc` [b, t] int32 (0 for the first
document, +1 at each reset): pairs across documents are masked, and only tokens of the document that holds the
carried state read it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gsa_jax.ops.common import (KEY_STATES_NAME, RESIDUALS_NAME, VALUE_STATES_NAME, GSAState, kernel_output,
                                to_varying, varying_axes)
from gsa_jax.ops.recurrent import gsa_step
from pallas_kernels.gsa_common import SUB as _SUB
from pallas_kernels.gsa_common import chunk_gate_sums as _chunk_gate_sums
from pallas_kernels.gsa_common import documents as _documents
from pallas_kernels.gsa_common import gate_grad as _gate_grad
from pallas_kernels.gsa_common import pad_to as _pad_to
from pallas_kernels.gsa_common import softmax as _softmax

_log = logging.getLogger(__name__)
_MAX_SLOTS = 128


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes.

  `chunk`: tokens per chunk (a multiple of 16). `block_k` / `block_v`: the query/key and value width walked per
  step by the output kernels. `state_block`: the width of the state slice one state-passing program owns.
  `num_warps`/`num_stages`: the output kernels; `state_num_warps`/`state_num_stages`: the state-passing kernels.
  """

  chunk: int = 64
  block_k: int = 64
  block_v: int = 64
  num_warps: int = 4
  num_stages: int = 2
  state_block: int | None = None  # None: 64, or 32 where slices of 64 would give fewer than 128 programs
  state_num_warps: int = 4
  state_num_stages: int = 2
  # Low-precision inputs: products with the float32 state always use hi + lo operands; `split_all` does the
  # same for every float32 operand of the intra-chunk products. Measured on the H100 (B2 T512 H4 K=V=64 M32, bf16,
  # vs float64): worst relative L2 error 3.2e-3 (dg) without, 1.8e-3 with, for about 8% more time.
  split_all: bool = True
  # The forward's chunk states ([b, h, T / chunk, dk, m] and [b, h, T / chunk, m, dv], float32) are kept for the
  # backward (saves two of its sequential state passes) unless `recompute_states`, which saves that memory.
  recompute_states: bool = False
  # Cut the sequence into this many segments whose state passes run in parallel (then joined by a short scan in
  # XLA): more programs for the sequential state kernels when batch x heads is small (batch 1, long T). T is padded
  # to a multiple of chunk x segments. Exact. None: `auto_state_segments` (1 unless the passes would run too few
  # programs to fill the GPU).
  state_segments: int | None = None

  def __post_init__(self):
    def check(ok, name, want):
      if not ok:
        raise ValueError(f"BlockSizes.{name}={getattr(self, name)!r}; expected {want}.")

    def int_at_least(x, low):
      return isinstance(x, int) and not isinstance(x, bool) and x >= low

    # Triton's block shapes are powers of two, and its dots need 16 rows and columns.
    for name in ("chunk", "block_k", "block_v"):
      value = getattr(self, name)
      check(int_at_least(value, _SUB) and value & (value - 1) == 0, name, f"a power of two >= {_SUB}")
    check(self.state_block is None or (int_at_least(self.state_block, _SUB) and
                                       self.state_block & (self.state_block - 1) == 0),
          "state_block", f"None or a power of two >= {_SUB}")
    for name in ("num_warps", "state_num_warps"):
      check(getattr(self, name) in (1, 2, 4, 8, 16), name, "1, 2, 4, 8 or 16")
    for name in ("num_stages", "state_num_stages"):
      check(int_at_least(getattr(self, name), 1), name, "an int >= 1")
    for name in ("split_all", "recompute_states"):
      check(isinstance(getattr(self, name), bool), name, "a bool")
    check(self.state_segments is None or int_at_least(self.state_segments, 1), "state_segments",
          "None or an int >= 1")


@functools.cache
def _log_once(message: str) -> None:
  _log.warning(message)


def _next_pow2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def _padded(d: int, block: int) -> tuple[int, int]:
  """(padded width, block) for a feature axis of width d."""
  p = max(16, _next_pow2(d))
  if p <= block:
    return p, p
  return -(-d // block) * block, block


# The state kernels are latency-bound (one program walks every chunk in turn). Measured on the H100 (bf16, K=V=512
# M64, fwd+bwd, one call, docs/benchmarks.md), segments pay only where the passes have very few programs: B1 T16384
# (32 programs of 64-wide slices) 4.28 -> 3.75 ms with 4; B2 T8192 (64) 3.48 -> 3.53 / 3.61 ms with 4 / 2; B4 T4096
# (128) 3.10 -> 3.48 ms with 2 (the join rewrites every chunk state in XLA and keeps a second copy).
_SEGMENT_BELOW = 64  # segment the state passes only when they have fewer programs than this
_SEGMENTED_PROGRAMS = 128  # and then into enough segments for this many
_MIN_SEGMENT_CHUNKS = 8  # keeping at least this many chunks a segment


def auto_state_segments(batch: int, kv_heads: int, width: int, n_chunks: int) -> int:
  """Segments for the state passes (a power of two), counting programs as 64-wide slices of the wider (padded)
  feature axis `width`."""
  programs = batch * kv_heads * max(1, width // 64)
  segments = 1
  while (programs < _SEGMENT_BELOW and programs * segments < _SEGMENTED_PROGRAMS
         and 2 * segments * _MIN_SEGMENT_CHUNKS <= n_chunks):
    segments *= 2
  return segments


def unsupported_reason(q, k, v, s, g, segment_ids=None, *, interpret: bool | None = None) -> str | None:
  """Why the Pallas GPU kernels cannot run these inputs (None if they can); `gsa_jax.ops.select_backend` runs
  such calls with 'chunked'. `interpret` as in `gsa_pallas_gpu` (None: interpreted off a GPU)."""
  dtypes = {x.dtype for x in (q, k, v, s, g)}
  if any(d not in (jnp.float32, jnp.bfloat16, jnp.float16) for d in dtypes):
    return f"dtypes {sorted(str(d) for d in dtypes)} (the kernels take float32, bfloat16 or float16)"
  if s.shape[-1] > _MAX_SLOTS:
    return f"M={s.shape[-1]} slots > {_MAX_SLOTS} (the kernels keep a [block, M] state per program)"
  interpret = jax.default_backend() != "gpu" if interpret is None else interpret
  if interpret and varying_axes(q, k, v, s, g, segment_ids):
    # Pallas' HLO interpreter (jax 0.11.2) runs the kernel body on values typed with shard_map's varying axes
    # while its buffers carry none, and its loops then reject the mismatch; compiled kernels are not affected.
    return "inputs inside shard_map when interpreted (no GPU): Pallas' interpreter rejects shard_map's typed values"
  return None


# ---------------------------------------------------------------------------------------------------------------
# The kernels: chunk states through memory, outputs parallel over chunks.
# ---------------------------------------------------------------------------------------------------------------

def _dot2(a, b, low_precision, split=False, split_all=False):
  """a @ b with float32 accumulation. Low-precision mode: operands rounded to `low_precision`; with `split`
  each float32 operand is carried as hi + lo (operands already in the low-precision dtype have no lo part)."""
  f32 = jnp.float32
  if low_precision is None:
    return jnp.dot(a.astype(f32), b.astype(f32), precision=lax.Precision.HIGHEST, preferred_element_type=f32)
  lp = lambda x, y: jnp.dot(x, y, preferred_element_type=f32)
  a_hi, b_hi = a.astype(low_precision), b.astype(low_precision)
  out = lp(a_hi, b_hi)
  if split or split_all:
    if a.dtype == f32:
      out = out + lp((a - a_hi.astype(f32)).astype(low_precision), b_hi)
    if b.dtype == f32:
      out = out + lp(a_hi, (b - b_hi.astype(f32)).astype(low_precision))
  return out


def _state_kernel(k_ref, v_ref, f64_ref, b64_ref, doc_ref, h0_ref, hs_ref, ht_ref, *, kind, reverse, n_chunks,
                  chunk, gk, low_precision):
  """Chunk states: one program per (key block, value block, batch, kv head) walks the chunks and writes the
  state entering each chunk (float32) to hs, the state after the last one to ht.

  k [tp, gk, bka], v [tp, gk, bvb]; f64/b64 [tp, m] chunk-local inclusive prefix / exclusive suffix sums of g;
  doc [tp]; h0/ht [bka, bvb]; hs [n_chunks, bka, bvb]. GK: the gate is on the key side (bka = m), GV: on the
  value side (bvb = m).
  """
  f32 = jnp.float32
  tp = n_chunks * chunk

  def body(i, carry):
    h, sdoc = carry
    ci = (n_chunks - 1 - i) if reverse else i
    t0 = pl.multiple_of(ci * chunk, chunk)
    rows = pl.ds(t0, chunk)
    hs_ref[ci] = h
    # Decay from each row to the boundary the state leaves through (sums of g of one sign: <= 0).
    y = jnp.exp((f64_ref if reverse else b64_ref)[rows, :])  # [c, m]
    total = f64_ref[t0 + chunk - 1, :][None, :]  # [1, m]
    docs = doc_ref[rows]
    bdoc = doc_ref[t0] if reverse else doc_ref[t0 + chunk - 1]
    keep = jnp.where(bdoc == sdoc, jnp.exp(total), 0.0)
    h = h * (keep.T if kind == "gk" else keep)
    upd = (docs == bdoc)[:, None]
    for c in range(gk):
      kt = k_ref[rows, c, :]
      vt = v_ref[rows, c, :]
      if kind == "gk":
        h += _dot2(jnp.where(upd, kt.astype(f32) * y, 0.0).T, vt, low_precision, split=True)
      else:
        h += _dot2(jnp.where(upd, kt, jnp.zeros_like(kt)).T, vt.astype(f32) * y, low_precision, split=True)
    return h, bdoc

  sdoc0 = doc_ref[tp - 1] if reverse else doc_ref[0]
  h, _ = lax.fori_loop(0, n_chunks, body, (h0_ref[...].astype(f32), sdoc0))
  ht_ref[...] = h


def _out_kernel(q_ref, k_ref, v_ref, f16_ref, b16_ref, f64_ref, b64_ref, doc_ref, h_ref, o_ref, *, kind, reverse,
                transposed, n_chunks, chunk, gq, gk, block, n_blocks, low_precision, split_all):
  """Outputs of one chunk: one program per (chunk, batch, kv head), the query heads of its group inside.

  GK: q [c, gq, m], k [c, gk, m], v [c, gk, w], h [m, w] ([w, m] if transposed), o [c, gq, w].
  GV: q [c, gq, w], k [c, gk, w], v [c, gk, m], h [w, m] ([m, w] if transposed), o [c, gq, m].
  The wide axis w is walked in blocks of `block`. f16/b16 [c, m]: prefix/suffix sums of g inside each 16-row
  sub-chunk; f64/b64 [c, m]: the same inside the chunk; doc [tp]; h: the state entering this chunk.

  Every product is chunk-wide ([c, .] operands): the intra-chunk scores are one [c, c] matrix. Its decays are
  normalised per 16-row sub-chunk a of the queries, so every exponent is a sum of gates of one sign:
  off-diagonal blocks (keys in other sub-chunks) as (q * QF) @ (k * KF_a)^T kept on the rows of a, where KF_a is
  the decay from each key to a's boundary (0 for keys a does not see); the diagonal 16 x 16 blocks (keys in a's own
  sub-chunk) row by row, the 16 rows of all sub-chunks walked together.
  """
  f32 = jnp.float32
  ns = chunk // _SUB
  tp = n_chunks * chunk
  ci = pl.program_id(0)
  t0 = ci * chunk
  dot = functools.partial(_dot2, low_precision=low_precision, split_all=split_all)
  rows = jnp.arange(chunk)
  blk = rows // _SUB  # [c]: the sub-chunk of each row
  in_blk = [(blk == a)[:, None] for a in range(ns)]  # [c, 1]
  f16, b16 = f16_ref[...], b16_ref[...]  # [c, m]
  tot = [f16_ref[a * _SUB + _SUB - 1, :][None, :] for a in range(ns)]  # [1, m]: each sub-chunk's gate sum
  docs = doc_ref[pl.ds(t0, chunk)]  # [c]
  sdoc = doc_ref[jnp.minimum(t0 + chunk, tp - 1)] if reverse else doc_ref[jnp.maximum(t0 - 1, 0)]
  x_dec = jnp.where((docs == sdoc)[:, None], jnp.exp((b64_ref if reverse else f64_ref)[...]), 0.0)  # [c, m]
  same_doc = docs[:, None] == docs[None, :]  # [c, c]
  # Query sub-chunks with keys in other sub-chunks, the query-side decay and, per such sub-chunk a, the key-side
  # decay to a's boundary: forward, keys before a (from the key to the end of its sub-chunk, then whole sub-chunks
  # between); reversed, keys after a (the mirror image).
  seeing_others = range(ns - 1) if reverse else range(1, ns)
  qf = jnp.exp(b16 if reverse else f16)
  kf = {}
  for a in seeing_others:
    seen = (blk > a) if reverse else (blk < a)
    between = jnp.zeros_like(f16)  # whole sub-chunks between each key's and a
    for mid in (range(a + 1, ns) if reverse else range(a)):
      between = between + jnp.where(((blk > mid) if reverse else (blk < mid))[:, None], tot[mid], 0.0)
    kf[a] = jnp.where(seen[:, None], jnp.exp((f16 if reverse else b16) + between), 0.0)

  def diag_rows(fn, init):
    """init + the sum over jj of fn(jj, key row of each query row [c], decay [c, m]): for each query row, the key
    row jj of its own sub-chunk, when it is visible (causal and same document)."""
    def step(jj, acc):
      key = blk * _SUB + jj  # [c]
      fj = jnp.zeros_like(f16)
      dj = jnp.zeros_like(docs)
      for a in range(ns):
        fj = jnp.where(in_blk[a], f16_ref[pl.ds(a * _SUB + jj, 1), :], fj)
        dj = jnp.where(blk == a, doc_ref[t0 + a * _SUB + jj], dj)
      ok = ((key >= rows) if reverse else (key <= rows)) & (dj == docs)
      e = jnp.exp(jnp.where(ok[:, None], (fj - f16) if reverse else (f16 - fj), -jnp.inf))  # [c, m]
      return fn(jj, key, e, acc)
    return lax.fori_loop(0, _SUB, step, init)

  def key_rows(ref, c, jj):
    """[c, width]: for each query row, row jj of its sub-chunk of ref[:, c, :]."""
    out = None
    for a in range(ns):
      r = ref[pl.ds(a * _SUB + jj, 1), c, :].astype(f32)
      out = jnp.where(in_blk[a], r, 0.0 if out is None else out)
    return out

  cols_c = rows[None, :]  # [1, c]
  for qa in range(gq):
    if kind == "gk":
      qt = q_ref[:, qa, :].astype(f32)  # [c, m]
      amat = []
      for c in range(gk):
        kt = k_ref[:, c, :].astype(f32)
        att = jnp.zeros((chunk, chunk), f32)
        for a in seeing_others:
          att = jnp.where(in_blk[a], dot(qt * qf, (kt * kf[a]).T), att)

        def fn(jj, key, e, att, c=c):
          col = jnp.sum(qt * key_rows(k_ref, c, jj) * e, axis=1)  # [c]
          return jnp.where(cols_c == key[:, None], col[:, None], att)
        amat.append(jnp.where(same_doc, diag_rows(fn, att), 0.0))
      qx = qt * x_dec

      def wide(j, carry):
        cols = pl.ds(pl.multiple_of(j * block, block), block)
        hb = h_ref[cols, :].T if transposed else h_ref[:, cols]  # [m, block]
        acc = dot(qx, hb, split=True)
        for c in range(gk):
          acc += dot(amat[c], v_ref[:, c, cols])
        o_ref[:, qa, cols] = acc.astype(o_ref.dtype)
        return carry

      lax.fori_loop(0, n_blocks, wide, 0)
    else:
      acc = None
      m = f16.shape[-1]
      for c in range(gk):
        def narrow(j, carry, c=c):
          att, inter = carry
          cols = pl.ds(pl.multiple_of(j * block, block), block)
          qb = q_ref[:, qa, cols]
          att = att + dot(qb, k_ref[:, c, cols].T)
          if c == 0:
            hb = h_ref[:, cols].T if transposed else h_ref[cols, :]  # [block, m]
            inter = inter + dot(qb, hb, split=True)
          return att, inter

        att, inter = lax.fori_loop(0, n_blocks, narrow,
                                   (jnp.zeros((chunk, chunk), f32), jnp.zeros((chunk, m), f32)))
        att = jnp.where(same_doc, att, 0.0)
        if acc is None:
          acc = inter * x_dec
        vt = v_ref[:, c, :].astype(f32)
        for a in seeing_others:
          acc = acc + jnp.where(in_blk[a], dot(att, vt * kf[a]) * qf, 0.0)

        def fn(jj, key, e, acc, c=c, att=att):
          col = jnp.sum(jnp.where(cols_c == key[:, None], att, 0.0), axis=1)  # [c]
          return acc + col[:, None] * key_rows(v_ref, c, jj) * e
        acc = diag_rows(fn, acc)
      o_ref[:, qa, :] = acc.astype(o_ref.dtype)


def _cp_states(cfg, kind, reverse, gk, k, v, gates, doc, h0, name):
  """k [b, tp, H*gk, A], v [b, tp, H*gk, Bw], h0 [b, H, A, Bw] -> (hs [b, H, n, A, Bw] f32, ht [b, H, A, Bw]).

  With `cfg.state_segments` = S > 1 the sequence is cut into S segments whose state passes run in parallel from a
  zero state (the state is linear in the state it starts from); a short scan over the segments in XLA then carries
  the true state across them and adds its decayed contribution to every chunk (`_join_segments`)."""
  segments = cfg.state_segments
  if segments == 1:
    return _state_pass(cfg, kind, reverse, gk, k, v, gates, doc, h0, name)
  b, tp = doc.shape
  split = lambda x: x.reshape((b * segments, tp // segments) + x.shape[2:])
  hs, ht = _state_pass(cfg, kind, reverse, gk, split(k), split(v), tuple(split(x) for x in gates), split(doc),
                       jnp.zeros((b * segments,) + h0.shape[1:], jnp.float32), name)
  unsplit = lambda x: x.reshape((b, segments) + x.shape[1:])
  return _join_segments(kind, reverse, unsplit(hs), unsplit(ht), gates[2], doc, h0, cfg.chunk)


def _join_segments(kind, reverse, hs, ht, f64, doc, h0, chunk):
  """Segment-local chunk states (from a zero state) -> the true ones.

  hs [b, S, H, ns, A, Bw], ht [b, S, H, A, Bw]: each segment's states entering its chunks and its final state,
  started from zero; f64 [b, tp, H, m]: inclusive prefix sums of g inside each chunk (the last row of a chunk is
  its total); doc [b, tp]; h0 [b, H, A, Bw]. The state entering a segment survives to a chunk of it when no
  document starts in between (the state kernel's rule, chunk by chunk) and is decayed by the gates in between:
  sums of one sign (cumulative sums of chunk totals), never a difference. Forwards in time unless `reverse`.
  """
  b, segments, nh, ns = hs.shape[:4]
  m = f64.shape[3]
  n = segments * ns
  tot = f64.reshape(b, n, chunk, nh, m)[:, :, -1].reshape(b, segments, ns, nh, m)
  first = doc[:, ::chunk].reshape(b, segments, ns)  # document of each chunk's first and last token
  last = doc[:, chunk - 1::chunk].reshape(b, segments, ns)
  zeros = jnp.zeros_like(tot[:, :, :1])
  if reverse:  # the state enters a segment from the token after it; a chunk from its end
    in_doc = jnp.concatenate([first[:, 1:, 0], doc[:, -1:]], axis=1)  # [b, S]
    beyond = jnp.concatenate([first[:, :, 1:], in_doc[..., None]], axis=2)  # document just after each chunk
    crossed = first[:, :, 0]
    decay = jnp.concatenate([jnp.flip(jnp.cumsum(jnp.flip(tot, 2), axis=2), 2)[:, :, 1:], zeros], axis=2)
  else:
    in_doc = jnp.concatenate([doc[:, :1], last[:, :-1, -1]], axis=1)
    beyond = jnp.concatenate([in_doc[..., None], last[:, :, :-1]], axis=2)  # document just before each chunk
    crossed = last[:, :, -1]
    decay = jnp.concatenate([zeros, jnp.cumsum(tot, axis=2)[:, :, :-1]], axis=2)
  # [b, S, ns, H, m]: factor of the segment's incoming state at each chunk; [b, S, H, m]: across the whole segment.
  at_chunk = jnp.where((beyond == in_doc[..., None])[..., None, None], jnp.exp(decay), 0.0)
  across = jnp.where((crossed == in_doc)[..., None, None], jnp.exp(jnp.sum(tot, axis=2)), 0.0)
  on_slots = (lambda x: x[..., :, None]) if kind == "gk" else (lambda x: x[..., None, :])  # m is A (gk) or Bw (gv)

  def carry(h, seg):
    factor, local = seg
    return on_slots(factor) * h + local, h

  segs = (jnp.moveaxis(across, 1, 0), jnp.moveaxis(ht, 1, 0))
  h_final, h_in = lax.scan(carry, h0, segs, reverse=reverse)  # h_in [S, b, H, A, Bw]: state entering each segment
  h_in = jnp.moveaxis(h_in, 0, 1)[:, :, :, None]  # [b, S, H, 1, A, Bw]
  hs = hs + on_slots(jnp.moveaxis(at_chunk, 2, 3)) * h_in
  return jnp.moveaxis(hs, 1, 2).reshape((b, nh, n) + hs.shape[4:]), h_final


def _state_pass(cfg, kind, reverse, gk, k, v, gates, doc, h0, name):
  """The state kernel over the whole sequence: shapes as `_cp_states`."""
  b, tp, _, da = k.shape
  db = v.shape[3]
  nh = h0.shape[1]
  m = gates[0].shape[3]
  n = tp // cfg.chunk
  sb = cfg.state_block
  if sb is None:  # too few programs to fill the GPU with slices of 64 (e.g. batch 1): take slices of 32
    sb = 64 if b * nh * (max(da, db) // 64) >= 128 else 32
  ba = m if kind == "gk" else min(sb, da)
  bb = m if kind == "gv" else min(sb, db)
  grid = (da // ba, db // bb, b, nh)
  gate_spec = pl.BlockSpec((None, tp, None, m), lambda i, j, bi, hi: (bi, 0, hi, 0))
  in_specs = [
      pl.BlockSpec((None, tp, gk, ba), lambda i, j, bi, hi: (bi, 0, hi, i)),
      pl.BlockSpec((None, tp, gk, bb), lambda i, j, bi, hi: (bi, 0, hi, j)),
      gate_spec, gate_spec,
      pl.BlockSpec((None, tp), lambda i, j, bi, hi: (bi, 0)),
      pl.BlockSpec((None, None, ba, bb), lambda i, j, bi, hi: (bi, hi, i, j)),
  ]
  out_specs = [pl.BlockSpec((None, None, n, ba, bb), lambda i, j, bi, hi: (bi, hi, 0, i, j)),
               pl.BlockSpec((None, None, ba, bb), lambda i, j, bi, hi: (bi, hi, i, j))]
  out_shape = [kernel_output((b, nh, n, da, db), jnp.float32, cfg.vary),
               kernel_output((b, nh, da, db), jnp.float32, cfg.vary)]
  kernel = functools.partial(_state_kernel, kind=kind, reverse=reverse, n_chunks=n, chunk=cfg.chunk, gk=gk,
                             low_precision=cfg.low_precision)
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.state_num_warps, num_stages=cfg.state_num_stages),
      interpret=cfg.interpret, name=name,
  )(k, v, gates[2], gates[3], doc, h0)


def _cp_outputs(cfg, kind, reverse, transposed, gq, gk, q, k, v, gates, doc, hs, out_dtype, name, block):
  """q [b, tp, H*gq, dq], k [b, tp, H*gk, dq], v [b, tp, H*gk, dv], hs [b, H, n, ., .] (see _out_kernel)
  -> o [b, tp, H*gq, dv]."""
  b, tp, hq_all, dq = q.shape
  dv = v.shape[3]
  nh = hs.shape[1]
  m = gates[0].shape[3]
  c = cfg.chunk
  n = tp // c
  wide = dv if kind == "gk" else dq
  block = min(block, wide)
  x, y = hs.shape[3:]
  gate_spec = pl.BlockSpec((None, c, None, m), lambda ci, bi, hi: (bi, ci, hi, 0))
  in_specs = [
      pl.BlockSpec((None, c, gq, dq), lambda ci, bi, hi: (bi, ci, hi, 0)),
      pl.BlockSpec((None, c, gk, dq), lambda ci, bi, hi: (bi, ci, hi, 0)),
      pl.BlockSpec((None, c, gk, dv), lambda ci, bi, hi: (bi, ci, hi, 0)),
      gate_spec, gate_spec, gate_spec, gate_spec,
      pl.BlockSpec((None, tp), lambda ci, bi, hi: (bi, 0)),
      pl.BlockSpec((None, None, None, x, y), lambda ci, bi, hi: (bi, hi, ci, 0, 0)),
  ]
  kernel = functools.partial(_out_kernel, kind=kind, reverse=reverse, transposed=transposed, n_chunks=n, chunk=c,
                             gq=gq, gk=gk, block=block, n_blocks=wide // block, low_precision=cfg.low_precision,
                             split_all=cfg.split_all)
  return pl.pallas_call(
      kernel, grid=(n, b, nh), in_specs=in_specs,
      out_specs=pl.BlockSpec((None, c, gq, dv), lambda ci, bi, hi: (bi, ci, hi, 0)),
      out_shape=kernel_output((b, tp, hq_all, dv), out_dtype, cfg.vary),
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=cfg.interpret, name=name,
  )(q, k, v, *gates, doc, hs)


def _pad_inputs(cfg: "_Config", q, k, v, s, g, hk0, hv0, doc):
  """Pads T to the chunk grid and K, V, M to the kernel widths (zeros; doc ids repeat the last one)."""
  b, _, hq, _ = q.shape
  h = k.shape[2]
  docp = jnp.pad(doc, ((0, 0), (0, cfg.tp - cfg.t)), mode="edge") if cfg.tp != cfg.t else doc
  return (_pad_to(q, (b, cfg.tp, hq, cfg.kp)), _pad_to(k, (b, cfg.tp, h, cfg.kp)), _pad_to(v, (b, cfg.tp, h, cfg.vp)),
          _pad_to(s, (b, cfg.tp, h, cfg.mp)), _pad_to(g, (b, cfg.tp, h, cfg.mp)), _pad_to(hk0, (b, h, cfg.kp, cfg.mp)),
          _pad_to(hv0, (b, h, cfg.mp, cfg.vp)), docp)


def _forward_cp(cfg: "_Config", q, k, v, s, g, hk0, hv0, doc):
  b, _, hq, _ = q.shape
  cd = q.dtype
  qp, kp, vp, sp, gp, hk0p, hv0p, docp = _pad_inputs(cfg, q, k, v, s, g, hk0, hv0, doc)
  gates = _chunk_gate_sums(gp, cfg.chunk)
  hks, hkt = _cp_states(cfg, "gv", False, 1, kp, sp, gates, docp, hk0p, "gsa_fwd_key_states")
  z = _cp_outputs(cfg, "gv", False, False, cfg.grp, 1, qp, kp, sp, gates, docp, hks, jnp.float32,
                  "gsa_fwd_slot_logits", cfg.bk)
  z = cfg.scale * z
  p = _softmax(z, cfg.m)
  hvs, hvt = _cp_states(cfg, "gk", False, 1, sp, vp, gates, docp, hv0p, "gsa_fwd_value_states")
  o = _cp_outputs(cfg, "gk", False, False, cfg.grp, 1, p, sp, vp, gates, docp, hvs, cd, "gsa_fwd_output", cfg.bv)
  states = None if cfg.recompute_states else (hks, hvs)
  residuals = (qp, kp, vp, sp, gp, docp, hk0p, hv0p, z, hkt, hvt, states)
  return (o, hkt, hvt), residuals


def _backward_cp(cfg: "_Config", saved, cts):
  qp, kp, vp, sp, gp, docp, hk0p, hv0p, z, hkt, hvt, states = saved
  do, dhkt, dhvt = cts
  b, tp, hq, _ = qp.shape
  h = kp.shape[2]
  cd = qp.dtype
  dtypes = (cd,) * 4 + (jnp.float32,) * 3
  swap = lambda x: jnp.swapaxes(x, -1, -2)
  dop = _pad_to(do.astype(cd), (b, tp, hq, cfg.vp))
  dhktp = _pad_to(dhkt.astype(jnp.float32), (b, h, cfg.kp, cfg.mp))
  dhvtp = _pad_to(dhvt.astype(jnp.float32), (b, h, cfg.mp, cfg.vp))
  p = _softmax(z, cfg.m)
  gates = _chunk_gate_sums(gp, cfg.chunk)
  grp = cfg.grp

  if states is None:
    hks, _ = _cp_states(cfg, "gv", False, 1, kp, sp, gates, docp, hk0p, "gsa_bwd_key_states")
    hvs, _ = _cp_states(cfg, "gk", False, 1, sp, vp, gates, docp, hv0p, "gsa_bwd_value_states")
  else:
    hks, hvs = states
  dp = _cp_outputs(cfg, "gv", False, True, grp, 1, dop, vp, sp, gates, docp, hvs, jnp.float32, "gsa_bwd_dp",
                   cfg.bv)
  dz = p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True))
  dl = cfg.scale * dz
  dq = _cp_outputs(cfg, "gk", False, True, grp, 1, dl, sp, kp, gates, docp, hks, dtypes[0], "gsa_bwd_dq", cfg.bk)
  # Reverse chunk states: dhk^T [m, dk] and dhv [m, dv], entering each chunk from its end.
  dhks, dhk0t = _cp_states(cfg, "gk", True, grp, dl, qp, gates, docp, swap(dhktp), "gsa_bwd_key_state_grads")
  dhvs, dhv0 = _cp_states(cfg, "gk", True, grp, p, dop, gates, docp, dhvtp, "gsa_bwd_value_state_grads")
  dk = _cp_outputs(cfg, "gk", True, False, 1, grp, sp, dl, qp, gates, docp, dhks, dtypes[1], "gsa_bwd_dk", cfg.bk)
  dv = _cp_outputs(cfg, "gk", True, False, 1, grp, sp, p, dop, gates, docp, dhvs, dtypes[2], "gsa_bwd_dv", cfg.bv)
  ds1 = _cp_outputs(cfg, "gv", True, True, 1, grp, kp, qp, dl, gates, docp, dhks, jnp.float32, "gsa_bwd_ds_keys",
                    cfg.bk)
  ds2 = _cp_outputs(cfg, "gv", True, True, 1, grp, vp, dop, p, gates, docp, dhvs, jnp.float32,
                    "gsa_bwd_ds_values", cfg.bv)
  ds = ds1 + ds2

  gsum = (z * dz + p * dp).reshape(b, tp, h, grp, cfg.mp).sum(axis=3)
  dg = _gate_grad(gsum, sp, ds, docp, dhktp, hkt, dhvtp, hvt)

  t, m = cfg.t, cfg.m
  grads = (dq[:, :t, :, :cfg.dk], dk[:, :t, :, :cfg.dk], dv[:, :t, :, :cfg.dv], ds[:, :t, :, :m],
           dg[:, :t, :, :m], swap(dhk0t)[:, :, :cfg.dk, :m], dhv0[:, :, :m, :cfg.dv])
  grads = tuple(x.astype(dt) for x, dt in zip(grads, dtypes))
  return grads + (None,)


# ---------------------------------------------------------------------------------------------------------------
# The custom_vjp core: padded, masked inputs in, padded outputs out.
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Config:
  t: int
  tp: int
  dk: int
  kp: int
  bk: int
  dv: int
  vp: int
  bv: int
  m: int
  mp: int
  grp: int
  scale: float
  chunk: int
  num_warps: int
  num_stages: int
  low_precision: object
  split_all: bool
  interpret: bool
  state_block: int | None = None
  state_num_warps: int = 4
  state_num_stages: int = 2
  recompute_states: bool = False
  state_segments: int = 1
  vary: frozenset = frozenset()  # shard_map mesh axes the inputs vary over (gsa_jax.ops.common.varying_axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gsa_core(cfg, q, k, v, s, g, hk0, hv0, doc):
  (o, hkt, hvt), _ = _forward_cp(cfg, q, k, v, s, g, hk0, hv0, doc)
  return _unpad_outputs(cfg, o, hkt, hvt)


def _unpad_outputs(cfg, o, hkt, hvt):
  return o[:, :cfg.t, :, :cfg.dv], hkt[:, :, :cfg.dk, :cfg.m], hvt[:, :, :cfg.m, :cfg.dv]


def _core_fwd(cfg, q, k, v, s, g, hk0, hv0, doc):
  (o, hkt, hvt), res = _forward_cp(cfg, q, k, v, s, g, hk0, hv0, doc)
  return _unpad_outputs(cfg, o, hkt, hvt), _name_residuals(res)


def _name_residuals(res):
  """Names for remat policies (gsa_jax.ops.common): the slot logits and final states; each pass's chunk states."""
  *inputs, z, hkt, hvt, states = res
  z, hkt, hvt = (checkpoint_name(x, RESIDUALS_NAME) for x in (z, hkt, hvt))
  if states is not None:
    states = checkpoint_name(states[0], KEY_STATES_NAME), checkpoint_name(states[1], VALUE_STATES_NAME)
  return (*inputs, z, hkt, hvt, states)


def _core_bwd(cfg, saved, cts):
  return _backward_cp(cfg, saved, cts)


_gsa_core.defvjp(_core_fwd, _core_bwd)


# ---------------------------------------------------------------------------------------------------------------
# Public entry points.
# ---------------------------------------------------------------------------------------------------------------

def make_config(q, k, v, s, *, scale: float, block_sizes: BlockSizes | None, interpret: bool,
                vary: frozenset) -> _Config:
  """The kernels' static configuration for these input shapes (padding, chunk, state segments); also used by
  `gsa_mgpu`, whose backward is these kernels'."""
  bs = block_sizes or BlockSizes()
  b, t, hq, dk = q.shape
  h, dv, m = k.shape[2], v.shape[3], s.shape[3]
  # block_sizes.chunk is the kernels' chunk (the op's chunk_size is the chunked reference's knob).
  chunk = max(_SUB, min(bs.chunk, _next_pow2(t)))
  chunk = -(-chunk // _SUB) * _SUB
  kp, bk = _padded(dk, bs.block_k)
  vp, bv = _padded(dv, bs.block_v)
  n_chunks = -(-t // chunk)
  if bs.state_segments is None:
    segments = auto_state_segments(b, h, max(kp, vp), n_chunks)
  else:
    segments = max(1, min(bs.state_segments, n_chunks))  # no more segments than chunks
  tp = -(-t // (chunk * segments)) * chunk * segments
  mp = max(16, _next_pow2(m))
  cd = jnp.result_type(q.dtype, k.dtype, v.dtype, s.dtype)
  low = None if cd == jnp.float32 else cd
  return _Config(t=t, tp=tp, dk=dk, kp=kp, bk=bk, dv=dv, vp=vp, bv=bv, m=m, mp=mp, grp=hq // h, scale=float(scale),
                chunk=chunk, num_warps=bs.num_warps, num_stages=bs.num_stages, low_precision=low,
                split_all=bs.split_all, interpret=bool(interpret), state_block=bs.state_block,
                state_num_warps=bs.state_num_warps, state_num_stages=bs.state_num_stages,
                recompute_states=bs.recompute_states, state_segments=segments,
                vary=vary)


def gsa_pallas_gpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    s: jax.Array,
    g: jax.Array,
    *,
    scale: float,
    initial_state: GSAState | None = None,
    segment_ids: jax.Array | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, GSAState]:
  """GSA with the Pallas GPU kernels; arguments and results as `gsa_jax.ops.chunked.chunk_gsa` (the kernels' chunk
  is `block_sizes.chunk`).

  q [b, t, hq, dk]; k [b, t, h, dk]; v [b, t, h, dv]; s, g [b, t, h, m]. Differentiable in every array input
  (custom_vjp). Raises ValueError on inputs the kernels do not support (`unsupported_reason`);
  `gated_slot_attention(..., backend="pallas_gpu")` runs those with 'chunked'. `interpret=None` interprets the
  kernels on non-GPU platforms (slow; for tests).
  """
  reason = unsupported_reason(q, k, v, s, g, segment_ids, interpret=interpret)
  if reason is not None:
    raise ValueError(f"gsa_pallas_gpu does not support {reason}; gated_slot_attention(..., backend='pallas_gpu') "
                     "runs such inputs with 'chunked'.")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
    if interpret:  # asked for by name off its platform: correct, but orders of magnitude slower
      _log_once(f"gated_slot_attention: backend 'pallas_gpu' on {jax.default_backend()} runs its kernels in Pallas "
                "interpret mode (correct but slow, meant for tests); use backend='auto' or 'chunked' there.")
  cfg = make_config(q, k, v, s, scale=scale, block_sizes=block_sizes, interpret=interpret,
                    vary=varying_axes(q, k, v, s, g, segment_ids))
  b, h, dk, dv, m = q.shape[0], k.shape[2], k.shape[3], v.shape[3], s.shape[3]
  cd = jnp.result_type(q.dtype, k.dtype, v.dtype, s.dtype)

  s, g, _, valid, doc = _documents(s, g, segment_ids)
  if initial_state is None:
    hk0 = jnp.zeros((b, h, dk, m), jnp.float32)
    hv0 = jnp.zeros((b, h, m, dv), jnp.float32)
  else:
    hk0, hv0 = (x.astype(jnp.float32) for x in initial_state)
  hk0, hv0 = to_varying(hk0, cfg.vary), to_varying(hv0, cfg.vary)
  o, hkt, hvt = _gsa_core(cfg, q.astype(cd), k.astype(cd), v.astype(cd), s.astype(cd), g.astype(jnp.float32),
                          hk0, hv0, doc)
  if valid is not None:
    o = o * valid[..., None, None].astype(o.dtype)
  return o.astype(q.dtype), GSAState(hkt, hvt)


@functools.partial(jax.jit, static_argnames=("scale",))
def gsa_decode_step(q, k, v, s, g, state: GSAState, *, scale: float):
  """One token for a whole batch (q [b, hq, dk]; k [b, h, dk]; v [b, h, dv]; s, g [b, h, m]): the spec's
  recurrence as one fused XLA computation (`gsa_jax.ops.recurrent.gsa_step`). `gsa_decode_step_pallas` is the
  same step as one Pallas kernel; `benchmarks/bench_pallas_gpu.py --decode` times both."""
  return gsa_step(q, k, v, s, g, state, scale=scale)


def _decode_kernel(q_ref, k_ref, v_ref, s_ref, g_ref, hk_ref, hv_ref, o_ref, hk_out_ref, hv_out_ref, *, grp, scale,
                   m, block, n_k, n_v):
  """One token for one (batch, kv head), float32 throughout (elementwise products and sums, no matrix unit: the
  operands are vectors). q [grp, dk]; k [dk]; v [dv]; s, g [mp]; hk [dk, mp]; hv [mp, dv]; o [grp, dv].
  dk and dv are walked in blocks of `block`; slots past m are padding (masked out of the softmax)."""
  f32 = jnp.float32
  alpha = jnp.exp(g_ref[...].astype(f32))  # [mp]
  sv = s_ref[...].astype(f32)

  def key_block(j, z):
    cols = pl.ds(pl.multiple_of(j * block, block), block)
    hk = hk_ref[cols, :] * alpha[None, :] + k_ref[cols].astype(f32)[:, None] * sv[None, :]  # [block, mp]
    hk_out_ref[cols, :] = hk
    return tuple(z[a] + jnp.sum(q_ref[a, cols].astype(f32)[:, None] * hk, axis=0) for a in range(grp))

  z = lax.fori_loop(0, n_k, key_block, tuple(jnp.zeros_like(alpha) for _ in range(grp)))
  valid = jnp.arange(alpha.shape[0]) < m
  p = []
  for a in range(grp):
    za = jnp.where(valid, scale * z[a], -jnp.inf)
    ea = jnp.exp(za - jnp.max(za))
    p.append(ea / jnp.sum(ea))

  def value_block(j, carry):
    cols = pl.ds(pl.multiple_of(j * block, block), block)
    hv = hv_ref[:, cols] * alpha[:, None] + sv[:, None] * v_ref[cols].astype(f32)[None, :]  # [mp, block]
    hv_out_ref[:, cols] = hv
    for a in range(grp):
      o_ref[a, cols] = jnp.sum(p[a][:, None] * hv, axis=0).astype(o_ref.dtype)
    return carry

  lax.fori_loop(0, n_v, value_block, 0)


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def gsa_decode_step_pallas(q, k, v, s, g, state: GSAState, *, scale: float, interpret: bool | None = None):
  """`gsa_decode_step` as one Pallas kernel (grid: batch x kv head; the state updated in place when donated).

  Shapes and results as `gsa_jax.ops.recurrent.gsa_step` with a float32 state. Widths are padded to powers of two
  (at least 16) inside; `interpret=None` interprets the kernel on non-GPU platforms. Slower than the fused XLA step
  on the H100 (B1 / B64, H4 K=V=512 M64: 0.063 / 0.107 ms against 0.050 / 0.073 ms, `bench_pallas_gpu.py
  --decode`, docs/benchmarks.md), so the model decodes with `gsa_decode_step`; kept as a tested alternative.
  """
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
    if interpret:  # asked for by name off its platform: correct, but orders of magnitude slower
      _log_once(f"gated_slot_attention: backend 'pallas_gpu' on {jax.default_backend()} runs its kernels in Pallas "
                "interpret mode (correct but slow, meant for tests); use backend='auto' or 'chunked' there.")
  b, hq, dk = q.shape
  h, dv, m = k.shape[1], v.shape[2], s.shape[2]
  grp = hq // h
  vary = varying_axes(q, k, v, s, g, *state)
  dkp, dvp, mp = (max(16, _next_pow2(d)) for d in (dk, dv, m))
  block = min(64, dkp, dvp)
  hk0 = _pad_to(state.hk.astype(jnp.float32), (b, h, dkp, mp))
  hv0 = _pad_to(state.hv.astype(jnp.float32), (b, h, mp, dvp))
  vec = lambda width: pl.BlockSpec((None, None, width), lambda bi, hi: (bi, hi, 0))
  hk_spec = pl.BlockSpec((None, None, dkp, mp), lambda bi, hi: (bi, hi, 0, 0))
  hv_spec = pl.BlockSpec((None, None, mp, dvp), lambda bi, hi: (bi, hi, 0, 0))
  kernel = functools.partial(_decode_kernel, grp=grp, scale=float(scale), m=m, block=block, n_k=dkp // block,
                             n_v=dvp // block)
  o, hk, hv = pl.pallas_call(
      kernel, grid=(b, h),
      in_specs=[pl.BlockSpec((None, grp, dkp), lambda bi, hi: (bi, hi, 0)), vec(dkp), vec(dvp), vec(mp), vec(mp),
                hk_spec, hv_spec],
      out_specs=[pl.BlockSpec((None, grp, dvp), lambda bi, hi: (bi, hi, 0)), hk_spec, hv_spec],
      out_shape=[kernel_output((b, hq, dvp), jnp.float32, vary), kernel_output(hk0.shape, jnp.float32, vary),
                 kernel_output(hv0.shape, jnp.float32, vary)],
      input_output_aliases={5: 1, 6: 2}, interpret=interpret, name="gsa_decode_step",
  )(_pad_to(q, (b, hq, dkp)), _pad_to(k, (b, h, dkp)), _pad_to(v, (b, h, dvp)), _pad_to(s, (b, h, mp)),
    _pad_to(g.astype(jnp.float32), (b, h, mp)), hk0, hv0)
  return o[:, :, :dv], GSAState(hk[:, :, :dk, :m], hv[:, :, :m, :dv])
