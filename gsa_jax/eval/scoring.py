"""Batched, jitted log-likelihood scoring of (context, continuation) token pairs with a causal LM.

Every task reduces to requests: a context of >= 1 token and a continuation of >= 1 token; the score of a request is
sum_i log p(continuation_i | context, continuation_<i) and whether greedy decoding reproduces the continuation
(every continuation token is the argmax of its predictive distribution).

Batching: requests are sorted by length (longest first, so the first batch shows the worst memory use at once),
cut into batches of `batch_size` rows, right-padded to a length bucket (a power of two, at most `max_length`) and
padded to `batch_size` rows. Padding has segment id 0, which the model treats as padding (GSA leaves its state
unchanged; attention masks it); since the model is causal, right padding cannot change the scored positions.
Fixed shapes mean one compilation per bucket.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Request:
  """context: token ids (>= 1; the first is usually BOS); continuation: the ids to score (>= 1)."""

  context: Sequence[int]
  continuation: Sequence[int]


@dataclasses.dataclass
class Scores:
  """Per request: logprob float64 [n] (sum over scored tokens), greedy bool [n], num_tokens int [n] (tokens
  scored; fewer than the continuation when it was longer than max_length), truncated bool [n] (context cut)."""

  logprob: np.ndarray
  greedy: np.ndarray
  num_tokens: np.ndarray
  truncated: np.ndarray


class Progress:
  """A progress line on stderr: rewritten in place on a terminal, every ~10% otherwise (logs stay short)."""

  def __init__(self, label: str, total: int, enabled: bool = True, stream=None):
    self.label, self.total, self.enabled = label, total, enabled
    self.stream = stream or sys.stderr
    self.tty = self.enabled and self.stream.isatty()
    self.start = time.perf_counter()
    self.done = 0
    self.next_report = 0.0

  def update(self, n: int) -> None:
    self.done += n
    if not self.enabled:
      return
    fraction = self.done / max(self.total, 1)
    if not self.tty and fraction < self.next_report and self.done < self.total:
      return
    self.next_report = fraction + 0.1
    elapsed = time.perf_counter() - self.start
    rate = self.done / elapsed if elapsed > 0 else 0.0
    eta = (self.total - self.done) / rate if rate > 0 else float("nan")
    line = (f"{self.label}: {self.done}/{self.total} sequences ({100 * fraction:.0f}%), {rate:.1f}/s, "
            f"elapsed {elapsed:.0f} s, eta {eta:.0f} s")
    self.stream.write(("\r" + line) if self.tty else (line + "\n"))
    if self.tty and self.done >= self.total:
      self.stream.write("\n")
    self.stream.flush()


def bucket_length(length: int, max_length: int, min_bucket: int = 16) -> int:
  """The padded length of a batch whose longest input has `length` tokens: a power of two >= min_bucket, capped
  at max_length (few distinct shapes, so few compilations)."""
  return min(max_length, max(min_bucket, 1 << math.ceil(math.log2(max(length, 1)))))


def _score_logits(logits, targets, mask):
  """logits [b, t, vocab], targets int [b, t], mask bool [b, t] -> (logprob sum [b], all greedy hits [b]).

  Masked positions are excluded with `where`, not a product: logits at padding are not guaranteed finite.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  hit = jnp.argmax(logits, axis=-1) == targets
  return jnp.sum(jnp.where(mask, token_logp, 0.0), axis=-1), jnp.all(hit | ~mask, axis=-1)


def make_score_fn(apply_fn: Callable) -> Callable:
  """jit of (params, tokens, segment_ids, targets, mask) [b, t] -> (logprob [b], greedy [b]) for
  apply_fn(params, tokens [b, t], segment_ids [b, t]) -> logits [b, t, vocab]."""
  return jax.jit(lambda params, tokens, segment_ids, targets, mask: _score_logits(
      apply_fn(params, tokens, segment_ids), targets, mask))


@functools.partial(jax.jit, static_argnums=0)
def _score_nnx(graphdef, state, tokens, segment_ids, targets, mask):
  # One jitted function for every NNX model: the graph definition is a static (hashable) argument, so Scorers of
  # the same architecture share compilations.
  return _score_logits(nnx.merge(graphdef, state)(tokens, segment_ids), targets, mask)


class Scorer:
  """Scores Requests with `apply_fn(params, tokens, segment_ids) -> logits` (`Scorer.for_model` for a GSALM)."""

  def __init__(self, apply_fn: Callable, params, *, batch_size: int = 8, max_length: int = 2048,
               min_bucket: int = 16, progress: bool = True):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_length < 1:
      raise ValueError(f"max_length must be >= 1, got {max_length}")
    self.params, self.batch_size, self.max_length = params, batch_size, max_length
    self.min_bucket, self.progress = min_bucket, progress
    self._score = make_score_fn(apply_fn) if apply_fn is not None else None

  @classmethod
  def for_model(cls, model: nnx.Module, **kwargs) -> "Scorer":
    """A Scorer for an NNX language model called as model(tokens, segment_ids) -> logits (e.g. GSALM)."""
    graphdef, state = nnx.split(model)
    scorer = cls(None, state, **kwargs)
    scorer._score = functools.partial(_score_nnx, graphdef)
    return scorer

  def _row(self, request: Request) -> tuple[np.ndarray, int, bool]:
    """(input+target ids [n + 1], scored count, context truncated?) with the input left-truncated to max_length."""
    context, continuation = list(request.context), list(request.continuation)
    if not context or not continuation:
      raise ValueError("a request needs >= 1 context token and >= 1 continuation token")
    ids = np.asarray(context + continuation, np.int32)
    keep = min(len(ids), self.max_length + 1)
    # The newest tokens are kept: the continuation always, as much context as fits (lm-eval-harness's rule).
    return ids[len(ids) - keep:], min(len(continuation), keep - 1), keep < len(ids)

  def score(self, requests: Sequence[Request], label: str = "scoring") -> Scores:
    n = len(requests)
    rows = [self._row(r) for r in requests]
    order = sorted(range(n), key=lambda i: -len(rows[i][0]))
    logprob, greedy = np.zeros(n, np.float64), np.zeros(n, bool)
    progress = Progress(label, n, self.progress)
    for start in range(0, n, self.batch_size):
      idx = order[start:start + self.batch_size]
      t = bucket_length(max(len(rows[i][0]) - 1 for i in idx), self.max_length, self.min_bucket)
      tokens, targets = np.zeros((self.batch_size, t), np.int32), np.zeros((self.batch_size, t), np.int32)
      segment_ids, mask = np.zeros((self.batch_size, t), np.int32), np.zeros((self.batch_size, t), bool)
      for row, i in enumerate(idx):
        ids, scored, _ = rows[i]
        length = len(ids) - 1
        tokens[row, :length], targets[row, :length] = ids[:-1], ids[1:]
        segment_ids[row, :length] = 1
        mask[row, length - scored:length] = True
      lp, hit = jax.device_get(self._score(self.params, tokens, segment_ids, targets, mask))
      logprob[idx], greedy[idx] = lp[:len(idx)], hit[:len(idx)]
      progress.update(len(idx))
    return Scores(logprob=logprob, greedy=greedy, num_tokens=np.array([r[1] for r in rows], np.int64),
                  truncated=np.array([r[2] for r in rows], bool))
