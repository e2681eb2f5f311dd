"""The GSA op: the recurrence against a hand-written loop, the chunked form against the recurrence (float64),
packed-sequence semantics, numerical safety and input validation."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsa_jax.ops import BACKENDS, api, gated_slot_attention, resolve_backend, segment_masks, select_backend
from gsa_jax.ops.testing import cast, forward_and_grads, make_inputs, rel_err


def numpy_gsa(q, k, v, s, g, scale, initial_state=None):
  """Spec section 1 written as plainly as possible, float64, one (batch, query head) at a time."""
  b, t, hq, dk = q.shape
  h, dv, m = k.shape[2], v.shape[3], s.shape[3]
  o = np.zeros((b, t, hq, dv))
  hk_final, hv_final = np.zeros((b, h, dk, m)), np.zeros((b, h, m, dv))
  for bi in range(b):
    for qi in range(hq):
      hi = qi // (hq // h)
      hk = np.zeros((dk, m)) if initial_state is None else initial_state[0][bi, hi].copy()
      hv = np.zeros((m, dv)) if initial_state is None else initial_state[1][bi, hi].copy()
      for ti in range(t):
        alpha = np.exp(g[bi, ti, hi])
        hk = hk * alpha[None, :] + np.outer(k[bi, ti, hi], s[bi, ti, hi])
        hv = alpha[:, None] * hv + np.outer(s[bi, ti, hi], v[bi, ti, hi])
        logits = scale * q[bi, ti, qi] @ hk
        p = np.exp(logits - logits.max())
        p /= p.sum()
        o[bi, ti, qi] = p @ hv
      hk_final[bi, hi], hv_final[bi, hi] = hk, hv
  return o, hk_final, hv_final


@pytest.mark.parametrize("hq,h,with_state", [(1, 1, False), (4, 2, True), (3, 3, True)])
def test_recurrent_matches_hand_written_loop(x64, hq, h, with_state):
  x = make_inputs(1, b=2, t=23, hq=hq, h=h, dk=6, dv=5, m=7, normalizer=1.0, with_state=with_state)
  o, final = gated_slot_attention(**cast(x, jnp.float64), scale=0.7, output_final_state=True, backend="recurrent")
  o_ref, hk_ref, hv_ref = numpy_gsa(x["q"], x["k"], x["v"], x["s"], x["g"], 0.7, x.get("initial_state"))
  assert o.dtype == jnp.float64
  assert rel_err(o, o_ref) < 1e-12
  assert rel_err(final.hk, hk_ref) < 1e-12
  assert rel_err(final.hv, hv_ref) < 1e-12


# Each case covers one value of every axis the issue lists; together they cover all values of each axis.
CASES = [
    # t, dk, dv, m, hq, h, chunk, normalizer, with_state
    (1, 16, 16, 16, 1, 1, 16, 8.0, False),
    (63, 60, 100, 32, 2, 1, 32, 1.0, True),
    (64, 64, 60, 16, 4, 4, 64, 16.0, False),
    (65, 100, 32, 60, 4, 1, 16, 0.1, True),
    (200, 32, 64, 100, 2, 2, 64, 8.0, True),
    (200, 16, 16, 64, 4, 2, 32, 0.1, False),
    (65, 32, 16, 16, 1, 1, 64, 1.0, True),
]


def _compare(x, test_dtype, *, tol_fwd, tol_grad, **kw):
  ref = forward_and_grads(cast(x, jnp.float64), backend="recurrent", **kw)
  got = forward_and_grads(cast(x, test_dtype), backend="chunked", **kw)
  assert got["o"].dtype == test_dtype
  assert set(got) == set(ref)
  errors = {name: rel_err(got[name], ref[name]) for name in ref}
  for name, value in got.items():
    assert np.isfinite(np.asarray(value, np.float64)).all(), f"non-finite values in {name}"
  for name, err in errors.items():
    tol = tol_fwd if name in ("o", "hk", "hv") else tol_grad
    assert err <= tol, f"{name}: relative L2 error {err:.2e} > {tol:.0e} (all: {errors})"
  return errors


@pytest.mark.parametrize("t,dk,dv,m,hq,h,chunk,normalizer,with_state", CASES)
def test_chunked_matches_recurrent_float32(x64, t, dk, dv, m, hq, h, chunk, normalizer, with_state):
  x = make_inputs(t * 7 + dk, b=2, t=t, hq=hq, h=h, dk=dk, dv=dv, m=m, normalizer=normalizer,
                  with_state=with_state)
  _compare(x, jnp.float32, tol_fwd=1e-5, tol_grad=1e-5, chunk_size=chunk)


def test_chunked_matches_recurrent_float64_exactly(x64):
  x = make_inputs(5, t=77, hq=4, h=2, dk=12, dv=10, m=9, normalizer=0.1, with_state=True)
  _compare(x, jnp.float64, tol_fwd=1e-12, tol_grad=1e-12, chunk_size=16)


@pytest.mark.parametrize("t,chunk", [(63, 16), (130, 64)])
def test_chunked_bfloat16_inputs_against_float64(x64, t, chunk):
  x = make_inputs(11, t=t, hq=2, h=1, dk=32, dv=32, m=16, with_state=True, dtype=jnp.bfloat16)
  _compare(x, jnp.bfloat16, tol_fwd=3e-3, tol_grad=3e-3, chunk_size=chunk)


@pytest.mark.parametrize("gate", ["zero", "very_negative", "mixed"])
@pytest.mark.parametrize("with_state", [False, True])
def test_extreme_gates_are_exact_and_finite(x64, gate, with_state):
  x = make_inputs(3, t=70, hq=2, h=1, dk=16, dv=12, m=10, gate=gate, with_state=with_state)
  _compare(x, jnp.float32, tol_fwd=1e-5, tol_grad=1e-5, chunk_size=32)


SEGMENTS = np.array([
    # A length-1 document, padding first (the first document still starts from the initial state), inside and at
    # the end, documents crossing chunk borders.
    [1] * 13 + [2] + [3] * 30 + [0] * 3 + [3] * 5 + [4] * 20 + [0] * 8,
    [0] * 3 + [7] + [0] * 4 + [7] * 37 + [8] * 20 + [9] * 15,
], np.int32)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("hq,h", [(1, 1), (4, 2)])
def test_chunked_matches_recurrent_with_segments(x64, with_state, hq, h):
  x = make_inputs(4, b=4, t=SEGMENTS.shape[1], hq=hq, h=h, dk=20, dv=12, m=24, normalizer=1.0,
                  with_state=with_state)
  ids = jnp.asarray(np.concatenate([SEGMENTS, SEGMENTS_UNORDERED]))
  _compare(x, jnp.float32, tol_fwd=1e-5, tol_grad=1e-5, chunk_size=16, segment_ids=ids)


# Ids that are not increasing: decreasing ids, and an id used again after another document (a new document), next
# to an id continued across padding (the same document).
SEGMENTS_UNORDERED = np.array([
    [9] * 11 + [4] * 20 + [0] * 2 + [4] * 3 + [2] * 17 + [1] + [3] * 20 + [0] * 6,
    [2] * 8 + [5] * 6 + [2] * 9 + [0] * 5 + [2] * 4 + [5] + [2] * 30 + [0] * 17,
], np.int32)


def documents(ids):
  """Index arrays of the documents of one row, by the definition: a non-padding token whose id differs from the
  previous non-padding token's starts a new document; padding (0) belongs to none."""
  docs, previous = [], None
  for i in np.flatnonzero(ids > 0):
    if ids[i] != previous:
      docs.append([])
    docs[-1].append(i)
    previous = ids[i]
  return [np.asarray(d) for d in docs]


def test_documents_helper():
  assert [d.tolist() for d in documents(np.array([0, 3, 3, 0, 3, 1, 3, 0]))] == [[1, 2, 4], [5], [6]]


@pytest.mark.parametrize("segments", ["increasing", "unordered"])
@pytest.mark.parametrize("backend", ["recurrent", "chunked"])
def test_packed_documents_equal_separate_runs(x64, backend, segments):
  """Packing semantics checked against their definition, not against another backend."""
  ids_batch = SEGMENTS if segments == "increasing" else SEGMENTS_UNORDERED
  t = ids_batch.shape[1]
  x = cast(make_inputs(8, b=2, t=t, hq=2, h=1, dk=8, dv=8, m=6, normalizer=1.0, with_state=True), jnp.float64)
  o, final = gated_slot_attention(**x, segment_ids=jnp.asarray(ids_batch), output_final_state=True,
                                  backend=backend, chunk_size=16)
  for row, ids in enumerate(ids_batch):
    for n, idx in enumerate(documents(ids)):
      part = {name: x[name][row:row + 1, idx] for name in "qkvsg"}
      state = tuple(a[row:row + 1] for a in x["initial_state"]) if n == 0 else None
      o_doc, final_doc = gated_slot_attention(**part, initial_state=state, output_final_state=True,
                                              backend="recurrent")
      np.testing.assert_allclose(o[row, idx], o_doc[0], rtol=1e-12, atol=1e-12)
    # The final state is the state after the last document (trailing padding changes nothing).
    np.testing.assert_allclose(final.hk[row], final_doc.hk[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(final.hv[row], final_doc.hv[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(o[row, ids == 0], 0.0)


def test_segment_masks():
  ids = jnp.array([[0, 0, 5, 5, 0, 5, 6, 6, 0, 7, 7]])
  reset, valid = segment_masks(ids)
  np.testing.assert_array_equal(valid[0], ids[0] > 0)
  np.testing.assert_array_equal(reset[0], [0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0])
  # Decreasing ids, an id used again after another document, an id continued across padding.
  reset, _ = segment_masks(jnp.array([[4, 4, 2, 0, 2, 4, 0, 4, 1]]))
  np.testing.assert_array_equal(reset[0], [0, 0, 1, 0, 0, 1, 0, 0, 1])


@pytest.mark.parametrize("backend", ["recurrent", "chunked"])
def test_long_sequence_with_extreme_gates_matches_float64(backend):
  """T = 1500, gates of 0 and -1e3 mixed in, a sharp softmax (q x 50): finite and equal to the float64 recurrence
  on the same inputs."""
  x = make_inputs(9, b=1, t=1500, hq=2, h=1, dk=8, dv=8, m=8, gate="mixed", with_state=True)
  x["q"] = x["q"] * 50.0
  o, final = gated_slot_attention(**cast(x, jnp.float32), output_final_state=True, backend=backend)
  with jax.enable_x64(True):
    o_ref, final_ref = gated_slot_attention(**cast(x, jnp.float64), output_final_state=True, backend="recurrent")
  for got, ref in ((o, o_ref), (final.hk, final_ref.hk), (final.hv, final_ref.hv)):
    assert np.isfinite(np.asarray(got)).all()
    assert rel_err(got, ref) < 1e-5


def test_default_scale_and_no_final_state():
  x = cast(make_inputs(2, t=9), jnp.float32)
  o_default, final = gated_slot_attention(**x, backend="chunked")
  o_explicit, _ = gated_slot_attention(**x, scale=16 ** -0.5, backend="chunked")
  assert final is None
  np.testing.assert_array_equal(o_default, o_explicit)


def test_auto_backend_is_resolved_in_one_place():
  assert resolve_backend("auto", "cpu") == "chunked"
  assert resolve_backend("recurrent", "gpu") == "recurrent"
  x = cast(make_inputs(2, t=9), jnp.float32)
  o_auto, _ = gated_slot_attention(**x)
  o_chunked, _ = gated_slot_attention(**x, backend=resolve_backend("auto"))
  np.testing.assert_array_equal(o_auto, o_chunked)


def test_one_function_chooses_the_implementation_and_logs_each_fallback_once(caplog, x64):
  """float64 inputs asked of 'pallas_mgpu': neither the Mosaic GPU nor the Triton kernels take them, so the op goes
  down the chain to 'chunked', saying why at each step, once however often it is called."""
  x = cast(make_inputs(3, b=1, t=9, hq=1, h=1, dk=8, dv=8, m=4), jnp.float64)
  args = [x[n] for n in "qkvsg"]
  api._log_once.cache_clear()  # pylint: disable=protected-access  (logged once per process)
  with caplog.at_level(logging.WARNING):
    assert select_backend("pallas_mgpu", *args) == "chunked"
    o, _ = gated_slot_attention(**x, backend="pallas_mgpu")
  np.testing.assert_array_equal(o, gated_slot_attention(**x, backend="chunked")[0])
  assert [r.getMessage() for r in caplog.records] == [
      "gated_slot_attention: backend 'pallas_mgpu' does not support dtypes ['float64'] (the wgmma kernels take "
      "bfloat16 or float16 q, k, v, s); using 'pallas_gpu'.",
      "gated_slot_attention: backend 'pallas_gpu' does not support dtypes ['float64'] (the kernels take float32, "
      "bfloat16 or float16); using 'chunked'."]
  x16 = [a.astype(jnp.bfloat16) for a in args]
  assert select_backend("pallas_mgpu", *x16) == "pallas_mgpu"
  assert select_backend("pallas_mgpu", *x16, jnp.ones((1, 9), jnp.int32)) == "pallas_gpu"  # no segment ids there
  assert select_backend("pallas_tpu", *x16) == "pallas_tpu"
  assert select_backend("auto", *x16) == resolve_backend("auto")


def test_jit_and_grad_through_public_api():
  x = cast(make_inputs(2, t=33), jnp.float32)

  @jax.jit
  def loss(q):
    o, _ = gated_slot_attention(q, x["k"], x["v"], x["s"], x["g"], chunk_size=16)
    return jnp.sum(o ** 2)

  grad = jax.grad(loss)(x["q"])
  assert grad.shape == x["q"].shape and np.isfinite(np.asarray(grad)).all()


# ---- input validation -------------------------------------------------------------------------------------

def _valid():
  return cast(make_inputs(0, b=2, t=5, hq=4, h=2, dk=8, dv=6, m=3), jnp.float32)


@pytest.mark.parametrize("change,error,match", [
    (lambda a: a.update(q=a["q"][0]), ValueError, r"q must have rank 4"),
    (lambda a: a.update(k=a["k"][:, :4]), ValueError, r"k has shape \(2, 4, 2, 8\); expected \(2, 5, 2, 8\)"),
    (lambda a: a.update(k=jnp.zeros((2, 5, 3, 8))), ValueError, r"HQ must be a positive multiple of H"),
    (lambda a: a.update(v=a["v"][:, :, :1]), ValueError, r"v has shape"),
    (lambda a: a.update(s=a["s"][..., :2]), ValueError, r"g has shape \(2, 5, 2, 3\); expected \(2, 5, 2, 2\)"),
    (lambda a: a.update(g=a["g"][..., :2]), ValueError, r"g has shape"),
    (lambda a: a.update(q=a["q"].astype(jnp.int32)), TypeError, r"q must be a floating-point array"),
    (lambda a: a.update(q=np.zeros((2, 5, 4, 8)).tolist()), TypeError, r"q must be an array"),
    (lambda a: a.update(initial_state=(jnp.zeros((2, 2, 8, 3)),)), TypeError, r"initial_state must be"),
    (lambda a: a.update(initial_state=(jnp.zeros((2, 2, 3, 8)), jnp.zeros((2, 2, 3, 6)))), ValueError,
     r"initial_state\[0\] \(hk\) has shape \(2, 2, 3, 8\); expected \(2, 2, 8, 3\)"),
    (lambda a: a.update(initial_state=(jnp.zeros((2, 2, 8, 3)), jnp.zeros((2, 2, 6, 3)))), ValueError,
     r"initial_state\[1\] \(hv\)"),
    (lambda a: a.update(segment_ids=jnp.ones((2, 4), jnp.int32)), ValueError, r"segment_ids has shape"),
    (lambda a: a.update(segment_ids=jnp.ones((2, 5))), TypeError, r"segment_ids must be an integer array"),
    (lambda a: a.update(chunk_size=48), ValueError, r"chunk_size=48 must be a positive power of two"),
    (lambda a: a.update(chunk_size=0), ValueError, r"chunk_size=0"),
    (lambda a: a.update(backend="triton"), ValueError, r"backend='triton' is unknown"),
])
def test_bad_input_is_named(change, error, match):
  args = _valid()
  change(args)
  with pytest.raises(error, match=match):
    gated_slot_attention(**args)


def test_every_backend_is_implemented():
  # pallas_tpu was the last one (issue #6); off a TPU it runs in Pallas' TPU interpret mode.
  for backend in BACKENDS:
    o, _ = gated_slot_attention(**_valid(), backend=backend)
    assert o.shape == _valid()["q"].shape[:3] + (_valid()["v"].shape[3],)


def test_compare_backends_flags_a_wrong_implementation():
  """`gsa_jax.ops.check.compare` (behind benchmarks/compare_backends.py): right passes, wrong fails."""
  from gsa_jax.ops import check  # noqa: PLC0415

  def chunked_outside(scale_by):
    def run(dtype_name, x, segment_ids, cotangent, repeats):
      def fn(q, k, v, s, g, hk, hv):
        o, _ = gated_slot_attention(q, k, v, s, g, initial_state=(hk, hv), backend="chunked")
        return o * scale_by
      args = [jnp.asarray(x[n], jnp.float32) for n in "qkvsg"] + [jnp.asarray(a, jnp.float32)
                                                                 for a in x["initial_state"]]
      o, vjp = jax.vjp(fn, *args)
      return o, vjp(jnp.asarray(cotangent, o.dtype)), 0.0, 0.0
    return run

  rows, failures = check.compare((1, 20, 2, 1, 8, 12, 6), dtypes=("float32",), backends=["recurrent"],
                                 extra={"right": chunked_outside(1.0), "wrong": chunked_outside(1.01)})
  verdicts = {row[0]: row[-1] for row in rows}
  assert verdicts == {"recurrent": "ok", "right": "ok", "wrong": "FAIL"} and failures == 1


def test_every_entry_point_defaults_to_the_one_chunk_size():
  """The chunk of the chunked form has one default (`DEFAULT_CHUNK_SIZE`), whatever entry point a user starts from."""
  import argparse  # noqa: PLC0415
  import dataclasses  # noqa: PLC0415
  import inspect  # noqa: PLC0415

  from gsa_jax.layers import GatedSlotAttention  # noqa: PLC0415
  from gsa_jax.models import GSAConfig  # noqa: PLC0415
  from gsa_jax.ops import DEFAULT_CHUNK_SIZE, chunk_gsa, context_parallel_gsa, validate_inputs  # noqa: PLC0415
  from gsa_jax.ops import check  # noqa: PLC0415

  defaults = {fn.__qualname__: inspect.signature(fn).parameters["chunk_size"].default
              for fn in (gated_slot_attention, validate_inputs, chunk_gsa, context_parallel_gsa,
                         GatedSlotAttention.__init__, check.compare)}
  defaults["GSAConfig"] = {f.name: f.default for f in dataclasses.fields(GSAConfig)}["chunk_size"]
  parser = argparse.ArgumentParser()
  check.add_arguments(parser)
  defaults["python -m gsa_jax.ops.check"] = parser.parse_args([]).chunk_size
  assert defaults == dict.fromkeys(defaults, DEFAULT_CHUNK_SIZE)
