"""The Pallas TPU kernels against the float64 recurrence and the float64 chunked form: forward, final states and
every gradient, in Pallas' TPU interpret mode on CPU (there is no TPU here; `TestPallasTPU` runs the same cases
compiled and is skipped unless JAX's default backend is a TPU).

    TPU machine:  python -m pytest -q tests/test_pallas_tpu.py -k "not Interpret" -m "slow or not slow"
    CPU, all interpreted cases:  python -m pytest -q tests/test_pallas_tpu.py -m "slow or not slow"
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from gsa_jax.ops import api, gated_slot_attention, resolve_backend
from gsa_jax.ops.common import RESIDUALS_NAME
from gsa_jax.ops.testing import cast, make_inputs, rel_err
from pallas_kernels import gsa_tpu
from pallas_kernels.gsa_common import chunk_gate_sums
from pallas_kernels.gsa_tpu import BlockSizes, gsa_pallas_tpu
from tests.gsa_testing import (KERNEL_TOL, CompiledKernelTests, KernelCase, PublicAPIBackendTests,
                               assert_matches_references, marked_slow, run_case)

# t, dk, dv, m, hq, h, chunk, gate, with_state, dtype, segments[, normalizer]. Together they cover T in {1, 33, 63,
# 64, 65, 130}, widths that are not powers of two (padded to 128 lanes), GQA with one and two kv heads, initial state
# on/off, packed documents (padding first, inside and last), g = 0, g = -1e3 and both side by side, strong gates
# (normalizer 0.1), float32 and bfloat16, one and several chunks and sub-chunks.
CASES = {name: KernelCase(*fields) for name, fields in {
    "t1": (1, 16, 16, 16, 1, 1, 64, "logsigmoid", False, "float32", False),
    "t63_gqa_state": (63, 20, 36, 12, 2, 1, 32, "logsigmoid", True, "float32", False),
    "t64_bf16_state": (64, 36, 20, 12, 1, 1, 32, "logsigmoid", True, "bfloat16", False),
    "t65_gqa2_state": (65, 20, 20, 24, 4, 2, 64, "logsigmoid", True, "float32", False),
    "segments_gqa_state": (96, 20, 12, 12, 2, 1, 32, "logsigmoid", True, "float32", True),
    "segments_bf16_strong_gates": (96, 16, 16, 16, 1, 1, 16, "logsigmoid", False, "bfloat16", True, 0.1),
    "gates_mixed_gqa2": (33, 16, 12, 10, 4, 2, 32, "mixed", True, "float32", False),
    "gates_zero": (40, 16, 12, 10, 1, 1, 16, "zero", True, "float32", False),
    "gates_very_negative": (40, 16, 12, 10, 1, 1, 16, "very_negative", True, "float32", False),
    "t130_bf16_gqa_state": (130, 32, 48, 16, 2, 1, 64, "logsigmoid", True, "bfloat16", False),
    "wide_m130_bf16": (70, 130, 40, 130, 1, 1, 64, "mixed", True, "bfloat16", False),
}.items()}
# Left out of the default CPU suite for time; run with -m slow.
SLOW = ("t65_gqa2_state", "gates_very_negative", "t130_bf16_gqa_state", "wide_m130_bf16")


class TestPallasTPU(CompiledKernelTests, PublicAPIBackendTests):
  PLATFORM, BACKEND = "tpu", "pallas_tpu"
  SKIP_REASON = "compiled Mosaic kernels need a TPU (the interpreted class runs these cases on CPU)"

  @pytest.mark.parametrize("case", marked_slow(CASES, SLOW))
  def test_matches_float64_references(self, x64, case):
    c = CASES[case]
    got, refs = run_case(gsa_pallas_tpu, c, list(CASES).index(case) + 200, interpret=self.INTERPRET,
                         fast_cpu_compile=self.fast_cpu_compile, references=("recurrent", "chunked"),
                         block_sizes=BlockSizes(chunk=c.chunk))
    assert_matches_references(got, refs, c, tol=lambda name: KERNEL_TOL[c.dtype])


class TestPallasTPUInterpret(TestPallasTPU):
  INTERPRET = True


def test_extreme_gates_no_nan():
  """g = 0, -1e3 and -inf side by side in slots and tokens: forward and gradients finite and equal to the recurrence."""
  x = cast(make_inputs(5, b=1, t=32, hq=1, h=1, dk=16, dv=16, m=8, gate="mixed", with_state=True), jnp.float32)
  x["g"] = x["g"].at[0, 3:5, 0, :3].set(-jnp.inf).at[0, 20, 0, 5].set(-jnp.inf)
  state = x.pop("initial_state")

  def loss(backend, q, k, v, s, g, state):
    o, final = gated_slot_attention(q, k, v, s, g, scale=0.5, initial_state=state, output_final_state=True,
                                    backend=backend)
    return jnp.sum(o * jnp.cos(o)) + jnp.sum(final.hk) + jnp.sum(final.hv ** 2), o

  args = [x[n] for n in "qkvsg"] + [state]
  (_, o), grads = jax.value_and_grad(lambda *a: loss("pallas_tpu", *a), argnums=range(6), has_aux=True)(*args)
  (_, o_ref), grads_ref = jax.value_and_grad(lambda *a: loss("recurrent", *a), argnums=range(6), has_aux=True)(*args)
  assert rel_err(o, o_ref) < 1e-5
  for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    assert np.isfinite(np.asarray(got)).all()
    assert rel_err(got, ref) < 1e-4


def test_in_kernel_gate_sums_match_shared_definition():
  """The kernels' interval sums of g (0/1 masks on the MXU) are the sub-chunk scheme of gsa_common."""
  rng = np.random.default_rng(0)
  c, m = 32, 128
  g = jnp.asarray(-rng.exponential(size=(c, m)), jnp.float32)
  f16, b16, f64, b64 = (x[0, :, 0] for x in chunk_gate_sums(g[None, :, None, :], c))
  fwd, rev = gsa_tpu._decays(g, reverse=False), gsa_tpu._decays(g, reverse=True)
  np.testing.assert_allclose(fwd.qf, jnp.exp(f16), rtol=2e-5)
  np.testing.assert_allclose(rev.qf, jnp.exp(b16), rtol=2e-5)
  np.testing.assert_allclose(fwd.x, jnp.exp(f64), rtol=2e-5)
  np.testing.assert_allclose(fwd.y, jnp.exp(b64), rtol=2e-5)
  np.testing.assert_allclose(rev.x, jnp.exp(b64), rtol=2e-5)
  np.testing.assert_allclose(rev.y, jnp.exp(f64), rtol=2e-5)
  # Off-diagonal: key row j of sub-chunk 0 to query sub-chunk 1 is b16[j] (forward).
  np.testing.assert_allclose(fwd.kf[1], jnp.exp(b16[:16]), rtol=2e-5)
  np.testing.assert_allclose(rev.kf[0], jnp.exp(f16[16:]), rtol=2e-5)
  # Diagonal block: exp(sum_{j < i <= t} g_i), zero above the diagonal.
  d = np.asarray(fwd.diag[0]).reshape(16, 16, m)  # [query row, key row, slot]
  gs = np.asarray(g, np.float64)
  np.testing.assert_allclose(d[5, 2], np.exp(gs[3:6].sum(0)), rtol=1e-5)
  assert (d[2, 5] == 0).all()
  d = np.asarray(rev.diag[1]).reshape(16, 16, m)
  np.testing.assert_allclose(d[2, 5], np.exp(gs[19:22].sum(0)), rtol=1e-5)
  assert (d[5, 2] == 0).all()


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("shape", ["small", "paper"])
def test_lowers_to_mosaic(backward, shape):
  """Without a TPU: the kernels lower through Pallas' Mosaic (TPU) lowering, block shapes and all; "paper" is one
  head of the paper's layer (K = V = 512, M = 64) with chunk 64, GQA off."""
  t, dk, dv, m, hq, chunk = (40, 20, 12, 10, 2, 32) if shape == "small" else (128, 512, 512, 64, 1, 64)
  x = {n: jax.ShapeDtypeStruct(shape, jnp.bfloat16) for n, shape in
       zip("qkvsg", [(1, t, hq, dk), (1, t, 1, dk), (1, t, 1, dv), (1, t, 1, m), (1, t, 1, m)])}
  x["initial_state"] = (jax.ShapeDtypeStruct((1, 1, dk, m), jnp.float32),
                        jax.ShapeDtypeStruct((1, 1, m, dv), jnp.float32))

  def fn(x):
    o, final = gsa_pallas_tpu(**x, scale=0.5, block_sizes=BlockSizes(chunk=chunk), interpret=False,
                              segment_ids=jnp.ones((1, t), jnp.int32))
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final.hk) + jnp.sum(final.hv)

  f = jax.grad(fn) if backward else fn
  text = jax.jit(f).trace(x).lower(lowering_platforms=("tpu",)).as_text()
  assert text.count("tpu_custom_call") == (3 if backward else 1)


def test_interpret_mode_is_tpu_interpret_mode():
  assert isinstance(gsa_tpu.interpret_params(True), pltpu.InterpretParams)
  assert gsa_tpu.interpret_params(False) is False


def test_auto_picks_pallas_tpu_on_tpu():
  assert resolve_backend("auto", "tpu") == "pallas_tpu"
  assert resolve_backend("auto", "cpu") == "chunked"


def test_unsupported_dtype_falls_back_to_chunked(caplog):
  """The op runs float16 (not a TPU kernel dtype) with 'chunked' and says why; the kernels' entry point raises."""
  x = cast(make_inputs(3, b=1, t=9, hq=1, h=1, dk=8, dv=8, m=4), jnp.float16)
  api._log_once.cache_clear()  # pylint: disable=protected-access  (logged once per process)
  with caplog.at_level(logging.WARNING):
    o, _ = gated_slot_attention(**x, scale=0.5, backend="pallas_tpu")
  o_ref, _ = gated_slot_attention(**x, scale=0.5, backend="chunked")
  np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(o_ref, np.float32), rtol=1e-3, atol=1e-3)
  assert any("'pallas_tpu' does not support dtypes ['float16']" in r.getMessage() for r in caplog.records)
  with pytest.raises(ValueError, match=r"gsa_pallas_tpu does not support dtypes \['float16'\]"):
    gsa_pallas_tpu(**x, scale=0.5, interpret=True)


def test_vmem_budget_at_paper_sizes_fits_default_scoped_limit():
  """K = V = 512, M = 64 (padded to 128), chunk 64, bf16: every pass under 16 MiB (docs/tpu_kernels.md)."""
  for name in ("forward", "backward_1", "backward_2"):
    assert gsa_tpu.vmem_bytes(name, chunk=64, kp=512, vp=512, mp=128) < 16 * 2**20


def test_forward_names_its_residuals_for_remat_policies():
  """The slot logits and both final states leave the forward named RESIDUALS_NAME, so a remat policy that keeps the
  name spares the backward a rerun of the forward kernel. (Read from the jaxpr: in TPU interpret mode the kernels
  are callbacks, which `jax.checkpoint` cannot differentiate, so a policy cannot be run here.)"""
  x = make_inputs(0, b=1, t=64, hq=2, h=1, dk=32, dv=48, m=16)

  def loss(q, k, v, s, g):
    o, _ = gsa_pallas_tpu(q, k, v, s, g, scale=1.0)
    return jnp.sum(o ** 2)

  jaxpr = str(jax.make_jaxpr(lambda *a: jax.vjp(loss, *a)[1](1.0))(*(jnp.asarray(x[n]) for n in "qkvsg")))
  assert jaxpr.count(f"name={RESIDUALS_NAME}") == 3
