"""Hugging Face-style attention masks ([b, t], bool or 0/1; 1 = token, 0 = padding) are accepted wherever segment
ids are: the op, the layer, the model, generate. Padding is skipped, left or right: a left-padded row gives at its
tokens what the row alone gives."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gsa_jax.generate import generate
from gsa_jax.layers import GatedSlotAttention
from gsa_jax.models import GSALM, GSAConfig
from gsa_jax.ops import gated_slot_attention
from gsa_jax.ops.testing import rel_err

PAD = 3
MASK = np.array([[False] * PAD + [True] * 6, [True] * 9])  # row 0 left-padded, as HF tokenizers pad for decoding


def test_op_takes_a_bool_mask():
  ks = jax.random.split(jax.random.key(0), 4)
  q, k = jax.random.normal(ks[0], (2, 2, 9, 2, 4))
  v = jax.random.normal(ks[1], (2, 9, 2, 4))
  g = jax.nn.log_sigmoid(jax.random.normal(ks[2], (2, 9, 2, 3)))
  args = (q, k, v, 1 - jnp.exp(g), g)
  o, state = gated_slot_attention(*args, segment_ids=jnp.asarray(MASK), output_final_state=True, backend="chunked")
  o_int, state_int = gated_slot_attention(*args, segment_ids=jnp.asarray(MASK, jnp.int32), output_final_state=True,
                                          backend="chunked")
  np.testing.assert_array_equal(o, o_int)
  alone, state_alone = gated_slot_attention(*(a[:1, PAD:] for a in args), output_final_state=True,
                                            backend="chunked")
  assert rel_err(o[:1, PAD:], alone) < 1e-5 and rel_err(state[0][:1], state_alone[0]) < 1e-5
  assert not np.any(o[0, :PAD])


def test_layer_and_model_take_a_left_padded_bool_mask():
  layer = GatedSlotAttention(16, num_heads=2, num_slots=4, chunk_size=4, use_short_conv=True, use_rope=True,
                             rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 9, 16))
  y, cache = layer.prefill(x, jnp.asarray(MASK))
  y_alone, cache_alone = layer.prefill(x[:1, PAD:])
  assert rel_err(y[:1, PAD:], y_alone) < 1e-5
  for a, b in zip(jax.tree.leaves((cache.state, cache.conv, cache.pos)),
                  jax.tree.leaves((cache_alone.state, cache_alone.conv, cache_alone.pos))):
    assert rel_err(a[:1], b) < 1e-5

  model = GSALM(GSAConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, num_slots=4, chunk_size=4,
                          intermediate_size=32, use_short_conv=True, attn_layers=(1,)), rngs=nnx.Rngs(0))
  prompts = jax.random.randint(jax.random.key(2), (2, 9), 1, 32)
  out = generate(model, prompts, segment_ids=jnp.asarray(MASK), max_new_tokens=3, temperature=0)
  alone = generate(model, prompts[:1, PAD:], max_new_tokens=3, temperature=0)
  np.testing.assert_array_equal(out.tokens[:1], alone.tokens)
