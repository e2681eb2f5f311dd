"""The evaluation tasks: perplexity, multiple-choice log-likelihood scoring and LAMBADA last-word accuracy.

Each task takes a Scorer, the run's tokenizer and the parsed data, and returns a dict of metrics (plain floats and
ints, ready for JSON). Framing follows the trainer: a document starts with BOS when the run trained with
`data.add_bos` (otherwise with EOS, the token that preceded every document in packed training rows) and ends with
EOS.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from gsa_jax.eval.data import MultipleChoiceExample
from gsa_jax.eval.scoring import Request, Scorer


def prefix_id(tokenizer, add_bos: bool) -> int:
  """The token every scored sequence starts from, so that its first real token is predicted too."""
  return int(tokenizer.bos_id if add_bos else tokenizer.eos_id)


def encode_pair(tokenizer, prefix: int, context: str, continuation: str) -> Request:
  """Tokenizes context + continuation as one string (so that a tokenizer merging across the boundary sees the
  text it would see in training) and scores the tokens past the context's own encoding; whitespace at the end of
  the context moves to the continuation first (lm-eval-harness's `_encode_pair`)."""
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  whole = [int(i) for i in tokenizer.encode(context + continuation)]
  context_ids = [int(i) for i in tokenizer.encode(context)] if context else []
  continuation_ids = whole[len(context_ids):]
  if not continuation_ids:
    raise ValueError(f"the continuation {continuation!r} encodes to no tokens")
  return Request([prefix] + context_ids, continuation_ids)


def perplexity(scorer: Scorer, tokenizer, documents: Sequence[str], *, add_bos: bool = True) -> dict:
  """Token-level perplexity of the documents, each framed [prefix] + text + [EOS] and scored in non-overlapping
  windows of max_length predicted tokens (a window's first input is the previous window's last target).

  Also bits per UTF-8 byte and per-word perplexity (the same total log-likelihood over the text's bytes / words),
  which compare across tokenizers. EOS is scored, as in training.
  """
  prefix, window = prefix_id(tokenizer, add_bos), scorer.max_length
  requests = []
  for doc in documents:
    ids = [prefix] + [int(i) for i in tokenizer.encode(doc)] + [int(tokenizer.eos_id)]
    for start in range(0, len(ids) - 1, window):
      requests.append(Request(ids[start:start + 1], ids[start + 1:start + 1 + window]))
  scores = scorer.score(requests, "perplexity")
  nll, tokens = -float(np.sum(scores.logprob)), int(np.sum(scores.num_tokens))
  num_bytes = sum(len(d.encode("utf-8")) for d in documents)
  words = sum(len(d.split()) for d in documents)
  return {"loss": nll / tokens, "perplexity": math.exp(min(nll / tokens, 700.0)), "tokens": tokens,
          "documents": len(documents), "windows": len(requests), "bytes": num_bytes, "words": words,
          "bits_per_byte": nll / math.log(2) / num_bytes, "word_perplexity": math.exp(min(nll / max(words, 1), 700.0))}


def multiple_choice(scorer: Scorer, tokenizer, examples: Sequence[MultipleChoiceExample], *,
                    add_bos: bool = True) -> dict:
  """acc: argmax of the choices' summed log-likelihood; acc_norm: argmax of the log-likelihood divided by the
  choice's length in characters (lm-eval-harness's acc_norm; unbiased against long choices). Ties go to the first
  choice (numpy argmax)."""
  prefix = prefix_id(tokenizer, add_bos)
  requests = [encode_pair(tokenizer, prefix, context, continuation)
              for ex in examples for context, continuation in zip(ex.contexts, ex.continuations)]
  scores = scorer.score(requests, "multiple_choice")
  correct, correct_norm, start = 0, 0, 0
  for ex in examples:
    ll = scores.logprob[start:start + len(ex.contexts)]
    start += len(ex.contexts)
    correct += int(np.argmax(ll) == ex.label)
    correct_norm += int(np.argmax(ll / np.asarray(ex.norm_lengths, np.float64)) == ex.label)
  n = len(examples)
  return {"acc": correct / n, "acc_norm": correct_norm / n, "examples": n, "requests": len(requests),
          "acc_stderr": _stderr(correct / n, n), "acc_norm_stderr": _stderr(correct_norm / n, n),
          "truncated": int(np.sum(scores.truncated))}


def lambada(scorer: Scorer, tokenizer, pairs: Sequence[tuple[str, str]], *, add_bos: bool = True) -> dict:
  """acc: the share of texts whose last word is reproduced by greedy decoding (every one of its tokens is the
  argmax); perplexity: exp of minus the mean log-likelihood of the last word (lm-eval-harness's definitions)."""
  prefix = prefix_id(tokenizer, add_bos)
  requests = [encode_pair(tokenizer, prefix, context, word) for context, word in pairs]
  scores = scorer.score(requests, "lambada")
  n = len(pairs)
  acc = float(np.mean(scores.greedy))
  return {"acc": acc, "acc_stderr": _stderr(acc, n), "perplexity": math.exp(min(-float(np.mean(scores.logprob)),
                                                                               700.0)),
          "examples": n, "truncated": int(np.sum(scores.truncated))}


def _stderr(p: float, n: int) -> float | None:
  """Standard error of an accuracy over n examples (sample variance, as lm-eval-harness); None for one example."""
  return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None
