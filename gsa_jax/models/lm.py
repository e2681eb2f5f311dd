"""GSALM: the GSA language model (spec section 3), with optional softmax-attention layers for hybrids.

Full-sequence forward for training and evaluation, plus `prefill` / `step` for decoding (see gsa_jax.generate).
No training code here: no optimizer, no mesh.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gsa_jax.layers import CausalSelfAttention, GatedSlotAttention, RMSNorm, SwiGLU
from gsa_jax.layers.common import check_segment_ids, explicit_spec, logical_axes, scaled_fan_in_init
from gsa_jax.layers.gsa import GSA_OUTPUT_NAME
from gsa_jax.ops.common import KEY_STATES_NAME, RESIDUALS_NAME, VALUE_STATES_NAME
from gsa_jax.models.config import GSAConfig

_SAVE_MATMULS = jax.checkpoint_policies.dots_with_no_batch_dims_saveable


def _save_matmuls_and(*names):
  return jax.checkpoint_policies.save_from_both_policies(
      _SAVE_MATMULS, jax.checkpoint_policies.save_only_these_names(*names))


# A ladder of memory for speed (gsa_jax.ops.common says what each name is). At 1.3B, B4 x T4096 on the H100
# (docs/benchmarks.md) each step down the list keeps more per layer and reruns fewer GSA kernels in the backward.
# The names are the backends': "_keys" and "_states" keep what only the pallas_gpu kernels make (on any other
# backend they keep what "matmuls_gsa" keeps).
_REMAT_POLICY = {
    "block": None,  # save nothing inside a block: recompute it all in the backward pass
    "matmuls": _SAVE_MATMULS,  # keep projection outputs only
    # Also the op's output (any backend) and the Pallas kernels' small residuals: on pallas_gpu the backward reruns
    # only the state kernels.
    "matmuls_gsa": _save_matmuls_and(GSA_OUTPUT_NAME, RESIDUALS_NAME),
    # Also the pallas_gpu kernels' key chunk states (float32 [T / 64, K, M] a head): only the value state kernel
    # reruns.
    "matmuls_gsa_keys": _save_matmuls_and(GSA_OUTPUT_NAME, RESIDUALS_NAME, KEY_STATES_NAME),
    # Also the pallas_gpu kernels' value chunk states: no GSA kernel reruns.
    "matmuls_gsa_states": _save_matmuls_and(GSA_OUTPUT_NAME, RESIDUALS_NAME, KEY_STATES_NAME, VALUE_STATES_NAME),
}


class Block(nnx.Module):
  """x + mixer(RMSNorm(x)); then x + SwiGLU(RMSNorm(x))."""

  def __init__(self, config: GSAConfig, layer_idx: int, *, rngs: nnx.Rngs):
    c = config
    dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    # Output projections start smaller by 1/sqrt(2 N) so that the residual stream's variance does not grow with
    # depth (GPT-2 / the reference's rescale_prenorm_residual).
    out_init = scaled_fan_in_init(1.0 / (2 * c.num_layers))
    kw = dict(out_init=out_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.is_attention = layer_idx in c.attn_layers
    self.mixer_norm = RMSNorm(c.hidden_size, eps=c.norm_eps, dtype=dtype, param_dtype=param_dtype)
    if self.is_attention:
      self.mixer = CausalSelfAttention(c.hidden_size, c.resolved_attn_num_heads, c.resolved_attn_num_kv_heads,
                                       rope_theta=c.rope_theta, implementation=c.attn_implementation, **kw)
    else:
      self.mixer = GatedSlotAttention(
          c.hidden_size, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, num_slots=c.num_slots,
          expand_k=c.expand_k, expand_v=c.expand_v, feature_map=c.feature_map, use_short_conv=c.use_short_conv,
          conv_size=c.conv_size, gate_logit_normalizer=c.gate_logit_normalizer,
          forget_gate=c.forget_gate, slot_control=c.slot_control,
          norm_eps=c.norm_eps if c.output_norm_eps is None else c.output_norm_eps,
          elementwise_affine=c.elementwise_affine, use_rope=c.use_rope, rope_theta=c.rope_theta,
          backend=c.backend, chunk_size=c.chunk_size, kernel_block_sizes=c.kernel_block_sizes, **kw)
    self.mlp_norm = RMSNorm(c.hidden_size, eps=c.norm_eps, dtype=dtype, param_dtype=param_dtype)
    self.mlp = SwiGLU(c.hidden_size, c.resolved_intermediate_size, **kw)

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    x = x + self.mixer(self.mixer_norm(x), segment_ids)
    return x + self.mlp(self.mlp_norm(x))

  def prefill(self, x, segment_ids, max_len, cache=None):
    if self.is_attention:
      y, cache = self.mixer.prefill(self.mixer_norm(x), segment_ids, cache, max_len=max_len)
    else:
      y, cache = self.mixer.prefill(self.mixer_norm(x), segment_ids, cache)
    x = x + y
    return x + self.mlp(self.mlp_norm(x)), cache

  def step(self, x, cache):
    y, cache = self.mixer.step(self.mixer_norm(x), cache)
    x = x + y
    return x + self.mlp(self.mlp_norm(x)), cache

  def init_cache(self, batch_size: int, max_len: int):
    if self.is_attention:
      return self.mixer.init_cache(batch_size, max_len)
    return self.mixer.init_cache(batch_size)


def _apply_block(block: Block, x: jax.Array, segment_ids, policy: str) -> jax.Array:
  if policy == "none":
    return block(x, segment_ids)
  return nnx.remat(lambda blk, x, seg: blk(x, seg), policy=_REMAT_POLICY[policy])(block, x, segment_ids)


def _stretches_of_identical_blocks(blocks) -> list[list[tuple[nnx.GraphDef, nnx.State]]]:
  """Consecutive blocks grouped by structure (graph definition, parameter shapes and dtypes): one scan each."""
  stretches, last_key = [], None
  for block in blocks:
    graphdef, state = nnx.split(block)
    key = (graphdef, jax.tree.structure(state), tuple((x.shape, x.dtype) for x in jax.tree.leaves(state)))
    if key != last_key:
      stretches.append([])
      last_key = key
    stretches[-1].append((graphdef, state))
  return stretches


def _scan_blocks(stretch, x: jax.Array, segment_ids, policy: str) -> jax.Array:
  """x through the blocks of one stretch: a lax.scan over their stacked states (a lone block runs as itself)."""
  graphdef = stretch[0][0]
  if len(stretch) == 1:
    return _apply_block(nnx.merge(graphdef, stretch[0][1]), x, segment_ids, policy)
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(state for _, state in stretch))

  def body(x, state):
    return _apply_block(nnx.merge(graphdef, state), x, segment_ids, policy), None

  return jax.lax.scan(body, x, stacked)[0]


class GSALM(nnx.Module):
  """Causal LM: tokens int [b, t] (+ segment_ids [b, t], 0 = padding) -> logits float32 [b, t, vocab].

  Computation runs in `config.dtype` with parameters in `config.param_dtype`; the logits are cast to float32 so
  that a loss is computed in float32. Logits at padding positions are finite but meaningless.
  """

  def __init__(self, config: GSAConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    self.embed = nnx.Embed(c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=param_dtype,
                           embedding_init=jax.nn.initializers.normal(c.embed_init_std),
                           embedding_metadata=logical_axes("vocab", "embed"), rngs=rngs)
    self.blocks = nnx.List([Block(c, i, rngs=rngs) for i in range(c.num_layers)])
    self.norm = RMSNorm(c.hidden_size, eps=c.norm_eps, dtype=dtype, param_dtype=param_dtype)
    if c.tie_embeddings:
      self.lm_head = None
    else:
      self.lm_head = nnx.Linear(c.hidden_size, c.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                                kernel_init=jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
                                kernel_metadata=logical_axes("embed", "vocab"), rngs=rngs)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """The output head: hidden [..., hidden_size] (from `hidden_states`) -> logits float32 [..., vocab]."""
    x = self.norm(hidden)
    logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)
    return logits.astype(jnp.float32)

  def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    return self.logits(self.hidden_states(tokens, segment_ids))

  def hidden_states(self, tokens: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """The last block's output [b, t, hidden_size] (before the final norm): `logits` maps it to the vocabulary. A
    loss can apply `logits` a slice of positions at a time (gsa_jax.train.loss) instead of holding [b, t, vocab]."""
    check_tokens(tokens, 2)
    check_segment_ids(segment_ids, *tokens.shape)
    x = self.embed(tokens, out_sharding=explicit_spec(tokens, tokens.ndim + 1))
    policy = self.config.remat
    if self.config.scan_layers:
      for stretch in _stretches_of_identical_blocks(self.blocks):
        x = _scan_blocks(stretch, x, segment_ids, policy)
      return x
    for block in self.blocks:
      x = _apply_block(block, x, segment_ids, policy)
    return x

  # -- decoding ----------------------------------------------------------------------------------------------------

  def prefill(self, tokens: jax.Array, segment_ids: jax.Array | None = None, *, max_len: int | None = None,
              caches: list[Any] | None = None) -> tuple[jax.Array, list[Any]]:
    """Full-sequence logits [b, t, vocab] and one cache per layer for continuing each row's last document.

    max_len: the number of tokens the attention layers' KV caches hold (cached tokens + prompt length + new
      tokens); a continued KV cache with fewer slots is grown to it. None: t without caches (no room to decode
      after the prompt), the continued KV caches' own sizes with them. Models without attention layers ignore it.
    caches: None, or the caches of the tokens before (`prefill`, `step`, `init_cache`): each row's first document
      continues them (see GatedSlotAttention.prefill and CausalSelfAttention.prefill), so a prompt prefilled in
      pieces equals the prompt prefilled at once, in GSA and hybrid models alike. A KV cache must have room for
      the prompt (ValueError where its index is concrete; `gsa_jax.generate` checks and sizes them).
    """
    check_tokens(tokens, 2)
    check_segment_ids(segment_ids, *tokens.shape)
    if caches is not None:
      self._check_cache_count(caches)
    if max_len is None:
      max_len = tokens.shape[1] if caches is None else 0  # 0: a continued KV cache keeps its size
    x = self.embed(tokens, out_sharding=explicit_spec(tokens, tokens.ndim + 1))
    new = []
    for block, cache in zip(self.blocks, caches or [None] * len(self.blocks)):
      x, cache = block.prefill(x, segment_ids, max_len, cache)
      new.append(cache)
    return self.logits(x), new

  def step(self, tokens: jax.Array, caches: list[Any]) -> tuple[jax.Array, list[Any]]:
    """One token per row: tokens int [b] -> (logits float32 [b, vocab], new caches)."""
    check_tokens(tokens, 1)
    self._check_cache_count(caches)
    x = self.embed(tokens, out_sharding=explicit_spec(tokens, tokens.ndim + 1))
    new = []
    for block, cache in zip(self.blocks, caches):
      x, cache = block.step(x, cache)
      new.append(cache)
    return self.logits(x), new

  def _check_cache_count(self, caches) -> None:
    if not isinstance(caches, (list, tuple)) or len(caches) != len(self.blocks):
      got = f"{len(caches)} caches" if isinstance(caches, (list, tuple)) else type(caches).__name__
      raise ValueError(f"caches: the model has {len(self.blocks)} layers and needs one cache per layer (a list, as "
                       f"prefill, init_cache and generate return); got {got}.")

  def init_cache(self, batch_size: int, max_len: int) -> list[Any]:
    """Caches of an empty prompt (attention layers sized to max_len)."""
    return [block.init_cache(batch_size, max_len) for block in self.blocks]


def check_tokens(tokens, rank: int) -> None:
  """tokens must be an integer array [b, t] (rank 2) or [b] (rank 1, one decoding step)."""
  legend = "[b, t]" if rank == 2 else "[b]"
  if not hasattr(tokens, "shape") or not hasattr(tokens, "dtype"):
    raise TypeError(f"tokens must be an int array {legend}; got {type(tokens).__name__}.")
  if tokens.ndim != rank:
    raise ValueError(f"tokens has shape {tuple(tokens.shape)}; expected {legend}.")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise TypeError(f"tokens must be an integer array {legend}; got dtype {tokens.dtype}.")


def count_params(model_or_state) -> int:
  """Number of parameter scalars of a model (or of its nnx.State, e.g. from nnx.eval_shape)."""
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))
