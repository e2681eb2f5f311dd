"""The trainer's Checkpointer saves and restores any NNX state without a data iterator (a user's own model)."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from gsa_jax.layers import GatedSlotAttention
from gsa_jax.run_dir import Checkpointer


def make():
  return GatedSlotAttention(16, num_heads=2, num_slots=4, use_short_conv=True, rngs=nnx.Rngs(0))


def test_save_and_restore_an_nnx_state_without_data_iterator(tmp_path):
  layer = make()
  nnx.update(layer, jax.tree.map(lambda a: a + 1.0, nnx.state(layer, nnx.Param)))  # not the init values
  with Checkpointer(str(tmp_path / "ckpt"), keep=2, async_save=True) as checkpointer:  # as the README shows it
    checkpointer.save(7, nnx.state(layer))
  graphdef, abstract = nnx.split(nnx.eval_shape(make))
  with Checkpointer(str(tmp_path / "ckpt"), keep=2, async_save=False) as checkpointer:  # a later session
    step, state = checkpointer.restore_latest(abstract)
  assert step == 7
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(nnx.state(layer))):
    np.testing.assert_array_equal(a, b)
  x = jax.random.normal(jax.random.key(1), (1, 5, 16))
  np.testing.assert_array_equal(nnx.merge(graphdef, state)(x), layer(x))
