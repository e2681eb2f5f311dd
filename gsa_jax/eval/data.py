"""Reading evaluation files: text documents, multiple-choice and LAMBADA jsonl, with errors that name the line.

Multiple-choice layouts accepted (one JSON object per line; `--context-template` may wrap the context):
  generic      {"context"|"query"|"question"|"ctx"|"goal": str, "choices"|"endings"|"options": [str, ...],
                "label"|"gold"|"answer"|"answerKey": int | "2" | "B" | the correct choice's text}
  PIQA         {"goal", "sol1", "sol2", "label": 0-based}
  ARC (HF)     {"question": str, "choices": {"text": [...], "label": ["A", ...]}, "answerKey": "A"}
  ARC/OBQA     {"question": {"stem": str, "choices": [{"text", "label"}, ...]}, "answerKey": "A"}
  WinoGrande   {"sentence": "... _ ...", "option1", "option2", "answer": "1" | "2" (1-based)}: partial scoring,
               as lm-eval-harness does it: the context is the sentence up to "_" with the option filled in, the
               scored continuation is the rest of the sentence, the same for every option (the context template
               is not applied: the context ends mid-sentence).
A label that is an int (or a string of digits) is a 0-based index, except in the option1/option2 layout, where it is
1-based as in WinoGrande; a letter is looked up among the choices' labels (or A = 0, B = 1, ...); any other string
must equal one of the choices.
"""

from __future__ import annotations

import dataclasses
import json
import os
import string

CONTEXT_KEYS = ("context", "query", "question", "ctx", "goal")
CHOICE_KEYS = ("choices", "endings", "options")
LABEL_KEYS = ("label", "gold", "answer", "answerKey")


class DataError(ValueError):
  """An evaluation file that cannot be used; the message names the file and, for a bad record, the line."""


def _check_file(path: str) -> None:
  if not os.path.exists(path):
    raise DataError(f"data file {path!r} does not exist")
  if not os.path.isfile(path):
    raise DataError(f"{path!r} is not a file")
  if os.path.getsize(path) == 0:
    raise DataError(f"data file {path!r} is empty")


def _check_utf8(path: str) -> None:
  """DataError naming the file, byte offset and line of the first byte that is not UTF-8 (as train.py does)."""
  from gsa_jax.data.sources import utf8_errors  # pylint: disable=import-outside-toplevel

  count, first = utf8_errors(path)
  if count:
    with open(path, "rb") as f:
      line = f.read(first).count(b"\n") + 1
    raise DataError(f"{path!r} is not UTF-8: byte offset {first} (line {line}), {count} such byte(s) in all; "
                    "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)")


def read_jsonl(path: str, max_examples: int | None = None) -> list[tuple[int, dict]]:
  """(line number, object) for every non-blank line, stopping after max_examples objects."""
  _check_file(path)
  _check_utf8(path)
  records = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if max_examples is not None and len(records) >= max_examples:
        break
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path} line {line_no}: not valid JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(obj, dict):
        raise DataError(f"{path} line {line_no}: expected a JSON object, got {type(obj).__name__}")
      records.append((line_no, obj))
  if not records:
    raise DataError(f"data file {path!r} has no records (only blank lines)")
  return records


def read_documents(path: str, *, text_field: str = "text", txt_document: str = "line",
                   max_examples: int | None = None) -> list[str]:
  """Documents of a .jsonl/.json-lines file (field `text_field`) or of a text file (one per non-empty line, or the
  whole file with txt_document="file")."""
  if path.endswith((".jsonl", ".json")):
    docs = []
    for line_no, obj in read_jsonl(path, max_examples):
      text = obj.get(text_field)
      if not isinstance(text, str):
        raise DataError(f"{path} line {line_no}: expected a string field {text_field!r}; the object has keys "
                        f"{sorted(obj)}")
      docs.append(text)
  else:
    _check_file(path)
    _check_utf8(path)
    if txt_document not in ("line", "file"):
      raise DataError(f"txt_document must be 'line' or 'file', got {txt_document!r}")
    with open(path, encoding="utf-8") as f:
      text = f.read()
    docs = [text] if txt_document == "file" else [line for line in text.splitlines() if line.strip()]
    docs = docs[:max_examples] if max_examples is not None else docs
  docs = [d for d in docs if d]
  if not docs:
    raise DataError(f"data file {path!r} has no non-empty documents")
  return docs


@dataclasses.dataclass(frozen=True)
class MultipleChoiceExample:
  """One question: contexts[i] + continuations[i] is choice i; `label` the correct index; `norm_lengths[i]` the
  character count that acc_norm divides choice i's log-likelihood by (the choice text, as lm-eval-harness)."""

  contexts: tuple[str, ...]
  continuations: tuple[str, ...]
  label: int
  norm_lengths: tuple[int, ...]


def _first(obj: dict, keys, where: str, what: str):
  for key in keys:
    if key in obj:
      return key, obj[key]
  raise DataError(f"{where}: no {what} field (looked for {', '.join(keys)}); the object has keys {sorted(obj)}")


def _choices(obj: dict, where: str) -> tuple[list[str], list[str] | None]:
  """(choice texts, choice labels or None)."""
  question = obj.get("question")
  if isinstance(question, dict) and "choices" in question:
    raw = question["choices"]
  elif "sol1" in obj:
    raw = [obj[k] for k in ("sol1", "sol2", "sol3", "sol4") if k in obj]
  else:
    _, raw = _first(obj, CHOICE_KEYS, where, "choices")
  labels = None
  if isinstance(raw, dict):  # HF ARC: {"text": [...], "label": [...]}
    if not isinstance(raw.get("text"), list):
      raise DataError(f"{where}: choices given as an object need a 'text' list")
    labels = raw.get("label")
    raw = raw["text"]
  elif isinstance(raw, list) and raw and all(isinstance(c, dict) for c in raw):  # [{"text", "label"}, ...]
    if not all("text" in c for c in raw):
      raise DataError(f"{where}: every choice object needs a 'text' field")
    labels = [c.get("label") for c in raw]
    raw = [c["text"] for c in raw]
  if not isinstance(raw, list) or len(raw) < 2 or not all(isinstance(c, str) for c in raw):
    raise DataError(f"{where}: choices must be a list of at least 2 strings, got {raw!r}")
  if any(not c for c in raw):
    raise DataError(f"{where}: a choice is empty")
  if labels is not None and (len(labels) != len(raw) or not all(isinstance(l, str) for l in labels)):
    labels = None
  return raw, labels


def _label(value, choices: list[str], labels: list[str] | None, one_based: bool, where: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, str)):
    raise DataError(f"{where}: the label must be an int or a string, got {value!r}")
  index = None
  if isinstance(value, str) and labels is not None and value.strip() in labels:
    index = labels.index(value.strip())
  elif isinstance(value, int) or value.strip().isdigit():
    index = int(value) - (1 if one_based else 0)
  elif len(value.strip()) == 1 and value.strip() in string.ascii_uppercase:
    index = string.ascii_uppercase.index(value.strip())
  elif value in choices:
    index = choices.index(value)
  if index is None or not 0 <= index < len(choices):
    raise DataError(f"{where}: label {value!r} does not name one of the {len(choices)} choices"
                    + (" (option1/option2 labels are 1-based)" if one_based else ""))
  return index


def _continuation(context: str, choice: str) -> str:
  """The choice as it follows the context: one space between them unless either side already has whitespace."""
  if not context or context[-1].isspace() or choice[0].isspace():
    return choice
  return " " + choice


def parse_multiple_choice(obj: dict, where: str, context_template: str = "{context}") -> MultipleChoiceExample:
  if "sentence" in obj and "option1" in obj:  # WinoGrande: partial scoring
    sentence = obj["sentence"]
    if not isinstance(sentence, str) or sentence.count("_") != 1:
      raise DataError(f"{where}: a WinoGrande sentence must be a string with exactly one '_'")
    options = [obj[k] for k in ("option1", "option2", "option3") if k in obj]
    if len(options) < 2 or not all(isinstance(o, str) and o for o in options):
      raise DataError(f"{where}: option1 and option2 must be non-empty strings")
    _, value = _first(obj, LABEL_KEYS, where, "label")
    label = _label(value, options, None, True, where)
    cut = sentence.index("_")
    rest = sentence[cut + 1:].strip()
    if not rest:
      raise DataError(f"{where}: nothing follows '_' in the sentence, so there is nothing to score")
    # No context template here: the context is a sentence cut in the middle, not a question.
    contexts = tuple(sentence[:cut] + o for o in options)
    continuation = " " + rest
    return MultipleChoiceExample(contexts, (continuation,) * len(options), label, (len(continuation),) * len(options))

  question = obj.get("question")
  if isinstance(question, dict):  # ARC / OpenBookQA original: {"question": {"stem", "choices"}}
    context = question.get("stem")
  else:
    _, context = _first(obj, CONTEXT_KEYS, where, "context")
  if not isinstance(context, str):
    raise DataError(f"{where}: the context must be a string, got {context!r}")
  choices, labels = _choices(obj, where)
  _, value = _first(obj, LABEL_KEYS, where, "label")
  label = _label(value, choices, labels, False, where)
  context = context_template.format(context=context)
  continuations = tuple(_continuation(context, c) for c in choices)
  return MultipleChoiceExample((context,) * len(choices), continuations, label, tuple(len(c) for c in choices))


def parse_lambada(obj: dict, where: str) -> tuple[str, str]:
  """(context, continuation): the text up to its last space, and " " + the last word."""
  text = obj.get("text")
  if not isinstance(text, str):
    raise DataError(f"{where}: expected a string field 'text'; the object has keys {sorted(obj)}")
  text = text.rstrip()
  if " " not in text.strip():
    raise DataError(f"{where}: the text needs at least two words (context and the word to predict)")
  context, word = text.rsplit(" ", 1)
  return context, " " + word
