"""benchmarks/profiling.py: device time by op and by the source line of each kernel, on a synthetic trace of a real
compiled program (CPU traces hold no device events, so the events are written here as a GPU trace names them)."""

from __future__ import annotations

import gzip
import json
import re

import jax
import jax.numpy as jnp

from benchmarks.profiling import instruction_sources, print_profile_summary


def _program(x, w):
  h = jnp.tanh(x @ w)  # LINE_TANH
  return jnp.sum(jnp.exp(h) * 3.0)  # LINE_EXP


def _line(tag: str) -> str:
  with open(__file__) as f:
    number = next(i for i, text in enumerate(f, 1) if text.rstrip().endswith(f"# {tag}"))
  return f"test_profiling.py:{number}"


def test_instructions_map_to_the_lines_that_made_them():
  text = jax.jit(jax.grad(_program)).lower(jnp.ones((8, 8)), jnp.ones((8, 8))).compile().as_text()
  sources = instruction_sources(text)
  assert sources and set(sources.values()) & {f"tests/{_line('LINE_TANH')}", f"tests/{_line('LINE_EXP')}"}
  assert all(re.fullmatch(r"[\w./\-]+:\d+|[\w\-]+|\(no source\)", s) for s in sources.values()), sources


def test_summary_attributes_kernel_time_to_source_lines(tmp_path, capsys):
  text = jax.jit(jax.grad(_program)).lower(jnp.ones((8, 8)), jnp.ones((8, 8))).compile().as_text()
  sources = instruction_sources(text)
  tanh_op = next(name for name, line in sources.items() if line.endswith(_line("LINE_TANH")))
  events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            # GPU kernels are named after their instruction with '.' written '_'; one event carries hlo_op.
            {"ph": "X", "pid": 1, "name": tanh_op.replace(".", "_"), "dur": 300.0},
            {"ph": "X", "pid": 1, "name": "some_kernel", "dur": 100.0, "args": {"hlo_op": tanh_op}},
            {"ph": "X", "pid": 1, "name": "nvjet_gemm_from_a_library", "dur": 600.0}]
  folder = tmp_path / "plugins" / "profile" / "run"
  folder.mkdir(parents=True)
  with gzip.open(folder / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  print_profile_summary(str(tmp_path), steps=2, hlo_text=text)
  out = capsys.readouterr().out
  assert "device busy ms per step (sum over streams): 0.5" in out
  row = next(line for line in out.splitlines() if _line("LINE_TANH") in line)
  assert re.search(r"\|\s+0\.20 \|\s+40\.0 \| 1$", row), row  # 400 us over 2 steps, 40% of the busy time, 2 calls
  assert re.search(r"\(not in the HLO: library kernels, copies\)\s+\|\s+0\.30 \|\s+60\.0", out), out
