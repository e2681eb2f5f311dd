"""The optimizer of train.py against a hand-written AdamW: the warm-up + cosine schedule, global-norm clipping,
betas and eps, and which parameters weight decay applies to."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from gsa_jax.models import GSALM
from gsa_jax.train.optimizer import learning_rate_schedule, make_optimizer, weight_decay_mask
from tests.test_models import tiny


def _optim(**changes):
  optim = base.get_config().optim
  optim.update(dict(learning_rate=1e-2, warmup_steps=4, final_lr_ratio=0.1, b1=0.8, b2=0.9, eps=1e-6,
                    weight_decay=0.1, decay_embeddings=False, clip_norm=1.0) | changes)
  return optim


def reference_lr(step, *, peak, warmup, total, final_ratio):
  """Linear warm-up from 0 to peak over `warmup` steps, then a cosine from peak to peak * final_ratio at `total`."""
  if step < warmup:
    return peak * step / warmup
  end = peak * final_ratio
  return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * min(step - warmup, total - warmup) / (total - warmup)))


def test_learning_rate_schedule_values():
  total = 20
  schedule = learning_rate_schedule(_optim(), total)
  kw = dict(peak=1e-2, warmup=4, total=total, final_ratio=0.1)
  for step in (0, 1, 2, 4, 5, 12, 19, 20, 30):
    np.testing.assert_allclose(float(schedule(step)), reference_lr(step, **kw), rtol=1e-6, atol=1e-12, err_msg=step)
  # The landmarks, as the config documents them.
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(2)), 5e-3, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(4)), 1e-2, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(12)), 1e-3 + 9e-3 * 0.5, rtol=1e-6)  # half way down the cosine
  np.testing.assert_allclose(float(schedule(total)), 1e-3, rtol=1e-6)


def reference_adamw(params, grads_per_step, mask, *, lr, b1, b2, eps, weight_decay, clip_norm):
  """AdamW written out in numpy: clip the global gradient norm to clip_norm (0: no clipping), bias-corrected
  moments, decoupled weight decay on the masked parameters; step i (from 0) uses lr(i)."""
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v = {k: np.zeros_like(p) for k, p in params.items()}
  for i, grads in enumerate(grads_per_step):
    norm = math.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in grads.values()))
    factor = min(1.0, clip_norm / norm) if clip_norm > 0 else 1.0
    for k in params:
      g = np.asarray(grads[k], np.float64) * factor
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      m_hat, v_hat = m[k] / (1 - b1 ** (i + 1)), v[k] / (1 - b2 ** (i + 1))
      update = m_hat / (np.sqrt(v_hat) + eps) + (weight_decay * params[k] if mask[k] else 0.0)
      params[k] = params[k] - lr(i) * update
  return params


@pytest.mark.parametrize("clip_norm", [1.0, 0.0])
def test_updates_equal_a_hand_written_adamw(clip_norm):
  """Five steps on a tree with a kernel (decayed), a norm scale and the embedding table (not decayed); gradients of
  norm 30 then 0.3, so clipping (to 1) changes the moments' proportions and shows in the result."""
  rng = np.random.default_rng(0)
  params = {"['lm_head']['kernel']": rng.standard_normal((3, 4)), "['norm']['scale']": rng.standard_normal(4),
            "['embed']['embedding']": rng.standard_normal((5, 3))}
  tree = {"lm_head": {"kernel": params["['lm_head']['kernel']"]}, "norm": {"scale": params["['norm']['scale']"]},
          "embed": {"embedding": params["['embed']['embedding']"]}}
  flat = lambda t: {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}
  grads = []
  for step in range(5):
    g = jax.tree.map(lambda x: rng.standard_normal(x.shape), tree)
    norm = math.sqrt(sum(float(np.sum(x ** 2)) for x in jax.tree.leaves(g)))
    grads.append(jax.tree.map(lambda x: x * (30.0 if step < 2 else 0.3) / norm, g))
  optim, total = _optim(clip_norm=clip_norm), 10
  tx = make_optimizer(optim, total)
  state_tree = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
  opt_state = tx.init(state_tree)
  for g in grads:
    updates, opt_state = tx.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), opt_state, state_tree)
    state_tree = jax.tree.map(jnp.add, state_tree, updates)
  lr = lambda i: reference_lr(i, peak=1e-2, warmup=4, total=total, final_ratio=0.1)
  mask = {"['lm_head']['kernel']": True, "['norm']['scale']": False, "['embed']['embedding']": False}
  want = reference_adamw(params, [flat(g) for g in grads], mask, lr=lr, b1=0.8, b2=0.9, eps=1e-6,
                         weight_decay=0.1, clip_norm=clip_norm)
  got = flat(state_tree)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=2e-6, atol=1e-7, err_msg=name)
  # The reference with the other clipping differs: this comparison can tell clipping on from off.
  other = reference_adamw(params, [flat(g) for g in grads], mask, lr=lr, b1=0.8, b2=0.9, eps=1e-6,
                          weight_decay=0.1, clip_norm=1.0 - clip_norm)
  assert not np.allclose(other["['lm_head']['kernel']"], want["['lm_head']['kernel']"], rtol=1e-4)


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_weight_decay_mask_on_every_parameter(decay_embeddings):
  """Every parameter of a model with GSA (short convolutions, t2r, output norm) and attention layers: decayed
  exactly when it is a matrix (projections, convolution weights, t2r, LM head), never norm scales; the embedding
  table only with decay_embeddings."""
  model = GSALM(tiny(attn_layers=(1,), use_short_conv=True, feature_map="t2r"), rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  mask = weight_decay_mask(params, decay_embeddings)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  decays = jax.tree.leaves(mask)
  assert len(leaves) == len(decays)
  seen = set()
  for (path, value), decayed in zip(leaves, decays):
    name = jax.tree_util.keystr(path)
    if name.startswith("['embed']['embedding']"):
      expected = decay_embeddings
    else:
      expected = value.ndim >= 2
    assert decayed == expected, name
    seen.add(name.split("'")[-2] if value.ndim == 1 else "matrix")
  assert seen == {"scale", "matrix"}  # the model's vectors are all norm scales (no biases)
  # And the optimizer uses this mask: one step with zero gradients only decays the masked parameters.
  tx = make_optimizer(_optim(decay_embeddings=decay_embeddings, warmup_steps=0), 10)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  for (path, _), decayed, update in zip(leaves, decays, jax.tree.leaves(updates)):
    assert bool(jnp.any(update != 0)) == decayed, jax.tree_util.keystr(path)
