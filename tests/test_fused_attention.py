"""The fused attention implementations against the explicit-mask reference (gsa_jax.layers.fused_attention).

On CPU the Pallas GPU flash kernel and TPU splash attention run in Pallas interpret mode; cuDNN only runs on a GPU
(the test skips elsewhere).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gsa_jax.layers import CausalSelfAttention
from gsa_jax.layers.common import token_layout
from gsa_jax.layers.fused_attention import (by_row_layout, causal_attention, fused_segment_ids,
                                            resolve_attention_implementation)
from gsa_jax.models import GSAConfig, GSALM

# Two packed rows: padding inside a document (transparent), leading padding, a document id reused after another,
# trailing padding. T = 40 is not a multiple of the kernels' block (padded inside).
SEGMENTS = np.array([[1] * 10 + [0] * 3 + [1] * 5 + [2] * 12 + [0] * 10,
                     [0] * 4 + [3] * 20 + [5] * 10 + [0] * 2 + [5] * 4], np.int32)


def _qkv(b, t, hq, h, dh, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(0), 3)
  return (jax.random.normal(ks[0], (b, t, hq, dh), dtype), jax.random.normal(ks[1], (b, t, h, dh), dtype),
          jax.random.normal(ks[2], (b, t, h, dh), dtype))


def _reference_mask(layout):
  t = layout.valid.shape[1]
  same_doc = layout.doc[:, :, None] == layout.doc[:, None, :]
  return np.tril(np.ones((t, t), bool))[None] & np.asarray(same_doc & layout.valid[:, None, :])


def test_fused_segment_ids_give_the_reference_mask_on_every_real_query():
  layout = token_layout(jnp.asarray(SEGMENTS), *SEGMENTS.shape)
  ids = np.asarray(fused_segment_ids(layout))
  t = SEGMENTS.shape[1]
  fused = np.tril(np.ones((t, t), bool))[None] & (ids[:, :, None] == ids[:, None, :])
  valid = np.asarray(layout.valid)
  np.testing.assert_array_equal(fused[valid], _reference_mask(layout)[valid])
  # A padding query reads exactly itself: no fully masked row for the kernels' softmax.
  np.testing.assert_array_equal(fused[~valid].sum(-1), 1)


def _rel_err(x, ref):
  x, ref = jnp.asarray(x, jnp.float32), jnp.asarray(ref, jnp.float32)
  return float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref))


# float32 matmuls are exact enough on CPU; on a GPU both the Triton kernel and XLA's reference use TF32.
F32_TOL = 1e-6 if jax.default_backend() == "cpu" else 5e-3


@pytest.mark.parametrize("implementation", ["pallas_gpu", "splash"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_fused_forward_and_gradients_match_the_reference(implementation, heads):
  """Interpret mode on CPU; on a GPU `pallas_gpu` runs the compiled Triton kernel."""
  hq, h = heads
  q, k, v = _qkv(*SEGMENTS.shape, hq, h, 16)
  layout = token_layout(jnp.asarray(SEGMENTS), *SEGMENTS.shape)
  w = jax.random.normal(jax.random.key(1), q.shape)  # a loss that weights every output differently

  def loss(impl):
    return lambda q, k, v: jnp.sum(w * causal_attention(q, k, v, layout, impl))

  (out, grads), (ref_out, ref_grads) = (
      jax.value_and_grad(loss(impl), argnums=(0, 1, 2))(q, k, v) for impl in (implementation, "xla"))
  assert abs(out - ref_out) <= F32_TOL * abs(ref_out) + 1e-4
  for name, g, r in zip("qkv", grads, ref_grads):
    assert _rel_err(g, r) < F32_TOL, f"d{name}"
  o = causal_attention(q, k, v, layout, implementation)
  assert not np.any(np.asarray(o)[~np.asarray(layout.valid)])  # padding queries read nothing


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs a GPU")
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("rows", ["plain", "one_document", "packed"])
def test_cudnn_matches_the_reference_on_a_gpu(heads, rows):
  b, t, (hq, h), dh = 2, 256, heads, 64
  q, k, v = _qkv(b, t, hq, h, dh, jnp.bfloat16)
  seg = {"plain": None, "one_document": jnp.ones((b, t), jnp.int32),
         "packed": jnp.asarray(np.repeat([[1, 2, 0, 3]], t // 4, axis=1).repeat(b, 0), jnp.int32)}[rows]
  layout = token_layout(seg, b, t)

  def loss(impl):
    return lambda q, k, v: jnp.sum(
        causal_attention(q, k, v, layout, impl, packed=seg is not None).astype(jnp.float32) ** 2)

  expected = "cudnn" if seg is None else "cudnn+pallas_gpu"
  assert resolve_attention_implementation("auto", platform="gpu", dtype=q.dtype, head_dim=dh,
                                          packed=seg is not None) == (expected, None)
  (out, grads), (ref_out, ref_grads) = (
      jax.value_and_grad(loss(impl), argnums=(0, 1, 2))(q, k, v) for impl in ("cudnn", "xla"))
  np.testing.assert_allclose(out, ref_out, rtol=2e-2)
  for name, g, r in zip("qkv", grads, ref_grads):
    assert _rel_err(g, r) < 2e-2, f"d{name}"


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the compiled Triton kernel needs a GPU")
def test_pallas_gpu_compiled_bf16_matches_the_reference_on_a_gpu():
  b, t = 2, 1024
  seg = jnp.asarray(np.repeat(np.array([[1, 2, 0, 3]]), t // 4, axis=1).repeat(b, 0), jnp.int32)
  q, k, v = _qkv(b, t, 8, 2, 128, jnp.bfloat16)
  layout = token_layout(seg, b, t)

  def loss(impl):
    return lambda q, k, v: jnp.sum(causal_attention(q, k, v, layout, impl).astype(jnp.float32) ** 2)

  (out, grads), (ref_out, ref_grads) = (
      jax.value_and_grad(loss(impl), argnums=(0, 1, 2))(q, k, v) for impl in ("pallas_gpu", "xla"))
  assert abs(out - ref_out) < 2e-2 * abs(ref_out)
  for name, g, r in zip("qkv", grads, ref_grads):
    assert _rel_err(g, r) < 2e-2, f"d{name}"


@pytest.mark.parametrize("request_, platform, dtype, head_dim, packed, expected, falls_back", [
    ("auto", "cpu", "float32", 64, True, "xla", False),
    ("auto", "gpu", "bfloat16", 128, False, "cudnn", False),
    ("auto", "gpu", "bfloat16", 128, True, "cudnn+pallas_gpu", False),  # cuDNN for one-document batches
    ("auto", "gpu", "float32", 128, True, "pallas_gpu", True),  # cuDNN flash attention is bf16/fp16 only
    ("auto", "tpu", "bfloat16", 128, True, "splash", False),
    ("cudnn", "gpu", "float32", 64, False, "xla", True),
    ("cudnn", "gpu", "bfloat16", 512, False, "xla", True),  # head width over cuDNN's limit
    ("cudnn", "gpu", "bfloat16", 96, True, "cudnn+xla", True),  # the Triton kernel needs a power of two
    ("cudnn", "cpu", "bfloat16", 64, False, "xla", True),
    ("pallas_gpu", "gpu", "bfloat16", 96, True, "xla", True),
    ("splash", "tpu", "float16", 128, True, "xla", True),
    ("xla", "gpu", "bfloat16", 128, True, "xla", False),
])
def test_resolve_picks_the_platform_kernel_and_says_why_it_falls_back(request_, platform, dtype, head_dim, packed,
                                                                       expected, falls_back):
  impl, why = resolve_attention_implementation(request_, platform=platform, dtype=dtype, head_dim=head_dim,
                                               packed=packed)
  assert (impl, why is not None) == (expected, falls_back), why


def test_by_row_layout_takes_the_one_document_kernel_only_for_one_document_batches():
  """The dispatch behind "cudnn+pallas_gpu", with a stand-in for cuDNN (which needs a GPU) that returns zeros."""
  q, k, v = _qkv(*SEGMENTS.shape, 4, 2, 16)
  zeros = lambda q, k, v, layout: jnp.zeros_like(q)
  attend = jax.jit(by_row_layout(zeros, lambda *a: causal_attention(*a, "xla")))
  b, t = SEGMENTS.shape
  for seg in (np.ones((b, t), np.int32), np.full((b, t), 7, np.int32)):  # one document a row, any id
    assert not np.any(attend(q, k, v, token_layout(jnp.asarray(seg), b, t)))
  for seg in (SEGMENTS, np.ones((b, t), np.int32).cumsum(1) // 30 + 1, np.pad(np.ones((b, t - 1), np.int32),
                                                                               ((0, 0), (0, 1)))):
    layout = token_layout(jnp.asarray(seg), b, t)  # several documents, or padding
    np.testing.assert_allclose(attend(q, k, v, layout), causal_attention(q, k, v, layout, "xla"), rtol=1e-5, atol=1e-6)


def test_unknown_implementation_is_refused():
  with pytest.raises(ValueError, match="implementation='flash'"):
    resolve_attention_implementation("flash", platform="cpu", dtype="float32", head_dim=64, packed=True)
  with pytest.raises(ValueError, match="implementation: 'flash'"):
    CausalSelfAttention(32, 2, implementation="flash", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="GSAConfig.attn_implementation"):
    GSAConfig(attn_implementation="flash")


def test_model_option_reaches_the_attention_layers_under_remat():
  """An all-attention model with attn_implementation='splash' (interpreted) and remat has the reference model's
  loss gradients."""
  cfg = GSAConfig(vocab_size=50, hidden_size=64, num_layers=2, num_heads=4, attn_layers=(0, 1), attn_num_heads=4,
                  attn_implementation="splash", remat="block")
  tokens = jax.random.randint(jax.random.key(2), SEGMENTS.shape, 0, 50)
  seg = jnp.asarray(SEGMENTS)

  def grads(cfg):
    graphdef, params = nnx.split(GSALM(cfg, rngs=nnx.Rngs(0)))
    return jax.grad(lambda p: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(tokens, seg))))(params)

  model = GSALM(cfg, rngs=nnx.Rngs(0))
  assert model.blocks[0].mixer.implementation == "splash"
  for g, r in zip(jax.tree.leaves(grads(cfg)), jax.tree.leaves(grads(cfg.replace(attn_implementation="xla")))):
    assert _rel_err(g, r) < F32_TOL


def test_prefill_with_a_fused_kernel_then_decode_equals_the_full_sequence():
  """The decode step (always XLA over the cache) continues a prompt that a fused kernel prefilled."""
  layer = CausalSelfAttention(32, 2, 1, implementation="pallas_gpu", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(3), (2, 12, 32))
  seg = jnp.asarray([[1] * 6 + [2] * 6, [1] * 12], jnp.int32)
  full = layer(x, seg)
  y, cache = layer.prefill(x[:, :9], seg[:, :9], max_len=12)
  steps = []
  for i in range(9, 12):
    out, cache = layer.step(x[:, i], cache)
    steps.append(out)
  assert _rel_err(y, full[:, :9]) < F32_TOL
  assert _rel_err(jnp.stack(steps, axis=1), full[:, 9:]) < F32_TOL


def test_by_row_layout_differentiates_through_both_kernels():
  """Gradients through the on-device choice between two custom-vjp kernels (splash and the Triton kernel
  interpreted here, cuDNN and the Triton kernel on a GPU) equal the reference's, for both kinds of batch."""
  q, k, v = _qkv(*SEGMENTS.shape, 4, 2, 16)
  b, t = SEGMENTS.shape
  attend = by_row_layout(lambda *a: causal_attention(*a, "splash"), lambda *a: causal_attention(*a, "pallas_gpu"))
  for seg in (np.ones((b, t), np.int32), SEGMENTS):
    layout = token_layout(jnp.asarray(seg), b, t)
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v, layout))), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.grad(lambda q, k, v: jnp.sum(jnp.sin(causal_attention(q, k, v, layout, "xla"))), argnums=(0, 1, 2))(
        q, k, v)
    for name, g, r in zip("qkv", grads, ref):
      assert _rel_err(g, r) < F32_TOL, f"d{name}"
