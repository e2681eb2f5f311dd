"""Data pipeline: MQAR correctness, packing (segment ids, no cross-document targets, every token in order), the text
formats and tokenizers, determinism, exact resume (also across epochs and through JSON / grain's orbax handler),
shard and train/eval disjointness, and every validation message."""

from __future__ import annotations

import collections
import json
import os
import sys

import jax
import numpy as np
import pytest

from gsa_jax.data import (ByteTokenizer, data_config_defaults, dataset_vocab_size, make_iterator, split_documents,
                          validate_data_config)
from gsa_jax.data import sources
from gsa_jax.data import tokenizer as tokenizer_lib

KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
BYTE = ByteTokenizer()


def mqar_cfg(**kw):
  cfg = data_config_defaults()
  cfg.mqar_vocab_size = 256
  cfg.mqar_num_kv_pairs = 4
  cfg.mqar_num_train_examples = 40
  cfg.mqar_num_eval_examples = 12
  cfg.read_threads = 0
  cfg.update(kw)
  return cfg


def text_cfg(path, **kw):
  cfg = data_config_defaults()
  cfg.source = "text"
  cfg.path = str(path)
  cfg.eval_fraction = 0.25
  cfg.update(kw)
  return cfg


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert set(x) == set(y) == set(KEYS)
    for k in KEYS:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def random_docs(n, rng, lo=3, hi=40):
  """Random lowercase documents: any 8+ character piece identifies its document and offset."""
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz "))
  return ["".join(rng.choice(letters, size=int(rng.integers(lo, hi)))).strip() or "z" for _ in range(n)]


def write_txt(tmp_path, docs, name="corpus.txt"):
  path = tmp_path / name
  path.write_text("\n".join(docs) + "\n")
  return path


def framed(text):
  return [tokenizer_lib.BYTE_BOS_ID] + list(BYTE.encode(text)) + [tokenizer_lib.BYTE_EOS_ID]


def row_segments(batch):
  """(tokens, targets, positions) of each segment, row by row, checking the row layout on the way."""
  out = []
  for r in range(batch["tokens"].shape[0]):
    seg = batch["segment_ids"][r]
    n_real = int((seg > 0).sum())
    assert (seg[n_real:] == 0).all(), "padding only at the end of a row"
    ids = seg[:n_real]
    assert ids[0] == 1 and (np.diff(ids) >= 0).all() and (np.diff(ids) <= 1).all(), ids
    np.testing.assert_array_equal(batch["loss_mask"][r], (seg > 0).astype(np.float32))
    for k in ("tokens", "targets", "positions"):
      assert (batch[k][r][n_real:] == 0).all(), f"{k} is 0 on padding"
    for s in np.unique(ids):
      m = seg == s
      tok, tgt, pos = batch["tokens"][r][m], batch["targets"][r][m], batch["positions"][r][m]
      np.testing.assert_array_equal(pos, np.arange(len(pos)))
      # Within a segment the target of t is the input at t+1: no pair skips or crosses anything.
      np.testing.assert_array_equal(tgt[:-1], tok[1:])
      out.append((tok, tgt))
  return out


def stream_documents(batches):
  """Rebuilds the document stream of concat_then_split rows: a segment not ending in EOS continues in the next one."""
  docs, current = [], None
  for batch in batches:
    for tok, tgt in row_segments(batch):
      if current is None:
        assert tok[0] == tokenizer_lib.BYTE_BOS_ID, "a document starts with BOS"
        current = [int(tok[0])]
      else:
        assert current[-1] == tok[0], "a continued document resumes where it was cut"
      current += tgt.tolist()
      assert tokenizer_lib.BYTE_EOS_ID not in current[:-1], "EOS only ends a document"
      if current[-1] == tokenizer_lib.BYTE_EOS_ID:
        docs.append(BYTE.decode(current))
        current = None
  return docs


# ----------------------------------------------------------------------------------------------------------- config


def test_defaults_validate_and_are_typed():
  cfg = data_config_defaults()
  validate_data_config(cfg, seq_len=128)
  with pytest.raises(TypeError):  # ConfigDict keeps the default's type
    cfg.mqar_num_kv_pairs = "eight"
  assert dataset_vocab_size(cfg) == 8192


# ------------------------------------------------------------------------------------------------------------- MQAR


def check_mqar_row(tokens, targets, mask, segment_ids, vocab, n):
  half = vocab // 2
  keys, values = tokens[0:2 * n:2], tokens[1:2 * n:2]
  assert len(set(keys.tolist())) == n and ((1 <= keys) & (keys < half)).all()
  assert len(set(values.tolist())) == n and ((half <= values) & (values < vocab)).all()
  pair = dict(zip(keys.tolist(), values.tolist()))
  answered = np.flatnonzero(mask)
  assert len(answered) == n and (answered >= 2 * n).all()
  # Every scored target is the value paired with the queried key earlier in the sequence, every key asked once.
  assert sorted(tokens[answered].tolist()) == sorted(keys.tolist())
  for t in answered:
    assert targets[t] == pair[int(tokens[t])]
  assert (targets[mask == 0] == 0).all() and set(np.unique(mask).tolist()) == {0.0, 1.0}
  assert ((0 <= tokens) & (tokens < vocab)).all() and (segment_ids == 1).all()
  return answered


def test_mqar_batches_are_correct():
  cfg = mqar_cfg()
  it = make_iterator(cfg, split="train", batch_size=8, seq_len=32, seed=3)
  for batch in take(it, 3):
    assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
        "tokens": ((8, 32), "int32"), "targets": ((8, 32), "int32"), "loss_mask": ((8, 32), "float32"),
        "segment_ids": ((8, 32), "int32"), "positions": ((8, 32), "int32")}
    for r in range(8):
      check_mqar_row(batch["tokens"][r], batch["targets"][r], batch["loss_mask"][r], batch["segment_ids"][r], 256, 4)
      np.testing.assert_array_equal(batch["positions"][r], np.arange(32))


def test_mqar_query_gaps_follow_power_law():
  """Small power_a puts queries right after the key-value block; power_a = 1 spreads them uniformly."""

  def mean_query_pos(a):
    it = make_iterator(mqar_cfg(mqar_power_a=a, mqar_num_train_examples=64), split="train", batch_size=64,
                       seq_len=128, seed=0)
    b = next(it)
    return float(np.mean([np.flatnonzero(m).mean() for m in b["loss_mask"]]))

  near, uniform = mean_query_pos(0.01), mean_query_pos(1.0)
  assert near < 40 < 60 < uniform  # uniform gaps over 60 slots: mean position ~ 8 + 2 * 29.5 = 67


def test_mqar_gap_sampler_matches_numpy_choice():
  """Our O(space) sampler draws gaps like Zoology's np.random.choice(space, n, replace=False, p=p)."""
  from gsa_jax.data import mqar  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  p, trials = mqar.power_law_probs(12, 0.3), 4000
  ours, numpy_ = np.zeros((3, 12)), np.zeros((3, 12))  # marginal of the 1st, 2nd and 3rd draw
  for _ in range(trials):
    ours[np.arange(3), mqar.sample_without_replacement(rng, p, 3)] += 1
    numpy_[np.arange(3), rng.choice(12, size=3, replace=False, p=p)] += 1
  assert np.abs(ours - numpy_).max() / trials < 0.035
  assert all(len(set(mqar.sample_without_replacement(rng, p, 12).tolist())) == 12 for _ in range(5))


def test_mqar_no_noise_option():
  it = make_iterator(mqar_cfg(mqar_random_non_queries=False), split="train", batch_size=4, seq_len=32, seed=0)
  b = next(it)
  filler = (b["loss_mask"] == 0) & (np.arange(32) >= 8)
  assert (b["tokens"][filler] == 0).all()


def test_mqar_determinism_and_seeds():
  cfg = mqar_cfg()
  a = take(make_iterator(cfg, split="train", batch_size=4, seq_len=32, seed=1), 3)
  b = take(make_iterator(cfg, split="train", batch_size=4, seq_len=32, seed=1), 3)
  c = take(make_iterator(cfg, split="train", batch_size=4, seq_len=32, seed=2), 3)
  assert_batches_equal(a, b)
  assert not np.array_equal(a[0]["tokens"], c[0]["tokens"])


def rows(batches, key="tokens"):
  return [r.tobytes() for b in batches for r in b[key]]


def test_mqar_epochs_reshuffle_same_examples():
  cfg = mqar_cfg(mqar_num_train_examples=10)
  ep = rows(take(make_iterator(cfg, split="train", batch_size=5, seq_len=32, seed=0), 4))
  assert len(set(ep[:10])) == 10 and set(ep[:10]) == set(ep[10:])
  assert ep[:10] != ep[10:], "each epoch has its own order"


def test_mqar_resume_exact_across_epochs():
  cfg = mqar_cfg(mqar_num_train_examples=10, read_threads=2)
  ref = take(make_iterator(cfg, split="train", batch_size=4, seq_len=32, seed=5), 8)
  for k in (0, 1, 2, 3, 5):  # 10 examples / 4 rows: batches 2 and 5 straddle epoch boundaries
    it = make_iterator(cfg, split="train", batch_size=4, seq_len=32, seed=5)
    take(it, k)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    fresh = make_iterator(cfg, split="train", batch_size=4, seq_len=32, seed=5)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 8 - k), ref[k:])


def test_mqar_shards_disjoint_and_complete():
  cfg = mqar_cfg(mqar_num_train_examples=12)
  whole = set(rows(take(make_iterator(cfg, split="train", batch_size=4, seq_len=32, seed=0), 3)))
  shards = [set(rows(take(make_iterator(cfg, split="train", batch_size=2, seq_len=32, seed=0, shard_index=i,
                                        shard_count=3), 2))) for i in range(3)]
  assert all(len(s) == 4 for s in shards)
  assert not (shards[0] & shards[1]) and not (shards[0] & shards[2]) and not (shards[1] & shards[2])
  assert set.union(*shards) == whole


def test_mqar_eval_held_out_deterministic_cycling():
  cfg = mqar_cfg(mqar_num_train_examples=60, mqar_num_eval_examples=6)
  train = set(rows(take(make_iterator(cfg, split="train", batch_size=6, seq_len=32, seed=0), 10)))
  ev = take(make_iterator(cfg, split="eval", batch_size=3, seq_len=32, seed=0), 4)
  assert_batches_equal(ev, take(make_iterator(cfg, split="eval", batch_size=3, seq_len=32, seed=0), 4))
  assert not set(rows(ev)) & train
  assert_batches_equal(ev[2:], ev[:2])  # fixed order, repeated
  for b in ev:
    for r in range(3):
      check_mqar_row(b["tokens"][r], b["targets"][r], b["loss_mask"][r], b["segment_ids"][r], 256, 4)


# ------------------------------------------------------------------------------------------------------------- text


def test_byte_tokenizer_round_trip():
  text = "héllo wörld, 日本語 🙂\ttabs"
  ids = BYTE.encode(text)
  assert ids.dtype == np.int32 and ids.min() >= 3 and ids.max() < 259 == BYTE.vocab_size
  assert BYTE.decode(ids) == text
  assert BYTE.decode([1] + ids.tolist() + [2, 0, 0]) == text  # specials dropped
  np.testing.assert_array_equal(BYTE.encode("A"), [ord("A") + 3])


@pytest.mark.parametrize("packing", ["concat_then_split", "first_fit"])
def test_text_packing_keeps_documents_whole_and_separate(tmp_path, packing):
  rng = np.random.default_rng(0)
  docs = random_docs(41, rng)
  _, eval_idx = split_documents(len(docs), 0.5, 0)
  docs[eval_idx[0]] = "q" * 70 + "".join(rng.choice(list("abc"), 30))  # an eval document spanning several rows
  for i in eval_idx[3::4]:
    docs[i] = "".join(rng.choice(list("xyz"), 15))  # exactly one row of pairs: BOS + 15 bytes + EOS
  eval_docs = [docs[i] for i in eval_idx]
  cfg = text_cfg(write_txt(tmp_path, docs), eval_fraction=0.5, packing=packing, packing_bins=3)
  L, b = 16, 3
  total_pairs = sum(len(framed(d)) - 1 for d in eval_docs)
  n_batches = -(-2 * total_pairs // (L * b)) + 1  # a bit over two passes
  batches = take(make_iterator(cfg, split="eval", batch_size=b, seq_len=L, seed=0), n_batches)
  if packing == "concat_then_split":
    got = stream_documents(batches)
    # The eval split comes back in a fixed order, each document whole, in order, then again.
    assert len(got) >= len(eval_docs) + 1
    expected = (eval_docs * 3)[:len(got)]
    assert got == expected
    assert all((bt["segment_ids"] > 0).all() for bt in batches), "concat_then_split leaves no padding"
  else:
    # Documents are cut into chunks of <= L pairs; complete packing rounds (b rows each) hold exactly a prefix of the
    # chunk stream, in some arrangement.
    chunks = []
    for d in eval_docs * 3:
      f = framed(d)
      chunks += [(tuple(f[:-1][s:s + L]), tuple(f[1:][s:s + L])) for s in range(0, len(f) - 1, L)]
    segs = [(tuple(t.tolist()), tuple(g.tolist())) for bt in batches for t, g in row_segments(bt)]
    assert collections.Counter(segs) == collections.Counter(chunks[:len(segs)])
    assert any((bt["segment_ids"] == 0).any() for bt in batches), "first_fit pads"


@pytest.mark.parametrize("packing", ["concat_then_split", "first_fit"])
def test_text_resume_exact_across_epochs(tmp_path, packing):
  docs = random_docs(12, np.random.default_rng(1), lo=5, hi=60)
  cfg = text_cfg(write_txt(tmp_path, docs), packing=packing, packing_bins=2)
  kw = dict(split="train", batch_size=2, seq_len=16, seed=7)
  n = 14  # 9 train documents of ~35 bytes: about 2 epochs
  ref = take(make_iterator(cfg, **kw), n)
  assert_batches_equal(ref, take(make_iterator(cfg, **kw), n))  # determinism (read threads on)
  other = take(make_iterator(cfg, **dict(kw, seed=8)), n)
  assert any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(ref, other))
  for k in range(n):
    it = make_iterator(cfg, **kw)
    take(it, k)
    state = json.loads(json.dumps(it.get_state()))
    fresh = make_iterator(cfg, **kw)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, n - k), ref[k:])


def test_documents_across_tokenize_groups_come_in_order_and_resume_mid_group(tmp_path):
  """More documents than one tokenization group (some empty: a group gives fewer documents than it reads): the eval
  stream is the split's documents in order, whole, group after group; the train stream resumes exactly from
  positions inside a group."""
  from gsa_jax.data import pipeline  # noqa: PLC0415
  rng = np.random.default_rng(3)
  docs = random_docs(2 * pipeline.TOKENIZE_GROUP + 37, rng, lo=2, hi=12)
  records = [json.dumps({"text": "" if i % 9 == 4 else d}) for i, d in enumerate(docs)]
  (tmp_path / "docs.jsonl").write_text("\n".join(records) + "\n")
  cfg = text_cfg(tmp_path / "docs.jsonl", format="jsonl", eval_fraction=0.5)
  _, eval_idx = split_documents(len(docs), 0.5, 0)
  eval_docs = [docs[i] for i in eval_idx if i % 9 != 4]
  batches = take(make_iterator(cfg, split="eval", batch_size=4, seq_len=16, seed=0), 40)
  got = stream_documents(batches)
  assert len(got) > len(eval_docs) and got == (eval_docs * (len(got) // len(eval_docs) + 1))[:len(got)]
  kw = dict(split="train", batch_size=2, seq_len=16, seed=5)
  ref = take(make_iterator(cfg, **kw), 30)
  for k in (1, 7, 19, 29):
    it = make_iterator(cfg, **kw)
    take(it, k)
    fresh = make_iterator(cfg, **kw)
    fresh.set_state(json.loads(json.dumps(it.get_state())))
    assert_batches_equal(take(fresh, 30 - k), ref[k:])
  old = json.loads(json.dumps(it.get_state()))
  del old["identity"]["tokenize_group"]  # a state written before documents were tokenized in groups
  with pytest.raises(ValueError, match="saved with tokenize_group=None .* groups of 64 .* restart the data stream"):
    make_iterator(cfg, **kw).set_state(old)


def test_encode_batch_equals_encode_for_every_tokenizer(tmp_path):
  import sentencepiece as spm  # noqa: PLC0415
  import tokenizers  # noqa: PLC0415
  texts = ["def f(x):\n    return x + 1\n", "", "ünïcode ✓ and spaces   ", "the lazy dog " * 50]
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.train_from_iterator(texts * 5, tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  bpe.save(str(tmp_path / "bpe.json"))
  corpus = write_txt(tmp_path, ["the quick brown fox jumps over the lazy dog"] * 20)
  spm.SentencePieceTrainer.Train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=40,
                                 model_type="char", minloglevel=2)
  for spec in ("byte", str(tmp_path / "bpe.json"), str(tmp_path / "sp.model")):
    tok = tokenizer_lib.load_tokenizer(spec)
    batch = tok.encode_batch(texts)
    assert len(batch) == len(texts) and tok.encode_batch([]) == []
    for ids, text in zip(batch, texts):
      assert ids.dtype == np.int32
      np.testing.assert_array_equal(ids, tok.encode(text), err_msg=f"{spec}: {text!r}")


def test_text_train_epochs_shards_and_eval_are_disjoint(tmp_path):
  docs = [f"document number {i} " + "x" * (i % 7) for i in range(30)]
  cfg = text_cfg(write_txt(tmp_path, docs), eval_fraction=0.2)
  train_idx, eval_idx = split_documents(30, 0.2, 0)
  assert len(eval_idx) == 6 and not set(train_idx) & set(eval_idx) and len(train_idx) + len(eval_idx) == 30

  def first_docs(split, n_docs, **kw):
    got = stream_documents(take(make_iterator(cfg, split=split, batch_size=2, seq_len=16, seed=0, **kw), 40))
    assert len(got) >= n_docs
    return got[:n_docs]

  ev = first_docs("eval", 6)
  assert ev == [docs[i] for i in eval_idx]
  shard_docs = [first_docs("train", 8, shard_index=i, shard_count=3) for i in range(3)]
  assert all(len(set(s)) == 8 for s in shard_docs)  # one epoch of each 8-document share
  assert not set(shard_docs[0]) & set(shard_docs[1]) and not set(shard_docs[1]) & set(shard_docs[2])
  assert set().union(*map(set, shard_docs)) == {docs[i] for i in train_idx}
  assert not set(ev) & set().union(*map(set, shard_docs))
  two_epochs = first_docs("train", 48)
  assert set(two_epochs[:24]) == set(two_epochs[24:]) == {docs[i] for i in train_idx}
  assert two_epochs[:24] != two_epochs[24:], "reshuffled per epoch"


def read_all(cfg):
  src = sources.DocumentSource(sources.resolve_files(cfg.path, cfg.format), text_field=cfg.text_field,
                               txt_document=cfg.txt_document, record_format=cfg.record_format)
  return [src[i] for i in range(len(src))]


def test_text_formats(tmp_path):
  docs = ["first doc", "second: ünïcode ✓", "third {not json}", "4"]
  (tmp_path / "a.txt").write_bytes("first doc\r\n\nsecond: ünïcode ✓\n\n\nthird {not json}\n4".encode())
  assert read_all(text_cfg(tmp_path / "a.txt")) == docs  # CRLF, blank lines, no final newline
  assert read_all(text_cfg(tmp_path / "a.txt", txt_document="file")) == \
      ["first doc\r\n\nsecond: ünïcode ✓\n\n\nthird {not json}\n4"]

  with open(tmp_path / "b.jsonl", "w") as f:
    for d in docs:
      f.write(json.dumps({"id": 1, "body": d}) + "\n\n")
  assert read_all(text_cfg(tmp_path / "b.jsonl", text_field="body")) == docs

  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel
  writer = ArrayRecordWriter(str(tmp_path / "c.array_record"), "group_size:1")
  for d in docs:
    writer.write(d.encode())
  writer.write(json.dumps({"text": "from json"}).encode())
  writer.close()
  assert read_all(text_cfg(tmp_path / "c.array_record")) == docs + ["from json"]
  assert read_all(text_cfg(tmp_path / "c.array_record", record_format="text"))[-1] == '{"text": "from json"}'

  # A directory (searched recursively, in file-name order) may mix formats; a glob picks some files.
  (tmp_path / "dir" / "sub").mkdir(parents=True)
  os.replace(tmp_path / "c.array_record", tmp_path / "dir" / "sub" / "c.array_record")
  (tmp_path / "dir" / "a.txt").write_text("one\ntwo\n")
  (tmp_path / "dir" / "notes.md").write_text("ignored: unknown extension")
  assert read_all(text_cfg(tmp_path / "dir")) == ["one", "two"] + docs + ["from json"]
  assert read_all(text_cfg(tmp_path / "*.jsonl", text_field="body")) == docs

  # End to end: every document of the directory comes back through the pipeline (train + eval).
  cfg = text_cfg(tmp_path / "a.txt", eval_fraction=0.25)
  got = stream_documents(take(make_iterator(cfg, split="train", batch_size=1, seq_len=8, seed=0), 10))[:3]
  got += stream_documents(take(make_iterator(cfg, split="eval", batch_size=1, seq_len=8, seed=0), 3))[:1]
  assert sorted(got) == sorted(docs)


def test_parquet(tmp_path):
  import pyarrow as pa  # noqa: PLC0415 (the optional packages are in the `test` extra: a missing one fails)
  import pyarrow.parquet as pq  # noqa: PLC0415
  pq.write_table(pa.table({"text": ["alpha", None, "gamma", ""], "n": [1, 2, 3, 4]}), tmp_path / "d.parquet")
  cfg = text_cfg(tmp_path / "d.parquet", eval_fraction=0.0)
  validate_data_config(cfg, seq_len=8)
  assert read_all(cfg) == ["alpha", "", "gamma", ""]
  got = stream_documents(take(make_iterator(cfg, split="train", batch_size=1, seq_len=8, seed=0), 4))
  assert set(got[:2]) == {"alpha", "gamma"}  # empty and null rows are skipped
  with pytest.raises(ValueError, match=r"data.text_field: column 'body' not in .*d.parquet"):
    validate_data_config(text_cfg(tmp_path / "d.parquet", text_field="body"), seq_len=8)


def test_hf_tokenizer(tmp_path):
  import tokenizers  # noqa: PLC0415
  vocab = {"<unk>": 0, "<|endoftext|>": 1, "hello": 2, "world": 3, "again": 4}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / "tokenizer.json"))
  write_txt(tmp_path, ["hello world", "world again hello", "again"])
  cfg = text_cfg(tmp_path / "corpus.txt", tokenizer=str(tmp_path / "tokenizer.json"), eval_fraction=0.0)
  validate_data_config(cfg, seq_len=4)
  assert dataset_vocab_size(cfg) == 5
  b = next(make_iterator(cfg, split="train", batch_size=3, seq_len=4, seed=0))
  # GPT-2 style: <|endoftext|> both starts and ends documents; 3 documents = 3 + 4 + 2 pairs = 9 = 2 rows + 1 pair.
  flat = b["tokens"][b["segment_ids"] > 0].tolist()
  assert flat.count(1) >= 2 and set(flat) <= {1, 2, 3, 4}
  np.testing.assert_array_equal(b["targets"][:, :-1][b["segment_ids"][:, 1:] == b["segment_ids"][:, :-1]],
                                b["tokens"][:, 1:][b["segment_ids"][:, 1:] == b["segment_ids"][:, :-1]])


def test_sentencepiece_tokenizer(tmp_path):
  import sentencepiece as spm  # noqa: PLC0415
  corpus = write_txt(tmp_path, ["the quick brown fox jumps over the lazy dog"] * 20 + ["pack my box with jugs"] * 20)
  spm.SentencePieceTrainer.Train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=40,
                                 model_type="char", minloglevel=2)
  cfg = text_cfg(corpus, tokenizer=str(tmp_path / "sp.model"))
  validate_data_config(cfg, seq_len=16)
  tok = tokenizer_lib.load_tokenizer(cfg.tokenizer)
  assert dataset_vocab_size(cfg) == tok.vocab_size and tok.decode(tok.encode("the lazy dog")) == "the lazy dog"
  b = next(make_iterator(cfg, split="train", batch_size=2, seq_len=16, seed=0))
  assert b["tokens"][0, 0] == tok.bos_id and tok.eos_id in b["targets"]


def test_grain_orbax_handler_round_trip(tmp_path):
  """The trainer can checkpoint the iterator with grain's orbax handler (state written as JSON per process)."""
  import grain  # pylint: disable=import-outside-toplevel
  from etils import epath  # pylint: disable=import-outside-toplevel
  cfg = text_cfg(write_txt(tmp_path, random_docs(10, np.random.default_rng(2))))
  kw = dict(split="train", batch_size=2, seq_len=8, seed=0)
  it = make_iterator(cfg, **kw)
  take(it, 3)
  handler = grain.checkpoint.CheckpointHandler()
  (tmp_path / "ckpt").mkdir()
  handler.save(epath.Path(tmp_path / "ckpt"), item=it)
  expected = take(it, 3)
  restored = handler.restore(epath.Path(tmp_path / "ckpt"), item=make_iterator(cfg, **kw))
  assert_batches_equal(take(restored, 3), expected)


def test_state_from_other_pipeline_is_refused(tmp_path):
  cfg = mqar_cfg()
  state = make_iterator(cfg, split="train", batch_size=4, seq_len=32, seed=0, shard_index=0, shard_count=2).get_state()
  with pytest.raises(ValueError, match="saved with shard_count=2 .* this run has shard_count=4"):
    make_iterator(cfg, split="train", batch_size=4, seq_len=32, seed=0, shard_count=4).set_state(state)
  with pytest.raises(ValueError, match="saved with seed=0, but this iterator has seed=1"):
    make_iterator(cfg, split="train", batch_size=4, seq_len=32, seed=1, shard_count=2).set_state(state)
  with pytest.raises(ValueError, match="not a state of gsa_jax.data.make_iterator"):
    make_iterator(cfg, split="train", batch_size=4, seq_len=32, seed=0).set_state({"next_index": 3})


# ------------------------------------------------------------------------------------------------------- validation


def bad_text(tmp_path, **kw):
  cfg = text_cfg(write_txt(tmp_path, ["a b", "c d"], "good.txt"))
  cfg.update(kw)
  return cfg


@pytest.mark.parametrize("case, message", [
    (lambda p: bad_text(p, path=str(p / "missing.txt")), r"data.path: file '.*missing.txt' does not exist"),
    (lambda p: bad_text(p, path=""), r"data.path: empty"),
    (lambda p: bad_text(p, path=str(p / "nothing*.txt")), r"data.path: no files match"),
    (lambda p: bad_text(p, path=str(p / "emptydir")), r"data.path: directory .* holds no data files"),
    (lambda p: bad_text(p, path=str(p / "empty.txt")), r"data.path: file '.*empty.txt' is empty"),
    (lambda p: bad_text(p, path=str(p / "blank.txt")), r"data.path: file '.*blank.txt' is empty \(whitespace"),
    (lambda p: bad_text(p, path=str(p / "blank.jsonl")), r"data.path: file '.*blank.jsonl' is empty \(no non-blank"),
    (lambda p: bad_text(p, path=str(p / "bad.jsonl")), r"data.path: '.*bad.jsonl' line 2 is not valid JSON"),
    (lambda p: bad_text(p, path=str(p / "other.jsonl")), r"data.text_field: 'text' not found in .*other.jsonl' line 1"),
    (lambda p: bad_text(p, path=str(p / "bad.array_record")), r"data.path: cannot open '.*bad.array_record'"),
    (lambda p: bad_text(p, path=str(p / "data.csv")), r"data.format: cannot tell the format of '.*data.csv'"),
    (lambda p: bad_text(p, format="csv"), r"data.format: unknown value 'csv'"),
    (lambda p: bad_text(p, source="web"), r"data.source: unknown value 'web'; expected one of \['mqar', 'text'\]"),
    (lambda p: bad_text(p, source="mqa"), r"did you mean 'mqar'"),
    (lambda p: bad_text(p, packing="best_fit"), r"data.packing: unknown value 'best_fit'"),
    (lambda p: bad_text(p, txt_document="para"), r"data.txt_document: unknown value"),
    (lambda p: bad_text(p, eval_fraction=1.0), r"data.eval_fraction: must be in \[0, 1\)"),
    (lambda p: bad_text(p, tokenizer=str(p / "nope.json")), r"data.tokenizer: file '.*nope.json' does not exist"),
    (lambda p: bad_text(p, tokenizer="gpt2"), r"data.tokenizer: 'gpt2' is neither 'byte'"),
    (lambda p: bad_text(p, tokenizer="byte", eos_id=5), r"data.bos_id/data.eos_id: the byte tokenizer has fixed"),
    (lambda p: bad_text(p, bos_id=-2), r"data.bos_id: must be -1"),
    (lambda p: mqar_cfg(mqar_num_kv_pairs=16), r"data.mqar_num_kv_pairs: 16 pairs need seq_len >= 64"),
    (lambda p: mqar_cfg(mqar_vocab_size=8), r"data.mqar_vocab_size: 8 leaves 3 distinct keys"),
    (lambda p: mqar_cfg(mqar_power_a=0.0), r"data.mqar_power_a: must be > 0"),
    (lambda p: mqar_cfg(mqar_num_eval_examples=0), r"data.mqar_num_eval_examples: must be >= 1"),
])
def test_validation_messages(tmp_path, case, message):
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "blank.txt").write_text("\n  \n\t\n")
  (tmp_path / "blank.jsonl").write_text("\n\n")
  (tmp_path / "bad.jsonl").write_text('\n{"text": "ok"\n')
  (tmp_path / "other.jsonl").write_text('{"body": "x"}\n')
  (tmp_path / "bad.array_record").write_bytes(b"not an array record" * 10)
  (tmp_path / "data.csv").write_text("a,b\n")
  (tmp_path / "emptydir").mkdir()
  (tmp_path / "emptydir" / "README").write_text("not data")
  with pytest.raises(ValueError, match=message):
    validate_data_config(case(tmp_path), seq_len=32)


def test_validation_of_keys_types_and_tokenizer_files(tmp_path):
  cfg = data_config_defaults().to_dict()
  cfg["mqar_num_kv_pair"] = 3
  with pytest.raises(ValueError, match=r"data.mqar_num_kv_pair: unknown key; did you mean data.mqar_num_kv_pairs\?"):
    validate_data_config(cfg, seq_len=32)
  cfg = data_config_defaults().to_dict()
  cfg["add_bos"] = 1
  with pytest.raises(ValueError, match=r"data.add_bos: expected bool, got 1"):
    validate_data_config(cfg, seq_len=32)
  with pytest.raises(ValueError, match=r"seq_len: must be a positive int"):
    validate_data_config(data_config_defaults(), seq_len=0)

  (tmp_path / "broken.json").write_text('{"model": 3}')
  (tmp_path / "broken.model").write_bytes(b"\x00garbage")
  for name, package in (("broken.json", "tokenizers"), ("broken.model", "sentencepiece")):
    cfg = bad_text(tmp_path, tokenizer=str(tmp_path / name))
    # The package is installed (the `test` extra): the file itself is what fails to load.
    with pytest.raises(ValueError, match=rf"data.tokenizer: cannot load '.*{name}' as a"):
      validate_data_config(cfg, seq_len=32)
    # Without the optional package the message says what to install.
    tokenizer_lib.load_tokenizer.cache_clear()
    with pytest.MonkeyPatch.context() as mp:
      mp.setitem(sys.modules, package, None)  # makes `import package` raise ImportError
      with pytest.raises(ValueError, match=rf"data.tokenizer: .* needs the optional package `{package}` "
                                           rf"\(pip install {package}\)"):
        validate_data_config(cfg, seq_len=32)


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
  (tmp_path / "d.parquet").write_bytes(b"PAR1 not really")
  monkeypatch.setitem(sys.modules, "pyarrow", None)
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  with pytest.raises(ValueError, match=r"data.format: parquet files need the optional package `pyarrow` "
                                       r"\(pip install pyarrow\)"):
    validate_data_config(text_cfg(tmp_path / "d.parquet"), seq_len=8)


def test_make_iterator_argument_errors(tmp_path):
  cfg = mqar_cfg()
  with pytest.raises(ValueError, match=r"split: expected one of \['train', 'eval'\], got 'test'"):
    make_iterator(cfg, split="test", batch_size=2, seq_len=32, seed=0)
  with pytest.raises(ValueError, match=r"shard_index: must be in \[0, shard_count=2\), got 2"):
    make_iterator(cfg, split="train", batch_size=2, seq_len=32, seed=0, shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match=r"batch_size: must be an int >= 1"):
    make_iterator(cfg, split="train", batch_size=0, seq_len=32, seed=0)
  with pytest.raises(ValueError, match=r"data.mqar_num_eval_examples: 12 eval items cannot give shard 20 of 30"):
    make_iterator(cfg, split="eval", batch_size=2, seq_len=32, seed=0, shard_index=20, shard_count=30)
  tcfg = bad_text(tmp_path, eval_fraction=0.0)
  with pytest.raises(ValueError, match=r"data.eval_fraction: is 0, so there is no eval split"):
    make_iterator(tcfg, split="eval", batch_size=2, seq_len=8, seed=0)
  with pytest.raises(ValueError, match=r"data.eval_fraction: 0.5 of 1 documents leaves no training documents"):
    split_documents(1, 0.5, 0)


def test_mqar_batch_on_device_has_the_pipeline_construction():
  """`mqar_batch` (jax.random, for jitted loops): distinct keys and values in their halves, the pairs first, every
  key queried once at an even offset after them with its value as target; gaps distributed as the numpy examples'
  (Kolmogorov-Smirnov distance of the gap CDFs; the bound is one a neighbouring power law, 0.1 for 0.01, exceeds)."""
  from gsa_jax.data.mqar import mqar_batch, mqar_example  # noqa: PLC0415
  b, seq_len, vocab, n = 2048, 64, 32, 6
  batch = jax.device_get(jax.jit(lambda k: mqar_batch(k, batch_size=b, seq_len=seq_len, vocab_size=vocab,
                                                       num_kv_pairs=n, power_a=0.01))(jax.random.PRNGKey(0)))
  assert batch["tokens"].shape == (b, seq_len) and batch["tokens"].dtype == np.int32
  gaps = []
  for tokens, targets, mask in zip(batch["tokens"], batch["targets"], batch["loss_mask"]):
    keys, values = tokens[0:2 * n:2], tokens[1:2 * n:2]
    assert len(set(keys)) == n and len(set(values)) == n
    assert keys.min() >= 1 and keys.max() < vocab // 2 and values.min() >= vocab // 2 and values.max() < vocab
    query_pos = np.flatnonzero(mask)
    assert len(query_pos) == n and query_pos.min() >= 2 * n and np.all((query_pos - 2 * n) % 2 == 0)
    assert sorted(tokens[query_pos]) == sorted(keys)
    assert dict(zip(keys, values)) == dict(zip(tokens[query_pos], targets[query_pos]))
    gaps.append((query_pos - 2 * n) // 2)

  def numpy_gaps(power_a):
    return np.concatenate([
        (np.flatnonzero(mqar_example(i, seed=0, split="train", seq_len=seq_len, vocab_size=vocab, num_kv_pairs=n,
                                     power_a=power_a)["loss_mask"]) - 2 * n) // 2 for i in range(b)])

  space = (seq_len - 2 * n) // 2
  cdf = lambda g: np.cumsum(np.bincount(g, minlength=space)) / len(g)  # noqa: E731
  reference = cdf(numpy_gaps(0.01))
  assert np.abs(cdf(np.concatenate(gaps)) - reference).max() < 0.015
  assert np.abs(cdf(numpy_gaps(0.1)) - reference).max() > 0.015
