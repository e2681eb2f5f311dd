"""Shared test helpers: the kernels' error bars, packed-document segment ids, and the scaffolding the kernel tests
(tests/test_pallas_gpu.py, test_pallas_mgpu.py, test_pallas_tpu.py) share: a case table, a compiled test class with
an interpreted twin, one case run against the float64 references, and the residuals a remat policy keeps.
(Random inputs, references and error measures are `gsa_jax.ops.testing`'s, which benchmarks use too.)"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsa_jax.ops import gated_slot_attention
from gsa_jax.ops.testing import cast, forward_and_grads, kernel_forward_and_grads, make_inputs, rel_err

# Relative L2 error vs float64 that every fast path must meet (the issues' bars; float16, whose outputs are rounded
# to 11 bits, gets the bfloat16 bar scaled by their precisions, rounded up).
KERNEL_TOL = {"float32": 1e-4, "bfloat16": 2.5e-3, "float16": 1e-3}
# Documents of length 1, padding before the first document (which still starts from the initial state), inside a
# document and at the end, documents crossing chunk borders (t = 96).
SEGMENTS = np.array([
    [1] * 13 + [2] + [3] * 30 + [0] * 3 + [3] * 5 + [4] * 20 + [5] + [0] * 23,
    [0] * 2 + [7] + [0] * 4 + [7] * 38 + [8] * 20 + [9] * 15 + [10] * 16,
], np.int32)


class KernelCase(NamedTuple):
  """One kernel test problem (batch 2): its sizes, the kernel's chunk, the gate recipe of `make_inputs`, an initial
  state or not, the input dtype's name, packed documents (SEGMENTS[:, :t]) or not, and the gates' normalizer
  (`make_inputs`: 8 gives gates near -0.1, the layer's default; 0.1 strong gates near -8)."""
  t: int
  dk: int
  dv: int
  m: int
  hq: int
  h: int
  chunk: int
  gate: str
  with_state: bool
  dtype: str
  segments: bool = False
  normalizer: float = 8.0

  def inputs(self, seed):
    """(inputs as `make_inputs` returns them, segment ids [2, t] or None)."""
    x = make_inputs(seed, b=2, t=self.t, hq=self.hq, h=self.h, dk=self.dk, dv=self.dv, m=self.m, gate=self.gate,
                    normalizer=self.normalizer, with_state=self.with_state, dtype=jnp.dtype(self.dtype))
    return x, (jnp.asarray(SEGMENTS[:, :self.t]) if self.segments else None)


def marked_slow(names, slow) -> list:
  """pytest parameters: each of `names`, marked slow if it is in `slow`."""
  return [pytest.param(n, marks=pytest.mark.slow) if n in slow else n for n in names]


class CompiledKernelTests:
  """Base of a kernel's test class. As is (INTERPRET = False) its tests run the compiled kernels and are skipped
  unless JAX's default backend is PLATFORM; a subclass with INTERPRET = True runs them in Pallas' interpret mode
  (on CPU in the default suite)."""

  INTERPRET = False
  PLATFORM = ""  # "gpu" or "tpu"
  SKIP_REASON = ""  # why a compiled test is skipped off PLATFORM

  @pytest.fixture(autouse=True)
  def _need_device(self):
    if not self.INTERPRET and jax.default_backend() != self.PLATFORM:
      pytest.skip(self.SKIP_REASON)

  @property
  def fast_cpu_compile(self) -> bool:
    """Interpreted off the device: compile the (large) interpreted programs in the CPU compiler's cheap mode."""
    return self.INTERPRET and jax.default_backend() != self.PLATFORM


class PublicAPIBackendTests:
  """For a CompiledKernelTests class whose kernels are BACKEND: the public op with that backend equals `chunked`."""

  BACKEND = ""

  def test_public_api_backend(self):
    if self.INTERPRET and jax.default_backend() == self.PLATFORM:
      pytest.skip(f"the public API compiles the kernels on {self.PLATFORM}")
    x = cast(make_inputs(2, t=33, hq=2, h=1, dk=20, dv=12, m=10), jnp.float32)
    o, final = gated_slot_attention(**x, backend=self.BACKEND, output_final_state=True)
    o_ref, final_ref = gated_slot_attention(**x, backend="chunked", output_final_state=True)
    assert rel_err(o, o_ref) < 1e-5
    assert rel_err(final.hk, final_ref.hk) < 1e-5 and rel_err(final.hv, final_ref.hv) < 1e-5


def run_case(kernel, case: KernelCase, seed, *, interpret, fast_cpu_compile=False, grads=True,
             references=("recurrent",), scale=0.7, **kw):
  """The kernel entry point (gsa_pallas_gpu, ...) on the case's inputs, jitted, and the float64 references.

  Returns (got, {reference backend: its values}), flat dicts of o, hk, hv and (grads=True) every input gradient for
  a random cotangent (`gsa_jax.ops.testing.forward_and_grads`). Call it under `jax.enable_x64(True)`."""
  x, segment_ids = case.inputs(seed)
  dtype = jnp.dtype(case.dtype)
  if case.segments:
    kw["segment_ids"] = segment_ids
  with jax.enable_x64(False):
    if grads:
      got = kernel_forward_and_grads(kernel, cast(x, dtype), fast_cpu_compile=fast_cpu_compile, scale=scale,
                                     interpret=interpret, **kw)
    else:
      o, final = jax.jit(lambda x: kernel(**x, scale=scale, interpret=interpret, **kw))(cast(x, dtype))
      got = {"o": o, "hk": final.hk, "hv": final.hv}
  refs = {}
  for backend in references:
    if grads:
      refs[backend] = forward_and_grads(cast(x, jnp.float64), backend=backend, scale=scale, segment_ids=segment_ids)
    else:
      o, final = gated_slot_attention(**cast(x, jnp.float64), scale=scale, segment_ids=segment_ids, backend=backend,
                                      output_final_state=True)
      refs[backend] = {"o": o, "hk": final.hk, "hv": final.hv}
  return got, refs


def assert_matches_references(got, refs, case: KernelCase, tol: Callable[[str], float]):
  """Every value of `got` has its reference's shape, is finite and within tol(name) relative L2 error of each
  reference; o is in the case's dtype and the states in float32; padding tokens get exactly zero output."""
  assert got["o"].dtype == jnp.dtype(case.dtype) and got["hk"].dtype == jnp.float32
  for backend, ref in refs.items():
    assert set(got) == set(ref)
    for name, value in got.items():
      assert value.shape == ref[name].shape, name
      assert np.isfinite(np.asarray(value, np.float64)).all(), f"non-finite values in {name}"
    errors = {name: rel_err(got[name], ref[name]) for name in ref}
    for name, err in errors.items():
      assert err <= tol(name), f"{name} vs {backend}: relative L2 error {err:.2e} > {tol(name):.1e} (all: {errors})"
  if case.segments:
    np.testing.assert_array_equal(np.asarray(got["o"], np.float32)[np.asarray(SEGMENTS[:, :case.t]) == 0], 0.0)


def kept_residuals(loss, args, names, capsys) -> set[str]:
  """The shapes (e.g. "f32[1,2,32,16]") of the residuals `jax.checkpoint(loss)` keeps under a policy that saves
  only `names` (nothing when empty), read from `print_saved_residuals` (traced only: nothing runs)."""
  policy = jax.checkpoint_policies.save_only_these_names(*names) if names else jax.checkpoint_policies.nothing_saveable
  capsys.readouterr()
  jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(loss, policy=policy), *args)
  return {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()}
