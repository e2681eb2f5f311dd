"""Decoding: prefill + token-by-token decode equals the full-sequence forward, ragged batches equal each prompt
alone, eos stopping, and the samplers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gsa_jax.generate import decode_step, generate, last_logits, lengths_to_segment_ids, prefill, sample_logits
from gsa_jax.models import GSALM, GSAConfig
from gsa_jax.ops.testing import rel_err

VOCAB = 61

# Tiny random models covering every cache kind: GSA only, hybrid, grouped kv heads, short conv on/off, RoPE in GSA,
# the t2r feature map. chunk_size 8 so that prompts span several chunks and end inside one.
CONFIGS = {
    "gsa": dict(),
    "gsa_conv": dict(use_short_conv=True),
    "hybrid_gqa_conv": dict(num_heads=4, num_kv_heads=2, attn_layers=(1,), attn_num_heads=4, attn_num_kv_heads=2,
                            use_short_conv=True),
    "hybrid_rope_t2r": dict(attn_layers=(0, 2), use_rope=True, feature_map="t2r", expand_v=2.0),
}


def make_model(name, seed=0):
  kw = dict(vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=2, num_slots=8, chunk_size=8,
            intermediate_size=48, gate_logit_normalizer=2.0)
  kw.update(CONFIGS[name])
  return GSALM(GSAConfig(**kw), rngs=nnx.Rngs(seed))


def tokens(seed, b, t):
  return jax.random.randint(jax.random.key(seed), (b, t), 1, VOCAB, dtype=jnp.int32)


@pytest.mark.parametrize("name", CONFIGS)
def test_prefill_then_decode_equals_full_forward(name):
  model = make_model(name)
  b, t, p = 2, 21, 11
  x = tokens(1, b, t)
  full = model(x)
  logits, caches = prefill(model, x[:, :p], max_len=t)
  assert rel_err(logits, full[:, :p]) < 1e-5
  for i in range(p, t):
    step_logits, caches = decode_step(model, x[:, i], caches)
    err = rel_err(step_logits, full[:, i])
    assert err < 1e-4, (i, err)


@pytest.mark.parametrize("name", [pytest.param("gsa_conv", marks=pytest.mark.slow), "hybrid_gqa_conv"])
def test_ragged_batch_equals_each_prompt_alone(name):
  model = make_model(name, seed=3)
  lengths = [9, 4, 12]
  t, new = max(lengths), 7
  prompts = np.zeros((len(lengths), t), np.int32)
  rows = [np.asarray(tokens(10 + i, 1, n))[0] for i, n in enumerate(lengths)]
  for i, row in enumerate(rows):
    prompts[i, :len(row)] = row
  out = generate(model, jnp.asarray(prompts), lengths=jnp.asarray(lengths), max_new_tokens=new, temperature=0)
  # The logits too, not only the greedy tokens: prefill + decode of the padded batch against each prompt alone.
  logits, caches = prefill(model, jnp.asarray(prompts), lengths=jnp.asarray(lengths), max_len=t + new)
  batch_steps = [last_logits(logits, lengths_to_segment_ids(jnp.asarray(lengths), t))]
  for i in range(new - 1):
    step, caches = decode_step(model, out.tokens[:, i], caches)
    batch_steps.append(step)
  for i, row in enumerate(rows):
    alone = generate(model, jnp.asarray(row)[None], max_new_tokens=new, temperature=0)
    np.testing.assert_array_equal(out.tokens[i], alone.tokens[0])
    full = model(jnp.concatenate([jnp.asarray(row), alone.tokens[0, :-1]])[None])[0, len(row) - 1:]
    for j in range(new):
      assert rel_err(batch_steps[j][i], full[j]) < 1e-4, (i, j)
  assert out.num_tokens.tolist() == [new] * len(lengths)


# Packed prompts as (segment id, length) runs; the last document is the one decoding continues. Its length: 5, and
# 1 and 2 (shorter than the short convolution's window of 4, so the window must not reach into the document
# before); in "after_padding" it starts right after padding.
PACKED_LAYOUTS = {
    "last5": [(1, 6), (2, 5), (0, 3)],
    "last1": [(1, 6), (2, 1), (0, 3)],
    "last2": [(1, 6), (2, 2), (0, 3)],
    "after_padding": [(1, 6), (0, 2), (2, 3), (0, 2)],
}


@pytest.mark.parametrize("layout", PACKED_LAYOUTS)
@pytest.mark.parametrize("name", ["gsa_conv", "hybrid_rope_t2r"])
def test_prefill_continues_the_last_document_of_a_packed_prompt(name, layout):
  model = make_model(name, seed=5)
  runs = PACKED_LAYOUTS[layout]
  docs = [tokens(20 + i, 1, n)[0] if sid else jnp.zeros(n, jnp.int32) for i, (sid, n) in enumerate(runs)]
  packed = jnp.concatenate(docs)[None]
  seg = jnp.concatenate([jnp.full(n, sid, jnp.int32) for sid, n in runs])[None]
  last = [d for d, (sid, _) in zip(docs, runs) if sid][-1]
  cont = tokens(30, 1, 4)[0]
  _, caches = prefill(model, packed, segment_ids=seg, max_len=packed.shape[1] + len(cont))
  full = model(jnp.concatenate([last, cont])[None])[0]
  for i, tok in enumerate(cont):
    step, caches = decode_step(model, tok[None], caches)
    assert rel_err(step[0], full[len(last) + i]) < 1e-4, i


def test_eos_stops_each_row():
  model = make_model("gsa")
  prompts = tokens(30, 3, 5)
  free = generate(model, prompts, max_new_tokens=8, temperature=0)
  eos = int(free.tokens[0, 2])  # row 0 emits it at step 2 (maybe earlier too: then it stops there)
  out = generate(model, prompts, max_new_tokens=8, temperature=0, eos_id=eos, pad_id=-1)
  for r in range(3):
    ref = np.asarray(free.tokens[r])
    hits = np.flatnonzero(ref == eos)
    n = hits[0] + 1 if hits.size else 8
    assert int(out.num_tokens[r]) == n
    np.testing.assert_array_equal(out.tokens[r, :n], ref[:n])
    assert (np.asarray(out.tokens[r, n:]) == -1).all()
  assert int(out.num_tokens[0]) <= 3


def test_sampling_is_deterministic_per_key_and_respects_top_k():
  model = make_model("gsa")
  prompts = tokens(40, 2, 5)
  kw = dict(max_new_tokens=6, temperature=1.5, top_k=3)
  a = generate(model, prompts, key=jax.random.key(1), **kw)
  b = generate(model, prompts, key=jax.random.key(1), **kw)
  c = generate(model, prompts, key=jax.random.key(2), **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)
  # Every sampled token is among the 3 most likely under the model at that step.
  seq = jnp.concatenate([prompts, a.tokens], axis=1)
  logits = model(seq)[:, prompts.shape[1] - 1:-1]
  top3 = jax.lax.top_k(logits, 3)[1]
  assert bool(jnp.all(jnp.any(top3 == a.tokens[..., None], axis=-1)))


def test_sample_logits_filters():
  logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
  keys = jax.random.split(jax.random.key(0), 2000)
  draw = lambda **kw: np.asarray(jax.vmap(lambda k: sample_logits(logits, k, **kw)[0])(keys))
  assert int(sample_logits(logits, None, temperature=0)[0]) == 1
  assert set(draw(top_k=1).tolist()) == {1}
  assert set(draw(top_k=2).tolist()) == {1, 3}
  # top_p = 0.7: tokens 1 (0.5) and 3 (0.3) reach it; the next one is not needed.
  assert set(draw(top_p=0.7).tolist()) == {1, 3}
  assert set(draw(top_p=0.85).tolist()) == {1, 2, 3}
  freq = np.bincount(draw(), minlength=4) / len(keys)
  np.testing.assert_allclose(freq, [0.05, 0.5, 0.15, 0.3], atol=0.04)
  # Low temperature concentrates on the argmax.
  assert (draw(temperature=0.05) == 1).mean() > 0.99
  with pytest.raises(ValueError, match="top_p"):
    sample_logits(logits, keys[0], top_p=0.0)


def test_generate_argument_errors():
  model = make_model("gsa")
  with pytest.raises(ValueError, match="PRNG key"):
    generate(model, tokens(0, 1, 3), max_new_tokens=2, temperature=1.0)
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate(model, tokens(0, 1, 3), max_new_tokens=0, temperature=0)
  with pytest.raises(ValueError, match="not both"):
    prefill(model, tokens(0, 1, 3), lengths=jnp.array([3]), segment_ids=jnp.ones((1, 3), jnp.int32))
