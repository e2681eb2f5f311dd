"""Multi-process training on one machine: two train.py processes joined by jax.distributed over localhost (CPU, gloo
collectives), one shared workdir, as two hosts of a cluster with a shared filesystem would run.

What is compared: each process reads its own disjoint share of the data (indices [process_index::2], shuffled per
share), so the 2-process global batch is NOT the batch a 1-process run would read. The reference is therefore a
single-process run of the same config fed, at every step, the concatenation of the two shares' batches (4 + 4 rows
= the same global batch of 8). The 2-process run must match it per step (loss, and the eval loss at the end) to 2e-5
relative, and its final checkpoint (written by both processes) must match the reference's final parameters.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from gsa_jax import run_dir
from gsa_jax.data import make_iterator
from gsa_jax.train import train_and_evaluate
from gsa_jax.train import trainer as trainer_lib
from gsa_jax.train.metrics import read_jsonl
from tests.test_reliability import TINY_FLAGS
from tests.test_train import ROOT, final_state, tiny_config

STEPS = 6  # TINY_FLAGS checkpoint every 4 steps: checkpoints 4 and 6; eval at step 6
PROCESSES = 2


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, tmp_path, tag: str):
  """Runs PROCESSES train.py processes to completion; returns [(returncode, stdout, stderr)] by process id."""
  port = _free_port()
  procs, logs = [], []
  for i in range(PROCESSES):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
           "JAX_NUM_PROCESSES": str(PROCESSES), "JAX_PROCESS_ID": str(i), "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
           # One compilation cache each: jax writes entries non-atomically, and these processes run at once.
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / f"xla_cache_{i}")}
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    out, err = open(tmp_path / f"{tag}_{i}.out", "w+"), open(tmp_path / f"{tag}_{i}.err", "w+")
    logs.append((out, err))
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), f"--config.workdir={workdir}",
         f"--config.train.steps={STEPS}", *TINY_FLAGS], cwd=ROOT, env=env, stdout=out, stderr=err))
  deadline = time.monotonic() + 300
  try:
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  results = []
  for p, (out, err) in zip(procs, logs):
    out.seek(0)
    err.seek(0)
    results.append((p.returncode, out.read(), err.read()))
    out.close()
    err.close()
  return results


def _final_params(workdir, like):
  """The newest checkpoint's parameters, read in this (single) process onto one device, shaped like `like`."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return run_dir.restore_params(workdir, run_dir.abstract_with_shardings(like["params"], device))


def _assert_params_close(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=1e-7)


class _ConcatShards:
  """Single-process stand-in for the 2-process data: each batch is shard 0's batch followed by shard 1's."""

  def __init__(self, iterators):
    self.iterators = iterators

  def __next__(self):
    parts = [next(it) for it in self.iterators]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self):  # bytes: grain's checkpoint handler form for an iterator that is not a DatasetIterator
    return json.dumps([it.get_state() for it in self.iterators]).encode()

  def set_state(self, state):
    for it, s in zip(self.iterators, json.loads(state)):
      it.set_state(s)

  def close(self):
    for it in self.iterators:
      it.close()


def _reference_run(workdir, monkeypatch):
  """One process, one device, fed the global batches that PROCESSES processes would assemble."""
  def iterator(run, split):
    c = run.config
    return _ConcatShards([make_iterator(c.data, split=split, batch_size=c.train.batch_size // PROCESSES,
                                        seq_len=c.train.seq_len, seed=c.train.seed, shard_index=i,
                                        shard_count=PROCESSES) for i in range(PROCESSES)])

  monkeypatch.setattr(trainer_lib.TrainRun, "iterator", iterator)
  config = tiny_config(workdir, train__steps=STEPS)
  assert config.train.batch_size == 8
  train_and_evaluate(config)
  monkeypatch.undo()
  return read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def _check_clean_exit(results):
  for i, (rc, out, err) in enumerate(results):
    assert rc == 0, f"process {i} exited {rc}:\n{err[-3000:]}"
  # Only process 0 reports; both ran on a 2-device mesh spanning the 2 processes.
  assert "mesh data=2 fsdp=1 sequence=1 tensor=1 over 2 cpu device(s)" in results[0][1], results[0][1]
  assert f"step {STEPS}/{STEPS}" in results[0][1], results[0][1]
  assert "step " not in results[1][1] and "model:" not in results[1][1], results[1][1]


def test_two_processes_match_one_process_on_the_same_global_batch_and_resume(tmp_path, monkeypatch):
  if not hasattr(jax.distributed, "initialize"):
    pytest.skip("this JAX has no jax.distributed.initialize")
  reference = _reference_run(tmp_path / "reference", monkeypatch)
  assert [r["step"] for r in reference] == list(range(1, STEPS + 1))

  workdir = tmp_path / "shared"
  first = _launch(workdir, tmp_path, "first")
  _check_clean_exit(first)
  for i in range(PROCESSES):
    assert "no checkpoint in" in first[i][2], first[i][2][-2000:]
  rows = read_jsonl(workdir / "metrics.jsonl")
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in reference], rtol=2e-5)
  np.testing.assert_allclose(rows[-1]["eval_loss"], reference[-1]["eval_loss"], rtol=2e-5)
  # Every process saved its data-iterator position; the parameters (one array set, written by both) match.
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4", str(STEPS)]
  assert sorted(os.listdir(workdir / "checkpoints" / str(STEPS) / "data")) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  ref_step, ref_state = final_state(tmp_path / "reference")
  step, params = _final_params(workdir, ref_state)
  assert step == ref_step == STEPS
  _assert_params_close(params, ref_state["params"])

  # A crash after checkpoint 4: its step-6 checkpoint is gone. Restarting both processes resumes from step 4 on
  # each (params, optimizer and each process's own data position) and recomputes steps 5 and 6.
  shutil.rmtree(workdir / "checkpoints" / str(STEPS))
  finished_at = rows[-1]["time"]
  second = _launch(workdir, tmp_path, "second")
  _check_clean_exit(second)
  for i in range(PROCESSES):
    assert "resumed from step 4" in second[i][2], second[i][2][-2000:]
  rows = read_jsonl(workdir / "metrics.jsonl")
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  assert all(r["time"] > finished_at for r in rows[4:]) and all(r["time"] <= finished_at for r in rows[:4])
  np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in reference], rtol=2e-5)
  np.testing.assert_allclose(rows[-1]["eval_loss"], reference[-1]["eval_loss"], rtol=2e-5)
  step, params = _final_params(workdir, ref_state)
  assert step == STEPS
  _assert_params_close(params, ref_state["params"])
