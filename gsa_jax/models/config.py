"""GSAConfig: the hyperparameters of a GSA language model, validated on construction, and the paper's presets."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from gsa_jax.layers.fused_attention import ATTENTION_IMPLEMENTATIONS
from gsa_jax.layers.gsa import FEATURE_MAPS, SLOT_CONTROLS
from gsa_jax.ops import DEFAULT_CHUNK_SIZE, check_backend, kernel_block_sizes_spec

# Remat policies (`gsa_jax.models.lm`). What the "matmuls_gsa*" ones keep beyond the projections' outputs is named by
# the op's backends: the op's output (every backend), the Pallas kernels' small residuals (pallas_gpu, pallas_mgpu,
# pallas_tpu) and chunk states that only the pallas_gpu kernels make: on any other backend "matmuls_gsa_keys" and
# "matmuls_gsa_states" keep what "matmuls_gsa" keeps.
REMAT_POLICIES = ("none", "block", "matmuls", "matmuls_gsa", "matmuls_gsa_keys", "matmuls_gsa_states")


@dataclasses.dataclass(frozen=True)
class GSAConfig:
  """A pre-norm decoder: embeddings -> N x [x + mixer(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] -> RMSNorm -> head.

  The mixer is GSA, or causal softmax attention (RoPE, grouped kv heads) at the indices in `attn_layers`.
  Field names follow the reference library's GSAConfig where one exists.
  """

  vocab_size: int = 32000
  hidden_size: int = 2048
  num_layers: int = 24
  # GSA mixer.
  num_heads: int = 4
  num_kv_heads: int | None = None  # None: num_heads.
  num_slots: int = 64
  expand_k: float = 1.0
  expand_v: float = 1.0
  feature_map: str = "swish"
  use_short_conv: bool = False
  conv_size: int = 4
  gate_logit_normalizer: float = 8.0
  forget_gate: bool = True  # False: the no-forgetting ablation (g = 0, s = sigmoid(x W_f)); see the layer
  # "gsa": GSA's learned forget gate | "abc": ABC's slot control (writes normalized by their running sum, no learned
  # forgetting; gsa_jax.ops.abc), the paper's baseline, with the rest of the layer unchanged.
  slot_control: str = "gsa"
  use_rope: bool = False  # RoPE on the GSA layers' q, k (the reference has none).
  elementwise_affine: bool = True  # learned scale of the GSA output norm.
  backend: str = "auto"
  chunk_size: int = DEFAULT_CHUNK_SIZE
  # The GSA kernels' tiles, per kernel backend: "BACKEND.FIELD=VALUE,..." (e.g. "pallas_gpu.block_k=128,
  # pallas_gpu.num_warps=8"; the fields are those of pallas_kernels' BlockSizes) or a mapping, stored in the
  # canonical string form (gsa_jax.ops.kernel_block_sizes_spec); "" = the kernels' defaults.
  kernel_block_sizes: str = ""
  # MLP: None means the reference's rule, 2/3 * hidden_ratio * hidden_size rounded up to a multiple of 256.
  intermediate_size: int | None = None
  hidden_ratio: int = 4
  norm_eps: float = 1e-6
  # eps of the GSA layers' output norm; None: norm_eps. The reference layer (fla 0.6.0) never passes its norm_eps
  # to that norm, which then uses 1e-5 whatever the config says: checkpoints converted from it set 1e-5 here.
  output_norm_eps: float | None = None
  tie_embeddings: bool = False
  # Hybrid models: layer indices that use causal softmax attention instead of GSA.
  attn_layers: tuple[int, ...] = ()
  attn_num_heads: int | None = None  # None: num_heads.
  attn_num_kv_heads: int | None = None  # None: attn_num_heads.
  rope_theta: float = 10000.0
  # How the attention layers attend in training and prefill (gsa_jax.layers.fused_attention): "auto" (cuDNN, or for
  # batches of packed documents the Pallas flash kernel, on GPU; splash on TPU; the explicit mask on CPU) | "xla" (explicit [t, t] mask, the
  # reference) | "cudnn" | "pallas_gpu" | "splash". Unsupported inputs fall back, with the reason logged once.
  attn_implementation: str = "auto"
  # Numerics and memory. dtype: compute dtype; param_dtype: parameter dtype. Logits are returned in float32.
  dtype: str = "float32"
  param_dtype: str = "float32"
  # "none" | "block" (recompute each block) | "matmuls" (keep only matmul outputs) | "matmuls_gsa" (also keep the
  # GSA op's output, and the Pallas kernels' small residuals: on pallas_gpu the backward then reruns only the state
  # kernels) | "matmuls_gsa_keys" (also the pallas_gpu kernels' float32 key chunk states: only the value state
  # kernel reruns) | "matmuls_gsa_states" (also their value chunk states: no kernel reruns, the most memory). The
  # last two differ from "matmuls_gsa" only on backend pallas_gpu (REMAT_POLICIES).
  remat: str = "none"
  # Run each stretch of consecutive identical blocks (all of a pure GSA model; a hybrid's GSA blocks between its
  # attention layers) as one lax.scan over their stacked parameters: XLA compiles one block per stretch instead of
  # every block, and the numbers are the same. Parameters stay one set per layer (checkpoints, converters and
  # sharding are unchanged); the scan stacks them inside the step, a copy the size of those blocks' parameters.
  scan_layers: bool = False
  embed_init_std: float = 0.02  # the reference's initializer_range.

  def __post_init__(self):
    if isinstance(self.attn_layers, list):
      object.__setattr__(self, "attn_layers", tuple(self.attn_layers))

    def check(cond, field, message):
      if not cond:
        raise ValueError(f"GSAConfig.{field}: {message}")

    is_int = lambda value: isinstance(value, int) and not isinstance(value, bool)
    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_slots", "conv_size", "chunk_size",
                  "hidden_ratio"):
      value = getattr(self, field)
      check(is_int(value) and value > 0, field, f"must be a positive int; got {value!r}.")
    for field in ("num_kv_heads", "intermediate_size", "attn_num_heads", "attn_num_kv_heads"):
      value = getattr(self, field)
      check(value is None or (is_int(value) and value > 0), field, f"must be a positive int or None; got {value!r}.")
    check(self.num_kv_heads is None or self.num_heads % self.num_kv_heads == 0,
          "num_kv_heads", f"must divide num_heads={self.num_heads}; got {self.num_kv_heads}.")
    check(not self.use_short_conv or self.conv_size >= 2, "conv_size",
          f"must be at least 2 with use_short_conv (a 1-tap convolution has no past tokens); got {self.conv_size}.")
    check(self.rope_theta > 0, "rope_theta", f"must be positive; got {self.rope_theta}.")
    check(self.embed_init_std >= 0, "embed_init_std", f"must be >= 0; got {self.embed_init_std}.")
    check(self.hidden_size % self.num_heads == 0, "hidden_size",
          f"{self.hidden_size} is not divisible by num_heads={self.num_heads}.")
    check(self.key_dim > 0 and self.key_dim % self.num_heads == 0, "expand_k",
          f"hidden_size * expand_k = {self.key_dim} must be a positive multiple of num_heads={self.num_heads}.")
    check(self.value_dim > 0 and self.value_dim % self.num_heads == 0, "expand_v",
          f"hidden_size * expand_v = {self.value_dim} must be a positive multiple of num_heads={self.num_heads}.")
    check(self.feature_map in FEATURE_MAPS, "feature_map",
          f"{self.feature_map!r} is unknown; expected one of {FEATURE_MAPS}.")
    check(self.slot_control in SLOT_CONTROLS, "slot_control",
          f"{self.slot_control!r} is unknown; expected one of {SLOT_CONTROLS}.")
    check(self.forget_gate or self.slot_control == "gsa", "forget_gate",
          f"False is GSA's ablation; slot_control={self.slot_control!r} has no forget gate to disable.")
    check(self.gate_logit_normalizer > 0, "gate_logit_normalizer", f"must be positive; got {self.gate_logit_normalizer}.")
    check(not self.use_rope or (self.key_dim // self.num_heads) % 2 == 0, "use_rope",
          f"needs an even GSA head key width; got {self.key_dim // self.num_heads}.")
    check_backend(self.backend, "GSAConfig.backend")
    try:
      object.__setattr__(self, "kernel_block_sizes", kernel_block_sizes_spec(self.kernel_block_sizes))
    except (TypeError, ValueError) as e:
      raise ValueError(f"GSAConfig.{e}") from e  # the message starts with the field's name
    check(self.chunk_size & (self.chunk_size - 1) == 0, "chunk_size", f"must be a power of two; got {self.chunk_size}.")
    check(self.norm_eps > 0, "norm_eps", f"must be positive; got {self.norm_eps}.")
    check(self.output_norm_eps is None or self.output_norm_eps > 0, "output_norm_eps",
          f"must be positive or None; got {self.output_norm_eps}.")
    check(all(isinstance(i, int) and 0 <= i < self.num_layers for i in self.attn_layers), "attn_layers",
          f"every index must be in [0, num_layers={self.num_layers}); got {self.attn_layers}.")
    check(len(set(self.attn_layers)) == len(self.attn_layers), "attn_layers", f"has duplicates: {self.attn_layers}.")
    ah, akv = self.resolved_attn_num_heads, self.resolved_attn_num_kv_heads
    check(ah > 0 and self.hidden_size % ah == 0, "attn_num_heads",
          f"hidden_size={self.hidden_size} is not divisible by attn_num_heads={ah}.")
    check(akv > 0 and ah % akv == 0, "attn_num_kv_heads", f"must divide attn_num_heads={ah}; got {akv}.")
    check(not self.attn_layers or (self.hidden_size // ah) % 2 == 0, "attn_num_heads",
          f"RoPE needs an even attention head width; got {self.hidden_size // ah}.")
    check(self.attn_implementation in ATTENTION_IMPLEMENTATIONS, "attn_implementation",
          f"{self.attn_implementation!r} is unknown; expected one of {ATTENTION_IMPLEMENTATIONS}.")
    check(self.remat in REMAT_POLICIES, "remat", f"{self.remat!r} is unknown; expected one of {REMAT_POLICIES} "
          "(gsa_jax.models.config.REMAT_POLICIES says which backends each one is for).")
    for field in ("dtype", "param_dtype"):
      try:
        ok = jnp.issubdtype(jnp.dtype(getattr(self, field)), jnp.floating)
      except TypeError:
        ok = False
      check(ok, field, f"must name a floating dtype; got {getattr(self, field)!r}.")

  # -- derived sizes -----------------------------------------------------------------------------------------------

  @property
  def key_dim(self) -> int:
    return int(self.hidden_size * self.expand_k)

  @property
  def value_dim(self) -> int:
    return int(self.hidden_size * self.expand_v)

  @property
  def resolved_num_kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def resolved_attn_num_heads(self) -> int:
    return self.num_heads if self.attn_num_heads is None else self.attn_num_heads

  @property
  def resolved_attn_num_kv_heads(self) -> int:
    return self.resolved_attn_num_heads if self.attn_num_kv_heads is None else self.attn_num_kv_heads

  @property
  def resolved_intermediate_size(self) -> int:
    if self.intermediate_size is not None:
      return self.intermediate_size
    return 256 * math.ceil(int(self.hidden_size * self.hidden_ratio * 2 / 3) / 256)

  def replace(self, **changes) -> "GSAConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Parameter count, computed from the shapes (equals the model's; tests check it)."""
    d, v = self.hidden_size, self.vocab_size
    hkv, dk, dv = self.resolved_num_kv_heads, self.key_dim // self.num_heads, self.value_dim // self.num_heads
    gsa = d * self.key_dim + d * hkv * dk + d * hkv * dv + d * hkv * self.num_slots + self.value_dim * d
    gsa += self.value_dim if self.elementwise_affine else 0
    gsa += dk * dk if self.feature_map == "t2r" else 0
    if self.use_short_conv:
      gsa += self.conv_size * (self.key_dim + hkv * dk + hkv * dv)
    ah, akv = self.resolved_attn_num_heads, self.resolved_attn_num_kv_heads
    dh = d // ah
    attn = 2 * d * ah * dh + 2 * d * akv * dh
    block = 3 * d * self.resolved_intermediate_size + 2 * d
    n_attn = len(self.attn_layers)
    total = self.num_layers * block + n_attn * attn + (self.num_layers - n_attn) * gsa
    return total + v * d * (1 if self.tie_embeddings else 2) + d


# -- like-for-like baselines ---------------------------------------------------------------------------------------
# The same model (widths, MLP, embeddings, numerics) with softmax attention at some or all layers, for comparing
# speed and quality at equal size. An attention layer has 4 d^2 parameters, as a GSA layer has 4 d^2 + d H M (with
# the presets' expand_k = expand_v = 1), so the parameter counts stay within 1%.

ATTENTION_HEAD_DIM = 128  # head width of the baselines' attention layers unless attn_num_heads is set (Llama's)


def with_attention_layers(config: GSAConfig, attn_layers) -> GSAConfig:
  """`config` with softmax attention at `attn_layers`; attention heads of width 128 unless attn_num_heads is set."""
  heads = config.attn_num_heads or max(1, config.hidden_size // ATTENTION_HEAD_DIM)
  return config.replace(attn_layers=tuple(attn_layers), attn_num_heads=heads if attn_layers else config.attn_num_heads)


def all_attention(config: GSAConfig) -> GSAConfig:
  """The Transformer++ of the same size: softmax attention (RoPE) at every layer."""
  return with_attention_layers(config, range(config.num_layers))


def hybrid(config: GSAConfig, every: int = 6) -> GSAConfig:
  """Softmax attention at every `every`-th layer (indices every - 1, 2 every - 1, ...; configs/hybrid_340m.py)."""
  if not isinstance(every, int) or not 1 <= every <= config.num_layers:
    raise ValueError(f"every: must be an int in [1, num_layers={config.num_layers}]; got {every!r}.")
  return with_attention_layers(config, range(every - 1, config.num_layers, every))


# Named mixer layouts of one model: what `benchmarks/bench_train.py --compare` takes.
MIXER_LAYOUTS = {"gsa": lambda c: c.replace(attn_layers=()), "hybrid": lambda c: hybrid(c, min(6, c.num_layers)),
                 "attention": all_attention}


def mixer_layout(config: GSAConfig, layout: str) -> GSAConfig:
  """`config` with the mixers of `layout` ("gsa": GSA everywhere, "hybrid", "attention": see MIXER_LAYOUTS)."""
  if layout not in MIXER_LAYOUTS:
    raise ValueError(f"layout: {layout!r} is unknown; expected one of {tuple(MIXER_LAYOUTS)}.")
  return MIXER_LAYOUTS[layout](config)


# -- presets -------------------------------------------------------------------------------------------------------
# Sizes of the paper's models (Zhang et al. 2024, arXiv 2409.07146, Section 4: 340M / 15B tokens, 1.3B and 2.7B /
# 100B tokens, Mistral tokenizer, vocab 32000). Exact shapes come from the published configs:
#   340M: fla-org/flame `configs/gsa_340M.json` (hidden 1024, 24 layers, 4 heads, 64 slots, gate normalizer 4,
#         tied embeddings, elementwise_affine false, norm_eps 1e-6; intermediate null -> 2816 by the reference's
#         rule; vocab unset -> the reference default 32000). Its `use_output_gate: true` is ignored by the
#         reference layer, so it has no counterpart here.
#   1.3B: spec section 3 / the paper: hidden 2048, 24 layers, 4 heads, 64 slots, intermediate 5632 (the reference
#         rule for 2048), vocab 32000, untied, gate normalizer 8; elementwise_affine false and norm_eps 1e-6 as in
#         the published 2.7B config of the same release (fla-hub), which we assume the 1.3B shares.
#   2.7B: huggingface.co/fla-hub/gsa-2.7B-100B config.json: hidden 2560, 32 layers, 5 heads, 64 slots, gate
#         normalizer 8, intermediate null -> 6912, vocab 32000, untied, elementwise_affine false, norm_eps 1e-6.
# output_norm_eps 1e-5 in all three: what the reference's GSA output norm computes (it ignores norm_eps), so a model
# trained from a preset is the reference's model and exports with `python -m gsa_jax.convert to-fla`.


def gsa_340m(**overrides) -> GSAConfig:
  return GSAConfig(vocab_size=32000, hidden_size=1024, num_layers=24, num_heads=4, num_slots=64,
                   gate_logit_normalizer=4.0, intermediate_size=2816, tie_embeddings=True, elementwise_affine=False,
                   norm_eps=1e-6, output_norm_eps=1e-5).replace(**overrides)


def gsa_1p3b(**overrides) -> GSAConfig:
  return GSAConfig(vocab_size=32000, hidden_size=2048, num_layers=24, num_heads=4, num_slots=64,
                   gate_logit_normalizer=8.0, intermediate_size=5632, tie_embeddings=False,
                   elementwise_affine=False, norm_eps=1e-6, output_norm_eps=1e-5).replace(**overrides)


def gsa_2p7b(**overrides) -> GSAConfig:
  return GSAConfig(vocab_size=32000, hidden_size=2560, num_layers=32, num_heads=5, num_slots=64,
                   gate_logit_normalizer=8.0, intermediate_size=6912, tie_embeddings=False,
                   elementwise_affine=False, norm_eps=1e-6, output_norm_eps=1e-5).replace(**overrides)


PRESETS = {"gsa_340m": gsa_340m, "gsa_1p3b": gsa_1p3b, "gsa_2p7b": gsa_2p7b}
