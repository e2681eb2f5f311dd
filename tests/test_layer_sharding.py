"""The GSA layer and a GSALM inside `jax.shard_map` (check_vma=True) and on Explicit and Auto meshes with the
parameters replicated or their heads sharded, on 8 fake CPU devices (tests/sharded_layer_cases.py, in a
subprocess): outputs and every gradient (parameters and inputs) equal one device's."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cases(*kinds):
  result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sharded_layer_cases.py"), *kinds],
                          capture_output=True, text=True, cwd=ROOT, timeout=900, env={**os.environ, "PYTHONPATH": ROOT})
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.split("RESULTS")[-1])


def check(results, names):
  assert set(results) == set(names)
  bad = {name: err for name, err in results.items() if not (isinstance(err, float) and err <= 1e-5)}
  assert not bad, bad


def test_layer_and_model_under_shard_map_and_explicit_meshes():
  names = ["layer/shard_map", "model/shard_map"] + [f"{what}/Explicit/{params}" for what in ("layer", "model")
                                                    for params in ("replicated", "heads")]
  check(run_cases("shard_map", "Explicit"), names)


@pytest.mark.slow
def test_layer_and_model_on_auto_meshes():
  check(run_cases("Auto"), [f"{what}/Auto/{params}" for what in ("layer", "model") for params in ("replicated", "heads")])
