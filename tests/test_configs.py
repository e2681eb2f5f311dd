"""Every config file loads and validates (model, data, mesh), with the model sizes their names and the README give."""

from __future__ import annotations

import dataclasses
import importlib
import math
import os

import pytest
from flax import nnx

from gsa_jax import run_dir
from gsa_jax.models import GSALM, PRESETS, count_params
from gsa_jax.train.config import check_mesh, validate_config
from tests.test_convert import MISTRAL_7B_CONFIG
from tests.test_train import ROOT

CONFIG_FILES = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
                      if f.endswith(".py") and f not in ("__init__.py", "base.py", "paper.py"))

# Parameter counts, from the names the README and the configs give: the paper's 340M / 1.3B / 2.7B models
# (its "1.3B" model has 1.38B parameters: `docs/benchmarks.md`), Mistral-7B (7.24B) with each attention turned into
# GSA, and the CPU presets' sizes (tens of thousands / about a million).
SIZES = {"gsa_340m": (340e6, 0.03), "hybrid_340m": (340e6, 0.03), "gsa_1p3b": (1.38e9, 0.01),
         "gsa_2p7b": (2.7e9, 0.02), "t2r_mistral": (7.24e9, 0.01),
         "attention_1p3b": (1.364e9, 0.01),  # the all-attention baseline of gsa_1p3b (docs/benchmarks.md)
         "code_lm": (112.5e6, 0.01)}  # its GSA layout (configs/code_lm.py)


def _text_file(tmp_path):
  path = tmp_path / "corpus.jsonl"
  path.write_text("".join('{"text": "document %d of the corpus"}\n' % i for i in range(50)))
  return str(path)


def test_every_config_file_is_listed():
  assert CONFIG_FILES == ["attention_1p3b", "code_lm", "gsa_1p3b", "gsa_2p7b", "gsa_340m", "hybrid_340m", "lm_tiny", "mqar",
                          "t2r_mistral"]


def _converted_mistral_run(tmp_path):
  """A run directory as from-llama writes it for Mistral-7B (config.json and a checkpoint step; no weights: only
  the config and the step are read when a config is validated)."""
  from gsa_jax.convert.io import config_to_json  # noqa: PLC0415
  from gsa_jax.convert.llama import config_from_llama  # noqa: PLC0415

  run = str(tmp_path / "mistral_gsa_init")
  run_dir.write_config(run, {"model": config_to_json(config_from_llama(MISTRAL_7B_CONFIG))})
  os.makedirs(os.path.join(run_dir.checkpoints_dir(run), "0"))  # a step without its 7B of weights
  return run


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_file_loads_and_validates(name, tmp_path, monkeypatch, caplog):
  monkeypatch.chdir(ROOT)  # lm_tiny reads docs/*.md relative to the repository
  config = importlib.import_module(f"configs.{name}").get_config()
  if config.data.source == "text" and not config.data.path:  # the presets that need a corpus: give one
    config.data.path = _text_file(tmp_path)
    config.data.tokenizer = "byte"
  if config.train.init_from:  # t2r_mistral: its model must be what from-llama makes of Mistral-7B, function too
    config.train.init_from = _converted_mistral_run(tmp_path)
  model_cfg = validate_config(config)
  assert math.prod(check_mesh(config, 8, 1)) == 8  # any of them on 8 devices
  n = count_params(nnx.eval_shape(lambda: GSALM(model_cfg, rngs=nnx.Rngs(0))))  # shapes only
  assert n == model_cfg.num_params()
  if name in SIZES:
    target, tol = SIZES[name]
    assert abs(n - target) / target < tol, (name, n)
  else:  # the CPU presets stay small
    assert n < 2e6, (name, n)
  assert not [r for r in caplog.records if r.levelname == "WARNING"]  # e.g. init_from computing differently


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_paper_recipe_on_each_preset(preset, tmp_path):
  """configs/paper.py: the paper's model shape and recipe on every preset (the gsa_* files are thin wrappers)."""
  from configs.paper import paper_config  # noqa: PLC0415

  config = paper_config(preset, batch_size=16, steps=100, warmup_steps=10)
  config.data.path = _text_file(tmp_path)
  config.data.tokenizer = "byte"
  model_cfg = validate_config(config)
  want = PRESETS[preset](dtype="bfloat16", param_dtype="float32", remat="matmuls_gsa_keys")
  assert dataclasses.asdict(model_cfg) == dataclasses.asdict(want)
  o = config.optim
  assert (o.learning_rate, o.b1, o.b2, o.weight_decay, o.clip_norm, o.warmup_steps) == (3e-4, 0.9, 0.95, 0.01, 1.0, 10)
  assert config.train.seq_len == 2048
