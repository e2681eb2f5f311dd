"""gsa_jax.eval: scores against an independent reference, field layouts, the greedy rule, the CLI and its errors.

The reference scores are computed here without the harness: every sequence goes through one plain forward of the
model, padded to a common length with random junk after its end (the model is causal, so junk cannot change the
scored positions; the harness pads with segment id 0 and buckets lengths instead), with the log-softmax and sums in
float64 numpy.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import lm_tiny
from gsa_jax import run_dir as run_dir_lib
from gsa_jax.data import ByteTokenizer
from gsa_jax.eval import DataError, Request, Scorer, load_examples, run_task
from gsa_jax.eval import __main__ as cli
from gsa_jax.eval.scoring import bucket_length
from gsa_jax.models import GSALM, GSAConfig

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
BOS, EOS = 1, 2
TOK = ByteTokenizer()


def model_config() -> GSAConfig:
  # A hybrid (GSA then softmax attention) so that both mixers see the padding; a large embedding init so that the
  # random model's predictions are far from uniform (no near-ties for argmax to flip on rounding).
  return GSAConfig(vocab_size=260, hidden_size=32, num_layers=2, num_heads=2, num_slots=4, intermediate_size=64,
                   use_short_conv=True, attn_layers=(1,), backend="chunked", chunk_size=8, tie_embeddings=True,
                   embed_init_std=1.0)


@pytest.fixture(scope="module")
def model():
  return GSALM(model_config(), rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def reference(model):
  """ids lists -> float64 log-probabilities [n, width, vocab] of each sequence's next tokens (junk-padded)."""
  forward = jax.jit(lambda tokens: model(tokens))

  def logprobs(seqs, rows=32, width=96):
    # One shape for every call (one compilation): rows of 32 sequences, 96 tokens.
    assert max(len(s) for s in seqs) <= width
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 259, size=(-(-len(seqs) // rows) * rows, width)).astype(np.int32)
    for i, ids in enumerate(seqs):
      tokens[i, :len(ids)] = ids
    logits = np.concatenate([np.asarray(forward(jnp.asarray(tokens[i:i + rows])), np.float64)
                             for i in range(0, len(tokens), rows)])[:len(seqs)]
    return logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
        - logits.max(-1, keepdims=True)

  return logprobs


def reference_scores(reference, pairs):
  """(sum log p(continuation | context), greedy all-match) per (context ids, continuation ids), unbatched logic."""
  seqs = [list(c) + list(x) for c, x in pairs]
  lp = reference(seqs)
  out = []
  for i, (context, continuation) in enumerate(pairs):
    positions = range(len(context) - 1, len(context) + len(continuation) - 1)
    targets = list(continuation)
    total = sum(lp[i, p, t] for p, t in zip(positions, targets))
    greedy = all(int(np.argmax(lp[i, p])) == t for p, t in zip(positions, targets))
    out.append((total, greedy))
  return out


def byte_ids(text: str) -> list[int]:
  return [b + 3 for b in text.encode("utf-8")]


# ---- the scorer -------------------------------------------------------------------------------------------------

def test_bucket_lengths():
  assert [bucket_length(n, 64) for n in (1, 16, 17, 33, 64, 65)] == [16, 16, 32, 64, 64, 64]
  assert bucket_length(5, 12) == 12


def test_scorer_matches_reference_with_batching_padding_and_truncation(model, reference):
  rng = np.random.default_rng(1)
  pairs = [([BOS] + list(rng.integers(3, 259, size=n)), list(rng.integers(3, 259, size=m)))
           for n, m in ((0, 1), (5, 3), (12, 9), (20, 1), (2, 20), (7, 7), (1, 14))]
  # Longer than max_length (24 inputs): the context is cut from the left, the continuation scored whole.
  long_ctx, long_cont = [BOS] + list(rng.integers(3, 259, size=40)), list(rng.integers(3, 259, size=4))
  pairs.append((long_ctx, long_cont))
  scorer = Scorer.for_model(model, batch_size=3, max_length=24, progress=False)
  scores = scorer.score([Request(c, x) for c, x in pairs])
  expected = reference_scores(reference, pairs[:-1] + [(long_ctx[-21:], long_cont)])
  np.testing.assert_allclose(scores.logprob, [e[0] for e in expected], rtol=2e-5, atol=2e-4)
  np.testing.assert_array_equal(scores.greedy, [e[1] for e in expected])
  np.testing.assert_array_equal(scores.num_tokens, [len(x) for _, x in pairs])
  np.testing.assert_array_equal(scores.truncated, [False] * 7 + [True])


def test_scorer_rejects_empty_requests(model):
  with pytest.raises(ValueError, match="continuation token"):
    Scorer.for_model(model, max_length=16, progress=False).score([Request([BOS], [])])


# ---- tasks against hand-written expectations ---------------------------------------------------------------------

# What each fixture line must become: (contexts, continuations, label, acc_norm lengths).
MC_GENERIC = [
    (["The capital of France is"] * 3, [" Paris", " a small fish", " blue"], 0, [5, 12, 4]),
    (["Water boils at"] * 2, [" 100 degrees Celsius.", " minus forty"], 1, [20, 11]),
    (["Which is a colour?"] * 3, [" red", " seven", " Tuesday"], 0, [3, 5, 7]),
    (["She opened the door and"] * 3, [" walked in.", " flew to the moon.", " sang."], 2, [11, 18, 6]),
]
MC_LAYOUTS = [
    (["Q: To dry wet socks,\nA:"] * 2, [" hang them on a line.", " put them in the freezer."], 0, [20, 24]),
    (["Q: What do plants need?\nA:"] * 4, [" Light", " Plastic", " Noise", " Sand"], 0, [5, 7, 5, 4]),
    (["Q: Which one melts?\nA:"] * 2, [" ice", " stone"], 1, [3, 5]),
    (["The trophy did not fit in the case because the trophy",
      "The trophy did not fit in the case because the case"], [" was too big."] * 2, 0, [13, 13]),
]


def expected_mc(reference, cases):
  """acc and acc_norm from the reference, with the lm-eval-harness pair encoding written out for bytes."""
  correct = correct_norm = 0
  for contexts, continuations, label, lengths in cases:
    pairs = [([BOS] + byte_ids(c), byte_ids(x)) for c, x in zip(contexts, continuations)]
    ll = np.array([s for s, _ in reference_scores(reference, pairs)])
    correct += int(np.argmax(ll) == label)
    correct_norm += int(np.argmax(ll / np.array(lengths)) == label)
  return correct / len(cases), correct_norm / len(cases)


@pytest.mark.parametrize("name,cases,template", [("mc_generic.jsonl", MC_GENERIC, "{context}"),
                                                 ("mc_layouts.jsonl", MC_LAYOUTS, "Q: {context}\nA:")])
def test_multiple_choice_layouts_and_scores(model, reference, name, cases, template):
  examples = load_examples("multiple_choice", os.path.join(DATA, name), context_template=template)
  assert [(list(e.contexts), list(e.continuations), e.label, list(e.norm_lengths)) for e in examples] == \
      [tuple(c) for c in cases]
  scorer = Scorer.for_model(model, batch_size=4, max_length=64, progress=False)
  metrics = run_task("multiple_choice", scorer, TOK, examples)
  acc, acc_norm = expected_mc(reference, cases)
  assert (metrics["acc"], metrics["acc_norm"]) == (acc, acc_norm)
  assert metrics["examples"] == len(cases) and metrics["requests"] == sum(len(c[0]) for c in cases)


@pytest.mark.parametrize("max_length", [64, 16])  # non-overlapping windows: 1 or 2 per document; 1 to 5
def test_perplexity(model, reference, max_length):
  path = os.path.join(DATA, "ppl_docs.txt")
  with open(path, encoding="utf-8") as f:
    docs = [line for line in f.read().splitlines() if line.strip()]
  pairs = []
  for doc in docs:
    ids = [BOS] + byte_ids(doc) + [EOS]
    pairs += [(ids[j:j + 1], ids[j + 1:j + 1 + max_length]) for j in range(0, len(ids) - 1, max_length)]
  nll = -sum(s for s, _ in reference_scores(reference, pairs))
  tokens = sum(len(byte_ids(d)) + 1 for d in docs)
  scorer = Scorer.for_model(model, batch_size=4, max_length=max_length, progress=False)
  metrics = run_task("perplexity", scorer, TOK, load_examples("perplexity", path))
  assert metrics["tokens"] == tokens and metrics["documents"] == 4
  np.testing.assert_allclose(metrics["loss"], nll / tokens, rtol=1e-5)
  np.testing.assert_allclose(metrics["perplexity"], math.exp(nll / tokens), rtol=1e-4)
  np.testing.assert_allclose(metrics["bits_per_byte"], nll / math.log(2) / sum(len(d.encode()) for d in docs),
                             rtol=1e-5)
  assert metrics["bytes"] == sum(len(d.encode("utf-8")) for d in docs) > len("".join(docs))  # non-ASCII counted


def bigram_model(text: str):
  """A fake LM whose logits at token a are log(1 + count of a -> b in `text`): greedy = the likeliest bigram."""
  ids = [BOS] + byte_ids(text)
  table = np.zeros((260, 260), np.float32)
  for a, b in zip(ids, ids[1:]):
    table[a, b] += 1
  return (lambda params, tokens, segment_ids: params[tokens]), jnp.asarray(np.log1p(table)), np.log1p(table)


def test_lambada_needs_every_token_of_the_word():
  path = os.path.join(DATA, "lambada.jsonl")
  texts = [json.loads(line)["text"] for line in open(path, encoding="utf-8") if line.strip()]
  # Greedy under this table: a -> b -> c -> " " -> a, x -> y -> z; nothing follows z (argmax: id 0).
  apply_fn, params, table = bigram_model("abc abc abc xyz")
  first_ok, all_ok, lls = [], [], []
  for text in texts:  # the expectation, walked token by token
    context, word = text.rsplit(" ", 1)
    ids = [BOS] + byte_ids(context + " " + word)
    start = 1 + len(byte_ids(context))
    logp = table - np.log(np.sum(np.exp(table), -1, keepdims=True))
    hits = [int(np.argmax(table[ids[p - 1]])) == ids[p] for p in range(start, len(ids))]
    first_ok.append(hits[0])
    all_ok.append(all(hits))
    lls.append(sum(logp[ids[p - 1], ids[p]] for p in range(start, len(ids))))
  # The fixture exercises the rule: some words fully predicted, some right only at the start.
  assert any(all_ok) and not all(all_ok) and any(f and not a for f, a in zip(first_ok, all_ok))
  scorer = Scorer(apply_fn, params, batch_size=3, max_length=64, progress=False)
  metrics = run_task("lambada", scorer, TOK, load_examples("lambada", path))
  assert metrics["acc"] == np.mean(all_ok) and metrics["examples"] == len(texts)
  np.testing.assert_allclose(metrics["perplexity"], math.exp(-np.mean(lls)), rtol=1e-5)


# ---- data errors -------------------------------------------------------------------------------------------------

def write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text, encoding="utf-8")
  return str(path)


@pytest.mark.parametrize("task,text,message", [
    ("lambada", '{"text": "a b"}\n\n{"text": "c d"\n', r"line 3: not valid JSON"),
    ("lambada", '{"text": "a b"}\n[1, 2]\n', r"line 2: expected a JSON object, got list"),
    ("lambada", '{"text": "oneword"}\n', r"line 1: the text needs at least two words"),
    ("lambada", "\n\n", r"has no records"),
    ("multiple_choice", '{"context": "x", "choices": ["a", "b"], "label": 2}\n', r"line 1: label 2 does not name"),
    ("multiple_choice", '{"context": "x", "label": 0}\n', r"line 1: no choices field"),
    ("multiple_choice", '{"choices": ["a", "b"], "label": 0}\n', r"line 1: no context field"),
    ("multiple_choice", '{"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}\n',
     r"exactly one '_'"),
    ("perplexity", '{"body": "x"}\n', r"line 1: expected a string field 'text'"),
])
def test_bad_records_name_the_line(tmp_path, task, text, message):
  with pytest.raises(DataError, match=message):
    load_examples(task, write(tmp_path, "bad.jsonl", text))


def test_missing_and_empty_files(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    load_examples("perplexity", str(tmp_path / "nope.txt"))
  with pytest.raises(DataError, match="is empty"):
    load_examples("perplexity", write(tmp_path, "empty.txt", ""))
  with pytest.raises(DataError, match="no non-empty documents"):
    load_examples("perplexity", write(tmp_path, "blank.txt", "\n  \n"))


# ---- the command line on a run directory --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, model):
  """A run directory as train.py leaves it (config.json, checkpoints/<step>/state) holding `model`'s params."""
  path = tmp_path_factory.mktemp("run")
  c = lm_tiny.get_config()
  c.workdir, c.data.path = str(path), os.path.join(DATA, "ppl_docs.txt")
  c.train.seq_len = 64
  for key, value in vars(model_config()).items():
    c.model[key] = value
  run_dir_lib.write_config(str(path), c)
  run_dir_lib.save_params(str(path), nnx.state(model, nnx.Param), step=7)
  return str(path)


def test_cli_end_to_end(run_dir, reference, tmp_path, capsys):
  output = tmp_path / "out" / "results.json"
  assert cli.main(["--checkpoint", run_dir, "--task", "multiple_choice", "--data",
                   os.path.join(DATA, "mc_generic.jsonl"), "--batch-size", "4", "--output", str(output)]) == 0
  captured = capsys.readouterr()
  printed = json.loads(captured.out)
  assert printed == json.loads(output.read_text())
  assert printed["step"] == 7 and printed["task"] == "multiple_choice" and printed["max_length"] == 64
  acc, acc_norm = expected_mc(reference, MC_GENERIC)
  assert (printed["metrics"]["acc"], printed["metrics"]["acc_norm"]) == (acc, acc_norm)
  assert "multiple_choice: 11/11 sequences" in captured.err  # the progress line


def test_cli_errors(run_dir, tmp_path, capsys):
  data = os.path.join(DATA, "lambada.jsonl")

  def fails(args, message):
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err

  fails(["--checkpoint", str(tmp_path / "nope"), "--task", "lambada", "--data", data], "does not exist")
  no_ckpt = tmp_path / "no_ckpt"
  no_ckpt.mkdir()
  (no_ckpt / "config.json").write_text(open(os.path.join(run_dir, "config.json")).read())
  fails(["--checkpoint", str(no_ckpt), "--task", "lambada", "--data", data], "has no checkpoint")
  fails(["--checkpoint", run_dir, "--task", "lambada", "--data", data, "--step", "3"], "no checkpoint of step 3")
  fails(["--checkpoint", run_dir, "--task", "lambada", "--data", write(tmp_path, "e.jsonl", "")], "is empty")
  fails(["--checkpoint", run_dir, "--task", "lambada", "--data", write(tmp_path, "b.jsonl", '{"text": "a b"}\n{x\n')],
        "line 2: not valid JSON")
  with pytest.raises(SystemExit) as e:
    cli.main(["--checkpoint", run_dir, "--task", "summarize", "--data", data])
  assert e.value.code == 2 and "invalid choice: 'summarize'" in capsys.readouterr().err
