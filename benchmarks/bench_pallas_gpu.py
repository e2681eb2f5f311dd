"""Times the Pallas GPU GSA kernels against this project's chunked reference at the anchor shapes.

    python benchmarks/bench_pallas_gpu.py                       # anchor shapes, default block sizes
    python benchmarks/bench_pallas_gpu.py --variants            # also a few block-size variants (or --variants w8,sb32)
    python benchmarks/bench_pallas_gpu.py --shapes 2,256,4,64,32 --no-chunked

Inputs as in docs/anchors.md: bf16, q/k = swish(randn), v = randn, g = logsigmoid(randn)/8, s = 1 - exp(g),
scale 1. Times: median of single host-synchronized calls after warm-up ("sync"), and the mean of a loop of
back-to-back calls ("loop"). Memory: XLA's compiled memory analysis (temporaries + outputs) of each program.
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

from benchmarks.profiling import print_profile_summary  # noqa: E402
from gsa_jax.ops import gated_slot_attention  # noqa: E402
from gsa_jax.ops.common import GSAState  # noqa: E402
from pallas_kernels import BlockSizes, gsa_decode_step, gsa_decode_step_pallas, gsa_pallas_gpu  # noqa: E402


def make(b, t, h, d, m, dtype=jnp.bfloat16, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  q = jax.nn.swish(jax.random.normal(ks[0], (b, t, h, d)))
  k = jax.nn.swish(jax.random.normal(ks[1], (b, t, h, d)))
  v = jax.random.normal(ks[2], (b, t, h, d))
  g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h, m))) / 8.0
  s = 1.0 - jnp.exp(g)
  do = jax.random.normal(ks[4], (b, t, h, d))
  return [x.astype(dtype) for x in (q, k, v, s, g)], do.astype(dtype)


def timed(fn, args, repeats):
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  t0 = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  loop = (time.perf_counter() - t0) / repeats
  return float(np.median(times)) * 1e3, loop * 1e3


def programs(impl):
  def fwd(q, k, v, s, g):
    return impl(q, k, v, s, g)

  def fwd_bwd(q, k, v, s, g, do):
    o, vjp = jax.vjp(impl, q, k, v, s, g)
    return vjp(do)

  return jax.jit(fwd), jax.jit(fwd_bwd)


def mem_mb(jitted, args):
  try:
    ma = jitted.lower(*args).compile().memory_analysis()
    return (ma.temp_size_in_bytes + ma.output_size_in_bytes) / 2**20
  except Exception:  # noqa: BLE001
    return float("nan")


def _forward_and_grads_with(x, bs):
  from tests.gsa_testing import kernel_forward_and_grads  # noqa: PLC0415
  return kernel_forward_and_grads(gsa_pallas_gpu, x, fast_cpu_compile=False, scale=1.0, block_sizes=bs)


def profile(b, t, h, d, m, block_sizes, calls=5):
  """Device time of each kernel in `calls` forward+backward passes, from a jax.profiler trace."""
  xs, do = make(b, t, h, d, m)
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
  from tests.gsa_testing import cast, forward_and_grads, make_inputs, rel_err  # noqa: PLC0415
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
      print(f"precision {block_sizes or 'default'} {jnp.dtype(dtype).name} B2 T512 H4 K=V=64 M32: worst {max(errs.values()):.2e}  " +
            " ".join(f"{k} {e:.1e}" for k, e in errs.items()), flush=True)


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--shapes", default="8,2048,4,512,64;1,16384,4,512,64")
  ap.add_argument("--repeats", type=int, default=30)
  ap.add_argument("--variants", nargs="?", const="all", default="",
                  help="comma-separated names of block-size variants (without the 'pallas ' prefix), or all")
  ap.add_argument("--no-chunked", action="store_true")
  ap.add_argument("--decode", action="store_true")
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
    xs, do = make(b, t, h, d, m)
    impls = {name: (lambda bs: (lambda q, k, v, s, g: gsa_pallas_gpu(q, k, v, s, g, scale=1.0, block_sizes=bs)[0]))(bs)
             for name, bs in configs.items()}
    if not args.no_chunked:
      impls["chunked"] = lambda q, k, v, s, g: gated_slot_attention(q, k, v, s, g, scale=1.0, backend="chunked")[0]
    ref_ms = None
    for name, impl in impls.items():
      fwd, fwd_bwd = programs(impl)
      try:
        f_ms, f_loop = timed(fwd, xs, args.repeats)
        fb_ms, fb_loop = timed(fwd_bwd, xs + [do], args.repeats)
        mem = mem_mb(fwd_bwd, xs + [do])
      except Exception as e:  # noqa: BLE001  (the reference may run out of memory)
        print(f"{name} {shape}: failed: {type(e).__name__}: {str(e)[:200]}")
        continue
      if name == "chunked":
        ref_ms = fb_ms
      rows.append([f"B{b} T{t} H{h} K=V{d} M{m}", name, f_ms, f_loop, fb_ms, fb_loop, mem])
      print(f"{rows[-1][0]:<28} {name:<18} fwd {f_ms:7.3f} ms (loop {f_loop:7.3f})  fwd+bwd {fb_ms:7.3f} ms "
            f"(loop {fb_loop:7.3f})  mem {mem:8.1f} MiB", flush=True)
    if ref_ms:
      for r in rows:
        if r[0].startswith(f"B{b} T{t} ") and r[1] != "chunked":
          r.append(ref_ms / r[4])
  print(f"peak_bytes_in_use (process): {(dev.memory_stats() or {}).get('peak_bytes_in_use', 0) / 2**30:.2f} GiB")

  if args.decode:
    for bsz in (1, 64):
      h, d, m = 4, 512, 64
      ks = jax.random.split(jax.random.PRNGKey(1), 6)
      q, k, v = (jax.random.normal(kk, (bsz, h, d), jnp.bfloat16) for kk in ks[:3])
      g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (bsz, h, m))) / 8
      s = 1 - jnp.exp(g)
      st = GSAState(jnp.zeros((bsz, h, d, m)), jnp.zeros((bsz, h, m, d)))
      for name, fn in (("fused XLA", gsa_decode_step), ("Pallas kernel", gsa_decode_step_pallas)):
        step = lambda q, k, v, s, g, hk, hv, fn=fn: fn(q, k, v, s, g, GSAState(hk, hv), scale=1.0)
        ms, loop = timed(jax.jit(step), [q, k, v, s.astype(jnp.bfloat16), g.astype(jnp.bfloat16), *st],
                         args.repeats)
        print(f"decode step B{bsz} H4 K=V512 M64 ({name}): {ms:.3f} ms sync, {loop:.3f} ms loop")

  print("\n| shape | backend | fwd ms | fwd+bwd ms | fwd+bwd loop ms | mem MiB | chunked / this (fwd+bwd) |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    ratio = f"{r[7]:.1f}x" if len(r) > 7 else ""
    print(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[4]:.3f} | {r[5]:.3f} | {r[6]:.0f} | {ratio} |")


if __name__ == "__main__":
  sys.exit(main())
