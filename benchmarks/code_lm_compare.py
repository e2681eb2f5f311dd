"""Equal-budget language-model comparison on real code: GSA, the all-attention model, a hybrid and ABC, each about
110M parameters (configs/code_lm.py), trained on the same tokens, then held-out perplexity and recall probes.

    python benchmarks/code_lm_compare.py --out runs/code_compare --budget-minutes 8          # one H200
    python benchmarks/code_lm_compare.py --out runs/code_compare --runs gsa:0,attention:0,gsa:1,attention:1
    python benchmarks/code_lm_compare.py --out runs/code_compare --report-only               # tables + plot again

One command does everything, under --out:
  1. corpus/       the corpus (`benchmarks/code_corpus.py`: this interpreter's site-packages, split by package, a BPE
                   tokenizer trained on the training split), built unless --corpus names one already built.
  2. plan.json     the token budget, the same for every run: --tokens, or from --budget-minutes: a short calibration
                   run of the first layout (calibration/) measures tokens/s and the per-run overhead (start-up,
                   compilation, evaluation reserve), and every run gets tokens = its share of the time left x that
                   rate x --safety. A rerun on the same --out keeps the plan (--replan makes a new one).
  3. runs/NAME/    one `train.py` run directory per run (NAME = LAYOUT_sSEED), trained in a subprocess with
                   `--config=configs/code_lm.py:LAYOUT,SIZE` and the plan's steps; its console goes to
                   runs/NAME.out.
                   A run that fails or overruns its time (SIGTERM, then SIGKILL) is recorded and the next one
                   starts; a rerun resumes unfinished runs from their checkpoints and skips finished ones.
                   --parallel N trains N runs at a time on the one accelerator (each with its evaluation in a
                   worker process), so their start-up, compilation, data reading and evaluation overlap.
  4. After each run: held-out perplexity with `gsa_jax.eval` (perplexity task) on eval_documents.jsonl (a fixed
     sample of the held-out packages' files), and the recall probe (below).
  5. results.json, results.md (table) and loss_curves.png (training loss against tokens, every run on one plot),
     rewritten after every run, so an interrupted comparison still reports what finished. `--report-only
     --include DIR` adds the runs of another --out trained with the same plan and corpus (e.g. more seeds in a later
     session: build that corpus with --tokenizer OUT/corpus/tokenizer.json, since BPE training is not
     bit-reproducible, and pass --tokens with the first plan's tokens_per_run).

Recall probe: the held-out files are cut into windows of seq_len tokens (the first one starting with BOS, as in
training). Every identifier that a file defines (`def NAME`, `class NAME`, `NAME = ...`; not a keyword or builtin)
and that the tokenizer splits into 2+ tokens is followed through its later occurrences. At an occurrence whose
previous occurrence is D tokens back in the same window, the model sees the identifier's first token and must
continue it: the probe scores the identifier's remaining tokens (teacher forced): exact = every one is the argmax,
loss = their mean negative log-likelihood. Occurrences are grouped by D; the definitions themselves (nothing earlier
to copy) are the no-recall control.

Exit codes: 0 when every planned run trained and was evaluated, 1 when any failed (the report says which), 2 for bad
arguments (one line).
"""

from __future__ import annotations

import argparse
import builtins
import datetime
import hashlib
import json
import keyword
import math
import os
import re
import signal
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import code_corpus  # noqa: E402  (benchmarks/ is put on the path above)
from configs import code_lm  # noqa: E402

DISTANCE_EDGES = (1, 16, 64, 256, 1024)  # probe buckets: [1, 16), [16, 64), ..., [1024, seq_len)
CONTROL = "definition (no earlier copy)"
_IDENTIFIER = re.compile(r"(?<![A-Za-z0-9_])[A-Za-z_][A-Za-z0-9_]*")
_DEFINITION_BEFORE = re.compile(r"(?:^|\s)(?:def|class)\s+$")
_DEFINITION_AFTER = re.compile(r"\s*=(?!=)")
_COMMON = frozenset(keyword.kwlist) | frozenset(keyword.softkwlist) | frozenset(dir(builtins)) | {"self", "cls"}


# -- the plan ---------------------------------------------------------------------------------------------------------


def parse_runs(spec: str) -> list[tuple[str, int]]:
  """'gsa:0,attention:0' -> [('gsa', 0), ('attention', 0)]; ValueError naming --runs otherwise."""
  runs = []
  for item in spec.split(","):
    layout, _, seed = item.strip().partition(":")
    if layout not in code_lm.LAYOUTS or not seed.isdigit():
      raise ValueError(f"--runs: {item!r} is not LAYOUT:SEED with LAYOUT one of {code_lm.LAYOUTS}")
    runs.append((layout, int(seed)))
  if len(set(runs)) != len(runs):
    raise ValueError(f"--runs: {spec!r} names a run twice")
  return runs


def run_name(layout: str, seed: int) -> str:
  return f"{layout}_s{seed}"


def tokens_per_step(a) -> int:
  return a.batch_size * a.seq_len


def steps_for_budget(*, seconds_left: float, num_runs: int, overhead_s: float, tokens_per_s: float, safety: float,
                     step_tokens: int, parallel: int = 1) -> int:
  """The steps each of `num_runs` runs can train in `seconds_left`, each also paying `overhead_s`, at
  `tokens_per_s` x `safety`; at least 1. With `parallel` runs at a time the runs go in waves, and the runs of a wave
  share the device evenly: together they train at the one measured rate (a lower bound: the device's queue stays
  fuller, and each run's data pipeline and start-up overlap the others' training)."""
  at_once = min(parallel, num_runs)
  waves = math.ceil(num_runs / at_once)
  train_s = seconds_left / waves - overhead_s
  return max(1, int(train_s * tokens_per_s / at_once * safety // step_tokens))


# -- subprocesses -----------------------------------------------------------------------------------------------------


def child_env() -> dict:
  env = dict(os.environ)
  env.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)  # the driver's own setting (see main) is not the runs'
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def memory_fraction(parallel: int) -> str | None:
  """XLA_PYTHON_CLIENT_MEM_FRACTION for each of `parallel` processes sharing one accelerator (None for one: JAX's
  default). A tenth stays free for the CUDA contexts and the evaluation of finished runs."""
  return None if parallel <= 1 else f"{0.9 / parallel:.3f}"


def train_command(a, layout: str, seed: int, workdir: str, corpus: str, vocab: int, steps: int,
                  warmup: int, log_every: int) -> list[str]:
  cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--config={ROOT}/configs/code_lm.py:{layout},{a.size}",
         f"--config.workdir={workdir}", f"--config.data.path={os.path.join(corpus, 'train-*.jsonl')}",
         f"--config.data.tokenizer={os.path.join(corpus, 'tokenizer.json')}", f"--config.model.vocab_size={vocab}",
         f"--config.train.steps={steps}", f"--config.train.seed={seed}", f"--config.optim.warmup_steps={warmup}",
         f"--config.train.batch_size={a.batch_size}", f"--config.train.seq_len={a.seq_len}",
         f"--config.train.log_every={log_every}", f"--config.optim.learning_rate={a.learning_rate}"]
  return cmd + [f"--config.{kv}" for kv in a.set]


def run_process(cmd: list[str], log_path: str, timeout_s: float) -> tuple[int | None, float]:
  """Runs `cmd` with its output in `log_path`; past `timeout_s` it gets SIGTERM (train.py saves and exits), then
  SIGKILL 60 s later. Returns (exit code, None if it had to be killed; wall seconds)."""
  start = time.monotonic()
  with open(log_path, "a") as log:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=child_env())
    try:
      code = proc.wait(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGTERM)
      try:
        code = proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = None
      log.write(f"\n[code_lm_compare] stopped after {timeout_s:.0f} s (its share of the budget)\n")
  return code, time.monotonic() - start


def read_metrics(workdir: str) -> list[dict]:
  from gsa_jax.train.metrics import read_jsonl  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, "metrics.jsonl")
  return read_jsonl(path) if os.path.exists(path) else []


def tail(path: str, n: int = 5) -> str:
  try:
    with open(path, errors="replace") as f:
      return " | ".join(line.strip() for line in f.readlines()[-n:] if line.strip())
  except OSError:
    return ""


# -- evaluation -------------------------------------------------------------------------------------------------------


def write_eval_documents(heldout: str, path: str, n: int, seed: int) -> int:
  """A fixed sample of `n` held-out documents (by a hash of their text and `seed`) as jsonl; returns the count."""
  with open(heldout, encoding="utf-8") as f:
    lines = f.readlines()
  key = lambda line: hashlib.sha256(f"{seed}:{line}".encode()).hexdigest()  # noqa: E731
  chosen = sorted(lines, key=key)[:n]
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(chosen)
  return len(chosen)


def identifier_occurrences(text: str) -> dict[str, list[tuple[int, int]]]:
  """{name: [(start, end) char spans, in order]} of the identifiers that `text` defines (its first occurrence is a
  `def` / `class` name or an assignment target) and that are not keywords, builtins, self or cls."""
  spans: dict[str, list[tuple[int, int]]] = {}
  for m in _IDENTIFIER.finditer(text):
    spans.setdefault(m.group(), []).append(m.span())
  defined = {}
  for name, occ in spans.items():
    if name in _COMMON or len(occ) < 2:
      continue
    start, end = occ[0]
    line_start = text.rfind("\n", 0, start) + 1
    if _DEFINITION_BEFORE.search(text[line_start:start]) or _DEFINITION_AFTER.match(text, end):
      defined[name] = occ
  return defined


def token_span(offsets: list[tuple[int, int]], starts: list[int], text: str, a: int, b: int
               ) -> tuple[int, int] | None:
  """Token indices [i, j) that cover exactly the characters [a, b) (a byte-level token may carry one leading
  space); None where the token borders do not align with the identifier's."""
  import bisect  # pylint: disable=import-outside-toplevel
  i = bisect.bisect_right(starts, a) - 1
  if i < 0 or offsets[i][0] < a - 1 or (offsets[i][0] == a - 1 and not text[a - 1].isspace()) or offsets[i][1] <= a:
    return None
  j = i
  while j < len(offsets) and offsets[j][1] < b:
    j += 1
  if j == len(offsets) or offsets[j][1] != b:
    return None
  return i, j + 1


def bucket_of(distance: int) -> str:
  for lo, hi in zip(DISTANCE_EDGES, DISTANCE_EDGES[1:] + (None,)):
    if distance >= lo and (hi is None or distance < hi):
      return f"{lo}-{hi - 1}" if hi else f"{lo}+"
  raise ValueError(distance)


def probe_items(text: str, encoding) -> list[tuple[str, int, list[int]]]:
  """(bucket, anchor, token indices to score) for every usable occurrence of a defined identifier: the scored tokens
  are the identifier's tokens after its first; the anchor is the first token of its previous occurrence (of itself
  for the definition, the control), which must be in the model's context for the item to count."""
  offsets = list(encoding.offsets)
  starts = [o[0] for o in offsets]
  items = []
  for occ in identifier_occurrences(text).values():
    previous = None
    for n, (a, b) in enumerate(occ):
      span = token_span(offsets, starts, text, a, b)
      if span is None:
        previous = None  # an occurrence we cannot place: the distance to the next one is unknown
        continue
      i, j = span
      if j - i >= 2 and (n == 0 or previous is not None):
        bucket = CONTROL if n == 0 else bucket_of(i - previous)
        items.append((bucket, i if n == 0 else previous, list(range(i + 1, j))))
      previous = i
  return items


def probe_windows(ids: list[int], items, bos: int, seq_len: int):
  """Cuts a document's ids into windows of seq_len (the first one starting with BOS, as in training; later ones
  continue the document) and places each item in the window holding its anchor and its scored tokens.

  Yields (window ids, [(bucket, window positions of the scored tokens)]) for windows with at least one item."""
  bounds, start = [], 0
  while start < len(ids):
    length = seq_len - 1 if start == 0 else seq_len
    bounds.append((start, min(start + length, len(ids)), 1 if start == 0 else 0))
    start += length
  for s, e, shift in bounds:
    placed = [(bucket, [k - s + shift for k in idx]) for bucket, anchor, idx in items
              if s <= anchor and idx[-1] < e]
    if placed:
      yield ([bos] if shift else []) + ids[s:e], placed


def recall_probe(run_dir: str, documents: list[str], tokenizer_path: str, *, seq_len: int, batch_size: int,
                 max_windows: int) -> dict:
  """{bucket: {"occurrences", "exact", "loss"}} for the run's newest checkpoint on `documents` (at most
  `max_windows` windows of seq_len tokens)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tokenizers  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from gsa_jax.data import load_tokenizer  # pylint: disable=import-outside-toplevel
  from gsa_jax.run_dir import load_model  # pylint: disable=import-outside-toplevel

  model, config, _ = load_model(run_dir)
  bos = load_tokenizer(config.data.tokenizer, config.data.bos_id, config.data.eos_id).bos_id
  tok = tokenizers.Tokenizer.from_file(tokenizer_path)
  rows, items = [], []
  for text in documents:
    enc = tok.encode(text, add_special_tokens=False)
    for window, placed in probe_windows(list(enc.ids), probe_items(text, enc), bos, seq_len):
      if len(rows) < max_windows:
        rows.append(window)
        items.append(placed)
  graphdef, state = nnx.split(model)

  @jax.jit
  def score(state, tokens, segment_ids):
    logits = nnx.merge(graphdef, state)(tokens, segment_ids)[:, :-1]
    targets = tokens[:, 1:]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return nll, jnp.argmax(logits, axis=-1) == targets

  stats: dict[str, list] = {}
  for start in range(0, len(rows), batch_size):
    batch = rows[start:start + batch_size]
    tokens = np.zeros((batch_size, seq_len), np.int32)
    seg = np.zeros((batch_size, seq_len), np.int32)
    for r, row in enumerate(batch):
      tokens[r, :len(row)], seg[r, :len(row)] = row, 1
    nll, correct = jax.device_get(score(state, jnp.asarray(tokens), jnp.asarray(seg)))
    for r, doc_items in enumerate(items[start:start + batch_size]):
      for bucket, positions in doc_items:
        pos = np.asarray(positions) - 1  # the token at window position p is predicted at p - 1 (targets shift)
        stats.setdefault(bucket, []).append((float(nll[r, pos].mean()), bool(correct[r, pos].all())))
  return {b: {"occurrences": len(v), "exact": float(np.mean([c for _, c in v])),
              "loss": float(np.mean([l for l, _ in v]))} for b, v in stats.items()}


def bucket_order() -> list[str]:
  return [CONTROL] + [bucket_of(lo) for lo in DISTANCE_EDGES]


# -- the report -------------------------------------------------------------------------------------------------------


def summarize_training(workdir: str, step_tokens: int) -> dict:
  rows = [r for r in read_metrics(workdir) if "loss" in r]
  if not rows:
    return {}
  last = rows[-3:]
  return {"steps_done": rows[-1]["step"], "tokens_done": rows[-1]["step"] * step_tokens,
          "final_train_loss": sum(r["loss"] for r in last) / len(last), "tokens_per_s": rows[-1].get("tokens_per_s"),
          "mfu": rows[-1].get("mfu"), "curve": [(r["step"] * step_tokens, r["loss"]) for r in rows]}


def write_report(out: str, plan: dict, results: dict) -> None:
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({"plan": plan, "runs": results}, f, indent=1)
  buckets = [b for b in bucket_order() if any(b in (r.get("probe") or {}) for r in results.values())]
  fmt = lambda x, spec: "" if x is None else format(x, spec)  # noqa: E731
  lines = [f"# Code LM comparison ({plan['created']})", "",
           f"{plan['tokens_per_run']:,} training tokens per run ({plan['steps']} steps x {plan['batch_size']} x "
           f"{plan['seq_len']}), size {plan['size']}, lr {plan['learning_rate']}; corpus `{plan['corpus']}` "
           f"(held-out packages: {', '.join(plan['heldout_packages'])}); held-out perplexity on "
           f"{plan['eval_documents']} held-out files; budget: {plan['budget_note']}. Tokens trained: those the "
           "evaluated checkpoint saw. Tokens/s: the whole run's (start-up and compilation included)"
           + (f", with up to {plan['parallel']} runs sharing the device: not a throughput figure."
              if plan.get("parallel", 1) > 1 else "."), "",
           "| run | status | params | tokens trained | tokens/s | final train loss | held-out loss | held-out ppl | "
           "bits/byte |", "|---|---|---|---|---|---|---|---|---|"]
  for name, r in results.items():
    t, e = r.get("training", {}), (r.get("eval") or {}).get("metrics", {})
    evaluated_step = (r.get("eval") or {}).get("step")
    tokens = t.get("tokens_done") if evaluated_step is None else evaluated_step * plan["batch_size"] * plan["seq_len"]
    lines.append(f"| {name} | {r['status']} | {fmt(r.get('params'), ',')} | {fmt(tokens, ',')} | "
                 f"{fmt(t.get('tokens_per_s'), ',.0f')} | {fmt(t.get('final_train_loss'), '.4f')} | "
                 f"{fmt(e.get('loss'), '.4f')} | {fmt(e.get('perplexity'), '.2f')} | "
                 f"{fmt(e.get('bits_per_byte'), '.4f')} |")
  if buckets:
    lines += ["", "Recall probe (held-out files): exact continuation of a file's own identifier, % (mean loss of its "
              "continuation tokens), by tokens since its previous occurrence; occurrences per bucket in the last row.",
              "", "| run | " + " | ".join(buckets) + " |", "|---|" + "---|" * len(buckets)]
    for name, r in results.items():
      p = r.get("probe") or {}
      cells = [f"{100 * p[b]['exact']:.1f} ({p[b]['loss']:.2f})" if b in p else "" for b in buckets]
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
    counts = next((r["probe"] for r in results.values() if r.get("probe")), {})
    lines.append("| occurrences | " + " | ".join(str(counts.get(b, {}).get("occurrences", "")) for b in buckets)
                 + " |")
  failed = {n: r["error"] for n, r in results.items() if r.get("error")}
  if failed:
    lines += ["", "Failures:", ""] + [f"- {n}: {err}" for n, err in failed.items()]
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  plot_curves(out, results)


def plot_curves(out: str, results: dict) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, r in results.items():
    curve = r.get("training", {}).get("curve")
    if curve:
      x, y = zip(*curve)
      ax.plot(x, y, label=name, linestyle="-" if name.endswith("_s0") else "--")
  ax.set_xlabel("training tokens")
  ax.set_ylabel("training loss (nats/token)")
  ax.set_title("Python code, equal token budget")
  if ax.lines:
    ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, "loss_curves.png"), dpi=120)
  plt.close(fig)


# -- main -------------------------------------------------------------------------------------------------------------


def merged_results(out: str, include: list[str]) -> tuple[dict, dict]:
  """(plan, runs) of OUT/results.json with the runs of each included comparison added. ValueError (naming the
  argument) for a missing results.json, a plan that differs in what makes runs comparable, or a run named twice."""
  loaded = []
  for flag, d in [("--out", out)] + [("--include", d) for d in include]:
    path = os.path.join(d, "results.json")
    if not os.path.exists(path):
      raise ValueError(f"{flag}: {path!r} does not exist (run the comparison first)")
    with open(path) as f:
      loaded.append((flag, d, json.load(f)))
  plan, runs = loaded[0][2]["plan"], dict(loaded[0][2]["runs"])
  same = ("tokens_per_run", "size", "batch_size", "seq_len", "learning_rate", "vocab_size", "corpus_sha256",
          "eval_documents", "overrides")
  for flag, d, saved in loaded[1:]:
    differ = [k for k in same if saved["plan"].get(k) != plan.get(k)]
    if differ:
      raise ValueError(f"{flag} {d!r}: its plan differs from {out!r}'s in {differ}; only runs of the same plan and "
                       "corpus are compared")
    # The merged report is written back to OUT/results.json, so including the same runs again changes nothing.
    new = {n: r for n, r in saved["runs"].items() if n not in runs or runs[n]["status"].startswith("not run")}
    clash = sorted(n for n in saved["runs"] if n in runs and n not in new and runs[n] != saved["runs"][n])
    if clash:
      raise ValueError(f"{flag} {d!r}: runs {clash} are already in the report with other results")
    if new:
      runs.update(new)
      plan = dict(plan, runs=plan["runs"] + [n for n in new if n not in plan["runs"]],
                  budget_note=f"{plan['budget_note']}; {saved['plan']['budget_note']} ({d})")
  return plan, runs


def log(out: str, message: str) -> None:
  line = f"[{datetime.datetime.now().strftime('%H:%M:%S')}] {message}"
  print(line, flush=True)
  with open(os.path.join(out, "driver.log"), "a") as f:
    f.write(line + "\n")


def ensure_corpus(a, out: str) -> tuple[str, dict]:
  corpus = a.corpus or os.path.join(out, "corpus")
  manifest_path = os.path.join(corpus, "manifest.json")
  if not os.path.exists(manifest_path):
    if a.corpus and not a.build_corpus:
      raise ValueError(f"--corpus: {corpus!r} has no manifest.json; build it with benchmarks/code_corpus.py or "
                       "pass --build-corpus")
    log(out, f"building the corpus in {corpus} (benchmarks/code_corpus.py)")
    code_corpus.build(corpus, roots=a.site_packages, packages=a.packages, heldout=a.heldout,
                      vocab_size=a.vocab_size, tokenizer_sample_mb=a.tokenizer_sample_mb, tokenizer=a.tokenizer)
  with open(manifest_path) as f:
    return corpus, json.load(f)


def corpus_fingerprint(manifest: dict) -> str:
  """sha256 over the sha256 of every file the training and evaluation read (shards, held-out file, tokenizer): two
  builds with the same fingerprint give the runs the same token ids."""
  files = manifest["train"]["shards"] + manifest["heldout"]["shards"] + [manifest["tokenizer"]]
  return hashlib.sha256(" ".join(f["sha256"] for f in files).encode()).hexdigest()


def make_plan(a, out: str, corpus: str, manifest: dict, runs, deadline: float) -> dict:
  vocab = manifest["tokenizer"]["vocab_size"]
  plan = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "runs": [run_name(*r) for r in runs], "size": a.size, "batch_size": a.batch_size, "seq_len": a.seq_len,
          "learning_rate": a.learning_rate, "corpus": corpus, "vocab_size": vocab,
          "heldout_packages": sorted(manifest["heldout"]["packages"]), "overrides": a.set,
          "corpus_sha256": corpus_fingerprint(manifest), "parallel": a.parallel}
  step_tokens = tokens_per_step(a)
  if a.tokens:
    steps = max(1, a.tokens // step_tokens)
    plan["budget_note"] = f"--tokens {a.tokens}"
  else:
    layout, seed = runs[0]
    cal_dir = os.path.join(out, "calibration")
    cmd = train_command(a, layout, seed, cal_dir, corpus, vocab, a.calibration_steps, 1,
                        max(1, a.calibration_steps // 4)) + ["--config.overwrite=True"]
    log(out, f"calibrating: {a.calibration_steps} steps of {layout} ({cal_dir})")
    code, wall = run_process(cmd, os.path.join(out, "calibration.out"), deadline - time.time())
    rows = [r for r in read_metrics(cal_dir) if "tokens_per_s" in r]
    if code != 0 or not rows:
      raise RuntimeError(f"the calibration run failed (exit {code}): {tail(os.path.join(out, 'calibration.out'))}")
    tps = rows[-1]["tokens_per_s"]
    overhead = wall - a.calibration_steps * step_tokens / tps + a.eval_reserve_s
    steps = steps_for_budget(seconds_left=deadline - time.time(), num_runs=len(runs), overhead_s=overhead,
                             tokens_per_s=tps, safety=a.safety, step_tokens=step_tokens, parallel=a.parallel)
    plan["calibration"] = {"layout": layout, "tokens_per_s": tps, "wall_s": wall, "overhead_per_run_s": overhead}
    plan["budget_note"] = (f"{a.budget_minutes} min for everything; calibration: {layout} at {tps:,.0f} tokens/s, "
                           f"{overhead:.0f} s per run for start-up, compilation and evaluation, safety {a.safety}")
  plan["steps"] = steps
  plan["tokens_per_run"] = steps * step_tokens
  plan["warmup_steps"] = max(1, min(a.warmup_steps, steps // 10))
  return plan


def evaluate_and_probe(a, out: str, plan: dict, corpus: str, workdir: str, result: dict) -> None:
  from gsa_jax.eval import evaluate  # pylint: disable=import-outside-toplevel
  documents_path = os.path.join(out, "eval_documents.jsonl")
  result["eval"] = evaluate(workdir, "perplexity", documents_path, batch_size=a.eval_batch_size,
                            max_length=a.seq_len, progress=False)
  result["params"] = result["eval"]["num_params"]
  with open(documents_path, encoding="utf-8") as f:
    documents = [json.loads(line)["text"] for line in f]
  result["probe"] = recall_probe(workdir, documents, os.path.join(corpus, "tokenizer.json"), seq_len=a.seq_len,
                                 batch_size=a.eval_batch_size, max_windows=a.probe_windows)


def train_and_evaluate(a, out: str, plan: dict, layout: str, seed: int, train_timeout_s: float) -> dict:
  """One run: train.py in a subprocess (stopped after `train_timeout_s`), then held-out perplexity and the probe.
  Returns the run's result; a failure is recorded in it, never raised."""
  name = run_name(layout, seed)
  workdir = os.path.join(out, "runs", name)
  corpus = plan["corpus"]
  result = {"layout": layout, "seed": seed, "status": "not run"}
  cmd = train_command(a, layout, seed, workdir, corpus, plan["vocab_size"], plan["steps"], plan["warmup_steps"],
                      max(1, min(50, plan["steps"] // 20)))
  try:
    code, wall = run_process(cmd, workdir + ".out", train_timeout_s)
    result["train_wall_s"] = wall
    result["training"] = summarize_training(workdir, plan["batch_size"] * plan["seq_len"])
    done = result["training"].get("steps_done", 0) >= plan["steps"]
    if code != 0 or not done:
      result["status"] = "failed" if code not in (143, None) else "stopped (time)"
      result["error"] = f"train.py exit {code}, {result['training'].get('steps_done', 0)} of {plan['steps']} steps: " \
                        + tail(workdir + ".out", 3)
    else:
      result["status"] = "trained"
    if result["training"].get("steps_done"):
      evaluate_and_probe(a, out, plan, corpus, workdir, result)
      # A stopped run saves the step it was in, past its last logged one: count what the evaluated model saw.
      result["training"].update(steps_done=result["eval"]["step"],
                                tokens_done=result["eval"]["step"] * plan["batch_size"] * plan["seq_len"])
      if result["status"] == "trained":
        result["status"] = "ok"
  except Exception as e:  # pylint: disable=broad-except  # one run's failure must not end the comparison
    result["status"] = "failed"
    result["error"] = f"{type(e).__name__}: {e}"
    with open(os.path.join(out, "driver.log"), "a") as f:
      traceback.print_exc(file=f)
  return result


def worker_result_path(out: str, name: str) -> str:
  return os.path.join(out, "runs", name + ".result.json")


def run_in_workers(a, out: str, plan: dict, runs, results: dict, deadline: float) -> None:
  """--parallel N: up to N runs at a time, each in a worker process (this script with --worker) that trains and
  evaluates it, all sharing the accelerator (each with 0.9 / N of its memory). Fills `results` as workers end."""
  queue, active = list(runs), {}
  env = child_env() | {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # the worker's own evaluation allocates as it goes
  env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = memory_fraction(a.parallel)
  while queue or active:
    while queue and len(active) < a.parallel:
      layout, seed = queue.pop(0)
      name = run_name(layout, seed)
      left = deadline - time.time()
      if left <= a.eval_reserve_s:
        results[name]["status"] = "not run (budget spent)"
        continue
      train_s = left - a.eval_reserve_s
      cmd = [sys.executable, os.path.abspath(__file__), *a.argv, "--worker", f"{layout}:{seed}",
             "--worker-train-s", f"{train_s:.0f}"]
      log(out, f"training {name} in a worker: {plan['steps']} steps, at most {train_s:.0f} s")
      if os.path.exists(worker_result_path(out, name)):
        os.remove(worker_result_path(out, name))
      log_file = open(os.path.join(out, "runs", name + ".worker.out"), "a")  # pylint: disable=consider-using-with
      proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
      # The worker stops its training itself; this bound only catches a worker stuck in its evaluation.
      active[name] = (proc, log_file, time.time() + left + 120)
    time.sleep(2)
    for name, (proc, log_file, kill_at) in list(active.items()):
      if proc.poll() is None and time.time() < kill_at:
        continue
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      log_file.close()
      del active[name]
      path = worker_result_path(out, name)
      if os.path.exists(path):
        with open(path) as f:
          results[name] = json.load(f)
      else:
        results[name].update(status="failed", error=f"worker exit {proc.returncode}: "
                             + tail(os.path.join(out, "runs", name + ".worker.out"), 3))
      log(out, f"{name}: {results[name]['status']}"
          + (f" ({results[name]['error']})" if results[name].get("error") else ""))
      write_report(out, plan, results)


def run_worker(a) -> int:
  """--worker LAYOUT:SEED: one run of the plan in OUT/plan.json, its result in OUT/runs/NAME.result.json."""
  ((layout, seed),) = parse_runs(a.worker)
  with open(os.path.join(a.out, "plan.json")) as f:
    plan = json.load(f)
  result = train_and_evaluate(a, a.out, plan, layout, seed, a.worker_train_s)
  with open(worker_result_path(a.out, run_name(layout, seed)), "w") as f:
    json.dump(result, f)
  return 0


def compare(a) -> int:
  start = time.time()
  deadline = start + 60 * a.budget_minutes
  out = a.out
  os.makedirs(os.path.join(out, "runs"), exist_ok=True)
  runs = parse_runs(a.runs)
  corpus, manifest = ensure_corpus(a, out)
  plan_path = os.path.join(out, "plan.json")
  if os.path.exists(plan_path) and not a.replan:
    with open(plan_path) as f:
      plan = json.load(f)
    log(out, f"continuing the plan in {plan_path}: {plan['steps']} steps a run (--replan for a new one)")
  else:
    plan = make_plan(a, out, corpus, manifest, runs, deadline)
    with open(plan_path, "w") as f:
      json.dump(plan, f, indent=1)
  plan["runs"] = [run_name(*r) for r in runs]
  log(out, f"{len(runs)} runs of {plan['steps']} steps ({plan['tokens_per_run']:,} tokens each)")
  eval_count = write_eval_documents(os.path.join(corpus, "heldout.jsonl"), os.path.join(out, "eval_documents.jsonl"),
                                    a.eval_documents, manifest["seed"])
  plan["eval_documents"] = eval_count
  results = {run_name(*r): {"layout": r[0], "seed": r[1], "status": "not run"} for r in runs}
  if a.parallel > 1:
    run_in_workers(a, out, plan, runs, results, deadline)
  else:
    for index, (layout, seed) in enumerate(runs):
      name = run_name(layout, seed)
      left = deadline - time.time()
      if left <= 0:
        results[name]["status"] = "not run (budget spent)"
        continue
      # Each run may use the time left, less what the runs after it need at the planned pace.
      share = left - (len(runs) - index - 1) * left / (len(runs) - index) * a.later_runs_share
      log(out, f"training {name}: {plan['steps']} steps, at most {share:.0f} s")
      results[name] = train_and_evaluate(a, out, plan, layout, seed, max(share - a.eval_reserve_s, share / 2))
      log(out, f"{name}: {results[name]['status']}"
          + (f" ({results[name]['error']})" if results[name].get("error") else ""))
      write_report(out, plan, results)
  write_report(out, plan, results)
  log(out, f"done in {time.time() - start:.0f} s: {out}/results.md")
  return 0 if all(r["status"] == "ok" for r in results.values()) else 1


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--budget-minutes", type=float, default=8.0, help="wall time for everything (corpus included)")
  p.add_argument("--runs", default="gsa:0,attention:0,hybrid:0,abc:0",
                 help="LAYOUT:SEED, comma-separated, trained in this order; layouts: " + ", ".join(code_lm.LAYOUTS))
  p.add_argument("--size", default="110m", choices=tuple(code_lm.SIZES))
  p.add_argument("--tokens", type=int, default=None, help="training tokens per run (skips the calibration)")
  p.add_argument("--batch-size", type=int, default=None, help="default: the size's (16; tiny 4)")
  p.add_argument("--seq-len", type=int, default=None, help="default: the size's (2048; tiny 64)")
  p.add_argument("--learning-rate", type=float, default=1e-3)
  p.add_argument("--warmup-steps", type=int, default=100, help="at most a tenth of the steps")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="extra train.py override for every run, e.g. --set model.remat=matmuls")
  p.add_argument("--corpus", default=None, help="a corpus built by code_corpus.py (default: OUT/corpus, built)")
  p.add_argument("--build-corpus", action="store_true", help="build --corpus if it has no manifest")
  p.add_argument("--site-packages", default=None,
                 help="corpus: comma-separated source roots (default: this interpreter's site-packages)")
  p.add_argument("--packages", default=None, help="corpus: only these packages (comma-separated)")
  p.add_argument("--heldout", default=None, help="corpus: held-out packages (comma-separated)")
  p.add_argument("--vocab-size", type=int, default=16384, help="corpus: BPE vocabulary")
  p.add_argument("--tokenizer-sample-mb", type=float, default=100.0, help="corpus: tokenizer training text")
  p.add_argument("--tokenizer", default=None,
                 help="corpus: copy this tokenizer.json (an earlier build's: BPE training is not bit-reproducible, so "
                      "a comparison continued on another machine needs it) instead of training one")
  p.add_argument("--parallel", type=int, default=1,
                 help="runs trained at the same time, sharing the accelerator (each in a worker process with 0.9/N "
                      "of its memory); start-up, compilation, data reading and evaluation then overlap other runs")
  p.add_argument("--calibration-steps", type=int, default=20)
  p.add_argument("--eval-reserve-s", type=float, default=40.0, help="per run, for evaluation and the probe")
  p.add_argument("--safety", type=float, default=0.85, help="fraction of the calibrated rate planned with")
  p.add_argument("--later-runs-share", type=float, default=1.0,
                 help="how much of the later runs' time a run may not use (1: its even share of what is left)")
  p.add_argument("--eval-documents", type=int, default=256, help="held-out files for perplexity and the probe")
  p.add_argument("--eval-batch-size", type=int, default=8)
  p.add_argument("--probe-windows", type=int, default=256, help="windows of seq_len the recall probe scores, at most")
  p.add_argument("--replan", action="store_true", help="make a new plan even if OUT/plan.json exists")
  p.add_argument("--report-only", action="store_true", help="rewrite results.md / loss_curves.png from results.json")
  p.add_argument("--include", action="append", default=[], metavar="DIR",
                 help="with --report-only: add the runs of another comparison's --out (same plan and corpus "
                      "fingerprint), e.g. the second seeds trained in another session")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # LAYOUT:SEED, see run_in_workers
  p.add_argument("--worker-train-s", type=float, default=None, help=argparse.SUPPRESS)
  return p


def resolve_defaults(a: argparse.Namespace) -> None:
  """The size's batch and sequence length where not given; the package lists split."""
  size_defaults = {"110m": (16, 2048), "tiny": (4, 64)}[a.size]
  a.batch_size = a.batch_size or size_defaults[0]
  a.seq_len = a.seq_len or size_defaults[1]
  split = lambda s: [x for x in s.split(",") if x] if isinstance(s, str) else s  # noqa: E731
  a.packages, a.heldout, a.site_packages = split(a.packages), split(a.heldout), split(a.site_packages)


def main(argv=None) -> int:
  a = build_parser().parse_args(argv)
  resolve_defaults(a)
  for name, value, ok, want in [("--budget-minutes", a.budget_minutes, a.budget_minutes > 0, "positive"),
                                ("--tokens", a.tokens, a.tokens is None or a.tokens > 0, "positive"),
                                ("--batch-size", a.batch_size, a.batch_size > 0, "positive"),
                                ("--seq-len", a.seq_len, a.seq_len >= 8, "at least 8"),
                                ("--safety", a.safety, 0 < a.safety <= 1, "in (0, 1]"),
                                ("--later-runs-share", a.later_runs_share, 0 <= a.later_runs_share <= 1, "in [0, 1]"),
                                ("--calibration-steps", a.calibration_steps, a.calibration_steps >= 4, "at least 4"),
                                ("--eval-documents", a.eval_documents, a.eval_documents > 0, "positive"),
                                ("--parallel", a.parallel, a.parallel >= 1, "at least 1")]:
    if not ok:
      print(f"error: {name} must be {want}; got {value}", file=sys.stderr)
      return 2
  bad = [kv for kv in a.set if "=" not in kv]
  if bad:
    print(f"error: --set takes KEY=VALUE (e.g. model.remat=matmuls); got {bad[0]!r}", file=sys.stderr)
    return 2
  try:
    parse_runs(a.runs)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if os.path.exists(a.out) and not os.path.isdir(a.out):
    print(f"error: --out {a.out!r} is a file; give a directory", file=sys.stderr)
    return 2
  if a.include and not a.report_only:
    print("error: --include only goes with --report-only", file=sys.stderr)
    return 2
  if a.report_only:
    try:
      plan, runs = merged_results(a.out, a.include)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    write_report(a.out, plan, runs)
    return 0
  # The runs are subprocesses that take the accelerator's memory as they need it; the driver, which evaluates
  # between them, must not pre-allocate most of it first.
  os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  a.argv = list(sys.argv[1:] if argv is None else argv)
  if a.worker:
    return run_worker(a)
  try:
    return compare(a)
  except (ValueError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
