"""Test-session setup: one persistent XLA compilation cache for the whole run (subprocesses included), so the many
small training runs that compile the same programs compile them once; float32 matmuls at full precision; and the
fixtures several test files use.

The suite compares float32 formulations of the same math (prefill in pieces against prefill at once, decode against
the full forward, ...) to 1e-5..1e-4. On NVIDIA GPUs XLA's default float32 matmul uses TF32 (10-bit mantissa), which
puts ~1e-3 between any two differently shaped computations, so on the H200 eight such tests failed by that much and
passed at "highest". Set through the environment so the training runs the tests start in subprocesses inherit it;
CPUs compute float32 matmuls in full either way. Users keep JAX's default (TF32 on GPU) unless they choose otherwise.
"""

import os
import tempfile

import jax
import pytest

# One cache per xdist worker (and the subprocesses it starts, which run while it waits): with one cache for both
# workers, a worker aborted inside jax's compilation_cache reading an entry (twice in session 7's suite runs).
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                               os.path.join(tempfile.gettempdir(), "gsa_jax_test_xla_cache", _WORKER))
os.makedirs(_CACHE, exist_ok=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_default_matmul_precision", os.environ["JAX_DEFAULT_MATMUL_PRECISION"])


@pytest.fixture
def x64():
  """The test runs with float64 enabled (the references' precision)."""
  with jax.enable_x64(True):
    yield
