"""Validation of a training config, before any device work, with errors that name the key and the fix."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import ml_collections

from gsa_jax import run_dir as run_dir_lib
from gsa_jax.data import dataset_vocab_size, validate_data_config
from gsa_jax.models import GSAConfig


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


# Keys that may differ when a run is resumed: they change neither shapes nor the meaning of the saved state.
RESUMABLE_PREFIXES = (
    "workdir", "overwrite", "train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
    "train.nonfinite", "train.max_nonfinite_in_a_row", "train.tensorboard", "train.compilation_cache",
    "train.loss_chunk", "checkpoint.", "mesh.", "model.backend", "model.remat", "model.chunk_size",
    "model.scan_layers", "model.kernel_block_sizes",
    "train.init_from",  # read only when a run starts from step 0
    "data.decode_errors",  # the same documents for UTF-8 text (runs older than the key read with "replace")
    # Memory and speed only: the same global batches, the same function (accumulation sums the same rows).
    "train.grad_accum_steps", "data.read_threads", "data.prefetch_buffer_size", "model.attn_implementation",
)


def model_config(config: ml_collections.ConfigDict) -> GSAConfig:
  """The GSAConfig of `config.model`; its validation errors are re-raised naming `config.model.<field>`."""
  try:
    return run_dir_lib.model_config(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _require(cond: bool, key: str, message: str) -> None:
  if not cond:
    raise ConfigError(f"config.{key}: {message}")


def validate_config(config: ml_collections.ConfigDict, *, check_data: bool = True) -> GSAConfig:
  """Checks every value that can be checked without devices; returns the model config.

  The mesh against the device count is checked by `check_mesh`, once the device count is known. check_data=False
  skips the data section (for benchmarks that feed synthetic tokens).
  """
  t, o, c = config.train, config.optim, config.checkpoint
  for key in ("steps", "batch_size", "seq_len", "grad_accum_steps", "log_every", "eval_batches",
              "max_nonfinite_in_a_row"):
    _require(t[key] > 0, f"train.{key}", f"must be positive; got {t[key]}.")
  _require(t.seed >= 0, "train.seed", f"must be an int >= 0; got {t.seed}.")
  _require(t.loss_chunk >= 0, "train.loss_chunk", f"must be >= 0 (0: all positions at once); got {t.loss_chunk}.")
  _require(t.eval_every >= 0, "train.eval_every", f"must be >= 0 (0: evaluate at the end only); got {t.eval_every}.")
  _require(t.nonfinite in ("abort", "skip"), "train.nonfinite", f"must be 'abort' or 'skip'; got {t.nonfinite!r}.")
  _require(t.batch_size % t.grad_accum_steps == 0, "train.batch_size",
           f"{t.batch_size} is not divisible by train.grad_accum_steps={t.grad_accum_steps}.")
  _require(o.learning_rate > 0, "optim.learning_rate", f"must be positive; got {o.learning_rate}.")
  _require(0 <= o.warmup_steps, "optim.warmup_steps", f"must be >= 0; got {o.warmup_steps}.")
  _require(0 <= o.final_lr_ratio <= 1, "optim.final_lr_ratio", f"must be in [0, 1]; got {o.final_lr_ratio}.")
  for key in ("b1", "b2"):
    _require(0 <= o[key] < 1, f"optim.{key}", f"must be in [0, 1); got {o[key]}.")
  _require(o.eps > 0, "optim.eps", f"must be positive; got {o.eps}.")
  _require(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0; got {o.weight_decay}.")
  _require(o.clip_norm >= 0, "optim.clip_norm", f"must be >= 0 (0: no clipping); got {o.clip_norm}.")
  _require(c.every_steps > 0, "checkpoint.every_steps", f"must be positive; got {c.every_steps}.")
  _require(c.every_minutes >= 0, "checkpoint.every_minutes", f"must be >= 0 (0: off); got {c.every_minutes}.")
  _require(c.keep > 0, "checkpoint.keep", f"must be positive; got {c.keep}.")
  _require(bool(config.workdir), "workdir", "must name a directory.")

  model = model_config(config)
  if t.init_from and _starts_from_step_0(config):
    check_init_from(t.init_from, model)  # a resumed run never reads it (its source may be gone)
  if not check_data:
    return model
  try:
    validate_data_config(config.data, seq_len=t.seq_len, read_all=True)
  except ValueError as e:
    message = str(e)
    raise ConfigError(message if message.startswith("config.") else f"config.{message}") from None
  vocab = dataset_vocab_size(config.data)
  _require(model.vocab_size >= vocab, "model.vocab_size",
           f"{model.vocab_size} is smaller than the data's vocabulary ({vocab} ids); set it to at least {vocab}.")
  return model


def param_shapes(model: GSAConfig) -> dict[str, tuple[int, ...]]:
  """{'blocks.0.mixer.q_proj.kernel': shape, ...} of a model config, computed without allocating anything."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from gsa_jax.models import GSALM  # pylint: disable=import-outside-toplevel

  state = nnx.state(nnx.eval_shape(lambda: GSALM(model, rngs=nnx.Rngs(0))), nnx.Param)
  return {".".join(str(k) for k in path): tuple(v.shape) for path, v in nnx.to_flat_state(state)}


# GSAConfig fields that change what the parameters compute without changing their shapes (what init_from warns of);
# execution settings (backend, remat, chunk_size, dtypes) and initializer scales are left out.
_FUNCTION_FIELDS = ("feature_map", "gate_logit_normalizer", "norm_eps", "output_norm_eps", "forget_gate", "slot_control",
                    "use_rope", "rope_theta")


def overwrite_deletes_the_saved_run(config: ml_collections.ConfigDict) -> bool:
  """Whether config.overwrite will delete the run saved in config.workdir: only one of a different config (or one
  whose config.json cannot be read); a run of the same config resumes, overwrite or not."""
  if not config.overwrite or not os.path.exists(run_dir_lib.config_path(config.workdir)):
    return False
  try:
    return bool(differing_keys(run_dir_lib.read_config(config.workdir).to_dict(), config))
  except (OSError, ValueError):
    return True


def _starts_from_step_0(config: ml_collections.ConfigDict) -> bool:
  """Whether the run will start from step 0: its workdir has no checkpoint, or overwrite will delete the run there
  (which must not happen before a missing init_from is found)."""
  return not run_dir_lib.checkpoint_steps(config.workdir) or overwrite_deletes_the_saved_run(config)


def check_init_from(run_dir: str, model: GSAConfig) -> None:
  """train.init_from must be a run directory (of train.py or gsa_jax.convert) whose parameters fit `model`."""
  key = "train.init_from"
  _require(os.path.isfile(run_dir_lib.config_path(run_dir)), key,
           f"{run_dir!r} is not a run directory (no config.json); give the output directory of train.py or of "
           "`python -m gsa_jax.convert`.")
  _require(bool(run_dir_lib.checkpoint_steps(run_dir)), key, f"{run_dir!r} has no checkpoint under checkpoints/.")
  try:
    source = model_config(run_dir_lib.read_config(run_dir))
  except ConfigError as e:
    raise ConfigError(f"config.{key}: the model config of {run_dir!r} is not valid: {e}") from None
  mine, theirs = param_shapes(model), param_shapes(source)
  bad = [f"{k}: {theirs.get(k, 'absent')} there, {mine.get(k, 'absent')} here"
         for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
  _require(not bad, key, f"the parameters of {run_dir!r} do not fit config.model ({len(bad)} differ: "
           + "; ".join(bad[:8]) + ("; ..." if len(bad) > 8 else "") + "). Set config.model to that run's model "
           "(its config.json), changing only fields that keep the shapes.")
  # Same shapes, maybe another function (feature map, gate normalizer, norm eps...): allowed, but said.
  changed = [f"{f}: {getattr(source, f)!r} there, {getattr(model, f)!r} here" for f in _FUNCTION_FIELDS
             if getattr(source, f) != getattr(model, f)]
  if changed:
    logging.getLogger(__name__).warning("train.init_from %r: the model computes differently from the one its "
                                        "parameters were trained in: %s", run_dir, "; ".join(changed))


def check_mesh(config: ml_collections.ConfigDict, device_count: int, process_count: int) -> tuple[int, ...]:
  """Resolves the mesh for `device_count` devices (shape in gsa_jax.train.sharding.AXES order) and checks that the
  batch's rows split over data x fsdp and its sequence length over the sequence axis."""
  from gsa_jax.train.sharding import AXES, resolve_mesh_shape

  try:
    shape = resolve_mesh_shape(config.mesh.to_dict(), device_count)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  sizes = dict(zip(AXES, shape))
  t = config.train
  micro = t.batch_size // t.grad_accum_steps
  batch_shards = sizes["data"] * sizes["fsdp"]
  _require(micro % batch_shards == 0, "train.batch_size",
           f"the micro-batch ({t.batch_size} / grad_accum_steps {t.grad_accum_steps} = {micro}) is not divisible "
           f"by mesh.data x mesh.fsdp = {batch_shards}; use a multiple of {batch_shards * t.grad_accum_steps}.")
  _require(t.seq_len % sizes["sequence"] == 0, "train.seq_len",
           f"{t.seq_len} is not divisible by mesh.sequence = {sizes['sequence']} (each device holds seq_len / "
           f"mesh.sequence tokens of every row); use a multiple of {sizes['sequence']}.")
  _require(t.batch_size % process_count == 0, "train.batch_size",
           f"{t.batch_size} is not divisible by the {process_count} processes.")
  return shape


def flatten(config: ml_collections.ConfigDict | dict, prefix: str = "") -> dict[str, Any]:
  """{'train.steps': 1000, ...}: JSON values of every leaf key."""
  items = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
  out = {}
  for key, value in items.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return out


to_json = run_dir_lib.config_json  # the text of config.json: what a saved config is compared as


def _effective(flat: dict[str, Any]) -> dict[str, Any]:
  """A flattened config with implicit values spelled out: output_norm_eps None (or absent, in runs older than the
  key) is norm_eps; data.format "auto" is the format data.path's extension implies (presets used to pin it)."""
  from gsa_jax.data.sources import format_from_name  # pylint: disable=import-outside-toplevel

  out = dict(flat)
  if out.get("model.output_norm_eps") is None and "model.norm_eps" in out:
    out["model.output_norm_eps"] = out["model.norm_eps"]
  if out.get("data.format") == "auto" and out.get("data.path"):
    out["data.format"] = format_from_name(out["data.path"]) or "auto"
  return out


def differing_keys(saved: dict, current: ml_collections.ConfigDict) -> list[str]:
  """Keys whose values differ between a saved run's config and this one, ignoring the resumable ones."""
  a, b = _effective(flatten(saved)), _effective(flatten(json.loads(to_json(current))))
  keys = sorted(set(a) | set(b))
  # A key the saved run does not have and that is None now is an optional field added since, whose default keeps
  # the old behaviour: not a difference.
  return [k for k in keys if a.get(k, "<absent>") != b.get(k, "<absent>") and not k.startswith(RESUMABLE_PREFIXES)
          and not (k not in a and b[k] is None)]


def describe_differences(saved: dict, current: ml_collections.ConfigDict, keys: list[str]) -> str:
  a, b = _effective(flatten(saved)), _effective(flatten(json.loads(to_json(current))))
  return "; ".join(f"{k}: saved {a.get(k, '<absent>')!r}, now {b.get(k, '<absent>')!r}" for k in keys)


def model_flops_per_token(model: GSAConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward = 3 x forward) for MFU: 6 x matmul parameters plus the
  token-mixing work of GSA (spec section 2 cost model, chunk 64) and of softmax-attention layers."""
  d = model.hidden_size
  matmul_params = model.num_params() - model.vocab_size * d * (1 if model.tie_embeddings else 2) + model.vocab_size * d
  dk, dv, m = model.key_dim // model.num_heads, model.value_dim // model.num_heads, model.num_slots
  c = min(model.chunk_size, seq_len)
  gsa_fwd = model.num_heads * (2 * c * (dk + m) + 4 * dk * m + 2 * c * (m + dv) + 4 * m * dv)
  attn_fwd = 2 * 2 * seq_len / 2 * d  # causal QK^T and PV, averaged over positions
  n_attn = len(model.attn_layers)
  mixing = (model.num_layers - n_attn) * gsa_fwd + n_attn * attn_fwd
  return 6.0 * matmul_params + 3.0 * mixing
