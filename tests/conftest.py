"""Test-session setup: one persistent XLA compilation cache for the whole run (subprocesses included), so the many
small training runs that compile the same programs compile them once; and the fixtures several test files use."""

import os
import tempfile

import jax
import pytest

_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "gsa_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


@pytest.fixture
def x64():
  """The test runs with float64 enabled (the references' precision)."""
  with jax.enable_x64(True):
    yield
