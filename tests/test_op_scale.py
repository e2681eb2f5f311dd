"""The op's scale: a Python number is static; a jax.Array scale is traced (under jit, differentiable, one
compilation for every value) and gives what the same static value gives."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from gsa_jax.ops import gated_slot_attention
from gsa_jax.ops.testing import cast, make_inputs, rel_err


def inputs():
  x = cast(make_inputs(0, b=2, t=11, hq=2, h=2, dk=8, dv=4, m=4, normalizer=4.0), jnp.float32)
  return tuple(x[n] for n in "qkvsg")


@pytest.mark.parametrize("backend", ("recurrent", "chunked"))
def test_traced_scale_equals_static_scale(backend):
  q, k, v, s, g = inputs()
  loss = lambda q, scale: jnp.sum(jnp.sin(gated_slot_attention(q, k, v, s, g, scale=scale, chunk_size=8,
                                                               backend=backend)[0]))
  traced = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  for value in (0.3, 1.7):
    (got, (dq, dscale)), (want, dq_want) = traced(q, jnp.float32(value)), jax.value_and_grad(loss)(q, value)
    assert rel_err(got, want) < 1e-6 and rel_err(dq, dq_want) < 1e-5
    # The logits are value * q @ Hk: d loss / d scale = <d loss / d q, q> / scale.
    assert rel_err(dscale, jnp.sum(dq_want * q) / value) < 1e-4
  assert traced._cache_size() == 1  # a new value does not compile anew


def test_scale_must_be_a_scalar():
  with pytest.raises(ValueError, match="scale must be a scalar"):
    gated_slot_attention(*inputs(), scale=jnp.ones((2,)))
