"""gsa_jax.run_dir: the one module that knows the run directory (config.json + orbax checkpoints), what its readers
may and may not do, and who depends on it."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from flax import nnx

from gsa_jax import run_dir
from gsa_jax.models import GSALM, GSAConfig
from tests.test_train import ROOT

TINY = GSAConfig(vocab_size=260, hidden_size=16, num_layers=1, num_heads=2, num_slots=4, intermediate_size=32)


def _snapshot(directory):
  """{relative path: bytes} of every file and (as None) every directory under `directory`."""
  out = {}
  for d, dirs, files in os.walk(directory):
    out.update({os.path.relpath(os.path.join(d, x), directory): None for x in dirs})
    out.update({os.path.relpath(os.path.join(d, f), directory): open(os.path.join(d, f), "rb").read() for f in files})
  return out


def _train_like_run(path, steps=(3, 5)):
  """A run directory as train.py leaves it: config.json, and per step a train state plus a data item."""
  model = GSALM(TINY, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  run_dir.write_config(path, {"model": {k: v for k, v in vars(TINY).items()}, "train": {"seq_len": 32}})
  ckpt = run_dir.Checkpointer(run_dir.checkpoints_dir(path), keep=3, async_save=False)
  for step in steps:
    shifted = jax.tree.map(lambda p: p + step, params)
    ckpt.save(step, {"step": np.int32(step), "params": shifted, "opt_state": {"mu": jax.tree.map(np.zeros_like,
                                                                                                   shifted)}})
  ckpt.close()
  return params


def test_config_round_trip_is_atomic_and_sorted(tmp_path):
  config = {"model": {"num_slots": 4, "attn_layers": (1, 2)}, "data": {"path": "x.txt"}}
  run_dir.write_config(str(tmp_path / "run"), config)
  assert sorted(os.listdir(tmp_path / "run")) == ["config.json"]  # no temporary file left
  assert run_dir.read_config(str(tmp_path / "run")).to_dict() == {"data": {"path": "x.txt"},
                                                                  "model": {"attn_layers": [1, 2], "num_slots": 4}}
  with pytest.raises(FileNotFoundError, match="is not a run directory of train.py"):
    run_dir.read_config(str(tmp_path / "elsewhere"))
  (tmp_path / "list").mkdir()
  (tmp_path / "list" / "config.json").write_text("[1, 2]")
  with pytest.raises(ValueError, match="holds a list, not a JSON object"):
    run_dir.read_config(str(tmp_path / "list"))


def test_readers_list_finalized_steps_and_change_nothing(tmp_path):
  """load_model, restore_params and restore_state go through a read-only manager: a write cut short (orbax's
  temporary directory) is not a step, and it stays where it is, as does every other byte of the run."""
  path = str(tmp_path / "run")
  params = _train_like_run(path)
  os.makedirs(os.path.join(run_dir.checkpoints_dir(path), "9.orbax-checkpoint-tmp-1234567890", "state"))
  before = _snapshot(path)

  assert run_dir.checkpoint_steps(path) == [3, 5]
  model, config, step = run_dir.load_model(path, backend="recurrent")
  assert step == 5 and config.model.backend == "recurrent"
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b + 5)
  step, state = run_dir.restore_state(path, 3)
  assert step == 3 and int(state["step"]) == 3 and set(state) == {"step", "params", "opt_state"}
  with pytest.raises(FileNotFoundError, match=r"has no checkpoint of step 4; it has steps \[3, 5\]"):
    run_dir.restore_state(path, 4)
  assert _snapshot(path) == before


def test_restore_params_reads_the_params_alone(tmp_path):
  path = str(tmp_path / "run")
  params = _train_like_run(path, steps=(2,))
  abstract = run_dir.abstract_with_shardings(params, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  step, restored = run_dir.restore_params(path, abstract)
  assert step == 2 and jax.tree.structure(restored) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b + 2)
  with pytest.raises(FileNotFoundError, match="has no checkpoint under"):
    run_dir.restore_params(str(tmp_path / "empty"), abstract)


_READ_WITHOUT_TRAINING = """
import sys
from gsa_jax.convert.io import read_run_params
from gsa_jax.eval.api import evaluate
run, text = sys.argv[1:]
read_run_params(run)
evaluate(run, "perplexity", text, batch_size=2, progress=False)
training = sorted(m for m in sys.modules if m == "gsa_jax.train" or m.startswith("gsa_jax.train."))
assert not training, training
"""


def test_evaluation_and_conversion_read_runs_without_the_training_library(tmp_path):
  """eval/ and convert/ depend on the run directory module, not on gsa_jax.train (and its orbax/optax loop)."""
  from gsa_jax.convert.io import write_run_dir  # pylint: disable=import-outside-toplevel
  from tests.test_convert import random_params  # pylint: disable=import-outside-toplevel

  write_run_dir(tmp_path / "run", TINY, random_params(TINY), tokenizer="byte", seq_len=32)
  (tmp_path / "text.txt").write_text("one small document\nand another\n")
  result = subprocess.run([sys.executable, "-c", _READ_WITHOUT_TRAINING, str(tmp_path / "run"),
                           str(tmp_path / "text.txt")], capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]


# ---- when training saves: orbax's policies --------------------------------------------------------------------------

def _decide(policy, step, previous=(), *, seconds=0.0, saving=False):
  """policy.should_save at `step`, `seconds` after the checkpoints `previous` (steps) were written."""
  import datetime  # pylint: disable=import-outside-toplevel

  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  cm = ocp.checkpoint_managers
  t0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
  info = lambda s, t: types.SimpleNamespace(step=s, time=t, metrics=None)  # a cm.PolicyCheckpointInfo
  context = cm.DecisionContext(is_saving_in_progress=saving, reached_preemption=False,
                               multiprocessing_options=ocp.options.MultiprocessingOptions())
  return policy.should_save(info(step, t0 + datetime.timedelta(seconds=seconds)),
                            [info(s, t0) for s in previous], context=context)


def test_save_policy_every_n_steps_the_last_step_and_every_n_minutes():
  steps_only = run_dir.save_policy(every_steps=4, last_step=10)
  assert [s for s in range(1, 11) if _decide(steps_only, s, [0])] == [4, 8, 10]
  timed = run_dir.save_policy(every_steps=100, last_step=1000, every_minutes=1.5)
  assert not _decide(timed, 7, [4], seconds=89) and _decide(timed, 7, [4], seconds=90)
  assert not _decide(timed, 7, [4], seconds=600, saving=True)  # one write at a time
  assert _decide(timed, 1)  # a run without checkpoints saves at its first step
  assert not _decide(steps_only, 1)


def test_checkpointer_saves_what_the_policy_asks_or_is_forced_and_keeps_the_newest(tmp_path):
  ckpt = run_dir.Checkpointer(str(tmp_path / "ckpt"), keep=2, async_save=False, policy=run_dir.save_policy(2))
  state = {"w": np.arange(3.0)}
  assert [ckpt.save(s, state) for s in range(1, 7)] == [False, True, False, True, False, True]
  assert ckpt.steps() == [4, 6]
  assert ckpt.save(7, state, force=True)  # e.g. on SIGTERM
  assert ckpt.steps() == [6, 7]
  ckpt.close()


def test_a_time_policy_run_saves_its_first_step(tmp_path):
  """checkpoint.every_minutes reaches orbax: a run without checkpoints saves at step 1 (then every N steps, the
  last step, and when the minutes have passed)."""
  from gsa_jax.train import train_and_evaluate  # pylint: disable=import-outside-toplevel
  from tests.test_train import tiny_config  # pylint: disable=import-outside-toplevel

  config = tiny_config(tmp_path / "run", train__steps=3, train__eval_every=0, checkpoint__every_steps=100,
                       checkpoint__every_minutes=60.0)
  train_and_evaluate(config)
  assert run_dir.checkpoint_steps(config.workdir) == [1, 3]
