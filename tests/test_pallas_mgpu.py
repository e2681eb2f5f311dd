"""The Mosaic GPU forward kernels (`pallas_kernels/gsa_mgpu.py`) against the float64 recurrence.

`TestPallasMGPUInterpret` runs in the CPU suite through Mosaic GPU's interpreter (jax 0.11.2 runs TMA copies,
barriers and wgmma there; it checks the kernels' math and indexing, not the compiled layouts or timing).
`TestPallasMGPU` runs the same cases compiled for a Hopper GPU and is skipped without a GPU:

    GPU machine:  python -m pytest -q tests/test_pallas_mgpu.py -k "not Interpret" -m "slow or not slow"
    CPU, all interpreted cases:  python -m pytest -q tests/test_pallas_mgpu.py -m "slow or not slow"
"""

from __future__ import annotations

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsa_jax.ops import BACKENDS, api, gated_slot_attention, resolve_backend
from gsa_jax.ops.common import RESIDUALS_NAME
from gsa_jax.ops.testing import cast, make_inputs
from pallas_kernels.gsa_mgpu import BlockSizes, gsa_pallas_mgpu, unsupported_reason
from tests.gsa_testing import (KERNEL_TOL, CompiledKernelTests, KernelCase, assert_matches_references,
                               kept_residuals, marked_slow, run_case)

# One chunk (float16); several chunks with a ragged tail, widths padded to 64, grouped heads, an initial state and
# strong gates (normalizer 0.1); extreme gates (g = 0 next to g = -1e3) with two kv heads; several feature blocks
# per program. The kernels' chunk is 64.
CASES = {
    "t64_f16": KernelCase(64, 64, 64, 64, 1, 1, 64, "logsigmoid", False, "float16"),
    "t130_gqa_state_strong_gates": KernelCase(130, 80, 160, 20, 2, 1, 64, "logsigmoid", True, "bfloat16",
                                              normalizer=0.1),
    "gates_mixed_gqa2_state": KernelCase(70, 16, 12, 10, 4, 2, 64, "mixed", True, "bfloat16"),
    "wide_blocks_gqa_state": KernelCase(200, 192, 256, 64, 4, 2, 64, "logsigmoid", True, "bfloat16"),
}
SLOW = ("wide_blocks_gqa_state",)


class TestPallasMGPU(CompiledKernelTests):
  PLATFORM = "gpu"
  SKIP_REASON = "compiled Mosaic GPU kernels need a Hopper GPU (the interpreted class runs these cases on CPU)"

  @pytest.mark.parametrize("case", marked_slow(CASES, SLOW))
  def test_forward_matches_float64_recurrence(self, x64, case):
    c = CASES[case]
    got, refs = run_case(gsa_pallas_mgpu, c, list(CASES).index(case) + 200, interpret=self.INTERPRET, grads=False)
    assert_matches_references(got, refs, c, tol=lambda name: KERNEL_TOL[c.dtype])

  def test_gradients_match_float64_recurrence(self, x64):
    """The backward (the Triton kernels', on this forward's residuals), every input gradient (the initial state's
    included), two kv heads."""
    c = KernelCase(70, 16, 24, 10, 4, 2, 64, "logsigmoid", True, "bfloat16")
    got, refs = run_case(gsa_pallas_mgpu, c, 300, interpret=self.INTERPRET, fast_cpu_compile=self.fast_cpu_compile)
    assert_matches_references(got, refs, c, tol=lambda name: KERNEL_TOL["bfloat16"])


class TestPallasMGPUInterpret(TestPallasMGPU):
  INTERPRET = True


def test_kernels_lower_for_cuda():
  """Pallas' Mosaic GPU lowering (tilings and swizzles, wgmma operand shapes and transposes, layouts) runs without
  a GPU: the forward at the anchor widths (K = V = 512, M = 64, grouped heads) lowers for CUDA into its four
  Mosaic GPU kernels. Compiling them to machine code needs the GPU (`TestPallasMGPU`)."""
  q = jax.ShapeDtypeStruct((1, 128, 4, 512), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 128, 2, 512), jnp.bfloat16)
  sg = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.bfloat16)
  fwd = jax.jit(lambda *x: gsa_pallas_mgpu(*x, scale=1.0, interpret=False))
  text = fwd.trace(q, kv, kv, sg, sg).lower(lowering_platforms=("cuda",)).as_text()
  assert re.findall(r"custom_call @(\w+)", text) == ["mosaic_gpu_v2"] * 4


def test_unsupported_reason():
  x = cast(make_inputs(1, t=8, dk=8, dv=8, m=8), jnp.bfloat16)
  args = [x[n] for n in "qkvsg"]
  assert unsupported_reason(*args) is None
  assert "dtypes" in unsupported_reason(*[a.astype(jnp.float32) for a in args])
  assert "segment_ids" in unsupported_reason(*args, segment_ids=jnp.ones((2, 8), jnp.int32))
  wide = cast(make_inputs(1, t=8, dk=8, dv=8, m=65), jnp.bfloat16)
  assert "M=65" in unsupported_reason(*[wide[n] for n in "qkvsg"])


def test_unsupported_inputs_go_to_pallas_gpu(caplog):
  """float32 inputs are not the wgmma kernels' (16-bit operands): the op gives the call to the Triton backend,
  logged; the Mosaic GPU entry point raises."""
  x = cast(make_inputs(3, b=1, t=9, hq=1, h=1, dk=8, dv=8, m=6), jnp.float32)
  api._log_once.cache_clear()  # pylint: disable=protected-access  (the reason is logged once per process)
  with caplog.at_level(logging.WARNING):
    o, _ = gated_slot_attention(**x, scale=0.5, backend="pallas_mgpu")
  o_ref, _ = gated_slot_attention(**x, scale=0.5, backend="chunked")
  np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-6)
  assert any("'pallas_mgpu' does not support dtypes" in r.getMessage() and "using 'pallas_gpu'" in r.getMessage()
             for r in caplog.records)
  with pytest.raises(ValueError, match=r"gsa_pallas_mgpu does not support dtypes .*with 'pallas_gpu'"):
    gsa_pallas_mgpu(**x, scale=0.5, interpret=True)


def test_block_sizes_are_validated():
  with pytest.raises(ValueError, match="state_block=96"):
    BlockSizes(state_block=96)
  with pytest.raises(ValueError, match="out_block=0"):
    BlockSizes(out_block=0)


def test_backend_is_selectable_and_auto_keeps_triton():
  assert "pallas_mgpu" in BACKENDS
  assert resolve_backend("pallas_mgpu") == "pallas_mgpu"
  assert resolve_backend("auto", "gpu") == "pallas_gpu"


@pytest.mark.parametrize("names,expected", [((), set()), ((RESIDUALS_NAME,), {"logits", "final"})])
def test_remat_policy_keeps_named_residuals(names, expected, capsys):
  """The float32 slot logits and final states are saved under RESIDUALS_NAME, which a remat policy may keep
  (instead of rerunning the forward kernels in the backward). Traced only (nothing runs)."""
  b, t, h, d, m = 1, 128, 2, 48, 16  # key states [.., d, m]: d != m tells them apart
  x = cast(make_inputs(0, b=b, t=t, hq=2 * h, h=h, dk=d, dv=d, m=m), jnp.bfloat16)

  def loss(q, k, v, s, g):
    o, _ = gsa_pallas_mgpu(q, k, v, s, g, scale=1.0, interpret=False)  # traced only: the compiled kernels
    return jnp.sum(o.astype(jnp.float32) ** 2)

  kept = kept_residuals(loss, [x[n] for n in "qkvsg"], names, capsys)
  shapes = {"logits": f"f32[{b},{t},{2 * h},{m}]", "final": f"f32[{b},{h},{d},{m}]"}
  assert {name for name, shape in shapes.items() if shape in kept} == expected
