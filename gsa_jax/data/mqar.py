"""Multi-query associative recall (MQAR), following the construction of Zoology's `multiquery_ar`.

One example of length L with n key-value pairs and vocabulary V:
  tokens[0:2n]   = k_1 v_1 k_2 v_2 ... k_n v_n      keys distinct from [1, V//2), values distinct from [V//2, V)
  tokens[2n + 2g_i] = k_{pi(i)}                     n queries, every key once, at gaps g_i drawn without replacement
                                                    from {0, ..., (L-2n)//2 - 1} with p(g) ~ (g+1)^(power_a-1)
  every other position                            = uniform noise from [0, V) (Zoology's `random_non_queries`),
                                                    or 0 when `mqar_random_non_queries` is False
  targets[t] = the value paired with tokens[t] at each query position, loss_mask[t] = 1 there; elsewhere the
  target is 0 and the mask 0. An example is one document: segment_ids are all 1.

Small power_a (0.01) puts most queries close to the key-value block, like repeated bigrams in text. Example `index`
of split `split` under `seed` is generated from its own numpy Generator seeded with (seed, split id, index), so any
example can be regenerated on its own: the dataset is a random-access grain MapDataset, and eval (split id 1) draws from
a seed stream disjoint from train's (split id 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SPLIT_IDS = {"train": 0, "eval": 1}


def power_law_probs(space: int, power_a: float) -> np.ndarray:
  """p[g] for gaps g in [0, space): proportional to power_a * (g+1)^(power_a-1), as in Zoology."""
  p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
  return p / p.sum()


def sample_without_replacement(rng: np.random.Generator, probs: np.ndarray, n: int) -> np.ndarray:
  """n distinct indices drawn one after another with probabilities proportional to `probs` [space].

  Gumbel-top-k: the n largest log p + Gumbel noise, in decreasing order, have the distribution of Zoology's
  `np.random.choice(space, size=n, replace=False, p=p)`, in O(space) instead of numpy's rejection loop.
  """
  scores = np.log(probs) + rng.gumbel(size=len(probs))
  top = np.argpartition(-scores, n - 1)[:n]
  return top[np.argsort(-scores[top])]


def mqar_example(index: int, *, seed: int, split: str, seq_len: int, vocab_size: int, num_kv_pairs: int,
                 power_a: float, random_non_queries: bool = True, probs: np.ndarray | None = None) -> dict:
  """One MQAR example; every array is [seq_len]: tokens/targets/segment_ids int32, loss_mask float32."""
  rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
  n = num_kv_pairs
  context = 2 * n
  space = (seq_len - context) // 2
  if probs is None:
    probs = power_law_probs(space, power_a)
  half = vocab_size // 2
  keys = 1 + rng.choice(half - 1, size=n, replace=False)
  values = half + rng.choice(vocab_size - half, size=n, replace=False)
  gaps = sample_without_replacement(rng, probs, n)
  # Zoology puts key i's query at gap i: the query order is the (random) order of the gaps, not the pair order.
  query_pos = context + 2 * gaps

  tokens = np.zeros(seq_len, np.int32)
  tokens[0:context:2] = keys
  tokens[1:context:2] = values
  tokens[query_pos] = keys
  targets = np.zeros(seq_len, np.int32)
  targets[query_pos] = values
  loss_mask = np.zeros(seq_len, np.float32)
  loss_mask[query_pos] = 1.0
  if random_non_queries:
    filler = np.ones(seq_len, bool)
    filler[:context] = False
    filler[query_pos] = False
    tokens[filler] = rng.integers(0, vocab_size, size=int(filler.sum()), dtype=np.int32)
  return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask, "segment_ids": np.ones(seq_len, np.int32)}


class MQARExample:
  """Picklable index -> example map for grain (`MapDataset.map`), with the power-law table computed once."""

  def __init__(self, *, seed: int, split: str, seq_len: int, vocab_size: int, num_kv_pairs: int, power_a: float,
               random_non_queries: bool):
    self.kwargs = dict(seed=seed, split=split, seq_len=seq_len, vocab_size=vocab_size, num_kv_pairs=num_kv_pairs,
                       power_a=power_a, random_non_queries=random_non_queries)
    self.probs = power_law_probs((seq_len - 2 * num_kv_pairs) // 2, power_a)

  def __call__(self, index) -> dict:
    return mqar_example(int(index), probs=self.probs, **self.kwargs)


def mqar_batch(key, *, batch_size: int, seq_len: int, vocab_size: int, num_kv_pairs: int, power_a: float,
               random_non_queries: bool = True) -> dict:
  """A batch of fresh MQAR examples generated on the device (inside a jitted training loop, no host work).

  The construction of `mqar_example` (the module docstring) drawn with `jax.random` instead of numpy: the same
  distribution, not the same examples. Keys, values and gaps are Gumbel-top-k draws as in
  `sample_without_replacement`. Returns tokens, targets, segment_ids int32 and loss_mask float32, each
  [batch_size, seq_len].
  """
  n, half = num_kv_pairs, vocab_size // 2
  context = 2 * n
  space = (seq_len - context) // 2
  log_probs = jnp.log(jnp.asarray(power_law_probs(space, power_a), jnp.float32))

  def top_n(key, scores):  # the n largest of scores + Gumbel noise, in decreasing order
    return jax.lax.top_k(scores + jax.random.gumbel(key, scores.shape), n)[1].astype(jnp.int32)

  def row(key):
    k_keys, k_values, k_gaps, k_noise = jax.random.split(key, 4)
    keys = 1 + top_n(k_keys, jnp.zeros(half - 1))
    values = half + top_n(k_values, jnp.zeros(vocab_size - half))
    query_pos = context + 2 * top_n(k_gaps, log_probs)
    if random_non_queries:
      tokens = jax.random.randint(k_noise, (seq_len,), 0, vocab_size, jnp.int32)
    else:
      tokens = jnp.zeros(seq_len, jnp.int32)
    tokens = tokens.at[0:context:2].set(keys).at[1:context:2].set(values).at[query_pos].set(keys)
    targets = jnp.zeros(seq_len, jnp.int32).at[query_pos].set(values)
    loss_mask = jnp.zeros(seq_len, jnp.float32).at[query_pos].set(1.0)
    return tokens, targets, loss_mask

  tokens, targets, loss_mask = jax.vmap(row)(jax.random.split(key, batch_size))
  return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask,
          "segment_ids": jnp.ones((batch_size, seq_len), jnp.int32)}
