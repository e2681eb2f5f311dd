"""Checkpoints with orbax: one composite checkpoint per step holding the train state and (for train.py) the data
iterator; any pytree of arrays, such as a user's `nnx.state(model)`, can be saved without one."""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

_log = logging.getLogger(__name__)


class Checkpointer:
  """Saves and restores {train state, data iterator} under `directory`/<step>.

  Orbax writes each checkpoint to a temporary directory and renames it when complete, so a crash mid-write
  leaves no checkpoint behind (and `cleanup_tmp_directories` removes the leftovers at the next start). Restore
  walks back from the newest step: one that fails to load is skipped with a warning naming it and the reason.
  """

  def __init__(self, directory: str, *, keep: int, async_save: bool):
    self._directory = directory
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any = None) -> None:
    """Starts a save (asynchronous if so configured); the iterator's position is captured now.

    state: any pytree of arrays (a train state, a user's `nnx.state(model)`); data_iterator: a grain iterator, or
    None to save the state alone."""
    start = time.perf_counter()
    items = dict(state=ocp.args.StandardSave(state))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    _log.info("checkpoint %d: save started (%.1f s blocking)", step, time.perf_counter() - start)

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    start = time.perf_counter()
    self._manager.wait_until_finished()
    if time.perf_counter() - start > 1.0:
      _log.info("checkpoint: waited %.1f s for the background save to finish", time.perf_counter() - start)

  def restore_latest(self, abstract_state: Any, data_iterator: Any = None) -> tuple[int, Any] | None:
    """Restores the newest loadable checkpoint into `abstract_state`'s shapes and shardings.

    abstract_state: a pytree of jax.ShapeDtypeStruct with `.sharding` set, so that a checkpoint written on any
    device count loads onto this run's mesh (or an abstract `nnx.State`, from `nnx.eval_shape`). The data
    iterator's state is set in place; None restores the state alone.
    Returns (step, state), or None when there is no checkpoint. Raises RuntimeError if checkpoints exist but none
    loads: starting from scratch silently would lose the run.
    """
    steps = self.steps()
    failures = []
    for step in reversed(steps):
      start = time.perf_counter()
      try:
        items = dict(state=ocp.args.StandardRestore(abstract_state))
        if data_iterator is not None:
          items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # A damaged checkpoint can fail in many ways; each is reported, then skipped.
        reason = short_reason(e)
        # One line; the traceback goes with the record (train.py shows it only in the run's train.log).
        _log.warning("checkpoint %d cannot be restored (%s; in %s); trying the previous one.", step, reason,
                     os.path.join(self._directory, str(step)), exc_info=True)
        failures.append((step, reason))
        continue
      _log.info("checkpoint %d restored in %.1f s", step, time.perf_counter() - start)
      self._set_aside([s for s, _ in failures])
      return step, restored["state"]
    if failures:
      raise RuntimeError("no checkpoint could be restored: " + "; ".join(f"step {s}: {r}" for s, r in failures))
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Moves unloadable checkpoints out of the way (never deletes them), so that their steps can be saved again."""
    if not steps or jax.process_index() != 0:
      return
    aside = os.path.join(os.path.dirname(os.path.abspath(self._directory)), "unloadable_checkpoints")
    os.makedirs(aside, exist_ok=True)
    for step in steps:
      target = os.path.join(aside, f"{step}-{int(time.time())}")
      shutil.move(os.path.join(self._directory, str(step)), target)
      _log.info("checkpoint %d moved to %s", step, target)  # the fault itself was the warning
    self._manager.reload()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def short_reason(error: BaseException) -> str:
  """`Type: first line` of an exception, without the TensorStore spec dump that orbax appends to read errors."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  text = text.split(" See full TensorStore details")[0]
  return f"{type(error).__name__}: {text}"[:240]


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
