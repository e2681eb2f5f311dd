"""The MQAR sweep's result rows (`benchmarks/mqar_sweep.py`): their keys and settings, reading results*.jsonl,
and each cell's best learning rate."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def cell_key(row) -> tuple:
  """The table cell of a row: (model, width, seq_len, kv_pairs)."""
  return (row["model"], row["width"], row["seq_len"], row["kv_pairs"])


def run_key(row) -> tuple:
  return (*cell_key(row), row["learning_rate"], row["seed"])


# The training settings shared by every row: a rerun reuses a finished row only when they are all the same. (The
# backend is recorded but not compared: every backend computes the same op.)
SETTING_KEYS = ("steps", "batch_size", "warmup_steps", "vocab_size", "eval_batches", "train_data", "dtype")


# What a row written before a setting existed means: "train_data" absent = the grain pipeline, "dtype" absent = float32.
SETTING_DEFAULTS = {"train_data": "pipeline", "dtype": "float32"}


def settings(a: argparse.Namespace) -> dict:
  """This sweep's settings (training batches always come from `mqar_batch`: "device")."""
  current = {**vars(a), "train_data": "device"}
  return {k: current[k] for k in SETTING_KEYS}


def row_settings(row: dict) -> dict:
  return {k: row.get(k, SETTING_DEFAULTS.get(k)) for k in SETTING_KEYS}


def read_rows(out: str, match: dict | None = None) -> list[dict]:
  """The rows in out's results*.jsonl (results.jsonl and the shards' files), one per run and settings: a finished
  row wins over a "not run" one, otherwise the last one read (files in name order). match: keep only rows with
  these settings (`settings`). A line cut short by a killed process is skipped with a warning."""
  rows: dict[tuple, dict] = {}
  for name in sorted(f for f in os.listdir(out) if f.startswith("results") and f.endswith(".jsonl")):
    with open(os.path.join(out, name)) as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          print(f"warning: {name}:{number} is not a JSON row (a run killed while writing?); skipped", flush=True)
          continue
        if match is not None and row_settings(row) != match:
          continue
        key = (run_key(row), json.dumps(row_settings(row), sort_keys=True))
        if row["status"] == "ok" or rows.get(key, {}).get("status") != "ok":
          rows[key] = row
  return list(rows.values())


def group(rows: list[dict]) -> dict[tuple, list[dict]]:
  """Table cell -> its rows (every learning rate and seed)."""
  cells: dict[tuple, list[dict]] = {}
  for r in rows:
    cells.setdefault(cell_key(r), []).append(r)
  return cells


def accuracies(rows: list[dict]) -> dict[float, list[float]]:
  """Learning rate -> the accuracies of its finished runs (one per seed)."""
  out: dict[float, list[float]] = {}
  for r in rows:
    if r["status"] == "ok":
      out.setdefault(r["learning_rate"], []).append(r["accuracy"])
  return out


def best(rows: list[dict]) -> tuple[float, list[float]] | None:
  """Among a cell's finished runs: the learning rate with the highest mean accuracy over seeds, and its accuracies."""
  accs = accuracies(rows)
  return max(accs.items(), key=lambda item: np.mean(item[1])) if accs else None
