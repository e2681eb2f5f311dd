"""Test-session setup: one persistent XLA compilation cache for the whole run (subprocesses included), so the many
small training runs that compile the same programs compile them once; float32 matmuls at full precision; and the
fixtures several test files use. In this suite a NaN never equals a NaN: `np.testing.assert_allclose` defaults to
equal_nan=False, so two paths that both produce NaN fail the comparison instead of passing it.

The suite compares float32 formulations of the same math (prefill in pieces against prefill at once, decode against
the full forward, ...) to 1e-5..1e-4. On NVIDIA GPUs XLA's default float32 matmul uses TF32 (10-bit mantissa), which
puts ~1e-3 between any two differently shaped computations, so on the H200 eight such tests failed by that much and
passed at "highest". Set through the environment so the training runs the tests start in subprocesses inherit it;
CPUs compute float32 matmuls in full either way. Users keep JAX's default (TF32 on GPU) unless they choose otherwise.
"""

import functools
import os
import tempfile

import jax
import numpy as np
import pytest

np.testing.assert_allclose = functools.partial(np.testing.assert_allclose, equal_nan=False)

# One cache per test run and xdist worker (and the subprocesses a worker starts, which run while it waits). jax writes
# entries non-atomically, and a worker aborted reading one three times in session 7 while the cache was shared by
# both workers and kept across runs (a process that dies mid-write leaves its partial entry for every later run).
# The controller's import fixes the run's folder; workers inherit it through the environment.
_RUN_CACHE = os.environ.setdefault(
    "GSA_TEST_XLA_CACHE", os.path.join(tempfile.gettempdir(), "gsa_jax_test_xla_cache", f"run-{os.getpid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_default_matmul_precision", os.environ["JAX_DEFAULT_MATMUL_PRECISION"])


def pytest_configure(config):
  cache = os.path.join(_RUN_CACHE, getattr(config, "workerinput", {}).get("workerid", "main"))
  os.makedirs(cache, exist_ok=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
  jax.config.update("jax_compilation_cache_dir", cache)


@pytest.fixture
def x64():
  """The test runs with float64 enabled (the references' precision)."""
  with jax.enable_x64(True):
    yield
