"""The chunked loss equals the one over whole logits: values, gradients, padding of T, masks; and in a train step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsa_jax.train.loss import chunked_cross_entropy_sums, cross_entropy_sums


@pytest.mark.parametrize("t,chunk", [(12, 4), (13, 4), (5, 8)])
def test_chunked_cross_entropy_equals_whole(t, chunk):
  b, d, vocab = 2, 6, 11
  rng = np.random.default_rng(t)
  hidden = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((d, vocab)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, vocab, (b, t)), jnp.int32)
  mask = jnp.asarray(rng.random((b, t)) > 0.3, jnp.float32)

  def whole(hidden, w):
    return cross_entropy_sums(hidden @ w, targets, mask)

  def chunked(hidden, w):
    return chunked_cross_entropy_sums(lambda x: x @ w, hidden, targets, mask, chunk)

  for got, want in zip(jax.jit(chunked)(hidden, w), whole(hidden, w)):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  grads = jax.grad(lambda *a: chunked(*a)[0], argnums=(0, 1))(hidden, w)
  want = jax.grad(lambda *a: whole(*a)[0], argnums=(0, 1))(hidden, w)
  for got, ref in zip(grads, want):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(grads[0][mask == 0]).max()) == 0.0  # masked positions get no gradient
