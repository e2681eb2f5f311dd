"""The library uses JAX's public API only: `jax._src` is JAX's implementation, free to change in any release."""

from __future__ import annotations

import ast
import os

import jax

from gsa_jax.train import trainer as trainer_lib
from gsa_jax.train.config import validate_config
from tests.test_train import ROOT, tiny_config


def _private_jax_imports(path: str) -> list[str]:
  """`file:line module` of each import of jax._src (or of a name from it) in a Python file."""
  found = []
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
    names = ([a.name for a in node.names] if isinstance(node, ast.Import)
             else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
    found += [f"{os.path.relpath(path, ROOT)}:{node.lineno} {n}" for n in names if n.startswith("jax._src")]
  return found


def test_the_library_imports_no_private_jax_module():
  files = [os.path.join(d, f) for package in ("gsa_jax", "pallas_kernels")
           for d, _, fs in os.walk(os.path.join(ROOT, package)) for f in fs if f.endswith(".py")]
  assert len(files) > 20
  assert [hit for f in files for hit in _private_jax_imports(f)] == []


def test_initialization_compiles_with_the_threefry_kernel_lowering_and_puts_the_flag_back(tmp_path):
  """The 1.3B model's initializers compile in seconds, not minutes, on GPU only with the kernel lowering; the flag
  is on for that one computation and as it was afterwards."""
  config = tiny_config(tmp_path / "run")
  run = trainer_lib.TrainRun(config, validate_config(config), trainer_lib.check_mesh(config, 1, 1))
  seen, compiled_init = [], run._init_state
  run._init_state = lambda: (seen.append(jax.config.jax_threefry_gpu_kernel_lowering), compiled_init())[1]
  before = jax.config.jax_threefry_gpu_kernel_lowering
  state = run.init_state()
  assert seen == [True] and jax.config.jax_threefry_gpu_kernel_lowering == before
  assert int(state["step"]) == 0
