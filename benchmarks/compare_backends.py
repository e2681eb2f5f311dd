"""Every available GSA implementation on one problem: error vs the float64 recurrence, and speed, in one table.

    python benchmarks/compare_backends.py --b 2 --t 1024 --hq 4 --h 4 --dk 128 --dv 128 --m 64
    python benchmarks/compare_backends.py --reference ...   # also the reference library (flash-linear-attention)

The backends of this package (`gsa_jax.ops.check` does the work: same inputs, same random cotangent, the
recurrence in float64 on the dtype-rounded inputs as the truth) and, with `--reference`, the reference PyTorch/
Triton library's `fla.ops.gsa.chunk_gsa` on the same inputs (needs torch with CUDA and `flash-linear-attention`;
its Triton autotuning makes the first call of each new shape take minutes). The reference is given the initial
states and the same scale; it has no packed-document input of this form, so it is left out with `--segments`.
Timings are medians of host-synchronized calls after a warm-up; exit status 1 if any implementation exceeds its
dtype's tolerance.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gsa_jax.ops import check  # noqa: E402
from gsa_jax.ops.testing import time_calls  # noqa: E402


def torch_cuda_times_ms(fn, repeats: int) -> tuple[float, float]:
  """(median of host-synchronized calls, mean of back-to-back calls), in ms, of a torch CUDA function after two
  warm-up calls."""
  import torch  # noqa: PLC0415  (optional: only the reference library's modes need it)

  return tuple(time_calls(fn, repeats, loop=True, sync=lambda _: torch.cuda.synchronize()))


def reference_library_runner(scale: float):
  """fn(dtype_name, inputs, segment_ids, cotangent, repeats) running fla's chunk_gsa, for `check.compare`."""
  import torch  # noqa: PLC0415  (optional: only this mode needs it)
  from fla.ops.gsa import chunk_gsa  # noqa: PLC0415

  def run(dtype_name, x, segment_ids, cotangent, repeats):
    if segment_ids is not None:
      raise NotImplementedError("packed documents: use cu_seqlens in the reference library")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    tensor = lambda a, dt: torch.tensor(np.asarray(a, np.float32), device="cuda").to(dt).requires_grad_()
    args = [tensor(x[n], dtype) for n in "qkvsg"] + [tensor(a, torch.float32) for a in x["initial_state"]]
    do = torch.tensor(np.asarray(cotangent, np.float32), device="cuda").to(dtype)

    def fwd():
      with torch.no_grad():
        return chunk_gsa(*args[:5], scale=scale, initial_state=tuple(args[5:]))[0]

    def fwd_bwd():
      o, _ = chunk_gsa(*args[:5], scale=scale, initial_state=tuple(args[5:]))
      return o, torch.autograd.grad(o, args, do)

    o, grads = fwd_bwd()
    numpy = lambda t: t.detach().float().cpu().numpy()
    return (numpy(o), [numpy(g) for g in grads], torch_cuda_times_ms(fwd, repeats)[0],
            torch_cuda_times_ms(fwd_bwd, repeats)[0])

  return run


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  check.add_arguments(parser)
  parser.add_argument("--reference", action="store_true",
                      help="also run the reference library's chunk_gsa (torch + CUDA + flash-linear-attention)")
  args = parser.parse_args(argv)
  extra = {}
  if args.reference:
    try:
      extra["reference (fla chunk_gsa)"] = reference_library_runner(scale=args.dk ** -0.5)
    except ImportError as e:
      parser.error(f"--reference needs torch and flash-linear-attention importable ({e})")
  return check.run_from_args(args, extra=extra)


if __name__ == "__main__":
  sys.exit(main())
