"""Evaluate a train.py checkpoint: `python -m gsa_jax.eval --checkpoint RUN_DIR --task TASK --data FILE`.

    python -m gsa_jax.eval --checkpoint runs/tiny --task perplexity --data heldout.txt
    python -m gsa_jax.eval --checkpoint runs/tiny --task multiple_choice --data piqa.jsonl --output piqa.json
    python -m gsa_jax.eval --checkpoint runs/tiny --task lambada --data lambada.jsonl --batch-size 16

Tasks: perplexity (a .txt file, one document per non-empty line or --txt-document file, or .jsonl with a "text"
field), multiple_choice (jsonl; layouts in gsa_jax/eval/data.py), lambada (jsonl {"text": ...}). The tokenizer is
the run's (`data.tokenizer` of its config.json). The results JSON is printed on stdout (and written to --output);
progress goes to stderr. Exit codes: 0 done, 2 bad arguments, missing run/checkpoint or unusable data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from gsa_jax.eval.api import TASKS, evaluate


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m gsa_jax.eval", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True, help="run directory of train.py (holds config.json, checkpoints/)")
  p.add_argument("--task", required=True, choices=TASKS)
  p.add_argument("--data", required=True, help="the evaluation file")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
  p.add_argument("--max-length", type=int, default=None,
                 help="tokens per sequence; longer contexts are cut from the left (default: the run's train.seq_len)")
  p.add_argument("--max-examples", type=int, default=None, help="use only the first N documents / examples")
  p.add_argument("--output", default=None, help="also write the results JSON to this file")
  p.add_argument("--backend", default=None, help="override model.backend (e.g. recurrent, chunked, auto)")
  p.add_argument("--text-field", default="text", help="perplexity on jsonl: the field holding the text")
  p.add_argument("--txt-document", choices=("line", "file"), default="line",
                 help="perplexity on a text file: one document per non-empty line, or the whole file")
  p.add_argument("--context-template", default="{context}",
                 help='multiple_choice: how the context is shown, e.g. "Question: {context}\\nAnswer:"')
  p.add_argument("--quiet", action="store_true", help="no progress line")
  a = p.parse_args(argv)
  for name in ("batch_size", "max_length", "max_examples"):
    value = getattr(a, name)
    if value is not None and value < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
  if "{context}" not in a.context_template:
    p.error("--context-template must contain {context}")
  if a.output and _output_error(a.output):
    print(f"error: {_output_error(a.output)}", file=sys.stderr)
    return 2
  try:
    results = evaluate(a.checkpoint, a.task, a.data, step=a.step, batch_size=a.batch_size, max_length=a.max_length,
                       max_examples=a.max_examples, backend=a.backend, text_field=a.text_field,
                       txt_document=a.txt_document, context_template=a.context_template, progress=not a.quiet)
  except (FileNotFoundError, ValueError) as e:  # DataError, TokenizerLoadError, ConfigError are ValueErrors
    print(f"error: {e}", file=sys.stderr)
    return 2
  text = json.dumps(results, indent=2)
  print(text, flush=True)  # first, so that the results survive a failing write
  if a.output:
    try:
      os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
      with open(a.output, "w") as f:
        f.write(text + "\n")
    except OSError as e:
      print(f"error: --output {a.output!r}: cannot write ({e.strerror or e}); the results are above", file=sys.stderr)
      return 2
  return 0


def _output_error(path: str) -> str | None:
  """Why the results could not be written to `path` (checked before the evaluation runs), or None."""
  if os.path.isdir(path):
    return f"--output {path!r} is a directory; give a file path for the results JSON"
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    return f"--output {path!r} lies under {parent!r}, which is a file"
  if not os.access(parent, os.W_OK | os.X_OK):
    return f"--output {path!r}: cannot write in {parent!r} (permission denied)"
  return None


if __name__ == "__main__":
  sys.exit(main())
