"""GSA in your own model: a small Flax NNX language model built around `GatedSlotAttention`, trained a few steps,
decoded with the layer's cache API, checkpointed with plain orbax, and the same layer inside a Flax Linen module.

Run: python examples/gsa_in_your_own_model.py (about a minute on a CPU). It checks what it shows and exits non-zero
when a check fails; tests/test_examples.py runs it.
"""

from __future__ import annotations

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import linen as nn
from flax import nnx
from flax.core import spmd

from gsa_jax.layers import GatedSlotAttention

VOCAB, D, LAYERS = 16, 32, 2


class TinyLM(nnx.Module):
  """tokens int [b, t] -> logits [b, t, vocab]: embedding, LAYERS x (x + GSA(norm x); x + MLP(norm x)), head."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
    self.mixer_norms = nnx.List([nnx.RMSNorm(D, rngs=rngs) for _ in range(LAYERS)])
    self.mixers = nnx.List([GatedSlotAttention(D, num_heads=2, num_slots=8, use_short_conv=True, chunk_size=16,
                                               rngs=rngs) for _ in range(LAYERS)])
    self.mlp_norms = nnx.List([nnx.RMSNorm(D, rngs=rngs) for _ in range(LAYERS)])
    self.mlps = nnx.List([nnx.Linear(D, D, rngs=rngs) for _ in range(LAYERS)])
    self.head = nnx.Linear(D, VOCAB, rngs=rngs)

  def _mlp(self, i, x):
    return x + jax.nn.gelu(self.mlps[i](self.mlp_norms[i](x)))

  def __call__(self, tokens, segment_ids=None):
    x = self.embed(tokens)
    for i, mixer in enumerate(self.mixers):
      x = self._mlp(i, x + mixer(self.mixer_norms[i](x), segment_ids))
    return self.head(x)

  # Decoding: every GSA layer keeps a GSACache (state, short-convolution inputs, position), whatever the context.
  def init_cache(self, batch_size):
    return [mixer.init_cache(batch_size) for mixer in self.mixers]

  def prefill(self, tokens, caches):
    """tokens [b, t] continuing `caches` -> (logits [b, t, vocab], new caches). Any piece size."""
    x, new = self.embed(tokens), []
    for i, (mixer, cache) in enumerate(zip(self.mixers, caches)):
      y, cache = mixer.prefill(self.mixer_norms[i](x), None, cache)
      x, new = self._mlp(i, x + y), new + [cache]
    return self.head(x), new

  def step(self, token, caches):
    """token [b] -> (logits [b, vocab], new caches)."""
    x, new = self.embed(token), []
    for i, (mixer, cache) in enumerate(zip(self.mixers, caches)):
      y, cache = mixer.step(self.mixer_norms[i](x), cache)
      x, new = self._mlp(i, x + y), new + [cache]
    return self.head(x), new


def batch(key, b=16, t=32):
  """Rows that repeat a random pair (a b a b ...): the next token is the one two steps back."""
  pair = jax.random.randint(key, (b, 2), 0, VOCAB)
  return jnp.tile(pair, (1, t // 2))


@nnx.jit
def train_step(model, optimizer, tokens):
  def loss_fn(model):
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def train(model, steps=60):
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
  losses = [float(train_step(model, optimizer, batch(jax.random.key(i)))) for i in range(steps)]
  print(f"train: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
  assert losses[-1] < 0.5 * losses[0], losses
  return losses


def decode(model, prompt, new_tokens=4):
  """Greedy decoding: the prompt prefilled in two pieces, then one token at a time from the caches; checked
  against the full forward of the whole sequence."""
  caches = model.init_cache(prompt.shape[0])
  _, caches = model.prefill(prompt[:, :5], caches)
  logits, caches = model.prefill(prompt[:, 5:], caches)
  tokens, logits = [prompt], logits[:, -1]
  for _ in range(new_tokens):
    token = jnp.argmax(logits, axis=-1)
    tokens.append(token[:, None])
    logits, caches = model.step(token, caches)
  sequence = jnp.concatenate(tokens, axis=1)
  full = model(sequence)
  np.testing.assert_allclose(logits, full[:, -1], rtol=1e-4, atol=1e-4)
  print("decode:", np.asarray(sequence[0]))
  return sequence


def checkpoint_roundtrip(model):
  """Plain orbax: save the model's nnx.State, restore it into the state of an abstract model."""
  with tempfile.TemporaryDirectory() as workdir:
    path = os.path.join(workdir, "step_60")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, nnx.state(model))
    checkpointer.wait_until_finished()
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: TinyLM(rngs=nnx.Rngs(0))))
    restored = nnx.merge(graphdef, checkpointer.restore(path, abstract_state))
  tokens = batch(jax.random.key(99), b=2)
  np.testing.assert_array_equal(restored(tokens), model(tokens))
  print("orbax: restored model gives the same logits")


class LinenBlock(nn.Module):
  """The NNX layer inside a Linen module (nnx.bridge.to_linen); nnx_method= reaches its other methods."""

  @nn.compact
  def __call__(self, x):
    gsa = nnx.bridge.to_linen(GatedSlotAttention, D, num_heads=2, num_slots=8, name="gsa")
    y = gsa(x)
    y_prefill, cache = gsa(x, nnx_method="prefill")
    return x + y, x + y_prefill, cache


def linen_example():
  x = jax.random.normal(jax.random.key(0), (2, 8, D))
  block = LinenBlock()
  variables = block.init(jax.random.key(1), x)
  y, y_prefill, cache = block.apply(variables, x)
  np.testing.assert_allclose(y, y_prefill, rtol=1e-6)
  print("linen: output", y.shape, "cache state", cache.state.hk.shape)


def sharding_names(model):
  """The layer's parameters name their axes ("embed", "heads"); map them to your mesh's axis names."""
  with spmd.logical_axis_rules((("heads", "model"), ("embed", None))):
    specs = nnx.get_partition_spec(nnx.state(model.mixers[0], nnx.Param))
  print("sharding: q_proj", specs["q_proj"]["kernel"].get_value(), "o_proj",
        specs["o_proj"]["kernel"].get_value())


def main():
  model = TinyLM(rngs=nnx.Rngs(0))
  train(model)
  decode(model, batch(jax.random.key(7), b=2, t=12))
  checkpoint_roundtrip(model)
  linen_example()
  sharding_names(model)
  print("all checks passed")


if __name__ == "__main__":
  main()
