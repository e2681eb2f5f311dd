"""AdamW with warm-up + cosine decay, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

import re

import jax
import ml_collections
import optax

# Never decayed: norm scales and biases (matched on the parameter path).
_NO_DECAY = re.compile(r"(norm'\]\['scale'\]|\['bias'\])")
_EMBEDDING = re.compile(r"\['embed'\]\['embedding'\]")


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.learning_rate, warmup_steps=optim.warmup_steps,
      decay_steps=max(total_steps, optim.warmup_steps + 1), end_value=optim.learning_rate * optim.final_lr_ratio)


def weight_decay_mask(params, decay_embeddings: bool):
  """True for the parameters that weight decay applies to."""

  def decays(path, _):
    name = jax.tree_util.keystr(path)
    return not _NO_DECAY.search(name) and (decay_embeddings or not _EMBEDDING.search(name))

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  adamw = optax.adamw(
      learning_rate_schedule(optim, total_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
      weight_decay=optim.weight_decay, mask=lambda params: weight_decay_mask(params, optim.decay_embeddings))
  if optim.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(optim.clip_norm), adamw)
  return adamw
