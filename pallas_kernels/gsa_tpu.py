"""Gated Slot Attention on TPU: Pallas (Mosaic) kernels with a `jax.custom_vjp`.

Verified only in Pallas' TPU interpret mode on CPU (and lowered to Mosaic on CPU), never run on a TPU yet.
Design and VMEM budget: docs/tpu_kernels.md.

Decomposition (spec sections 1-2; the same two attentions as `gsa_gpu`)
----------------------------------------------------------------------
GSA is two gated linear attentions that share the log gate g over the M slots:

  pass 1, "gv" (gate on the value side):  z = scale * GV(q, k, s)          state hk [dk, m]
  pass 2, "gk" (gate on the key side):    o = GK(p, s, v)                  state hv [m, dv]

with p = softmax(z) over the slots. A TPU core runs the grid sequentially, so each pass of the op is ONE fused
kernel over the grid (batch, kv head, chunk): batch and head "parallel", the chunk axis "arbitrary" and carrying
the float32 state in VMEM scratch. One grid step does a whole chunk: intra-chunk and inter-chunk parts, the
softmax (forward) and the state update.

  forward         (chunks forwards):  z, p, o; states hk, hv                               -> o, z, hk_T, hv_T
  backward part 1 (chunks forwards):  states hk, hv again; dp = GV(do, v, s), dz, dl = scale * dz,
                                      dq = GK(dl, s, k), sum_group(z dz + p dp)           -> dq, dl, gsum
  backward part 2 (chunks backwards): reverse states dhk, dhv; dk = GK_rev(s, dl, q), dv = GK_rev(s, p, do),
                                      ds = GV_rev(k, q, dl) + GV_rev(v, do, p)            -> dk, dv, ds, dh_0
  dg: the identity of spec section 2 in XLA (`gsa_common.gate_grad`, shared with the GPU kernels).

Grouped-query heads of one kv head are handled inside one program (k, v, s, g are never repeated); the group's
query heads are summed inside backward part 2.

Numerical safety: the sub-chunk scheme of `gsa_common` (16-row sub-chunks; every exponent a sum of log gates
of one sign, <= 0). The kernels compute those sums themselves from g with 0/1 masks on the MXU (one [c, m] f32
stream instead of the four prefix/suffix arrays the GPU kernels read), and the diagonal 16 x 16 sub-blocks from
direct interval sums, not from a difference of prefix sums, so g = -1e3 next to g = 0 loses nothing.
Document boundaries are folded into the gates: a token that starts a new document gets log gate -1e30, so every
decay across it is exp(<= -1e30) = 0 exactly (no document masks in the kernels); padding tokens get s = g = 0.

TPU layout rules: the wrapper transposes to head-major [b, h, (group,) t, d] and zero-pads K, V, M to multiples of
128 (lanes) and T to a multiple of the chunk (a multiple of 16, so of the 8 sublanes); every block's last two dims
are then (chunk, 128 * n) or (128 * n, 128 * n). Padded slots are masked out of the softmax.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from gsa_jax.ops.common import RESIDUALS_NAME, GSAState, kernel_output, to_varying, varying_axes
from pallas_kernels.gsa_common import SUB, documents, gate_grad, pad_to

_log = logging.getLogger(__name__)
_LANES = 128
_RESET = -1e30  # log gate of a token that starts a new document: exp of any sum containing it is 0
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """`chunk`: tokens per grid step (a multiple of 16; 64 or 128 on a TPU). Shorter sequences use one chunk."""

  chunk: int = 64

  def __post_init__(self):
    if not isinstance(self.chunk, int) or isinstance(self.chunk, bool) or self.chunk < SUB or self.chunk % SUB:
      raise ValueError(f"BlockSizes.chunk={self.chunk!r} must be a positive multiple of {SUB}.")


@functools.cache
def _log_once(message: str) -> None:
  _log.warning(message)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def unsupported_reason(q, k, v, s, g, segment_ids=None, *, interpret=None) -> str | None:
  """Why the Pallas TPU kernels cannot run these inputs (None if they can); `gsa_jax.ops.select_backend` runs
  such calls with 'chunked'. Any segment ids, interpreted or not (the arguments every kernel module's
  `unsupported_reason` takes)."""
  del segment_ids, interpret
  dtypes = {x.dtype for x in (q, k, v, s, g)}
  if any(d not in (jnp.float32, jnp.bfloat16) for d in dtypes):
    return f"dtypes {sorted(str(d) for d in dtypes)} (the TPU kernels take float32 or bfloat16)"
  return None


def interpret_params(interpret):
  """What to pass as `pallas_call(interpret=...)`: TPU interpret mode (it simulates VMEM, the grid order and
  uninitialized memory as NaN) where this JAX has it (`pltpu.InterpretParams`, jax >= 0.7), else the generic
  interpreter. `interpret` may also be an InterpretParams object, passed through."""
  if interpret is True:
    params = getattr(pltpu, "InterpretParams", None) or getattr(pltpu, "TPUInterpretParams", None)
    return params() if params is not None else True
  return interpret


# ---------------------------------------------------------------------------------------------------------------
# In-kernel math on one chunk (values, not refs).
# ---------------------------------------------------------------------------------------------------------------

def _dot(a, b, ta=False, tb=False):
  """a @ b (a^T with ta, b^T with tb), float32 accumulation. bf16 x bf16 runs natively on the MXU; anything with a
  float32 operand runs in float32 at HIGHEST precision."""
  if a.dtype == jnp.bfloat16 and b.dtype == jnp.bfloat16:
    precision = None
  else:
    a, b, precision = a.astype(_F32), b.astype(_F32), lax.Precision.HIGHEST
  dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=_F32)


def _select(sel, x):
  """sel @ x for a 0/1 matrix sel: exact, in x's dtype on the MXU (bf16 natively)."""
  return _dot(sel.astype(x.dtype), x)


def _iota(shape, dim):
  return lax.broadcasted_iota(jnp.int32, shape, dim)


def _mask(n, keep):
  """[n, n] float32 0/1 matrix: keep(row, col)."""
  return keep(_iota((n, n), 0), _iota((n, n), 1)).astype(_F32)


class _Decays(NamedTuple):
  """Decay factors of one chunk for one time direction, all exp(sum of log gates) in [0, 1].

  Forward (a query row t sees key rows j <= t; the decay is exp(sum_{j < i <= t} g_i)):
    qf [c, m]   from the start of t's sub-chunk to t (inclusive).
    kf[a] [16a, m]  from key row j (exclusive) to the start of query sub-chunk a, for the rows before it.
    diag[a] [256, m]  pairs inside sub-chunk a, row tt * 16 + jj for query row tt and key row jj (both local);
      0 where the key is after the query. sel_t, sel_j [256, 16]: 0/1 matrices picking row tt and row jj.
    x [c, m] from the chunk start (the state) to row t; y [c, m] from row j (exclusive) to the chunk end.
  Backward (a query row t sees key rows j >= t; the decay is exp(sum_{t < i <= j} g_i)): the mirror image.
  total_row [1, m], total_col [m, 1]: the decay of the whole chunk.
  """

  qf: jax.Array
  kf: list
  diag: list
  sel_t: jax.Array
  sel_j: jax.Array
  x: jax.Array
  y: jax.Array
  total_row: jax.Array
  total_col: jax.Array


def _key_rows(a, ns, reverse):
  """The rows of the keys in sub-chunks a query sub-chunk a sees besides its own."""
  return slice((a + 1) * SUB, ns * SUB) if reverse else slice(0, a * SUB)


def _decays(g, reverse):
  """g [c, m] float32 (<= 0, -1e30 at document starts) -> _Decays. Every sum is taken directly over the interval
  it stands for (a 0/1 mask times g on the MXU), so each exponent is a sum of one sign: <= 0, no cancellation."""
  c = g.shape[0]
  ns = c // SUB
  incl_lower = _mask(c, lambda r, i: i <= r)  # sum_{i <= t}
  strict_upper = _mask(c, lambda r, i: i > r)  # sum_{i > t}
  prefix, suffix = _dot(incl_lower, g), _dot(strict_upper, g)
  x, y = (suffix, prefix) if reverse else (prefix, suffix)
  total_row = jnp.sum(g, axis=0, keepdims=True)
  total_col = _dot(g, jnp.ones((c, 1), _F32), ta=True)
  # Inside one sub-chunk: rows (query tt, key jj) flattened as tt * 16 + jj, against the summed row ii.
  r, ii = _iota((SUB * SUB, SUB), 0), _iota((SUB * SUB, SUB), 1)
  tt, jj = jnp.right_shift(r, 4), jnp.bitwise_and(r, SUB - 1)
  if reverse:
    diag_sum = ((tt < ii) & (ii <= jj)).astype(_F32)
    sub_q = _mask(SUB, lambda r_, i: i > r_)
  else:
    diag_sum = ((jj < ii) & (ii <= tt)).astype(_F32)
    sub_q = _mask(SUB, lambda r_, i: i <= r_)
  r2 = _iota((SUB * SUB, g.shape[1]), 0)
  diag_ok = (jnp.bitwise_and(r2, SUB - 1) >= jnp.right_shift(r2, 4)) if reverse else (
      jnp.bitwise_and(r2, SUB - 1) <= jnp.right_shift(r2, 4))
  qf, kf, diag = [], [], []
  for a in range(ns):
    ga = g[a * SUB:(a + 1) * SUB, :]
    qf.append(jnp.exp(_dot(sub_q, ga)))
    d = _dot(diag_sum, ga)  # [256, m]
    diag.append(jnp.exp(jnp.where(diag_ok, d, -jnp.inf)))
    rows = _key_rows(a, ns, reverse)
    n = rows.stop - rows.start
    if n == 0:
      kf.append(None)
    elif reverse:  # sum_{16(a+1) <= i <= j}
      kf.append(jnp.exp(_dot(_mask(n, lambda r_, i: i <= r_), g[rows, :])))
    else:  # sum_{j < i < 16a}
      kf.append(jnp.exp(_dot(_mask(n, lambda r_, i: i > r_), g[rows, :])))
  sel_t = (tt == ii).astype(_F32)
  sel_j = (jj == ii).astype(_F32)
  return _Decays(jnp.concatenate(qf, axis=0), kf, diag, sel_t, sel_j, jnp.exp(x), jnp.exp(y), jnp.exp(total_row),
                 jnp.exp(total_col))


def _intra(kind, q, k, v, dec, reverse):
  """The intra-chunk part of one gated linear attention over a chunk; float32 [c, w].

  gk (gate on the query/key axis, which is the slot axis): q, k [c, m], v [c, w];
      o_t = sum_j (sum_m q_t[m] k_j[m] decay_tj[m]) v_j.
  gv (gate on the value axis, the slot axis): q, k [c, w], v [c, m];
      o_t[m] = sum_j (q_t . k_j) v_j[m] decay_tj[m].
  Pairs (t, j) with j <= t (forward) or j >= t (reverse); off-diagonal sub-chunk pairs as matrix products with the
  decay split at the start (end) of t's sub-chunk, the diagonal 16 x 16 blocks element-wise over the 256 pairs
  (rows picked and summed back by 0/1 matrix products, so every value stays 2-D: no lane <-> sublane relayout).
  """
  c = q.shape[0]
  ns = c // SUB
  out = []
  for a in range(ns):
    ra = slice(a * SUB, (a + 1) * SUB)
    rows = _key_rows(a, ns, reverse)
    e = dec.diag[a]  # [256, m]
    if kind == "gk":
      qa = q[ra, :].astype(_F32)
      pairs = _select(dec.sel_t, q[ra, :]) * _select(dec.sel_j, k[ra, :]) * e  # [256, m]
      att = _dot(dec.sel_t, jnp.sum(pairs, axis=1, keepdims=True) * dec.sel_j, ta=True)  # [16, 16]
      acc = _dot(att, v[ra, :])
      if dec.kf[a] is not None:
        att = _dot(qa * dec.qf[ra, :], k[rows, :] * dec.kf[a], tb=True)
        acc = acc + _dot(att, v[rows, :])
    else:
      att = _dot(q[ra, :], k[ra, :], tb=True)  # [16, 16]
      att_pairs = jnp.sum(_dot(dec.sel_t, att) * dec.sel_j, axis=1, keepdims=True)  # [256, 1]
      acc = _dot(dec.sel_t, att_pairs * _select(dec.sel_j, v[ra, :]) * e, ta=True)  # [16, m]
      if dec.kf[a] is not None:
        att = _dot(q[ra, :], k[rows, :], tb=True)
        acc = acc + _dot(att, v[rows, :] * dec.kf[a]) * dec.qf[ra, :]
    out.append(acc)
  return jnp.concatenate(out, axis=0) if ns > 1 else out[0]


def _softmax(z, m):
  """Softmax over the first m lanes of z [c, mp] (padded slots get p = 0), float32."""
  z = jnp.where(_iota(z.shape, 1) < m, z, -jnp.inf)
  e = jnp.exp(z - jnp.max(z, axis=1, keepdims=True))
  return e / jnp.sum(e, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------------------------
# The state carried across the chunk axis of the grid (the last, sequential one) in VMEM scratch.
# ---------------------------------------------------------------------------------------------------------------

def _carried(first_ref_a, first_ref_b, scr_a, scr_b):
  """The pair carried into this chunk in scratch (at the first chunk of a row, first_ref_a/b's values): the state
  (hk [kp, mp], hv [mp, vp]) entering the chunk, or in the reverse pass the gradient of the state leaving it."""
  @pl.when(pl.program_id(2) == 0)
  def _init():
    scr_a[...] = first_ref_a[...]
    scr_b[...] = first_ref_b[...]

  return scr_a[...], scr_b[...]


def _store_at_last_chunk(scr_a, scr_b, out_ref_a, out_ref_b):
  """After the row's last chunk, the carried pair is the pass's result (final state, or initial state gradient)."""
  @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
  def _final():
    out_ref_a[...] = scr_a[...]
    out_ref_b[...] = scr_b[...]


def _state_after_chunk(hk, hv, k, v, s, dec):
  """The state leaving a chunk from the state entering it (float32): hk [kp, mp] decayed over the chunk plus the
  chunk's keys written into the slots, k^T (s * y); hv [mp, vp] likewise with the values, (s * y)^T v."""
  return hk * dec.total_row + _dot(k, s * dec.y, ta=True), hv * dec.total_col + _dot(s * dec.y, v, ta=True)


# ---------------------------------------------------------------------------------------------------------------
# Kernels: grid (batch, kv head, chunk); refs are one chunk of one kv head (its query group for q-side tensors).
# ---------------------------------------------------------------------------------------------------------------

def _fwd_kernel(q_ref, k_ref, v_ref, s_ref, g_ref, hk0_ref, hv0_ref, o_ref, z_ref, hkt_ref, hvt_ref, hk_scr,
                hv_scr, *, scale, m, gq):
  """q [gq, c, kp]; k [c, kp]; v [c, vp]; s [c, mp]; g [c, mp] f32; hk0/hkt [kp, mp]; hv0/hvt [mp, vp];
  o [gq, c, vp]; z [gq, c, mp] f32. Scratch: hk [kp, mp], hv [mp, vp] f32, the state entering this chunk."""
  hk, hv = _carried(hk0_ref, hv0_ref, hk_scr, hv_scr)
  dec = _decays(g_ref[...], reverse=False)
  k, v, s = k_ref[...], v_ref[...], s_ref[...]
  for qa in range(gq):
    q = q_ref[qa]
    z = scale * (_intra("gv", q, k, s, dec, False) + _dot(q, hk) * dec.x)
    z_ref[qa] = z
    p = _softmax(z, m)
    o = _intra("gk", p, s, v, dec, False) + _dot(p * dec.x, hv)
    o_ref[qa] = o.astype(o_ref.dtype)
  hk_scr[...], hv_scr[...] = _state_after_chunk(hk, hv, k, v, s, dec)
  _store_at_last_chunk(hk_scr, hv_scr, hkt_ref, hvt_ref)


def _bwd_fwd_kernel(q_ref, k_ref, v_ref, s_ref, g_ref, hk0_ref, hv0_ref, do_ref, z_ref, dq_ref, dl_ref, gsum_ref,
                    hk_scr, hv_scr, *, scale, m, gq):
  """Backward part 1, chunks forwards. do [gq, c, vp]; z [gq, c, mp] f32 (saved by the forward);
  dq [gq, c, kp]; dl [gq, c, mp] f32 (gradient of the unscaled logits); gsum [c, mp] f32 = sum_group(z dz + p dp)."""
  hk, hv = _carried(hk0_ref, hv0_ref, hk_scr, hv_scr)  # the forward's state recurrence, recomputed
  dec = _decays(g_ref[...], reverse=False)
  k, v, s = k_ref[...], v_ref[...], s_ref[...]
  gsum = jnp.zeros(s.shape, _F32)
  for qa in range(gq):
    z = z_ref[qa]
    p = _softmax(z, m)
    do = do_ref[qa]
    dp = _intra("gv", do, v, s, dec, False) + _dot(do, hv, tb=True) * dec.x
    dz = p * (dp - jnp.sum(p * dp, axis=1, keepdims=True))
    dl = scale * dz
    dl_ref[qa] = dl
    dq = _intra("gk", dl, s, k, dec, False) + _dot(dl * dec.x, hk, tb=True)
    dq_ref[qa] = dq.astype(dq_ref.dtype)
    gsum = gsum + z * dz + p * dp
  gsum_ref[...] = gsum
  hk_scr[...], hv_scr[...] = _state_after_chunk(hk, hv, k, v, s, dec)


def _bwd_rev_kernel(q_ref, k_ref, v_ref, s_ref, g_ref, do_ref, z_ref, dl_ref, dhkt_ref, dhvt_ref, dk_ref, dv_ref,
                    ds_ref, dhk0_ref, dhv0_ref, dhk_scr, dhv_scr, *, m, gq):
  """Backward part 2, chunks backwards (the chunk index map is reversed). dhk [kp, mp], dhv [mp, vp] f32 scratch:
  the gradient of the state leaving this chunk. dk [c, kp], dv [c, vp], ds [c, mp] f32."""
  dhk, dhv = _carried(dhkt_ref, dhvt_ref, dhk_scr, dhv_scr)
  dec = _decays(g_ref[...], reverse=True)
  k, v, s = k_ref[...], v_ref[...], s_ref[...]
  sx = s * dec.x
  dk = _dot(sx, dhk, tb=True)
  dv = _dot(sx, dhv)
  ds = (_dot(k, dhk) + _dot(v, dhv, tb=True)) * dec.x
  dhk_new = dhk * dec.total_row
  dhv_new = dhv * dec.total_col
  for qa in range(gq):
    q, do, dl = q_ref[qa], do_ref[qa], dl_ref[qa]
    p = _softmax(z_ref[qa], m)
    dk = dk + _intra("gk", s, dl, q, dec, True)
    dv = dv + _intra("gk", s, p, do, dec, True)
    ds = ds + _intra("gv", k, q, dl, dec, True) + _intra("gv", v, do, p, dec, True)
    dhk_new = dhk_new + _dot(q, dl * dec.y, ta=True)
    dhv_new = dhv_new + _dot(p * dec.y, do, ta=True)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  ds_ref[...] = ds
  dhk_scr[...] = dhk_new
  dhv_scr[...] = dhv_new
  _store_at_last_chunk(dhk_scr, dhv_scr, dhk0_ref, dhv0_ref)


# ---------------------------------------------------------------------------------------------------------------
# pallas_call wrappers.
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Config:
  t: int
  tp: int
  dk: int
  kp: int
  dv: int
  vp: int
  m: int
  mp: int
  grp: int
  scale: float
  chunk: int
  interpret: object  # False, True, or a hashable InterpretParams
  vary: frozenset = frozenset()  # shard_map mesh axes the inputs vary over (gsa_jax.ops.common.varying_axes)

  @property
  def n(self):
    return self.tp // self.chunk


def _specs(cfg: _Config, reverse: bool):
  """BlockSpec factories for grid (b, h, n): per-chunk q-group [gq, c, w], per-chunk kv [c, w], per-head state."""
  n = cfg.n
  chunk_index = (lambda ci: n - 1 - ci) if reverse else (lambda ci: ci)
  group = lambda w: pl.BlockSpec((None, None, cfg.grp, cfg.chunk, w),
                                 lambda bi, hi, ci: (bi, hi, 0, chunk_index(ci), 0))
  rows = lambda w: pl.BlockSpec((None, None, cfg.chunk, w), lambda bi, hi, ci: (bi, hi, chunk_index(ci), 0))
  state = lambda x, y: pl.BlockSpec((None, None, x, y), lambda bi, hi, ci: (bi, hi, 0, 0))
  return group, rows, state


def vmem_bytes(pass_name: str, *, chunk: int, kp: int, vp: int, mp: int, grp: int = 1, itemsize: int = 2) -> int:
  """VMEM one program of a pass needs: every block double-buffered, the float32 state scratch, and the largest
  in-kernel temporaries (decay factors, the group's float32 results). An estimate from the block shapes, for
  `vmem_limit_bytes` and docs/tpu_kernels.md; Mosaic's own temporaries come on top."""
  c, f = chunk, 4
  ns = c // SUB
  blocks = {  # (elements, bytes per element) of every block
      "forward": [(grp * c * kp, itemsize), (c * kp, itemsize), (c * vp, itemsize), (c * mp, itemsize), (c * mp, f),
                  (kp * mp, f), (mp * vp, f), (grp * c * vp, itemsize), (grp * c * mp, f), (kp * mp, f),
                  (mp * vp, f)],
      "backward_1": [(grp * c * kp, itemsize), (c * kp, itemsize), (c * vp, itemsize), (c * mp, itemsize),
                     (c * mp, f), (kp * mp, f), (mp * vp, f), (grp * c * vp, itemsize), (grp * c * mp, f),
                     (grp * c * kp, itemsize), (grp * c * mp, f), (c * mp, f)],
      "backward_2": [(grp * c * kp, itemsize), (c * kp, itemsize), (c * vp, itemsize), (c * mp, itemsize),
                     (c * mp, f), (grp * c * vp, itemsize), (grp * c * mp, f), (grp * c * mp, f), (kp * mp, f),
                     (mp * vp, f), (c * kp, itemsize), (c * vp, itemsize), (c * mp, f), (kp * mp, f),
                     (mp * vp, f)],
  }[pass_name]
  buffered = 2 * sum(e * b for e, b in blocks)
  scratch = (kp * mp + mp * vp) * f
  # Decay factors: qf, x, y [c, m], kf (sum over sub-chunks <= c * m), diag ns * [256, m]; one [256, m]
  # product in flight; the float32 results of one query head (the widest pass writes [c, max(kp, vp)] twice).
  decays = (4 * c * mp + ns * SUB * SUB * mp + SUB * SUB * mp) * f
  results = 3 * c * max(kp, vp, mp) * f
  return buffered + scratch + decays + results


def _compiler_params(cfg: _Config, pass_name: str, itemsize: int):
  need = vmem_bytes(pass_name, chunk=cfg.chunk, kp=cfg.kp, vp=cfg.vp, mp=cfg.mp, grp=cfg.grp, itemsize=itemsize)
  # Ask for more than Mosaic's default scoped limit (16 MiB on v4/v5e) only when the estimate needs it.
  limit = None if need * 3 // 2 <= 16 * 2**20 else min(need * 3 // 2, 100 * 2**20)
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"), vmem_limit_bytes=limit)


def _forward_call(cfg: _Config, q, k, v, s, g, hk0, hv0):
  b, h = k.shape[:2]
  group, rows, state = _specs(cfg, reverse=False)
  kernel = functools.partial(_fwd_kernel, scale=cfg.scale, m=cfg.m, gq=cfg.grp)
  return pl.pallas_call(
      kernel,
      grid=(b, h, cfg.n),
      in_specs=[group(cfg.kp), rows(cfg.kp), rows(cfg.vp), rows(cfg.mp), rows(cfg.mp), state(cfg.kp, cfg.mp),
                state(cfg.mp, cfg.vp)],
      out_specs=[group(cfg.vp), group(cfg.mp), state(cfg.kp, cfg.mp), state(cfg.mp, cfg.vp)],
      out_shape=[kernel_output((b, h, cfg.grp, cfg.tp, cfg.vp), q.dtype, cfg.vary),
                 kernel_output((b, h, cfg.grp, cfg.tp, cfg.mp), _F32, cfg.vary),
                 kernel_output((b, h, cfg.kp, cfg.mp), _F32, cfg.vary),
                 kernel_output((b, h, cfg.mp, cfg.vp), _F32, cfg.vary)],
      scratch_shapes=[pltpu.VMEM((cfg.kp, cfg.mp), _F32), pltpu.VMEM((cfg.mp, cfg.vp), _F32)],
      compiler_params=_compiler_params(cfg, "forward", q.dtype.itemsize),
      interpret=cfg.interpret,
      name="gsa_tpu_fwd",
  )(q, k, v, s, g, hk0, hv0)


def _backward_calls(cfg: _Config, q, k, v, s, g, hk0, hv0, do, z, dhkt, dhvt):
  b, h = k.shape[:2]
  cd = q.dtype
  group, rows, state = _specs(cfg, reverse=False)
  dq, dl, gsum = pl.pallas_call(
      functools.partial(_bwd_fwd_kernel, scale=cfg.scale, m=cfg.m, gq=cfg.grp),
      grid=(b, h, cfg.n),
      in_specs=[group(cfg.kp), rows(cfg.kp), rows(cfg.vp), rows(cfg.mp), rows(cfg.mp), state(cfg.kp, cfg.mp),
                state(cfg.mp, cfg.vp), group(cfg.vp), group(cfg.mp)],
      out_specs=[group(cfg.kp), group(cfg.mp), rows(cfg.mp)],
      out_shape=[kernel_output(q.shape, cd, cfg.vary),
                 kernel_output((b, h, cfg.grp, cfg.tp, cfg.mp), _F32, cfg.vary),
                 kernel_output((b, h, cfg.tp, cfg.mp), _F32, cfg.vary)],
      scratch_shapes=[pltpu.VMEM((cfg.kp, cfg.mp), _F32), pltpu.VMEM((cfg.mp, cfg.vp), _F32)],
      compiler_params=_compiler_params(cfg, "backward_1", cd.itemsize),
      interpret=cfg.interpret,
      name="gsa_tpu_bwd_forward_time",
  )(q, k, v, s, g, hk0, hv0, do, z)
  group, rows, _ = _specs(cfg, reverse=True)
  dk, dv, ds, dhk0, dhv0 = pl.pallas_call(
      functools.partial(_bwd_rev_kernel, m=cfg.m, gq=cfg.grp),
      grid=(b, h, cfg.n),
      in_specs=[group(cfg.kp), rows(cfg.kp), rows(cfg.vp), rows(cfg.mp), rows(cfg.mp), group(cfg.vp),
                group(cfg.mp), group(cfg.mp), state(cfg.kp, cfg.mp), state(cfg.mp, cfg.vp)],
      out_specs=[rows(cfg.kp), rows(cfg.vp), rows(cfg.mp), state(cfg.kp, cfg.mp), state(cfg.mp, cfg.vp)],
      out_shape=[kernel_output(k.shape, cd, cfg.vary), kernel_output(v.shape, cd, cfg.vary),
                 kernel_output(s.shape, _F32, cfg.vary), kernel_output(hk0.shape, _F32, cfg.vary),
                 kernel_output(hv0.shape, _F32, cfg.vary)],
      scratch_shapes=[pltpu.VMEM((cfg.kp, cfg.mp), _F32), pltpu.VMEM((cfg.mp, cfg.vp), _F32)],
      compiler_params=_compiler_params(cfg, "backward_2", cd.itemsize),
      interpret=cfg.interpret,
      name="gsa_tpu_bwd_reverse_time",
  )(q, k, v, s, g, do, z, dl, dhkt, dhvt)
  return dq, dk, dv, ds, gsum, dhk0, dhv0


# ---------------------------------------------------------------------------------------------------------------
# The custom_vjp core: padded head-major arrays in and out.
#   q [b, h, grp, tp, kp]; k [b, h, tp, kp]; v [b, h, tp, vp]; s [b, h, tp, mp]; g [b, h, tp, mp] f32;
#   hk0 [b, h, kp, mp], hv0 [b, h, mp, vp] f32; doc [b, tp] int32 (document index, only for dg).
# ---------------------------------------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gsa_core(cfg, q, k, v, s, g, hk0, hv0, doc):
  del doc
  o, _, hkt, hvt = _forward_call(cfg, q, k, v, s, g, hk0, hv0)
  return o, hkt, hvt


def _core_fwd(cfg, q, k, v, s, g, hk0, hv0, doc):
  o, z, hkt, hvt = _forward_call(cfg, q, k, v, s, g, hk0, hv0)
  # Named for remat policies (gsa_jax.ops.common): with these kept, the remat backward does not rerun the kernel.
  z, hkt_res, hvt_res = (checkpoint_name(x, RESIDUALS_NAME) for x in (z, hkt, hvt))
  return (o, hkt, hvt), (q, k, v, s, g, hk0, hv0, doc, z, hkt_res, hvt_res)


def _core_bwd(cfg, saved, cts):
  q, k, v, s, g, hk0, hv0, doc, z, hkt, hvt = saved
  do, dhkt, dhvt = cts
  cd = q.dtype
  dq, dk, dv, ds, gsum, dhk0, dhv0 = _backward_calls(cfg, q, k, v, s, g, hk0, hv0, do.astype(cd), z,
                                                     dhkt.astype(_F32), dhvt.astype(_F32))
  time_major = lambda x: jnp.swapaxes(x, 1, 2)  # [b, h, tp, mp] <-> [b, tp, h, mp]
  dg = gate_grad(time_major(gsum), time_major(s), time_major(ds), doc, dhkt.astype(_F32), hkt,
                 dhvt.astype(_F32), hvt)
  return dq, dk, dv, ds.astype(cd), time_major(dg), dhk0, dhv0, None


_gsa_core.defvjp(_core_fwd, _core_bwd)


# ---------------------------------------------------------------------------------------------------------------
# Public entry point.
# ---------------------------------------------------------------------------------------------------------------

def gsa_pallas_tpu(
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
    interpret=None,
) -> tuple[jax.Array, GSAState]:
  """GSA with the Pallas TPU kernels; arguments and results as `gsa_jax.ops.chunked.chunk_gsa` (the kernels' chunk
  is `block_sizes.chunk`).

  q [b, t, hq, dk]; k [b, t, h, dk]; v [b, t, h, dv]; s, g [b, t, h, m]. Differentiable in every array input
  (custom_vjp). Raises ValueError on inputs the kernels do not support (`unsupported_reason`);
  `gated_slot_attention(..., backend="pallas_tpu")` runs those with 'chunked'. `interpret=None` runs TPU interpret
  mode (`interpret_params`) on non-TPU platforms (slow; for tests); True forces it, False compiles for a TPU.
  """
  reason = unsupported_reason(q, k, v, s, g, segment_ids, interpret=interpret)
  if reason is not None:
    raise ValueError(f"gsa_pallas_tpu does not support {reason}; gated_slot_attention(..., backend='pallas_tpu') "
                     "runs such inputs with 'chunked'.")
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
    if interpret:  # asked for by name off its platform: correct, but orders of magnitude slower
      _log_once(f"gated_slot_attention: backend 'pallas_tpu' on {jax.default_backend()} runs its kernels in Pallas "
                "interpret mode (correct but slow, meant for tests); use backend='auto' or 'chunked' there.")
  bs = block_sizes or BlockSizes()
  b, t, hq, dk = q.shape
  h, dv, m = k.shape[2], v.shape[3], s.shape[3]
  grp = hq // h
  chunk = min(bs.chunk, _round_up(t, SUB))
  tp = _round_up(t, chunk)
  kp, vp, mp = (_round_up(d, _LANES) for d in (dk, dv, m))
  cd = jnp.result_type(q.dtype, k.dtype, v.dtype, s.dtype)
  cfg = _Config(t=t, tp=tp, dk=dk, kp=kp, dv=dv, vp=vp, m=m, mp=mp, grp=grp, scale=float(scale), chunk=chunk,
                interpret=interpret_params(interpret), vary=varying_axes(q, k, v, s, g, segment_ids))

  # g = -inf is a forget gate of exactly 0: the same as -1e30 here (exp of either is 0, and so is the gradient),
  # and it keeps the 0/1-mask sums in the kernels free of 0 * inf.
  s, g, reset, valid, doc = documents(s, jnp.maximum(g.astype(_F32), _RESET), segment_ids)
  g = jnp.where(reset[..., None, None], _RESET, g)  # the state is zeroed before this token: decay 0
  doc = jnp.pad(doc, ((0, 0), (0, tp - t)), mode="edge") if tp != t else doc
  if initial_state is None:
    hk0 = jnp.zeros((b, h, kp, mp), _F32)
    hv0 = jnp.zeros((b, h, mp, vp), _F32)
  else:
    hk0 = pad_to(initial_state[0].astype(_F32), (b, h, kp, mp))
    hv0 = pad_to(initial_state[1].astype(_F32), (b, h, mp, vp))
  hk0, hv0 = to_varying(hk0, cfg.vary), to_varying(hv0, cfg.vary)

  def head_major(x, width):  # [b, t, h, d] -> [b, h, tp, width]
    return pad_to(jnp.swapaxes(x, 1, 2), (b, h, tp, width))

  qh = pad_to(q.astype(cd).reshape(b, t, h, grp, dk).transpose(0, 2, 3, 1, 4), (b, h, grp, tp, kp))
  o, hkt, hvt = _gsa_core(cfg, qh, head_major(k.astype(cd), kp), head_major(v.astype(cd), vp),
                          head_major(s.astype(cd), mp), head_major(g, mp), hk0, hv0, doc)
  o = o[:, :, :, :t, :dv].transpose(0, 3, 1, 2, 4).reshape(b, t, hq, dv)
  if valid is not None:
    o = o * valid[..., None, None].astype(o.dtype)
  return o.astype(q.dtype), GSAState(hkt[:, :, :dk, :m], hvt[:, :, :m, :dv])
