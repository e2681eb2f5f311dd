"""ABC (slot_control="abc"): GSA's op with ABC's gates (`gsa_jax.ops.abc`) against ABC computed step by step in
float64 from its definition (running sums of exp(e)-weighted writes divided by the running sum of exp(e)), forward
and backward, for every backend (the Pallas kernels interpreted), packed rows, odd lengths, a continued past; the
layer against a hand-written float64 layer; packed rows, padding, pieced prefill, decode and the model's decode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gsa_jax.convert.fla import ConversionError, config_to_fla
from gsa_jax.generate import decode_step, prefill
from gsa_jax.layers import GatedSlotAttention
from gsa_jax.models import GSALM, GSAConfig
from gsa_jax.ops import GSAState, gated_slot_attention
from gsa_jax.ops.abc import NO_PAST, abc_gates
from gsa_jax.ops.common import segment_masks
from tests.gsa_testing import SEGMENTS, rel_err
from tests.test_layer_cache import assert_same, prefill_in_pieces

D = 32


# -- the reference --------------------------------------------------------------------------------------------------


def reference_abc(q, k, v, e, *, scale, segment_ids=None, state=None, log_z=None):
  """ABC by its definition, one token at a time in float64 (differentiable): per document and slot m,
  A_k[:, m] = sum_j exp(e_j[m]) k_j, A_v[m] = sum_j exp(e_j[m]) v_j, Z[m] = sum_j exp(e_j[m]); the token reads
  p = softmax(scale * q @ (A_k / Z)) and o = p @ (A_v / Z). A new document starts from zero sums; padding (id 0)
  changes nothing and reads 0.

  q [b, t, hq, dk]; k [b, t, h, dk]; v [b, t, h, dv]; e [b, t, h, m]; state (hk [b, h, dk, m], hv [b, h, m, dv]):
  the normalized memories before the row, with log_z [b, h, m] their log Z. Returns o [b, t, hq, dv], the final
  normalized memories and log Z.
  """
  b, t, hq, dk = q.shape
  h, dv, m = k.shape[2], v.shape[3], e.shape[3]
  if state is None:
    a_k, a_v, z = jnp.zeros((b, h, dk, m)), jnp.zeros((b, h, m, dv)), jnp.zeros((b, h, m))
  else:
    z = jnp.exp(log_z)
    a_k, a_v = state[0] * z[:, :, None, :], state[1] * z[..., None]
  if segment_ids is None:
    reset, valid = jnp.zeros((b, t), bool), jnp.ones((b, t), bool)
  else:
    reset, valid = segment_masks(jnp.asarray(segment_ids))
  safe = lambda z: jnp.where(z > 0, z, 1.0)

  def step(carry, xs):
    a_k, a_v, z = carry
    q_t, k_t, v_t, e_t, reset_t, valid_t = xs
    keep, add = (~reset_t)[:, None, None], valid_t[:, None, None]
    w = jnp.where(add, jnp.exp(e_t), 0.0)
    a_k = a_k * keep[..., None] + k_t[..., :, None] * w[:, :, None, :]
    a_v = a_v * keep[..., None] + w[..., None] * v_t[:, :, None, :]
    z = z * keep + w
    hk, hv = a_k / safe(z)[:, :, None, :], a_v / safe(z)[..., None]
    qg = q_t.reshape(b, h, hq // h, dk)
    p = jax.nn.softmax(scale * jnp.einsum("bhgk,bhkm->bhgm", qg, hk), axis=-1)
    o = jnp.einsum("bhgm,bhmv->bhgv", p, hv).reshape(b, hq, dv)
    return (a_k, a_v, z), o * valid_t[:, None, None]

  tm = lambda x: jnp.moveaxis(x, 1, 0)
  (a_k, a_v, z), o = jax.lax.scan(step, (a_k, a_v, z), tuple(map(tm, (q, k, v, e, reset, valid))))
  return jnp.moveaxis(o, 0, 1), (a_k / safe(z)[:, :, None, :], a_v / safe(z)[..., None]), jnp.log(z)


def abc_op(q, k, v, e, *, scale, segment_ids=None, state=None, log_z=None, backend="chunked", chunk_size=16):
  """ABC through GSA's op: the layer's composition, abc_gates then gated_slot_attention."""
  s, g, z = abc_gates(e, segment_ids, log_z)
  o, final = gated_slot_attention(q, k, v, s.astype(q.dtype), g, scale=scale, initial_state=state,
                                  output_final_state=True, segment_ids=segment_ids, chunk_size=chunk_size,
                                  backend=backend)
  return o, tuple(final), z


def random_inputs(seed, b, t, hq=4, h=2, dk=8, dv=8, m=6, past=False):
  """q, k, v, e float64 (e spread enough that some writes dominate) and, with `past`, a continued past."""
  rng = np.random.default_rng(seed)
  x = dict(q=rng.standard_normal((b, t, hq, dk)), k=rng.standard_normal((b, t, h, dk)),
           v=rng.standard_normal((b, t, h, dv)), e=2.0 * rng.standard_normal((b, t, h, m)))
  if past:
    x["state"] = (rng.standard_normal((b, h, dk, m)), rng.standard_normal((b, h, m, dv)))
    x["log_z"] = 3.0 + rng.standard_normal((b, h, m))
  return x


def outputs_and_grads(fn, x, dtype, **kw):
  """fn's (o, final memories, log Z) and the gradients of a fixed random projection of them with respect to every
  input, inputs cast to `dtype` (states and log Z float32 for float32 inputs)."""
  names = list(x)
  args = [jax.tree.map(lambda a: jnp.asarray(a, dtype), x[n]) for n in names]
  call = lambda *a: fn(**dict(zip(names, a)), **kw)
  cts = jax.tree.map(lambda a: jnp.asarray(np.random.default_rng(7).standard_normal(a.shape), a.dtype),
                     jax.eval_shape(call, *args))
  outs, vjp = jax.vjp(call, *args)
  return jax.tree.leaves((outs, vjp(cts)))


CASES = {
    # Packed rows: documents of one token, padding inside a document and at the end, documents across chunks.
    "packed": dict(b=2, t=SEGMENTS.shape[1], segment_ids=SEGMENTS),
    "odd_length": dict(b=2, t=37),
    "continued_past": dict(b=2, t=21, past=True),
    "continued_past_packed": dict(b=2, t=SEGMENTS.shape[1], segment_ids=SEGMENTS, past=True),
}


def _case(name, seed=0):
  c = dict(CASES[name])
  segment_ids = c.pop("segment_ids", None)
  x = random_inputs(seed, **c)
  return x, (None if segment_ids is None else jnp.asarray(segment_ids))


# The recurrent backend reads ABC's gates exactly as chunked does (and test_ops ties the two backends together), so
# its slower cases run with the slow set; so do "packed" and "continued_past", which "continued_past_packed" joins.
@pytest.mark.parametrize("backend", [pytest.param("recurrent", marks=pytest.mark.slow), "chunked"])
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in ("packed", "continued_past") else c
                                  for c in CASES])
def test_abc_through_the_gsa_op_equals_abc_step_by_step(case, backend):
  x, seg = _case(case)
  with jax.enable_x64(True):
    want = outputs_and_grads(reference_abc, x, jnp.float64, scale=0.5, segment_ids=seg)
    got64 = outputs_and_grads(abc_op, x, jnp.float64, scale=0.5, segment_ids=seg, backend=backend)
  got32 = outputs_and_grads(abc_op, x, jnp.float32, scale=0.5, segment_ids=seg, backend=backend)
  # Outputs, final memories, log Z, then dq, dk, dv, de (and the past's gradients).
  for i, (a64, a32, w) in enumerate(zip(got64, got32, want)):
    assert rel_err(a64, w) < 1e-10, (i, rel_err(a64, w))
    assert rel_err(a32, w) < 1e-5, (i, rel_err(a32, w))
  if case != "continued_past_packed":  # the case with everything: packed rows, padding and a continued past
    return
  # bfloat16 inputs, against the float64 reference on the same rounded inputs: outputs and gradients come back
  # rounded to 8 bits (2^-9 relative) and the gates' normalizer is computed from rounded logits, so 5e-3.
  rounded = jax.tree.map(lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64), x)
  with jax.enable_x64(True):
    want16 = outputs_and_grads(reference_abc, rounded, jnp.float64, scale=0.5, segment_ids=seg)
  got16 = outputs_and_grads(abc_op, rounded, jnp.bfloat16, scale=0.5, segment_ids=seg, backend=backend)
  errors = [rel_err(a, w) for a, w in zip(got16, want16)]
  assert all(np.isfinite(np.asarray(a, np.float32)).all() for a in got16)
  assert max(errors) < 5e-3, errors


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
def test_abc_through_the_kernels_equals_abc_step_by_step(backend):
  """The interpreted kernels on CPU (compiled on a GPU for pallas_gpu): 10-60 s a case."""
  x, seg = _case("continued_past_packed")
  with jax.enable_x64(True):
    want = outputs_and_grads(reference_abc, x, jnp.float64, scale=0.5, segment_ids=seg)
  got = outputs_and_grads(abc_op, x, jnp.float32, scale=0.5, segment_ids=seg, backend=backend)
  for i, (a, w) in enumerate(zip(got, want)):
    assert rel_err(a, w) < 1e-4, (i, rel_err(a, w))


def test_gates_are_exact_where_the_running_sum_is_long():
  """Deep into a long document g is about -1/t: computed from z_{t-1} - e_t, not as z_{t-1} - z_t (which cancels in
  float32), the gates keep float32's relative precision."""
  e = jax.random.normal(jax.random.key(0), (1, 4096, 1, 4))
  s, g, _ = abc_gates(e)
  with jax.enable_x64(True):
    e64 = jnp.asarray(e, jnp.float64)
    z = jax.lax.cumlogsumexp(e64, axis=1)
    g_want = jnp.concatenate([jnp.zeros_like(z[:, :1]), z[:, :-1] - z[:, 1:]], axis=1)
    s_want = jnp.exp(e64 - z)
  assert rel_err(g[:, -1024:], g_want[:, -1024:]) < 1e-6
  assert rel_err(s[:, -1024:], s_want[:, -1024:]) < 1e-6
  assert float(jnp.max(g)) <= 0.0


def test_padding_only_rows_and_empty_pasts_stay_finite():
  e = jax.random.normal(jax.random.key(1), (2, 5, 1, 3))
  seg = jnp.array([[0, 0, 0, 0, 0], [0, 0, 3, 3, 0]], jnp.int32)
  grad = jax.grad(lambda e: jnp.sum(jnp.sin(jnp.stack(abc_gates(e, seg)[:2]))))(e)
  assert bool(jnp.all(jnp.isfinite(grad)))
  s, g, z = abc_gates(e, seg)
  np.testing.assert_array_equal(z[0], np.float32(NO_PAST))  # nothing written
  np.testing.assert_array_equal(s[1, 2], 1.0)  # a document's first token writes fully, over an empty past
  np.testing.assert_array_equal(g[1, 2], 0.0)


# -- the layer ------------------------------------------------------------------------------------------------------


def layer(seed=0, **kw):
  kw = dict(num_heads=2, num_slots=8, chunk_size=8, slot_control="abc") | kw
  return GatedSlotAttention(D, **kw, rngs=nnx.Rngs(seed))


def inputs(seed, b=2, t=19):
  return jax.random.normal(jax.random.key(seed), (b, t, D))


def reference_abc_layer(m: GatedSlotAttention, x, segment_ids=None):
  """The layer written out in float64 around `reference_abc` (no short convolution, no RoPE): q = phi(x W_q),
  k = phi(x W_k), v = silu(x W_v), e = x W_f, o = ABC(q, k, v, e) with scale 1, y = RMSNorm(silu(o)) W_o."""
  with jax.enable_x64(True):
    w = lambda lin: jnp.asarray(lin.kernel[...], jnp.float64)
    x = jnp.asarray(x, jnp.float64)
    b, t, _ = x.shape
    phi = {"swish": jax.nn.silu, "relu": jax.nn.relu}[m.feature_map]
    q = phi(x @ w(m.q_proj)).reshape(b, t, m.num_heads, m.head_k_dim)
    k = phi(x @ w(m.k_proj)).reshape(b, t, m.num_kv_heads, m.head_k_dim)
    v = jax.nn.silu(x @ w(m.v_proj)).reshape(b, t, m.num_kv_heads, m.head_v_dim)
    e = (x @ w(m.f_proj)).reshape(b, t, m.num_kv_heads, m.num_slots)
    o, _, _ = reference_abc(q, k, v, e, scale=1.0, segment_ids=segment_ids)
    o = jax.nn.silu(o).reshape(b, t, -1)
    o = o / jnp.sqrt(jnp.mean(o**2, axis=-1, keepdims=True) + m.g_norm.eps)
    if m.g_norm.scale is not None:
      o = o * jnp.asarray(m.g_norm.scale[...], jnp.float64)
    return np.asarray(o @ w(m.o_proj))


@pytest.mark.parametrize("kw", [dict(), dict(num_heads=4, num_kv_heads=2, feature_map="relu", expand_v=2.0)])
def test_layer_matches_hand_written_abc(kw):
  m = layer(**kw)
  m.g_norm.scale[...] = jax.random.uniform(jax.random.key(9), m.g_norm.scale.shape, minval=0.5, maxval=1.5)
  x = inputs(1)
  seg = jnp.asarray([[1] * 5 + [2] * 9 + [0] * 2 + [2] * 3, [4] * 19], jnp.int32)
  assert rel_err(m(x), reference_abc_layer(m, x)) < 2e-5
  assert rel_err(m(x, seg), reference_abc_layer(m, x, seg)) < 2e-5


def test_abc_is_neither_gsa_nor_the_ablation():
  """Same parameters, three slot controls, three functions."""
  x = inputs(2)
  ys = [layer(slot_control=c, forget_gate=f)(x) for c, f in (("abc", True), ("gsa", True), ("gsa", False))]
  assert rel_err(ys[0], ys[1]) > 1e-2 and rel_err(ys[0], ys[2]) > 1e-2


def test_bfloat16_compute_follows_float32_and_its_gradients_are_finite():
  """The slot logits' running sums are float32 whatever the compute dtype (bf16 would round log Z)."""
  x = inputs(7)
  m32, m16 = layer(), layer(dtype=jnp.bfloat16)
  assert rel_err(m16(x.astype(jnp.bfloat16)), m32(x)) < 3e-2
  grads = nnx.grad(lambda m: jnp.sum(m(x.astype(jnp.bfloat16)).astype(jnp.float32) ** 2))(m16)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


FULL = dict(num_heads=4, num_kv_heads=2, use_short_conv=True, use_rope=True)


def test_packed_row_equals_documents_apart_and_padding_is_transparent():
  m = layer(**FULL)
  x = inputs(3, b=1, t=24)
  seg = np.array([[1] * 5 + [2] * 9 + [0] * 2 + [2] * 3 + [3] + [0] * 4], np.int32)
  y = m(x, jnp.asarray(seg))
  for doc in (1, 2, 3):
    keep = np.flatnonzero(seg[0] == doc)
    assert rel_err(y[:, keep], m(x[:, keep])) < 2e-5, doc
  np.testing.assert_array_equal(y[:, seg[0] == 0], 0)


def _assert_same_prefill(got, want):
  """test_layer_cache's comparison of (outputs, cache), plus ABC's log Z."""
  assert_same(got, want)
  np.testing.assert_allclose(got[1].log_normalizer, want[1].log_normalizer, rtol=1e-6)


# Packed right-padded rows: a document ending exactly at a piece border, padding inside and at the end, a row that
# is all padding in some pieces, a one-token document.
PIECE_SEGMENTS = np.array([
    [1] * 7 + [2] * 5 + [0] * 2 + [2] * 2 + [3] + [0] * 2,
    [4] * 3 + [0] * 16,
    [5] * 2 + [6] * 17,
], np.int32)


@pytest.mark.parametrize("sizes, packed", [((1, 18), False), ((7, 5, 7), True), ((2, 1, 1, 9, 6), True)])
def test_prefill_in_pieces_equals_at_once(sizes, packed):
  m = layer(**FULL)
  x = inputs(4, b=3)
  seg = jnp.asarray(PIECE_SEGMENTS) if packed else None
  _assert_same_prefill(prefill_in_pieces(m, x, seg, sizes), m.prefill(x, seg))


def test_decode_steps_continue_the_sequence_form():
  m = layer(**FULL)
  x = inputs(5, t=14)
  y_full = m(x)
  cache, step = m.init_cache(2), jax.jit(lambda x, c: m.step(x, c))
  for i in range(14):  # from an empty cache: every token a step, the first one over an empty past
    y, cache = step(x[:, i], cache)
    assert rel_err(y, y_full[:, i]) < 2e-5, i
  _, cache_at_once = m.prefill(x)
  np.testing.assert_allclose(cache.log_normalizer, cache_at_once.log_normalizer, rtol=1e-6)


def test_a_cache_of_another_document_is_not_continued():
  """A piece whose first document has another id than the cache's starts fresh: no state and an empty log Z."""
  m = layer()
  x = inputs(6, b=1, t=8)
  _, cache = m.prefill(x[:, :4], jnp.ones((1, 4), jnp.int32))
  seg = jnp.full((1, 4), 2, jnp.int32)
  assert rel_err(m.prefill(x[:, 4:], seg, cache)[0], m(x[:, 4:])) < 2e-5


def test_model_prefill_then_decode_equals_full_forward():
  """An ABC model with an attention layer (a hybrid): prefill then token-by-token decode equals the forward."""
  cfg = GSAConfig(vocab_size=61, hidden_size=D, num_layers=3, num_heads=2, num_slots=8, chunk_size=8,
                  intermediate_size=48, use_short_conv=True, attn_layers=(1,), slot_control="abc")
  model = GSALM(cfg, rngs=nnx.Rngs(0))
  x = jax.random.randint(jax.random.key(1), (2, 17), 1, 61, dtype=jnp.int32)
  full = model(x)
  logits, caches = prefill(model, x[:, :9], max_len=17)
  assert rel_err(logits, full[:, :9]) < 1e-5
  for i in range(9, 17):
    step_logits, caches = decode_step(model, x[:, i], caches)
    assert rel_err(step_logits, full[:, i]) < 1e-4, i
  assert cfg.num_params() == sum(a.size for a in jax.tree.leaves(nnx.state(model, nnx.Param)))


# -- errors ---------------------------------------------------------------------------------------------------------


def test_bad_slot_control_is_named():
  with pytest.raises(ValueError, match="slot_control.*'abcd' is unknown"):
    layer(slot_control="abcd")
  with pytest.raises(ValueError, match="forget_gate.*has no forget gate"):
    layer(forget_gate=False)
  with pytest.raises(ValueError, match="gates: slot_control='abc' has no per-token gates"):
    layer().gates(jnp.zeros((1, 16)))
  with pytest.raises(ValueError, match="GSAConfig.slot_control"):
    GSAConfig(slot_control="ABC")
  with pytest.raises(ValueError, match="GSAConfig.forget_gate"):
    GSAConfig(slot_control="abc", forget_gate=False)


def test_reference_export_refuses_abc():
  with pytest.raises(ConversionError, match="slot_control='abc'"):
    config_to_fla(GSAConfig(hidden_size=64, num_layers=2, output_norm_eps=1e-5, slot_control="abc"))


def test_mqar_sweep_trains_abc_by_name():
  import types  # pylint: disable=import-outside-toplevel

  from benchmarks import mqar_grid as sweep  # pylint: disable=import-outside-toplevel
  assert sweep.parse_model("abc:16") == ("abc", 16)
  args = types.SimpleNamespace(out="unused", batch_size=4, steps=10, warmup_steps=1, eval_batches=1, vocab_size=64,
                               backend="chunked", chunk_size=8, dtype="float32")
  model = sweep.run_config(sweep.Run(32, 64, 4, "abc:16", 1e-2, 0), args).model
  assert (model.slot_control, model.num_slots, model.forget_gate) == ("abc", 16, True)
  assert sorted(["abc:8", "nogate:8", "gsa:8", "attention"], key=sweep.model_order)[-1] == "abc:8"
