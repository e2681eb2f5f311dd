"""`evaluate(run_dir, task, data_path, ...)`: load a checkpoint and its tokenizer, read the data, score, report."""

from __future__ import annotations

import os
import time

from gsa_jax.eval import data as data_lib
from gsa_jax.eval import tasks
from gsa_jax.eval.scoring import Scorer

TASKS = ("perplexity", "multiple_choice", "lambada")


def load_examples(task: str, path: str, *, max_examples: int | None = None, text_field: str = "text",
                  txt_document: str = "line", context_template: str = "{context}"):
  """The parsed data of a task (documents, MultipleChoiceExamples or (context, word) pairs); DataError if bad."""
  if task == "perplexity":
    return data_lib.read_documents(path, text_field=text_field, txt_document=txt_document, max_examples=max_examples)
  records = data_lib.read_jsonl(path, max_examples)
  if task == "multiple_choice":
    return [data_lib.parse_multiple_choice(obj, f"{path} line {n}", context_template) for n, obj in records]
  if task == "lambada":
    return [data_lib.parse_lambada(obj, f"{path} line {n}") for n, obj in records]
  raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def run_task(task: str, scorer: Scorer, tokenizer, examples, *, add_bos: bool = True) -> dict:
  fn = {"perplexity": tasks.perplexity, "multiple_choice": tasks.multiple_choice, "lambada": tasks.lambada}[task]
  return fn(scorer, tokenizer, examples, add_bos=add_bos)


def evaluate(run_dir: str, task: str, data_path: str, *, step: int | None = None, batch_size: int = 8,
             max_length: int | None = None, max_examples: int | None = None, backend: str | None = None,
             text_field: str = "text", txt_document: str = "line", context_template: str = "{context}",
             progress: bool = True) -> dict:
  """Scores the checkpoint of `run_dir` (train.py's workdir) on a task; returns the results as a JSON-able dict.

  The data is read and checked before the model is loaded, so a bad file fails in a second. Raises
  FileNotFoundError for a missing run directory or checkpoint, ValueError (DataError, TokenizerLoadError) for
  unusable data, an unknown task or a tokenizer that cannot be loaded.
  """
  # Imported here: the checkpoint loader pulls in orbax, which `--help` and data errors do not need.
  from gsa_jax.data import load_tokenizer  # pylint: disable=import-outside-toplevel
  from gsa_jax.run_dir import load_model, read_config  # pylint: disable=import-outside-toplevel

  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
  if not os.path.isdir(run_dir):
    raise FileNotFoundError(f"run directory {run_dir!r} does not exist")
  config = read_config(run_dir)
  if config.data.source != "text":
    # An MQAR run has no tokenizer for text: its ids are synthetic. Scoring text with it would be meaningless.
    raise ValueError(f"{run_dir!r} was trained on data.source={config.data.source!r}; text tasks need a run "
                     "trained on text (data.source='text') so that its tokenizer applies")
  examples = load_examples(task, data_path, max_examples=max_examples, text_field=text_field,
                           txt_document=txt_document, context_template=context_template)
  tokenizer = load_tokenizer(config.data.tokenizer, config.data.bos_id, config.data.eos_id)
  overrides = {"backend": backend} if backend else {}
  start = time.perf_counter()
  model, config, step = load_model(run_dir, step, **overrides)
  max_length = max_length or int(config.train.seq_len)
  scorer = Scorer.for_model(model, batch_size=batch_size, max_length=max_length, progress=progress)
  metrics = run_task(task, scorer, tokenizer, examples, add_bos=bool(config.data.add_bos))
  return {"task": task, "metrics": metrics, "checkpoint": os.path.abspath(run_dir), "step": int(step),
          "data": os.path.abspath(data_path), "tokenizer": config.data.tokenizer, "max_length": max_length,
          "batch_size": batch_size, "backend": config.model.backend, "num_params": model.config.num_params(),
          "elapsed_s": round(time.perf_counter() - start, 3)}
