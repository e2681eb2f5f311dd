"""benchmarks/bench_train.py --compare, benchmarks/bench_long_context.py, benchmarks/cells.py and
benchmarks/bench_data.py (no timing is checked: the cells are faked, except one tiny real comparison marked slow)
and the baselines they time."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gsa_jax.models import GSAConfig, all_attention, gsa_1p3b, hybrid, mixer_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import bench_long_context as lc  # noqa: E402
from benchmarks.cells import failure_status, run_cell  # noqa: E402


def test_baselines_keep_the_model_and_change_only_the_mixers():
  c = gsa_1p3b()
  a, h = all_attention(c), hybrid(c)
  assert a.attn_layers == tuple(range(24)) and a.resolved_attn_num_heads == 16  # head width 128
  assert h.attn_layers == (5, 11, 17, 23)
  assert abs(a.num_params() / c.num_params() - 1) < 0.01
  for other in (a, h):
    assert other.replace(attn_layers=(), attn_num_heads=None) == c
  assert mixer_layout(a, "gsa").attn_layers == ()
  assert mixer_layout(GSAConfig(num_layers=4, hidden_size=64), "hybrid").attn_layers == (3,)  # short models too
  with pytest.raises(ValueError, match="layout: 'transformer'"):
    mixer_layout(c, "transformer")
  with pytest.raises(ValueError, match="every: must be an int in \\[1, num_layers=24\\]; got 0"):
    hybrid(c, 0)


def test_bench_data_times_train_pys_iterator_and_refuses_a_bad_config():
  from benchmarks import bench_data
  from configs import mqar
  c = mqar.get_config()
  row = bench_data.time_pipeline(c.data, batch_size=4, seq_len=32, seed=0, batches=3, warmup=1)
  assert row["tokens_per_s"] > 0 and row["batch_ms"] > 0
  out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_data.py"),
                        "--config=configs/code_lm.py:gsa,tiny", "--batches=1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
  assert out.returncode == 2 and "error: data.path: empty" in out.stderr


def test_failure_status_names_oom_and_timeout():
  assert failure_status(None, "") == "timeout"
  assert failure_status(1, "jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory") == "oom"
  assert failure_status(1, "ValueError: bad") == "error"


def test_run_cell_returns_the_child_row_or_its_failure(tmp_path):
  script = tmp_path / "child.py"
  script.write_text("import json, sys\nargs = dict(a[2:].split('=', 1) for a in sys.argv[1:])\n"
                    "if args['mode'] == 'ok': json.dump({'x': 1}, open(args['result_json'], 'w'))\n"
                    "elif args['mode'] == 'oom': sys.exit('RESOURCE_EXHAUSTED: Out of memory allocating')\n"
                    "else: import time; time.sleep(30)\n")
  assert run_cell([str(script), "--mode=ok"], 30) == {"status": "ok", "x": 1}
  assert run_cell([str(script), "--mode=oom"], 30)["status"] == "oom"
  assert run_cell([str(script), "--mode=sleep"], 1)["status"] == "timeout"


def test_long_context_plan_keeps_tokens_per_step():
  cells = lc.plan(["gsa", "attention"], [65536, 4096, 16384], 16384)
  assert cells == [("gsa", 4096, 4), ("attention", 4096, 4), ("gsa", 16384, 1), ("attention", 16384, 1),
                   ("gsa", 65536, 1), ("attention", 65536, 1)]


def _fake_cell(calls):
  """A run_cell stand-in: attention runs out of memory past T = 8 unless remat is 'block', and never at T = 32."""
  def run(argv, timeout_s):
    args = dict(a[2:].split("=", 1) for a in argv[1:] if a.startswith("--"))
    layout, t, remat = args["layout"], int(args["config.train.seq_len"]), args["config.model.remat"]
    calls.append((layout, t, remat))
    if layout == "attention" and (t == 32 or (t > 8 and remat != "block")):
      return {"status": "oom", "detail": "RESOURCE_EXHAUSTED"}
    return {"status": "ok", "tokens_per_s": 1000.0 * (2 if layout == "gsa" else 1), "peak_gib": 1.0, "step_ms": 5.0,
            "device": "1 x fake"}
  return run


def test_long_context_retries_remat_reports_oom_and_resumes(tmp_path):
  argv = ["--config=configs/lm_tiny.py", "--layouts=gsa,attention", "--seq_lens=8,16,32", "--tokens_per_step=16",
          "--remat=matmuls,block", f"--out={tmp_path}"]
  calls = []
  lc.main(argv, run=_fake_cell(calls))
  assert ("attention", 16, "matmuls") in calls and ("attention", 16, "block") in calls
  rows = {(r["layout"], r["seq_len"]): r for r in json.load(open(tmp_path / "long_context.json"))}
  assert rows[("attention", 16)]["status"] == "ok" and rows[("attention", 16)]["oom_remat"] == ["matmuls"]
  assert rows[("attention", 32)]["status"] == "oom"
  text = (tmp_path / "long_context.md").read_text()
  assert "does not fit (OOM with remat matmuls, block)" in text
  assert "| 8 | 2 | 2,000 tok/s" in text and "| 2.00x |" in text
  calls.clear()
  lc.main(argv + ["--seq_lens=8,16,32,64"], run=_fake_cell(calls))  # a rerun measures only the new length
  assert {c[1] for c in calls} == {64}


def test_long_context_budget_leaves_cells_out(tmp_path):
  calls = []
  lc.main(["--layouts=gsa", "--seq_lens=8,16", "--budget_s=0", f"--out={tmp_path}"], run=_fake_cell(calls))
  assert not calls and "not run" not in (tmp_path / "long_context.md").read_text()


def test_synthetic_rows_hold_the_documents_asked_for():
  from benchmarks.bench_train import synthetic_batch  # noqa: PLC0415
  rng = np.random.default_rng(0)
  one = synthetic_batch(rng, 3, 32, 100)
  assert (one["segment_ids"] == 1).all() and one["tokens"].shape == one["targets"].shape == (3, 32)
  np.testing.assert_array_equal(one["tokens"][:, 1:], one["targets"][:, :-1])
  packed = synthetic_batch(rng, 3, 32, 100, documents_per_row=5)["segment_ids"]
  assert (packed[:, 0] == 1).all() and (packed[:, -1] == 5).all()
  assert ((np.diff(packed, axis=1) == 0) | (np.diff(packed, axis=1) == 1)).all()  # 1..5, each a run
  whole = synthetic_batch(rng, 2, 8, 100, documents_per_row=8)["segment_ids"]
  np.testing.assert_array_equal(whole, np.tile(np.arange(1, 9), (2, 1)))  # one token a document


def test_bench_train_refuses_an_unknown_layout():
  proc = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--config=configs/lm_tiny.py",
                         "--compare=gsa,transformer"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "'transformer' is unknown" in proc.stderr


@pytest.mark.slow
def test_bench_train_compare_prints_one_table_and_writes_json(tmp_path):
  out = tmp_path / "rows.json"
  proc = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--config=configs/lm_tiny.py",
                         "--config.train.batch_size=2", "--config.train.seq_len=32", "--warmup=1", "--steps=1",
                         "--compare=gsa,attention", f"--json={out}"], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = json.load(open(out))
  assert [(r["model"], r["status"], r["attn_layers"]) for r in rows] == [("gsa", "ok", 0), ("attention", "ok", 4)]
  assert all(r["tokens_per_s"] > 0 and r["flops_per_token"] > 0 for r in rows)
  assert all(0 < r["lower_s"] < r["compile_s"] for r in rows)
  assert proc.stdout.count("| attention |") == 0 and "attention | 0.00" in proc.stdout


def test_attention_preset_is_the_1p3b_model_with_attention_everywhere():
  from configs import attention_1p3b, gsa_1p3b as gsa_preset  # noqa: PLC0415
  from gsa_jax.train.config import validate_config  # noqa: PLC0415

  attention, gsa = (validate_config(m.get_config(), check_data=False) for m in (attention_1p3b, gsa_preset))
  assert attention == all_attention(gsa)
