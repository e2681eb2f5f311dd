"""The Pallas GPU kernels against the float64 recurrence: forward, final states and every gradient.

`TestPallasGPUInterpret` (INTERPRET = True) runs in the CPU suite through Pallas' interpreter. `TestPallasGPU`
runs the same cases compiled through Triton and is skipped unless JAX's default backend is a GPU:

    GPU machine:  python -m pytest -q tests/test_pallas_gpu.py -k "not Interpret" -m "slow or not slow"
    CPU, all interpreted cases:  python -m pytest -q tests/test_pallas_gpu.py -m "slow or not slow"
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsa_jax.ops import api, gated_slot_attention, resolve_backend
from gsa_jax.ops.common import KEY_STATES_NAME, RESIDUALS_NAME, VALUE_STATES_NAME, GSAState
from gsa_jax.ops.testing import cast, make_inputs
from pallas_kernels import BlockSizes, gsa_decode_step, gsa_decode_step_pallas, gsa_gpu, gsa_pallas_gpu
from tests.gsa_testing import (KERNEL_TOL, CompiledKernelTests, KernelCase, PublicAPIBackendTests,
                               assert_matches_references, kept_residuals, marked_slow, run_case)

ON_GPU = jax.default_backend() == "gpu"

# t, dk, dv, m, hq, h, chunk, gate, with_state, dtype, segments[, normalizer]. Together they cover T in {1, 63, 64,
# 65, 130}, widths that are not powers of two, GQA with one and two kv heads, initial state on/off, packed documents
# (padding first, inside and last), extreme gates, strong gates (normalizer 0.1), f32, bf16 and f16.
CASES = {name: KernelCase(*fields) for name, fields in {
    "t1": (1, 16, 16, 16, 1, 1, 64, "logsigmoid", False, "float32", False),
    "t63_gqa_state": (63, 20, 36, 12, 2, 1, 64, "logsigmoid", True, "float32", False),
    "t64_bf16_state": (64, 36, 20, 12, 1, 1, 32, "logsigmoid", True, "bfloat16", False),
    "t65_gqa": (65, 20, 20, 24, 4, 2, 32, "logsigmoid", False, "float32", False),
    "t130_bf16_gqa_state": (130, 32, 48, 16, 2, 1, 64, "logsigmoid", True, "bfloat16", False),
    "t70_f16_gqa_state_segments": (70, 20, 36, 12, 2, 1, 32, "logsigmoid", True, "float16", True),
    "segments_gqa_state": (96, 20, 12, 12, 2, 1, 32, "logsigmoid", True, "float32", True),
    "segments_bf16_strong_gates": (96, 16, 16, 16, 1, 1, 16, "logsigmoid", False, "bfloat16", True, 0.1),
    "gates_mixed_gqa2": (70, 16, 12, 10, 4, 2, 32, "mixed", True, "float32", False),
    "gates_zero": (40, 16, 12, 10, 1, 1, 16, "zero", True, "float32", False),
    "gates_very_negative": (40, 16, 12, 10, 1, 1, 16, "very_negative", True, "float32", False),
    # Several chunks and several feature blocks per program, widths padded to non-powers of two (192, 128).
    "wide_blocks_bf16_gqa_state": (200, 160, 96, 64, 2, 1, 64, "logsigmoid", True, "bfloat16", False),
}.items()}
# Left out of the default CPU suite for time (each interpreted case compiles eight kernels); run with -m slow.
SLOW = ("t65_gqa", "gates_zero", "gates_very_negative", "wide_blocks_bf16_gqa_state")
# Relative L2 error vs float64: KERNEL_TOL (the bar: 1e-4 float32, 2.5e-3 bfloat16). With g = -1e3 next to
# g = 0 the diagonal 16 x 16 sub-blocks take a difference of two prefix sums (see the kernel's docstring): those
# cases get 5e-4 on the gradients.
TOL_MIXED_GATES = 5e-4


# Kernel configurations under test: the default, and each switch away from it.
VARIANTS = {
    "default": BlockSizes(),
    "no_split": BlockSizes(split_all=False),
    "recompute_states": BlockSizes(recompute_states=True),
    "state_segments": BlockSizes(state_segments=3),
}
# Left out of the default suite (each interpreted case takes 10-60 s on a CPU); with -m slow every variant runs every
# case, interpreted on CPU and compiled on GPU. The segmented state passes stay in the default suite: the default's
# small test shapes never choose segments by themselves.
SLOW_VARIANTS = ("no_split", "recompute_states")


class TestPallasGPU(CompiledKernelTests, PublicAPIBackendTests):
  PLATFORM, BACKEND = "gpu", "pallas_gpu"
  SKIP_REASON = "compiled Triton kernels need a GPU (the interpreted class runs these cases on CPU)"

  @pytest.mark.parametrize("variant", marked_slow(VARIANTS, SLOW_VARIANTS))
  @pytest.mark.parametrize("case", marked_slow(CASES, SLOW))
  def test_matches_float64_recurrence(self, x64, case, variant):
    c = CASES[case]
    # The entry point runs its kernels or raises: there is no fallback to pass these comparisons instead.
    got, refs = run_case(gsa_pallas_gpu, c, list(CASES).index(case) + 100, interpret=self.INTERPRET,
                         fast_cpu_compile=self.fast_cpu_compile,
                         block_sizes=dataclasses.replace(VARIANTS[variant], chunk=c.chunk))

    def tol(name):
      gradient = name not in ("o", "hk", "hv")
      return TOL_MIXED_GATES if c.gate == "mixed" and gradient else KERNEL_TOL[c.dtype]

    assert_matches_references(got, refs, c, tol)


class TestPallasGPUInterpret(TestPallasGPU):
  INTERPRET = True


def test_auto_picks_pallas_gpu_on_gpu():
  assert resolve_backend("auto", "gpu") == "pallas_gpu"
  assert resolve_backend("auto", "cpu") == "chunked"


def test_unsupported_shape_falls_back_to_chunked(caplog):
  """The op runs what the kernels do not support with 'chunked' (and says why); the kernels' entry point raises."""
  x = cast(make_inputs(3, b=1, t=9, hq=1, h=1, dk=8, dv=8, m=130), jnp.float32)
  with caplog.at_level(logging.WARNING):
    o, _ = gated_slot_attention(**x, scale=0.5, backend="pallas_gpu")
  o_ref, _ = gated_slot_attention(**x, scale=0.5, backend="chunked")
  np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-6)
  assert any("M=130" in r.getMessage() for r in caplog.records)
  with pytest.raises(ValueError, match=r"gsa_pallas_gpu does not support M=130 slots > 128 .*with 'chunked'"):
    gsa_pallas_gpu(**x, scale=0.5, interpret=True)


def test_unsupported_dtype_falls_back_to_chunked(caplog, x64):
  """float64 inputs (not a kernel dtype) run the chunked form (float64 accuracy, which the float32 kernels could not
  give) and say so once."""
  x = cast(make_inputs(3, b=1, t=20, hq=2, h=1, dk=8, dv=8, m=6, with_state=True), jnp.float64)
  api._log_once.cache_clear()  # pylint: disable=protected-access  (logged once per process)
  with caplog.at_level(logging.WARNING):
    o, final = gated_slot_attention(**x, scale=0.5, backend="pallas_gpu", output_final_state=True)
    gated_slot_attention(**x, scale=0.5, backend="pallas_gpu")
  o_ref, final_ref = gated_slot_attention(**x, scale=0.5, backend="chunked", output_final_state=True)
  assert o.dtype == jnp.float64
  np.testing.assert_allclose(o, o_ref, rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(final.hv, final_ref.hv, rtol=1e-12, atol=1e-14)
  messages = [r.getMessage() for r in caplog.records if "does not support" in r.getMessage()]
  assert messages == ["gated_slot_attention: backend 'pallas_gpu' does not support dtypes ['float64'] (the kernels "
                      "take float32, bfloat16 or float16); using 'chunked'."]


def test_decode_steps_equal_full_sequence():
  x = cast(make_inputs(4, b=2, t=12, hq=2, h=1, dk=16, dv=16, m=8, with_state=True), jnp.float32)
  o_full, final = gated_slot_attention(**x, scale=0.5, output_final_state=True, backend="chunked")
  state = GSAState(*x["initial_state"])
  for t in range(12):
    o_t, state = gsa_decode_step(*(x[n][:, t] for n in "qkvsg"), state, scale=0.5)
    np.testing.assert_allclose(o_t, o_full[:, t], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(state.hk, final.hk, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(state.hv, final.hv, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype,hq,h,dk,dv,m", [("float32", 2, 1, 20, 36, 12), ("bfloat16", 4, 2, 64, 32, 64)])
def test_decode_kernel_equals_fused_step(dtype, hq, h, dk, dv, m):
  """The Pallas decode kernel against the fused XLA step, token by token from a random state (GQA, padded widths)."""
  dtype = jnp.dtype(dtype)
  x = cast(make_inputs(5, b=3, t=4, hq=hq, h=h, dk=dk, dv=dv, m=m, with_state=True, dtype=dtype), dtype)
  ref = got = GSAState(*x["initial_state"])
  for t in range(4):
    token = [x[n][:, t] for n in "qkvsg"]
    o_ref, ref = gsa_decode_step(*token, ref, scale=0.5)
    o, got = gsa_decode_step_pallas(*token, got, scale=0.5)
    assert o.shape == o_ref.shape and o.dtype == o_ref.dtype
    np.testing.assert_allclose(o, o_ref, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(got.hk, ref.hk, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got.hv, ref.hv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,reverse", [("gk", False), ("gv", False), ("gk", True), ("gv", True)])
def test_segmented_state_passes_equal_one_pass(kind, reverse):
  """`state_segments`: segments passed in parallel and joined in XLA give the one-pass chunk states, with documents
  starting inside and at the borders of segments and chunks, 4 chunks per segment, grouped heads summed."""
  from pallas_kernels import gsa_gpu  # noqa: PLC0415
  b, t, nh, gk, chunk, m, w = 2, 256, 2, 2, 16, 16, 32
  rng = np.random.default_rng(3)
  a_dim, b_dim = (m, w) if kind == "gk" else (w, m)
  k = jnp.asarray(rng.standard_normal((b, t, nh * gk, a_dim)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((b, t, nh * gk, b_dim)), jnp.float32)
  g = jnp.asarray(np.log(rng.uniform(0.3, 1.0, (b, t, nh, m))), jnp.float32)
  g = g.at[0, 100:103].set(-1e3)  # extreme gates inside one segment
  starts = [[17, 64, 65, 130, 200], [128, 191, 192]]  # new documents, some exactly at segment/chunk borders
  doc = jnp.asarray(np.stack([np.cumsum(np.isin(np.arange(t), s)) for s in starts]), jnp.int32)
  h0 = jnp.asarray(rng.standard_normal((b, nh, a_dim, b_dim)), jnp.float32)
  gates = gsa_gpu._chunk_gate_sums(g, chunk)
  cfg = gsa_gpu._Config(t=t, tp=t, dk=w, kp=w, bk=w, dv=w, vp=w, bv=w, m=m, mp=m, grp=gk, scale=1.0, chunk=chunk,
                        num_warps=4, num_stages=1, low_precision=None, split_all=False, interpret=not ON_GPU)
  one = gsa_gpu._cp_states(cfg, kind, reverse, gk, k, v, gates, doc, h0, "one_pass")
  four = gsa_gpu._cp_states(dataclasses.replace(cfg, state_segments=4), kind, reverse, gk, k, v, gates, doc, h0,
                            "segments")
  for x, ref in zip(four, one):
    assert x.shape == ref.shape
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-5)


def test_auto_state_segments():
  """Segments only where the state passes would run very few programs (batch 1, few heads, long T), as measured."""
  from pallas_kernels.gsa_gpu import auto_state_segments  # noqa: PLC0415
  assert auto_state_segments(batch=1, kv_heads=4, width=512, n_chunks=256) == 4  # 32 programs: B1 T16384
  assert auto_state_segments(batch=2, kv_heads=4, width=512, n_chunks=128) == 1  # 64 programs: as fast unsplit
  assert auto_state_segments(batch=8, kv_heads=4, width=512, n_chunks=32) == 1
  assert auto_state_segments(batch=1, kv_heads=4, width=512, n_chunks=31) == 2  # >= 8 chunks a segment
  assert auto_state_segments(batch=1, kv_heads=4, width=512, n_chunks=15) == 1
  assert auto_state_segments(batch=1, kv_heads=1, width=64, n_chunks=4096) == 128


def test_kernels_import_before_the_op():
  """`import pallas_kernels` first (the op imports the kernels lazily, the kernels import the op's references)."""
  for module in ("pallas_kernels", "pallas_kernels.gsa_tpu"):
    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("names,expected", [
    ((), set()),
    ((RESIDUALS_NAME,), {"logits", "final"}),
    ((RESIDUALS_NAME, KEY_STATES_NAME), {"logits", "final", "key_chunks"}),
    ((RESIDUALS_NAME, KEY_STATES_NAME, VALUE_STATES_NAME), {"logits", "final", "key_chunks", "value_chunks"}),
])
def test_remat_policy_keeps_named_residuals(names, expected, capsys):
  """The residuals a remat policy may keep by name (instead of rerunning the forward kernels in the backward):
  the float32 slot logits and final states, and the chunk states of each pass. Traced only (nothing runs)."""
  b, t, h, d, m = 1, 128, 2, 48, 16  # key states [.., d, m], value states [.., m, d]: d != m tells them apart
  dp = 64  # d as the kernels pad it
  x = make_inputs(0, b=b, t=t, hq=2 * h, h=h, dk=d, dv=d, m=m)  # logits [b, t, hq, m] unlike s and g's shape

  def loss(q, k, v, s, g):
    o, _ = gsa_pallas_gpu(q, k, v, s, g, scale=1.0, block_sizes=BlockSizes(chunk=32))
    return jnp.sum(o ** 2)

  kept = kept_residuals(loss, [x[n] for n in "qkvsg"], names, capsys)
  shapes = {"logits": f"f32[{b},{t},{2 * h},{m}]", "final": f"f32[{b},{h},{dp},{m}]",
            "key_chunks": f"f32[{b},{h},{t // 32},{dp},{m}]", "value_chunks": f"f32[{b},{h},{t // 32},{m},{dp}]"}
  assert {name for name, shape in shapes.items() if shape in kept} == expected
