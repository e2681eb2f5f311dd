"""Faults: SIGKILL at random steps (also during an async checkpoint write), damaged checkpoints, non-finite
losses, bad input that must fail before anything is written, and numerics at extreme lengths and gates."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsa_jax.ops import gated_slot_attention
from gsa_jax.ops.testing import rel_err
from gsa_jax.train import NonFiniteError, train_and_evaluate
from gsa_jax.train import trainer as trainer_lib
from gsa_jax.train.metrics import read_jsonl
from tests.test_train import ROOT, final_state, losses, run_train_py, tiny_config

# The same run as tests.test_train.tiny_config, as train.py flags.
TINY_FLAGS = [
    "--config.model.hidden_size=32", "--config.model.num_slots=8", "--config.model.intermediate_size=64",
    "--config.data.mqar_num_kv_pairs=4", "--config.train.seq_len=32", "--config.train.batch_size=8",
    "--config.train.log_every=1", "--config.train.eval_every=6", "--config.train.eval_batches=2",
    "--config.train.compilation_cache=", "--config.checkpoint.every_steps=4",
]


def _checkpoint_dirs(workdir):
  path = os.path.join(workdir, "checkpoints")
  return os.listdir(path) if os.path.isdir(path) else []


def _train_py(workdir, steps):
  return [sys.executable, os.path.join(ROOT, "train.py"), f"--config.workdir={workdir}",
          f"--config.train.steps={steps}", *TINY_FLAGS]


# train.py with the first checkpoint write of the process held open after its files are written and before orbax
# renames its temporary directory into place: a file named by $GSA_TEST_SAVE_MARKER then holds that directory's
# path, and the write never finishes, so a SIGKILL sent after the marker appears lands inside the save.
HELD_SAVE_LAUNCHER = """
import asyncio, os, runpy, sys
from orbax.checkpoint._src.path import atomicity
finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def held_finalize(self):
  marker = os.environ["GSA_TEST_SAVE_MARKER"]
  if not os.path.exists(marker):
    with open(marker + ".tmp", "w") as f:
      f.write(str(self.get()))
    os.replace(marker + ".tmp", marker)
    await asyncio.sleep(3600)
  await finalize(self)
atomicity.AtomicRenameTemporaryPath.finalize = held_finalize
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("seed", [0])
def test_sigkill_three_times_then_resume_is_bit_identical(tmp_path, seed):
  """Kill -9 train.py at random steps, once while an async checkpoint is being written; the finished run's per-step
  losses and final parameters equal an uninterrupted run's, bit for bit."""
  steps = 16
  straight = tmp_path / "straight"
  result = subprocess.run(_train_py(straight, steps), capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]

  crashed = tmp_path / "crashed"
  marker = tmp_path / "save_started"
  rng = random.Random(seed)
  kills = []
  for attempt in range(3):
    during_save = attempt == 1
    command = _train_py(crashed, steps)
    if during_save:  # the second kill lands inside a checkpoint write, held open by HELD_SAVE_LAUNCHER
      command = [sys.executable, "-c", HELD_SAVE_LAUNCHER, *command[1:]]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                            # A private compilation cache: a kill inside jax's (non-atomic) cache write would leave
                            # a partial entry that aborts the next process reading it.
                            env={**os.environ, "GSA_TEST_SAVE_MARKER": str(marker),
                                 "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache")})
    done_before = len(read_jsonl(crashed / "metrics.jsonl"))
    target = done_before + rng.randint(1, 4)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
      rows = len(read_jsonl(crashed / "metrics.jsonl"))
      if (marker.exists() if during_save else rows >= target):
        proc.send_signal(signal.SIGKILL)
        kills.append(rows)
        break
      time.sleep(0.002)
    proc.wait(timeout=60)
    assert len(kills) == attempt + 1, f"attempt {attempt} ended (code {proc.returncode}) before it was killed"
    if during_save:  # the killed write left its temporary directory, and its step is not a checkpoint
      partial = marker.read_text()
      step = os.path.basename(partial).split(".")[0]
      assert os.path.isdir(partial) and "tmp" in os.path.basename(partial), partial
      assert step not in _checkpoint_dirs(crashed)
  result = subprocess.run(_train_py(crashed, steps), capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]

  assert losses(crashed) == losses(straight)
  assert [s for s, _ in losses(crashed)] == list(range(1, steps + 1))
  (step_a, state_a), (step_b, state_b) = final_state(straight), final_state(crashed)
  assert step_a == step_b == steps
  jax.tree.map(np.testing.assert_array_equal, state_a, state_b)
  assert not any("tmp" in d for d in _checkpoint_dirs(crashed))  # leftovers of killed writes were cleaned


def test_leftover_partial_checkpoint_is_cleaned_not_used(tmp_path):
  config = tiny_config(tmp_path / "run", train__steps=4)
  train_and_evaluate(config)
  ckpts = tmp_path / "run" / "checkpoints"
  # What a crash in the middle of writing step 8 leaves behind: a temporary directory with part of the files.
  partial = ckpts / "8.orbax-checkpoint-tmp-1234567890"
  shutil.copytree(ckpts / "4", partial)
  shutil.rmtree(partial / "state")
  config.train.steps = 8
  train_and_evaluate(config)
  assert sorted(os.listdir(ckpts)) == ["4", "8"]
  assert [s for s, _ in losses(config.workdir)] == list(range(1, 9))


def _largest_file(directory):
  files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_damaged_latest_checkpoint_falls_back_with_a_warning(tmp_path, caplog, damage):
  config = tiny_config(tmp_path / "run", train__steps=8)
  train_and_evaluate(config)
  reference = dict(losses(config.workdir))
  victim = _largest_file(tmp_path / "run" / "checkpoints" / "8" / "state")
  if damage == "delete":
    os.remove(victim)
  else:
    with open(victim, "r+b") as f:
      f.truncate(os.path.getsize(victim) // 2)
  config.train.steps = 10
  with caplog.at_level("WARNING"):
    train_and_evaluate(config)
  warnings = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
  assert "checkpoint 8 cannot be restored" in warnings
  # Resumed from step 4: steps 5..8 were recomputed (equal to before), then 9 and 10.
  rows = dict(losses(config.workdir))
  assert sorted(rows) == list(range(1, 11))
  assert all(rows[s] == reference[s] for s in range(1, 9))
  # The damaged checkpoint was moved aside, not deleted.
  aside = os.listdir(tmp_path / "run" / "unloadable_checkpoints")
  assert len(aside) == 1 and aside[0].startswith("8-")


def _tree_snapshot(directory):
  """{relative path: bytes} of every file under directory."""
  return {os.path.relpath(os.path.join(d, f), directory): open(os.path.join(d, f), "rb").read()
          for d, _, fs in os.walk(directory) for f in fs}


def test_no_restorable_checkpoint_stops_the_run_and_changes_nothing(tmp_path):
  """Every checkpoint damaged: the run stops with an error naming each step, instead of starting from scratch;
  no checkpoint is deleted or moved aside and metrics.jsonl is not rewritten."""
  config = tiny_config(tmp_path / "run", train__steps=8)
  train_and_evaluate(config)
  ckpts = tmp_path / "run" / "checkpoints"
  assert sorted(os.listdir(ckpts)) == ["4", "8"]
  for step in ("4", "8"):
    victim = _largest_file(ckpts / step / "state")
    with open(victim, "r+b") as f:
      f.truncate(os.path.getsize(victim) // 2)
  before = _tree_snapshot(tmp_path / "run")
  longer = tiny_config(tmp_path / "run", train__steps=12)  # a run at its end is left alone without a restore
  with pytest.raises(RuntimeError, match=r"no checkpoint could be restored: step 8: .+; step 4: .+"):
    train_and_evaluate(longer)
  after = _tree_snapshot(tmp_path / "run")
  # The resume attempt records its config (train.steps=12) and logs the failures to train.log; everything else,
  # every checkpoint file and metrics.jsonl, is as it was.
  assert json.loads(after.pop("config.json"))["train"]["steps"] == 12
  assert b"checkpoint 8 cannot be restored" in after.pop("train.log")
  assert after == {k: v for k, v in before.items() if k not in ("config.json", "train.log")}


def _poison_loss(monkeypatch, predicate):
  """Makes the loss NaN on the batches where predicate(tokens) holds (a traced, per-batch condition)."""
  original = trainer_lib._loss_sums

  def poisoned(graphdef, params, batch, *args):
    total, aux = original(graphdef, params, batch, *args)
    return jnp.where(predicate(batch["tokens"]), jnp.nan, total), aux

  monkeypatch.setattr(trainer_lib, "_loss_sums", poisoned)


def _poison_gradients(monkeypatch, leaves, predicate=lambda tokens: True):
  """Makes the gradients of the parameters at flat indices `leaves` NaN where predicate(tokens) holds, the loss
  staying finite: sqrt(0 * |p|) adds 0 to the loss and has the derivative inf * 0 = NaN."""
  original = trainer_lib._loss_sums

  def poisoned(graphdef, params, batch, *args):
    total, aux = original(graphdef, params, batch, *args)
    flat = jax.tree.leaves(params)
    nan_grad = sum(jnp.sum(jnp.sqrt(0.0 * jnp.abs(flat[i]))) for i in leaves)
    return total + jnp.where(predicate(batch["tokens"]), nan_grad, 0.0), aux

  monkeypatch.setattr(trainer_lib, "_loss_sums", poisoned)


def _param_paths(config):
  """The parameter paths in the order of the train state's leaves (the order the trainer names them in)."""
  from flax import nnx

  from gsa_jax.models import GSALM
  from gsa_jax.train.config import validate_config

  params = nnx.state(nnx.eval_shape(lambda: GSALM(validate_config(config), rngs=nnx.Rngs(0))), nnx.Param)
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def test_nonfinite_abort_names_the_step_and_keeps_checkpoints(tmp_path, monkeypatch):
  config = tiny_config(tmp_path / "run", train__steps=12)
  train_and_evaluate(config)
  before = final_state(config.workdir)
  paths = _param_paths(config)
  _poison_gradients(monkeypatch, leaves=[5, 2])  # two bad parameters: the first in the state's order is named
  config.train.steps = 20
  with pytest.raises(NonFiniteError, match=r"step 13: non-finite loss or gradient \(first parameter with a "
                                           rf"non-finite gradient: {re.escape(paths[2])};"):
    train_and_evaluate(config)
  step, state = final_state(config.workdir)
  assert step == 12
  jax.tree.map(np.testing.assert_array_equal, state, before[1])


def test_nonfinite_skip_leaves_params_and_optimizer_unchanged(tmp_path, monkeypatch, caplog):
  """Steps 5..8 have NaN gradients (finite loss): the state saved at step 8 holds step 4's params and optimizer
  state exactly, each skipped step is logged naming the parameter, and the counters count them."""
  config = tiny_config(tmp_path / "run", train__steps=4, train__nonfinite="skip")
  train_and_evaluate(config)
  _, good = final_state(config.workdir)
  paths = _param_paths(config)
  _poison_gradients(monkeypatch, leaves=[3])
  config.train.steps = 8
  with caplog.at_level("WARNING"):
    train_and_evaluate(config)
  step, skipped = final_state(config.workdir)
  assert step == 8
  for part in ("params", "opt_state"):
    jax.tree.map(np.testing.assert_array_equal, skipped[part], good[part])
  assert int(skipped["nonfinite_in_a_row"]) == int(skipped["nonfinite_total"]) == 4
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  for n, s in enumerate(range(5, 9), start=1):
    assert any(w.startswith(f"step {s}: non-finite loss/gradient (first parameter with a non-finite gradient: "
                            f"{paths[3]}); step skipped ({n} in a row)") for w in warnings), warnings
  rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
  assert [r["nonfinite_total"] for r in rows] == [0, 0, 0, 0, 1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) for r in rows)  # the loss itself stayed finite: the gradients were the cause


def test_nonfinite_skip_counts_bad_steps_and_stops_after_n_in_a_row(tmp_path, monkeypatch):
  # Skip bad batches: the run finishes and counts them.
  config = tiny_config(tmp_path / "skip", train__steps=12, train__nonfinite="skip")
  _poison_loss(monkeypatch, lambda tokens: jnp.sum(tokens) % 3 == 0)
  last = train_and_evaluate(config)
  rows = read_jsonl(tmp_path / "skip" / "metrics.jsonl")
  bad = [r["step"] for r in rows if not np.isfinite(r["loss"])]
  assert bad and last["nonfinite_total"] == len(bad)
  step, state = final_state(config.workdir)
  assert int(state["nonfinite_total"]) == len(bad)  # the counter is part of the checkpoint

  # Always bad: stops after max_nonfinite_in_a_row consecutive bad steps.
  _poison_loss(monkeypatch, lambda tokens: True)
  config = tiny_config(tmp_path / "stop", train__steps=12, train__nonfinite="skip", train__max_nonfinite_in_a_row=3)
  with pytest.raises(NonFiniteError, match=r"step 3: .*the loss is not finite; .* 3 bad step\(s\) in a row"):
    train_and_evaluate(config)


@pytest.mark.parametrize("args,message", [
    (["--config.data.source=text", "--config.data.path=/nonexistent/corpus.txt"], r"data.path"),
    (["--config.data.source=text", "--config.data.path={empty}"], r"data.path"),
    (["--config.data.source=text", "--config.data.path={text}", "--config.data.tokenizer={bad_tokenizer}"],
     r"data.tokenizer: cannot load '.*tokenizer.json' as a tokenizer.json"),
])
def test_bad_data_fails_early_and_writes_nothing(tmp_path, args, message):
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "text.txt").write_text("some text\nmore text\n" * 50)
  (tmp_path / "tokenizer.json").write_text("{not json")
  files = {"empty": tmp_path / "empty.txt", "text": tmp_path / "text.txt", "bad_tokenizer": tmp_path / "tokenizer.json"}
  workdir = tmp_path / "run"
  result = run_train_py(f"--config.workdir={workdir}", *[a.format(**files) for a in args])
  assert result.returncode == 2, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert re.search(message, result.stderr), result.stderr[-2000:]
  assert not workdir.exists()


# ---- numerics ------------------------------------------------------------------------------------------------------

def _op_value_and_grads(backend, dtype, q, k, v, s, g, *, cotangent=None, initial_state=None, **kw):
  """o, the final state and the gradients of sum(o * cotangent) + sum(hk) + sum(hv) w.r.t. q, k, v, s, g and the
  initial state when given (inputs cast to dtype, the state in float32 or float64; cotangent None: all ones)."""
  state_dtype = jnp.float64 if dtype == jnp.float64 else jnp.float32

  def loss(q, k, v, s, g, state):
    o, final = gated_slot_attention(q, k, v, s, g, initial_state=state, output_final_state=True, backend=backend,
                                    **kw)
    o = o.astype(state_dtype)
    weighted = o if cotangent is None else o * jnp.asarray(cotangent, state_dtype)
    return jnp.sum(weighted) + jnp.sum(final.hk) + jnp.sum(final.hv), (o, final.hk, final.hv)

  with jax.enable_x64(dtype == jnp.float64):
    state = None if initial_state is None else tuple(jnp.asarray(x, state_dtype) for x in initial_state)
    (_, outs), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5), has_aux=True))(
        *(jnp.asarray(x, dtype) for x in (q, k, v, s, g)), state)
    names = ("o", "hk", "hv", "dq", "dk", "dv", "ds", "dg")
    values = dict(zip(names, (*outs, *grads[:5])))
    if state is not None:
      values["dhk0"], values["dhv0"] = grads[5]
    return {name: np.asarray(x, np.float64) for name, x in values.items()}


@pytest.mark.parametrize("backend", ["chunked", "recurrent"])
def test_op_at_65536_tokens_with_extreme_gates_matches_float64(backend):
  """Finite, and equal to the float64 recurrence: outputs and states to 1e-5; gradients to 1e-3 (q and k of size
  30 make the slot softmax sharp, which amplifies float32 rounding in the backward)."""
  t, m = 65_536, 8
  key = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(key[0], (1, t, 1, 16)) * 30
  k = jax.random.normal(key[1], (1, t, 1, 16)) * 30
  v = jax.random.normal(key[2], (1, t, 1, 16))
  g = -jnp.exp(jax.random.uniform(key[3], (1, t, 1, m), minval=-20, maxval=np.log(1e3)))  # in [-1e3, -2e-9]
  g = jnp.where(jax.random.uniform(key[4], g.shape) < 0.1, 0.0, g)  # and exact zeros
  s = jax.random.uniform(key[4], (1, t, 1, m))
  got = _op_value_and_grads(backend, jnp.float32, q, k, v, s, g, chunk_size=16)
  ref = _op_value_and_grads("recurrent", jnp.float64, q, k, v, s, g)
  for name, value in got.items():
    assert np.isfinite(value).all(), name
    err, tol = rel_err(value, ref[name]), 1e-5 if name in ("o", "hk", "hv") else 1e-3
    assert err <= tol, f"{name}: relative L2 error {err:.2e} > {tol:.0e}"


def test_op_fuzz_matches_float64():
  """Seeded random shapes, scales and gates in [-1e3, 0], packed segments (padding included), initial states, a
  random cotangent, float32 and bfloat16, forward and backward: both backends finite and close to the float64
  recurrence on the same (rounded) inputs, and the chunked form no further from it than the step-by-step recurrence
  run in the same precision (2x its error + 1e-6): a formulation error cannot hide under the rounding of large
  inputs. Outer bars: float32 rounding of slot logits of size ~scale^2 is amplified by the softmax, so 1e-5 *
  scale^2 (at least 1e-5); bfloat16 outputs and gradients are rounded to 8 bits, so 1.5e-2."""
  rng = np.random.default_rng(0)
  for _ in range(8):
    b, t, h, grp = int(rng.integers(1, 3)), int(rng.integers(1, 90)), int(rng.integers(1, 3)), int(rng.integers(1, 3))
    dk, dv, m = (int(x) for x in rng.integers(1, 24, 3))
    dtype = [jnp.float32, jnp.bfloat16][int(rng.integers(0, 2))]
    scale = float(10 ** rng.uniform(-1, 2))
    x = {n: np.asarray(jnp.asarray(rng.standard_normal(shape) * scale, dtype), np.float64) for n, shape in
         (("q", (b, t, h * grp, dk)), ("k", (b, t, h, dk)), ("v", (b, t, h, dv)))}
    g = -(10 ** rng.uniform(-8, 3, (b, t, h, m))) * (rng.uniform(size=(b, t, h, m)) > 0.2)
    x["g"] = np.asarray(jnp.asarray(g, dtype), np.float64)
    x["s"] = np.asarray(jnp.asarray(rng.uniform(0, 1, (b, t, h, m)), dtype), np.float64)
    ids = jnp.asarray(np.sort(rng.integers(0, 4, (b, t)), axis=1), jnp.int32)
    kw = {"segment_ids": ids, "cotangent": rng.standard_normal((b, t, h * grp, dv)),
          "initial_state": (rng.standard_normal((b, h, dk, m)), rng.standard_normal((b, h, m, dv)))}
    args = [x[n] for n in "qkvsg"]
    ref = _op_value_and_grads("recurrent", jnp.float64, *args, **kw)
    tol = 1.5e-2 if dtype == jnp.bfloat16 else 1e-5 * max(1.0, scale) ** 2
    errors = {}
    for backend in ("recurrent", "chunked"):
      got = _op_value_and_grads(backend, dtype, *args, chunk_size=16, **kw)
      assert set(got) == set(ref)
      for name, value in got.items():
        case = (backend, name, b, t, h, grp, dk, dv, m, jnp.dtype(dtype).name, scale)
        assert np.isfinite(value).all(), case
        errors[backend, name] = rel_err(value, ref[name])
        assert errors[backend, name] <= tol, (errors[backend, name], tol, case)
    for name in ref:
      assert errors["chunked", name] <= 2 * errors["recurrent", name] + 1e-6, (name, errors, case)


def test_model_is_finite_in_bfloat16_with_large_activations():
  from flax import nnx

  from gsa_jax.models import GSALM, GSAConfig

  config = GSAConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_slots=8, dtype="bfloat16",
                     use_short_conv=True)
  model = GSALM(config, rngs=nnx.Rngs(0))
  # Blow the embeddings up: activations of order 1e3 reach every layer.
  model.embed.embedding[...] = model.embed.embedding[...] * 1e4
  tokens = jax.random.randint(jax.random.key(1), (2, 300), 0, 64)

  def loss(model):
    logits = model(tokens)
    return jnp.mean(jax.nn.logsumexp(logits, -1))

  value, grads = nnx.value_and_grad(loss)(model)
  assert np.isfinite(float(value))
  assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("backend", ["chunked", "recurrent"])
def test_model_is_finite_at_65536_tokens(backend):
  from flax import nnx

  from gsa_jax.models import GSALM, GSAConfig

  config = GSAConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=1, num_slots=4, intermediate_size=32,
                     use_short_conv=True, backend=backend, chunk_size=16, gate_logit_normalizer=0.1)
  model = GSALM(config, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(2), (1, 65_536), 0, 64)

  @nnx.jit
  def value_and_grad(model):
    return nnx.value_and_grad(lambda m: jnp.mean(jax.nn.logsumexp(m(tokens), -1)))(model)

  value, grads = value_and_grad(model)
  assert np.isfinite(float(value))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
