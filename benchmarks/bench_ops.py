"""Times the GSA op's backends at the anchor shapes and prints a table.

    python benchmarks/bench_ops.py                                # anchor shapes, every implemented backend
    python benchmarks/bench_ops.py --shapes 2,256,4,64,32 --backends chunked,recurrent --dtype float32

Inputs follow the anchors' recipe (`gsa_jax.ops.testing.anchor_inputs`): q, k = swish(randn), v = randn,
g = logsigmoid(randn) / 8, s = 1 - exp(g), scale = 1. "fwd" is the jitted forward; "fwd+bwd" is the forward
plus the gradients of q, k, v, s, g for a random cotangent. Times are medians over --repeats calls, each
synchronized from the host (as a training step sees them), after two warm-up calls. "temp GiB" is the scratch memory
XLA allocates for the fwd+bwd executable (its memory analysis), "peak GiB" the device's peak since the process
started (where the device reports it). A backend that fails (out of memory, not implemented) is reported as such.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from gsa_jax.ops import BACKENDS, DEFAULT_CHUNK_SIZE, gated_slot_attention
from gsa_jax.ops.testing import anchor_inputs, time_calls

ANCHOR_SHAPES = ("8,2048,4,512,64", "1,16384,4,512,64")  # B, T, H, K=V, M


def bench(backend, inputs, ct, chunk_size, repeats):
  def fwd(*x):
    return gated_slot_attention(*x, scale=1.0, chunk_size=chunk_size, backend=backend)[0]

  def fwd_bwd(*x_and_ct):
    *x, ct = x_and_ct
    o, vjp = jax.vjp(fwd, *x)
    return vjp(ct)

  fwd_j, fwd_bwd_j = jax.jit(fwd), jax.jit(fwd_bwd)
  temp = fwd_bwd_j.lower(*inputs, ct).compile().memory_analysis()
  temp_gib = getattr(temp, "temp_size_in_bytes", float("nan")) / 2**30
  return (time_calls(lambda: fwd_j(*inputs), repeats).sync_ms,
          time_calls(lambda: fwd_bwd_j(*inputs, ct), repeats).sync_ms, temp_gib)


def peak_gib():
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use", float("nan")) / 2**30


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shapes", nargs="+", default=ANCHOR_SHAPES, help="B,T,H,D,M with K = V = D")
  parser.add_argument("--backends", default="chunked,recurrent,pallas_gpu,pallas_tpu")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args()

  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"dtype {args.dtype}, chunk {args.chunk_size}, median of {args.repeats} synchronized calls")
  header = ("backend", "B,T,H,K=V,M", "fwd ms", "fwd+bwd ms", "temp GiB", "peak GiB")
  rows = []
  for shape in args.shapes:
    b, t, h, d, m = map(int, shape.split(","))
    inputs, ct = anchor_inputs(b, t, h, d, m, dtype=jnp.dtype(args.dtype))
    for backend in args.backends.split(","):
      assert backend in BACKENDS, backend
      if backend == "pallas_tpu" and jax.default_backend() != "tpu":
        rows.append((backend, shape, "skipped (TPU interpret mode off a TPU: not a timing)", "", "", ""))
        print("  ".join(rows[-1]), flush=True)
        continue
      try:
        fwd_ms, fwd_bwd_ms, temp = bench(backend, inputs, ct, args.chunk_size, args.repeats)
        rows.append((backend, shape, f"{fwd_ms:.2f}", f"{fwd_bwd_ms:.2f}", f"{temp:.2f}", f"{peak_gib():.2f}"))
      except NotImplementedError:
        rows.append((backend, shape, "not implemented", "", "", ""))
      except Exception as e:  # Out of memory and compile failures are results here, not crashes.
        rows.append((backend, shape, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:60]}", "", "", ""))
      print("  ".join(rows[-1]), flush=True)
  widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
  print()
  for row in [header] + rows:
    print(" | ".join(c.ljust(w) for c, w in zip(row, widths)))


if __name__ == "__main__":
  main()
