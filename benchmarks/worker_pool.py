"""A benchmark script run as N processes sharing one device, the i-th with `--shard i/N` (their compilations, a CPU
job, overlap): used by `benchmarks/mqar_sweep.py --workers N`."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable


def shard(text: str) -> tuple[int, int]:
  """'I/N' -> (I, N), with 0 <= I < N."""
  index, _, count = text.partition("/")
  if not (index.isdigit() and count.isdigit() and 0 <= int(index) < int(count)):
    raise argparse.ArgumentTypeError(f"{text!r} is not I/N with 0 <= I < N (e.g. 0/4)")
  return int(index), int(count)


def without_option(argv: list[str], name: str) -> list[str]:
  """argv less `name VALUE` / `name=VALUE`."""
  out, skip = [], False
  for arg in argv:
    if skip:
      skip = False
    elif arg == name:
      skip = True
    elif not arg.startswith(name + "="):
      out.append(arg)
  return out


def run_workers(script: str, count: int, argv: list[str], out: str, *, echo: Callable[[str], bool],
                poll_s: float = 2.0) -> list[int]:
  """Runs `python script argv` (less its --workers and --out) as `count` processes sharing the device, the i-th
  with `--out out --shard i/count`, each given 0.9 / count of the GPU's memory (unless
  XLA_PYTHON_CLIENT_MEM_FRACTION is set) and logging to out/workerI.log. Echoes each logged line for which
  `echo(line)` holds as it is logged; returns the processes' exit codes."""
  os.makedirs(out, exist_ok=True)
  env = {**os.environ}
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / count:.3f}")
  args = [sys.executable, script, *without_option(without_option(argv, "--workers"), "--out"), "--out", out]
  logs = [os.path.join(out, f"worker{i}.log") for i in range(count)]
  procs = []
  try:
    for i, log in enumerate(logs):
      with open(log, "w") as f:
        procs.append(subprocess.Popen([*args, "--shard", f"{i}/{count}"], stdout=f, stderr=subprocess.STDOUT,
                                      env=env))
    print(f"{count} workers started; their logs: {os.path.join(out, 'worker*.log')}", flush=True)
    seen = [0] * count
    while True:
      running = any(proc.poll() is None for proc in procs)
      for i, log in enumerate(logs):
        with open(log) as f:
          lines = f.read().split("\n")[:-1]  # whole lines only: the last may still be being written
        for line in lines[seen[i]:]:
          if echo(line):
            print(f"worker {i}: {line}", flush=True)
        seen[i] = len(lines)
      if not running:
        break
      time.sleep(poll_s)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.terminate()
  for i, proc in enumerate(procs):
    if proc.returncode:
      with open(logs[i]) as f:
        tail = f.read().splitlines()[-15:]
      print(f"worker {i} failed (exit {proc.returncode}); the end of {logs[i]}:\n  " + "\n  ".join(tail), flush=True)
  return [proc.returncode for proc in procs]
