"""The layer's cache API: a prompt prefilled in pieces (each from the previous piece's cache) equals the prompt
prefilled at once (outputs and cache), for plain and packed rows, every cache part (state, short-convolution
tails, RoPE position, segment id); the step form continues a pieced prefill."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gsa_jax.generate import generate, prefill
from gsa_jax.layers import GatedSlotAttention
from gsa_jax.models import GSALM, GSAConfig
from gsa_jax.ops.testing import rel_err

D = 32
# Every part of the cache matters in one of these: the short convolution (conv_size 4: tails longer than some
# pieces), RoPE (positions), grouped kv heads, t2r.
OPTIONS = {
    "plain": dict(),
    "conv_rope_gqa_t2r": dict(num_heads=4, num_kv_heads=2, use_short_conv=True, use_rope=True, feature_map="t2r"),
}
# Piece sizes of a 19-token row: single tokens and pieces shorter than the convolution's tail, pieces across the
# op's chunks (chunk_size 8).
SPLITS = ((1, 18), (2, 1, 1, 9, 6))


def layer(**kw):
  kw = dict(num_heads=2, num_slots=8, chunk_size=8, gate_logit_normalizer=2.0) | kw
  return GatedSlotAttention(D, **kw, rngs=nnx.Rngs(0))


def inputs(seed, b=3, t=19):
  return jax.random.normal(jax.random.key(seed), (b, t, D))


def prefill_in_pieces(m, x, seg, sizes):
  """Prefills x [b, t, d] in consecutive pieces of `sizes` -> (y [b, t, d], the last cache)."""
  cache, ys, start = m.init_cache(x.shape[0]), [], 0
  for n in sizes:
    piece_seg = None if seg is None else seg[:, start:start + n]
    y, cache = jax.jit(lambda x, s, c: m.prefill(x, s, c))(x[:, start:start + n], piece_seg, cache)
    ys.append(y)
    start += n
  return jnp.concatenate(ys, axis=1), cache


def assert_same(got, want, tol=2e-5):
  (y, cache), (y_w, cache_w) = got, want
  assert rel_err(y, y_w) < tol
  np.testing.assert_array_equal(cache.pos, cache_w.pos)
  np.testing.assert_array_equal(cache.segment_id, cache_w.segment_id)
  for a, b in zip(jax.tree.leaves((cache.state, cache.conv)), jax.tree.leaves((cache_w.state, cache_w.conv))):
    assert rel_err(a, b) < tol


@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("sizes", SPLITS)
def test_plain_rows_in_pieces_equal_at_once(name, sizes):
  m = layer(**OPTIONS[name])
  x = inputs(1)
  assert_same(prefill_in_pieces(m, x, None, sizes), m.prefill(x))


# Packed right-padded rows: documents that end exactly at a piece border (the next piece must not continue
# them), padding inside and at the end of a row, a row that is all padding in some pieces, a one-token document.
SEGMENTS = np.array([
    [1] * 7 + [2] * 5 + [0] * 2 + [2] * 2 + [3] + [0] * 2,
    [4] * 3 + [0] * 16,
    [5] * 2 + [6] * 17,
], np.int32)


@pytest.mark.parametrize("sizes", ((7, 5, 7), (3, 4, 1, 11)))
def test_packed_rows_in_pieces_equal_at_once(sizes):
  m = layer(**OPTIONS["conv_rope_gqa_t2r"])
  x, seg = inputs(2), jnp.asarray(SEGMENTS)
  assert_same(prefill_in_pieces(m, x, seg, sizes), m.prefill(x, seg))


def test_step_continues_a_pieced_prefill():
  m = layer(**OPTIONS["conv_rope_gqa_t2r"])
  x = inputs(3, t=12)
  y_full = m(x)
  _, cache = prefill_in_pieces(m, x[:, :9], None, (2, 5, 2))
  for i in range(9, 12):
    y, cache = m.step(x[:, i], cache)
    assert rel_err(y, y_full[:, i]) < 2e-5


def test_gradients_flow_into_the_cache():
  """Truncated backpropagation through a long document: the loss of a piece has a gradient with respect to the
  cache it started from, equal to the one through the previous piece's prefill at once."""
  m = layer(**OPTIONS["conv_rope_gqa_t2r"])
  x = inputs(4, t=10)
  _, cache = m.prefill(x[:, :6])
  loss = lambda state: jnp.sum(jnp.sin(m.prefill(x[:, 6:], None, cache._replace(state=state))[0]))
  d_state = jax.jit(jax.grad(loss))(cache.state)
  assert all(float(jnp.max(jnp.abs(a))) > 0 for a in jax.tree.leaves(d_state))
  loss_through = lambda x0: jnp.sum(jnp.sin(m.prefill(x[:, 6:], None, m.prefill(x0)[1])[0]))
  loss_at_once = lambda x0: jnp.sum(jnp.sin(m(jnp.concatenate([x0, x[:, 6:]], axis=1))[:, 6:]))
  assert rel_err(jax.jit(jax.grad(loss_through))(x[:, :6]), jax.jit(jax.grad(loss_at_once))(x[:, :6])) < 2e-5


# -- the model and generate --------------------------------------------------------------------------------------

VOCAB = 61


def make_model(**kw):
  kw = dict(vocab_size=VOCAB, hidden_size=D, num_layers=2, num_heads=2, num_slots=8, chunk_size=8,
            intermediate_size=48, gate_logit_normalizer=2.0, use_short_conv=True, use_rope=True) | kw
  return GSALM(GSAConfig(**kw), rngs=nnx.Rngs(0))


def tokens(seed, b, t):
  return jax.random.randint(jax.random.key(seed), (b, t), 1, VOCAB, dtype=jnp.int32)


def test_model_prefill_in_pieces_equals_at_once():
  model, toks = make_model(), tokens(0, 2, 13)
  want_logits, want_caches = prefill(model, toks)
  logits_a, caches = prefill(model, toks[:, :5])
  logits_b, caches = prefill(model, toks[:, 5:], caches=caches)
  assert rel_err(jnp.concatenate([logits_a, logits_b], axis=1), want_logits) < 2e-5
  for a, b in zip(jax.tree.leaves(caches), jax.tree.leaves(want_caches)):
    assert rel_err(a, b) < 2e-5


@pytest.mark.slow  # the hybrid model's test (tests/test_hybrid_cache.py) runs the same with GSA layers in the default
def test_generate_continues_from_its_caches():
  """A second turn from the first turn's caches generates what the whole conversation prefilled at once does;
  a row stopped by eos keeps the cache of its tokens up to the eos (not of the padding fed after it)."""
  model = make_model()
  first, second = tokens(1, 2, 6), tokens(2, 2, 4)
  free = generate(model, first, max_new_tokens=5, temperature=0)
  eos = int(free.tokens[0, 1])  # row 0 stops after 2 tokens (row 1 perhaps earlier or not at all)
  out = generate(model, first, max_new_tokens=5, temperature=0, eos_id=eos, pad_id=0)
  n = np.asarray(out.num_tokens)
  assert n[0] == 2
  history = np.concatenate([np.asarray(first), np.asarray(out.tokens)], axis=1)
  lengths = first.shape[1] + n
  _, want = prefill(model, jnp.asarray(history), lengths=jnp.asarray(lengths))
  # (The segment ids differ: 0 = any for the prompts without lengths, 1 for the ragged history.)
  without_ids = lambda caches: [(c.state, c.conv, c.pos) for c in caches]
  for a, b in zip(jax.tree.leaves(without_ids(out.caches)), jax.tree.leaves(without_ids(want))):
    assert rel_err(a, b) < 2e-5
  # The second turn: each row's history (ragged) followed by its new prompt, at once.
  turn = generate(model, second, max_new_tokens=4, temperature=0, caches=out.caches)
  for row in range(2):
    whole = np.concatenate([history[row, :lengths[row]], np.asarray(second[row])])[None]
    alone = generate(model, jnp.asarray(whole), max_new_tokens=4, temperature=0)
    np.testing.assert_array_equal(turn.tokens[row], alone.tokens[0])



def test_step_of_one_row_equals_that_row_in_a_batch():
  """At batch 1 the step's projections run on two rows (gsa_jax.layers.common.as_matrix_rows, a GPU speed-up):
  the token's output and cache equal those of the same row stepped inside a batch, for GSA and attention."""
  model = GSALM(GSAConfig(vocab_size=50, hidden_size=D, num_layers=2, num_heads=2, num_slots=8, chunk_size=8,
                          use_short_conv=True, use_rope=True, attn_layers=(1,)), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (3, 6), 1, 50)
  _, caches = prefill(model, tokens, max_len=8)
  step = jax.jit(lambda t, c: model.step(t, c))
  logits_all, caches_all = step(tokens[:, -1], caches)
  one = jax.tree.map(lambda x: x[1:2] if x.ndim else x, caches)
  logits_one, caches_one = step(tokens[1:2, -1], one)
  assert rel_err(logits_one, logits_all[1:2]) < 1e-5
  for got, want in zip(jax.tree.leaves(caches_one), jax.tree.leaves(caches_all)):
    assert rel_err(got, want[1:2] if want.ndim else want) < 1e-5


def test_steps_from_an_empty_cache_equal_the_sequence_form_at_odd_widths():
  """Token by token from `init_cache` (no prefill), widths that are not powers of two (3 heads of key width 6 and
  value width 12, 5 slots, hidden 24), short convolution and RoPE, strong gates: every step's output equals the
  sequence form's, and the last cache its final state."""
  m = GatedSlotAttention(24, num_heads=3, num_slots=5, expand_k=0.75, expand_v=1.5, use_short_conv=True,
                         use_rope=True, gate_logit_normalizer=0.5, chunk_size=4, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(2), (2, 11, 24))
  y_full, cache_full = m.prefill(x)
  step = jax.jit(lambda x_t, c: m.step(x_t, c))
  cache, ys = m.init_cache(2), []
  for t in range(x.shape[1]):
    y_t, cache = step(x[:, t], cache)
    ys.append(y_t)
  assert rel_err(jnp.stack(ys, axis=1), y_full) < 2e-5
  for a, b in zip(jax.tree.leaves((cache.state, cache.conv)), jax.tree.leaves((cache_full.state, cache_full.conv))):
    assert rel_err(a, b) < 2e-5
  np.testing.assert_array_equal(cache.pos, cache_full.pos)
