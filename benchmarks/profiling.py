"""Device time by op from a `jax.profiler` trace (its Perfetto JSON): the summary the benchmarks print, and, given the
compiled program's HLO text (`compiled.as_text()`), the same time attributed to the source lines that produced each
kernel (so "loop_add_multiply_fusion.12: 8.8 ms" reads as "gsa_jax/layers/gsa.py:312: 8.8 ms")."""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re

# An HLO instruction with its metadata: `%name = type op(...), ..., metadata={op_name="..." ...}` where the rest
# is `source_file="..." source_line=N` (older XLA) or `stack_frame_id=N` (an index into the module's StackFrames
# table, which chains FileLocations of FileNames: the call stack of the Python line that produced it).
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = [^\n]*?metadata=\{op_name="([^"]*)"([^}]*)\}', re.M)
_TABLE_ROW = re.compile(r'^(\d+) (\{[^}]*\}|"[^"]*")$', re.M)
_PROJECT = ("gsa_jax/", "pallas_kernels/", "benchmarks/")


def _tables(hlo_text: str) -> dict[str, dict[int, str]]:
  """The module's FileNames, FunctionNames, FileLocations and StackFrames tables (before its first computation):
  section -> {id: row text}."""
  tables, section = {}, None
  for line in hlo_text.splitlines():
    if line.startswith(("%", "ENTRY")):
      break
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      section = tables.setdefault(line, {})
    elif section is not None and (row := _TABLE_ROW.match(line)):
      section[int(row.group(1))] = row.group(2).strip('"')
  return tables


def _field(row: str, key: str) -> int:
  return int(re.search(rf"\b{key}=(\d+)", row).group(1))


def _frame_lines(tables, frame_id: int) -> list[str]:
  """"file:line" of a stack frame and its callers, innermost first."""
  frames, files, locations = tables.get("StackFrames", {}), tables.get("FileNames", {}), tables.get("FileLocations", {})
  lines, seen = [], set()
  while frame_id in frames and frame_id not in seen:
    seen.add(frame_id)
    location = locations.get(_field(frames[frame_id], "file_location_id"), "")
    if location:
      lines.append(f"{_short_path(files.get(_field(location, 'file_name_id'), '?'))}:{_field(location, 'line')}")
    frame_id = _field(frames[frame_id], "parent_frame_id")
  return lines


def instruction_sources(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> "file:line" of the Python line that produced it (the innermost line of this project's
  code on its call stack, else the innermost line; the op_name's last part when no line is recorded), for every
  instruction of an optimized module that carries metadata. A fusion instruction carries its root's metadata,
  which names the line the kernel was made for."""
  tables, sources = _tables(hlo_text), {}
  for name, op_name, rest in _INSTRUCTION.findall(hlo_text):
    file_line = re.search(r'source_file="([^"]*)" source_line=(\d+)', rest)
    frame = re.search(r"stack_frame_id=(\d+)", rest)
    if file_line:
      sources[name] = f"{_short_path(file_line.group(1))}:{file_line.group(2)}"
    elif frame and (lines := _frame_lines(tables, int(frame.group(1)))):
      sources[name] = next((x for x in lines if x.startswith(_PROJECT)), lines[0])
    else:
      sources[name] = op_name.split("/")[-1] or "(no source)"
  return sources


def _short_path(path: str) -> str:
  """The path from the project's or a library's package root (gsa_jax/..., pallas_kernels/..., flax/...)."""
  parts = path.replace("\\", "/").split("/")
  # The last package root on the path: a checkout named gsa_jax that holds a virtual environment must not make
  # site-packages/flax/... look like project code.
  for i in range(len(parts) - 2, -1, -1):
    if parts[i] in ("gsa_jax", "pallas_kernels", "benchmarks", "flax", "optax", "jax"):
      return "/".join(parts[i:])
  return "/".join(parts[-2:])


def _event_source(event: dict, sources: dict[str, str]) -> str:
  """The source line of one device event: by its `hlo_op` argument when the trace has it, else by its name (GPU
  kernels are named after their HLO instruction, with '.' written '_')."""
  candidates = [event.get("args", {}).get("hlo_op"), event["name"]]
  base, _, suffix = event["name"].rpartition("_")
  if suffix.isdigit():
    candidates.append(f"{base}.{suffix}")
  for name in candidates:
    if name and name in sources:
      return sources[name]
  return "(not in the HLO: library kernels, copies)"


def _device_events(profile_dir: str):
  """(path of the trace, its device 'X' events), or (path or None, None) when there are none."""
  paths = sorted(glob.glob(os.path.join(profile_dir, "**", "perfetto_trace.json.gz"), recursive=True))
  if not paths:
    return None, None
  with gzip.open(paths[-1], "rt") as f:
    events = json.load(f)["traceEvents"]
  names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device = {pid for pid, name in names.items() if "/device:GPU" in name or "/device:TPU" in name}
  found = [e for e in events if e.get("ph") == "X" and e.get("pid") in device]
  if not found:
    print(f"profile: no device events in {paths[-1]} (processes: {sorted(set(names.values()))[:8]})")
  return paths[-1], found or None


def print_profile_summary(profile_dir: str, steps: int, unit: str = "step", top: int = 25,
                          hlo_text: str | None = None) -> None:
  """Top device ops by total time, from the Perfetto trace `jax.profiler.trace` wrote under profile_dir; with
  `hlo_text` (the profiled program's `compiled.as_text()`) also the top source lines."""
  path, events = _device_events(profile_dir)
  if path is None:
    print(f"profile: no perfetto_trace.json.gz under {profile_dir}")
  if not events:
    return
  totals, counts = collections.defaultdict(float), collections.Counter()
  for e in events:
    totals[e["name"]] += e.get("dur", 0.0)
    counts[e["name"]] += 1
  busy = sum(totals.values())
  print(f"profile: {path}")
  print(f"device busy ms per {unit} (sum over streams): {busy / 1e3 / steps:.1f}")
  _print_table("op", totals, counts, busy, steps, unit, top)
  if hlo_text:
    by_line, line_counts = collections.defaultdict(float), collections.Counter()
    sources = instruction_sources(hlo_text)
    for e in events:
      line = _event_source(e, sources)
      by_line[line] += e.get("dur", 0.0)
      line_counts[line] += 1
    _print_table("source line of the kernel", by_line, line_counts, busy, steps, unit, top)


def _print_table(title, totals, counts, busy, steps, unit, top):
  print(f"{title:<70} | {f'ms/{unit}':>8} | {'%':>5} | calls/{unit}")
  for name, dur in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
    print(f"{name[:70]:<70} | {dur / 1e3 / steps:8.2f} | {100 * dur / busy:5.1f} | {counts[name] / steps:.0f}")
