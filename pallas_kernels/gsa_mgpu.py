"""Gated Slot Attention on Hopper GPUs: the chunked forward as Pallas Mosaic GPU kernels (in progress, issue 20).

What runs where
---------------
The forward is the same two gated linear attentions as the Triton kernels (`gsa_gpu`'s docstring has the algebra):
z = scale * GV(q, k, s) over the key state hk [dk, m], p = softmax(z), o = GK(p, s, v) over the value state
hv [m, dv]. Chunks of C = 64 tokens, split into 16-row sub-chunks (`gsa_common.SUB`) so that every decay that is
exponentiated is a sum of gates of one sign (`gsa_common.chunk_gate_sums`). Per attention:

- `_state_pass` (sequential over chunks): one warpgroup per (state slice, kv head, batch) keeps the float32 state
  in registers and per chunk does  H <- H * exp(chunk total) + A^T @ B  as wgmmas (A, B: [C, .] tiles copied
  into shared memory by TMA, double buffered; the token axis is the contraction, so A is read transposed from
  shared memory; the float32 side as hi + lo). It writes the state entering every chunk as 16-bit hi + lo parts
  (the float32 value to ~2^-16, directly usable as wgmma operands) and the final state in float32.
- `_logits_pass` (GV outputs, parallel over chunks): per (chunk, query head, batch), an `emit_pipeline` over dk
  blocks of 64 accumulates the scores q @ k^T [C, C] and the inter-chunk product q @ hk [C, m] (two wgmmas, hk hi
  and lo); then the off-diagonal sub-chunk products sum_a rows_a(scores) @ (s * KF_a) (scores staged in shared
  memory as hi + lo). The diagonal 16 x 16 blocks and the gate factors are applied in XLA (see below).
- `_output_pass` (GK outputs, parallel over chunks): the gated intra-chunk scores sum_a rows_a((p * QF) @
  (s * KF_a)^T) (staged in shared memory as hi + lo), then, walking dv in blocks with an `emit_pipeline`,
  o = scores @ v + diag_scores @ v + (p * exp(F)) @ hv.
- Mosaic GPU's interpreter (jax 0.11.2) reads both wgmma operands from shared memory and has no `pl.run_state`
  accumulators or predicated stores; the kernels keep to what it runs, so that the CPU tests cover them.

XLA does the elementwise work around the kernels, on [T, m]-sized arrays: the gate sums, the decayed operands
(s * exp(B), s * KF_a, p * QF, p * exp(F)) split into hi + lo parts, the softmax, and the diagonal 16 x 16
sub-chunk blocks (fused reductions over [T, 16, m]; exp(F_i - F_j) inside one sub-chunk is the only decay that is
a difference, rounded as in the Triton kernels' diagonal walk). `QF` = exp(prefix sum inside the query's
sub-chunk), `KF_a` = the decay from a key to the start of query sub-chunk a (0 for keys not before a), `exp(F)` /
`exp(B)` the decays from the chunk start / to the chunk end.

Precision: every float32 operand of a product is carried as bf16 (or fp16) hi + lo, as the Triton kernels do
with `split_all=True`; accumulation is float32.

Scope today (the op runs everything else with `pallas_gpu`, the Triton kernels, with the reason logged once;
`unsupported_reason` says which): 16-bit inputs (bfloat16/float16; the kernels' wgmma operands), no segment ids,
M <= 64. Supported inside: grouped kv heads, initial and final states, any T (padded to the chunk; padding
tokens have s = g = 0, which leaves the state unchanged), any K and V (zero-padded to multiples of 64).

Backward: the Triton kernels' backward (`gsa_gpu._backward_cp` with recomputed chunk states), fed with this
forward's slot logits and final states; so gradients are those of the `pallas_gpu` backend.

Interpret mode: `interpret=None` runs the kernels in Mosaic GPU's interpreter off GPU (slow; for the CPU tests).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from gsa_jax.ops.common import RESIDUALS_NAME, GSAState, varying_axes
from pallas_kernels import gsa_gpu
from pallas_kernels.gsa_common import SUB as _SUB
from pallas_kernels.gsa_common import chunk_gate_sums as _chunk_gate_sums
from pallas_kernels.gsa_common import pad_to as _pad_to
from pallas_kernels.gsa_common import softmax as _softmax

_CHUNK = 64  # tokens per chunk: the row count of one warpgroup's wgmma
_TILE = 64  # feature tiles: 64 bf16 = one 128-byte swizzle row
_SLOTS = 64  # M is padded to this (the kernels' slot width)
_NS = _CHUNK // _SUB  # sub-chunks per chunk


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile widths (multiples of 64). `state_block`: the state slice one state-pass warpgroup owns (rows of hk,
  columns of hv). `out_block`: the dv columns one output-pass program writes (its float32 accumulator is
  [64, out_block]; 128 keeps it at 64 registers a thread)."""

  state_block: int = 64
  out_block: int = 128

  def __post_init__(self):
    for name in ("state_block", "out_block"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0 or value % _TILE:
        raise ValueError(f"BlockSizes.{name}={value!r}; expected a positive multiple of {_TILE}.")


def unsupported_reason(q, k, v, s, g, segment_ids=None, *, interpret=None) -> str | None:
  """Why the Mosaic GPU kernels cannot run these inputs (None if they can), interpreted or not;
  `gsa_jax.ops.select_backend` runs such calls with 'pallas_gpu'."""
  del interpret
  cd = jnp.result_type(q.dtype, k.dtype, v.dtype, s.dtype)
  if cd not in (jnp.bfloat16, jnp.float16) or g.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    dtypes = sorted({str(x.dtype) for x in (q, k, v, s, g)})
    return f"dtypes {dtypes} (the wgmma kernels take bfloat16 or float16 q, k, v, s)"
  if segment_ids is not None:
    return "segment_ids (document resets are not in the Mosaic GPU kernels yet)"
  if s.shape[-1] > _SLOTS:
    return f"M={s.shape[-1]} slots > {_SLOTS}"
  if varying_axes(q, k, v, s, g, segment_ids):
    return "shard_map-varying inputs (the Mosaic GPU kernels do not type their outputs for shard_map yet)"
  return None


# ---------------------------------------------------------------------------------------------------------------
# Kernel helpers.
# ---------------------------------------------------------------------------------------------------------------

def _transforms(dtype, minor: int):
  """Shared-memory tiling + swizzle for a [rows, minor] tile that wgmma or TMA reads (the widest swizzle that the
  minor dimension fills)."""
  swizzle = plgpu.find_swizzle(minor * jnp.dtype(dtype).itemsize * 8)
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))


def _smem(shape, dtype):
  return plgpu.SMEM(shape, dtype, transforms=_transforms(dtype, shape[-1]))


def _matmul(shape, products):
  """sum of a @ b over `products` ((a, b) pairs of shared-memory refs) as a float32 [rows, cols] array in the
  WGMMA layout."""
  def body(acc_ref):
    for a, b in products:
      plgpu.wgmma(acc_ref, a, b)
    return acc_ref[...]
  return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _split(x, dtype):
  """float32 x -> (hi, lo) in `dtype` with hi + lo = x to ~2^-16 relative."""
  hi = x.astype(dtype)
  return hi, (x - hi.astype(jnp.float32)).astype(dtype)


def _sub_chunk_rows(shape):
  """[rows, cols] int32 in the WGMMA layout: the 16-row sub-chunk of each row."""
  return plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA) // _SUB


def _store(value, smem, gmem):
  """registers -> shared memory -> (TMA) global memory; waits for the copy."""
  smem[...] = value
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(smem, gmem)
  plgpu.wait_smem_to_gmem(0)


def _interpret_params(interpret: bool):
  return plgpu.InterpretGPUParams() if interpret else None


# ---------------------------------------------------------------------------------------------------------------
# The kernels.
# ---------------------------------------------------------------------------------------------------------------

def _state_pass(kind, a_ops, b_ops, dec, h0, *, block, interpret):
  """States entering every chunk, for one gated linear attention.

  kind "gv" (key state hk [dk, m]): a_ops = (k [b, T, h, dk],), b_ops = the decayed slot writes s * exp(B) as
  (hi, lo) [b, T, h, m]; the slice owns `block` rows of dk. kind "gk" (value state hv [m, dv]): a_ops = (hi, lo)
  of s * exp(B), b_ops = (v [b, T, h, dv],); the slice owns `block` columns of dv. dec [b, h, n, m] float32: each
  chunk's total decay exp(sum of g); h0 [b, h, R, S] float32.
  Returns (hs_hi, hs_lo) [b, h, n, R, S] (state entering each chunk, 16-bit hi + lo parts) and ht [b, h, R, S] f32.
  """
  b, t, nh = a_ops[0].shape[:3]
  n = t // _CHUNK
  m = dec.shape[-1]
  rows, cols = h0.shape[2:]
  gv = kind == "gv"
  shape = (block, m) if gv else (m, block)
  cd = (b_ops if gv else a_ops)[0].dtype
  a_width, b_width = (block, m) if gv else (m, block)
  ops = len(a_ops) + len(b_ops)

  def body(*refs):
    a_refs, b_refs = refs[:len(a_ops)], refs[len(a_ops):ops]
    dec_ref, h0_ref, hs_hi_ref, hs_lo_ref, ht_ref = refs[ops:ops + 5]
    a_smem, b_smem, dec_smem, st_smem, f_smem, bars = refs[ops + 5:]
    j, hi_, bi = lax.axis_index("slice"), lax.axis_index("head"), lax.axis_index("batch")
    sl = pl.ds(j * block, block)

    def fetch(ci, slot):
      tok = pl.ds(ci * _CHUNK, _CHUNK)
      for x, (ref, smem) in enumerate(zip(a_refs, a_smem)):
        src = ref.at[bi, tok, hi_, sl] if gv else ref.at[bi, tok, hi_]
        plgpu.copy_gmem_to_smem(src, smem.at[slot], bars[x].at[slot])
      for x, (ref, smem) in enumerate(zip(b_refs, b_smem)):
        src = ref.at[bi, tok, hi_] if gv else ref.at[bi, tok, hi_, sl]
        plgpu.copy_gmem_to_smem(src, smem.at[slot], bars[len(a_refs) + x].at[slot])
      plgpu.copy_gmem_to_smem(dec_ref.at[bi, hi_, ci], dec_smem.at[slot], bars[-1].at[slot])

    fetch(0, 0)
    state_slice = (bi, hi_, sl) if gv else (bi, hi_, slice(None), sl)
    plgpu.copy_gmem_to_smem(h0_ref.at[state_slice], f_smem, bars[-2].at[0])
    plgpu.barrier_wait(bars[-2].at[0])
    h = plgpu.load(f_smem, layout=plgpu.Layout.WGMMA)

    def step(ci, h):
      slot = lax.rem(ci, 2)

      @pl.when(ci + 1 < n)
      def _prefetch():
        fetch(ci + 1, 1 - slot)

      out = (bi, hi_, ci, sl) if gv else (bi, hi_, ci, slice(None), sl)
      h_hi, h_lo = _split(h, cd)
      st_smem[0] = h_hi
      st_smem[1] = h_lo
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(st_smem.at[0], hs_hi_ref.at[out])
      plgpu.copy_smem_to_gmem(st_smem.at[1], hs_lo_ref.at[out])
      for x in range(ops):
        plgpu.barrier_wait(bars[x].at[slot])
      plgpu.barrier_wait(bars[-1].at[slot])
      # The chunk's decay runs along the slot axis: columns of hk, rows of hv.
      d = plgpu.load(dec_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0 if gv else 1))
      h = h * lax.broadcast_in_dim(d, shape, [1 if gv else 0])
      products = [(a.at[slot].T, bb.at[slot]) for a in a_smem for bb in b_smem]
      h = h + _matmul(shape, products)
      plgpu.wait_smem_to_gmem(0)  # st_smem is rewritten next step
      return h

    h = lax.fori_loop(0, n, step, h)
    _store(h, f_smem, ht_ref.at[state_slice])

  scratch = [
      [_smem((2, _CHUNK, a_width), x.dtype) for x in a_ops],
      [_smem((2, _CHUNK, b_width), x.dtype) for x in b_ops],
      plgpu.SMEM((2, m), jnp.float32),
      _smem((2,) + shape, cd),
      _smem(shape, jnp.float32),
      [plgpu.Barrier(num_barriers=2) for _ in range(ops + 2)],
  ]
  grid = ((rows if gv else cols) // block, nh, b)
  out_type = [jax.ShapeDtypeStruct((b, nh, n, rows, cols), cd)] * 2 + [
      jax.ShapeDtypeStruct((b, nh, rows, cols), jnp.float32)]
  hs_hi, hs_lo, ht = plgpu.kernel(
      body, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=("slice", "head", "batch"),
      interpret=_interpret_params(interpret))(*a_ops, *b_ops, dec, h0)
  return (hs_hi, hs_lo), ht


def _logits_pass(q, k, hk, sk, *, interpret):
  """The GV outputs of every chunk, before their gate factors.

  q [b, T, hq, dk], k [b, T, h, dk]; hk (hi, lo) [b, h, n, dk, m]: key state entering each chunk; sk (hi, lo)
  [b, T, h, NS - 1, m]: s * KF_a for query sub-chunks a = 1..NS-1. Returns (zi, zo, scores), float32:
  zi = q @ hk [b, T, hq, m]; zo [b, T, hq, m]: row i of sub-chunk a gets sum_{keys j before a} (q_i . k_j) *
  (s * KF_a)_j; scores = q @ k^T [b, T, hq, C] (each row against its chunk's keys, for the diagonal blocks).
  """
  b, t, hq, dk = q.shape
  h = k.shape[2]
  m = sk[0].shape[-1]
  grp = hq // h
  cd = q.dtype

  def body(q_ref, k_ref, hk_hi_ref, hk_lo_ref, sk_hi_ref, sk_lo_ref, zi_ref, zo_ref, sc_ref, sk_smem, sc_smem,
           z_smem, f_smem, bar):
    ci, qh, bi = lax.axis_index("chunk"), lax.axis_index("head"), lax.axis_index("batch")
    kh = qh // grp
    tok = pl.ds(ci * _CHUNK, _CHUNK)
    for x, ref in enumerate((sk_hi_ref, sk_lo_ref)):
      for a in range(_NS - 1):
        plgpu.copy_gmem_to_smem(ref.at[bi, tok, kh, a], sk_smem.at[x, a], bar.at[x * (_NS - 1) + a])
    block_spec = lambda rows: plgpu.BlockSpec(rows, lambda kb: (0, kb), transforms=_transforms(cd, _TILE),
                                              delay_release=1)
    state_spec = plgpu.BlockSpec((_TILE, m), lambda kb: (kb, 0), transforms=_transforms(cd, m), delay_release=1)

    def accumulate(acc_refs):
      scores_ref, zi_acc = acc_refs

      def kstep(_, q_s, k_s, hh_s, hl_s):
        plgpu.wgmma(scores_ref, q_s, k_s.T)
        plgpu.wgmma(zi_acc, q_s, hh_s)
        plgpu.wgmma(zi_acc, q_s, hl_s)
        # delay_release=1: the next fetch overwrites the previous step's buffers, so its products must be done;
        # this step's last product may still run.
        plgpu.wgmma_wait(1)

      plgpu.emit_pipeline(kstep, grid=(dk // _TILE,),
                          in_specs=[block_spec((_CHUNK, _TILE)), block_spec((_CHUNK, _TILE)), state_spec,
                                    state_spec], max_concurrent_steps=2)(
          q_ref.at[bi, tok, qh], k_ref.at[bi, tok, kh], hk_hi_ref.at[bi, kh, ci], hk_lo_ref.at[bi, kh, ci])
      return scores_ref[...], zi_acc[...]

    scores, zi = pl.run_scoped(accumulate, (plgpu.ACC((_CHUNK, _CHUNK)), plgpu.ACC((_CHUNK, m))))
    for x in range(2 * (_NS - 1)):
      plgpu.barrier_wait(bar.at[x])
    # The scores go through shared memory as hi + lo parts (wgmma operands); the sub-chunk row selection is
    # applied to the products, which is the same as applying it to the scores' rows.
    sc_smem[0], sc_smem[1] = _split(scores, cd)
    plgpu.commit_smem()
    sub = _sub_chunk_rows((_CHUNK, m))
    zo = None
    for a in range(1, _NS):
      part = _matmul((_CHUNK, m), [(sc_smem.at[0], sk_smem.at[0, a - 1]), (sc_smem.at[1], sk_smem.at[0, a - 1]),
                                   (sc_smem.at[0], sk_smem.at[1, a - 1])])
      part = jnp.where(sub == a, part, 0.0)
      zo = part if zo is None else zo + part
    out = (bi, tok, qh)
    _store(zi, z_smem, zi_ref.at[out])
    _store(zo, z_smem, zo_ref.at[out])
    _store(scores, f_smem, sc_ref.at[out])

  scratch = [_smem((2, _NS - 1, _CHUNK, m), cd), _smem((2, _CHUNK, _CHUNK), cd), _smem((_CHUNK, m), jnp.float32),
             _smem((_CHUNK, _CHUNK), jnp.float32), plgpu.Barrier(num_barriers=2 * (_NS - 1))]
  f32 = jnp.float32
  out_type = [jax.ShapeDtypeStruct((b, t, hq, m), f32)] * 2 + [jax.ShapeDtypeStruct((b, t, hq, _CHUNK), f32)]
  return plgpu.kernel(
      body, out_type=out_type, scratch_types=scratch, grid=(t // _CHUNK, hq, b),
      grid_names=("chunk", "head", "batch"), interpret=_interpret_params(interpret),
  )(q, k, *hk, *sk)


def _output_pass(pq, pf, sk, bd, v, hv, *, block, interpret):
  """The GK outputs o of every chunk.

  pq, pf (hi, lo) [b, T, hq, m]: p * QF and p * exp(F); sk (hi, lo) [b, T, h, NS - 1, m]: s * KF_a; bd (hi, lo)
  [b, T, hq, C]: the diagonal 16 x 16 blocks of the gated scores (zero elsewhere); v [b, T, h, dv]; hv (hi, lo)
  [b, h, n, m, dv]: value state entering each chunk. Returns o [b, T, hq, dv] in v's dtype; dv is walked in
  blocks of `block` by an `emit_pipeline` (the scores are computed once per chunk).
  """
  b, t, hq, m = pq[0].shape
  h, dv = v.shape[2:]
  grp = hq // h
  cd = v.dtype

  def body(pq_hi, pq_lo, pf_hi, pf_lo, sk_hi, sk_lo, bd_hi, bd_lo, v_ref, hv_hi, hv_lo, o_ref, row_smem, sk_smem,
           bd_smem, sc_smem, o_smem, bar):
    ci, qh, bi = lax.axis_index("chunk"), lax.axis_index("head"), lax.axis_index("batch")
    kh = qh // grp
    tok = pl.ds(ci * _CHUNK, _CHUNK)
    copies = [(ref.at[bi, tok, qh], row_smem.at[x]) for x, ref in enumerate((pq_hi, pq_lo, pf_hi, pf_lo))]
    copies += [(ref.at[bi, tok, kh, a], sk_smem.at[x, a]) for x, ref in enumerate((sk_hi, sk_lo))
               for a in range(_NS - 1)]
    copies += [(ref.at[bi, tok, qh], bd_smem.at[x]) for x, ref in enumerate((bd_hi, bd_lo))]
    for x, (src, dst) in enumerate(copies):
      plgpu.copy_gmem_to_smem(src, dst, bar.at[x])
    for x in range(len(copies)):
      plgpu.barrier_wait(bar.at[x])
    sub = _sub_chunk_rows((_CHUNK, _CHUNK))
    scores = None
    for a in range(1, _NS):
      key_side = (sk_smem.at[0, a - 1].T, sk_smem.at[1, a - 1].T)
      part = _matmul((_CHUNK, _CHUNK), [(row_smem.at[0], key_side[0]), (row_smem.at[1], key_side[0]),
                                        (row_smem.at[0], key_side[1])])
      part = jnp.where(sub == a, part, 0.0)
      scores = part if scores is None else scores + part
    sc_smem[0], sc_smem[1] = _split(scores, cd)  # wgmma operands, as hi + lo parts
    plgpu.commit_smem()

    def vstep(idx, v_s, hh_s, hl_s):
      o = _matmul((_CHUNK, block), [
          (sc_smem.at[0], v_s), (sc_smem.at[1], v_s), (bd_smem.at[0], v_s), (bd_smem.at[1], v_s),
          (row_smem.at[2], hh_s), (row_smem.at[3], hh_s), (row_smem.at[2], hl_s)])
      plgpu.wait_smem_to_gmem(0)  # the previous block's store has left o_smem
      o_smem[...] = o.astype(cd)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, o_ref.at[bi, tok, qh, pl.ds(idx[0] * block, block)])

    wide = lambda rows: plgpu.BlockSpec((rows, block), lambda j: (0, j), transforms=_transforms(cd, block))
    plgpu.emit_pipeline(vstep, grid=(dv // block,), in_specs=[wide(_CHUNK), wide(m), wide(m)],
                        max_concurrent_steps=2)(v_ref.at[bi, tok, kh], hv_hi.at[bi, kh, ci], hv_lo.at[bi, kh, ci])
    plgpu.wait_smem_to_gmem(0)

  scratch = [_smem((4, _CHUNK, m), cd), _smem((2, _NS - 1, _CHUNK, m), cd), _smem((2, _CHUNK, _CHUNK), cd),
             _smem((2, _CHUNK, _CHUNK), cd), _smem((_CHUNK, block), cd),
             plgpu.Barrier(num_barriers=4 + 2 * (_NS - 1) + 2)]  # one per copy
  return plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((b, t, hq, dv), cd), scratch_types=scratch, grid=(t // _CHUNK, hq, b),
      grid_names=("chunk", "head", "batch"), interpret=_interpret_params(interpret),
  )(*pq, *pf, *sk, *bd, v, *hv)


# ---------------------------------------------------------------------------------------------------------------
# XLA math around the kernels: decayed operands and the diagonal sub-chunk blocks.
# ---------------------------------------------------------------------------------------------------------------

def _key_decays(f16, b16):
  """f16, b16 [b, T, h, m] (inclusive prefix / exclusive suffix sums of g inside each sub-chunk) -> KF
  [b, T, h, NS - 1, m]: for query sub-chunk a = 1..NS-1 (index a - 1), the decay from each key to a's start (the
  rest of the key's sub-chunk, then whole sub-chunks in between: sums of one sign), 0 for keys not before a."""
  b, t, h, m = f16.shape
  n = t // _CHUNK
  f = f16.reshape(b, n, _NS, _SUB, h, m)
  after = b16.reshape(b, n, _NS, _SUB, h, m)
  totals = f[:, :, :, -1]  # [b, n, NS, h, m]: each sub-chunk's gate sum
  key_sub = jnp.arange(_NS)[:, None, None, None]  # the key's sub-chunk, against [NS, SUB, h, m]
  kf = []
  for a in range(1, _NS):
    between = sum(jnp.where(key_sub < mid, totals[:, :, mid, None, None], 0.0) for mid in range(a))
    kf.append(jnp.where(key_sub < a, jnp.exp(after + between), 0.0))
  return jnp.stack(kf, axis=-2).reshape(b, t, h, _NS - 1, m)


def _diag_writes(s16, f16):
  """s16, f16 [b, T / SUB, SUB, h, m] -> [b, T / SUB, SUB (i), SUB (j), h, m]: the slot write of row j as row i of
  the same sub-chunk sees it, s_j * exp(F_i - F_j) for j <= i, else 0. F_i - F_j is a difference of prefix sums
  inside 16 rows: the one decay that is not a sum of one sign (the Triton kernels' diagonal walk rounds alike)."""
  causal = (jnp.arange(_SUB)[:, None] >= jnp.arange(_SUB)[None, :])[:, :, None, None]
  decay = jnp.exp(jnp.where(causal, f16[:, :, :, None] - f16[:, :, None, :], -jnp.inf))
  return s16[:, :, None] * decay


def _diag_blocks(x):
  """[b, T, hq, C] (each row against its chunk's C keys) -> [b, T, hq, SUB]: each row against the keys of its own
  sub-chunk (the 16 x 16 blocks on the diagonal)."""
  b, t, hq, c = x.shape
  x = x.reshape(b, t // c, _NS, _SUB, hq, _NS, _SUB)
  x = jnp.moveaxis(jnp.diagonal(x, axis1=2, axis2=5), -1, 2)  # [b, n, NS, SUB, hq, SUB]
  return x.reshape(b, t, hq, _SUB)


def _block_diagonal(x):
  """[b, T / SUB, SUB, hq, SUB] -> [b, T, hq, C]: the blocks placed on the diagonal of each chunk, zeros
  elsewhere (the inverse of `_diag_blocks`)."""
  b, n16, _, hq, _ = x.shape
  x = x.reshape(b, n16 // _NS, _NS, _SUB, hq, _SUB)
  on_diagonal = jnp.eye(_NS, dtype=x.dtype)[:, None, None, :, None]  # [a, 1, 1, c, 1]
  x = x[:, :, :, :, :, None, :] * on_diagonal  # [b, n, a, i, hq, c, j]
  return x.reshape(b, n16 * _SUB, hq, _CHUNK)


def _by_group(x, grp):
  """[b, T, hq, ...] -> [b, T / SUB, SUB, h, grp, ...]."""
  b, t, hq = x.shape[:3]
  return x.reshape((b, t // _SUB, _SUB, hq // grp, grp) + x.shape[3:])


# ---------------------------------------------------------------------------------------------------------------
# The forward and the custom_vjp.
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
  scale: float
  key_block: int
  value_block: int
  out_block: int
  interpret: bool
  triton: object  # gsa_gpu's config, for the backward


def _fit(block: int, width: int) -> int:
  """`block` if it tiles `width` (a multiple of 64), else 64."""
  return block if width % block == 0 else _TILE


def _forward(cfg: _Config, q, k, v, s, g, hk0, hv0):
  """Unpadded inputs (q, k, v, s in one 16-bit dtype, g and the states float32) -> (o, hkt, hvt, z): z the
  scaled slot logits [b, t, hq, m] float32 (the backward's residual)."""
  f32 = jnp.float32
  b, t, hq, _ = q.shape
  h = k.shape[2]
  grp = hq // h
  cd = q.dtype
  tp, kp, vp, mp = cfg.tp, cfg.kp, cfg.vp, _SLOTS
  qp, kpd, vpd = _pad_to(q, (b, tp, hq, kp)), _pad_to(k, (b, tp, h, kp)), _pad_to(v, (b, tp, h, vp))
  sp, gp = _pad_to(s, (b, tp, h, mp)).astype(f32), _pad_to(g, (b, tp, h, mp))
  hk0p, hv0p = _pad_to(hk0, (b, h, kp, mp)), _pad_to(hv0, (b, h, mp, vp))

  f16, b16, f64, b64 = _chunk_gate_sums(gp, _CHUNK)
  dec = jnp.swapaxes(jnp.exp(f64[:, _CHUNK - 1::_CHUNK]), 1, 2)  # [b, h, n, m]: each chunk's total decay
  s_end = _split(sp * jnp.exp(b64), cd)  # decayed to the chunk's end: the state update's slot side
  s_key = _split(sp[..., None, :] * _key_decays(f16, b16), cd)
  s16 = sp.reshape(b, tp // _SUB, _SUB, h, mp)
  w_diag = _diag_writes(s16, f16.reshape(s16.shape))[:, :, :, :, :, None]  # [b, N, i, j, h, 1, m]
  f_chunk, f_sub = jnp.exp(f64), jnp.exp(f16)  # decays from the chunk's / the sub-chunk's start

  hk, hkt = _state_pass("gv", (kpd,), s_end, dec, hk0p, block=cfg.key_block, interpret=cfg.interpret)
  zi, zo, scores = _logits_pass(qp, kpd, hk, s_key, interpret=cfg.interpret)
  # Multiply-and-sum forms (not einsum) so that XLA fuses each into one reduction over [b, N, i, j, h, g, m].
  scores16 = jnp.moveaxis(_by_group(_diag_blocks(scores), grp), -1, 3)  # [b, N, i, j, h, g]
  z_diag = jnp.sum(scores16[..., None] * w_diag, axis=3)  # [b, N, i, h, g, m]
  z = (_by_group(zi, grp) * f_chunk.reshape(s16.shape)[:, :, :, :, None] + z_diag
       + _by_group(zo, grp) * f_sub.reshape(s16.shape)[:, :, :, :, None])
  z = cfg.scale * z.reshape(b, tp, hq, mp)
  p = _softmax(z, cfg.m)

  hv, hvt = _state_pass("gk", s_end, (vpd,), dec, hv0p, block=cfg.value_block, interpret=cfg.interpret)
  pg = _by_group(p, grp)
  b_diag = jnp.moveaxis(jnp.sum(pg[:, :, :, None] * w_diag, axis=-1), 3, -1)  # [b, N, i, h, g, j]
  b_diag = b_diag.reshape(b, tp // _SUB, _SUB, hq, _SUB)
  on_queries = lambda f: (pg * f.reshape(s16.shape)[:, :, :, :, None]).reshape(b, tp, hq, mp)
  o = _output_pass(_split(on_queries(f_sub), cd), _split(on_queries(f_chunk), cd), s_key,
                   _split(_block_diagonal(b_diag), cd), vpd, hv, block=cfg.out_block, interpret=cfg.interpret)
  return (o[:, :t, :, :cfg.dv], hkt[:, :, :cfg.dk, :cfg.m], hvt[:, :, :cfg.m, :cfg.dv],
          z[:, :t, :, :cfg.m])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mgpu_core(cfg, q, k, v, s, g, hk0, hv0):
  return _forward(cfg, q, k, v, s, g, hk0, hv0)[:3]


def _core_fwd(cfg, q, k, v, s, g, hk0, hv0):
  o, hkt, hvt, z = _forward(cfg, q, k, v, s, g, hk0, hv0)
  z, hkt_r, hvt_r = (checkpoint_name(x, RESIDUALS_NAME) for x in (z, hkt, hvt))
  return (o, hkt, hvt), (q, k, v, s, g, hk0, hv0, z, hkt_r, hvt_r)


def _core_bwd(cfg, res, cts):
  """The Triton backward (`gsa_gpu._backward_cp`, chunk states recomputed) on this forward's residuals."""
  q, k, v, s, g, hk0, hv0, z, hkt, hvt = res
  tc = cfg.triton
  b, _, hq, _ = q.shape
  h = k.shape[2]
  doc = jnp.zeros(q.shape[:2], jnp.int32)
  *inputs, docp = gsa_gpu._pad_inputs(tc, q, k, v, s, g, hk0, hv0, doc)
  saved = (*inputs[:5], docp, *inputs[5:], _pad_to(z, (b, tc.tp, hq, tc.mp)),
           _pad_to(hkt, (b, h, tc.kp, tc.mp)), _pad_to(hvt, (b, h, tc.mp, tc.vp)), None)
  return gsa_gpu._backward_cp(tc, saved, cts)[:-1]


_mgpu_core.defvjp(_core_fwd, _core_bwd)


def gsa_pallas_mgpu(
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
  """GSA with the Mosaic GPU forward kernels; arguments and results as `gsa_jax.ops.chunked.chunk_gsa`.

  q [b, t, hq, dk]; k [b, t, h, dk]; v [b, t, h, dv]; s, g [b, t, h, m]. Differentiable in every array input
  (custom_vjp; the backward is the Triton kernels'). Raises ValueError on inputs these kernels do not support
  (`unsupported_reason`; also calls inside shard_map); `gated_slot_attention(..., backend="pallas_mgpu")` runs
  those with 'pallas_gpu'. `interpret=None` interprets the kernels on non-GPU platforms (slow; for tests).
  """
  reason = unsupported_reason(q, k, v, s, g, segment_ids)
  if reason is not None:
    raise ValueError(f"gsa_pallas_mgpu does not support {reason}; gated_slot_attention(..., "
                     "backend='pallas_mgpu') runs such inputs with 'pallas_gpu'.")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  bs = block_sizes or BlockSizes()
  b, t, hq, dk = q.shape
  h, dv = k.shape[2], v.shape[3]
  cd = jnp.result_type(q.dtype, k.dtype, v.dtype, s.dtype)
  round_up = lambda x, to: -(-x // to) * to
  kp, vp = round_up(dk, _TILE), round_up(dv, _TILE)
  triton = gsa_gpu.make_config(q, k, v, s, scale=scale, block_sizes=gsa_gpu.BlockSizes(recompute_states=True),
                               interpret=interpret, vary=frozenset())
  cfg = _Config(t=t, tp=round_up(t, _CHUNK), dk=dk, kp=kp, dv=dv, vp=vp, m=s.shape[3], scale=float(scale),
                key_block=_fit(bs.state_block, kp), value_block=_fit(bs.state_block, vp),
                out_block=_fit(bs.out_block, vp), interpret=bool(interpret), triton=triton)
  if initial_state is None:
    hk0 = jnp.zeros((b, h, dk, s.shape[3]), jnp.float32)
    hv0 = jnp.zeros((b, h, s.shape[3], dv), jnp.float32)
  else:
    hk0, hv0 = (x.astype(jnp.float32) for x in initial_state)
  o, hkt, hvt = _mgpu_core(cfg, q.astype(cd), k.astype(cd), v.astype(cd), s.astype(cd), g.astype(jnp.float32),
                           hk0, hv0)
  return o.astype(q.dtype), GSAState(hkt, hvt)
