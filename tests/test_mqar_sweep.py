"""benchmarks/mqar_sweep.py: the learning-rate / seed sweep, best-lr tables, --report-only, and one tiny sweep."""

from __future__ import annotations

import argparse
import json

import pytest

from benchmarks import mqar_grid, mqar_results, mqar_sweep, mqar_tables, mqar_trainer


def row(model, width, lr, accuracy, seed=0, status="ok"):
  r = {"model": model, "width": width, "seq_len": 32, "kv_pairs": 8, "learning_rate": lr, "seed": seed,
       "status": status, "steps": 10, "batch_size": 4, "device": "cpu"}
  return {**r, "accuracy": accuracy} if status == "ok" else {**r, "reason": "time budget of 1 s spent"}


def test_plan_runs_every_learning_rate_and_seed_of_a_cell_together():
  a = argparse.Namespace(seq_lens=[32], kv_pairs=[4, 8], pair_kv_with_len=False, widths=[64],
                                    models=["attention", "gsa:8"], learning_rates=[1e-3, 1e-2], seeds=[0, 1])
  runs = mqar_grid.plan(a)
  assert len(runs) == 2 * 2 * 2 * 2  # models x lrs x seeds x kv
  assert {(r.lr, r.seed) for r in runs[:8]} == {(1e-3, 0), (1e-3, 1), (1e-2, 0), (1e-2, 1)}
  assert {r.model for r in runs[:8]} == {"attention"}


def test_tables_report_the_best_learning_rate_per_cell():
  rows = [row("attention", 64, 1e-3, 0.99), row("attention", 64, 1e-2, 0.12),
          row("gsa:8", 64, 1e-3, 0.40), row("gsa:8", 64, 1e-2, 0.90, seed=0), row("gsa:8", 64, 1e-2, 0.80, seed=1),
          row("gsa:8", 64, 1e-3, None, seed=1, status="not run")]
  text = mqar_tables.tables(rows)
  assert "| attention | 99.0 (lr 0.001) |" in text
  assert "| gsa:8 | 85.0 [80.0-90.0] (lr 0.01)* |" in text  # mean over seeds; one run of the cell did not run
  assert "| gsa:8 | 64 | 40.0 | 85.0 [80.0-90.0] |" in text  # the every-lr table


def test_single_learning_rate_keeps_the_plain_table():
  text = mqar_tables.tables([row("attention", 64, 1e-2, 0.5), row("attention", 128, 1e-2, 0.75)])
  assert "| attention | 50.0 | 75.0 |" in text
  assert "Every learning rate" not in text and "(lr " not in text


def test_report_only_rewrites_tables_and_plot(tmp_path):
  with open(tmp_path / "results.jsonl", "w") as f:
    for r in (row("attention", 64, 1e-3, 0.99), row("attention", 64, 3e-3, 0.5), row("gsa:8", 64, 3e-3, 0.7)):
      f.write(json.dumps(r) + "\n")
  mqar_sweep.main(["--report-only", "--out", str(tmp_path)])
  text = (tmp_path / "results.md").read_text()
  assert "lr 0.001, 0.003 (best per cell)" in text and "| gsa:8 | 70.0 (lr 0.003) |" in text
  assert (tmp_path / "mqar_sweep.png").exists()


def test_tiny_sweep_trains_each_learning_rate_and_a_rerun_skips_them(tmp_path):
  args = ["--out", str(tmp_path), "--models", "gsa:4", "--seq-lens", "16", "--kv-pairs", "2", "--widths", "16",
          "--steps", "2", "--warmup-steps", "1", "--batch-size", "2", "--eval-batches", "1", "--chunk-size", "8",
          "--time-budget-s", "0", "--learning-rates", "1e-3,1e-2", "--dtype", "bfloat16"]
  mqar_sweep.main(args)
  rows = [json.loads(line) for line in open(tmp_path / "results.jsonl")]
  assert [(r["learning_rate"], r["status"], r["dtype"]) for r in rows] == [(1e-3, "ok", "bfloat16"),
                                                                           (1e-2, "ok", "bfloat16")]
  mqar_sweep.main(args)  # everything is done: nothing is trained or appended
  assert len(open(tmp_path / "results.jsonl").readlines()) == 2


@pytest.mark.slow
def test_cell_trainer_matches_separate_runs_of_the_plain_train_step():
  """The vmapped runs of a cell (their own lr, seed, init and data) follow what the trainer's step does alone."""
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from gsa_jax.data.mqar import mqar_batch
  from gsa_jax.models import GSALM
  from gsa_jax.train.config import validate_config
  from gsa_jax.train.optimizer import learning_rate_schedule, make_optimizer
  from gsa_jax.train.trainer import make_train_step

  a = argparse.Namespace(out="unused", batch_size=4, steps=3, warmup_steps=1, vocab_size=32,
                                    eval_batches=1, backend="chunked", chunk_size=8, dtype="float32")
  members = [(1e-3, 0), (3e-2, 0), (1e-2, 1)]
  runs = [mqar_grid.Run(16, 16, 2, "gsa:4", lr, seed) for lr, seed in members]
  trainer = mqar_trainer.CellTrainer(mqar_grid.run_config(runs[0], a), members)
  state = trainer.init(trainer.lrs, trainer.seeds)
  keys = jnp.stack([mqar_trainer.train_keys(seed, a.steps) for _, seed in members])
  state, losses = trainer.train(state, keys)
  assert losses.shape == (3, a.steps) and np.all(np.isfinite(losses))

  for i, run in enumerate(runs):
    config = mqar_grid.run_config(run, a)
    model_cfg = validate_config(config)
    model = GSALM(model_cfg, rngs=nnx.Rngs(run.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = make_optimizer(config.optim, a.steps)
    step = jax.jit(make_train_step(graphdef, tx, learning_rate_schedule(config.optim, a.steps), 1))
    alone = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
             "nonfinite_in_a_row": jnp.zeros((), jnp.int32), "nonfinite_total": jnp.zeros((), jnp.int32)}
    d = config.data
    make_batch = functools.partial(mqar_batch, batch_size=4, seq_len=16, vocab_size=32, num_kv_pairs=2,
                                   power_a=float(d.mqar_power_a), random_non_queries=d.mqar_random_non_queries)
    for t, key in enumerate(mqar_trainer.train_keys(run.seed, a.steps)):
      alone, metrics = step(alone, make_batch(key))
      np.testing.assert_allclose(losses[i, t], metrics["loss"], rtol=1e-5)
    mine = jax.tree.map(lambda x: x[i], state["params"])
    for got, want in zip(jax.tree.leaves(mine), jax.tree.leaves(alone["params"])):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  # The learning rates differ, so the runs' parameters do too.
  emb = jax.tree.leaves(state["params"])[0]
  assert not np.allclose(emb[0], emb[1])


@pytest.mark.slow
def test_shards_split_the_cells_and_report_only_merges_their_files(tmp_path):
  args = ["--out", str(tmp_path), "--models", "gsa:4,attention", "--seq-lens", "16", "--kv-pairs", "2",
          "--widths", "16", "--steps", "2", "--warmup-steps", "1", "--batch-size", "2", "--eval-batches", "1",
          "--chunk-size", "8", "--time-budget-s", "0"]
  mqar_sweep.main(args + ["--shard", "0/2"])
  mqar_sweep.main(args + ["--shard", "1/2"])
  shard_rows = [[json.loads(line)["model"] for line in open(tmp_path / f"results.shard{i}of2.jsonl")] for i in (0, 1)]
  assert shard_rows == [["gsa:4"], ["attention"]]
  mqar_sweep.main(["--report-only", "--out", str(tmp_path)])
  text = (tmp_path / "results.md").read_text()
  assert "| gsa:4 |" in text and "| attention |" in text
  assert not (tmp_path / "results.md").exists() or "| attention |" in (tmp_path / "results.md").read_text()
  mqar_sweep.main(args)  # unsharded: both cells are already done in the shards' files
  assert not (tmp_path / "results.jsonl").exists()
  mqar_sweep.main(args + ["--shard", "3/4"])  # a shard with no cell trains nothing and reports so


def test_read_rows_prefers_a_finished_row_over_a_not_run_one(tmp_path):
  with open(tmp_path / "results.jsonl", "w") as f:
    f.write(json.dumps(row("gsa:8", 64, 1e-2, None, status="not run")) + "\n")
  with open(tmp_path / "results.shard0of2.jsonl", "w") as f:
    f.write(json.dumps(row("gsa:8", 64, 1e-2, 0.9)) + "\n")
  with open(tmp_path / "results.shard1of2.jsonl", "w") as f:
    f.write(json.dumps(row("gsa:8", 64, 1e-2, None, status="not run")) + "\n")
  rows = mqar_results.read_rows(str(tmp_path))
  assert [(r["status"], r["accuracy"]) for r in rows] == [("ok", 0.9)]


def test_shard_argument_is_checked():
  with pytest.raises(SystemExit):
    mqar_sweep.main(["--shard", "2/2", "--report-only", "--out", "unused"])


def test_read_rows_keeps_the_matching_settings_and_skips_a_cut_line(tmp_path):
  old = {**row("gsa:8", 64, 1e-2, 0.5), "warmup_steps": 1, "vocab_size": 32, "eval_batches": 1,
         "train_data": "device"}  # no "dtype": written before the flag, float32
  bf16 = {**old, "dtype": "bfloat16", "accuracy": 0.9}
  with open(tmp_path / "results.jsonl", "w") as f:
    f.write(json.dumps(old) + "\n" + json.dumps(bf16) + "\n" + '{"model": "gsa:8", "wid')
  settings = mqar_results.row_settings(old)
  assert settings["dtype"] == "float32"
  assert [r["accuracy"] for r in mqar_results.read_rows(str(tmp_path), settings)] == [0.5]
  assert [r["accuracy"] for r in mqar_results.read_rows(str(tmp_path), {**settings, "dtype": "bfloat16"})] == [0.9]
  with pytest.raises(SystemExit):  # report-only refuses to put the two settings in one table
    mqar_sweep.main(["--report-only", "--out", str(tmp_path)])


def test_tables_order_models_and_leave_out_cells_never_planned():
  rows = [row("nogate:16", 64, 1e-3, 0.5), row("gsa:128", 64, 1e-3, 0.7), row("gsa:16", 128, 1e-3, 0.6),
          row("attention", 128, 1e-3, 0.9), row("gsa:16", 64, 1e-2, 0.3)]
  text = mqar_tables.tables(rows)
  best = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| ") and "d = " not in line
          and line.count("|") == 4]
  assert best == ["| attention", "| gsa:16", "| gsa:128", "| nogate:16"]
  assert "| attention | - | 90.0 (lr 0.001) |" in text  # planned at one width only
  every_lr = [line for line in text.splitlines() if line.count("|") == 5 and "lr " not in line and "---" not in line]
  assert [line.split(" | ")[:2] for line in every_lr] == [["| attention", "128"], ["| gsa:16", "64"],
                                                         ["| gsa:16", "128"], ["| gsa:128", "64"],
                                                         ["| nogate:16", "64"]]


@pytest.mark.slow
def test_workers_run_the_shards_as_processes_and_merge_them(tmp_path, capsys):
  args = ["--out", str(tmp_path), "--models", "gsa:4,attention", "--seq-lens", "16", "--kv-pairs", "2",
          "--widths", "16", "--steps", "2", "--warmup-steps", "1", "--batch-size", "2", "--eval-batches", "1",
          "--chunk-size", "8", "--time-budget-s", "0", "--workers", "2"]
  mqar_sweep.main(args)
  shard_rows = [[json.loads(line)["model"] for line in open(tmp_path / f"results.shard{i}of2.jsonl")] for i in (0, 1)]
  assert shard_rows == [["gsa:4"], ["attention"]]
  text = (tmp_path / "results.md").read_text()
  assert "| gsa:4 |" in text and "| attention |" in text
  out = capsys.readouterr().out
  assert "worker 0: [1/1] L=16 kv=2 d=16 gsa:4" in out and "worker 1: [1/1] L=16 kv=2 d=16 attention" in out
  with pytest.raises(SystemExit):
    mqar_sweep.main(args + ["--shard", "0/2"])


def test_a_failing_worker_is_reported_and_fails_the_sweep(tmp_path, capsys):
  with pytest.raises(SystemExit, match="workers 0 failed"):  # --backend nonsense: the worker with the cell fails
    mqar_sweep.main(["--out", str(tmp_path), "--models", "gsa:4", "--seq-lens", "16", "--kv-pairs", "2",
                     "--widths", "16", "--steps", "2", "--batch-size", "2", "--eval-batches", "1",
                     "--backend", "nonsense", "--workers", "2"])
  assert "worker 0 failed" in capsys.readouterr().out
