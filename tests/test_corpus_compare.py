"""benchmarks/code_corpus.py (the real-code corpus: split by package, duplicates, manifest, tokenizer) and
benchmarks/code_lm_compare.py (the equal-budget comparison): its plan, its recall probe, and one end-to-end run on
CPU with tiny models on two small installed packages, one run made to fail."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # code_lm_compare imports code_corpus by name
code_corpus = _load("code_corpus")
compare = _load("code_lm_compare")


def fake_site_packages(root):
  """Three packages: `alpha` (two modules), `beta` (which vendors a copy of alpha's core.py), `gamma` (a single-file
  module), plus what must be ignored: metadata, caches, a non-UTF-8 file, an editable-install finder."""
  files = {
      "alpha/__init__.py": "from alpha.core import compute_total\n",
      "alpha/core.py": "def compute_total(values):\n  running_total = 0\n  for v in values:\n"
                       "    running_total += v\n  return running_total\n" * 3,
      "beta/__init__.py": "class WidgetFactory:\n  def build_widget(self):\n    return WidgetFactory()\n",
      "beta/_vendor/core.py": None,  # a copy of alpha/core.py
      "beta/latin1.py": b"# caf\xe9\n",
      "gamma.py": "GAMMA_CONSTANT = 42\nprint(GAMMA_CONSTANT)\n",
      "alpha-1.0.dist-info/METADATA.py": "ignored = 1\n",
      "__editable___ours_finder.py": "ignored = 1\n",
      "alpha/__pycache__/core.py": "ignored = 1\n",
  }
  files["beta/_vendor/core.py"] = files["alpha/core.py"]
  for rel, content in files.items():
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(content if isinstance(content, bytes) else content.encode())
  return str(root)


def read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_corpus_splits_by_package_drops_copies_and_records_hashes(tmp_path):
  root = fake_site_packages(tmp_path / "site")
  out = tmp_path / "corpus"
  m = code_corpus.build(str(out), roots=[root], heldout=["beta"], vocab_size=300)
  train = [r for shard in m["train"]["shards"] for r in read_jsonl(out / shard["path"])]
  held = read_jsonl(out / "heldout.jsonl")
  assert sorted(r["package"] for r in train) == ["alpha", "alpha", "gamma"]
  # beta's vendored copy of alpha/core.py is not held out (it was seen in training); its Latin-1 file is skipped.
  assert [(r["package"], r["path"]) for r in held] == [("beta", "beta/__init__.py")]
  assert m["skipped_files"] == {"too_large": 0, "not_utf8": 1, "empty": 0, "duplicate": 1}
  assert sorted(m["train"]["packages"]) == ["alpha", "gamma"] and list(m["heldout"]["packages"]) == ["beta"]
  for entry in m["train"]["shards"] + m["heldout"]["shards"] + [m["tokenizer"]]:
    data = (out / entry["path"]).read_bytes()
    assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["bytes"], entry["sha256"])
  assert json.loads((out / "manifest.json").read_text()) == m
  from gsa_jax.data import load_tokenizer
  tok = load_tokenizer(str(out / "tokenizer.json"))
  assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, m["tokenizer"]["vocab_size"])
  assert tok.decode(tok.encode(held[0]["text"])) == held[0]["text"]


def test_the_data_pipeline_reads_the_shards(tmp_path):
  from gsa_jax.data import data_config_defaults
  from gsa_jax.data.config import validate_data_config
  out = tmp_path / "corpus"
  code_corpus.build(str(out), roots=[fake_site_packages(tmp_path / "site")], heldout=["gamma"], vocab_size=300)
  c = data_config_defaults()
  c.source, c.path, c.tokenizer, c.eval_fraction = "text", str(out / "train-*.jsonl"), str(out / "tokenizer.json"), 0.0
  validate_data_config(c, seq_len=32, read_all=True)


def test_drawn_heldout_holds_the_fraction_and_never_one_huge_package():
  sizes = {"huge": 900, **{f"p{i}": 10 for i in range(10)}}
  chosen = code_corpus.choose_heldout(sizes, 0.05, seed=0)
  assert "huge" not in chosen and 0 < sum(sizes[n] for n in chosen) <= 0.05 * sum(sizes.values())
  assert chosen == code_corpus.choose_heldout(sizes, 0.05, seed=0)
  assert chosen != code_corpus.choose_heldout(sizes, 0.05, seed=1) or len(chosen) == 10


def test_a_given_tokenizer_is_copied_so_a_rebuild_has_the_same_ids(tmp_path):
  root = fake_site_packages(tmp_path / "site")
  first = code_corpus.build(str(tmp_path / "a"), roots=[root], heldout=["beta"], vocab_size=300)
  again = code_corpus.build(str(tmp_path / "b"), roots=[root], heldout=["beta"],
                            tokenizer=str(tmp_path / "a" / "tokenizer.json"))
  assert (tmp_path / "b" / "tokenizer.json").read_bytes() == (tmp_path / "a" / "tokenizer.json").read_bytes()
  assert again["tokenizer"]["sha256"] == first["tokenizer"]["sha256"]
  assert again["tokenizer"]["copied_from"] == str(tmp_path / "a" / "tokenizer.json")
  assert again["tokenizer"]["trained_on_files"] == 0
  assert compare.corpus_fingerprint(again) == compare.corpus_fingerprint(first)
  (tmp_path / "not_a_tokenizer.json").write_text("{}")
  with pytest.raises(ValueError, match="--tokenizer: cannot read"):
    code_corpus.build(str(tmp_path / "c"), roots=[root], heldout=["beta"],
                      tokenizer=str(tmp_path / "not_a_tokenizer.json"))
  assert not (tmp_path / "c").exists()  # checked before anything is written


def test_without_the_tokenizers_package_the_corpus_says_so_and_writes_nothing(tmp_path, monkeypatch, capsys):
  root = fake_site_packages(tmp_path / "site")
  monkeypatch.setitem(sys.modules, "tokenizers", None)  # the import fails as if it were not installed
  assert code_corpus.main(["--out", str(tmp_path / "c"), "--site-packages", root, "--heldout", "beta"]) == 2
  assert "needs the optional package `tokenizers` (pip install tokenizers" in capsys.readouterr().err
  assert not (tmp_path / "c").exists()


def test_corpus_cli_errors_exit_2(tmp_path, capsys):
  root = fake_site_packages(tmp_path / "site")
  assert code_corpus.main(["--out", str(tmp_path / "c"), "--site-packages", root, "--heldout", "delta"]) == 2
  assert "--heldout: ['delta']" in capsys.readouterr().err
  assert code_corpus.main(["--out", str(tmp_path / "c"), "--site-packages", root, "--heldout",
                           "alpha,beta,gamma"]) == 2
  assert "leaves 0 training" in capsys.readouterr().err
  (tmp_path / "file").write_text("x")
  assert code_corpus.main(["--out", str(tmp_path / "file"), "--site-packages", root]) == 2
  assert code_corpus.main(["--out", str(tmp_path / "c"), "--vocab-size", "100"]) == 2
  assert "--vocab-size" in capsys.readouterr().err


# -- the driver's pieces ------------------------------------------------------------------------------------------------


class FakeEncoding:
  def __init__(self, offsets):
    self.offsets = offsets
    self.ids = list(range(len(offsets)))


def test_probe_finds_defined_identifiers_and_their_distances():
  text = "foo_bar = 1\nx = foo_bar\nprint(len(x))\n"
  # Byte-level tokens carry their leading space: " foo" starts at the space before foo_bar.
  offsets = [(0, 3), (3, 7), (7, 9), (9, 11), (11, 12), (12, 13), (13, 15), (15, 19), (19, 23), (23, 24),
             (24, 29), (29, 30), (30, 33), (33, 34), (34, 35), (35, 37), (37, 38)]
  items = compare.probe_items(text, FakeEncoding(offsets))
  # foo_bar is defined (assignment) and repeated 7 tokens later; x is one token; print/len are builtins.
  assert items == [(compare.CONTROL, 0, [1]), ("1-15", 0, [8])]
  windows = list(compare.probe_windows(list(range(17)), items, bos=99, seq_len=8))
  # Window 1 is BOS + tokens 0..6: the definition only; the repeat (tokens 7, 8) has its anchor in window 1, not 2.
  assert windows == [([99] + list(range(7)), [(compare.CONTROL, [2])])]
  assert list(compare.probe_windows(list(range(17)), items, bos=99, seq_len=16)) == [
      ([99] + list(range(15)), [(compare.CONTROL, [2]), ("1-15", [9])])]


def test_identifiers_need_a_definition_and_aligned_tokens():
  text = "def run_job(a):\n  return helper_fn(a)\nhelper_fn(run_job)\n"
  assert set(compare.identifier_occurrences(text)) == {"run_job"}  # helper_fn is used but never defined here
  offsets = [(0, 3), (3, 7), (7, 11)]  # " run" ends past the identifier's first character: misaligned borders
  assert compare.token_span(offsets, [o[0] for o in offsets], "ab run_job", 3, 10) is None
  assert compare.bucket_of(15) == "1-15" and compare.bucket_of(16) == "16-63" and compare.bucket_of(5000) == "1024+"


def test_steps_for_budget_share_the_time_left():
  steps = compare.steps_for_budget(seconds_left=400, num_runs=4, overhead_s=40, tokens_per_s=1000, safety=0.5,
                                   step_tokens=100)
  assert steps == (100 - 40) * 1000 * 0.5 // 100
  assert compare.steps_for_budget(seconds_left=10, num_runs=4, overhead_s=40, tokens_per_s=1000, safety=1,
                                  step_tokens=100) == 1


def test_steps_for_budget_with_runs_in_parallel():
  # 4 runs, 2 at a time: two waves of 200 s, each run at half the measured rate.
  assert compare.steps_for_budget(seconds_left=400, num_runs=4, overhead_s=40, tokens_per_s=1000, safety=0.5,
                                  step_tokens=100, parallel=2) == (200 - 40) * 500 * 0.5 // 100
  # More workers than runs: one wave, the device shared by the runs there are.
  assert compare.steps_for_budget(seconds_left=400, num_runs=2, overhead_s=40, tokens_per_s=1000, safety=1,
                                  step_tokens=100, parallel=8) == (400 - 40) * 500 // 100
  assert compare.memory_fraction(1) is None and float(compare.memory_fraction(4)) == pytest.approx(0.225)


def _saved_comparison(directory, runs, **plan):
  plan = {"created": "now", "runs": list(runs), "tokens_per_run": 1024, "size": "tiny", "batch_size": 4, "seq_len": 64,
          "learning_rate": 1e-3, "vocab_size": 300, "corpus_sha256": "abc", "eval_documents": 4, "overrides": [],
          "budget_note": f"--tokens 1024 ({os.path.basename(directory)})", "corpus": "c", "heldout_packages": ["beta"],
          **plan}
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "results.json"), "w") as f:
    json.dump({"plan": plan, "runs": runs}, f)


def test_report_merges_comparisons_of_the_same_plan(tmp_path):
  first, second, other = tmp_path / "first", tmp_path / "second", tmp_path / "other"
  _saved_comparison(first, {"gsa_s0": {"status": "ok", "loss": 1}, "abc_s0": {"status": "not run (budget spent)"}})
  _saved_comparison(second, {"gsa_s1": {"status": "ok", "loss": 2}, "abc_s0": {"status": "ok", "loss": 3}})
  plan, runs = compare.merged_results(str(first), [str(second)])
  assert list(runs) == ["gsa_s0", "abc_s0", "gsa_s1"] and runs["abc_s0"]["loss"] == 3  # a run not run is replaced
  assert plan["runs"] == ["gsa_s0", "abc_s0", "gsa_s1"] and "(second)" in plan["budget_note"]
  _saved_comparison(first, runs, **{k: v for k, v in plan.items() if k != "runs"})  # what --report-only writes
  assert compare.merged_results(str(first), [str(second)])[1] == runs  # including again changes nothing
  _saved_comparison(other, {"gsa_s0": {"status": "ok", "loss": 9}})
  with pytest.raises(ValueError, match="runs \\['gsa_s0'\\] are already in the report with other results"):
    compare.merged_results(str(first), [str(other)])
  _saved_comparison(other, {"gsa_s2": {"status": "ok"}}, tokens_per_run=2048, corpus_sha256="def")
  with pytest.raises(ValueError, match="differs .* in \\['tokens_per_run', 'corpus_sha256'\\]"):
    compare.merged_results(str(first), [str(other)])
  with pytest.raises(ValueError, match="--include: .*missing.*does not exist"):
    compare.merged_results(str(first), [str(tmp_path / "missing")])


def test_plan_calibrates_the_token_budget(tmp_path, monkeypatch):
  """Without --tokens the plan runs the first layout briefly and plans from its measured rate and overhead."""
  calls = []

  def fake_run(cmd, log_path, timeout_s):
    calls.append(cmd)
    workdir = next(c.split("=", 1)[1] for c in cmd if c.startswith("--config.workdir="))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      f.write(json.dumps({"step": 8, "loss": 5.0, "tokens_per_s": 512.0}) + "\n")
    return 0, 30.0  # 8 steps x 256 tokens at 512 tokens/s = 4 s of training: 26 s of overhead

  monkeypatch.setattr(compare, "run_process", fake_run)
  a = compare.build_parser().parse_args(["--out", str(tmp_path), "--size", "tiny", "--calibration-steps", "8",
                                         "--eval-reserve-s", "4", "--safety", "0.5"])
  compare.resolve_defaults(a)
  manifest = {"tokenizer": {"vocab_size": 300, "sha256": "t"}, "train": {"shards": [{"sha256": "s"}]},
              "heldout": {"packages": {"beta": {}}, "shards": [{"sha256": "h"}]}}
  now = 1000.0
  monkeypatch.setattr(compare.time, "time", lambda: now)
  plan = compare.make_plan(a, str(tmp_path), "corpus", manifest, [("abc", 0), ("gsa", 0)], deadline=now + 230)
  assert "code_lm.py:abc,tiny" in " ".join(calls[0]) and "--config.train.steps=8" in calls[0]
  assert plan["calibration"]["overhead_per_run_s"] == pytest.approx(30)
  assert plan["steps"] == math.floor((230 / 2 - 30) * 512 * 0.5 / 256)
  assert plan["tokens_per_run"] == plan["steps"] * 256


def test_driver_argument_errors_exit_2(tmp_path, capsys):
  assert compare.main(["--out", str(tmp_path), "--runs", "gsa:0,mamba:0"]) == 2
  assert "--runs: 'mamba:0'" in capsys.readouterr().err
  assert compare.main(["--out", str(tmp_path), "--runs", "gsa:0,gsa:0"]) == 2
  assert compare.main(["--out", str(tmp_path), "--budget-minutes", "0"]) == 2
  assert compare.main(["--out", str(tmp_path), "--set", "model.remat"]) == 2
  assert compare.main(["--out", str(tmp_path), "--report-only"]) == 2
  assert "results.json" in capsys.readouterr().err
  assert compare.main(["--out", str(tmp_path), "--parallel", "0"]) == 2
  assert compare.main(["--out", str(tmp_path), "--include", str(tmp_path)]) == 2
  assert "--include only goes with --report-only" in capsys.readouterr().err


# -- end to end -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [1, 2])
def test_comparison_end_to_end_on_cpu_survives_a_failing_run(tmp_path, parallel):
  """Two small installed packages (pytest's own dependencies), tiny models; the attention run fails (its workdir
  holds something that is not a run), the others train the same tokens and are evaluated and probed; one run at a
  time, or two at a time in worker processes."""
  out = tmp_path / "compare"
  (out / "runs" / "attention_s0").mkdir(parents=True)
  (out / "runs" / "attention_s0" / "notes.txt").write_text("not a run")
  args = ["--out", str(out), "--size", "tiny", "--runs", "gsa:0,attention:0,abc:0", "--packages", "pluggy,iniconfig",
          "--heldout", "iniconfig", "--vocab-size", "320", "--tokens", "1024", "--eval-documents", "4",
          "--probe-windows", "16", "--budget-minutes", "20", "--parallel", str(parallel),
          "--set", "train.compilation_cache="]  # tests leave the user's compilation cache alone
  assert compare.main(args) == 1
  saved = json.loads((out / "results.json").read_text())
  runs = saved["runs"]
  assert [runs[n]["status"] for n in ("gsa_s0", "attention_s0", "abc_s0")] == ["ok", "failed", "ok"]
  assert "not empty" in runs["attention_s0"]["error"]
  assert saved["plan"]["heldout_packages"] == ["iniconfig"]
  for name in ("gsa_s0", "abc_s0"):
    r = runs[name]
    assert r["training"]["tokens_done"] == saved["plan"]["tokens_per_run"] == 1024
    assert math.isfinite(r["eval"]["metrics"]["loss"]) and r["eval"]["task"] == "perplexity"
    assert r["probe"] and all(b["occurrences"] > 0 and 0 <= b["exact"] <= 1 for b in r["probe"].values())
  md = (out / "results.md").read_text()
  assert "| gsa_s0 | ok |" in md and "| attention_s0 | failed |" in md and "Recall probe" in md
  assert (out / "loss_curves.png").stat().st_size > 0
  os.remove(out / "results.md")
  assert compare.main(["--out", str(out), "--report-only"]) == 0 and (out / "results.md").read_text() == md


def test_code_lm_layouts_are_the_same_model_but_for_the_mixers():
  from configs import code_lm
  sizes = {layout: code_lm.model_config(layout, "110m").num_params() for layout in code_lm.LAYOUTS}
  assert all(abs(n - sizes["gsa"]) / sizes["gsa"] < 0.03 for n in sizes.values()), sizes
  assert code_lm.model_config("attention", "110m").attn_layers == tuple(range(12))
  assert code_lm.model_config("hybrid", "110m").attn_layers == (5, 11)
  assert code_lm.model_config("abc", "110m").slot_control == "abc"
  assert not code_lm.model_config("nogate", "110m").forget_gate
  with pytest.raises(ValueError, match="layout 'mamba' is unknown"):
    code_lm.get_config("mamba")


def test_driver_builds_its_corpus_from_the_roots_given(tmp_path):
  root = fake_site_packages(tmp_path / "site")
  a = compare.build_parser().parse_args(["--out", str(tmp_path / "out"), "--site-packages", root, "--heldout", "beta",
                                         "--vocab-size", "300"])
  compare.resolve_defaults(a)
  os.makedirs(tmp_path / "out")
  corpus, manifest = compare.ensure_corpus(a, str(tmp_path / "out"))
  assert corpus == str(tmp_path / "out" / "corpus") and manifest["site_packages"] == [os.path.realpath(root)]
  assert list(manifest["heldout"]["packages"]) == ["beta"]
  a.corpus = str(tmp_path / "elsewhere")  # a named corpus is not built unless asked
  with pytest.raises(ValueError, match="--corpus: .* has no manifest.json"):
    compare.ensure_corpus(a, str(tmp_path / "out"))
