"""What a user of train.py sees: its exit codes 3 and 143 from a real process, `python -m gsa_jax.plot`,
metrics.jsonl with a truncated last line, and TensorBoard event files."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from gsa_jax import run_dir
from gsa_jax.train import train_and_evaluate
from gsa_jax.train.metrics import MetricsWriter, read_jsonl
from tests.test_reliability import TINY_FLAGS
from tests.test_train import ROOT, final_state, losses, tiny_config


def _train_py(workdir, *flags):
  return [sys.executable, os.path.join(ROOT, "train.py"), f"--config.workdir={workdir}", *TINY_FLAGS, *flags]


def _error_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_exit_code_3_on_nonfinite_gradients(tmp_path):
  """An enormous learning rate (no warm-up, no clipping) makes step 2's gradients NaN: exit code 3, one error line
  naming the step and the first parameter, no traceback, and the saved parameters are those of step 1."""
  workdir = tmp_path / "run"
  result = subprocess.run(
      _train_py(workdir, "--config.train.steps=6", "--config.optim.learning_rate=1e30",
                "--config.optim.warmup_steps=0", "--config.optim.clip_norm=0", "--config.checkpoint.every_steps=1"),
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert result.returncode == 3, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  errors = _error_lines(result.stderr)
  assert len(errors) == 1, errors
  assert errors[0].startswith("error: step 2: non-finite loss or gradient (first parameter with a non-finite "
                              "gradient: ['"), errors[0]
  assert "train.nonfinite='skip'" in errors[0]
  assert run_dir.checkpoint_steps(workdir)[-1] == 2  # step 2 was saved before its metrics were read; not applied
  (_, one), (_, two) = (run_dir.restore_state(workdir, s) for s in (1, 2))
  jax.tree.map(np.testing.assert_array_equal, two["params"], one["params"])


def test_exit_code_143_on_sigterm_then_plot(tmp_path):
  """SIGTERM to a real train.py: it saves the step it is at and exits with 143 saying so; then
  `python -m gsa_jax.plot` draws the run (and a directory without metrics is one error line, exit code 2)."""
  workdir = tmp_path / "run"
  proc = subprocess.Popen(_train_py(workdir, "--config.train.steps=5000"), stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True, cwd=ROOT,  # a private cache: it is signalled
                          env={**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache")})
  deadline = time.monotonic() + 300
  while len(read_jsonl(workdir / "metrics.jsonl")) < 3 and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  stdout, _ = proc.communicate(timeout=120)
  assert proc.returncode == 143, stdout[-2000:]
  step = losses(workdir)[-1][0]
  assert f"SIGTERM: saved step {step}; exiting with code 143." in stdout
  assert final_state(workdir)[0] == step < 5000

  result = subprocess.run([sys.executable, "-m", "gsa_jax.plot", str(workdir)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  paths = result.stdout.split()
  assert sorted(os.path.basename(p) for p in paths) == ["accuracy.png", "loss.png", "throughput.png"]
  for path in paths:
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
  missing = subprocess.run([sys.executable, "-m", "gsa_jax.plot", str(tmp_path / "nothing")], capture_output=True,
                           text=True, cwd=ROOT, timeout=120)
  assert missing.returncode == 2
  assert missing.stderr.strip().splitlines() == [
      f"error: {tmp_path / 'nothing' / 'metrics.jsonl'} does not exist or is empty: is "
      f"{str(tmp_path / 'nothing')!r} a run directory of train.py?"]


def test_truncated_last_metrics_line_is_ignored_and_dropped_on_resume(tmp_path):
  """What a kill in the middle of a write leaves: the partial last line is not a row, plotting works, and the
  resumed run's writer keeps the rows up to its checkpoint and drops the partial line. A bad line elsewhere is an
  error naming it."""
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": s, "loss": 4.0 - s, "accuracy": 0.1 * s, "tokens_per_s": 100.0} for s in (1, 2, 3)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
  assert read_jsonl(path) == rows
  from gsa_jax.plot import plot_runs  # noqa: PLC0415
  assert len(plot_runs([str(tmp_path)])) == 3
  MetricsWriter(str(tmp_path), resume_step=2, tensorboard=False).close()
  assert path.read_text() == "".join(json.dumps(r) + "\n" for r in rows[:2])
  path.write_text(json.dumps(rows[0]) + "\n" + '{"step": 2, "lo\n' + json.dumps(rows[2]) + "\n")
  with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not JSON"):
    read_jsonl(path)


def _tensorboard_scalars(directory):
  """{tag: [(step, value)]} from the TFRecord event files under directory (read without TensorFlow: each record is
  length (8 bytes), its CRC (4), the Event proto, its CRC (4))."""
  from tensorboardX.proto import event_pb2  # noqa: PLC0415

  scalars = {}
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_tensorboard_event_files_hold_the_metrics(tmp_path):
  config = tiny_config(tmp_path / "run", train__steps=3, train__tensorboard=True, train__eval_every=3)
  train_and_evaluate(config)
  rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
  scalars = _tensorboard_scalars(tmp_path / "run" / "tensorboard")
  for key in ("loss", "grad_norm", "learning_rate", "tokens_per_s", "eval_loss"):
    want = [(r["step"], r[key]) for r in rows if key in r]
    assert [s for s, _ in scalars[key]] == [s for s, _ in want], key
    np.testing.assert_allclose([v for _, v in scalars[key]], [v for _, v in want], rtol=1e-6, err_msg=key)
  assert "step" not in scalars
