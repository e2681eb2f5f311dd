"""Tokenizers for the text pipeline: a built-in byte tokenizer and thin wrappers over optional packages.

`data.tokenizer` chooses one:
  "byte"              built in, no dependency. Ids: 0 = PAD (never a target), 1 = BOS, 2 = EOS, byte b -> b + 3.
                      Vocab 259.
  "path/tokenizer.json"  a Hugging Face `tokenizers` file (needs `pip install tokenizers`).
  "path/name.model"   a SentencePiece model (needs `pip install sentencepiece`).

Every tokenizer exposes `encode(text) -> np.ndarray[int32]` without special tokens, `encode_batch(texts)` (the same
for a list of texts, in parallel where the package can: the pipeline tokenizes documents in groups with it),
`decode(ids) -> str`, `vocab_size`, `bos_id` and `eos_id`. The pipeline adds BOS (if `data.add_bos`) and EOS
itself, so documents are framed identically whatever the tokenizer's own post-processor would do.

Tokenizers are picklable (they reload from their path), so grain may run them in worker threads or processes.
"""

from __future__ import annotations

import functools
import os

import numpy as np

BYTE_PAD_ID = 0
BYTE_BOS_ID = 1
BYTE_EOS_ID = 2
BYTE_OFFSET = 3  # byte b has id b + BYTE_OFFSET
BYTE_VOCAB_SIZE = 256 + BYTE_OFFSET

# Special tokens looked up, in order, when `data.bos_id` / `data.eos_id` are -1 (auto) for a tokenizer.json.
_HF_EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]", "<|im_end|>")
_HF_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "[CLS]")


class TokenizerLoadError(ValueError):
  """A tokenizer file that cannot be loaded, or a missing optional package; the message says which."""


class ByteTokenizer:
  """UTF-8 bytes shifted by 3 to reserve PAD=0, BOS=1, EOS=2."""

  vocab_size = BYTE_VOCAB_SIZE
  bos_id = BYTE_BOS_ID
  eos_id = BYTE_EOS_ID
  pad_id = BYTE_PAD_ID

  def encode(self, text: str) -> np.ndarray:
    """Returns int32 ids [len(text.encode('utf-8'))]."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + BYTE_OFFSET

  def encode_batch(self, texts) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode(self, ids) -> str:
    """Inverse of `encode`; special ids (PAD/BOS/EOS) are dropped, invalid utf-8 is replaced."""
    ids = np.asarray(ids, dtype=np.int64)
    ids = ids[ids >= BYTE_OFFSET] - BYTE_OFFSET
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class HFTokenizer:
  """A Hugging Face `tokenizers` tokenizer.json; special tokens are added by the pipeline, not the post-processor."""

  def __init__(self, path: str, bos_id: int = -1, eos_id: int = -1):
    self.path = path
    self._requested = (bos_id, eos_id)
    self._tok = None
    self._load()

  def _load(self):
    try:
      import tokenizers  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise TokenizerLoadError(
          f"data.tokenizer: '{self.path}' is a Hugging Face tokenizer.json, which needs the optional package "
          "`tokenizers` (pip install tokenizers)") from e
    try:
      self._tok = tokenizers.Tokenizer.from_file(self.path)
    except Exception as e:  # tokenizers raises a bare Exception subclass for parse errors.
      raise TokenizerLoadError(f"data.tokenizer: cannot load '{self.path}' as a tokenizer.json: {e}") from e
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    bos_id, eos_id = self._requested
    self.eos_id = eos_id if eos_id >= 0 else self._find(_HF_EOS_CANDIDATES)
    if self.eos_id is None:
      raise TokenizerLoadError(
          f"data.eos_id: '{self.path}' has none of the usual end-of-text tokens {list(_HF_EOS_CANDIDATES)}; "
          "set data.eos_id to the id to append after each document")
    found_bos = bos_id if bos_id >= 0 else self._find(_HF_BOS_CANDIDATES)
    # GPT-2 style vocabularies have one <|endoftext|> that both ends and starts documents.
    self.bos_id = found_bos if found_bos is not None else self.eos_id

  def _find(self, candidates):
    for token in candidates:
      token_id = self._tok.token_to_id(token)
      if token_id is not None:
        return int(token_id)
    return None

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def encode_batch(self, texts) -> list[np.ndarray]:
    # `encode` holds the GIL, so read-ahead threads do not tokenize in parallel; the batch calls release it and spread
    # the texts over all cores (`_fast`, tokenizers >= 0.20, also skips the character offsets nobody reads here).
    encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
    return [np.asarray(e.ids, dtype=np.int32) for e in encode(list(texts), add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def __getstate__(self):
    return {"path": self.path, "requested": self._requested}

  def __setstate__(self, state):
    self.path, self._requested, self._tok = state["path"], state["requested"], None
    self._load()


class SentencePieceTokenizer:
  """A SentencePiece `.model`; BOS/EOS come from the model unless `data.bos_id` / `data.eos_id` override them."""

  def __init__(self, path: str, bos_id: int = -1, eos_id: int = -1):
    self.path = path
    self._requested = (bos_id, eos_id)
    self._sp = None
    self._load()

  def _load(self):
    try:
      import sentencepiece  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise TokenizerLoadError(
          f"data.tokenizer: '{self.path}' is a SentencePiece model, which needs the optional package "
          "`sentencepiece` (pip install sentencepiece)") from e
    sp = sentencepiece.SentencePieceProcessor()
    try:
      ok = sp.Load(self.path)
    except Exception as e:  # sentencepiece raises OSError or RuntimeError depending on the version.
      raise TokenizerLoadError(f"data.tokenizer: cannot load '{self.path}' as a SentencePiece model: {e}") from e
    if ok is False:
      raise TokenizerLoadError(f"data.tokenizer: cannot load '{self.path}' as a SentencePiece model")
    self._sp = sp
    self.vocab_size = int(sp.GetPieceSize())
    bos_id, eos_id = self._requested
    self.eos_id = eos_id if eos_id >= 0 else int(sp.eos_id())
    if self.eos_id < 0:
      raise TokenizerLoadError(
          f"data.eos_id: the SentencePiece model '{self.path}' defines no EOS piece; set data.eos_id")
    bos = bos_id if bos_id >= 0 else int(sp.bos_id())
    self.bos_id = bos if bos >= 0 else self.eos_id

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.EncodeAsIds(text), dtype=np.int32)

  def encode_batch(self, texts) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=np.int32) for ids in self._sp.EncodeAsIds(list(texts))]

  def decode(self, ids) -> str:
    return self._sp.DecodeIds([int(i) for i in ids])

  def __getstate__(self):
    return {"path": self.path, "requested": self._requested}

  def __setstate__(self, state):
    self.path, self._requested, self._sp = state["path"], state["requested"], None
    self._load()


def tokenizer_kind(spec: str) -> str:
  """'byte', 'hf' or 'sentencepiece' from the `data.tokenizer` string; raises TokenizerLoadError if unknown."""
  if spec == "byte":
    return "byte"
  if spec.endswith(".json"):
    return "hf"
  if spec.endswith(".model"):
    return "sentencepiece"
  raise TokenizerLoadError(
      f"data.tokenizer: '{spec}' is neither 'byte', a Hugging Face tokenizer.json (*.json) "
      "nor a SentencePiece model (*.model)")


@functools.lru_cache(maxsize=8)
def load_tokenizer(spec: str, bos_id: int = -1, eos_id: int = -1):
  """Loads (and caches) the tokenizer named by `data.tokenizer`; raises TokenizerLoadError with the reason."""
  kind = tokenizer_kind(spec)
  if kind == "byte":
    if bos_id >= 0 or eos_id >= 0:
      raise TokenizerLoadError("data.bos_id/data.eos_id: the byte tokenizer has fixed ids (BOS=1, EOS=2); "
                               "leave them at -1")
    return ByteTokenizer()
  if not os.path.isfile(spec):
    raise TokenizerLoadError(f"data.tokenizer: file '{spec}' does not exist")
  tok = HFTokenizer(spec, bos_id, eos_id) if kind == "hf" else SentencePieceTokenizer(spec, bos_id, eos_id)
  for name, value in (("data.bos_id", tok.bos_id), ("data.eos_id", tok.eos_id)):
    if not 0 <= value < tok.vocab_size:
      raise TokenizerLoadError(f"{name}: {value} is outside the vocabulary of '{spec}' (size {tok.vocab_size})")
  return tok
