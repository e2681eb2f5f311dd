"""The MQAR sweep's trainer (`benchmarks/mqar_sweep.py`): a cell's runs (learning rate x seed) trained together in
one vmapped program on batches generated on the device, then scored on the held-out split."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gsa_jax.data import make_iterator
from gsa_jax.data.mqar import SPLIT_IDS, mqar_batch
from gsa_jax.models import GSALM
from gsa_jax.train.config import validate_config
from gsa_jax.train.optimizer import learning_rate_schedule, make_optimizer
from gsa_jax.train.trainer import make_eval_step, make_train_step


def member_optimizer(config) -> optax.GradientTransformation:
  """The config's optimizer with its peak learning rate moved into the optimizer state.

  `make_optimizer` at peak 1, then `optax.scale` by the run's rate (an injected hyperparameter, so a traced value):
  AdamW's update is -lr_t (adam + wd p) with lr_t = peak x schedule shape, so this is the same update, and runs at
  several learning rates can share one program under `jax.vmap`.
  """
  unit = config.optim.copy_and_resolve_references()
  unit.learning_rate = 1.0
  return optax.chain(make_optimizer(unit, config.train.steps), optax.inject_hyperparams(optax.scale)(step_size=1.0))


class CellTrainer:
  """One sweep cell's jitted programs, training all its runs (learning rate x seed) at once under `jax.vmap`.

  A cell's runs share the model's shapes, so one program trains them together and compiles once: the tiny MQAR
  models leave a GPU mostly idle (H100, L = 128, width 64: 500 steps of 6 runs in 2.5 s, after a compilation of
  tens of seconds; docs/results.md). Each run keeps its own parameters, optimizer state, learning rate and seed
  (init and data); runs with the same seed see the same training batches.
  """

  def __init__(self, config, members: list[tuple[float, int]]):
    model_cfg = validate_config(config)
    self.num_params = model_cfg.num_params()
    self.members = members
    self.lrs = jnp.asarray([lr for lr, _ in members], jnp.float32)
    self.seeds = jnp.asarray([seed for _, seed in members], jnp.uint32)
    steps = config.train.steps
    tx = member_optimizer(config)
    self.graphdef = nnx.graphdef(nnx.eval_shape(lambda: GSALM(model_cfg, rngs=nnx.Rngs(0))))

    def init(lr, seed):
      params = nnx.state(GSALM(model_cfg, rngs=nnx.Rngs(jax.random.key(seed))), nnx.Param)
      inner, scale = tx.init(params)
      zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731 (separate buffers: the state is donated)
      return {"step": zero(), "params": params, "opt_state": (inner, scale._replace(hyperparams={"step_size": lr})),
              "nonfinite_in_a_row": zero(), "nonfinite_total": zero()}

    # The logged learning rate is not used here; the schedule only has to be a function of the step.
    train_step = make_train_step(self.graphdef, tx, learning_rate_schedule(config.optim, steps), 1)
    d = config.data
    make_batch = functools.partial(
        mqar_batch, batch_size=config.train.batch_size, seq_len=config.train.seq_len, vocab_size=d.mqar_vocab_size,
        num_kv_pairs=d.mqar_num_kv_pairs, power_a=float(d.mqar_power_a), random_non_queries=d.mqar_random_non_queries)

    def train(state, keys):
      """A block of steps of one run in one program: (state, keys [n, 2]) -> (state, loss of each step [n])."""
      def step(state, key):
        state, metrics = train_step(state, make_batch(key))
        return state, metrics["loss"]
      return jax.lax.scan(step, state, keys)

    self.init = jax.jit(jax.vmap(init))
    self.train = jax.jit(jax.vmap(train), donate_argnums=0)
    self.eval_step = jax.jit(jax.vmap(make_eval_step(self.graphdef), in_axes=(0, None)))


TRAIN_BLOCK = 500  # training steps per jitted call (at most two programs a cell: this and the remainder)


def as_batch(batch) -> dict:
  return {"tokens": jnp.asarray(batch["tokens"], jnp.int32), "targets": jnp.asarray(batch["targets"], jnp.int32),
          "segment_ids": jnp.asarray(batch["segment_ids"], jnp.int32),
          "loss_mask": jnp.asarray(batch["loss_mask"], jnp.float32)}


def train_keys(seed: int, steps: int) -> jax.Array:
  """The PRNG keys of a run's training batches [steps, 2] (a stream apart from the init's)."""
  return jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), SPLIT_IDS["train"]), steps)


def train_and_score(config, trainer: CellTrainer) -> list[dict]:
  """Trains the cell's runs from scratch for config.train.steps, then scores the held-out split (the same examples
  for every run). Returns each run's metrics, in the order of trainer.members."""
  t, d = config.train, config.data
  start = time.perf_counter()
  keys = jnp.stack([train_keys(seed, t.steps) for _, seed in trainer.members])  # [runs, steps, 2]
  state, losses = trainer.init(trainer.lrs, trainer.seeds), []
  for begin in range(0, t.steps, TRAIN_BLOCK):  # blocks of steps, so that a slow cell (CPU) can show progress
    state, block = trainer.train(state, keys[:, begin:begin + TRAIN_BLOCK])
    losses.append(block)
    if time.perf_counter() - start > 30 and begin + TRAIN_BLOCK < t.steps:
      last = np.array2string(np.asarray(block[:, -1]), precision=3)  # each run's loss
      print(f"    step {begin + block.shape[1]}/{t.steps}: loss {last} ({time.perf_counter() - start:.0f} s)",
            flush=True)
  losses = np.concatenate(jax.device_get(losses), axis=1)
  train_s = time.perf_counter() - start
  eval_it = make_iterator(d, split="eval", batch_size=t.batch_size, seq_len=t.seq_len, seed=0)
  sums = np.zeros((len(trainer.members), 3))
  try:
    for _ in range(t.eval_batches):
      out = jax.device_get(trainer.eval_step(state["params"], as_batch(next(eval_it))))
      sums += np.stack([out["total"], out["count"], out["correct"]], axis=1)
  finally:
    eval_it.close()  # stops its read-ahead threads (a sweep builds one per cell)
  nonfinite = jax.device_get(state["nonfinite_total"])
  return [{"accuracy": float(s[2] / s[1]), "eval_loss": float(s[0] / s[1]),
           "train_loss": float(np.mean(loss[-20:])),  # the mean of the last 20 steps' loss
           "train_s": train_s, "nonfinite_steps": int(n)} for s, loss, n in zip(sums, losses, nonfinite)]
