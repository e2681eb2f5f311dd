"""Times the Pallas GPU GSA kernels against this project's chunked reference at the anchor shapes.

    python benchmarks/bench_pallas_gpu.py                       # anchor shapes, default block sizes
    python benchmarks/bench_pallas_gpu.py --variants            # also a few block-size variants (or --variants w8,sb32)
    python benchmarks/bench_pallas_gpu.py --shapes 2,256,4,64,32 --no-chunked

Inputs as in docs/anchors.md: bf16, q/k = swish(randn), v = randn, g = logsigmoid(randn)/8, s = 1 - exp(g),
scale 1. Times: median of single host-synchronized calls after warm-up ("sync"), and the mean of a loop of
back-to-back calls ("loop"). Memory: XLA's compiled memory analysis (temporaries + outputs) of each program.
`--reference` also times the reference library's `chunk_gsa` (flash-linear-attention, torch) on the same inputs;
its memory is the peak of torch's allocator above the inputs during fwd+bwd. Ratios: fwd+bwd time of the chunked
reference / of the reference library over this row's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.compare_backends import torch_cuda_times_ms  # noqa: E402
from benchmarks.profiling import print_profile_summary  # noqa: E402
from gsa_jax.ops import gated_slot_attention  # noqa: E402
from gsa_jax.ops.common import GSAState  # noqa: E402
from gsa_jax.ops.testing import (anchor_inputs, cast, forward_and_grads, kernel_forward_and_grads,  # noqa: E402
                                 make_inputs, rel_err, time_calls)
from pallas_kernels import BlockSizes, gsa_decode_step, gsa_decode_step_pallas, gsa_pallas_gpu  # noqa: E402


def programs(impl):
  def fwd(q, k, v, s, g):
    return impl(q, k, v, s, g)

  def fwd_bwd(q, k, v, s, g, do):
    o, vjp = jax.vjp(impl, q, k, v, s, g)
    return vjp(do)

  return jax.jit(fwd), jax.jit(fwd_bwd)


def time_reference_library(xs, do, repeats):
  """The reference library's `fla.ops.gsa.chunk_gsa` on the same inputs (copied to torch, same dtype):
  (fwd ms, fwd loop ms, fwd+bwd ms, fwd+bwd loop ms, peak MiB of torch's allocator during fwd+bwd)."""
  import torch  # noqa: PLC0415  (optional: only --reference needs torch and flash-linear-attention)
  from fla.ops.gsa import chunk_gsa  # noqa: PLC0415

  dtype = {jnp.bfloat16: torch.bfloat16, jnp.float32: torch.float32}[xs[0].dtype.type]
  to_torch = lambda x: torch.from_numpy(np.asarray(x.astype(jnp.float32))).cuda().to(dtype)
  args = [to_torch(x).requires_grad_() for x in xs]
  cotangent = to_torch(do)

  def fwd():
    with torch.no_grad():
      return chunk_gsa(*args, scale=1.0)[0]

  def fwd_bwd():
    o, _ = chunk_gsa(*args, scale=1.0)
    return torch.autograd.grad(o, args, cotangent)

  f_ms, f_loop = torch_cuda_times_ms(fwd, repeats)
  fb_ms, fb_loop = torch_cuda_times_ms(fwd_bwd, repeats)
  torch.cuda.synchronize()
  base = torch.cuda.memory_allocated()
  torch.cuda.reset_peak_memory_stats()
  fwd_bwd()
  torch.cuda.synchronize()
  return f_ms, f_loop, fb_ms, fb_loop, (torch.cuda.max_memory_allocated() - base) / 2**20


def mem_mb(jitted, args):
  try:
    ma = jitted.lower(*args).compile().memory_analysis()
    return (ma.temp_size_in_bytes + ma.output_size_in_bytes) / 2**20
  except Exception:  # noqa: BLE001
    return float("nan")


def _forward_and_grads_with(x, bs):
  return kernel_forward_and_grads(gsa_pallas_gpu, x, fast_cpu_compile=False, scale=1.0, block_sizes=bs)


def profile(b, t, h, d, m, block_sizes, calls=5):
  """Device time of each kernel in `calls` forward+backward passes, from a jax.profiler trace."""
  xs, do = anchor_inputs(b, t, h, d, m)
  _, fwd_bwd = programs(lambda q, k, v, s, g: gsa_pallas_gpu(q, k, v, s, g, scale=1.0, block_sizes=block_sizes)[0])
  jax.block_until_ready(fwd_bwd(*xs, do))
  path = tempfile.mkdtemp(prefix="gsa_profile_")
  with jax.profiler.trace(path, create_perfetto_trace=True):
    for _ in range(calls):
      out = fwd_bwd(*xs, do)
    jax.block_until_ready(out)
  print(f"profile B{b} T{t} H{h} K=V{d} M{m}, {block_sizes}:")
  print_profile_summary(path, steps=calls, unit="call", top=20)


def precision_table(block_sizes=None):
  """Relative L2 error of o, the final states and every gradient vs the float64 recurrence (random cotangent)."""
  with jax.enable_x64(True):
    for dtype in (jnp.bfloat16, jnp.float32):
      x = make_inputs(7, b=2, t=512, hq=4, h=4, dk=64, dv=64, m=32, with_state=True, dtype=dtype)
      ref = forward_and_grads(cast(x, jnp.float64), backend="recurrent", scale=1.0)
      with jax.enable_x64(False):
        if block_sizes is None:
          got = forward_and_grads(cast(x, dtype), backend="pallas_gpu", scale=1.0)
        else:
          got = _forward_and_grads_with(cast(x, dtype), block_sizes)
      errs = {k: rel_err(got[k], ref[k]) for k in ref}
      print(f"precision {block_sizes or 'default'} {jnp.dtype(dtype).name} B2 T512 H4 K=V=64 M32: "
            f"worst {max(errs.values()):.2e}  " +
            " ".join(f"{k} {e:.1e}" for k, e in errs.items()), flush=True)


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--shapes", default="8,2048,4,512,64;1,16384,4,512,64")
  ap.add_argument("--repeats", type=int, default=30)
  ap.add_argument("--variants", nargs="?", const="all", default="",
                  help="comma-separated names of block-size variants (without the 'pallas ' prefix), or all")
  ap.add_argument("--no-chunked", action="store_true")
  ap.add_argument("--decode", action="store_true")
  ap.add_argument("--reference", action="store_true",
                  help="also time the reference library's chunk_gsa on the same inputs (needs torch with CUDA and "
                       "flash-linear-attention; its autotuning takes minutes per new shape; run JAX with "
                       "XLA_PYTHON_CLIENT_PREALLOCATE=false)")
  ap.add_argument("--profile", action="store_true", help="device time of each kernel (default block sizes)")
  ap.add_argument("--precision", action="store_true",
                  help="relative L2 error vs float64 at B2 T512 H4 K=V=64 M32 (the anchors' precision shape)")
  args = ap.parse_args(argv)
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind}, jax {jax.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
  configs = {"pallas": BlockSizes()}
  if args.variants:
    variants = {
        "pallas w8": BlockSizes(num_warps=8),
        "pallas sb32": BlockSizes(state_block=32),
        "pallas sb64": BlockSizes(state_block=64),
        "pallas sb16": BlockSizes(state_block=16),
        "pallas st1": BlockSizes(num_stages=1),
        "pallas recompute": BlockSizes(recompute_states=True),
        "pallas seg1": BlockSizes(state_segments=1),
        "pallas seg2": BlockSizes(state_segments=2),
        "pallas seg4": BlockSizes(state_segments=4),
        "pallas seg8": BlockSizes(state_segments=8),
        "pallas no_split": BlockSizes(split_all=False),
        "pallas sst1": BlockSizes(state_num_stages=1),
        "pallas b128": BlockSizes(block_k=128, block_v=128),
        "pallas c32": BlockSizes(chunk=32),
    }
    wanted = None if args.variants == "all" else set(args.variants.split(","))
    configs.update({k: v for k, v in variants.items() if wanted is None or k.removeprefix("pallas ") in wanted})
  if args.precision:
    precision_table()
    precision_table(BlockSizes(split_all=False))
  if args.profile:
    for shape in args.shapes.split(";"):
      profile(*map(int, shape.split(",")), BlockSizes())
  rows = []
  for shape in args.shapes.split(";"):
    b, t, h, d, m = map(int, shape.split(","))
    xs, do = anchor_inputs(b, t, h, d, m)
    impls = {name: (lambda bs: (lambda q, k, v, s, g: gsa_pallas_gpu(q, k, v, s, g, scale=1.0, block_sizes=bs)[0]))(bs)
             for name, bs in configs.items()}
    if not args.no_chunked:
      impls["chunked"] = lambda q, k, v, s, g: gated_slot_attention(q, k, v, s, g, scale=1.0, backend="chunked")[0]
    label = f"B{b} T{t} H{h} K=V{d} M{m}"
    shape_rows = []

    def add_row(name, f_ms, f_loop, fb_ms, fb_loop, mem):
      shape_rows.append([name, f_ms, f_loop, fb_ms, fb_loop, mem])
      print(f"{label:<28} {name:<18} fwd {f_ms:7.3f} ms (loop {f_loop:7.3f})  fwd+bwd {fb_ms:7.3f} ms "
            f"(loop {fb_loop:7.3f})  mem {mem:8.1f} MiB", flush=True)

    for name, impl in impls.items():
      fwd, fwd_bwd = programs(impl)
      try:
        f_ms, f_loop = time_calls(lambda: fwd(*xs), args.repeats, loop=True)
        fb_ms, fb_loop = time_calls(lambda: fwd_bwd(*xs, do), args.repeats, loop=True)
        add_row(name, f_ms, f_loop, fb_ms, fb_loop, mem_mb(fwd_bwd, xs + [do]))
      except Exception as e:  # noqa: BLE001  (the chunked reference may run out of memory)
        print(f"{name} {shape}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
    if args.reference:
      try:
        add_row("reference (fla)", *time_reference_library(xs, do, args.repeats))
      except Exception as e:  # noqa: BLE001  (missing package, out of memory: the rows above still count)
        print(f"reference (fla) {shape}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
    times = {r[0]: r[3] for r in shape_rows}
    for r in shape_rows:
      ratios = [f"{times[base] / r[3]:.2f}x" if base in times and r[0] != base else ""
                for base in ("chunked", "reference (fla)")]
      rows.append([label, *r, *ratios])
  print(f"peak_bytes_in_use (process): {(dev.memory_stats() or {}).get('peak_bytes_in_use', 0) / 2**30:.2f} GiB")

  if args.decode:
    for bsz in (1, 64):
      h, d, m = 4, 512, 64
      token = [x[:, 0] for x in anchor_inputs(bsz, 1, h, d, m, seed=1)[0]]  # q, k, v [b, h, d]; s, g [b, h, m]
      st = GSAState(jnp.zeros((bsz, h, d, m)), jnp.zeros((bsz, h, m, d)))
      for name, fn in (("fused XLA", gsa_decode_step), ("Pallas kernel", gsa_decode_step_pallas)):
        step = jax.jit(lambda q, k, v, s, g, hk, hv, fn=fn: fn(q, k, v, s, g, GSAState(hk, hv), scale=1.0))
        ms, loop = time_calls(lambda step=step: step(*token, *st), args.repeats, loop=True)
        print(f"decode step B{bsz} H4 K=V512 M64 ({name}): {ms:.3f} ms sync, {loop:.3f} ms loop")

  print("\n| shape | backend | fwd ms | fwd+bwd ms | fwd+bwd loop ms | mem MiB | chunked / this | "
        "reference / this |")
  print("|---|---|---|---|---|---|---|---|")
  for label, name, f_ms, _, fb_ms, fb_loop, mem, vs_chunked, vs_reference in rows:
    print(f"| {label} | {name} | {f_ms:.3f} | {fb_ms:.3f} | {fb_loop:.3f} | {mem:.0f} | {vs_chunked} | "
          f"{vs_reference} |")


if __name__ == "__main__":
  sys.exit(main())
