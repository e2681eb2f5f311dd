"""Random-access document sources over local files: one document = one string.

What counts as a document, per format (`data.format`, or from the file extension when "auto"):
  txt           (.txt, .text, .md) one document per line when `data.txt_document == "line"` (the default; empty lines
                                 are skipped), or the whole file when it is "file".
  jsonl         (.jsonl, .ndjson) one JSON object per line, text in field `data.text_field`; empty lines skipped.
  parquet       (.parquet)       one document per row of column `data.text_field` (needs `pip install pyarrow`).
  array_record  (.array_record, also sharded names like x.array_record-00000-of-00004) one document per record,
                                 read with grain's ArrayRecordDataSource. `data.record_format`: "text" (utf-8),
                                 "json" (an object with `data.text_field`) or "auto" (JSON when the record starts with
                                 '{' and parses to an object holding the field, else text).

Text is UTF-8: bytes that are not are an error naming the file and byte offset (`data.decode_errors="strict"`, the
default), or read as U+FFFD with `data.decode_errors="replace"` (the trainer counts and reports them at start).

Line-based files are indexed once with numpy over an mmap (newline offsets: 16 bytes per document in memory) and read
back by offset, so any document can be fetched in any order: this is what lets grain shuffle globally, hold out an eval
split and resume at an exact position. Parquet columns are loaded into memory on first use.
"""

from __future__ import annotations

import glob
import json
import mmap
import os
import re
import threading

import numpy as np

FORMATS = ("txt", "jsonl", "parquet", "array_record")
_EXTENSIONS = ((".txt", "txt"), (".text", "txt"), (".md", "txt"), (".jsonl", "jsonl"), (".ndjson", "jsonl"),
               (".parquet", "parquet"))
# Markdown is read as text when named (a file or a glob), but a directory's READMEs are not training data.
_NOT_IN_DIRECTORIES = (".md",)
DECODE_ERRORS = ("strict", "replace")
_ARRAY_RECORD_RE = re.compile(r"\.array_record(-\d+-of-\d+)?$")


def format_from_name(path: str) -> str | None:
  """The format implied by a file name, or None."""
  name = os.path.basename(path)
  if _ARRAY_RECORD_RE.search(name):
    return "array_record"
  for ext, fmt in _EXTENSIONS:
    if name.endswith(ext):
      return fmt
  return None


def resolve_files(path: str, fmt: str) -> list[tuple[str, str]]:
  """(file, format) pairs for `data.path` (a file, a glob or a directory), sorted by file name.

  A directory is searched recursively; with `data.format == "auto"` files of unknown extension there (READMEs,
  checksums) are ignored, and hidden files (".x", "_x") always are. A format set explicitly must agree with every
  known extension (a .jsonl file is not read as txt). Raises ValueError naming the key.
  """
  if not path:
    raise ValueError("data.path: empty; set it to a file, a glob or a directory of text files")
  if os.path.isdir(path):
    files = []
    for root, dirs, names in os.walk(path):
      dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
      files.extend(os.path.join(root, n) for n in names if not n.startswith((".", "_")))
    files = sorted(files)
    if fmt == "auto":
      files = [f for f in files if format_from_name(f) is not None and not f.endswith(_NOT_IN_DIRECTORIES)]
    if not files:
      raise ValueError(f"data.path: directory '{path}' holds no data files "
                       "(.txt, .jsonl, .parquet, .array_record; or set data.format)")
  elif os.path.isfile(path):
    files = [path]
  elif glob.has_magic(path):
    files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    if not files:
      raise ValueError(f"data.path: no files match '{path}'")
  else:
    raise ValueError(f"data.path: file '{path}' does not exist")
  out = []
  for f in files:
    implied = format_from_name(f)
    if fmt != "auto" and implied not in (None, fmt):
      raise ValueError(f"data.format: is {fmt!r} but '{f}' has the extension of a {implied} file; set "
                       f"data.format='auto' (or {implied!r}), or rename the file")
    file_fmt = fmt if fmt != "auto" else implied
    if file_fmt is None:
      raise ValueError(f"data.format: cannot tell the format of '{f}' from its extension; "
                       f"set data.format to one of {list(FORMATS)}")
    out.append((f, file_fmt))
  return out


def _extract_field(obj, text_field: str, where) -> str:
  """obj[text_field] as a string (None -> ""); `where` (a string, or a callable giving one) names it in errors."""
  if not isinstance(obj, dict) or text_field not in obj:
    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(f"data.text_field: '{text_field}' not found in {_where(where)} (it has {keys})")
  text = obj[text_field]
  if text is None:
    return ""
  if not isinstance(text, str):
    raise ValueError(f"data.text_field: '{text_field}' in {_where(where)} is a {type(text).__name__}, not a string")
  return text


def _where(where) -> str:
  return where() if callable(where) else where


def decode(raw: bytes, errors: str, where) -> str:
  """raw as UTF-8; errors="strict" raises ValueError naming `where` (a string or a callable giving one)."""
  try:
    return raw.decode("utf-8", errors=errors)
  except UnicodeDecodeError as e:
    raise ValueError(f"data.path: {_where(where)} is not UTF-8 (byte {e.start} of the document: "
                     f"{raw[e.start:e.start + 4]!r}); convert it, or set data.decode_errors='replace'") from None


_SURROGATE_ESCAPES = re.compile("[\udc80-\udcff]")


def utf8_errors(path: str, chunk_bytes: int = 1 << 24) -> tuple[int, int | None]:
  """(bytes of `path` that are not UTF-8, byte offset of the first or None): one pass, chunk_bytes at a time."""
  count, first = 0, None
  with open(path, "rb") as f:
    size = os.fstat(f.fileno()).st_size
    if size == 0:
      return 0, None
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
      start = 0
      while start < size:
        end = min(start + chunk_bytes, size)
        # Cut before a character's continuation bytes (0b10xxxxxx), so no character is split between chunks.
        back = 0
        while end < size and back < 3 and mm[end] & 0xC0 == 0x80:
          end, back = end - 1, back + 1
        chunk = mm[start:end]
        # surrogateescape turns each byte that is not UTF-8 into one lone surrogate, which valid UTF-8 never gives.
        bad = len(_SURROGATE_ESCAPES.findall(chunk.decode("utf-8", errors="surrogateescape")))
        if bad and first is None:
          try:
            chunk.decode("utf-8")
          except UnicodeDecodeError as e:
            first = start + e.start
        count += bad
        start = end
  return count, first


class _LineFile:
  """txt (line mode) or jsonl: documents are the non-empty lines, found by newline offsets."""

  def __init__(self, path: str, fmt: str, text_field: str, decode_errors: str = "strict"):
    self.path, self.fmt, self.text_field, self.decode_errors = path, fmt, text_field, decode_errors
    self._mm = None
    self._lock = threading.Lock()
    with open(path, "rb") as f:
      size = os.fstat(f.fileno()).st_size
      if size == 0:
        self.starts = self.ends = np.zeros(0, np.int64)
        return
      with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        data = np.frombuffer(mm, dtype=np.uint8)
        newlines = np.flatnonzero(data == 10)
        starts = np.concatenate([[0], newlines + 1])
        ends = np.concatenate([newlines, [size]])
        # Windows line ends: drop the '\r' before '\n'.
        has_cr = (ends > starts) & (data[np.maximum(ends - 1, 0)] == 13)
        del data  # the mmap cannot close while a numpy view holds it
    ends = ends - has_cr
    keep = ends > starts
    self.starts, self.ends = starts[keep].astype(np.int64), ends[keep].astype(np.int64)

  def __len__(self) -> int:
    return len(self.starts)

  def _map(self):
    if self._mm is None:
      with self._lock:
        if self._mm is None:
          with open(self.path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return self._mm

  def __getitem__(self, i: int) -> str:
    raw = self._map()[int(self.starts[i]):int(self.ends[i])]
    # The line number is only counted for an error message: counting newlines is O(file size).
    def where():
      return f"{self.path} line {self._map()[:int(self.starts[i])].count(b'\n') + 1}"

    text = decode(raw, self.decode_errors, where)
    if self.fmt == "txt":
      return text
    try:
      obj = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"data.path: {where()} is not valid JSON: {e}") from e
    return _extract_field(obj, self.text_field, where)

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_mm"], state["_lock"] = None, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()


class _WholeFile:
  """txt in "file" mode: the file is one document."""

  def __init__(self, path: str, decode_errors: str = "strict"):
    self.path, self.decode_errors = path, decode_errors

  def __len__(self) -> int:
    return 1

  def __getitem__(self, i: int) -> str:
    with open(self.path, "rb") as f:
      return decode(f.read(), self.decode_errors, self.path)


def _import_pyarrow_parquet():
  try:
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ValueError("data.format: parquet files need the optional package `pyarrow` (pip install pyarrow)") from e
  return pq


class _ParquetFile:
  """One document per row of column `text_field`; the column is read into memory on first access."""

  def __init__(self, path: str, text_field: str):
    self.path, self.text_field = path, text_field
    self._n = check_parquet(path, text_field)
    self._column = None
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i: int) -> str:
    if self._column is None:
      with self._lock:
        if self._column is None:
          pq = _import_pyarrow_parquet()
          self._column = pq.read_table(self.path, columns=[self.text_field]).column(0).combine_chunks()
    text = self._column[int(i)].as_py()
    return "" if text is None else text

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_column"], state["_lock"] = None, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()


def check_parquet(path: str, text_field: str) -> int:
  """Opens the footer only; returns the row count. Raises ValueError naming the key."""
  pq = _import_pyarrow_parquet()
  try:
    pf = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses.
    raise ValueError(f"data.path: cannot open '{path}' as parquet: {e}") from e
  names = pf.schema_arrow.names
  if text_field not in names:
    raise ValueError(f"data.text_field: column '{text_field}' not in '{path}' (columns: {names})")
  column_type = pf.schema_arrow.field(text_field).type
  if not str(column_type).startswith(("string", "large_string")):
    raise ValueError(f"data.text_field: column '{text_field}' of '{path}' holds {column_type}, not strings")
  return int(pf.metadata.num_rows)


def count_parquet_documents(path: str, text_field: str) -> int:
  """Rows of `path` whose `text_field` is a non-empty string (reads that column)."""
  pq = _import_pyarrow_parquet()
  import pyarrow.compute as pc  # pylint: disable=import-outside-toplevel

  column = pq.read_table(path, columns=[text_field]).column(0)
  return int(pc.sum(pc.greater(pc.utf8_length(column), 0)).as_py() or 0)


class _ArrayRecordFile:
  """One document per record, through grain's ArrayRecordDataSource."""

  def __init__(self, path: str, text_field: str, record_format: str, decode_errors: str = "strict"):
    self.path, self.text_field, self.record_format = path, text_field, record_format
    self.decode_errors = decode_errors
    self._source = open_array_record(path)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> str:
    raw = self._source[int(i)]
    where = f"{self.path} record {i}"
    text = decode(raw, self.decode_errors, where)
    if self.record_format == "text":
      return text
    if self.record_format == "json" or text.lstrip()[:1] == "{":
      try:
        obj = json.loads(text)
      except json.JSONDecodeError as e:
        if self.record_format == "json":
          raise ValueError(f"data.record_format: {where} is not valid JSON: {e}") from e
        return text
      if self.record_format == "json" or (isinstance(obj, dict) and self.text_field in obj):
        return _extract_field(obj, self.text_field, where)
    return text


def open_array_record(path: str):
  """grain's ArrayRecordDataSource over one file; ValueError naming data.path when it does not open."""
  import grain  # pylint: disable=import-outside-toplevel
  try:
    return grain.sources.ArrayRecordDataSource([path])
  except Exception as e:  # array_record raises RuntimeError/OSError with the reader's message.
    raise ValueError(f"data.path: cannot open '{path}' as array_record: {e}") from e


class DocumentSource:
  """All documents of all files, concatenated in file order: a grain RandomAccessDataSource of `str`."""

  def __init__(self, files: list[tuple[str, str]], *, text_field: str, txt_document: str, record_format: str,
               decode_errors: str = "strict"):
    self.readers = []
    for path, fmt in files:
      if fmt == "txt" and txt_document == "file":
        self.readers.append(_WholeFile(path, decode_errors))
      elif fmt in ("txt", "jsonl"):
        self.readers.append(_LineFile(path, fmt, text_field, decode_errors))
      elif fmt == "parquet":
        self.readers.append(_ParquetFile(path, text_field))
      elif fmt == "array_record":
        self.readers.append(_ArrayRecordFile(path, text_field, record_format, decode_errors))
      else:
        raise ValueError(f"data.format: unknown format '{fmt}'; expected one of {list(FORMATS)}")
    self.counts = np.array([len(r) for r in self.readers], dtype=np.int64)
    # offsets[k] is the global index of reader k's first document.
    self.offsets = np.concatenate([[0], np.cumsum(self.counts)])

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def __getitem__(self, index: int) -> str:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"document {index} out of range [0, {len(self)})")
    k = int(np.searchsorted(self.offsets, index, side="right")) - 1
    return self.readers[k][index - int(self.offsets[k])]

  def __repr__(self) -> str:
    return f"DocumentSource({len(self.readers)} files, {len(self)} documents)"
