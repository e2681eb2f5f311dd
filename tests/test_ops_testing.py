"""gsa_jax.ops.testing: the input makers and the timer that tests, benchmarks and `gsa_jax.ops.check` share."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsa_jax.ops.testing import anchor_inputs, make_inputs, random_segment_ids, time_calls


def test_swish_feature_map_is_applied_to_the_same_draws():
  with jax.enable_x64(True):  # float64 rounding: the unrounded draws
    plain = make_inputs(3, dtype=jnp.float64)
    swish = make_inputs(3, feature_map="swish", dtype=jnp.float64)
  for name in "qk":
    np.testing.assert_allclose(swish[name], plain[name] / (1 + np.exp(-plain[name])), rtol=1e-12)
  for name in "vsg":
    np.testing.assert_array_equal(swish[name], plain[name])


@pytest.mark.parametrize("kwargs,message", [({"gate": "half"}, "gate must be one of"),
                                            ({"feature_map": "relu"}, "feature_map must be one of")])
def test_make_inputs_refuses_unknown_recipes(kwargs, message):
  with pytest.raises(ValueError, match=message):
    make_inputs(0, **kwargs)


def test_anchor_inputs_are_the_swish_recipe_without_grouped_heads():
  (q, k, v, s, g), do = anchor_inputs(2, 8, 3, 16, 4, dtype=jnp.float32, seed=5)
  x = make_inputs(5, b=2, t=8, hq=3, h=3, dk=16, dv=16, m=4, feature_map="swish")
  for got, name in zip((q, k, v, s, g), "qkvsg"):
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, x[name])
  assert do.shape == (2, 8, 3, 16) and do.dtype == jnp.float32
  assert anchor_inputs(1, 4, 1, 8, 2)[0][0].dtype == jnp.bfloat16  # the default dtype


def test_random_segment_ids_pack_documents_and_pad_odd_rows_on_the_right():
  ids = random_segment_ids(np.random.default_rng(0), 6, 64)
  assert ids.shape == (6, 64) and ids.dtype == np.int32
  for row in ids:
    tokens = row[row > 0]
    n = len(tokens)
    assert (row[n:] == 0).all()  # padding only at the end
    assert tokens[0] == 1 and (np.diff(tokens) >= 0).all() and (np.diff(tokens) <= 1).all()
  assert (ids[::2] > 0).all()


def test_time_calls_warms_up_then_times_each_call_and_the_loop():
  calls, synced = [], []

  def call():
    calls.append(len(calls))
    return len(calls)

  timing = time_calls(call, 3, warmup=2, sync=synced.append)
  assert len(calls) == 5 and synced == [1, 2, 3, 4, 5] and timing.loop_ms is None and timing.sync_ms >= 0
  timing = time_calls(call, 3, warmup=1, loop=True, sync=synced.append)
  # One warm-up, three synchronized calls, then three back to back synchronized once (the last result).
  assert len(calls) == 5 + 7 and synced[5:] == [6, 7, 8, 9, 12] and timing.loop_ms >= 0
