"""The language-modelling loss: summed cross-entropy and correct predictions over a loss mask."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax


def cross_entropy_sums(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """logits float32 [b, t, vocab], targets int [b, t], mask [b, t] -> (summed cross-entropy, correct argmax
  predictions), both over the mask."""
  mask = mask.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return jnp.sum(ce * mask), jnp.sum(correct * mask)


def chunked_cross_entropy_sums(logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array, targets: jax.Array,
                               mask: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
  """`cross_entropy_sums(logits_fn(hidden), targets, mask)`, `chunk` positions at a time.

  hidden [b, t, d]; logits_fn maps [b, c, d] to float32 [b, c, vocab] (the model's output head). The logits of one
  slice of positions live at a time and are recomputed in the backward pass (`jax.checkpoint`), so the float32
  [b, t, vocab] logits and their gradient (2 GiB each at 4 x 4096 tokens and 32K words) are never held whole, for
  one more head matmul. What that saves at the peak depends on what else is live there: 0.6-1.6 GiB for the 1.3B
  model on the H100, for 2.2-2.7% of speed (docs/benchmarks.md). Slicing the time axis keeps the batch axis (and its
  sharding) whole. T is padded to a multiple of `chunk` with masked positions.
  """
  b, t, d = hidden.shape
  chunk = min(chunk, t)
  n = -(-t // chunk)
  pad = n * chunk - t
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    mask = jnp.pad(mask, ((0, 0), (0, pad)))
  slices = lambda x: jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)  # [n, b, chunk, ...]

  @jax.checkpoint
  def one_slice(x, y, m):
    return cross_entropy_sums(logits_fn(x), y, m)

  def body(sums, xs):
    return jax.tree.map(jnp.add, sums, one_slice(*xs)), None

  zero = jnp.zeros((), jnp.float32)
  sums, _ = jax.lax.scan(body, (zero, zero), (slices(hidden), slices(targets), slices(mask)))
  return sums
