"""`train_and_evaluate(config)`: the pretraining loop behind train.py."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from gsa_jax import run_dir as run_dir_lib
from gsa_jax.data import make_iterator
from gsa_jax.models import GSALM, GSAConfig
from gsa_jax.train import sharding as shd
from gsa_jax.train.config import (ConfigError, check_mesh, describe_differences, differing_keys,
                                  model_flops_per_token, overwrite_deletes_the_saved_run, validate_config)
from gsa_jax.train.loss import chunked_cross_entropy_sums, cross_entropy_sums
from gsa_jax.train.metrics import MetricsWriter, console_line, peak_flops, read_jsonl
from gsa_jax.train.optimizer import learning_rate_schedule, make_optimizer

_log = logging.getLogger(__name__)

EXIT_NONFINITE = 3  # the run stopped on non-finite values (train.nonfinite)
EXIT_SIGTERM = 143  # the run saved and stopped on SIGTERM (128 + 15, as a shell reports it)
EXIT_SIGINT = 130  # the run saved and stopped on Ctrl-C (SIGINT: 128 + 2)
EXIT_NO_CHECKPOINT = 4  # the run has checkpoints and none loads (nothing deleted or moved; see train.log)


class NonFiniteError(RuntimeError):
  pass


class Preempted(Exception):
  """The run saved its step and stopped on a signal: `exit_code` is EXIT_SIGTERM or EXIT_SIGINT."""

  def __init__(self, step: int, exit_code: int = EXIT_SIGTERM):
    super().__init__(step, exit_code)
    self.step, self.exit_code = step, exit_code


def maybe_initialize_distributed() -> None:
  """Joins a multi-process job when the environment describes one (coordinator address, SLURM, TPU pod)."""
  multi = (os.environ.get("JAX_COORDINATOR_ADDRESS") or int(os.environ.get("SLURM_NTASKS", "1")) > 1
           or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""))
  if multi and not jax.distributed.is_initialized():
    # jax reads JAX_COORDINATOR_ADDRESS itself, but the process count and id only from a detected cluster
    # (SLURM, TPU, Open MPI, k8s): JAX_NUM_PROCESSES / JAX_PROCESS_ID give them explicitly anywhere else.
    count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
    jax.distributed.initialize(num_processes=int(count) if count else None, process_id=int(index) if index else None)


def check_workdir(config: ml_collections.ConfigDict) -> bool:
  """Raises ConfigError for a workdir that cannot hold this run; returns whether an old run must be deleted first.

  Refused: a path that is (or lies under) a file, a directory this process cannot write, a directory holding a
  different run or foreign files (unless config.overwrite). Writes nothing. Every process calls it: it returns
  once all have checked (so none sees the directory after process 0 changed it).
  """
  start_over = _workdir_start_over(config)
  # Also the first collective of a multi-process run: here the processes are still in step (a first collective
  # reached far apart, e.g. after compiling, can time out while the processes set up their connections).
  _barrier("workdir checked")
  return start_over


def _workdir_start_over(config: ml_collections.ConfigDict) -> bool:
  workdir = config.workdir
  existing = workdir
  while existing and not os.path.exists(existing):  # the nearest existing ancestor is what must be writable
    existing = os.path.dirname(existing.rstrip(os.sep)) or "."
  if not os.path.isdir(existing):
    raise ConfigError(f"config.workdir: {workdir!r} " + ("is a file" if existing == workdir else
                      f"lies under {existing!r}, which is a file") + "; give a directory path.")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ConfigError(f"config.workdir: cannot write {existing!r} (permission denied); give a writable directory.")
  saved_path = run_dir_lib.config_path(workdir)
  if os.path.exists(saved_path):
    try:
      saved = run_dir_lib.read_config(workdir).to_dict()
    except (OSError, ValueError) as e:
      raise ConfigError(f"config.workdir: cannot read {saved_path!r} ({e}); repair or move that file, or use "
                        "--config.overwrite=True to delete that run.") from None
    keys = differing_keys(saved, config)
    if keys and not config.overwrite:
      unsaved = "" if run_dir_lib.checkpoint_steps(workdir) else (
          " It saved no checkpoint, so only its logs would be lost.")
      raise ConfigError(
          f"workdir {workdir!r} holds a run with a different config ({describe_differences(saved, config, keys)})."
          f"{unsaved} Use another --config.workdir, or --config.overwrite=True to delete that run and start over.")
    if not keys and config.overwrite and jax.process_index() == 0:
      # A requeued job reruns its command: overwrite must not delete the run it is meant to continue.
      _log.warning("config.overwrite=True: %s holds a run of this same config, so it resumes (overwrite deletes "
                   "only a different run; delete the directory to start this one over).", workdir)
    return bool(keys)
  if os.path.isdir(workdir) and os.listdir(workdir):
    if not config.overwrite:
      raise ConfigError(f"workdir {workdir!r} is not empty and holds no config.json (not a run of this trainer). "
                        "Use another --config.workdir, or --config.overwrite=True to delete its contents.")
    return True
  return False


def prepare_workdir(config: ml_collections.ConfigDict, start_over: bool | None = None) -> None:
  """Deletes the old run if `start_over` (default: what `check_workdir` says) and writes config.json (process 0).

  Call it only once the new run has proven it can start: an overwritten run is gone afterwards.
  """
  if start_over is None:
    start_over = check_workdir(config)
  if jax.process_index() == 0:
    try:
      _write_workdir(config, start_over)
    except OSError as e:  # e.g. a read-only file system, a full disk
      raise ConfigError(f"config.workdir: cannot write {config.workdir!r}: {e.strerror or e}.") from None
  _barrier("workdir written")  # no process goes on before it is written


def past_end_step(config: ml_collections.ConfigDict) -> int | None:
  """The newest checkpoint step of the run in config.workdir when it is >= train.steps (nothing left to do).

  None when there is no such run, or when the workdir will be overwritten.
  """
  if not os.path.exists(run_dir_lib.config_path(config.workdir)) or overwrite_deletes_the_saved_run(config):
    return None
  steps = run_dir_lib.checkpoint_steps(config.workdir)
  return steps[-1] if steps and steps[-1] >= config.train.steps else None


def _stretched_schedule(config: ml_collections.ConfigDict) -> str | None:
  """A resumed run whose train.steps changed gets a cosine schedule of the new length (the learning rate jumps at
  the resumed step): the warning to give, with both rates, so that the jump is a choice, not a surprise."""
  if not os.path.exists(run_dir_lib.config_path(config.workdir)) or jax.process_index() != 0:
    return None
  steps = run_dir_lib.checkpoint_steps(config.workdir)
  saved = run_dir_lib.read_config(config.workdir)
  if not steps or saved.train.steps == config.train.steps:
    return None
  at = steps[-1]
  before = float(learning_rate_schedule(saved.optim, saved.train.steps)(at))
  after = float(learning_rate_schedule(config.optim, config.train.steps)(at))
  if np.isclose(before, after, rtol=1e-3, atol=0.0):
    return None
  return (f"train.steps changed from {saved.train.steps} to {config.train.steps}: the learning-rate schedule "
          f"(warm-up + cosine over train.steps) is stretched, so at the resumed step {at} the learning rate goes "
          f"from {before:.3g} to {after:.3g}.")


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _write_workdir(config: ml_collections.ConfigDict, start_over: bool) -> None:
  if start_over:
    _log.warning("config.overwrite=True: deleting the run in %s", config.workdir)
    shutil.rmtree(config.workdir)
  run_dir_lib.write_config(config.workdir, config)


def _loss_sums(graphdef, params, batch, constrain=lambda x, axes: x, loss_chunk: int = 0):
  """Summed cross-entropy, target count and correct predictions over a batch's loss_mask.

  constrain(x, logical_axes) places an activation on the mesh (identity without one). loss_chunk > 0 computes the
  logits that many positions at a time (`gsa_jax.train.loss.chunked_cross_entropy_sums`); 0 holds them all.
  """
  model = nnx.merge(graphdef, params)
  logits_fn = lambda hidden: constrain(model.logits(hidden), shd.LOGITS_AXES)  # float32 [b, t, vocab]
  hidden = model.hidden_states(batch["tokens"], batch["segment_ids"])
  targets, mask = batch["targets"], batch["loss_mask"]
  if loss_chunk:
    total, correct = chunked_cross_entropy_sums(logits_fn, hidden, targets, mask, loss_chunk)
  else:
    total, correct = cross_entropy_sums(logits_fn(hidden), targets, mask)
  return total, (jnp.sum(mask.astype(jnp.float32)), correct)


def activation_constraint(mesh):
  """constrain(x, logical_axes) for `_loss_sums`: pins an activation's sharding by the logical-axis rules."""
  def constrain(x, axes):
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, shd.logical_spec(axes, x.shape, mesh)))

  return constrain


def under_mesh(mesh, fn):
  """`fn` traced with `mesh` as the current mesh: the layers split T over its sequence axis when it has one
  (gsa_jax.layers.context_parallel)."""
  def traced(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)

  return traced


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule, grad_accum_steps: int,
                    constrain=lambda x, axes: x, loss_chunk: int = 0):
  """(state, batch) -> (state, metrics). The batch is split into micro-batches whose gradients are summed, so the
  result does not depend on grad_accum_steps. A step whose loss or gradient is not finite leaves params and
  optimizer state unchanged and increments the non-finite counters."""
  grad_fn = jax.value_and_grad(lambda p, b: _loss_sums(graphdef, p, b, constrain, loss_chunk), has_aux=True)

  def train_step(state, batch):
    params = state["params"]
    # Micro-batch i holds rows i, i + A, i + 2A, ... (A = grad_accum_steps): each device's contiguous rows of the
    # batch then hold its share of every micro-batch, so nothing moves, and every micro-batch is split over all the
    # batch devices (a plain reshape into A blocks let XLA split the accumulation axis over devices instead, and
    # each device computed the whole batch's worth of work, with gathers). Gradients are sums: any split is exact.
    micro = jax.tree.map(lambda x: constrain(jnp.swapaxes(x.reshape(-1, grad_accum_steps, *x.shape[1:]), 0, 1),
                                             (None, "batch", "length")), batch)

    def accumulate(carry, mb):
      (total, (count, correct)), grads = grad_fn(params, mb)
      return jax.tree.map(jnp.add, carry, (grads, total, count, correct)), None

    zeros = (jax.tree.map(jnp.zeros_like, params), 0.0, 0.0, 0.0)
    (grads, total, count, correct), _ = jax.lax.scan(accumulate, zeros, micro)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = total / denom
    grad_norm = optax.tree.norm(grads)
    # Not optax.apply_if_finite: it looks at the gradients only (a NaN loss with finite gradients passes), applies
    # the update after max_consecutive_errors where we stop, and keeps its counters in opt_state (a new layout).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new = {"params": optax.apply_updates(params, updates), "opt_state": opt_state}
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new,
                       {"params": params, "opt_state": state["opt_state"]})
    new["step"] = state["step"] + 1
    new["nonfinite_in_a_row"] = jnp.where(finite, 0, state["nonfinite_in_a_row"] + 1)
    new["nonfinite_total"] = state["nonfinite_total"] + (~finite).astype(jnp.int32)
    metrics = {
        "loss": loss, "grad_norm": grad_norm, "accuracy": correct / denom, "learning_rate": schedule(state["step"]),
        "finite": finite, "nonfinite_in_a_row": new["nonfinite_in_a_row"], "nonfinite_total": new["nonfinite_total"],
        # One flag per parameter, so that an abort can name the first parameter with a non-finite gradient.
        "grads_finite": jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]),
    }
    return new, metrics

  return train_step


def make_eval_step(graphdef, constrain=lambda x, axes: x, loss_chunk: int = 0):
  def eval_step(params, batch):
    total, (count, correct) = _loss_sums(graphdef, params, batch, constrain, loss_chunk)
    return {"total": total, "count": count, "correct": correct}

  return eval_step


@contextlib.contextmanager
def _config_set(name: str, value: Any):
  """jax.config's `name` set to `value` inside the block, put back after it.

  JAX's scoped form of a flag is private (jax._src.config); the public `jax.config.update` sets it for the process,
  so it is undone here. Flags that change compiled code are part of the jit cache key: a function compiled inside
  the block is not reused outside it."""
  before = getattr(jax.config, name)
  jax.config.update(name, value)
  try:
    yield
  finally:
    jax.config.update(name, before)


class TrainRun:
  """One training run's compiled pieces: mesh, optimizer, shardings, the jitted train and eval steps, iterators.

  Shared by `train_and_evaluate` and `benchmarks/bench_train.py`, so the benchmark times the exact train step.
  """

  def __init__(self, config: ml_collections.ConfigDict, model_cfg: GSAConfig, mesh_shape):
    self.config, self.model_cfg = config, model_cfg
    self.mesh = shd.make_mesh(mesh_shape)
    self.process_batch = config.train.batch_size // jax.process_count()
    # A text corpus with eval_fraction 0 has no eval split: such a run never evaluates.
    self.has_eval = not (config.data.source == "text" and config.data.eval_fraction == 0)
    self.tx = make_optimizer(config.optim, config.train.steps)
    self.schedule = learning_rate_schedule(config.optim, config.train.steps)
    seed = config.train.seed

    def init_state():
      params = nnx.state(GSALM(model_cfg, rngs=nnx.Rngs(seed)), nnx.Param)
      zero = jnp.zeros((), jnp.int32)
      return {"step": zero, "params": params, "opt_state": self.tx.init(params), "nonfinite_in_a_row": zero,
              "nonfinite_total": zero}

    self.graphdef = nnx.graphdef(nnx.eval_shape(lambda: GSALM(model_cfg, rngs=nnx.Rngs(seed))))
    abstract = jax.eval_shape(init_state)
    param_sh = shd.param_shardings(abstract["params"], self.mesh)
    rep = shd.replicated(self.mesh)
    self.state_shardings = {
        "step": rep, "params": param_sh, "nonfinite_in_a_row": rep, "nonfinite_total": rep,
        "opt_state": optax.tree_map_params(self.tx, lambda _, s: s, abstract["opt_state"], param_sh,
                                           transform_non_params=lambda _: rep),
    }
    self.abstract_state = run_dir_lib.abstract_with_shardings(abstract, self.state_shardings)
    self.param_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract["params"])[0]]
    self._init_state = jax.jit(init_state, out_shardings=self.state_shardings)
    self.batch_sharding = shd.batch_sharding(self.mesh)
    self.train_step = jax.jit(
        under_mesh(self.mesh, make_train_step(self.graphdef, self.tx, self.schedule, config.train.grad_accum_steps,
                                              activation_constraint(self.mesh), config.train.loss_chunk)),
        in_shardings=(self.state_shardings, self.batch_sharding), out_shardings=(self.state_shardings, rep),
        donate_argnums=0)
    self.eval_step = jax.jit(
        under_mesh(self.mesh, make_eval_step(self.graphdef, activation_constraint(self.mesh), config.train.loss_chunk)),
        in_shardings=(param_sh, self.batch_sharding), out_shardings=rep)

  def init_state(self):
    """A fresh train state (parameters from `config.train.seed`), laid out with `state_shardings`."""
    # Every initializer is a threefry computation; as XLA fusions, the 1.3B model's ~200 of them took 3.5 minutes
    # to compile on an H100. The kernel lowering (same bits) compiles in seconds; it only matters on GPU.
    with _config_set("jax_threefry_gpu_kernel_lowering", True):
      return self._init_state()

  def iterator(self, split: str):
    c = self.config
    return make_iterator(c.data, split=split, batch_size=self.process_batch, seq_len=c.train.seq_len,
                         seed=c.train.seed, shard_index=jax.process_index(), shard_count=jax.process_count())

  def checked_iterators(self):
    """The train iterator, once a first batch of each split was built from it and put back (nothing is consumed).

    A data setup that cannot give batches (too few documents for the split, a record that does not read) fails
    here with a ConfigError naming the data key, before the run writes anything.
    """
    train_it = None
    try:
      train_it = self.iterator("train")
      start = train_it.get_state()
      next(train_it)
      train_it.set_state(start)
      if self.has_eval:
        eval_it = self.iterator("eval")
        try:
          next(eval_it)
        finally:
          eval_it.close()
    except ValueError as e:  # the data pipeline's errors name their key: "data.path: ..."
      if train_it is not None:
        train_it.close()  # stops its read-ahead threads
      message = str(e)
      raise ConfigError(message if message.startswith("config.") else f"config.{message}") from None
    return train_it

  BATCH_DTYPES = {"tokens": jnp.int32, "targets": jnp.int32, "segment_ids": jnp.int32, "loss_mask": jnp.float32}

  def global_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's share of the batch -> global arrays split over the batch axes of the mesh."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(batch[k], dtype))
            for k, dtype in self.BATCH_DTYPES.items()}

  def abstract_batch(self):
    t = self.config.train
    return {k: jax.ShapeDtypeStruct((t.batch_size, t.seq_len), d, sharding=self.batch_sharding)
            for k, d in self.BATCH_DTYPES.items()}

  def evaluate(self, params) -> dict[str, float]:
    # A fresh iterator each time: every evaluation sees the same held-out batches.
    it = self.iterator("eval")
    sums = {"total": 0.0, "count": 0.0, "correct": 0.0}
    try:
      for _ in range(self.config.train.eval_batches):
        out = jax.device_get(self.eval_step(params, self.global_batch(next(it))))
        sums = {k: sums[k] + float(out[k]) for k in sums}
    finally:
      it.close()  # stops its read-ahead threads
    loss = sums["total"] / max(sums["count"], 1.0)
    return {"eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 50.0))),
            "eval_accuracy": sums["correct"] / max(sums["count"], 1.0)}


def train_and_evaluate(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Trains `config` in `config.workdir`, resuming from its latest checkpoint. Returns the last metrics row.

  Raises ConfigError for a config, data or workdir that cannot work, before anything is written: the data
  pipeline has built a first batch of each split and the train step has compiled before an old run is deleted
  (config.overwrite) or config.json is written. Raises NonFiniteError when the non-finite policy stops the run
  (checkpoints are intact), and Preempted after saving on SIGTERM or Ctrl-C. A run already at or past train.steps is left
  as it is (its config.json included), with one line saying so.
  """
  model_cfg = validate_config(config)
  maybe_initialize_distributed()
  mesh_shape = check_mesh(config, jax.device_count(), jax.process_count())
  start_over = check_workdir(config)
  say = print if jax.process_index() == 0 else (lambda *a, **k: None)
  done = past_end_step(config)
  if done is not None:
    say(f"nothing to do: the run in {config.workdir} is at step {done}, "
        + (f"past train.steps={config.train.steps}" if done > config.train.steps else "its last step")
        + "; raise --config.train.steps to continue it.", flush=True)
    rows = read_jsonl(os.path.join(config.workdir, "metrics.jsonl"))
    return rows[-1] if rows else {}
  if config.train.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.train.compilation_cache))

  run = TrainRun(config, model_cfg, mesh_shape)
  train_it = run.checked_iterators()
  say(f"model: {model_cfg.num_params():,} parameters; mesh "
      + " ".join(f"{a}={n}" for a, n in zip(shd.AXES, mesh_shape))
      + f" over {jax.device_count()} {jax.devices()[0].device_kind} device(s)")
  if not run.has_eval:
    say("data.eval_fraction=0: there is no eval split, so no evaluation runs.")
  compile_start = time.perf_counter()
  train_step = run.train_step.lower(run.abstract_state, run.abstract_batch()).compile()
  memory = train_step.memory_analysis()
  say(f"compiled the train step in {time.perf_counter() - compile_start:.1f} s"
      + (f"; per device: {memory.temp_size_in_bytes / 2**30:.2f} GiB temporaries, "
         f"{memory.argument_size_in_bytes / 2**30:.2f} GiB arguments" if memory is not None else ""))
  stretched = None if start_over else _stretched_schedule(config)  # read before config.json is rewritten
  prepare_workdir(config, start_over)
  with _log_file(os.path.join(config.workdir, "train.log")):
    if stretched:
      _log.warning(stretched)
    return _train(config, run, train_it, train_step, say)


@contextlib.contextmanager
def _log_file(path: str):
  """Copies every log record (libraries' INFO included, as far as the logging levels let them through) to `path`
  while the run lasts; process 0 only."""
  if jax.process_index() != 0:
    yield
    return
  handler = logging.FileHandler(path)
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  logging.getLogger().addHandler(handler)
  try:
    yield
  finally:
    logging.getLogger().removeHandler(handler)
    handler.close()


def _train(config: ml_collections.ConfigDict, run: TrainRun, train_it, train_step, say) -> dict[str, Any]:
  """The loop of `train_and_evaluate`, once the workdir is written: restore or initialize, train, save."""
  t = config.train
  c = config.checkpoint
  ckpt = run_dir_lib.Checkpointer(run_dir_lib.checkpoints_dir(config.workdir), keep=c.keep, async_save=c.async_save,
                                  policy=run_dir_lib.save_policy(c.every_steps, t.steps, c.every_minutes))
  restored = ckpt.restore_latest(run.abstract_state, train_it)
  if restored is None:
    start_step, state = 0, run.init_state()
    if t.init_from:
      source_step, state["params"] = run_dir_lib.restore_params(t.init_from, run.abstract_state["params"])
      _log.info("parameters initialized from %s (step %d)", t.init_from, source_step)
    _log.info("no checkpoint in %s: starting from step 0", config.workdir)
  else:
    start_step, state = restored
    _log.info("resumed from step %d", start_step)
  writer = MetricsWriter(config.workdir, resume_step=start_step, tensorboard=t.tensorboard)
  model_cfg = run.model_cfg

  tokens_per_step = t.batch_size * t.seq_len
  peak = peak_flops(jax.devices()[0].device_kind)
  flops_per_token = model_flops_per_token(model_cfg, t.seq_len)
  preempted = []  # the signals received: the run saves the step it is in, then stops
  previous_handlers = {}

  def on_sigint(*_):
    preempted.append(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once, without saving

  if config.checkpoint.save_on_sigterm:
    previous_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, lambda *_: preempted.append(signal.SIGTERM))
    previous_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, on_sigint)

  timer = {"start": time.perf_counter(), "steps": 0}
  last_row: dict[str, Any] = {}

  def report(step: int, metrics, eval_metrics) -> None:
    """Host work for a finished step: the non-finite policy, then (on log steps) the metrics row."""
    nonlocal last_row
    timer["steps"] += 1
    metrics = jax.device_get(metrics)
    _check_finite(metrics, step, t, run.param_paths, ckpt)
    if not (step % t.log_every == 0 or step == t.steps or eval_metrics):  # an evaluation is always reported
      return
    step_time = (time.perf_counter() - timer["start"]) / timer["steps"]
    row = {"step": step, **{k: float(metrics[k]) for k in ("loss", "grad_norm", "accuracy", "learning_rate")},
           "nonfinite_total": int(metrics["nonfinite_total"]), "step_time_s": step_time,
           "tokens_per_s": tokens_per_step / step_time,
           "tokens_per_s_per_device": tokens_per_step / step_time / jax.device_count(),
           "eta_s": step_time * (t.steps - step), "time": time.time(), **(eval_metrics or {})}
    if peak is not None:
      row["mfu"] = flops_per_token * row["tokens_per_s_per_device"] / peak
    writer.write(row)
    say(console_line(row, t.steps) + (f" | eval loss {row['eval_loss']:.4f} acc {row['eval_accuracy']:.3f}"
                                      if "eval_loss" in row else ""), flush=True)
    timer.update(start=time.perf_counter(), steps=0)
    last_row = row

  # Each step's metrics are read after the next step is dispatched, so the device never waits for the host.
  pending = None
  step = start_step
  try:
    while step < t.steps:
      batch = run.global_batch(next(train_it))
      state, metrics = train_step(state, batch)
      step += 1
      eval_metrics = None
      if run.has_eval and ((t.eval_every and step % t.eval_every == 0) or step == t.steps):
        eval_metrics = run.evaluate(state["params"])
      if pending is not None:
        report(*pending)
      pending = (step, metrics, eval_metrics)
      ckpt.save(step, state, train_it, force=bool(preempted))  # the policy decides, unless preempted
      if preempted:
        report(*pending)
        ckpt.wait()
        name, code = ("SIGTERM", EXIT_SIGTERM) if preempted[0] == signal.SIGTERM else ("Ctrl-C", EXIT_SIGINT)
        say(f"{name}: saved step {step}; exiting with code {code}.", flush=True)
        raise Preempted(step, code)
    if pending is not None:
      report(*pending)
  finally:
    try:  # first, so that a second Ctrl-C during the closing below cannot leave our handlers installed
      for signum, handler in previous_handlers.items():
        if handler is not None:  # None: a handler not installed from Python, which cannot be reinstalled
          signal.signal(signum, handler)
    finally:
      ckpt.close()
      writer.close()
  return last_row


def _check_finite(metrics, step: int, train: ml_collections.ConfigDict, param_paths: list[str], ckpt) -> None:
  if bool(metrics["finite"]):
    return
  bad = [p for p, ok in zip(param_paths, metrics["grads_finite"]) if not ok]
  where = f"first parameter with a non-finite gradient: {bad[0]}" if bad else "the loss is not finite"
  if train.nonfinite == "skip":
    _log.warning("step %d: non-finite loss/gradient (%s); step skipped (%d in a row)", step, where,
                 int(metrics["nonfinite_in_a_row"]))
    if int(metrics["nonfinite_in_a_row"]) < train.max_nonfinite_in_a_row:
      return
  ckpt.wait()
  raise NonFiniteError(
      f"step {step}: non-finite loss or gradient ({where}; loss {float(metrics['loss'])}, grad norm "
      f"{float(metrics['grad_norm'])}); {int(metrics['nonfinite_in_a_row'])} bad step(s) in a row. The update was "
      "not applied and the last checkpoint is intact. train.nonfinite='skip' skips such steps.")
