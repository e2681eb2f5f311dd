"""The GSA layer against a hand-written composition of spec section 3, every option's shapes and dtypes, packed
rows (no leakage across documents, transparent padding), the step form, gradients in bf16, config errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gsa_jax.layers import CausalSelfAttention, GatedSlotAttention, ShortConvolution, token_layout
from gsa_jax.ops import recurrent_gsa
from gsa_jax.ops.testing import rel_err

D = 32


def layer(seed=0, **kw):
  kw = dict(num_heads=2, num_slots=8, chunk_size=8, gate_logit_normalizer=2.0) | kw
  return GatedSlotAttention(D, **kw, rngs=nnx.Rngs(seed))


def inputs(seed, b=2, t=19, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), (b, t, D), dtype)


def reference_rope(x, theta):
  """RoPE as in Llama (rotate-half): feature pairs (i, i + dh/2) of x [b, t, h, dh] at position p turned by the
  angle p * theta^(-2i/dh); positions 0, 1, ... along t."""
  b, t, h, dh = x.shape
  out = np.empty_like(x)
  for p in range(t):
    for i in range(dh // 2):
      angle = p * theta ** (-2.0 * i / dh)
      c, s = np.cos(angle), np.sin(angle)
      a, bb = x[:, p, :, i], x[:, p, :, i + dh // 2]
      out[:, p, :, i], out[:, p, :, i + dh // 2] = a * c - bb * s, a * s + bb * c
  return out


def reference_gsa_layer(m: GatedSlotAttention, x):
  """Spec section 3 written out from the parameters, with the reference library's grouped-head handling (k, v,
  s, g repeated to every query head) and the exact recurrence; RoPE (ours) on q and k before the feature map; no
  short conv."""
  w = lambda lin: np.asarray(lin.kernel[...], np.float64)
  x = np.asarray(x, np.float64)
  b, t, _ = x.shape
  hq, h, dk, dv, mm = m.num_heads, m.num_kv_heads, m.head_k_dim, m.head_v_dim, m.num_slots
  silu = lambda a: a / (1 + np.exp(-a))
  phi = {"swish": silu, "relu": lambda a: np.maximum(a, 0),
         "t2r": lambda a: np.maximum(a @ w(m.t2r) if m.t2r is not None else a, 0)}[m.feature_map]
  rope = (lambda a: reference_rope(a, m.rope_theta)) if m.use_rope else (lambda a: a)
  q = phi(rope((x @ w(m.q_proj)).reshape(b, t, hq, dk)))
  k = phi(rope((x @ w(m.k_proj)).reshape(b, t, h, dk)))
  v = silu((x @ w(m.v_proj)).reshape(b, t, h, dv))
  f = -np.log1p(np.exp(-(x @ w(m.f_proj)))).reshape(b, t, h, mm) / m.gate_logit_normalizer
  s = 1 - np.exp(f)
  if not m.forget_gate:  # the no-forgetting ablation: g = 0, s = sigmoid(x W_f)
    s, f = 1 / (1 + np.exp(-(x @ w(m.f_proj)))).reshape(b, t, h, mm), np.zeros_like(f)
  rep = lambda a: np.repeat(a, hq // h, axis=2)
  with jax.enable_x64(True):
    o, _ = recurrent_gsa(*(jnp.asarray(a) for a in (q, rep(k), rep(v), rep(s), rep(f))), scale=1.0)
  o = silu(np.asarray(o)).reshape(b, t, hq * dv)
  o = o / np.sqrt(np.mean(o**2, axis=-1, keepdims=True) + m.g_norm.eps)
  if m.g_norm.scale is not None:
    o = o * np.asarray(m.g_norm.scale[...])
  return o @ w(m.o_proj)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(num_heads=4, num_kv_heads=2, feature_map="relu", expand_k=0.5, elementwise_affine=False),
    dict(feature_map="t2r", expand_v=2.0, num_slots=5),
    dict(forget_gate=False),
    dict(use_rope=True, num_heads=4, num_kv_heads=2, expand_k=2.0),  # head key width 16: 8 frequencies
    dict(use_rope=True, rope_theta=100.0, feature_map="t2r"),
])
def test_layer_matches_hand_written_spec(kw):
  m = layer(**kw)
  # Make the norm scale non-trivial so that a missing scale would show.
  if m.g_norm.scale is not None:
    m.g_norm.scale[...] = jax.random.uniform(jax.random.key(9), m.g_norm.scale.shape, minval=0.5, maxval=1.5)
  x = inputs(1)
  assert rel_err(m(x), reference_gsa_layer(m, x)) < 2e-5


OPTIONS = [
    dict(),
    dict(feature_map="relu"),
    dict(feature_map="t2r"),
    dict(use_short_conv=True, conv_size=3),
    dict(num_heads=4, num_kv_heads=1),
    dict(expand_k=0.5, expand_v=2.0),
    dict(use_rope=True),
    dict(elementwise_affine=False),
    dict(backend="recurrent"),
    dict(forget_gate=False),
    dict(num_heads=4, num_kv_heads=2, use_short_conv=True, use_rope=True, feature_map="t2r", dtype=jnp.bfloat16),
]


@pytest.mark.parametrize("kw", OPTIONS)
def test_shapes_dtypes_and_step_form(kw):
  m = layer(**kw)
  dtype = kw.get("dtype", jnp.float32)
  x = inputs(2, dtype=dtype)
  y = m(x)
  assert y.shape == x.shape and y.dtype == dtype
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
  # The step form after a prefill continues the sequence form.
  y_pre, cache = m.prefill(x[:, :7])
  assert cache.state.hk.dtype == jnp.float32
  steps = [m.step(x[:, 7], cache)[0]]
  tol = 2e-2 if dtype == jnp.bfloat16 else 2e-5
  assert rel_err(y_pre, y[:, :7]) < tol
  assert rel_err(steps[0], y[:, 7]) < tol
  assert steps[0].dtype == dtype


def test_options_are_not_ignored():
  """Every option that has no parameters of its own must still change the output (same parameters)."""
  x = inputs(3)
  base = layer()(x)
  for kw in (dict(feature_map="relu"), dict(use_rope=True), dict(gate_logit_normalizer=8.0), dict(num_slots=8)):
    y = layer(**kw)(x)
    if kw == dict(num_slots=8):
      np.testing.assert_array_equal(y, base)  # same as the default: sanity check of the comparison itself
    else:
      assert rel_err(y, base) > 1e-3, kw


def test_grouped_heads_are_shared_not_separate():
  m = layer(num_heads=4, num_kv_heads=2)
  assert m.k_proj.kernel.shape == (D, 2 * 8) and m.f_proj.kernel.shape == (D, 2 * 8)
  assert m.q_proj.kernel.shape == (D, 4 * 8)


def _packed(seed, lengths, pad):
  """A row packing documents of `lengths` (+ `pad` padding), and the documents apart."""
  x = inputs(seed, b=1, t=sum(lengths) + pad)
  seg = np.zeros((1, x.shape[1]), np.int32)
  start, docs = 0, []
  for i, n in enumerate(lengths):
    seg[0, start:start + n] = i + 1
    docs.append(x[:, start:start + n])
    start += n
  return x, jnp.asarray(seg), docs


@pytest.mark.parametrize("make", [
    lambda: layer(use_short_conv=True, use_rope=True, num_heads=4, num_kv_heads=2),
    lambda: CausalSelfAttention(D, 4, 2, rngs=nnx.Rngs(0)),
])
def test_packed_row_equals_documents_apart(make):
  m = make()
  x, seg, docs = _packed(4, [5, 9, 3], pad=4)
  y = m(x, seg)
  start = 0
  for doc in docs:
    n = doc.shape[1]
    assert rel_err(y[:, start:start + n], m(doc)) < 2e-5
    start += n
  np.testing.assert_array_equal(y[:, start:], 0)


@pytest.mark.parametrize("make", [
    lambda: layer(use_short_conv=True, use_rope=True),
    lambda: CausalSelfAttention(D, 4, rngs=nnx.Rngs(0)),
])
def test_padding_is_transparent(make):
  """Padding inside and around a document changes nothing: the row equals the row with padding removed."""
  m = make()
  x = inputs(5, b=1, t=12)
  seg = jnp.array([[0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 0]], jnp.int32)
  keep = np.flatnonzero(np.asarray(seg[0]))
  y = m(x, seg)
  assert rel_err(y[:, keep], m(x[:, keep])) < 2e-5
  np.testing.assert_array_equal(y[:, np.asarray(seg[0]) == 0], 0)


def test_short_conv_reads_only_its_document():
  conv = ShortConvolution(3, 4, rngs=nnx.Rngs(0))
  x = jnp.ones((1, 8, 3))
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2]], jnp.int32)
  layout = token_layout(seg, 1, 8)
  from gsa_jax.layers.common import previous_taps
  y = conv(x, previous_taps(layout, 3))
  # Token 3 starts document 2: it reads only itself, like the first token of the row.
  np.testing.assert_allclose(y[0, 3], y[0, 0], rtol=1e-6)
  np.testing.assert_allclose(y[0, 6], conv(x)[0, 3], rtol=1e-6)


def test_token_layout():
  seg = jnp.array([[0, 3, 3, 0, 3, 5, 5, 0, 3]], jnp.int32)
  lay = token_layout(seg, 1, 9)
  np.testing.assert_array_equal(lay.valid[0], [0, 1, 1, 0, 1, 1, 1, 0, 1])
  np.testing.assert_array_equal(lay.doc[0], [0, 1, 1, 1, 1, 2, 2, 2, 3])
  np.testing.assert_array_equal(lay.positions[0], [0, 0, 1, 0, 2, 0, 1, 0, 0])
  np.testing.assert_array_equal(lay.prev[0], [-1, -1, 1, 2, 2, 4, 5, 6, 6])


def test_layer_gradients_finite_in_bf16():
  m = layer(num_heads=4, num_kv_heads=2, use_short_conv=True, dtype=jnp.bfloat16)
  x = inputs(6, dtype=jnp.bfloat16)
  seg = jnp.array([[1] * 10 + [2] * 9, [1] * 15 + [0] * 4], jnp.int32)
  grads = nnx.jit(nnx.grad(lambda m: jnp.mean(jnp.square(m(x, seg).astype(jnp.float32)))))(m)
  leaves = jax.tree.leaves(grads)
  assert leaves and all(g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert all(float(jnp.abs(g).max()) > 0 for g in leaves)


@pytest.mark.parametrize("forget_gate", [True, False])
def test_op_gets_compute_dtype_inputs_and_float32_gates(monkeypatch, forget_gate):
  """A float32 input among bf16 ones would promote the whole op to float32 (25x slower kernels on GPU)."""
  import gsa_jax.layers.gsa as gsa_module  # noqa: PLC0415
  op, seen = gsa_module.gated_slot_attention, {}

  def spy(q, k, v, s, g, **kw):
    seen.update(q=q.dtype, k=k.dtype, v=v.dtype, s=s.dtype, g=g.dtype)
    return op(q, k, v, s, g, **kw)

  monkeypatch.setattr(gsa_module, "gated_slot_attention", spy)
  layer(dtype=jnp.bfloat16, forget_gate=forget_gate)(inputs(7, dtype=jnp.bfloat16))
  assert seen == dict(q=jnp.bfloat16, k=jnp.bfloat16, v=jnp.bfloat16, s=jnp.bfloat16, g=jnp.float32)


@pytest.mark.parametrize("kw,field", [
    (dict(hidden_size=30, num_heads=4), "hidden_size"),
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
    (dict(feature_map="elu"), "feature_map"),
    (dict(expand_k=0.3), "expand_k"),
    (dict(num_slots=0), "num_slots"),
    (dict(backend="cuda"), "backend"),
    (dict(chunk_size=12), "chunk_size"),
    (dict(gate_logit_normalizer=0), "gate_logit_normalizer"),
    (dict(num_slots=8.0), "num_slots: must be a positive int; got 8.0"),
    (dict(num_heads=2.0), "num_heads: must be a positive int"),
    (dict(hidden_size=32.0), "hidden_size: must be a positive int"),
    (dict(chunk_size=16.0), "chunk_size: must be a positive int"),
    (dict(use_short_conv=True, conv_size=1), "conv_size: must be at least 2 with use_short_conv"),
    (dict(norm_eps=-1.0), "norm_eps"),
    (dict(use_rope=True, rope_theta=-1.0), "rope_theta"),
    (dict(dtype=jnp.int32), "dtype: must be None or a floating-point dtype"),
])
def test_errors_name_the_field(kw, field):
  kw = dict(hidden_size=D) | kw
  with pytest.raises(ValueError, match=field):
    GatedSlotAttention(**kw, rngs=nnx.Rngs(0))


def test_attention_errors_name_the_field():
  with pytest.raises(ValueError, match="num_heads"):
    CausalSelfAttention(30, 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_kv_heads"):
    CausalSelfAttention(32, 4, 3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_heads: must be a positive int; got 4.0"):
    CausalSelfAttention(32, 4.0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="rope_theta"):
    CausalSelfAttention(32, 4, rope_theta=0.0, rngs=nnx.Rngs(0))
