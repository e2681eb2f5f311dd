"""The base training config: every key, its type and its meaning. Presets start from `get_config()` here.

    python train.py --config=configs/NAME.py --config.train.steps=1000 --config.model.num_slots=32

Keys are locked: an override of a key that does not exist fails before any work, with a "did you mean" hint.
Types are enforced by ml_collections (an int key rejects "2.5"). Values are validated by
`gsa_jax.train.config.validate_config` before JAX touches a device.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from gsa_jax.data import data_config_defaults
from gsa_jax.models import GSAConfig


def model_config_defaults(**overrides) -> ml_collections.ConfigDict:
  """One key per `gsa_jax.models.GSAConfig` field (see its docstring for their meaning), with its default."""
  model = ml_collections.ConfigDict()
  for field in dataclasses.fields(GSAConfig):
    value = overrides.pop(field.name, getattr(GSAConfig(), field.name))
    if value is None:  # optional fields: None means "derive it" (see GSAConfig)
      value = config_dict.placeholder(float if "float" in str(field.type) else int)
    model[field.name] = value
  if overrides:
    raise KeyError(f"not GSAConfig fields: {sorted(overrides)}")
  return model


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # Where the run lives: checkpoints, config.json, metrics.jsonl, plots. Restarting the same command in the same
  # directory resumes from the latest complete checkpoint.
  c.workdir = "runs/default"
  # Start over in a workdir that holds a run with a different config (its checkpoints are deleted). Without it,
  # such a start is refused and the message names the differing keys. A run of the same config always resumes,
  # overwrite or not (a requeued job that reruns its command must not delete itself).
  c.overwrite = False

  # model.attn_implementation: how attention layers attend ("auto" picks the platform's fused kernel; "xla" is the
  # explicit-mask reference): see GSAConfig.
  # output_norm_eps 1e-5: the eps the reference library's GSA output norm uses, so that every run exports to it
  # (`python -m gsa_jax.convert to-fla`); GSAConfig's own default (None: norm_eps) is kept for the library.
  c.model = model_config_defaults(output_norm_eps=1e-5)
  c.data = data_config_defaults()

  c.train = ml_collections.ConfigDict()
  c.train.seed = 0  # model initialization and data order
  # Start a new run from the parameters of another run directory: one of train.py, or one written by
  # `python -m gsa_jax.convert` (a reference-library checkpoint, or a Transformer converted for T2R finetuning).
  # Its model must have the same parameter shapes as config.model. "" = random initialization. Only the newest
  # checkpoint's parameters are read (optimizer state, step and data position start fresh); a run that resumes from
  # its own checkpoint ignores this key.
  c.train.init_from = ""
  c.train.steps = 1000  # optimizer steps in total
  c.train.batch_size = 32  # global batch, in sequences (split over the data and fsdp mesh axes)
  c.train.seq_len = 256  # tokens per sequence
  c.train.grad_accum_steps = 1  # micro-batches per optimizer step; batch_size must be divisible by it
  # Positions whose logits are computed at a time in the loss (recomputed in the backward): caps the float32
  # [batch, seq_len, vocab] logits and their gradient at [batch, loss_chunk, vocab] for one more head matmul.
  # 0 = all positions at once.
  c.train.loss_chunk = 0
  c.train.log_every = 10  # console line and metrics.jsonl row every N steps
  # Held-out evaluation every N steps and at the end (0: only at the end); none when data.eval_fraction = 0.
  c.train.eval_every = 200
  c.train.eval_batches = 8  # batches per evaluation
  # What a non-finite loss or gradient does. "abort": stop at once with the step and the first parameter whose
  # gradient is not finite (the last checkpoint is kept). "skip": leave params and optimizer unchanged, count it,
  # and abort after `max_nonfinite_in_a_row` consecutive bad steps.
  c.train.nonfinite = "abort"
  c.train.max_nonfinite_in_a_row = 10
  c.train.tensorboard = False  # also write TensorBoard event files (needs the optional `tensorboardX` package)
  c.train.compilation_cache = "~/.cache/gsa_jax/xla"  # persistent XLA compilation cache ("" turns it off)

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-3  # peak learning rate
  c.optim.warmup_steps = 100  # linear warm-up from 0 to the peak
  c.optim.final_lr_ratio = 0.1  # cosine decay ends at learning_rate * final_lr_ratio
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.01  # decoupled (AdamW); never applied to norm scales or biases
  c.optim.decay_embeddings = False  # whether weight decay applies to the embedding table
  c.optim.clip_norm = 1.0  # global gradient-norm clipping (0: off)

  # Device mesh: data x fsdp x sequence x tensor must equal the device count; -1 on one axis takes what is left.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.sequence = 1  # splits every row's seq_len over devices (context parallelism, docs/context_parallel.md)
  c.mesh.tensor = 1

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 200  # save every N steps (and at the end)
  # Also save when this much time has passed since the newest checkpoint, and at the first step of a run that has
  # none (orbax's ContinuousCheckpointingPolicy; not while a save is still being written). 0: off.
  c.checkpoint.every_minutes = 0.0
  c.checkpoint.keep = 3  # keep the newest N checkpoints
  c.checkpoint.async_save = True  # write in the background while training continues
  # On SIGTERM (preemption) save the current step, then exit with code 143; on Ctrl-C the same with code 130.
  c.checkpoint.save_on_sigterm = True
  return c
