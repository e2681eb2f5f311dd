"""The run directory: the format train.py writes and that evaluation, conversion and `train.init_from` read.

    RUN_DIR/config.json               the run's config (train.py's ml_collections config, or what gsa_jax.convert
                                      writes: model, data, train.seq_len)
    RUN_DIR/checkpoints/<step>/state  an orbax PyTree: train.py's train state {"step", "params", "opt_state",
                                      "nonfinite_in_a_row", "nonfinite_total"}, or {"params"} alone (gsa_jax.convert)
    RUN_DIR/checkpoints/<step>/data   the grain data iterator's position (train.py only)
    RUN_DIR/unloadable_checkpoints/   checkpoints that failed to restore, set aside by `Checkpointer`

(train.py also writes metrics.jsonl and train.log there: `gsa_jax.train.metrics`, `gsa_jax.train.trainer`.)
Training writes checkpoints with `Checkpointer`, an orbax CheckpointManager; every reader goes through a read-only
manager (`restore_state`, `restore_params`, `load_model`), which changes nothing on disk. Steps are orbax's own
listing, which leaves out checkpoints that were not finalized (a write cut short).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from gsa_jax.models import GSALM, GSAConfig

_log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
STATE, DATA = "state", "data"  # the items of a checkpoint step
UNLOADABLE = "unloadable_checkpoints"


# -- config.json -----------------------------------------------------------------------------------------------------


def config_path(run_dir: str) -> str:
  return os.path.join(run_dir, CONFIG_FILE)


def config_json(config: ml_collections.ConfigDict | dict) -> str:
  """The text of config.json for `config` (keys sorted; tuples as lists)."""
  items = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
  return json.dumps(items, indent=2, sort_keys=True, default=list)


def write_config(run_dir: str, config: ml_collections.ConfigDict | dict) -> None:
  """Writes config.json atomically (a crash leaves the old file or the new one, never half of one)."""
  os.makedirs(run_dir, exist_ok=True)
  path = config_path(run_dir)
  with open(path + ".tmp", "w") as f:
    f.write(config_json(config))
  os.replace(path + ".tmp", path)


def read_config(run_dir: str) -> ml_collections.ConfigDict:
  """The config a run was trained (or converted) with. FileNotFoundError without config.json; ValueError if it is
  not a JSON object."""
  path = config_path(run_dir)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: {run_dir!r} is not a run directory of train.py.")
  with open(path) as f:
    items = json.load(f)
  if not isinstance(items, dict):
    raise ValueError(f"{path} holds a {type(items).__name__}, not a JSON object of config keys.")
  return ml_collections.ConfigDict(items)


def model_config(config: ml_collections.ConfigDict) -> GSAConfig:
  """The GSAConfig of a run config's `model` section; ValueError naming `config.model.<field>` if it is not valid."""
  try:
    return GSAConfig(**config.model.to_dict())
  except ValueError as e:
    raise ValueError(str(e).replace("GSAConfig.", "config.model.", 1)) from None


# -- checkpoints: listing and reading (read-only) ---------------------------------------------------------------------


def checkpoints_dir(run_dir: str) -> str:
  return os.path.join(os.path.abspath(run_dir), CHECKPOINTS)


def checkpoint_steps(run_dir: str) -> list[int]:
  """The finalized checkpoint steps of a run directory, ascending ([] without checkpoints).

  Orbax's listing, without a CheckpointManager: it touches no JAX device, so config validation can call it before
  `jax.distributed.initialize`."""
  return sorted(ocp.step.checkpoint_steps(checkpoints_dir(run_dir)))


def resolve_step(run_dir: str, steps: list[int], step: int | None = None) -> int:
  """The newest of `steps` (the run's checkpoints), or `step` after checking that it is one of them."""
  if not steps:
    raise FileNotFoundError(f"{run_dir!r} has no checkpoint under {os.path.join(run_dir, CHECKPOINTS)}.")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise FileNotFoundError(f"{run_dir!r} has no checkpoint of step {step}; it has steps {steps}.")
  return step


class _WithoutReadOnlyNotice(logging.Filter):
  """Orbax warns "Given directory is read only" for every read-only manager: that is what we asked for."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Given directory is read only")


@contextlib.contextmanager
def _read_only_manager(run_dir: str):
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0,
                                         lightweight_initialize=True)  # steps only; no per-step metadata read
  quiet = _WithoutReadOnlyNotice()
  absl_logger = logging.getLogger("absl")
  absl_logger.addFilter(quiet)
  try:
    manager = ocp.CheckpointManager(checkpoints_dir(run_dir), options=options)
  finally:
    absl_logger.removeFilter(quiet)
  try:
    yield manager
  finally:
    manager.close()


def restore_state(run_dir: str, step: int | None = None, target: Any = None, *, partial: bool = False
                  ) -> tuple[int, Any]:
  """(step, state) of a checkpoint's `state` item: the newest step, or `step`. Writes nothing.

  target: a pytree of jax.ShapeDtypeStruct (with `.sharding` to place the arrays) giving the structure to restore;
  None restores the saved structure as saved. partial=True restores only the subtree `target` names (e.g.
  {"params": ...} of a train state; the optimizer state and the data iterator stay on disk).
  Raises FileNotFoundError when the run has no such checkpoint.
  """
  with _read_only_manager(run_dir) as manager:
    step = resolve_step(run_dir, sorted(manager.all_steps()), step)
    restore_args = None if target is None else ocp.checkpoint_utils.construct_restore_args(target)
    args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=partial)
    return step, manager.restore(step, args=ocp.args.Composite(**{STATE: args}))[STATE]


def restore_params(run_dir: str, abstract_params: Any, step: int | None = None) -> tuple[int, Any]:
  """(step, params) of a checkpoint of train.py or of gsa_jax.convert, restored into `abstract_params`
  (jax.ShapeDtypeStructs with shardings); only the parameters are read."""
  step, state = restore_state(run_dir, step, {"params": abstract_params}, partial=True)
  return step, state["params"]


def load_model(run_dir: str, step: int | None = None, **model_overrides):
  """Restores the parameters of a run's checkpoint (the newest, or `step`) into a GSALM on the default device.

  model_overrides replace fields of the model config that do not change parameter shapes (e.g. backend="recurrent",
  dtype="float32"). Returns (model, run config, step).
  """
  config = read_config(run_dir)
  for key, value in model_overrides.items():
    config.model[key] = value
  model_cfg = model_config(config)
  abstract = nnx.eval_shape(lambda: GSALM(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract, nnx.Param)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  step, params = restore_params(run_dir, abstract_with_shardings(abstract_params, device), step)
  return nnx.merge(graphdef, params), config, step


def save_params(run_dir: str, params: Any, step: int = 0) -> None:
  """Writes a checkpoint holding `{"params": params}` alone (what gsa_jax.convert produces)."""
  checkpointer = Checkpointer(checkpoints_dir(run_dir), keep=1, async_save=False)
  try:
    checkpointer.save(step, {"params": params})
  finally:
    checkpointer.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """jax.ShapeDtypeStructs of `tree`'s leaves placed by `shardings` (a matching tree, or one sharding for all)."""
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# -- checkpoints: training (read-write) -------------------------------------------------------------------------------


def save_policy(every_steps: int, last_step: int | None = None, every_minutes: float = 0.0
                ) -> ocp.checkpoint_managers.SaveDecisionPolicy:
  """When `Checkpointer.save` writes: every `every_steps` steps, at `last_step`, and (every_minutes > 0) when that
  long has passed since the newest checkpoint (decided on process 0 and shared, so all processes agree; a run
  without checkpoints saves at its first step; skipped while a save is still being written)."""
  policies = [ocp.checkpoint_managers.FixedIntervalPolicy(every_steps)]
  if last_step is not None:
    policies.append(ocp.checkpoint_managers.SpecificStepsPolicy((last_step,)))
  if every_minutes > 0:
    policies.append(ocp.checkpoint_managers.ContinuousCheckpointingPolicy(
        minimum_interval_secs=max(1, round(60 * every_minutes))))
  # On preemption train.py forces the save itself (`save(..., force=True)`): orbax's PreemptionCheckpointingPolicy
  # reads JAX's preemption sync manager, which only a jax.distributed job has, so a single process never sees it.
  return ocp.checkpoint_managers.AnySavePolicy(policies)


class CheckpointRestoreError(RuntimeError):
  """A run has checkpoints and none of them loads (each failure was logged with its traceback)."""


class Checkpointer:
  """Saves and restores {train state, data iterator} under `directory`/<step>.

  Orbax writes each checkpoint to a temporary directory and renames it when complete, so a crash mid-write
  leaves no checkpoint behind (and `cleanup_tmp_directories` removes the leftovers at the next start). Restore
  walks back from the newest step: one that fails to load is skipped with a warning naming it and the reason.
  """

  def __init__(self, directory: str, *, keep: int, async_save: bool,
               policy: ocp.checkpoint_managers.SaveDecisionPolicy | None = None):
    """keep: the newest checkpoints kept; policy: at which steps `save` writes (`save_policy`; None: at every call)."""
    self._directory, self._save_every_call = directory, policy is None
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep), save_decision_policy=policy, create=True,
        cleanup_tmp_directories=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(directory, options=options, item_names=(STATE, DATA))

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any = None, *, force: bool = False) -> bool:
    """Starts a save (asynchronous if so configured) if the policy asks for one at `step`, or `force`; the
    iterator's position is captured now. Returns whether a save started.

    state: any pytree of arrays (a train state, a user's `nnx.state(model)`); data_iterator: a grain iterator, or
    None to save the state alone."""
    start = time.perf_counter()
    items = {STATE: ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force or self._save_every_call)
    if saved:
      _log.info("checkpoint %d: save started (%.1f s blocking)", step, time.perf_counter() - start)
    return saved

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
    Returns (step, state), or None when there is no checkpoint. Raises CheckpointRestoreError if checkpoints exist
    but none loads: starting from scratch silently would lose the run.
    """
    failures = []
    for step in reversed(self.steps()):
      start = time.perf_counter()
      try:
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
          items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
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
      return step, restored[STATE]
    if failures:
      raise CheckpointRestoreError("no checkpoint could be restored: "
                                   + "; ".join(f"step {s}: {r}" for s, r in failures))
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Moves unloadable checkpoints out of the way (never deletes them), so that their steps can be saved again."""
    if not steps or jax.process_index() != 0:
      return
    aside = os.path.join(os.path.dirname(os.path.abspath(self._directory)), UNLOADABLE)
    os.makedirs(aside, exist_ok=True)
    for step in steps:
      target = os.path.join(aside, f"{step}-{int(time.time())}")
      shutil.move(os.path.join(self._directory, str(step)), target)
      _log.info("checkpoint %d moved to %s", step, target)  # the fault itself was the warning
    self._manager.reload()

  def close(self) -> None:
    """Waits for started saves, then releases orbax's threads (call it, or use the Checkpointer as a context
    manager: an unclosed one leaves orbax's background tasks to fail noisily at interpreter exit)."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def short_reason(error: BaseException) -> str:
  """`Type: first line` of an exception, without the TensorStore spec dump that orbax appends to read errors."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  text = text.split(" See full TensorStore details")[0]
  return f"{type(error).__name__}: {text}"[:240]
