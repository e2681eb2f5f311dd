"""Grain pipelines that turn the `data` config into batches of fixed-shape numpy arrays.

Every batch is a dict of numpy arrays, each [batch_size, seq_len]:
  tokens       int32    model inputs
  targets      int32    the token to predict at each position (0 where loss_mask is 0)
  loss_mask    float32  1 where the target counts: MQAR answers; for text every real (input, target) pair
  segment_ids  int32    >0 = document number within the row (1, 2, ...), 0 = padding. MQAR rows are one document (1).
  positions    int32    position within the segment (0 at each document start or continuation), 0 on padding.

Text rows never pair an input with a target from another document: each document is framed as
[BOS] + tokens + [EOS] and turned into aligned `inputs = doc[:-1]`, `targets = doc[1:]` sequences before packing,
and grain packs both features with the same lengths, so they are cut at the same places. A document longer than a row
continues in the next row (concat_then_split) or is cut into seq_len chunks (first_fit); no (input, target) pair is
lost at a cut, and none is invented across documents.

Pipeline (all grain):
  MapDataset.range / MapDataset.source(document indices)
    -> [shard_index::shard_count]          this host's disjoint share
    -> .shuffle(seed).repeat()             train: forever, a new permutation each epoch (grain reseeds per epoch)
       .repeat()                           eval: forever, the same fixed order each pass
    -> .map(generate)                      MQAR: random access, any element can be recomputed from its index
       .batch(TOKENIZE_GROUP).map(read + tokenize)   text: a group of documents at a time (see below)
    -> .to_iter_dataset(ReadOptions)       read-ahead threads
    -> FlatMapIterDataset (the group's documents one by one), then
       ConcatThenSplitIterDataset | FlatMapIterDataset + FirstFitPackIterDataset   (text only)
    -> .batch(batch_size, drop_remainder=True)
The iterator is a grain DatasetIterator: `get_state()` is a small JSON-serializable dict (positions, not data), and
`set_state()` resumes with exactly the next batch. It also works with grain's orbax integration
(`grain.checkpoint.CheckpointSave(item=it)` / `CheckpointRestore(item=it)`) and orbax v1's `save`/`load`.

Text is tokenized TOKENIZE_GROUP documents at a time with the tokenizer's `encode_batch`: a Hugging Face tokenizer
holds Python's GIL in `encode`, so per-document tokenization in the read-ahead threads ran on one core (about 280K
tokens/s on the H200 machine's CPU, below a 110M model's step); the batch call releases it and uses every core. The
documents, their order and the rows are the same as one at a time.

The state records the pipeline's identity (source, split, seed, batch_size, seq_len, shard_index, shard_count and the
number of documents). Restoring a state into an iterator built differently raises ValueError naming the difference:
in particular a change of host count (shard_count) cannot be resumed, because each host's position refers to its own
share of the data; restart the data stream instead (a fresh iterator, e.g. with a new seed).
"""

from __future__ import annotations

import typing

import grain
import ml_collections
import numpy as np

from gsa_jax.data import config as config_lib
from gsa_jax.data import mqar
from gsa_jax.data import sources
from gsa_jax.data import tokenizer as tokenizer_lib

SPLITS = ("train", "eval")
STATE_VERSION = 1
TOKENIZE_GROUP = 64  # documents read and tokenized together; the text pipeline's position counts these groups


def _as_config(cfg) -> ml_collections.ConfigDict:
  return cfg if isinstance(cfg, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)) else \
      ml_collections.ConfigDict(dict(cfg))


def dataset_vocab_size(cfg) -> int:
  """The vocabulary the data needs: the model's vocab_size must be at least this."""
  cfg = _as_config(cfg)
  if cfg.source == "mqar":
    return int(cfg.mqar_vocab_size)
  return int(tokenizer_lib.load_tokenizer(cfg.tokenizer, cfg.bos_id, cfg.eos_id).vocab_size)


def split_documents(num_documents: int, eval_fraction: float, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train, eval) sorted document indices: a fixed random `eval_fraction` of the documents (at least one) is eval.

  Depends only on (num_documents, eval_fraction, split_seed), never on the run's seed or the host count, so every
  host and every run agrees on which documents are held out.
  """
  num_eval = 0 if eval_fraction == 0 else max(1, int(round(eval_fraction * num_documents)))
  if num_eval >= num_documents:
    raise ValueError(f"data.eval_fraction: {eval_fraction} of {num_documents} documents leaves no training documents "
                     f"(it holds out {num_eval}); use more documents (data.txt_document='line' makes each line one), "
                     "or data.eval_fraction=0 (no eval split, no evaluation)")
  perm = np.random.default_rng(split_seed).permutation(num_documents)
  return np.sort(perm[num_eval:]), np.sort(perm[:num_eval])


class _ReadAndFrameDocuments:
  """A group of document indices -> the aligned next-token pairs of each non-empty one, in order:
  [{"inputs": doc[:-1], "targets": doc[1:]}], doc = [BOS] + ids + [EOS] int32 (a picklable callable for grain)."""

  def __init__(self, source: sources.DocumentSource, documents: np.ndarray, tokenizer, add_bos: bool):
    self.source, self.documents, self.tokenizer, self.add_bos = source, documents, tokenizer, add_bos

  def __call__(self, positions) -> list[dict]:
    texts = [self.source[int(self.documents[p])] for p in positions]
    texts = [t for t in texts if t]  # empty fields/records give no document
    head = [self.tokenizer.bos_id] if self.add_bos else []
    framed = []
    for ids in self.tokenizer.encode_batch(texts):
      doc = np.concatenate([np.asarray(head, np.int32), ids.astype(np.int32), [np.int32(self.tokenizer.eos_id)]])
      framed.append({"inputs": doc[:-1], "targets": doc[1:]})
    return framed


class _Ungroup(grain.experimental.FlatMapTransform):
  """A group's list of documents -> its documents one by one."""

  max_fan_out = TOKENIZE_GROUP

  def flat_map(self, element):
    return element


class _ChunkPairs(grain.experimental.FlatMapTransform):
  """Cuts a document's pairs into chunks of at most seq_len, so first-fit packing can place each chunk in a row."""

  def __init__(self, seq_len: int):
    self.seq_len = seq_len
    self.max_fan_out = 1 << 30  # only the MapDataset flat map uses it; documents can be arbitrarily long.

  def flat_map(self, element):
    n, L = len(element["inputs"]), self.seq_len
    return [{k: v[s:s + L] for k, v in element.items()} for s in range(0, n, L)]


def _packed_to_row(element: dict) -> dict:
  """A packed grain element -> one output row. Padding has segment id 0 and (being zero-filled) tokens/targets 0."""
  segment_ids = element["inputs_segment_ids"].astype(np.int32)
  return {
      "tokens": element["inputs"].astype(np.int32),
      "targets": element["targets"].astype(np.int32),
      # Every non-padding pair is an (input, next token) pair of one document, so all of them count.
      "loss_mask": (segment_ids > 0).astype(np.float32),
      "segment_ids": segment_ids,
      "positions": element["inputs_positions"].astype(np.int32),
  }


def _mqar_row(example: dict) -> dict:
  return dict(example, positions=np.arange(len(example["tokens"]), dtype=np.int32))


def _normalize_state(state):
  """Undoes what a JSON round trip does to grain's ConcatThenSplit state.

  grain 0.2.18 marks "no remainder" with the tuple (-1, -1) and compares with `!=`; JSON turns it into the list
  [-1, -1], which compares unequal, so a restored iterator would replay a stale remainder. Tuples come back here.
  """
  if isinstance(state, dict):
    out = {}
    for k, v in state.items():
      if k == "remainder_slices" and isinstance(v, dict):
        out[k] = {f: tuple(s) if isinstance(s, list) else s for f, s in v.items()}
      else:
        out[k] = _normalize_state(v)
    return out
  if isinstance(state, list):
    return [_normalize_state(v) for v in state]
  return state


class DataIterator(grain.DatasetIterator):
  """The trainer-facing iterator: grain's pipeline iterator plus a check that a restored state belongs to it."""

  def __init__(self, parent: grain.DatasetIterator, identity: dict[str, typing.Any]):
    super().__init__(parent)
    self.identity = identity

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._parent)

  def get_state(self) -> dict[str, typing.Any]:
    return {"identity": dict(self.identity), "pipeline": self._parent.get_state()}

  def set_state(self, state: dict[str, typing.Any]) -> None:
    saved = state.get("identity") if isinstance(state, dict) else None
    if saved is None or "pipeline" not in state:
      raise ValueError("data iterator state: not a state of gsa_jax.data.make_iterator (no 'identity'/'pipeline')")
    for key, value in self.identity.items():
      if saved.get(key) != value:
        if key == "tokenize_group":
          raise ValueError(
              f"data iterator state: saved with tokenize_group={saved.get(key)} but this pipeline reads documents in "
              f"groups of {value} (an older gsa_jax read them one at a time), so its position means something else "
              "here; resume with the gsa_jax that wrote the checkpoint, or restart the data stream (do not restore "
              "the iterator state)")
        if key == "shard_count":
          raise ValueError(
              f"data iterator state: saved with shard_count={saved.get(key)} (processes) but this run has "
              f"shard_count={value}. Each process's state is a position in its own share of the data, so it cannot "
              "be re-split onto another process count; resume on the same number of processes, or restart the data "
              "stream (do not restore the iterator state).")
        raise ValueError(f"data iterator state: saved with {key}={saved.get(key)!r}, but this iterator has "
                         f"{key}={value!r}; build the iterator with the same settings to resume")
    self._parent.set_state(_normalize_state(state["pipeline"]))

  def __str__(self) -> str:
    return f"DataIterator({self.identity})"


def _read_options(cfg, per_element: int = 1) -> grain.ReadOptions:
  """Read-ahead of elements holding `per_element` documents each: data.prefetch_buffer_size counts documents,
  rounded up to whole elements, and at least one element a thread."""
  ahead = max(cfg.read_threads, -(-cfg.prefetch_buffer_size // per_element))
  return grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=ahead)


def _index_stream(num: int, *, split: str, seed: int, shard_index: int, shard_count: int,
                  what: str) -> grain.MapDataset:
  """Indices [0, num) -> this shard's share, shuffled per epoch (train) or in order (eval), repeated forever."""
  ds = grain.MapDataset.range(num)[shard_index::shard_count]
  if len(ds) == 0:
    raise ValueError(f"{what}: {num} {split} items cannot give shard {shard_index} of {shard_count} any; "
                     "use more data or fewer processes")
  if split == "train":
    ds = ds.shuffle(seed)
  return ds.repeat(None)


def make_iterator(cfg, *, split: str, batch_size: int, seq_len: int, seed: int, shard_index: int = 0,
                  shard_count: int = 1) -> DataIterator:
  """An endless iterator of batches (see the module docstring for the arrays) for this process's share.

  Args:
    cfg: the `data` config section (`data_config_defaults()` with overrides).
    split: "train" (shuffled per epoch) or "eval" (held out from train; the same fixed order from every fresh
      iterator, cycling: take a fixed number of batches from a new iterator for each evaluation).
    batch_size: rows per batch for this process.
    seq_len: tokens per row (inputs; each row carries seq_len targets too).
    seed: shuffle seed (and, for MQAR, the example generator's seed); in [0, 2**32).
    shard_index, shard_count: this process's disjoint share of the data (usually jax.process_index()/count()).
  """
  cfg = _as_config(cfg)
  config_lib.validate_data_config(cfg, seq_len=seq_len)
  if split not in SPLITS:
    raise ValueError(f"split: expected one of {list(SPLITS)}, got {split!r}")
  for name, value, low in (("batch_size", batch_size, 1), ("shard_count", shard_count, 1), ("seed", seed, 0)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
      raise ValueError(f"{name}: must be an int >= {low}, got {value!r}")
  if seed >= 2**32:
    raise ValueError(f"seed: must be < 2**32, got {seed}")
  if not isinstance(shard_index, (int, np.integer)) or not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index: must be in [0, shard_count={shard_count}), got {shard_index!r}")
  batch_size, seq_len, seed = int(batch_size), int(seq_len), int(seed)
  shard_index, shard_count = int(shard_index), int(shard_count)
  identity = dict(version=STATE_VERSION, source=cfg.source, split=split, seed=seed, batch_size=batch_size,
                  seq_len=seq_len, shard_index=shard_index, shard_count=shard_count)

  if cfg.source == "mqar":
    num = cfg.mqar_num_train_examples if split == "train" else cfg.mqar_num_eval_examples
    key = "data.mqar_num_train_examples" if split == "train" else "data.mqar_num_eval_examples"
    ds = _index_stream(num, split=split, seed=seed, shard_index=shard_index, shard_count=shard_count, what=key)
    ds = ds.map(mqar.MQARExample(seed=seed, split=split, seq_len=seq_len, vocab_size=cfg.mqar_vocab_size,
                                 num_kv_pairs=cfg.mqar_num_kv_pairs, power_a=float(cfg.mqar_power_a),
                                 random_non_queries=cfg.mqar_random_non_queries))
    ids = ds.map(_mqar_row).to_iter_dataset(_read_options(cfg))
    identity.update(num_documents=int(num))
  else:
    source = sources.DocumentSource(sources.resolve_files(cfg.path, cfg.format), text_field=cfg.text_field,
                                    txt_document=cfg.txt_document, record_format=cfg.record_format,
                                    decode_errors=cfg.decode_errors)
    if len(source) == 0:
      raise ValueError(f"data.path: no documents in '{cfg.path}' (all lines or records are empty)")
    train_docs, eval_docs = split_documents(len(source), float(cfg.eval_fraction), cfg.split_seed)
    docs = train_docs if split == "train" else eval_docs
    if len(docs) == 0:
      raise ValueError("data.eval_fraction: is 0, so there is no eval split; set it > 0 (e.g. 0.01)")
    index_ds = _index_stream(len(docs), split=split, seed=seed, shard_index=shard_index, shard_count=shard_count,
                             what=f"data.path ({len(source)} documents)")
    tok = tokenizer_lib.load_tokenizer(cfg.tokenizer, cfg.bos_id, cfg.eos_id)
    groups = (index_ds.batch(TOKENIZE_GROUP, batch_fn=list)  # positions in the split, a group at a time
              .map(_ReadAndFrameDocuments(source, docs, tok, cfg.add_bos)))
    pairs = grain.experimental.FlatMapIterDataset(groups.to_iter_dataset(_read_options(cfg, TOKENIZE_GROUP)),
                                                  _Ungroup())
    length_struct = {"inputs": seq_len, "targets": seq_len}
    if cfg.packing == "concat_then_split":
      # split_full_length_features=True (grain's default, spelled out): a document of exactly seq_len pairs is
      # packed like any other instead of jumping the queue, so a cut document always continues in the next row.
      packed = grain.experimental.ConcatThenSplitIterDataset(pairs, length_struct=length_struct,
                                                             split_full_length_features=True)
    else:
      chunks = grain.experimental.FlatMapIterDataset(pairs, _ChunkPairs(seq_len))
      packed = grain.experimental.FirstFitPackIterDataset(
          chunks, length_struct=length_struct, num_packing_bins=cfg.packing_bins or batch_size, seed=seed,
          shuffle_bins=split == "train")
    ids = packed.map(_packed_to_row)
    identity.update(num_documents=len(source), packing=cfg.packing, tokenize_group=TOKENIZE_GROUP)
  batches = ids.batch(batch_size, drop_remainder=True)
  return DataIterator(iter(batches), identity)
