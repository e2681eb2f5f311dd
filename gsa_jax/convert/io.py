"""Files of the conversions: Hugging Face safetensors checkpoints (numpy, no torch) and our run directories.

A run directory written here (the format is `gsa_jax.run_dir`'s) is what `gsa_jax.run_dir.load_model`,
`python -m gsa_jax.eval` and `train.init_from` read: `config.json` (the model config, the tokenizer and the sequence
length) and a checkpoint of step 0 holding `{"params": ...}` only (no optimizer state: it is not a run to resume).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import ml_dtypes
import numpy as np

BFLOAT16 = ml_dtypes.bfloat16  # importing ml_dtypes registers bfloat16 with numpy: safetensors then reads BF16


class ConversionError(ValueError):
  """A checkpoint or config that cannot be converted; the message names what is wrong."""


# -- safetensors ---------------------------------------------------------------------------------------------------


def read_hf_config(checkpoint_dir: str) -> dict[str, Any]:
  path = os.path.join(checkpoint_dir, "config.json")
  if not os.path.isfile(path):
    raise ConversionError(f"{path} does not exist: {checkpoint_dir!r} is not a Hugging Face-format checkpoint "
                          "directory (config.json + *.safetensors).")
  with open(path) as f:
    try:
      cfg = json.load(f)
    except json.JSONDecodeError as e:
      raise ConversionError(f"{path} is not valid JSON ({e}).") from e
  if not isinstance(cfg, dict):
    raise ConversionError(f"{path} holds a {type(cfg).__name__}, not a JSON object of config keys.")
  return cfg


def read_safetensors_dir(checkpoint_dir: str) -> dict[str, np.ndarray]:
  """Every tensor of a checkpoint directory: model.safetensors, or the shards named by model.safetensors.index.json."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel

  index = os.path.join(checkpoint_dir, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.isfile(os.path.join(checkpoint_dir, "model.safetensors")):
    files = ["model.safetensors"]
  else:
    present = sorted(os.listdir(checkpoint_dir)) if os.path.isdir(checkpoint_dir) else []
    hint = (" It holds PyTorch pickles (*.bin): load it once with transformers and save_pretrained(..., "
            "safe_serialization=True) to get safetensors." if any(p.endswith(".bin") for p in present) else "")
    raise ConversionError(f"{checkpoint_dir!r} has neither model.safetensors nor model.safetensors.index.json "
                          f"(files: {present[:20]}).{hint}")
  tensors: dict[str, np.ndarray] = {}
  for name in files:
    path = os.path.join(checkpoint_dir, name)
    if not os.path.isfile(path):
      raise ConversionError(f"{path} is named by the index but does not exist.")
    try:
      with safe_open(path, framework="np") as f:
        for key in f.keys():
          if key in tensors:
            raise ConversionError(f"tensor {key!r} appears in more than one file of {checkpoint_dir!r}.")
          tensors[key] = f.get_tensor(key)
    except ConversionError:
      raise
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types for damaged files)
      raise ConversionError(f"{path} could not be read as safetensors: {e}") from e
  return tensors


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata={"format": "pt"})


# -- our run directories -------------------------------------------------------------------------------------------


def config_to_json(model_cfg) -> dict[str, Any]:
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(model_cfg).items()}


def write_run_dir(out_dir: str, model_cfg, params: dict[tuple, np.ndarray], *, tokenizer: str = "",
                  bos_id: int = -1, eos_id: int = -1, seq_len: int = 2048, source: dict | None = None) -> None:
  """Writes `out_dir` (which must not exist or be empty) as a run directory holding `params` at step 0.

  params: {('blocks', 0, 'mixer', 'q_proj', 'kernel'): array, ...}, exactly the model's parameters (checked).
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from gsa_jax import run_dir  # pylint: disable=import-outside-toplevel
  from gsa_jax.data import data_config_defaults  # pylint: disable=import-outside-toplevel
  from gsa_jax.models import GSALM  # pylint: disable=import-outside-toplevel

  require_new_dir(out_dir)
  abstract = nnx.state(nnx.eval_shape(lambda: GSALM(model_cfg, rngs=nnx.Rngs(0))), nnx.Param)
  expected = {path: v for path, v in nnx.to_flat_state(abstract)}
  check_same_keys(set(params), set(expected), what="parameters of the converted model",
                  ours_name="produced by the mapping", theirs_name="of the model")
  bad = [f"{'.'.join(map(str, p))}: {params[p].shape} vs {tuple(v.shape)}" for p, v in expected.items()
         if tuple(params[p].shape) != tuple(v.shape)]
  if bad:
    raise ConversionError(f"{len(bad)} parameter shapes do not fit the model config: " + "; ".join(bad))
  param_dtype = np.dtype(model_cfg.param_dtype)
  state = jax.tree_util.tree_map_with_path(
      lambda path, _: np.asarray(params[_path_key(path)], dtype=param_dtype), abstract)

  data = data_config_defaults()
  data.source = "text"
  data.tokenizer = tokenizer
  data.bos_id, data.eos_id = bos_id, eos_id
  config = {"model": config_to_json(model_cfg), "data": data.to_dict(), "train": {"seq_len": seq_len},
            "converted_from": source or {}}
  run_dir.write_config(out_dir, config)
  run_dir.save_params(out_dir, state)


def _path_key(path) -> tuple:
  """A jax key path of an nnx.State leaf -> ('blocks', 0, 'mixer', 'q_proj', 'kernel')."""
  out = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      out.append(k.key)
    elif isinstance(k, jax.tree_util.SequenceKey):
      out.append(k.idx)
    # GetAttrKey('value') of the Variable: not part of the parameter's name.
  return tuple(out)


def read_run_params(run_dir: str, step: int | None = None):
  """(GSAConfig, {path tuple: float32 numpy array}, config dict, step) of a run directory's checkpoint."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from gsa_jax import run_dir as run_dir_lib  # pylint: disable=import-outside-toplevel

  if not os.path.isfile(run_dir_lib.config_path(run_dir)):
    raise ConversionError(f"{run_dir!r} is not a run directory (no config.json): give the output directory of "
                          "train.py or of `python -m gsa_jax.convert from-*`.")
  model, config, step = run_dir_lib.load_model(run_dir, step)
  params = {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  return model.config, params, config.to_dict(), step


def check_known_keys(cfg: dict, known: set, ignore_keys: tuple[str, ...], why: str) -> None:
  """Every config.json key must be mapped, known to have no effect, or explicitly ignored (--ignore-config-keys)."""
  unknown = sorted(set(cfg) - known - set(ignore_keys))
  if unknown:
    raise ConversionError(f"config.json has keys this converter does not know: {unknown}. If {why}, pass "
                          "--ignore-config-keys " + ",".join(unknown) + ".")


def require_new_dir(path: str) -> None:
  """An output directory must not exist yet, or be empty (nothing of another run is overwritten)."""
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise ConversionError(f"output directory {path!r} exists and is not empty; give a new one.")
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ConversionError(f"output directory {path!r} lies under {parent!r}, which is a file; give a new directory.")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ConversionError(f"output directory {path!r}: cannot write in {parent!r} (permission denied).")


def find_tokenizer(src_dir: str) -> str:
  """The tokenizer.json (else tokenizer.model) of a Hugging Face checkpoint directory, or "" if it has none."""
  for name in ("tokenizer.json", "tokenizer.model"):
    path = os.path.join(src_dir, name)
    if os.path.isfile(path):
      return path
  return ""


def copy_into(path: str, out_dir: str) -> str:
  """Copies a file into out_dir; the absolute path of the copy."""
  target = os.path.abspath(os.path.join(out_dir, os.path.basename(path)))
  shutil.copyfile(path, target)
  return target


def check_same_keys(got: set, expected: set, *, what: str, ours_name: str = "in the checkpoint",
                    theirs_name: str = "expected") -> None:
  """Raises ConversionError listing the keys that are missing and those that are unexpected."""
  fmt = lambda keys: ", ".join(sorted(".".join(map(str, k)) if isinstance(k, tuple) else str(k) for k in keys))
  missing, unexpected = expected - got, got - expected
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"{len(missing)} missing (expected but not {ours_name}): {fmt(missing)}")
    if unexpected:
      parts.append(f"{len(unexpected)} unexpected ({ours_name} but not {theirs_name}): {fmt(unexpected)}")
    raise ConversionError(f"the {what} do not match: " + "; ".join(parts))
