"""GSAConfig validation and presets (parameter counts without memory), GSALM forward, hybrids, packed rows,
remat policies, bf16 gradients and nnx.split/merge round trips."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gsa_jax.layers import CausalSelfAttention, GatedSlotAttention
from gsa_jax.models import GSALM, PRESETS, GSAConfig, count_params, gsa_1p3b, gsa_2p7b, gsa_340m
from gsa_jax.ops.testing import rel_err

TINY = dict(vocab_size=50, hidden_size=32, num_layers=3, num_heads=2, num_slots=8, chunk_size=8,
            intermediate_size=48)


def tiny(**kw):
  return GSAConfig(**(TINY | kw))


def tokens(seed, b, t, vocab=50):
  return jax.random.randint(jax.random.key(seed), (b, t), 1, vocab, dtype=jnp.int32)


# -- config ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,field", [
    (dict(hidden_size=30, num_heads=4), "hidden_size"),
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
    (dict(feature_map="cosine"), "feature_map"),
    (dict(expand_k=0.3), "expand_k"),
    (dict(expand_v=0.3), "expand_v"),
    (dict(attn_layers=(3,)), "attn_layers"),
    (dict(attn_layers=(1, 1)), "attn_layers"),
    (dict(attn_layers=(0,), attn_num_heads=5), "attn_num_heads"),
    (dict(attn_num_heads=4, attn_num_kv_heads=3), "attn_num_kv_heads"),
    (dict(remat="everything"), "remat"),
    (dict(dtype="float8"), "dtype"),
    (dict(param_dtype="int32"), "param_dtype"),
    (dict(backend="triton"), "backend"),
    (dict(chunk_size=48), "chunk_size"),
    (dict(num_layers=0), "num_layers"),
    (dict(gate_logit_normalizer=-1.0), "gate_logit_normalizer"),
    (dict(num_kv_heads=1.0), "num_kv_heads"),
    (dict(intermediate_size=64.5), "intermediate_size"),
    (dict(attn_num_heads=2.0), "attn_num_heads"),
    (dict(use_short_conv=True, conv_size=1), "conv_size"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(embed_init_std=-1.0), "embed_init_std"),
])
def test_config_errors_name_the_field(kw, field):
  with pytest.raises(ValueError, match=rf"GSAConfig\.{field}"):
    tiny(**kw)


def test_config_is_frozen_and_hashable():
  c = tiny(attn_layers=[1])
  assert c.attn_layers == (1,)
  assert hash(c) == hash(tiny(attn_layers=(1,)))
  with pytest.raises(Exception):
    c.hidden_size = 64  # type: ignore[misc]
  assert c.replace(hidden_size=64).hidden_size == 64


def _abstract_params(config):
  return count_params(nnx.eval_shape(lambda: GSALM(config, rngs=nnx.Rngs(0))))


def test_preset_1p3b_matches_the_paper():
  c = gsa_1p3b()
  assert (c.hidden_size, c.num_layers, c.num_heads, c.num_slots, c.resolved_intermediate_size, c.vocab_size) == (
      2048, 24, 4, 64, 5632, 32000)
  n = _abstract_params(c)  # shapes only: no parameter memory is allocated
  assert n == c.num_params()
  assert abs(n - 1.38e9) / 1.38e9 < 0.01, n


@pytest.mark.parametrize("preset,target,tol", [(gsa_340m, 340e6, 0.03), (gsa_2p7b, 2.7e9, 0.02)])
def test_other_presets(preset, target, tol):
  c = preset()
  n = _abstract_params(c)
  assert n == c.num_params()
  assert abs(n - target) / target < tol, n


def test_presets_accept_overrides():
  assert set(PRESETS) == {"gsa_340m", "gsa_1p3b", "gsa_2p7b"}
  c = gsa_340m(attn_layers=(5, 11), dtype="bfloat16")
  assert c.attn_layers == (5, 11) and c.hidden_size == 1024


@pytest.mark.parametrize("kw", [dict(), dict(attn_layers=(0, 2), use_short_conv=True, num_kv_heads=1),
                                dict(feature_map="t2r", elementwise_affine=False, tie_embeddings=True,
                                     use_rope=True, expand_k=0.5)])
def test_num_params_matches_the_model(kw):
  c = tiny(**kw)
  assert count_params(GSALM(c, rngs=nnx.Rngs(0))) == c.num_params()


# -- model -------------------------------------------------------------------------------------------------------


def test_forward_shapes_dtypes_and_mixers():
  c = tiny(attn_layers=(1,), dtype="bfloat16", param_dtype="float32")
  m = GSALM(c, rngs=nnx.Rngs(0))
  assert [type(b.mixer) for b in m.blocks] == [GatedSlotAttention, CausalSelfAttention, GatedSlotAttention]
  logits = m(tokens(0, 2, 13))
  assert logits.shape == (2, 13, 50) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  assert {p.dtype for p in jax.tree.leaves(nnx.state(m, nnx.Param))} == {jnp.dtype(jnp.float32)}
  m16 = GSALM(c.replace(param_dtype="bfloat16"), rngs=nnx.Rngs(0))
  assert {p.dtype for p in jax.tree.leaves(nnx.state(m16, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}


def test_tied_embeddings_use_the_embedding_matrix():
  c = tiny(tie_embeddings=True)
  m = GSALM(c, rngs=nnx.Rngs(0))
  assert m.lm_head is None
  assert count_params(GSALM(tiny(), rngs=nnx.Rngs(0))) - count_params(m) == 50 * 32
  x = tokens(1, 1, 6)
  before = m(x)
  m.embed.embedding[...] = m.embed.embedding[...].at[7].multiply(3.0)
  after = m(x)
  # Token 7's logit changes (head) even where token 7 is not an input.
  assert not np.allclose(before[..., 7], after[..., 7])


@pytest.mark.parametrize("kw", [pytest.param(dict(use_short_conv=True), marks=pytest.mark.slow),
                                dict(attn_layers=(1,), use_short_conv=True, use_rope=True)])
def test_packed_rows_do_not_leak(kw):
  m = GSALM(tiny(**kw), rngs=nnx.Rngs(0))
  a, b = tokens(2, 1, 7), tokens(3, 1, 10)
  row = jnp.concatenate([a, b, jnp.zeros((1, 3), jnp.int32)], axis=1)
  seg = jnp.asarray([[1] * 7 + [2] * 10 + [0] * 3], jnp.int32)
  logits = m(row, seg)
  assert rel_err(logits[:, :7], m(a)) < 1e-5
  assert rel_err(logits[:, 7:17], m(b)) < 1e-5


def _loss(m, x):
  logits = m(x)
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), x[:, 1:, None], axis=-1))


def _saved_residuals(config, x, capsys):
  """(shape, source) of every residual the model's loss keeps for its backward, as `print_saved_residuals` reports
  them (traced only: nothing runs)."""
  m = GSALM(config, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(m)
  capsys.readouterr()
  jax.ad_checkpoint.print_saved_residuals(lambda s: _loss(nnx.merge(graphdef, s), x), state)
  return [tuple(line.split(" ", 1)) for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_remat_policies_save_what_they_name(capsys):
  """What each policy keeps per layer (2 GSA layers, the Pallas GPU backend traced on CPU): "none" keeps even
  elementwise outputs; "block" no projection output, no op output and no kernel residual; "matmuls" the projection
  outputs only; "matmuls_gsa" also the op's output and the kernels' slot logits and final states (3 arrays);
  "_keys" also the key chunk states [.., dk, m], "_states" also the value chunk states [.., m, dv]."""
  x = tokens(4, 2, 12)
  num_layers, dk, m = 2, 16, 32  # hidden 32 over 2 heads; dk != m tells key chunk states from value chunk states
  saved = {policy: _saved_residuals(tiny(num_layers=num_layers, num_slots=m, backend="pallas_gpu", remat=policy), x,
                                    capsys)
           for policy in ("none", "block", "matmuls", "matmuls_gsa", "matmuls_gsa_keys", "matmuls_gsa_states")}

  def count(policy, source, chunk_state_end=None):
    """Residuals from `source`; with chunk_state_end, only rank-5 ones (chunk states [b, h, n, .., ..]) so shaped."""
    return sum(source in src and (chunk_state_end is None or (shape.count(",") == 4 and shape.endswith(chunk_state_end)))
               for shape, src in saved[policy])

  kernel = "jitted function '_pallas_gpu'"
  assert count("none", "jitted function 'silu'") > 0
  matmul_outputs = count("matmuls", "output of dot_general")
  assert matmul_outputs >= 4 * num_layers  # at least q, k, v and the MLP's gate per layer
  expected = {  # policy: (projection outputs, op outputs, kernel residuals, key chunk states, value chunk states)
      "block": (0, 0, 0, 0, 0),
      "matmuls": (matmul_outputs, 0, 0, 0, 0),
      "matmuls_gsa": (matmul_outputs, num_layers, 3 * num_layers, 0, 0),
      "matmuls_gsa_keys": (matmul_outputs, num_layers, 4 * num_layers, num_layers, 0),
      "matmuls_gsa_states": (matmul_outputs, num_layers, 5 * num_layers, num_layers, num_layers),
  }
  for policy, want in expected.items():
    got = (count(policy, "output of dot_general"), count(policy, "named 'gsa_output'"), count(policy, kernel),
           count(policy, kernel, f",{dk},{m}]"), count(policy, kernel, f",{m},{dk}]"))
    assert got == want, (policy, got, want)
    assert count(policy, "jitted function 'silu'") == 0, policy  # elementwise outputs are recomputed


@pytest.mark.parametrize("policy,backend", [
    pytest.param("block", "chunked", marks=pytest.mark.slow), ("matmuls", "chunked"), ("matmuls_gsa", "chunked"),
    ("matmuls_gsa_keys", "pallas_gpu"),  # the kernels' named residuals kept (interpreted on CPU)
    pytest.param("matmuls_gsa_states", "pallas_gpu", marks=pytest.mark.slow),
])
def test_remat_gives_the_same_gradients(policy, backend):
  x = tokens(4, 2, 12)
  cfg = tiny(num_layers=2, attn_layers=(1,), backend=backend)
  loss0, g0 = nnx.jit(nnx.value_and_grad(_loss))(GSALM(cfg, rngs=nnx.Rngs(0)), x)
  loss, g = nnx.jit(nnx.value_and_grad(_loss))(GSALM(cfg.replace(remat=policy), rngs=nnx.Rngs(0)), x)
  np.testing.assert_allclose(loss, loss0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_gradients_finite_in_bf16():
  # remat="block" here also runs the per-block policy through a backward pass.
  c = tiny(attn_layers=(1,), use_short_conv=True, num_kv_heads=1, dtype="bfloat16", remat="block")
  m = GSALM(c, rngs=nnx.Rngs(0))
  loss, grads = nnx.jit(nnx.value_and_grad(_loss))(m, tokens(5, 2, 16))
  assert bool(jnp.isfinite(loss))
  leaves = jax.tree.leaves(grads)
  assert all(g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert sum(float(jnp.abs(g).sum()) > 0 for g in leaves) == len(leaves)


def test_split_merge_round_trip():
  c = tiny(attn_layers=(0,), use_short_conv=True, feature_map="t2r")
  m = GSALM(c, rngs=nnx.Rngs(0))
  x = tokens(6, 2, 9)
  ref = m(x)
  graphdef, state = nnx.split(m)
  np.testing.assert_array_equal(nnx.merge(graphdef, state)(x), ref)
  # Through plain arrays (what a checkpoint stores) into a model built with another seed.
  pure = nnx.to_pure_dict(state)
  other = GSALM(c, rngs=nnx.Rngs(1))
  assert not np.allclose(other(x), ref)
  _, other_state = nnx.split(other)
  nnx.replace_by_pure_dict(other_state, jax.tree.map(np.asarray, pure))
  nnx.update(other, other_state)
  np.testing.assert_array_equal(other(x), ref)


def test_jit_forward_matches_eager():
  m = GSALM(tiny(attn_layers=(1,)), rngs=nnx.Rngs(0))
  x = tokens(7, 2, 10)
  seg = jnp.asarray([[1] * 10, [1] * 6 + [0] * 4], jnp.int32)
  np.testing.assert_allclose(nnx.jit(lambda m, x, s: m(x, s))(m, x, seg), m(x, seg), rtol=1e-5, atol=1e-6)


def test_pallas_gpu_remat_policies_keep_what_matmuls_gsa_keeps_on_other_backends(capsys):
  """"_keys" / "_states" name chunk states that only the pallas_gpu kernels make (REMAT_POLICIES says so): on the
  chunked backend they keep exactly what "matmuls_gsa" keeps."""
  x = tokens(4, 2, 12)
  saved = {policy: sorted(_saved_residuals(tiny(num_layers=1, backend="chunked", remat=policy), x, capsys))
           for policy in ("matmuls_gsa", "matmuls_gsa_keys", "matmuls_gsa_states")}
  assert saved["matmuls_gsa"] and saved["matmuls_gsa_keys"] == saved["matmuls_gsa"]
  assert saved["matmuls_gsa_states"] == saved["matmuls_gsa"]


# -- scan over layers ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(num_layers=4),
    pytest.param(dict(num_layers=4, remat="matmuls_gsa", use_short_conv=True), marks=pytest.mark.slow),
    pytest.param(dict(num_layers=6, attn_layers=(2, 5), num_kv_heads=1), marks=pytest.mark.slow),  # stretches 2,1,2,1
])
def test_scanned_layers_equal_the_loop(kw):
  x = tokens(5, 2, 13)
  seg = jnp.array([[1] * 6 + [2] * 7, [1] * 10 + [0] * 3], jnp.int32)

  def loss(m):
    logits = m(x, seg)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), x[:, 1:, None], axis=-1))

  cfg = tiny(**kw)
  loss0, g0 = nnx.jit(nnx.value_and_grad(loss))(GSALM(cfg, rngs=nnx.Rngs(0)))
  loss1, g1 = nnx.jit(nnx.value_and_grad(loss))(GSALM(cfg.replace(scan_layers=True), rngs=nnx.Rngs(0)))
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
  assert jax.tree.structure(g1) == jax.tree.structure(g0)  # one gradient per layer, as without the scan
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # XLA fuses the two differently


def test_scanned_layers_compile_one_block():
  """The point of scan_layers: the program holds one block's matmuls however deep the model is."""
  x = tokens(6, 1, 16)

  def dots(**kw):
    graphdef, state = nnx.split(GSALM(tiny(**kw), rngs=nnx.Rngs(0)))
    return jax.jit(lambda s: nnx.merge(graphdef, s)(x)).lower(state).as_text().count("dot_general")

  assert dots(num_layers=2, scan_layers=True) == dots(num_layers=5, scan_layers=True)
  assert dots(num_layers=5) > dots(num_layers=5, scan_layers=True)
