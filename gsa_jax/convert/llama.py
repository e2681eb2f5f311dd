"""T2R: a GSA model initialized from a pretrained Llama/Mistral-style Transformer (Hugging Face format).

As in the paper's T2R setting (Zhang et al. 2024, section 4; following SUPRA), every weight of the Transformer is
kept and only what GSA adds is new:
- embeddings, the two RMSNorms of each block, the final norm, the SwiGLU MLP and the LM head are copied;
- each attention's q/k/v/o projections become the GSA layer's q/k/v/o projections (same heads, same grouped kv
  heads: `num_attention_heads` query heads of width `head_dim`, `num_key_value_heads` kv heads); RoPE is dropped,
  as the reference GSA layer has no positional encoding, and the softmax over keys becomes the softmax over slots;
- the slot gate projection `f_proj` (hidden -> kv heads x slots) is freshly initialized (fan-in normal), as are the
  GSA output norm's scale (ones) and, with feature_map='t2r', the learned feature map;
- layers listed in `attn_layers` keep softmax attention (with the Transformer's RoPE), for hybrid T2R.
The result is exportable with to-fla (its output norm uses the reference's eps 1e-5).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from gsa_jax.convert.io import ConversionError, check_known_keys, check_same_keys
from gsa_jax.layers.common import fan_in_init
from gsa_jax.models import GSAConfig

_T = lambda a: np.ascontiguousarray(np.asarray(a).T)

_MODEL_TYPES = ("llama", "mistral")
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_MAPPED = {"model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "hidden_act", "attention_bias",
           "mlp_bias", "rope_theta", "rope_scaling", "initializer_range", "rope_parameters"}
# Keys that do not change the weights' meaning for GSA: RoPE's range and the sliding window only concern softmax
# attention (GSA has neither), dropout is off in finetuning, pretraining_tp only splits matmuls, the rest is
# bookkeeping.
_NO_EFFECT = {"max_position_embeddings", "sliding_window", "attention_dropout", "pretraining_tp", "use_cache",
              "bos_token_id", "eos_token_id", "pad_token_id", "architectures", "transformers_version", "torch_dtype",
              "dtype", "_name_or_path", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
              "tokenizer_class", "use_sliding_window", "max_window_layers", "layer_types"}


def config_from_llama(cfg: dict[str, Any], *, num_slots: int = 64, gate_logit_normalizer: float = 8.0,
                      feature_map: str = "swish", attn_layers: tuple[int, ...] = (),
                      ignore_keys: tuple[str, ...] = ()) -> GSAConfig:
  if cfg.get("model_type") not in _MODEL_TYPES:
    raise ConversionError(f"config.json has model_type={cfg.get('model_type')!r}; from-llama converts "
                          f"{_MODEL_TYPES} checkpoints.")
  missing = [k for k in _REQUIRED if k not in cfg]
  if missing:
    raise ConversionError(f"config.json lacks {missing}, which every {_MODEL_TYPES} config has.")
  check_known_keys(cfg, _MAPPED | _NO_EFFECT, ignore_keys, "they do not change the model's weights")
  problems = []
  if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
    problems.append(f"hidden_act={cfg['hidden_act']!r} (our MLP is SwiGLU)")
  for key in ("attention_bias", "mlp_bias"):
    if cfg.get(key):
      problems.append(f"{key}=True (our projections have no biases)")
  hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
  kv_heads = int(cfg.get("num_key_value_heads") or heads)
  head_dim = int(cfg.get("head_dim") or hidden // heads)
  rope = cfg.get("rope_scaling") or None
  if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) == "default":
    rope = None  # transformers writes the unscaled RoPE this way too
  theta = float(cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
  if isinstance(cfg.get("rope_parameters"), dict) and cfg["rope_parameters"].get("rope_type", "default") != "default":
    rope = cfg["rope_parameters"]
  if attn_layers and rope:
    problems.append(f"rope scaling {rope} with attention layers kept (our RoPE has no scaling)")
  if attn_layers and cfg.get("sliding_window") and cfg.get("use_sliding_window", True):
    problems.append(f"sliding_window={cfg['sliding_window']} with attention layers kept (ours attend to the whole "
                    "context; drop --attn-layers, or convert a checkpoint without a window)")
  if attn_layers and head_dim * heads != hidden:
    problems.append(f"head_dim={head_dim} x {heads} heads != hidden_size={hidden} with attention layers kept")
  if problems:
    raise ConversionError("unsupported options in the Transformer config: " + "; ".join(problems) + ".")
  try:
    return GSAConfig(
        vocab_size=int(cfg["vocab_size"]), hidden_size=hidden, num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=None if kv_heads == heads else kv_heads, num_slots=num_slots,
        expand_k=heads * head_dim / hidden, expand_v=heads * head_dim / hidden, feature_map=feature_map,
        gate_logit_normalizer=gate_logit_normalizer, intermediate_size=int(cfg["intermediate_size"]),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), output_norm_eps=1e-5,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), attn_layers=tuple(attn_layers),
        attn_num_heads=heads if attn_layers else None, attn_num_kv_heads=kv_heads if attn_layers else None,
        rope_theta=theta,
        embed_init_std=float(cfg.get("initializer_range", 0.02)))
  except ValueError as e:
    raise ConversionError(f"the Transformer config gives an invalid GSA model: {e}") from None


def params_from_llama(c: GSAConfig, tensors: dict[str, np.ndarray], *, seed: int = 0) -> dict[tuple, np.ndarray]:
  """Our parameters {path: array} from a Llama/Mistral checkpoint's tensors; new GSA parameters from `seed`."""
  tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}  # old RoPE buffers
  if c.tie_embeddings and "lm_head.weight" in tensors:
    head = tensors.pop("lm_head.weight")
    if not np.array_equal(head, tensors.get("model.embed_tokens.weight")):
      raise ConversionError("tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight.")
  copied = {"model.embed_tokens.weight": (("embed", "embedding"), np.asarray),
            "model.norm.weight": (("norm", "scale"), np.asarray)}
  if not c.tie_embeddings:
    copied["lm_head.weight"] = (("lm_head", "kernel"), _T)
  for i in range(c.num_layers):
    f, o = f"model.layers.{i}.", ("blocks", i)
    copied[f + "input_layernorm.weight"] = (o + ("mixer_norm", "scale"), np.asarray)
    copied[f + "post_attention_layernorm.weight"] = (o + ("mlp_norm", "scale"), np.asarray)
    for p in ("gate_proj", "up_proj", "down_proj"):
      copied[f + f"mlp.{p}.weight"] = (o + ("mlp", p, "kernel"), _T)
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
      copied[f + f"self_attn.{p}.weight"] = (o + ("mixer", p, "kernel"), _T)
  check_same_keys(set(tensors), set(copied), what="tensors of the Transformer checkpoint")
  params = {ours: fn(tensors[name]) for name, (ours, fn) in copied.items()}

  # What GSA adds, initialized as our model initializes it.
  key = jax.random.key(seed)
  hkv, dk = c.resolved_num_kv_heads, c.key_dim // c.num_heads
  for i in range(c.num_layers):
    if i in c.attn_layers:
      continue
    key, k_f, k_t = jax.random.split(key, 3)
    params[("blocks", i, "mixer", "f_proj", "kernel")] = np.asarray(
        fan_in_init(k_f, (c.hidden_size, hkv * c.num_slots), np.float32))
    if c.feature_map == "t2r":
      params[("blocks", i, "mixer", "t2r", "kernel")] = np.asarray(fan_in_init(k_t, (dk, dk), np.float32))
    if c.elementwise_affine:
      params[("blocks", i, "mixer", "g_norm", "scale")] = np.ones((c.value_dim,), np.float32)
  return params
