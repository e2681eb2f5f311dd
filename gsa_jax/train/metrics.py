"""Metrics: a JSONL file (always), a console line, optional TensorBoard; only process 0 writes."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax

_log = logging.getLogger(__name__)

# Peak dense bf16 FLOP/s per chip, for MFU; a device not listed reports no MFU.
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5": 459e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def peak_flops(device_kind: str) -> float | None:
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):
    if name.lower() in device_kind.lower():
      return PEAK_FLOPS[name]
  return None


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The rows of a metrics file. A process killed mid-write can leave a partial last line: it is ignored."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [line for line in f.read().split("\n") if line.strip()]
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if i != len(lines) - 1:
        raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
  return rows


class MetricsWriter:
  """Appends one JSON object per row to `workdir/metrics.jsonl`.

  On resume from step S, rows past S (written by the interrupted run after its last checkpoint) are dropped, so
  the file holds each step once, as the resumed run computes it.
  """

  def __init__(self, workdir: str, *, resume_step: int, tensorboard: bool):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not self.enabled:
      return
    rows = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
    with open(self.path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
      except ImportError:
        _log.warning("train.tensorboard=True needs the tensorboardX package (pip install tensorboardX); "
                     "writing metrics.jsonl only.")
      else:
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, row: dict[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
      f.flush()
    if self._tb is not None:
      for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)):
          self._tb.add_scalar(key, value, row["step"])

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def format_duration(seconds: float) -> str:
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def console_line(row: dict[str, Any], total_steps: int) -> str:
  parts = [f"step {row['step']}/{total_steps}", f"loss {row['loss']:.4f}", f"grad {row['grad_norm']:.3f}",
           f"lr {row['learning_rate']:.2e}"]
  if "tokens_per_s" in row:
    parts.append(f"{row['tokens_per_s']:,.0f} tok/s ({row['tokens_per_s_per_device']:,.0f}/dev)")
  if row.get("mfu") is not None:
    parts.append(f"MFU {100 * row['mfu']:.1f}%")
  if "step_time_s" in row:
    parts.append(f"{1e3 * row['step_time_s']:.0f} ms/step")
  if "eta_s" in row:
    parts.append(f"ETA {format_duration(row['eta_s'])}")
  if row.get("nonfinite_total"):
    parts.append(f"skipped {row['nonfinite_total']}")
  return " | ".join(parts)
