"""The layer's dtypes: for every (dtype, param_dtype, input dtype) the op runs in the compute dtype (dtype, or
None: the promotion of input and parameter dtypes, flax's rule), every output (sequence form, prefill, step) is in
it, the state is float32 and the convolution cache keeps the dtype of the cache it continues."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import gsa_jax.layers.gsa as gsa_layer
from gsa_jax.layers import GatedSlotAttention

D = 16
DTYPES = (None, jnp.float32, jnp.bfloat16)
PARAM_DTYPES = (jnp.float32, jnp.bfloat16)
INPUT_DTYPES = (jnp.float32, jnp.bfloat16)


@pytest.mark.parametrize("dtype,param_dtype,input_dtype", list(itertools.product(DTYPES, PARAM_DTYPES,
                                                                                     INPUT_DTYPES)))
def test_every_output_dtype(monkeypatch, dtype, param_dtype, input_dtype):
  op_dtypes, original = [], gsa_layer.gated_slot_attention

  def recording_op(q, *args, **kwargs):
    op_dtypes.append(q.dtype)
    return original(q, *args, **kwargs)

  monkeypatch.setattr(gsa_layer, "gated_slot_attention", recording_op)
  m = GatedSlotAttention(D, num_heads=2, num_slots=4, chunk_size=8, use_short_conv=True, dtype=dtype,
                         param_dtype=param_dtype, rngs=nnx.Rngs(0))
  compute = jnp.dtype(dtype or jnp.result_type(input_dtype, param_dtype))
  cache_dtype = jnp.dtype(dtype or param_dtype)
  x = jax.random.normal(jax.random.key(0), (2, 5, D), input_dtype)

  assert m(x).dtype == compute
  y, cache = m.prefill(x)
  assert y.dtype == compute and {a.dtype for a in cache.conv} == {compute}
  assert cache.state.hk.dtype == cache.state.hv.dtype == jnp.float32
  assert op_dtypes == [compute, compute]
  y, cache = m.prefill(x, cache=m.init_cache(2))
  assert y.dtype == compute and {a.dtype for a in cache.conv} == {cache_dtype}
  y, stepped = m.step(x[:, 0], cache)
  assert y.dtype == compute and {a.dtype for a in stepped.conv} == {cache_dtype}
  assert stepped.state.hk.dtype == jnp.float32
