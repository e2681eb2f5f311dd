"""A language-modelling corpus nobody on this project wrote: the Python sources of installed packages, split by
package (the held-out split is different software), with a byte-level BPE tokenizer trained on the training split.

    python benchmarks/code_corpus.py --out corpus/code                      # this interpreter's site-packages
    python benchmarks/code_corpus.py --out corpus/code --heldout numpy,triton --vocab-size 16384
    python benchmarks/code_corpus.py --out corpus/tiny --packages iniconfig,idna,cycler --heldout cycler

Every `.py` file of a package is one document: {"text": its source, "package": ..., "path": ...} on one jsonl
line. Files that are not UTF-8 or larger than --max-file-bytes (generated tables) are skipped and counted; a file
whose exact contents already appear earlier (vendored copies) is dropped, and a held-out file whose contents appear
in the training split is dropped too, so no held-out text was seen in training.

Writes into --out (the corpus is not meant to be committed):
  train-NNNNN.jsonl    the training packages' files, in shards of about --shard-mb
  heldout.jsonl        the held-out packages' files (what `python -m gsa_jax.eval --task perplexity` reads)
  tokenizer.json       byte-level BPE (`tokenizers`) trained on the training split; <pad> = 0, <s> = 1, </s> = 2
                       (--tokenizer FILE copies a tokenizer.json instead: BPE training is not bit-reproducible,
                       so a corpus rebuilt on another machine reuses the first build's ids this way)
  manifest.json        the sources, each split's packages with their files and bytes, every written file's size
                       and sha256, what was skipped, the tokenizer's vocabulary size and training sample

Held-out packages: --heldout names them; otherwise they are drawn in a fixed order (sha256 of --seed and the name)
until they hold --heldout-fraction of the bytes, skipping any package larger than that share on its own.
Exit code 2 with one line for bad arguments (an unknown package, no sources found, an unwritable --out).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import sys
import sysconfig
from typing import Iterator, NamedTuple

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: gsa_jax's tokenizer finds <s> / </s> as BOS / EOS
_NOT_PACKAGES = (".dist-info", ".egg-info", ".data", ".libs")


class SourceFile(NamedTuple):
  package: str
  path: str  # relative to its site-packages directory
  text: str
  sha256: str


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def default_roots() -> list[str]:
  """This interpreter's site-packages directories (purelib and platlib, once each)."""
  paths = sysconfig.get_paths()
  return sorted({os.path.realpath(paths["purelib"]), os.path.realpath(paths["platlib"])})


def find_packages(roots: list[str]) -> dict[str, list[str]]:
  """{package: sorted absolute paths of its .py files}: each top-level directory of a root that holds Python
  files (metadata and bundled-library directories skipped), and each top-level module file as its own package."""
  packages: dict[str, list[str]] = {}
  for root in roots:
    for entry in sorted(os.listdir(root)):
      full = os.path.join(root, entry)
      # "__": __pycache__ and editable-install finders (this project's own, among them).
      if entry.startswith((".", "__")) or entry.endswith(_NOT_PACKAGES):
        continue
      if os.path.isfile(full) and entry.endswith(".py"):
        packages.setdefault(entry[:-3], []).append(full)
      elif os.path.isdir(full) and entry != "__pycache__":
        files = [os.path.join(d, f) for d, dirs, names in os.walk(full) for f in names if f.endswith(".py")
                 if "__pycache__" not in d]
        if files:
          packages.setdefault(entry, []).extend(files)
  return {name: sorted(files) for name, files in packages.items()}


def read_sources(packages: dict[str, list[str]], roots: list[str], max_file_bytes: int, skipped: dict
                 ) -> dict[str, list[SourceFile]]:
  """Each package's readable files; counts what it skips in `skipped` (too_large, not_utf8, empty)."""
  out = {}
  for name, paths in packages.items():
    files = []
    for path in paths:
      size = os.path.getsize(path)
      if size > max_file_bytes:
        skipped["too_large"] += 1
        continue
      with open(path, "rb") as f:
        data = f.read()
      try:
        text = data.decode("utf-8")
      except UnicodeDecodeError:
        skipped["not_utf8"] += 1
        continue
      if not text.strip():
        skipped["empty"] += 1
        continue
      root = next(r for r in roots if path.startswith(r + os.sep))
      files.append(SourceFile(name, os.path.relpath(path, root), text, hashlib.sha256(data).hexdigest()))
    if files:
      out[name] = files
  return out


def _package_bytes(files: list[SourceFile]) -> int:
  return sum(len(f.text.encode("utf-8")) for f in files)


def choose_heldout(sizes: dict[str, int], fraction: float, seed: int) -> list[str]:
  """Packages, in the fixed order of sha256(seed:name), added while the held-out bytes stay under `fraction` of all
  bytes; a package larger than that share on its own is never chosen (it would be the whole held-out set)."""
  target = fraction * sum(sizes.values())
  order = sorted(sizes, key=lambda name: hashlib.sha256(f"{seed}:{name}".encode()).hexdigest())
  chosen, total = [], 0
  for name in order:
    if total + sizes[name] <= target:
      chosen.append(name)
      total += sizes[name]
  return sorted(chosen)


def split_files(sources: dict[str, list[SourceFile]], heldout: list[str], skipped: dict
                ) -> tuple[list[SourceFile], list[SourceFile]]:
  """(train, heldout) files with exact duplicates removed: the first copy in train is kept; a held-out file whose
  contents occur in train, or earlier in held-out, is dropped."""
  seen = set()

  def first_copies(names):
    kept = []
    for f in (f for name in sorted(names) for f in sources[name]):
      if f.sha256 in seen:
        skipped["duplicate"] += 1
      else:
        seen.add(f.sha256)
        kept.append(f)
    return kept

  train = first_copies(set(sources) - set(heldout))
  return train, first_copies(heldout)


def _record(f: SourceFile) -> str:
  return json.dumps({"text": f.text, "package": f.package, "path": f.path}, ensure_ascii=False) + "\n"


def write_shards(files: list[SourceFile], out: str, prefix: str, shard_bytes: int | None) -> list[dict]:
  """Writes `files` as jsonl shards PREFIX-NNNNN.jsonl (or PREFIX.jsonl when shard_bytes is None); returns
  [{path, bytes, sha256, documents}]."""
  shards, lines, size = [], [], 0

  def flush():
    name = f"{prefix}.jsonl" if shard_bytes is None else f"{prefix}-{len(shards):05d}.jsonl"
    path = os.path.join(out, name)
    with open(path, "w", encoding="utf-8") as fh:
      fh.writelines(lines)
    shards.append({"path": name, "bytes": os.path.getsize(path), "sha256": sha256_file(path), "documents": len(lines)})

  for f in files:
    line = _record(f)
    lines.append(line)
    size += len(line.encode("utf-8"))
    if shard_bytes is not None and size >= shard_bytes:
      flush()
      lines, size = [], 0
  if lines or not shards:
    flush()
  return shards


def tokenizer_sample(files: list[SourceFile], max_bytes: int, seed: int) -> Iterator[str]:
  """Training texts for the tokenizer, in a fixed shuffled order (so a capped sample spans the packages)."""
  order = sorted(files, key=lambda f: hashlib.sha256(f"{seed}:{f.sha256}:{f.path}".encode()).hexdigest())
  total = 0
  for f in order:
    if total >= max_bytes:
      return
    total += len(f.text.encode("utf-8"))
    yield f.text


def _tokenizers():
  """The optional `tokenizers` package, or ValueError saying how to install it."""
  try:
    import tokenizers  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ValueError("the tokenizer needs the optional package `tokenizers` (pip install tokenizers, or the "
                     "project's test extra)") from e
  return tokenizers


def train_tokenizer(texts, vocab_size: int, path: str) -> int:
  """Byte-level BPE on `texts`, saved to `path`; returns its vocabulary size (specials included)."""
  tk = _tokenizers()
  decoders, models, pre_tokenizers, trainers = tk.decoders, tk.models, tk.pre_tokenizers, tk.trainers
  tok = tk.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer)
  tok.save(path)
  return tok.get_vocab_size(with_added_tokens=True)


def check_tokenizer(source: str) -> int:
  """The vocabulary size of a tokenizer.json built by this script. ValueError naming --tokenizer if it is missing,
  unreadable, or lacks the special tokens at ids 0, 1, 2."""
  try:
    tok = _tokenizers().Tokenizer.from_file(source)
  except Exception as e:  # pylint: disable=broad-except  # tokenizers raises its own Exception subclass
    raise ValueError(f"--tokenizer: cannot read {source!r} as a tokenizers JSON file ({e})") from e
  ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
  if ids != list(range(len(SPECIAL_TOKENS))):
    raise ValueError(f"--tokenizer: {source!r} has {dict(zip(SPECIAL_TOKENS, ids))}; a tokenizer of this script has "
                     f"{dict(zip(SPECIAL_TOKENS, range(len(SPECIAL_TOKENS))))}")
  return tok.get_vocab_size(with_added_tokens=True)


def build(out: str, *, roots: list[str] | None = None, packages: list[str] | None = None,
          heldout: list[str] | None = None, heldout_fraction: float = 0.05, seed: int = 0, vocab_size: int = 16384,
          shard_mb: float = 64.0, max_file_bytes: int = 1_000_000, tokenizer_sample_mb: float = 200.0,
          tokenizer: str | None = None) -> dict:
  """Builds the corpus into `out` and returns its manifest (also written to out/manifest.json). `tokenizer`: copy
  this tokenizer.json instead of training one.

  Raises ValueError naming the argument for an unknown package, an empty selection or an empty split."""
  roots = [os.path.realpath(r) for r in (roots or default_roots())]
  _tokenizers()  # before anything is written
  given_vocab = check_tokenizer(tokenizer) if tokenizer else None
  for r in roots:
    if not os.path.isdir(r):
      raise ValueError(f"--site-packages: {r!r} is not a directory")
  found = find_packages(roots)
  if packages:
    unknown = sorted(set(packages) - set(found))
    if unknown:
      raise ValueError(f"--packages: {unknown} are not packages with Python files under {roots}")
    found = {name: found[name] for name in packages}
  skipped = {"too_large": 0, "not_utf8": 0, "empty": 0, "duplicate": 0}
  sources = read_sources(found, roots, max_file_bytes, skipped)
  if not sources:
    raise ValueError(f"--site-packages: no readable Python sources under {roots}")
  sizes = {name: _package_bytes(files) for name, files in sources.items()}
  chosen_by = "--heldout" if heldout else f"drawn: {heldout_fraction} of the bytes, seed {seed}"
  if heldout:
    unknown = sorted(set(heldout) - set(sources))
    if unknown:
      raise ValueError(f"--heldout: {unknown} are not among the packages found ({len(sources)}; e.g. "
                       f"{sorted(sources)[:5]})")
    heldout = sorted(set(heldout))
  else:
    heldout = choose_heldout(sizes, heldout_fraction, seed)
  train, held = split_files(sources, heldout, skipped)
  if not train or not held:
    raise ValueError(f"--heldout: the split leaves {len(train)} training and {len(held)} held-out files; choose "
                     "held-out packages that leave both splits non-empty")
  os.makedirs(out, exist_ok=True)
  train_shards = write_shards(train, out, "train", int(shard_mb * 2**20))
  held_shards = write_shards(held, out, "heldout", None)
  tok_path = os.path.join(out, "tokenizer.json")
  if tokenizer:
    shutil.copyfile(tokenizer, tok_path)
    sample, vocab = [], given_vocab
  else:
    sample = list(tokenizer_sample(train, int(tokenizer_sample_mb * 2**20), seed))
    vocab = train_tokenizer(sample, vocab_size, tok_path)

  def split_summary(files, shards, names):
    return {"packages": {n: {"files": sum(f.package == n for f in files),
                             "bytes": sum(len(f.text.encode("utf-8")) for f in files if f.package == n)}
                         for n in names},
            "files": len(files), "text_bytes": sum(len(f.text.encode("utf-8")) for f in files), "shards": shards}

  manifest = {
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "python": sys.version.split()[0], "site_packages": roots, "seed": seed,
      "heldout_chosen_by": chosen_by,
      "max_file_bytes": max_file_bytes, "skipped_files": skipped,
      "train": split_summary(train, train_shards, sorted({f.package for f in train})),
      "heldout": split_summary(held, held_shards, heldout),
      "tokenizer": {"path": "tokenizer.json", "bytes": os.path.getsize(tok_path), "sha256": sha256_file(tok_path),
                    "vocab_size": vocab, "requested_vocab_size": vocab_size, "special_tokens": list(SPECIAL_TOKENS),
                    "trained_on_files": len(sample), "trained_on_bytes": sum(len(t.encode("utf-8")) for t in sample),
                    "copied_from": os.path.realpath(tokenizer) if tokenizer else None},
  }
  with open(os.path.join(out, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1)
  return manifest


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="output directory (created)")
  p.add_argument("--site-packages", default=None, help="comma-separated source roots (default: this interpreter's)")
  p.add_argument("--packages", default=None, help="comma-separated: use only these packages")
  p.add_argument("--heldout", default=None, help="comma-separated held-out packages (default: drawn, see above)")
  p.add_argument("--heldout-fraction", type=float, default=0.05, help="share of bytes drawn as held-out")
  p.add_argument("--seed", type=int, default=0, help="held-out draw and tokenizer sample order")
  p.add_argument("--vocab-size", type=int, default=16384)
  p.add_argument("--shard-mb", type=float, default=64.0, help="training shard size")
  p.add_argument("--max-file-bytes", type=int, default=1_000_000, help="larger files are skipped")
  p.add_argument("--tokenizer-sample-mb", type=float, default=200.0, help="training text the tokenizer sees, at most")
  p.add_argument("--tokenizer", default=None, help="copy this tokenizer.json (an earlier build's) instead of training")
  a = p.parse_args(argv)
  split = lambda s: [x for x in s.split(",") if x] if s else None  # noqa: E731
  checks = [(a.vocab_size >= 259 + len(SPECIAL_TOKENS), "--vocab-size", f"{a.vocab_size}", "at least 262"),
            (0 < a.heldout_fraction < 1, "--heldout-fraction", f"{a.heldout_fraction}", "in (0, 1)"),
            (a.shard_mb > 0, "--shard-mb", f"{a.shard_mb}", "positive"),
            (a.max_file_bytes > 0, "--max-file-bytes", f"{a.max_file_bytes}", "positive"),
            (a.tokenizer_sample_mb > 0, "--tokenizer-sample-mb", f"{a.tokenizer_sample_mb}", "positive")]
  for ok, name, got, want in checks:
    if not ok:
      print(f"error: {name} must be {want}; got {got}", file=sys.stderr)
      return 2
  if os.path.exists(a.out) and not os.path.isdir(a.out):
    print(f"error: --out {a.out!r} is a file; give a directory", file=sys.stderr)
    return 2
  try:
    m = build(a.out, roots=split(a.site_packages), packages=split(a.packages), heldout=split(a.heldout),
              heldout_fraction=a.heldout_fraction, seed=a.seed, vocab_size=a.vocab_size, shard_mb=a.shard_mb,
              max_file_bytes=a.max_file_bytes, tokenizer_sample_mb=a.tokenizer_sample_mb, tokenizer=a.tokenizer)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{a.out}: train {m['train']['files']} files, {m['train']['text_bytes'] / 2**20:.1f} MiB from "
        f"{len(m['train']['packages'])} packages; held-out {m['heldout']['files']} files, "
        f"{m['heldout']['text_bytes'] / 2**20:.1f} MiB from {sorted(m['heldout']['packages'])}; tokenizer "
        f"{m['tokenizer']['vocab_size']} ids; skipped {m['skipped_files']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
