"""Loading a trained model from a run directory of train.py, for evaluation and generation."""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from gsa_jax.models import GSALM
from gsa_jax.train.config import model_config


def load_run_config(run_dir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (its config.json)."""
  path = os.path.join(run_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: {run_dir!r} is not a run directory of train.py.")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def checkpoint_steps(run_dir: str) -> list[int]:
  directory = os.path.join(run_dir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def resolve_step(run_dir: str, step: int | None = None) -> int:
  """The newest checkpoint step of a run directory, or `step` after checking that it exists."""
  steps = checkpoint_steps(run_dir)
  if not steps:
    raise FileNotFoundError(f"{run_dir!r} has no checkpoint under {os.path.join(run_dir, 'checkpoints')}.")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise FileNotFoundError(f"{run_dir!r} has no checkpoint of step {step}; it has steps {steps}.")
  return step


def restore_params(run_dir: str, step: int, abstract_params):
  """The parameters of a checkpoint, restored into `abstract_params` (jax.ShapeDtypeStructs with shardings).

  Only the parameters are read: the optimizer state and the data iterator (if any) stay on disk. Works for the
  checkpoints of train.py and for those `python -m gsa_jax.convert` writes (which hold only parameters).
  """
  target = {"params": abstract_params}
  path = os.path.join(os.path.abspath(run_dir), "checkpoints", str(step), "state")
  restored = ocp.PyTreeCheckpointer().restore(
      path, args=ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                        partial_restore=True))
  return restored["params"]


def load_model(run_dir: str, step: int | None = None, **model_overrides) -> tuple[GSALM, ml_collections.ConfigDict,
                                                                                   int]:
  """Restores the parameters of a run's checkpoint (the newest, or `step`) into a GSALM on the default device.

  model_overrides replace fields of the model config that do not change parameter shapes (e.g. backend="recurrent",
  dtype="float32"). Returns (model, run config, step).
  """
  config = load_run_config(run_dir)
  for key, value in model_overrides.items():
    config.model[key] = value
  model_cfg = model_config(config)
  step = resolve_step(run_dir, step)
  abstract = nnx.eval_shape(lambda: GSALM(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract, nnx.Param)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_params)
  return nnx.merge(graphdef, restore_params(run_dir, step, target)), config, step
