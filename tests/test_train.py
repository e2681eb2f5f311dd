"""train.py and gsa_jax.train: config errors, a smoke run whose loss falls, exact resume, sharding equality."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from configs import mqar
from gsa_jax import run_dir
from gsa_jax.train import ConfigError, Preempted, train_and_evaluate, validate_config
from gsa_jax.train.metrics import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(workdir, **train):
  """The MQAR preset shrunk to a few seconds of CPU."""
  c = mqar.get_config()
  c.workdir = str(workdir)
  c.model.hidden_size = 32
  c.model.num_slots = 8
  c.model.intermediate_size = 64
  c.data.mqar_num_kv_pairs = 4
  c.train.seq_len = 32
  c.train.batch_size = 8
  c.train.steps = 12
  c.train.log_every = 1
  c.train.eval_every = 6
  c.train.eval_batches = 2
  c.train.compilation_cache = ""
  c.checkpoint.every_steps = 4
  c.checkpoint.async_save = True
  for key, value in train.items():
    section, name = key.split("__")
    c[section][name] = value
  return c


def losses(workdir):
  return [(r["step"], r["loss"]) for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))]


def final_state(workdir):
  """(step, train state) of the newest checkpoint, as saved."""
  return run_dir.restore_state(workdir)


def run_train_py(*args, env=None, timeout=300):
  return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                        cwd=ROOT, env={**os.environ, **(env or {})}, timeout=timeout)


# ---- config errors -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--config.train.stepz=3"], 'unknown config key in --config.train.stepz.*Did you mean "steps"'),
    (["--config.optim.learnig_rate=1e-3"], 'Did you mean "learning_rate"'),
    (["--config.train.steps=2.5"], "--config.train.steps=2.5"),
    (["--config=configs/no_such_config.py"], r"cannot load the --config file: \[Errno 2\] .*no_such_config.py"),
    (["--config=configs/code_lm.py:foo"], r"layout 'foo' is unknown; expected one of"),
    (["--config.model.num_heads=3"], r"config.model.hidden_size: 128 is not divisible by num_heads=3"),
    (["--config.mesh.data=3"], r"config.mesh: data x fsdp x sequence x tensor = 3 but there are 1 devices"),
    (["--config.train.batch_size=63", "--config.train.grad_accum_steps=2"],
     r"config.train.batch_size: 63 is not divisible by train.grad_accum_steps=2"),
    (["--config.model.vocab_size=10"], r"config.model.vocab_size: 10 is smaller than the data's vocabulary"),
    (["--config.train.nonfinite=ignore"], r"config.train.nonfinite: must be 'abort' or 'skip'"),
    (["--config.train.seed=-1"], r"config.train.seed: must be an int >= 0; got -1"),
])
def test_bad_config_fails_early_and_writes_nothing(tmp_path, args, message):
  workdir = tmp_path / "run"
  result = run_train_py(f"--config.workdir={workdir}", *args) if "--config=" not in args[0] else \
      run_train_py(*args, f"--config.workdir={workdir}")
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [line for line in result.stderr.splitlines() if line.startswith("error:") or "FATAL" in line]
  assert lines, result.stderr[-2000:]
  assert re.search(message, result.stderr), result.stderr[-2000:]
  assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
  assert not workdir.exists()


def test_a_config_file_that_does_not_load_is_one_line_without_overrides():
  # ml_collections defers the error to the config's first use when no --config.KEY override touches it first.
  result = run_train_py("--config=configs/no_such_config.py")
  assert result.returncode == 2 and result.stderr.strip().splitlines() == [
      "error: cannot load the --config file: [Errno 2] No such file or directory: 'configs/no_such_config.py'"], \
      result.stderr[-2000:]


def test_workdir_with_a_different_run_is_refused_then_overwritten(tmp_path):
  config = tiny_config(tmp_path / "run", train__steps=2)
  train_and_evaluate(config)
  other = tiny_config(tmp_path / "run", train__steps=2)
  other.model.num_slots = 4
  with pytest.raises(ConfigError, match=r"holds a run with a different config \(model.num_slots: saved 8, now 4\)"):
    train_and_evaluate(other)
  other.overwrite = True
  train_and_evaluate(other)
  assert json.load(open(tmp_path / "run" / "config.json"))["model"]["num_slots"] == 4


def test_overwrite_resumes_a_run_of_the_same_config(tmp_path, caplog):
  """A requeued job reruns its command, overwrite=True included: the same config resumes, it is not deleted."""
  config = tiny_config(tmp_path / "run", train__steps=2)
  config.overwrite = True
  config.optim.warmup_steps = 1  # so that the cosine part, which train.steps stretches, is reached
  train_and_evaluate(config)
  first = json.load(open(tmp_path / "run" / "config.json"))
  config.train.steps = 4  # a resumable change
  with caplog.at_level(logging.INFO):
    train_and_evaluate(config)
  assert "holds a run of this same config, so it resumes" in caplog.text and "resumed from step 2" in caplog.text
  assert re.search(r"train.steps changed from 2 to 4: .* at the resumed step 2 the learning rate goes from \S+ to "
                   r"\S+\.", caplog.text), caplog.text
  steps = [row["step"] for row in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if "loss" in row]
  assert steps[:2] == [1, 2] and steps[-1] == 4 and len(set(steps)) == len(steps)  # steps 1-2 kept, 3-4 added
  assert first["train"]["steps"] == 2


def test_a_requeued_run_resumes_after_its_init_from_is_gone(tmp_path):
  """A resumed run never reads train.init_from, overwrite=True or not: its source may have been deleted since."""
  source = tiny_config(tmp_path / "source", train__steps=2)
  train_and_evaluate(source)
  config = tiny_config(tmp_path / "run", train__steps=2)
  config.train.init_from, config.overwrite = source.workdir, True
  train_and_evaluate(config)
  shutil.rmtree(source.workdir)
  config.train.steps = 3
  train_and_evaluate(config)
  assert final_state(config.workdir)[0] == 3


def test_overwrite_with_a_missing_init_from_keeps_the_old_run(tmp_path):
  config = tiny_config(tmp_path / "run", train__steps=2)
  train_and_evaluate(config)
  before = sorted(os.listdir(tmp_path / "run"))
  other = tiny_config(tmp_path / "run", train__steps=2)
  other.model.num_slots = 4
  other.overwrite = True
  other.train.init_from = str(tmp_path / "nope")
  with pytest.raises(ConfigError, match="train.init_from"):
    train_and_evaluate(other)
  assert sorted(os.listdir(tmp_path / "run")) == before


def test_validate_config_names_model_fields():
  c = mqar.get_config()
  c.model.feature_map = "gelu"
  with pytest.raises(ConfigError, match=r"config.model.feature_map: 'gelu' is unknown"):
    validate_config(c)


def test_validate_config_rejects_negative_loss_chunk():
  c = mqar.get_config()
  c.train.loss_chunk = -1
  with pytest.raises(ConfigError, match=r"config.train.loss_chunk: must be >= 0"):
    validate_config(c)


# ---- training ------------------------------------------------------------------------------------------------------

def test_smoke_train_loss_falls_and_run_dir_is_complete(tmp_path):
  config = tiny_config(tmp_path / "run", train__steps=40, train__eval_every=20, optim__learning_rate=3e-3)
  config.optim.warmup_steps = 5
  last = train_and_evaluate(config)
  rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
  assert [r["step"] for r in rows] == list(range(1, 41))
  first, final = np.mean([r["loss"] for r in rows[:5]]), np.mean([r["loss"] for r in rows[-5:]])
  assert final < first - 0.3, (first, final)
  assert {"eval_loss", "eval_perplexity", "eval_accuracy"} <= set(last)
  assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in rows)
  assert json.load(open(tmp_path / "run" / "config.json"))["train"]["steps"] == 40
  from gsa_jax.plot import plot_runs
  for path in plot_runs([str(tmp_path / "run")]):
    assert os.path.getsize(path) > 1000


def _preempt_after(workdir, rows: int, signum=signal.SIGTERM):
  """Sends `signum` to this process once metrics.jsonl has `rows` rows (as a preemption, or Ctrl-C, would)."""

  def watch():
    while len(read_jsonl(os.path.join(workdir, "metrics.jsonl"))) < rows:
      time.sleep(0.01)
    os.kill(os.getpid(), signum)

  thread = threading.Thread(target=watch, daemon=True)
  thread.start()
  return thread


def test_sigterm_then_resume_is_bit_identical(tmp_path):
  straight = tiny_config(tmp_path / "straight")
  train_and_evaluate(straight)

  interrupted = tiny_config(tmp_path / "interrupted")
  for stop_after in (3, 8):  # two preemptions, at different phases of the checkpoint cadence
    _preempt_after(interrupted.workdir, stop_after)
    with pytest.raises(Preempted):
      train_and_evaluate(interrupted)
  train_and_evaluate(interrupted)

  assert losses(interrupted.workdir) == losses(straight.workdir)
  step_a, state_a = final_state(straight.workdir)
  step_b, state_b = final_state(interrupted.workdir)
  assert step_a == step_b == 12
  jax.tree.map(np.testing.assert_array_equal, state_a, state_b)


def test_ctrl_c_saves_the_step_and_stops_with_130(tmp_path, capsys):
  """Ctrl-C (SIGINT) saves as SIGTERM does, between two checkpoints of the cadence, and says so; the caller's
  SIGINT and SIGTERM handlers are back afterwards."""
  config = tiny_config(tmp_path / "run")
  config.checkpoint.every_steps = 100
  sentinels = {signum: (lambda *_: None) for signum in (signal.SIGINT, signal.SIGTERM)}
  previous = {signum: signal.signal(signum, handler) for signum, handler in sentinels.items()}
  try:
    _preempt_after(config.workdir, 5, signal.SIGINT)
    with pytest.raises(Preempted) as stopped:
      train_and_evaluate(config)
    assert all(signal.getsignal(signum) is handler for signum, handler in sentinels.items())
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
  assert stopped.value.exit_code == 130 and stopped.value.args == (stopped.value.step, 130)
  step = final_state(config.workdir)[0]
  assert 5 <= step < 12 and f"Ctrl-C: saved step {step}; exiting with code 130." in capsys.readouterr().out


ACCUMULATION_ON_4_DEVICES = """
import json, os, re, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax
from configs import mqar
from gsa_jax.train.config import check_mesh, validate_config
from gsa_jax.train.trainer import TrainRun
rows = {}
for accum in (1, 2):
  c = mqar.get_config()
  c.train.batch_size, c.train.grad_accum_steps, c.mesh.data = 32, accum, 4
  run = TrainRun(c, validate_config(c, check_data=False), check_mesh(c, 4, 1))
  step = run.train_step.lower(run.abstract_state, run.abstract_batch()).compile()
  text = step.as_text()
  rows[accum] = {"flops": step.cost_analysis()["flops"],
                 "moves": sum(len(re.findall(rf"= [^\\n]*? {op}(?:-start)?\\(", text))
                              for op in ("all-gather", "collective-permute", "all-to-all"))}
print("RESULT", json.dumps(rows))
"""


def test_gradient_accumulation_splits_every_micro_batch_over_the_data_devices():
  """On a data-parallel mesh of 4 (fake) devices, accumulating over 2 micro-batches compiles a loop body of half
  the step's FLOPs (XLA counts a loop body once) and moves no batch data between devices; a plain reshape into
  blocks had each device compute the whole batch's worth, with gathers."""
  result = subprocess.run([sys.executable, "-c", ACCUMULATION_ON_4_DEVICES], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads(result.stdout.split("RESULT")[-1])
  assert rows["2"]["moves"] == 0, rows
  assert rows["2"]["flops"] < 0.6 * rows["1"]["flops"], rows


@pytest.mark.parametrize("accum", [2])
def test_gradient_accumulation_matches_one_big_batch(tmp_path, accum):
  one = tiny_config(tmp_path / "one", train__steps=3)
  many = tiny_config(tmp_path / "many", train__steps=3, train__grad_accum_steps=accum)
  train_and_evaluate(one)
  train_and_evaluate(many)
  np.testing.assert_allclose([l for _, l in losses(many.workdir)], [l for _, l in losses(one.workdir)], rtol=1e-5)


def test_chunked_loss_matches_whole_logits(tmp_path, monkeypatch):
  """train.loss_chunk (12 of 32 positions: the last slice padded) trains as the whole-logits loss does, and takes
  the chunked path; a run saved before the key existed resumes with it."""
  from gsa_jax.train import trainer as trainer_lib  # noqa: PLC0415
  chunks = []
  chunked_sums = trainer_lib.chunked_cross_entropy_sums
  monkeypatch.setattr(trainer_lib, "chunked_cross_entropy_sums",
                      lambda *a: chunks.append(a[-1]) or chunked_sums(*a))
  whole = tiny_config(tmp_path / "whole", train__steps=3)
  chunked = tiny_config(tmp_path / "chunked", train__steps=3, train__loss_chunk=12)
  train_and_evaluate(whole)
  assert not chunks
  train_and_evaluate(chunked)
  assert chunks and set(chunks) == {12}
  np.testing.assert_allclose([l for _, l in losses(chunked.workdir)], [l for _, l in losses(whole.workdir)],
                             rtol=1e-5)
  # The run of `whole` as an older version saved it (no train.loss_chunk), resumed with the key: no refusal.
  saved = os.path.join(whole.workdir, "config.json")
  with open(saved) as f:
    old = json.load(f)
  del old["train"]["loss_chunk"]
  with open(saved, "w") as f:
    json.dump(old, f)
  resumed = tiny_config(tmp_path / "whole", train__steps=5, train__loss_chunk=12)
  train_and_evaluate(resumed)
  assert [step for step, _ in losses(resumed.workdir)][-1] == 5


SHARDED_SCRIPT = """
import json, sys
from tests.test_train import tiny_config, losses
from gsa_jax.train import train_and_evaluate
out = {}
for name, (data, fsdp, tensor) in {"dp8": (8, 1, 1), "fsdp8": (1, 8, 1), "dp2_fsdp2_tp2": (2, 2, 2),
                                   "resumed": (2, 2, 2), "dp2_tp4_loss_chunk": (2, 1, 4)}.items():
  c = tiny_config(sys.argv[1] + "/" + name, train__steps=4, train__loss_chunk=8 if "loss_chunk" in name else 0)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  train_and_evaluate(c)
  out[name] = [l for _, l in losses(c.workdir)]
print("LOSSES" + json.dumps(out))
"""


@pytest.mark.slow
def test_sharded_runs_match_single_device(tmp_path):
  """dp, fsdp and dp x fsdp x tensor meshes on 8 fake CPU devices give the single-device losses; a run checkpointed
  on 1 device resumes on the 8-device mesh."""
  single = tiny_config(tmp_path / "single", train__steps=4)
  train_and_evaluate(single)
  expected = [l for _, l in losses(single.workdir)]
  resumed = tiny_config(tmp_path / "resumed", train__steps=4)
  _preempt_after(resumed.workdir, 2)
  with pytest.raises(Preempted):
    train_and_evaluate(resumed)
  result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600,
                          env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                               "JAX_PLATFORMS": "cpu",
                               "JAX_COMPILATION_CACHE_DIR": os.environ["JAX_COMPILATION_CACHE_DIR"] + "-8-devices"})
  assert result.returncode == 0, result.stderr[-3000:]
  sharded = json.loads(result.stdout.split("LOSSES")[-1])
  assert set(sharded) == {"dp8", "fsdp8", "dp2_fsdp2_tp2", "resumed", "dp2_tp4_loss_chunk"}
  for name, values in sharded.items():
    np.testing.assert_allclose(values, expected, rtol=2e-5, err_msg=name)
