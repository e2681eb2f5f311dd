"""The kernels' tiles from the public op, the layer, GSAConfig and train.py's config: parsed and validated in one
place (`gsa_jax.ops.parse_kernel_block_sizes`), handed to the backend that runs, and harmless to the numbers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from gsa_jax.models import GSAConfig, GSALM
from gsa_jax.ops import gated_slot_attention, kernel_block_sizes_spec, parse_kernel_block_sizes
from gsa_jax.train.config import validate_config
from pallas_kernels import gsa_gpu, gsa_mgpu, gsa_tpu


def test_the_string_and_mapping_forms_build_each_kernels_block_sizes():
  built = parse_kernel_block_sizes("pallas_gpu.block_k=128, pallas_gpu.split_all=false,pallas_gpu.state_block=none,"
                                   "pallas_tpu.chunk=128")
  assert built == {"pallas_gpu": gsa_gpu.BlockSizes(block_k=128, split_all=False, state_block=None),
                   "pallas_tpu": gsa_tpu.BlockSizes(chunk=128)}
  given = gsa_mgpu.BlockSizes(out_block=64)
  assert parse_kernel_block_sizes({"pallas_mgpu": given, "pallas_gpu": {"num_warps": 8}}) == {
      "pallas_mgpu": given, "pallas_gpu": gsa_gpu.BlockSizes(num_warps=8)}
  assert parse_kernel_block_sizes(None) == parse_kernel_block_sizes("") == {}
  # The canonical string: fields that differ from the defaults, sorted; it parses back to the same tiles.
  spec = kernel_block_sizes_spec({"pallas_tpu": {"chunk": 128}, "pallas_gpu": {"num_warps": 8, "chunk": 64}})
  assert spec == "pallas_gpu.num_warps=8,pallas_tpu.chunk=128"
  assert parse_kernel_block_sizes(spec) == parse_kernel_block_sizes("pallas_tpu.chunk=128,pallas_gpu.num_warps=8")


def _inputs(t=40):
  ks = jax.random.split(jax.random.key(0), 5)
  b, h, dk, dv, m = 1, 2, 16, 16, 8
  q, k = (jax.random.normal(x, (b, t, h, dk)) for x in ks[:2])
  v = jax.random.normal(ks[2], (b, t, h, dv))
  s = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, h, m)))
  g = jax.nn.log_sigmoid(jax.random.normal(ks[4], (b, t, h, m)))
  return q, k, v, s, g


def test_the_backend_that_runs_gets_its_tiles_and_the_numbers_do_not_change(monkeypatch):
  """pallas_gpu (interpreted here) receives exactly its entry of kernel_block_sizes; with a chunk of 16 and
  32-wide blocks it equals the recurrence like the defaults do."""
  q, k, v, s, g = _inputs(t=37)  # a shape no other test traces, so the jitted backend traces (and calls the spy)
  seen = []
  real = gsa_gpu.gsa_pallas_gpu

  def spy(*args, block_sizes=None, **kwargs):
    seen.append(block_sizes)
    return real(*args, block_sizes=block_sizes, **kwargs)

  monkeypatch.setattr(gsa_gpu, "gsa_pallas_gpu", spy)
  tiles = "pallas_gpu.chunk=16,pallas_gpu.block_k=32,pallas_gpu.block_v=32,pallas_tpu.chunk=32"
  o, state = gated_slot_attention(q, k, v, s, g, backend="pallas_gpu", kernel_block_sizes=tiles,
                                  output_final_state=True)
  assert seen == [gsa_gpu.BlockSizes(chunk=16, block_k=32, block_v=32)]
  ref, ref_state = gated_slot_attention(q, k, v, s, g, backend="recurrent", output_final_state=True)
  for got, want in ((o, ref), (state.hk, ref_state.hk), (state.hv, ref_state.hv)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
  # The references ignore the kernels' tiles.
  np.testing.assert_array_equal(gated_slot_attention(q, k, v, s, g, backend="chunked", kernel_block_sizes=tiles)[0],
                                gated_slot_attention(q, k, v, s, g, backend="chunked")[0])


def test_gsaconfig_and_the_layer_hand_the_tiles_to_the_op(monkeypatch):
  from gsa_jax.layers import gsa as gsa_layer  # pylint: disable=import-outside-toplevel
  seen = []
  real = gsa_layer.gated_slot_attention

  def spy(*args, **kwargs):
    seen.append(kwargs["kernel_block_sizes"])
    return real(*args, **kwargs)

  monkeypatch.setattr(gsa_layer, "gated_slot_attention", spy)
  c = GSAConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, num_slots=4, backend="chunked",
                kernel_block_sizes={"pallas_gpu": {"num_warps": 8}})
  assert c.kernel_block_sizes == "pallas_gpu.num_warps=8" and hash(c)  # stored as its canonical string
  GSALM(c, rngs=nnx.Rngs(0))(jnp.ones((1, 8), jnp.int32))
  assert seen == ["pallas_gpu.num_warps=8"] * 2
  with pytest.raises(ValueError, match=r"GSAConfig.kernel_block_sizes: pallas_gpu: BlockSizes.num_warps=5; "
                                       r"expected 1, 2, 4, 8 or 16"):
    GSAConfig(kernel_block_sizes="pallas_gpu.num_warps=5")


def test_train_configs_take_the_tiles_from_the_command_line_form():
  config = base.get_config()
  config.model.kernel_block_sizes = "pallas_gpu.state_num_stages=3,pallas_gpu.block_v=128"
  assert validate_config(config, check_data=False).kernel_block_sizes == (
      "pallas_gpu.block_v=128,pallas_gpu.state_num_stages=3")
  config.model.kernel_block_sizes = "pallas_gpu.num_stages=0"
  with pytest.raises(ValueError, match=r"kernel_block_sizes: pallas_gpu: BlockSizes.num_stages=0; expected an int"):
    validate_config(config, check_data=False)


def test_runs_resume_across_a_change_of_tiles_and_from_before_the_key_existed():
  import json  # pylint: disable=import-outside-toplevel
  from gsa_jax.train.config import differing_keys, to_json  # pylint: disable=import-outside-toplevel
  config = base.get_config()
  saved = json.loads(to_json(config))
  del saved["model"]["kernel_block_sizes"]  # a run directory written before the key existed
  config.model.kernel_block_sizes = "pallas_gpu.num_warps=8"  # tiles change speed, not the numbers
  assert differing_keys(saved, config) == []
