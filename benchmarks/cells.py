"""One benchmark measurement per child process ("cell"): a fresh device (its own peak-memory counter, its own
compilation), a wall-clock limit, and an out-of-memory cell reported as such instead of ending the sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

_OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM")


def failure_status(returncode: int | None, output: str) -> str:
  """'timeout', 'oom' or 'error' for a child that wrote no result (returncode None: killed at its time limit)."""
  if returncode is None:
    return "timeout"
  return "oom" if any(marker in output for marker in _OOM_MARKERS) else "error"


def run_cell(argv: list[str], timeout_s: float) -> dict:
  """Runs `python argv... --result_json=FILE` and returns the dict it wrote there, or on failure
  {"status": "oom" | "timeout" | "error", "detail": the last line of its output}. Success adds status "ok"."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "result.json")
    try:
      proc = subprocess.run([sys.executable, *argv, f"--result_json={path}"], capture_output=True, text=True,
                            timeout=timeout_s)
      returncode, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
      returncode = None
      output = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
    if returncode == 0 and os.path.exists(path):
      with open(path) as f:
        return {"status": "ok", **json.load(f)}
  lines = [line for line in output.splitlines() if line.strip()]
  status = failure_status(returncode, output)
  detail = f"no result within {timeout_s:.0f} s" if status == "timeout" else (lines[-1][:300] if lines else "")
  return {"status": status, "detail": detail}
