"""Context-parallel GSA (gsa_jax/ops/context_parallel.py).

On 8 fake CPU devices (tests/context_parallel_cases.py, in a subprocess): the sequence split in 2, 4 and 8 shards
gives the single-device op's output, final state and every gradient (initial state included) within 1e-5
relative, with documents crossing shard boundaries, starting exactly at one and spanning several shards, padding
at a shard's start, all-padding shards, an initial state and extreme gates; called as a wrapper and inside the
caller's shard_map (heads split over a second axis). Under shard_map on a CPU 'pallas_gpu' runs 'chunked'
(tests/test_op_sharding.py says why) and is compared with 'chunked'. In this process: the fold and the shard
summary on one device, errors, the communication and memory scripts.
"""

import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType

from gsa_jax.ops import GSAState, gated_slot_attention
from gsa_jax.ops.context_parallel import context_parallel_gsa, fold_states, shard_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cases(grid, *backends):
  result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "context_parallel_cases.py"), grid,
                           *backends], capture_output=True, text=True, cwd=ROOT, timeout=1800,
                          env={**os.environ, "PYTHONPATH": ROOT})
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.split("RESULTS")[-1])


def check(results, backends, full):
  kinds = ["Explicit/2", "Explicit/4", "Explicit/8", "shard_map", "plain/4"] + (["Auto/4"] if full else [])
  assert set(results) == {f"{b}/{kind}" for b in backends for kind in kinds}
  bad = {name: err for name, err in results.items() if not err <= 1e-5}
  assert not bad, bad


def test_split_2_4_8_equals_one_device():
  check(run_cases("short", "chunked"), ("chunked",), full=False)


@pytest.mark.slow
def test_every_backend_every_mesh():
  backends = ("recurrent", "chunked", "pallas_gpu", "pallas_tpu")
  check(run_cases("full", *backends), backends, full=True)


def test_communication_is_one_state_per_shard_whatever_t():
  """The compiled forward + backward on 4 sequence shards (rows over 2 more devices) holds the same collectives at
  T and 2T: the gather of the shards' summaries (floats: n x rows x H x (K M + M V + M)), its reduce-scatter, and
  all-reduces of one state (the final state; the initial state's gradient). Nothing of size T moves."""
  results = run_cases("collectives")
  short, long = results["collectives"].values()
  assert short == long
  assert {op for op, _ in short} == {"all-gather", "reduce-scatter", "all-reduce"}

  def floats(shape):
    return sum(math.prod(map(int, dims.split(","))) for dims in re.findall(r"f32\[([\d,]+)\]", shape))

  n, rows, h, dk, dv, m = (results["sizes"][key] for key in ("shards", "rows", "H", "K", "V", "M"))
  gathered = sum(floats(shape) for op, shape in short if op == "all-gather")
  assert gathered == n * rows * h * (dk * m + m * dv + m)
  scattered = sum(floats(shape) for op, shape in short if op == "reduce-scatter")
  assert scattered == rows * h * (dk * m + m * dv + m)  # each device's result: its own summary's gradient
  assert all(floats(shape) == rows * h * (dk * m + m * dv) for op, shape in short if op == "all-reduce")


def _random_inputs(b=2, t=12, h=2, dk=3, dv=4, m=3, seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  k = jax.random.normal(ks[0], (b, t, h, dk))
  v = jax.random.normal(ks[1], (b, t, h, dv))
  s = jax.nn.sigmoid(jax.random.normal(ks[2], (b, t, h, m)))
  g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h, m)))
  q = jax.random.normal(ks[4], (b, t, h, dk))
  return q, k, v, s, g


@pytest.mark.parametrize("segment_ids", [None, [[1] * 4 + [0] * 3 + [2] * 5, [0] * 2 + [3] * 7 + [0] * 3]])
def test_fold_of_shard_summaries_is_the_final_state(segment_ids):
  """Folding 3 shards' summaries on one device gives the op's final state, from an initial state."""
  q, k, v, s, g = _random_inputs()
  seg = None if segment_ids is None else jnp.array(segment_ids, jnp.int32)
  h0 = GSAState(jax.random.normal(jax.random.key(7), (2, 2, 3, 3)), jax.random.normal(jax.random.key(8), (2, 2, 3, 4)))
  _, want = gated_slot_attention(q, k, v, s, g, initial_state=h0, segment_ids=seg, output_final_state=True,
                                 backend="recurrent")
  split = lambda x: None if x is None else jnp.split(x, 3, axis=1)
  parts = [shard_summary(*xs) for xs in zip(*(split(x) for x in (k, v, s, g)), split(seg) or [None] * 3)]
  _, final = fold_states(h0, jax.tree.map(lambda *xs: jnp.stack(xs), *parts))
  for got, exp in zip(final, want):
    np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6)


def test_shard_summary_decay_is_zero_after_a_document_start():
  """A document starting inside a shard cuts everything before it: the shard's gate product is exactly 0."""
  _, k, v, s, g = _random_inputs(b=1, t=4)
  summary = shard_summary(k, v, s, g, jnp.array([[1, 1, 2, 2]], jnp.int32))
  assert np.all(np.asarray(summary.decay) == 0)
  np.testing.assert_array_equal(summary.first_id, [1])
  np.testing.assert_array_equal(summary.last_id, [2])


def test_error_without_the_sequence_axis():
  q, k, v, s, g = _random_inputs()
  with pytest.raises(ValueError, match=r"axis_name='sequence' is not an axis of the mesh \(no mesh is set\)"):
    context_parallel_gsa(q, k, v, s, g)
  mesh = AbstractMesh((1,), ("data",), axis_types=(AxisType.Explicit,))
  with pytest.raises(ValueError, match=r"axis_name='seq' is not an axis of the mesh \(the mesh has axes"):
    context_parallel_gsa(q, k, v, s, g, axis_name="seq", mesh=mesh)


def test_error_when_the_shards_do_not_divide_t():
  q, k, v, s, g = _random_inputs(t=10)
  mesh = AbstractMesh((4,), ("sequence",), axis_types=(AxisType.Explicit,))
  with pytest.raises(ValueError, match=r"T = 10 tokens, which the 4 shards of mesh axis 'sequence' do not divide"):
    context_parallel_gsa(q, k, v, s, g, mesh=mesh)


def test_error_when_the_sequence_axis_also_splits_the_batch():
  q, k, v, s, g = _random_inputs(t=4)
  mesh = AbstractMesh((4,), ("sequence",), axis_types=(AxisType.Explicit,))
  with pytest.raises(ValueError, match=r"'sequence' splits T; it cannot also split the batch"):
    context_parallel_gsa(q, k, v, s, g, mesh=mesh, batch_axes="sequence")


def test_bad_inputs_are_named():
  q, k, v, s, g = _random_inputs()
  with pytest.raises(ValueError, match="v has shape"):
    context_parallel_gsa(q, k, v[..., :1, :], s, g)
  with pytest.raises(TypeError, match="scale must be None or a finite number"):
    context_parallel_gsa(q, k, v, s, g, scale="a")


def test_a_traced_scale_is_differentiable_as_in_the_op():
  """A jax.Array scale (a learned temperature) under jit and grad, as `gated_slot_attention` takes it (a one-device
  sequence axis here; the split itself is checked on 8 devices above)."""
  q, k, v, s, g = _random_inputs()
  mesh = jax.make_mesh((1,), ("sequence",), axis_types=(AxisType.Explicit,))

  def loss(op, scale):
    return jnp.sum(op(q, k, v, s, g, scale=scale, backend="chunked", chunk_size=4)[0] ** 2)

  with jax.set_mesh(mesh):
    got = jax.jit(jax.value_and_grad(lambda sc: loss(context_parallel_gsa, sc)))(jnp.float32(0.5))
  want = jax.jit(jax.value_and_grad(lambda sc: loss(gated_slot_attention, sc)))(jnp.float32(0.5))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert float(want[1]) != 0.0


def test_communication_table(capsys):
  """benchmarks/context_parallel_comm.py: the gathered summary is one state map (independent of T), ring
  attention's traffic grows with T."""
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import context_parallel_comm as comm  # noqa: PLC0415

  h, dk, dv, m = 2, 3, 5, 7
  floats = h * (dk * m + m * dv + m) * 4
  assert comm.summary_bytes(h, dk, dv, m) == (floats + 2 * 4, floats)
  gsa_short, ring_short = comm.step_bytes(1024, 4, 3, (floats + 8, floats), kv_dim=16)
  gsa_long, ring_long = comm.step_bytes(4096, 4, 3, (floats + 8, floats), kv_dim=16)
  assert gsa_short == gsa_long == 3 * 3 * (2 * floats + 8)
  assert ring_long == 4 * ring_short == 3 * 3 * 1024 * 2 * 16 * 8
  comm.main(["--preset", "gsa_340m", "--lengths", "1024,2048", "--shards", "2,4,8"])
  rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1,024") or
          line.startswith("| 2,048")]
  assert len(rows) == 6


def test_memory_per_device_falls_with_the_shards():
  """benchmarks/context_parallel_memory.py on 2 fake CPU devices: each of 2 sequence shards needs little more than
  half the scratch memory of one device holding the whole sequence."""
  result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "context_parallel_memory.py"),
                           "--cpu-devices", "2", "--lengths", "256", "--shards", "1,2"], capture_output=True,
                          text=True, cwd=ROOT, timeout=600, env={**os.environ, "PYTHONPATH": ROOT})
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith("| 256 |")]
  temp = {int(row[2]): float(row[3].replace(",", "")) for row in rows}
  assert set(temp) == {1, 2}
  assert temp[2] < 0.6 * temp[1]


@pytest.mark.slow
def test_train_step_memory_per_device_falls_with_the_shards(tmp_path):
  """benchmarks/train_step_memory.py: train.py's step for the tiny config in bfloat16, compiled on 1 and 2 fake CPU
  devices (its own processes): the scratch memory of each of 2 sequence shards is little more than half of one
  device's, and the JSON rows name both."""
  out = tmp_path / "rows.json"
  result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train_step_memory.py"),
                           "--config=configs/lm_tiny.py", "--config.model.dtype=bfloat16", "--lengths=1024",
                           "--cpu_devices=1,2", f"--json={out}"], capture_output=True, text=True, cwd=ROOT,
                          timeout=900, env={**os.environ, "PYTHONPATH": ROOT})
  assert result.returncode == 0, result.stderr[-3000:]
  rows = {r["n"]: r for r in json.loads(out.read_text())}
  assert set(rows) == {1, 2} and all(r.get("status", "ok") == "ok" for r in rows.values()), rows
  assert rows[2]["temp_gib"] < 0.6 * rows[1]["temp_gib"]
  assert "| 1,024 | 2 | 512 |" in result.stdout


# ---- the layers, the model, prefill and the trainer with T split over "sequence" --------------------------------


def run_script(script, *args):
  result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", script), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=1800,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])})
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.split("RESULTS")[-1])


def check_within(results, names, tol):
  assert set(results) == set(names), results
  bad = {name: err for name, err in results.items() if not (isinstance(err, float) and err <= tol)}
  assert not bad, bad


LAYER_CASES = ["layer/2", "layer/4", "layer/8", "layer/plain/4", "layer/Explicit/4", "layer/shard_map",
               "layer/prefill/4", "layer/prefill_cache/4", "abc/2", "abc/8", "abc/prefill_cache/4"]
# The default suite's grid leaves these to the slow test.
ONLY_IN_FULL = {"layer/4", "layer/prefill/4", "abc/2", "layer/plain/4"}


def test_layer_split_2_and_8_equals_one_device():
  """The GSA layer (grouped heads, short convolution, RoPE) with T split in 2 and 8 over an Auto mesh (4 in the
  slow test below), and inside a caller's shard_map: output and every gradient; prefill's output and cache,
  continuing a cache (from an empty past in the slow test); rows with a document across several shards, one starting exactly at a boundary, padding inside a
  document and a shard holding a single token of its document (the convolution reaches two shards back); the same
  with ABC's slot control (its running normalizer folded across shards), split in 8 (2 in the slow test) and
  prefilled from a cache. An Explicit sequence axis is refused with a ValueError. (Rows without segment ids split in
  4: the slow test.)"""
  results = run_script("context_parallel_layer_cases.py", "short")
  explicit = results.pop("layer/Explicit/4")
  assert "ValueError: mesh axis 'sequence' is Explicit" in explicit, explicit
  check_within(results, set(LAYER_CASES) - {"layer/Explicit/4"} - ONLY_IN_FULL, 1e-5)


@pytest.mark.slow
def test_hybrid_model_and_prefill_split_equal_one_device():
  """A hybrid GSALM (GSA and attention layers) with T split in 2, 4 and 8: logits and every parameter's
  gradient; gsa_jax.generate.prefill over 4 shards: logits and every layer's cache (GSA and KV); and the layer
  cases the default suite leaves out (split in 4, prefill from an empty past, ABC split in 2)."""
  results = run_script("context_parallel_layer_cases.py", "full")
  results.pop("layer/Explicit/4")
  check_within(results, set(LAYER_CASES + ["hybrid/2", "hybrid/4", "hybrid/8", "hybrid/generate_prefill/4"])
               - {"layer/Explicit/4"}, 1e-5)


def test_train_step_with_a_sequence_axis_equals_one_device():
  """The trainer's loss sums and gradients, and one train step (metrics, updated parameters), on a
  data x fsdp x sequence mesh equal one device, on packed rows split across shards, in float32 to 1e-5."""
  check_within(run_script("context_parallel_train_cases.py", "data2_fsdp2_sequence2"), ["data2_fsdp2_sequence2"],
               1e-5)


@pytest.mark.slow
def test_train_step_every_mesh_with_a_sequence_axis():
  """As above on sequence 8; data or fsdp x sequence 4; fsdp x sequence x tensor with loss_chunk and gradient
  accumulation; a hybrid model; and with bfloat16 compute (float32 parameters, the presets' setting) to bfloat16's
  precision: XLA:CPU once aborted compiling that step (the bfloat16 gradient of the gathered convolution tails)."""
  names = ["sequence8", "data2_sequence4", "fsdp2_sequence4", "data2_fsdp2_sequence2",
           "fsdp2_sequence2_tensor2_loss_chunk_accum", "hybrid_data2_sequence4", "bfloat16_data2_sequence4"]
  results = run_script("context_parallel_train_cases.py", *names)
  check_within({"bfloat16_data2_sequence4": results.pop("bfloat16_data2_sequence4")}, ["bfloat16_data2_sequence4"],
               4e-2)
  check_within(results, names[:-1], 1e-5)


def test_mesh_config_errors_name_the_key():
  """config.mesh.sequence must divide train.seq_len; the mesh's product must be the device count."""
  from configs import mqar  # noqa: PLC0415

  from gsa_jax.train.config import ConfigError, check_mesh  # noqa: PLC0415

  c = mqar.get_config()
  c.train.seq_len, c.mesh.data, c.mesh.sequence = 30, 1, 8
  with pytest.raises(ConfigError, match=r"config.train.seq_len: 30 is not divisible by mesh.sequence = 8"):
    check_mesh(c, 8, 1)
  c.mesh.data = -1
  c.train.seq_len = 32
  assert check_mesh(c, 16, 1) == (2, 1, 8, 1)
  c.mesh.data = 1
  with pytest.raises(ConfigError, match=r"data x fsdp x sequence x tensor = 8 but there are 16 devices"):
    check_mesh(c, 16, 1)


def test_layer_error_when_the_sequence_axis_does_not_divide_t():
  from flax import nnx  # noqa: PLC0415

  from gsa_jax.layers import GatedSlotAttention  # noqa: PLC0415

  layer = GatedSlotAttention(8, num_heads=2, num_slots=4, rngs=nnx.Rngs(0))
  mesh = AbstractMesh((4,), ("sequence",), axis_types=(AxisType.Auto,))
  with jax.sharding.use_abstract_mesh(mesh):
    with pytest.raises(ValueError, match=r"T = 6 tokens, which the 4 devices of mesh axis 'sequence' do not divide"):
      jax.eval_shape(layer, jnp.zeros((1, 6, 8)))

