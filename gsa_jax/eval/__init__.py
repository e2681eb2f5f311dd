"""Evaluation of trained checkpoints: perplexity, multiple-choice log-likelihood scoring, LAMBADA last-word accuracy.

    python -m gsa_jax.eval --checkpoint RUN_DIR --task perplexity --data heldout.txt

From Python: `evaluate(run_dir, task, data_path)`; or with a model in hand,
`run_task(task, Scorer.for_model(model, max_length=...), tokenizer, load_examples(task, path))`.
"""

from gsa_jax.eval.api import TASKS, evaluate, load_examples, run_task
from gsa_jax.eval.data import DataError, MultipleChoiceExample
from gsa_jax.eval.scoring import Request, Scorer, Scores

__all__ = ["DataError", "MultipleChoiceExample", "Request", "Scorer", "Scores", "TASKS", "evaluate",
           "load_examples", "run_task"]
