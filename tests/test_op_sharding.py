"""The op inside `jax.shard_map` (check_vma=True) and on Explicit and Auto meshes, every backend, on 8 fake CPU
devices (tests/sharded_op_cases.py, in a subprocess: the device count is fixed when JAX starts): outputs, final
states and every gradient equal the same backend's on one device. Under shard_map pallas_gpu is interpreted on a
CPU, which Pallas' interpreter cannot do there, so it runs 'chunked' (logged); the compiled kernels are checked
by tests/test_pallas_gpu.py on a GPU."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cases(layouts, *backends):
  result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sharded_op_cases.py"), str(layouts),
                           *backends], capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={**os.environ, "PYTHONPATH": ROOT})
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.split("RESULTS")[-1])


def check(results, backends, layouts):
  names = {f"{b}/shard_map" for b in backends} | {f"{b}/{kind}/{label}" for b in backends
                                                   for kind in ("Explicit", "Auto")
                                                   for label in ("rows_heads", "rows", "heads")[:layouts]}
  assert set(results) == names
  bad = {name: err for name, err in results.items() if not err <= 1e-5}
  assert not bad, bad


def test_references_under_every_mesh():
  check(run_cases(3, "recurrent", "chunked"), ("recurrent", "chunked"), 3)


def test_kernels_under_every_mesh():
  check(run_cases(1, "pallas_gpu", "pallas_tpu"), ("pallas_gpu", "pallas_tpu"), 1)


@pytest.mark.slow
def test_kernels_under_every_mesh_every_layout():
  check(run_cases(3, "pallas_gpu", "pallas_tpu"), ("pallas_gpu", "pallas_tpu"), 3)
