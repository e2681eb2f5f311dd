"""The Mosaic GPU forward kernels (`pallas_kernels/gsa_mgpu.py`) against the Triton forward (`pallas_gpu`).

    python benchmarks/bench_mgpu.py                          # anchor shapes B8 T2048 and B1 T16384, H4 K=V=512 M64
    python benchmarks/bench_mgpu.py --shapes 2,256,4,64,32 --repeats 50 --backward
    python benchmarks/bench_mgpu.py --shapes 1,128,1,64,16 --repeats 1 --interpret   # CPU dry run of the script

Inputs: the anchors' recipe in bf16 (`gsa_jax.ops.testing.anchor_inputs`). Per shape: the forward of both
backends (median of host-synchronized calls after warm-up; `gsa_jax.ops.testing.time_calls`), their relative L2
difference on o and on the final states (the compiled kernels' sanity check; tests/test_pallas_mgpu.py has the
float64 comparisons), then each Mosaic kernel alone on its real inputs: time, the matrix-unit work it issues (every
wgmma, hi + lo parts included) as TFLOP/s, and the bytes its TMA copies move as GB/s. A failing step (e.g. a
kernel that does not compile) prints its error and the run goes on.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gsa_jax.ops.testing import anchor_inputs, rel_err, time_calls  # noqa: E402
from pallas_kernels import gsa_mgpu  # noqa: E402
from pallas_kernels.gsa_gpu import gsa_pallas_gpu  # noqa: E402


def kernel_work(b, t, hq, h, dk, dv):
  """{kernel: (wgmma FLOPs, TMA bytes)} at padded widths dk, dv (multiples of 64), M padded to 64; C = 64."""
  c, n, m = 64, t // 64, 64
  bf = 2  # bytes of a bf16 element
  gv_programs, gk_programs = b * h * dk // 64, b * h * dv // 64
  return {
      # per chunk: [dk_slice, C] @ [C, m] for s hi and lo; loads k slice + s hi/lo + decay, stores state hi/lo.
      "state keys": (gv_programs * n * 2 * 2 * 64 * c * m,
                     gv_programs * n * (c * 64 * bf + 2 * c * m * bf + 4 * m + 2 * 64 * m * bf)),
      "state values": (gk_programs * n * 2 * 2 * m * c * 64,
                       gk_programs * n * (2 * c * m * bf + c * 64 * bf + 4 * m + 2 * m * 64 * bf)),
      # per (chunk, query head): q @ k^T, q @ hk (hi, lo), 3 sub-chunks x 3 products of [C, C] @ [C, m];
      # loads q, k, hk hi/lo, s*KF hi/lo; stores zi, zo ([C, m] f32) and the scores ([C, C] f32).
      "logits": (b * hq * n * (2 * c * c * dk + 2 * 2 * c * dk * m + 9 * 2 * c * c * m),
                 b * hq * n * (2 * c * dk * bf + 2 * dk * m * bf + 6 * c * m * bf + 2 * c * m * 4 + c * c * 4)),
      # per (chunk, query head): 9 products [C, m] @ [m, C] for the scores, then per dv block 7 of [C, 64] @
      # [64, block]; loads p*QF, p*F, s*KF (hi/lo), the diagonal blocks (hi/lo), v, hv hi/lo; stores o.
      "output": (b * hq * n * (9 * 2 * c * m * c + 7 * 2 * c * 64 * dv),
                 b * hq * n * (4 * c * m * bf + 6 * c * m * bf + 2 * c * c * bf + c * dv * bf + 2 * m * dv * bf
                               + c * dv * bf)),
  }


def kernel_calls(xs, interpret):
  """The four Mosaic kernels as jitted calls on the inputs the forward gives them: {name: (fn, args)}."""
  q, k, v, s, g = xs
  b, t, hq, dk = q.shape
  dp = -(-dk // 64) * 64
  q, k, v = (gsa_mgpu._pad_to(x, x.shape[:3] + (dp,)) for x in (q, k, v))
  dk = dv = dp
  h = k.shape[2]
  c, cd, f32 = 64, q.dtype, jnp.float32
  sp = gsa_mgpu._pad_to(s, s.shape[:3] + (64,)).astype(f32)
  gp = gsa_mgpu._pad_to(g.astype(f32), sp.shape)
  f16, b16, f64, b64 = gsa_mgpu._chunk_gate_sums(gp, c)
  dec = jnp.swapaxes(jnp.exp(f64[:, c - 1::c]), 1, 2)
  s_end = gsa_mgpu._split(sp * jnp.exp(b64), cd)
  s_key = gsa_mgpu._split(sp[..., None, :] * gsa_mgpu._key_decays(f16, b16), cd)
  hk0 = jnp.zeros((b, h, dk, 64), f32)
  hv0 = jnp.zeros((b, h, 64, dv), f32)
  bs = gsa_mgpu.BlockSizes()
  state = jax.jit(gsa_mgpu._state_pass, static_argnames=("kind", "block", "interpret"))
  hk, _ = state("gv", (k,), s_end, dec, hk0, block=bs.state_block, interpret=interpret)
  hv, _ = state("gk", s_end, (v,), dec, hv0, block=bs.state_block, interpret=interpret)
  logits = jax.jit(gsa_mgpu._logits_pass, static_argnames=("interpret",))
  output = jax.jit(gsa_mgpu._output_pass, static_argnames=("block", "interpret"))
  rows = gsa_mgpu._split(jnp.full((b, t, hq, 64), 1.0 / 64, f32), cd)
  diag = gsa_mgpu._split(jnp.full((b, t, hq, c), 1e-3, f32), cd)
  sb = bs.state_block
  return {
      "state keys": (lambda *a: state("gv", (a[0],), a[1], a[2], a[3], block=sb, interpret=interpret),
                     (k, s_end, dec, hk0)),
      "state values": (lambda *a: state("gk", a[0], (a[1],), a[2], a[3], block=sb, interpret=interpret),
                       (s_end, v, dec, hv0)),
      "logits": (lambda *a: logits(*a, interpret=interpret), (q, k, hk, s_key)),
      "output": (lambda *a: output(*a, block=gsa_mgpu._fit(bs.out_block, dp), interpret=interpret),
                 (rows, rows, s_key, diag, v, hv)),
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shapes", default="8,2048,4,512,64;1,16384,4,512,64", help="B,T,H,D,M;...")
  ap.add_argument("--repeats", type=int, default=30)
  ap.add_argument("--backward", action="store_true",
                  help="also time fwd+bwd (both backends' backward is the Triton kernels'; compiles take longer)")
  ap.add_argument("--interpret", action="store_true", help="interpret the kernels (a CPU check of this script)")
  args = ap.parse_args(argv)
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
  table = []
  for spec in args.shapes.split(";"):
    b, t, h, d, m = (int(x) for x in spec.split(","))
    name = f"B{b} T{t} H{h} K=V{d} M{m}"
    xs, do = anchor_inputs(b, t, h, d, m)
    impls = {
        "pallas_gpu": lambda *x: gsa_pallas_gpu(*x, scale=1.0, interpret=args.interpret),
        "pallas_mgpu": lambda *x: gsa_mgpu.gsa_pallas_mgpu(*x, scale=1.0, interpret=args.interpret),
    }
    outs = {}
    for backend, impl in impls.items():
      programs = {"forward": (jax.jit(impl), xs)}
      if args.backward:
        programs["fwd+bwd"] = (jax.jit(lambda *a, impl=impl: jax.vjp(lambda *x: impl(*x)[0], *a[:5])[1](a[5])),
                               (*xs, do))
      for what, (fn, fargs) in programs.items():
        try:
          ms = time_calls(lambda: fn(*fargs), args.repeats).sync_ms
          if what == "forward":
            outs[backend] = fn(*fargs)
          table.append((name, f"{backend} {what}", f"{ms:.3f}", "", ""))
        except Exception:  # noqa: BLE001  (report and go on: one call must give the lead every number it can)
          traceback.print_exc()
          table.append((name, f"{backend} {what}", "FAILED", "", ""))
    if len(outs) == 2:
      (o, st), (o_ref, st_ref) = outs["pallas_mgpu"], outs["pallas_gpu"]
      print(f"{name}: mgpu vs triton relative L2: o {rel_err(o, o_ref):.2e}, hk {rel_err(st.hk, st_ref.hk):.2e}, "
            f"hv {rel_err(st.hv, st_ref.hv):.2e}")
    try:
      dp = -(-d // 64) * 64
      work = kernel_work(b, t, h, h, dp, dp)
      for kernel, (fn, kargs) in kernel_calls(xs, args.interpret).items():
        try:
          ms = time_calls(lambda: fn(*kargs), args.repeats).sync_ms
          flops, nbytes = work[kernel]
          table.append((name, "mgpu " + kernel, f"{ms:.3f}", f"{flops / ms / 1e9:.1f}", f"{nbytes / ms / 1e6:.0f}"))
        except Exception:  # noqa: BLE001
          traceback.print_exc()
          table.append((name, "mgpu " + kernel, "FAILED", "", ""))
    except Exception:  # noqa: BLE001
      traceback.print_exc()
  print(f"\n{'shape':<26} {'what':<26} {'ms':>8} {'TFLOP/s':>8} {'GB/s':>7}")
  for row in table:
    print(f"{row[0]:<26} {row[1]:<26} {row[2]:>8} {row[3]:>8} {row[4]:>7}")


if __name__ == "__main__":
  main()
