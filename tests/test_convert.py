"""gsa_jax.convert: the reference library's checkpoints (from-fla / to-fla), T2R from a Llama checkpoint
(from-llama), and train.init_from.

Fixtures (tests/data): `tiny_llama/` was written by transformers (make_tiny_llama.py), with the Transformer's
logits; `fla_fixture/NAME/` by the reference library itself on a GPU (make_fla_fixture.py), with its logits in
float32 and bfloat16. Neither torch nor the reference library is needed here.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gsa_jax.convert import ConversionError, read_run_params, read_safetensors_dir, write_run_dir
from gsa_jax.convert import fla as fla_map
from gsa_jax.convert.__main__ import main as convert_main
from gsa_jax.models import GSALM, GSAConfig
from gsa_jax.run_dir import load_model

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
LLAMA = os.path.join(DATA, "tiny_llama")
FLA = os.path.join(DATA, "fla_fixture")
FLA_MODELS = ("mha", "gqa", "conv", "hybrid")


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def convert(*args):
  assert convert_main([str(a) for a in args]) == 0


def random_params(cfg: GSAConfig, seed: int = 0):
  """{path: float32 array} of a randomly initialized model, with non-trivial norm scales."""
  model = GSALM(cfg, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  params = {}
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    a = np.asarray(v[...], np.float32)
    params[path] = (1 + 0.1 * rng.standard_normal(a.shape)).astype(np.float32) if path[-1] == "scale" else a
  return params


# -- the model option the conversion added ---------------------------------------------------------------------------


def test_output_norm_eps_defaults_to_norm_eps_and_is_used():
  cfg = GSAConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, num_slots=4, intermediate_size=32,
                  norm_eps=1e-6)
  assert cfg.output_norm_eps is None
  assert GSALM(cfg, rngs=nnx.Rngs(0)).blocks[0].mixer.g_norm.eps == 1e-6
  assert GSALM(cfg.replace(output_norm_eps=1e-5), rngs=nnx.Rngs(0)).blocks[0].mixer.g_norm.eps == 1e-5
  with pytest.raises(ValueError, match="output_norm_eps"):
    cfg.replace(output_norm_eps=0.0)


# -- to-fla / from-fla on CPU, without the reference ------------------------------------------------------------------

FULL = GSAConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, num_slots=8,
                 expand_k=0.5, feature_map="t2r", use_short_conv=True, intermediate_size=48, attn_layers=(1,),
                 attn_num_heads=4, attn_num_kv_heads=2, output_norm_eps=1e-5, chunk_size=16)


@pytest.mark.parametrize("cfg", [FULL, FULL.replace(tie_embeddings=True, elementwise_affine=False, attn_layers=(),
                                                    attn_num_heads=None, attn_num_kv_heads=None,
                                                    use_short_conv=False, feature_map="swish", num_kv_heads=None)],
                         ids=["gqa-conv-t2r-hybrid", "tied-noaffine"])
def test_to_fla_from_fla_round_trip_is_bit_identical(tmp_path, cfg):
  params = random_params(cfg)
  write_run_dir(tmp_path / "ours", cfg, params, seq_len=64)
  convert("to-fla", tmp_path / "ours", tmp_path / "fla1")
  convert("from-fla", tmp_path / "fla1", tmp_path / "ours2")
  convert("to-fla", tmp_path / "ours2", tmp_path / "fla2")
  t1, t2 = read_safetensors_dir(tmp_path / "fla1"), read_safetensors_dir(tmp_path / "fla2")
  assert sorted(t1) == sorted(t2)
  assert all(t1[k].dtype == np.float32 and np.array_equal(t1[k], t2[k]) for k in t1)
  assert ("lm_head.weight" in t1) == (not cfg.tie_embeddings)
  cfg2, params2, _, _ = read_run_params(str(tmp_path / "ours2"))
  assert cfg2.replace(chunk_size=cfg.chunk_size, embed_init_std=cfg.embed_init_std) == cfg
  assert all(np.array_equal(params[k], params2[k]) for k in params)
  with open(tmp_path / "fla1" / "config.json") as f:
    ref_cfg = json.load(f)
  assert ref_cfg["model_type"] == "gsa" and ref_cfg["num_kv_heads"] == cfg.num_kv_heads
  # The layouts the reference uses: [out, in] projections, [C, 1, W] convolutions.
  if cfg.use_short_conv:
    assert t1["model.layers.0.attn.q_conv1d.weight"].shape == (cfg.key_dim, 1, cfg.conv_size)
    np.testing.assert_array_equal(t1["model.layers.0.attn.q_conv1d.weight"][:, 0, :],
                                  params[("blocks", 0, "mixer", "q_conv", "weight")].T)
  np.testing.assert_array_equal(t1["model.layers.0.attn.f_proj.weight"],
                                params[("blocks", 0, "mixer", "f_proj", "kernel")].T)


def test_to_fla_bfloat16_round_trip(tmp_path):
  cfg = FULL.replace(attn_layers=())
  params = {k: np.asarray(v.astype(jnp.bfloat16).astype(np.float32)) for k, v in random_params(cfg).items()}
  write_run_dir(tmp_path / "ours", cfg, params)
  convert("to-fla", tmp_path / "ours", tmp_path / "fla", "--dtype", "bfloat16")
  tensors = read_safetensors_dir(tmp_path / "fla")
  assert {str(t.dtype) for t in tensors.values()} == {"bfloat16"}
  convert("from-fla", tmp_path / "fla", tmp_path / "ours2")
  convert("to-fla", tmp_path / "ours2", tmp_path / "fla2")  # the source dtype is remembered
  tensors2 = read_safetensors_dir(tmp_path / "fla2")
  assert all(tensors2[k].dtype == tensors[k].dtype and np.array_equal(tensors[k], tensors2[k]) for k in tensors)


def test_to_fla_refuses_what_the_reference_cannot_represent(tmp_path):
  cfg = FULL.replace(attn_layers=(), output_norm_eps=None, forget_gate=False)
  write_run_dir(tmp_path / "ours", cfg, random_params(cfg))
  with pytest.raises(ConversionError, match=r"forget_gate=False.*output_norm_eps=1e-5"):
    from gsa_jax.convert.__main__ import to_fla
    to_fla(str(tmp_path / "ours"), str(tmp_path / "out"))


def _fla_dir(tmp_path, cfg=FULL, **config_changes):
  write_run_dir(tmp_path / "ours", cfg, random_params(cfg))
  convert("to-fla", tmp_path / "ours", tmp_path / "fla")
  if config_changes:
    path = tmp_path / "fla" / "config.json"
    ref = json.loads(path.read_text())
    ref.update(config_changes)
    path.write_text(json.dumps(ref))
  return tmp_path / "fla"


def test_from_fla_lists_missing_and_unexpected_tensors(tmp_path, capsys):
  from safetensors.numpy import save_file
  src = _fla_dir(tmp_path)
  tensors = read_safetensors_dir(src)
  tensors["model.layers.0.attn.extra.weight"] = np.zeros(3, np.float32)
  del tensors["model.layers.2.attn.f_proj.weight"], tensors["model.norm.weight"]
  save_file(tensors, str(src / "model.safetensors"))
  assert convert_main(["from-fla", str(src), str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert "2 missing" in err and "model.layers.2.attn.f_proj.weight" in err and "model.norm.weight" in err
  assert "1 unexpected" in err and "model.layers.0.attn.extra.weight" in err
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("change, message", [
    ({"mystery_option": 3}, r"does not know: \['mystery_option'\].*--ignore-config-keys mystery_option"),
    ({"hidden_act": "powlu"}, "hidden_act='powlu'"),
    ({"attnres_block_size": 2}, "attnres_block_size=2"),
    ({"attn": {"layers": [1], "num_heads": 4, "window_size": 512}}, "window_size=512"),
    ({"attn": {"layers": [1], "num_heads": 4, "qkv_bias": True}}, "qkv_bias"),
    ({"model_type": "gla"}, "model_type='gla'"),
])
def test_from_fla_refuses_unknown_keys_and_unsupported_options(tmp_path, change, message):
  src = _fla_dir(tmp_path, **change)
  with pytest.raises(ConversionError, match=message):
    from gsa_jax.convert.__main__ import from_fla
    from_fla(str(src), str(tmp_path / "out"))


def test_from_fla_reads_sharded_safetensors_with_an_index(tmp_path, capsys):
  """model.safetensors.index.json and its shards give the same run as the single file; an index naming a missing
  shard, or a tensor in two shards, is an error naming it."""
  from safetensors.numpy import save_file
  src = _fla_dir(tmp_path)
  convert("from-fla", src, tmp_path / "single")
  tensors = read_safetensors_dir(src)
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
  sharded = tmp_path / "sharded"
  sharded.mkdir()
  (sharded / "config.json").write_text((src / "config.json").read_text())
  for shard, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, str(sharded / shard))
  index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
  (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
  assert sorted(read_safetensors_dir(sharded)) == names
  convert("from-fla", sharded, tmp_path / "from_shards")
  _, single, _, _ = read_run_params(str(tmp_path / "single"))
  _, from_shards, _, _ = read_run_params(str(tmp_path / "from_shards"))
  assert sorted(single) == sorted(from_shards)
  assert all(np.array_equal(single[k], from_shards[k]) for k in single)

  os.remove(sharded / "model-00002-of-00002.safetensors")
  assert convert_main(["from-fla", str(sharded), str(tmp_path / "out")]) == 2
  assert "model-00002-of-00002.safetensors is named by the index but does not exist" in capsys.readouterr().err
  save_file({k: tensors[k] for k in names[1::2] + names[:1]}, str(sharded / "model-00002-of-00002.safetensors"))
  with pytest.raises(ConversionError, match=rf"tensor '{names[0]}' appears in more than one file"):
    read_safetensors_dir(sharded)


def test_pytorch_bin_checkpoint_gets_a_hint(tmp_path, capsys):
  src = _fla_dir(tmp_path)
  os.remove(src / "model.safetensors")
  (src / "pytorch_model.bin").write_bytes(b"not read")
  assert convert_main(["from-fla", str(src), str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert "has neither model.safetensors nor model.safetensors.index.json" in err
  assert "It holds PyTorch pickles (*.bin): load it once with transformers and save_pretrained(" in err
  os.remove(src / "pytorch_model.bin")
  assert convert_main(["from-fla", str(src), str(tmp_path / "out")]) == 2
  assert "PyTorch pickles" not in capsys.readouterr().err  # no hint without a *.bin file
  assert not os.path.exists(tmp_path / "out")


def test_ignore_config_keys_accepts_the_named_keys(tmp_path, capsys):
  src = _fla_dir(tmp_path, mystery_option=3, another_option="x")
  assert convert_main(["from-fla", str(src), str(tmp_path / "refused")]) == 2
  assert "does not know: ['another_option', 'mystery_option']" in capsys.readouterr().err
  assert convert_main(["from-fla", str(src), str(tmp_path / "partly"), "--ignore-config-keys", "mystery_option"]) == 2
  assert "does not know: ['another_option']" in capsys.readouterr().err
  convert("from-fla", src, tmp_path / "out", "--ignore-config-keys", "mystery_option,another_option")
  cfg, params, _, _ = read_run_params(str(tmp_path / "out"))
  assert cfg.replace(chunk_size=FULL.chunk_size, embed_init_std=FULL.embed_init_std) == FULL


def test_from_fla_shape_mismatch_and_cli_errors(tmp_path, capsys):
  src = _fla_dir(tmp_path, num_slots=16)  # the tensors hold 8 slots
  assert convert_main(["from-fla", str(src), str(tmp_path / "out")]) == 2
  assert "f_proj" in capsys.readouterr().err
  assert convert_main(["from-fla", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
  assert "config.json" in capsys.readouterr().err
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "x").write_text("")
  src_ok = _fla_dir(tmp_path / "ok")
  assert convert_main(["from-fla", str(src_ok), str(tmp_path / "busy")]) == 2
  assert "not empty" in capsys.readouterr().err


def test_from_fla_config_defaults_follow_the_reference():
  # Keys left out of a config.json (save_pretrained writes only those that differ from the defaults) take the
  # reference GSAConfig's defaults; an explicit null num_slots means the head key width.
  cfg = fla_map.config_from_fla({"model_type": "gsa", "hidden_size": 64, "num_hidden_layers": 2})
  assert (cfg.num_heads, cfg.num_slots, cfg.vocab_size, cfg.gate_logit_normalizer) == (4, 64, 32000, 8.0)
  assert cfg.resolved_intermediate_size == 256 and cfg.output_norm_eps == 1e-5 and not cfg.tie_embeddings
  cfg = fla_map.config_from_fla({"model_type": "gsa", "hidden_size": 64, "num_slots": None, "exapnd_k": 0.5})
  assert cfg.num_slots == 8 and cfg.key_dim == 32


# -- the reference's own outputs (fixture made on a GPU by make_fla_fixture.py) ---------------------------------------


@pytest.mark.parametrize("name", FLA_MODELS)
def test_from_fla_logits_equal_the_reference(tmp_path, name):
  src = os.path.join(FLA, name)
  if not os.path.isfile(os.path.join(src, "reference.npz")):
    pytest.skip(f"no reference fixture {src}: make it on a GPU with tests/data/fla_fixture/make_fla_fixture.py "
                "(see its docstring) and extract its tar files there")
  ref = np.load(os.path.join(src, "reference.npz"))
  convert("from-fla", src, tmp_path / "run")
  report = {}
  for dtype, key, tol in (("float32", "fp32", 1e-4), ("bfloat16", "bf16", 3e-2)):
    model, _, _ = load_model(str(tmp_path / "run"), dtype=dtype, backend="chunked")
    for t in (64, 128):
      ours = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ref[f"tokens_{t}"])))
      report[f"{key} T={t}"] = err = rel(ours, ref[f"logits_{key}_{t}"])
      assert err <= tol, (name, dtype, t, err)
  print(f"{name}: relative L2 error of our logits vs the reference's: {report}; meta {ref['meta']}")
  # And back: to-fla rewrites the reference's tensors bit for bit, under the same names.
  convert("to-fla", tmp_path / "run", tmp_path / "back")
  a, b = read_safetensors_dir(src), read_safetensors_dir(tmp_path / "back")
  assert sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


# -- T2R from a Llama checkpoint ---------------------------------------------------------------------------------------


def test_from_llama_copies_every_transformer_weight_bit_equal(tmp_path):
  convert("from-llama", LLAMA, tmp_path / "run", "--num-slots", "8", "--seed", "3")
  cfg, params, run_config, step = read_run_params(str(tmp_path / "run"))
  with open(os.path.join(LLAMA, "config.json")) as f:
    llama = json.load(f)
  assert step == 0 and run_config["data"]["source"] == "text"
  assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.resolved_num_kv_heads, cfg.num_slots) == (
      llama["hidden_size"], llama["num_hidden_layers"], llama["num_attention_heads"], llama["num_key_value_heads"], 8)
  assert cfg.resolved_intermediate_size == llama["intermediate_size"] and cfg.norm_eps == llama["rms_norm_eps"]
  tensors = read_safetensors_dir(LLAMA)
  assert np.array_equal(params[("embed", "embedding")], tensors["model.embed_tokens.weight"])
  assert np.array_equal(params[("lm_head", "kernel")], tensors["lm_head.weight"].T)
  assert np.array_equal(params[("norm", "scale")], tensors["model.norm.weight"])
  for i in range(cfg.num_layers):
    f = f"model.layers.{i}."
    assert np.array_equal(params[("blocks", i, "mixer_norm", "scale")], tensors[f + "input_layernorm.weight"])
    assert np.array_equal(params[("blocks", i, "mlp_norm", "scale")], tensors[f + "post_attention_layernorm.weight"])
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
      assert np.array_equal(params[("blocks", i, "mixer", p, "kernel")], tensors[f + f"self_attn.{p}.weight"].T), p
    for p in ("gate_proj", "up_proj", "down_proj"):
      assert np.array_equal(params[("blocks", i, "mlp", p, "kernel")], tensors[f + f"mlp.{p}.weight"].T), p
    f_proj = params[("blocks", i, "mixer", "f_proj", "kernel")]  # new: fan-in normal
    assert f_proj.shape == (cfg.hidden_size, cfg.resolved_num_kv_heads * 8) and 0.5 < f_proj.std() * 32 ** 0.5 < 1.5
    assert np.array_equal(params[("blocks", i, "mixer", "g_norm", "scale")], np.ones(cfg.value_dim, np.float32))


def test_from_llama_with_every_layer_kept_as_attention_reproduces_the_transformer(tmp_path):
  # A check of the shared mapping (embeddings, norms, MLP, q/k/v/o, RoPE) against transformers' own logits.
  convert("from-llama", LLAMA, tmp_path / "run", "--attn-layers", "0,1")
  model, _, _ = load_model(str(tmp_path / "run"))
  logits = model(jnp.asarray(np.load(os.path.join(LLAMA, "tokens.npy"))))
  assert rel(logits, np.load(os.path.join(LLAMA, "logits.npy"))) < 1e-5


def test_from_llama_refuses_biases_and_unknown_keys(tmp_path):
  from gsa_jax.convert import llama as llama_map
  with open(os.path.join(LLAMA, "config.json")) as f:
    base = json.load(f)
  with pytest.raises(ConversionError, match="attention_bias=True"):
    llama_map.config_from_llama({**base, "attention_bias": True})
  with pytest.raises(ConversionError, match=r"\['q_lora_rank'\]"):
    llama_map.config_from_llama({**base, "q_lora_rank": 8})
  with pytest.raises(ConversionError, match="model_type='gpt2'"):
    llama_map.config_from_llama({**base, "model_type": "gpt2"})
  with pytest.raises(ConversionError, match=r"lacks \['hidden_size'\]"):
    llama_map.config_from_llama({k: v for k, v in base.items() if k != "hidden_size"})
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "config.json").write_text("{not json")
  assert convert_main(["from-llama", str(tmp_path / "bad"), str(tmp_path / "out")]) == 2
  windowed = {**base, "model_type": "mistral", "sliding_window": 4096}
  llama_map.config_from_llama(windowed)  # all-GSA: the window concerned softmax attention only
  with pytest.raises(ConversionError, match="sliding_window=4096 with attention layers kept"):
    llama_map.config_from_llama(windowed, attn_layers=(0,))
  assert llama_map.config_from_llama({**base, "rope_scaling": {"rope_type": "default"}}, attn_layers=(0,))


def test_t2r_finetuning_steps_reduce_the_loss(tmp_path):
  from configs import base
  from gsa_jax.train.optimizer import learning_rate_schedule, make_optimizer
  from gsa_jax.train.trainer import make_train_step

  convert("from-llama", LLAMA, tmp_path / "run", "--num-slots", "8")
  model, _, _ = load_model(str(tmp_path / "run"), backend="chunked")
  graphdef, params = nnx.split(model, nnx.Param)
  c = base.get_config()
  c.optim.learning_rate, c.optim.warmup_steps = 3e-3, 0
  tx, schedule = make_optimizer(c.optim, 8), learning_rate_schedule(c.optim, 8)
  step = jax.jit(make_train_step(graphdef, tx, schedule, 1))
  zero = jnp.zeros((), jnp.int32)
  state = {"params": params, "opt_state": tx.init(params), "step": zero, "nonfinite_in_a_row": zero,
           "nonfinite_total": zero}
  tokens = (np.arange(4 * 33).reshape(4, 33) * 7 % 100 + 3).astype(np.int32)  # a learnable periodic sequence
  batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((4, 32), np.int32),
           "loss_mask": np.ones((4, 32), np.float32)}
  losses = []
  for _ in range(6):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert all(np.isfinite(losses)) and losses[-1] < 0.95 * losses[0] and np.all(np.diff(losses) < 0), losses


# -- train.init_from ----------------------------------------------------------------------------------------------------


def test_train_init_from_starts_from_the_converted_parameters(tmp_path, caplog):
  from gsa_jax.train import ConfigError, train_and_evaluate, validate_config
  from gsa_jax.train.config import model_config
  from tests.test_train import tiny_config

  config = tiny_config(tmp_path / "run", train__steps=1, train__eval_every=0)
  config.optim.learning_rate = 1e-7
  cfg = model_config(config)
  params = random_params(cfg, seed=5)
  params[("norm", "scale")] = np.full(cfg.hidden_size, 3.0, np.float32)  # unmistakable
  write_run_dir(tmp_path / "init", cfg, params)

  config.train.init_from = str(tmp_path / "nowhere")
  with pytest.raises(ConfigError, match="train.init_from.*no config.json"):
    validate_config(config)
  other = cfg.replace(num_slots=cfg.num_slots * 2)
  write_run_dir(tmp_path / "other", other, random_params(other))
  config.train.init_from = str(tmp_path / "other")
  with pytest.raises(ConfigError, match=r"train.init_from.*do not fit.*f_proj"):
    validate_config(config)

  shifted = cfg.replace(gate_logit_normalizer=cfg.gate_logit_normalizer * 2)  # same shapes, another function
  write_run_dir(tmp_path / "shifted", shifted, random_params(shifted))
  config.train.init_from = str(tmp_path / "shifted")
  with caplog.at_level(logging.WARNING):
    validate_config(config)
  assert any("gate_logit_normalizer" in r.getMessage() for r in caplog.records)

  config.train.init_from = str(tmp_path / "init")
  train_and_evaluate(config)
  model, _, step = load_model(str(tmp_path / "run"))
  assert step == 1
  np.testing.assert_allclose(np.asarray(model.norm.scale[...]), 3.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(model.blocks[0].mixer.q_proj.kernel[...]),
                             params[("blocks", 0, "mixer", "q_proj", "kernel")], atol=1e-5)

  # A resumed run neither needs init_from any more nor applies it again.
  import shutil  # noqa: PLC0415
  shutil.rmtree(tmp_path / "init")
  config.train.steps = 2
  train_and_evaluate(config)
  model, _, step = load_model(str(tmp_path / "run"))
  assert step == 2
  np.testing.assert_allclose(np.asarray(model.norm.scale[...]), 3.0, atol=1e-5)


MISTRAL_7B_CONFIG = {  # Mistral-7B-v0.1's config.json
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000}


def test_t2r_preset_is_the_model_from_llama_writes_for_mistral_7b(tmp_path):
  from configs import t2r_mistral
  from gsa_jax.convert import llama as llama_map
  from gsa_jax.train import ConfigError, validate_config
  from gsa_jax.train.config import model_config

  c = t2r_mistral.get_config()
  preset = model_config(c)
  converted = llama_map.config_from_llama(MISTRAL_7B_CONFIG)
  same = dict(dtype=preset.dtype, param_dtype=preset.param_dtype, remat=preset.remat)
  assert converted.replace(**same) == preset
  # Mistral-7B's 7,241,732,096 parameters plus, per layer, the slot gate (4096 x 8 kv heads x 64) and the GSA
  # output norm's scale (4096).
  assert preset.num_params() == 7_241_732_096 + 32 * (4096 * 512 + 4096)
  c.data.path = str(tmp_path)
  c.train.init_from = str(tmp_path / "not_converted_yet")
  with pytest.raises(ConfigError, match="train.init_from"):
    validate_config(c, check_data=False)


def test_eval_harness_reads_a_converted_checkpoint(tmp_path):
  from gsa_jax.eval.api import evaluate

  cfg = FULL.replace(vocab_size=259)  # the byte tokenizer's vocabulary
  write_run_dir(tmp_path / "ours", cfg, random_params(cfg))
  convert("to-fla", tmp_path / "ours", tmp_path / "fla")
  convert("from-fla", tmp_path / "fla", tmp_path / "run", "--tokenizer", "byte", "--seq-len", "64")
  out = evaluate(str(tmp_path / "run"), "perplexity", os.path.join(DATA, "ppl_docs.txt"), max_examples=2,
                 batch_size=2, progress=False)
  assert out["step"] == 0 and out["max_length"] == 64 and np.isfinite(out["metrics"]["perplexity"])


def test_runs_saved_before_the_new_keys_still_resume():
  # A run saved before output_norm_eps and train.init_from existed: its config.json lacks them.
  from configs import base
  from gsa_jax.train.config import differing_keys, to_json

  # Absent (or None) output_norm_eps meant norm_eps: it is compared as that value.
  c = base.get_config()
  saved = json.loads(to_json(c))
  del saved["model"]["output_norm_eps"], saved["train"]["init_from"]
  assert differing_keys(saved, c) == ["model.output_norm_eps"]  # now 1e-5 (base.py), then norm_eps = 1e-6
  c.model.output_norm_eps = c.model.norm_eps  # what resumes such a run
  assert differing_keys(saved, c) == []


def test_source_tokenizer_is_copied_after_the_run_is_written(tmp_path):
  """Real checkpoints ship a tokenizer: it is copied into the new run (which must not exist beforehand)."""
  import shutil  # noqa: PLC0415
  src = tmp_path / "llama"
  shutil.copytree(LLAMA, src)
  (src / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
  convert("from-llama", src, tmp_path / "run", "--num-slots", "8")
  with open(tmp_path / "run" / "config.json") as f:
    data = json.load(f)["data"]
  assert data["tokenizer"] == str(tmp_path / "run" / "tokenizer.json")
  assert (tmp_path / "run" / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()
  with open(src / "config.json") as f:
    assert data["bos_id"] == json.load(f)["bos_token_id"]
  assert convert_main(["from-llama", str(src), str(tmp_path / "run")]) == 2  # not over an existing run
