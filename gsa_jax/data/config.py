"""The `data` section of the training config: defaults (every field typed and documented) and validation.

Validation runs before any device work. It checks that files exist, are non-empty and open (a parquet footer and
the type of its text column, an array_record header, the tokenizer file); with `read_all=True` (what the trainer
uses) it also reads every txt and jsonl file once: every byte must be UTF-8 (or is counted and reported with
data.decode_errors="replace") and every jsonl line must be a JSON object holding a string data.text_field, so a bad
line fails before training starts instead of hours into it; a jsonl or parquet file must hold a non-empty text.
array_record records are checked when they are read (an error names the file and the record). Every error is a ValueError whose message starts with
the offending key, e.g. "data.path: file 'x.txt' does not exist".
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import time

import ml_collections

from gsa_jax.data import sources
from gsa_jax.data import tokenizer as tokenizer_lib

SOURCES = ("mqar", "text")
PACKINGS = ("concat_then_split", "first_fit")
TXT_DOCUMENTS = ("line", "file")
RECORD_FORMATS = ("auto", "text", "json")

_log = logging.getLogger(__name__)

# With read_all, corpora of txt/jsonl larger than this get progress lines (a paper-scale corpus takes minutes).
PROGRESS_BYTES = 1 << 30
PROGRESS_EVERY_S = 10.0


def data_config_defaults() -> ml_collections.ConfigDict:
  """The defaults of every data field; override them as `--config.data.<field>=...`."""
  c = ml_collections.ConfigDict()
  # Which data: "mqar" (synthetic multi-query associative recall, generated on the fly) or "text" (local files).
  c.source = "mqar"

  # --- MQAR (Zoology `multiquery_ar`); an example is exactly seq_len tokens, one document.
  # Vocabulary: keys are drawn from [1, V//2), values from [V//2, V); the model's vocab must be >= this.
  c.mqar_vocab_size = 8192
  # Key-value pairs per example; every key is queried once, so this is also the number of scored positions.
  # Needs seq_len >= 4 * mqar_num_kv_pairs (room for the pairs and for the queries).
  c.mqar_num_kv_pairs = 8
  # Power-law exponent of the query gaps: p(gap g) ~ (g+1)^(a-1). 0.01 = mostly short gaps; 1.0 = uniform.
  c.mqar_power_a = 0.01
  # Distinct training examples; train cycles over them, reshuffled every epoch.
  c.mqar_num_train_examples = 100_000
  # Distinct eval examples (a different seed stream from train); eval cycles over them in a fixed order.
  c.mqar_num_eval_examples = 3_000
  # Fill the non-key/value/query positions with uniform random tokens (Zoology's default) instead of 0.
  c.mqar_random_non_queries = True

  # --- Text from local files.
  # A file, a glob ("data/*.jsonl", "**" allowed) or a directory (searched recursively).
  c.path = ""
  # "auto" (from each file's extension; .md is txt), "txt", "jsonl", "parquet" (needs pyarrow) or "array_record".
  # A format set explicitly must agree with every file's known extension.
  c.format = "auto"
  # jsonl / parquet / JSON array_record records: the field or column holding the document text.
  c.text_field = "text"
  # txt files: "line" = one document per non-empty line; "file" = the whole file is one document.
  c.txt_document = "line"
  # array_record records: "text" (utf-8), "json" (object with text_field) or "auto" (JSON if it parses to an object
  # holding text_field, else text).
  c.record_format = "auto"
  # Bytes that are not UTF-8: "strict" = an error naming the file and byte offset; "replace" = read them as U+FFFD
  # (their count is reported when the run starts).
  c.decode_errors = "strict"
  # "byte" (built in: PAD=0, BOS=1, EOS=2, byte b -> b+3, vocab 259), a Hugging Face tokenizer.json (needs
  # `tokenizers`) or a SentencePiece .model (needs `sentencepiece`).
  c.tokenizer = "byte"
  # Prepend BOS to every document, so that its first token is also predicted (EOS is always appended).
  c.add_bos = True
  # Override the BOS / EOS ids of a tokenizer file; -1 = take them from the tokenizer (fixed for "byte").
  c.bos_id = -1
  c.eos_id = -1
  # Fraction of documents held out as the eval split (chosen by split_seed, not by the run's seed, so runs with
  # different seeds evaluate on the same documents). 0 = no eval split.
  c.eval_fraction = 0.01
  # Seed of the train/eval document split.
  c.split_seed = 0
  # How documents fill rows of seq_len (input, target) pairs, both with grain transforms:
  # "concat_then_split" (ConcatThenSplitIterDataset: no padding; a document that does not fit continues in the next
  # row) or "first_fit" (FirstFitPackIterDataset: documents are cut into chunks of at most seq_len pairs, then packed
  # whole into the first row with room; the rest of a row is padding).
  c.packing = "concat_then_split"
  # first_fit only: rows packed together in one round; 0 = the batch size. More bins = less padding.
  c.packing_bins = 0

  # --- Loading.
  # Threads reading and tokenizing documents ahead of packing (grain ReadOptions.num_threads); 0 = in the caller.
  # Text is tokenized 64 documents at a time by the tokenizer's batch call, which a tokenizer.json spreads over
  # every core itself, so more threads than 2 rarely help there.
  c.read_threads = 2
  # Documents read ahead per process (for text, rounded up to whole groups of 64, and at least one a thread).
  c.prefetch_buffer_size = 64
  return c


def _check_fields(cfg) -> None:
  """Unknown keys (with a near-miss hint) and wrong types, against the defaults."""
  defaults = data_config_defaults()
  for key in cfg.keys():
    if key not in defaults:
      hint = difflib.get_close_matches(key, list(defaults.keys()), n=1)
      raise ValueError(f"data.{key}: unknown key" + (f"; did you mean data.{hint[0]}?" if hint else ""))
  for key, default in defaults.items():
    if key not in cfg:
      raise ValueError(f"data.{key}: missing (start from gsa_jax.data.data_config_defaults())")
    value = cfg[key]
    ok = isinstance(value, type(default))
    if isinstance(default, bool):
      ok = isinstance(value, bool)
    elif isinstance(default, int):
      ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
      ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
      raise ValueError(f"data.{key}: expected {type(default).__name__}, got {value!r}")


def _choice(cfg, key: str, allowed) -> None:
  if cfg[key] not in allowed:
    hint = difflib.get_close_matches(str(cfg[key]), list(allowed), n=1)
    raise ValueError(f"data.{key}: unknown value {cfg[key]!r}; expected one of {list(allowed)}"
                     + (f" (did you mean {hint[0]!r}?)" if hint else ""))


def _check_file(path: str, fmt: str, cfg, read_all: bool) -> None:
  """Exists, non-empty, opens as its format; with read_all, every txt/jsonl byte and jsonl record is checked."""
  if not os.path.isfile(path):
    raise ValueError(f"data.path: file '{path}' does not exist")
  if os.path.getsize(path) == 0:
    raise ValueError(f"data.path: file '{path}' is empty")
  try:
    with open(path, "rb") as f:
      head = f.read(1 << 16)
  except OSError as e:
    raise ValueError(f"data.path: cannot read '{path}': {e}") from e
  if fmt == "txt":
    if not head.strip():
      # Only whitespace in the first 64 KiB: look at the rest before calling it empty.
      with open(path, "rb") as f:
        if not any(chunk.strip() for chunk in iter(lambda: f.read(1 << 20), b"")):
          raise ValueError(f"data.path: file '{path}' is empty (whitespace only)")
    if read_all:
      _check_utf8(path, cfg.decode_errors)
  elif fmt == "jsonl":
    if read_all:
      _check_utf8(path, cfg.decode_errors)
    lines = documents = 0
    with open(path, "rb") as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        lines += 1
        try:
          obj = json.loads(line.decode("utf-8", errors="replace"))  # bytes that are not UTF-8: _check_utf8
        except json.JSONDecodeError as e:
          raise ValueError(f"data.path: '{path}' line {line_no} is not valid JSON ({e}); is it a jsonl file?") \
              from None
        text = sources._extract_field(obj, cfg.text_field, f"'{path}' line {line_no}")  # pylint: disable=protected-access
        documents += bool(text)
        if not read_all:
          break
    if not lines:
      raise ValueError(f"data.path: file '{path}' is empty (no non-blank lines)")
    if read_all and not documents:
      raise ValueError(f"data.path: file '{path}' has no document: the '{cfg.text_field}' of every line is empty")
  elif fmt == "parquet":
    if sources.check_parquet(path, cfg.text_field) == 0:
      raise ValueError(f"data.path: file '{path}' is empty (0 rows)")
    # Empty texts are skipped when read: a file of nothing else would never give a batch.
    if read_all and sources.count_parquet_documents(path, cfg.text_field) == 0:
      raise ValueError(f"data.path: file '{path}' has no document: every '{cfg.text_field}' is empty or null")
  elif fmt == "array_record":
    if len(sources.open_array_record(path)) == 0:
      raise ValueError(f"data.path: file '{path}' is empty (0 records)")


def _check_utf8(path: str, decode_errors: str) -> None:
  count, first = sources.utf8_errors(path)
  if not count:
    return
  if decode_errors == "strict":
    with open(path, "rb") as f:
      line = f.read(first).count(b"\n") + 1
      sample = f.read(4)
    raise ValueError(f"data.path: '{path}' is not UTF-8: byte offset {first} (line {line}) is {sample!r}, "
                     f"{count} such byte(s) in all; convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8), or "
                     "set data.decode_errors='replace' to read them as U+FFFD")
  _log.warning("data.decode_errors='replace': %d byte(s) of '%s' are not UTF-8 (the first at offset %d); they read "
               "as U+FFFD", count, path, first)


def validate_data_config(cfg, *, seq_len: int, read_all: bool = False) -> None:
  """Checks the `data` section for the given row length; raises ValueError naming the first bad key.

  read_all: also read every txt and jsonl file in full (UTF-8, every jsonl record); see the module docstring.
  """
  _check_fields(cfg)
  if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
    raise ValueError(f"seq_len: must be a positive int, got {seq_len!r}")
  _choice(cfg, "source", SOURCES)
  if cfg.source == "mqar":
    n, v = cfg.mqar_num_kv_pairs, cfg.mqar_vocab_size
    if n < 1:
      raise ValueError(f"data.mqar_num_kv_pairs: must be >= 1, got {n}")
    if v // 2 - 1 < n:
      raise ValueError(f"data.mqar_vocab_size: {v} leaves {max(v // 2 - 1, 0)} distinct keys ([1, {v // 2})) "
                       f"for {n} key-value pairs; use at least {2 * (n + 1)}")
    if seq_len < 4 * n:
      raise ValueError(f"data.mqar_num_kv_pairs: {n} pairs need seq_len >= {4 * n} (pairs, then room for the "
                       f"queries), got seq_len={seq_len}")
    if not cfg.mqar_power_a > 0:
      raise ValueError(f"data.mqar_power_a: must be > 0, got {cfg.mqar_power_a}")
    for key in ("mqar_num_train_examples", "mqar_num_eval_examples"):
      if cfg[key] < 1:
        raise ValueError(f"data.{key}: must be >= 1, got {cfg[key]}")
    return

  _choice(cfg, "format", ("auto",) + sources.FORMATS)
  _choice(cfg, "txt_document", TXT_DOCUMENTS)
  _choice(cfg, "record_format", RECORD_FORMATS)
  _choice(cfg, "packing", PACKINGS)
  _choice(cfg, "decode_errors", sources.DECODE_ERRORS)
  if not cfg.text_field:
    raise ValueError("data.text_field: empty")
  if not 0.0 <= cfg.eval_fraction < 1.0:
    raise ValueError(f"data.eval_fraction: must be in [0, 1), got {cfg.eval_fraction}")
  for key in ("packing_bins", "read_threads", "split_seed"):
    if cfg[key] < 0:
      raise ValueError(f"data.{key}: must be >= 0, got {cfg[key]}")
  if cfg.prefetch_buffer_size < 1:
    raise ValueError(f"data.prefetch_buffer_size: must be >= 1, got {cfg.prefetch_buffer_size}")
  for key in ("bos_id", "eos_id"):
    if cfg[key] < -1:
      raise ValueError(f"data.{key}: must be -1 (from the tokenizer) or an id >= 0, got {cfg[key]}")
  files = sources.resolve_files(cfg.path, cfg.format)
  sizes = [os.path.getsize(path) if read_all and fmt in ("txt", "jsonl") and os.path.isfile(path) else 0
           for path, fmt in files]
  total, done, last = sum(sizes), 0, time.monotonic()
  if total > PROGRESS_BYTES:
    _log.info("checking the data: every byte of %.1f GB of txt/jsonl (%d files) is read before the run starts",
              total / 1e9, sum(size > 0 for size in sizes))
  for (path, fmt), size in zip(files, sizes):
    _check_file(path, fmt, cfg, read_all)
    done += size
    if total > PROGRESS_BYTES and time.monotonic() - last >= PROGRESS_EVERY_S:
      _log.info("checking the data: %.1f of %.1f GB read", done / 1e9, total / 1e9)
      last = time.monotonic()
  tokenizer_lib.load_tokenizer(cfg.tokenizer, cfg.bos_id, cfg.eos_id)  # TokenizerLoadError is a ValueError.
