"""Device time by op from a `jax.profiler` trace (its Perfetto JSON): the summary the benchmarks print."""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os


def print_profile_summary(profile_dir: str, steps: int, unit: str = "step", top: int = 25) -> None:
  """Top device ops by total time, from the Perfetto trace `jax.profiler.trace` wrote under profile_dir."""
  paths = sorted(glob.glob(os.path.join(profile_dir, "**", "perfetto_trace.json.gz"), recursive=True))
  if not paths:
    print(f"profile: no perfetto_trace.json.gz under {profile_dir}")
    return
  with gzip.open(paths[-1], "rt") as f:
    events = json.load(f)["traceEvents"]
  names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device = {pid for pid, name in names.items() if "/device:GPU" in name or "/device:TPU" in name}
  totals = collections.defaultdict(float)
  counts = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in device:
      totals[e["name"]] += e.get("dur", 0.0)
      counts[e["name"]] += 1
  busy = sum(totals.values())
  if not busy:
    print(f"profile: no device events in {paths[-1]} (processes: {sorted(set(names.values()))[:8]})")
    return
  print(f"profile: {paths[-1]}")
  print(f"device busy ms per {unit} (sum over streams): {busy / 1e3 / steps:.1f}")
  print(f"{'op':<70} | {f'ms/{unit}':>8} | {'%':>5} | calls/{unit}")
  for name, dur in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
    print(f"{name[:70]:<70} | {dur / 1e3 / steps:8.2f} | {100 * dur / busy:5.1f} | {counts[name] / steps:.0f}")
