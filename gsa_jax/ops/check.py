"""Checks every available GSA backend against the float64 recurrence and prints a table of errors and timings.

    python -m gsa_jax.ops.check                      # small default shape, float32 and bfloat16
    python -m gsa_jax.ops.check --b 2 --t 1000 --hq 4 --h 2 --dk 64 --dv 64 --m 32 --segments

Errors are relative L2 norms against the recurrence run in float64 on the same (dtype-rounded) inputs, for the
output and for the gradients of a random cotangent. Timings are medians of jitted calls on this machine's default
device. Exits non-zero if a backend's error exceeds its dtype's tolerance or produces a non-finite value.

It ships with the package (a check of an installation needs no repository checkout); `benchmarks/compare_backends.py`
is this command with the reference library added (`compare(extra=...)`). Inputs, errors and timer are
`gsa_jax.ops.testing`'s, as the tests and benchmarks use them.
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from gsa_jax.ops.api import BACKENDS, gated_slot_attention, parse_kernel_block_sizes
from gsa_jax.ops.common import DEFAULT_CHUNK_SIZE
from gsa_jax.ops.testing import cast, make_inputs, random_segment_ids, rel_err, time_calls

# Tolerances for the relative L2 error against float64, by input dtype (the chunked reference meets these).
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-3}


def _loss_and_grads(backend, dtype, x, segment_ids, cotangent, chunk_size, kernel_block_sizes=None):
  def fn(q, k, v, s, g, hk, hv):
    o, _ = gated_slot_attention(q, k, v, s, g, initial_state=(hk, hv), segment_ids=segment_ids,
                                chunk_size=chunk_size, backend=backend, kernel_block_sizes=kernel_block_sizes)
    return o

  def fwd_bwd(*args):
    o, vjp = jax.vjp(fn, *args)
    return o, vjp(cotangent.astype(o.dtype))

  x = cast(x, dtype)
  return jax.jit(fn), jax.jit(fwd_bwd), [x[n] for n in "qkvsg"] + list(x["initial_state"])


def compare(shape, *, dtypes=("float32", "bfloat16"), backends=None, chunk_size=DEFAULT_CHUNK_SIZE, normalizer=8.0,
            segments=False, repeats=5, seed=0, extra=None, kernel_block_sizes=None):
  """Errors vs the float64 recurrence and timings of each backend on one random problem.

  shape: (b, t, hq, h, dk, dv, m). kernel_block_sizes: the kernels' tiles (`gated_slot_attention`'s).
  extra: {name: fn(dtype_name, inputs, segment_ids, cotangent, repeats) -> (o, grads, fwd_ms, fwd_bwd_ms)} for
  implementations outside this package (inputs are float64 numpy arrays already rounded through the dtype; grads in
  the order q, k, v, s, g, hk0, hv0), or raise NotImplementedError.
  Returns (rows, failures): rows of (name, dtype, err o, max err grad, fwd ms, fwd+bwd ms, verdict).
  """
  dims = dict(zip(("b", "t", "hq", "h", "dk", "dv", "m"), shape))
  backends = backends or [name for name in BACKENDS if name != "auto"]
  rng = np.random.default_rng((seed, 1))  # a stream apart from the inputs' (make_inputs draws from `seed`)
  segment_ids = jnp.asarray(random_segment_ids(rng, dims["b"], dims["t"])) if segments else None
  cotangent = rng.standard_normal((dims["b"], dims["t"], dims["hq"], dims["dv"]))
  failures, rows = 0, []
  for dtype_name in dtypes:
    dtype = jnp.dtype(dtype_name)
    # The same draws for every dtype; the reference sees exactly the values the backend sees (rounded through it).
    rounded = make_inputs(seed, **dims, normalizer=normalizer, with_state=True, dtype=dtype)
    with jax.enable_x64(True):
      _, ref_fn, ref_args = _loss_and_grads("recurrent", jnp.float64, rounded, segment_ids,
                                            jnp.asarray(cotangent, jnp.float64), chunk_size)
      ref_o, ref_grads = jax.tree.map(np.asarray, ref_fn(*ref_args))

    def run_backend(backend):
      fwd, fwd_bwd, call_args = _loss_and_grads(backend, dtype, rounded, segment_ids, jnp.asarray(cotangent),
                                                chunk_size, kernel_block_sizes)
      o, grads = fwd_bwd(*call_args)
      return (o, grads, time_calls(lambda: fwd(*call_args), repeats).sync_ms,
              time_calls(lambda: fwd_bwd(*call_args), repeats).sync_ms)

    runs = {name: functools.partial(run_backend, name) for name in backends}
    runs.update({name: functools.partial(fn, dtype_name, rounded, segment_ids, cotangent, repeats)
                 for name, fn in (extra or {}).items()})
    for name, run in runs.items():
      try:
        o, grads, fwd_ms, fwd_bwd_ms = run()
      except NotImplementedError as e:
        rows.append((name, dtype_name, "not run", "", "", "", str(e)[:60] or "not implemented"))
        continue
      err_o = rel_err(o, ref_o)
      err_g = max(rel_err(a, r) for a, r in zip(grads, ref_grads))
      finite = all(np.isfinite(np.asarray(a, np.float64)).all() for a in (o, *grads))
      ok = finite and max(err_o, err_g) <= TOLERANCE.get(dtype_name, 1e-4)
      failures += not ok
      rows.append((name, dtype_name, f"{err_o:.1e}", f"{err_g:.1e}", f"{fwd_ms:.2f}", f"{fwd_bwd_ms:.2f}",
                   "ok" if ok else "FAIL"))
  return rows, failures


def print_table(rows) -> None:
  header = ("backend", "dtype", "err o", "max err grad", "fwd ms", "fwd+bwd ms", "")
  widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
  for row in [header] + rows:
    print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
  print(f"tolerances vs float64 recurrence: {TOLERANCE}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  for name, default in (("b", 2), ("t", 300), ("hq", 4), ("h", 2), ("dk", 32), ("dv", 48), ("m", 24)):
    parser.add_argument(f"--{name}", type=int, default=default)
  parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
  parser.add_argument("--kernel-block-sizes", default="",
                      help="the kernels' tiles, e.g. pallas_gpu.block_k=128,pallas_gpu.num_warps=8")
  parser.add_argument("--normalizer", type=float, default=8.0, help="g = logsigmoid(x) / normalizer")
  parser.add_argument("--segments", action="store_true", help="pack random documents with padding per row")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--backends", default=",".join(b for b in BACKENDS if b != "auto"))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0)


def argument_error(args, extra_backends=()) -> str | None:
  """What is wrong with the command line (one line naming the flag), or None."""
  for name in ("b", "t", "hq", "h", "dk", "dv", "m", "repeats"):
    if getattr(args, name) < 1:
      return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
  if args.hq % args.h:
    return f"--hq={args.hq} must be a multiple of --h={args.h} (grouped-query heads)"
  if args.chunk_size < 1 or args.chunk_size & (args.chunk_size - 1):
    return f"--chunk-size must be a positive power of two, got {args.chunk_size}"
  if not args.normalizer > 0:
    return f"--normalizer must be > 0, got {args.normalizer}"
  try:
    parse_kernel_block_sizes(args.kernel_block_sizes)
  except (TypeError, ValueError) as e:
    return f"--kernel-block-sizes: {str(e).removeprefix('kernel_block_sizes: ')}"
  for flag, given, known in (("--dtypes", args.dtypes, tuple(TOLERANCE)),
                             ("--backends", args.backends, BACKENDS + tuple(extra_backends))):
    unknown = [x for x in given.split(",") if x not in known]
    if unknown:
      return f"{flag}: unknown {unknown}; expected a comma-separated subset of {list(known)}"
  return None


def run_from_args(args, extra=None) -> int:
  error = argument_error(args, tuple(extra or ()))
  if error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  shape = (args.b, args.t, args.hq, args.h, args.dk, args.dv, args.m)
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  print(f"shape: B={args.b} T={args.t} HQ={args.hq} H={args.h} K={args.dk} V={args.dv} M={args.m}, "
        f"chunk {args.chunk_size}, g = logsigmoid(x)/{args.normalizer}, segments {'on' if args.segments else 'off'}, "
        f"kernel tiles: {args.kernel_block_sizes or 'defaults'}")
  rows, failures = compare(shape, dtypes=args.dtypes.split(","), backends=args.backends.split(","),
                           chunk_size=args.chunk_size, normalizer=args.normalizer, segments=args.segments,
                           repeats=args.repeats, seed=args.seed, extra=extra,
                           kernel_block_sizes=args.kernel_block_sizes)
  print_table(rows)
  return 1 if failures else 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_arguments(parser)
  return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
  sys.exit(main())
