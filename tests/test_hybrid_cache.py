"""Hybrid models (softmax attention at some layers, GSA at the others) continue their caches: a prompt prefilled
in pieces equals the prompt prefilled at once (logits, every KV cache entry the next token may read, the GSA
caches), the decode steps after the pieces equal those after the prompt at once, a second `generate` turn equals
the whole conversation at once, and a KV cache without room for a piece is a ValueError."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gsa_jax.generate import generate, prefill
from gsa_jax.layers import CausalSelfAttention, KVCache
from gsa_jax.models import GSALM, GSAConfig
from gsa_jax.ops.testing import rel_err
from tests import test_layer_cache

VOCAB, D, MAX_LEN = 61, 32, 24


def make_model():
  """Attention at layers 0 and 2 (grouped kv heads), GSA with a short convolution and RoPE at layer 1."""
  cfg = GSAConfig(vocab_size=VOCAB, hidden_size=D, num_layers=3, num_heads=2, num_slots=8, chunk_size=8,
                  intermediate_size=48, gate_logit_normalizer=2.0, use_short_conv=True, use_rope=True,
                  attn_layers=(0, 2), attn_num_heads=4, attn_num_kv_heads=2, attn_implementation="xla")
  return GSALM(cfg, rngs=nnx.Rngs(0))


def tokens(seed, b, t):
  return jax.random.randint(jax.random.key(seed), (b, t), 1, VOCAB, dtype=jnp.int32)


@jax.jit
def _prefill(graphdef, state, toks, seg, caches):
  return nnx.merge(graphdef, state).prefill(toks, seg, max_len=MAX_LEN, caches=caches)


def prefill_in_pieces(model, toks, seg, sizes):
  """GSALM.prefill over consecutive pieces of `sizes`, from empty caches -> (logits [b, t, vocab], caches)."""
  graphdef, state = nnx.split(model)
  caches, logits, start = model.init_cache(toks.shape[0], MAX_LEN), [], 0
  for n in sizes:
    piece_seg = None if seg is None else seg[:, start:start + n]
    out, caches = _prefill(graphdef, state, toks[:, start:start + n], piece_seg, caches)
    logits.append(out)
    start += n
  return jnp.concatenate(logits, axis=1), caches


def assert_same_caches(caches, want):
  for c, w in zip(caches, want):
    assert type(c) is type(w)
    np.testing.assert_array_equal(c.pos, w.pos)
    np.testing.assert_array_equal(c.segment_id, w.segment_id)
    if isinstance(w, KVCache):
      np.testing.assert_array_equal(c.index, w.index)
      np.testing.assert_array_equal(c.mask, w.mask)
      readable = w.mask[:, :, None, None]  # the entries a next token reads; others are never read
      for a, b in ((c.k, w.k), (c.v, w.v)):
        assert rel_err(jnp.where(readable, a, 0), jnp.where(readable, b, 0)) < 2e-5
    else:
      for a, b in zip(jax.tree.leaves((c.state, c.conv)), jax.tree.leaves((w.state, w.conv))):
        assert rel_err(a, b) < 2e-5


def assert_steps_equal(model, caches, want, seed, n=3):
  """n decode steps of the same tokens from `caches` and from `want` give the same logits."""
  for i, tok in enumerate(tokens(seed, caches[0].pos.shape[0], n).T):
    logits, caches = model.step(tok, caches)
    logits_w, want = model.step(tok, want)
    assert rel_err(logits, logits_w) < 2e-5, f"step {i}"


# Piece sizes of a 19-token row: single tokens, pieces across the GSA op's chunks (chunk_size 8).
@pytest.mark.parametrize("sizes", (pytest.param((1, 18), marks=pytest.mark.slow), (2, 1, 1, 9, 6)))
def test_plain_rows_in_pieces_equal_at_once(sizes):
  model, toks = make_model(), tokens(0, 2, 19)
  logits, caches = prefill_in_pieces(model, toks, None, sizes)
  want_logits, want = model.prefill(toks, max_len=MAX_LEN)
  assert rel_err(logits, want_logits) < 2e-5
  assert_same_caches(caches, want)
  assert_steps_equal(model, caches, want, seed=1)


# The GSA layer tests' packed rows (tests/test_layer_cache.py): row 0's first piece ends exactly at its document
# boundary (7 | 12), so the next piece must start document 2 fresh; padding inside and at the end of a row; a row
# that is all padding in later pieces; a one-token document.
SEGMENTS = test_layer_cache.SEGMENTS


@pytest.mark.parametrize("sizes", (pytest.param((7, 5, 7), marks=pytest.mark.slow), (3, 4, 1, 11)))
def test_packed_rows_in_pieces_equal_at_once(sizes):
  model, toks, seg = make_model(), tokens(2, 3, 19), jnp.asarray(SEGMENTS)
  logits, caches = prefill_in_pieces(model, toks, seg, sizes)
  want_logits, want = model.prefill(toks, seg, max_len=MAX_LEN)
  valid = seg[:, :, None] > 0  # logits at padding are meaningless
  assert rel_err(jnp.where(valid, logits, 0), jnp.where(valid, want_logits, 0)) < 2e-5
  assert_same_caches(caches, want)
  assert_steps_equal(model, caches, want, seed=3)


def test_generate_continues_from_its_caches():
  """A second turn from the first turn's caches generates what the whole conversation does at once, also for a
  row that stopped at its eos before the others (its KV cache holds unread entries after its eos)."""
  model = make_model()
  first, second = tokens(4, 2, 6), tokens(5, 2, 4)
  free = generate(model, first, max_new_tokens=5, temperature=0)
  eos = int(free.tokens[0, 1])  # row 0 stops after 2 tokens
  out = generate(model, first, max_new_tokens=5, temperature=0, eos_id=eos, pad_id=0)
  n = np.asarray(out.num_tokens)
  assert n[0] == 2
  history = np.concatenate([np.asarray(first), np.asarray(out.tokens)], axis=1)
  lengths = first.shape[1] + n
  turn = generate(model, second, max_new_tokens=4, temperature=0, caches=out.caches)
  for row in range(2):
    whole = np.concatenate([history[row, :lengths[row]], np.asarray(second[row])])[None]
    alone = generate(model, jnp.asarray(whole), max_new_tokens=4, temperature=0)
    np.testing.assert_array_equal(turn.tokens[row], alone.tokens[0])


def test_a_kv_cache_without_room_is_a_value_error():
  layer = CausalSelfAttention(D, 2, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(6), (1, 5, D))
  _, cache = layer.prefill(x, max_len=8)
  with pytest.raises(ValueError, match=r"max_len=8 slots and holds 5 tokens; 5 more need max_len >= 10"):
    layer.prefill(x, None, cache)
  layer.prefill(x, None, cache, max_len=10)  # a larger max_len grows the cache
  model, toks = make_model(), tokens(7, 1, 5)
  _, caches = prefill(model, toks, max_len=8)
  with pytest.raises(ValueError, match=r"max_len=9: the caches hold 5 tokens and the prompts have 5; pass "
                                       r"max_len >= 10"):
    prefill(model, toks, caches=caches, max_len=9)
