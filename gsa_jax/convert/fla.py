"""The reference library's GSA checkpoints (flash-linear-attention 0.6.0, `GSAForCausalLM`) <-> our GSALM.

What the reference model computes, read from fla 0.6.0 (`fla/models/gsa`, `fla/layers/gsa.py`, `fla/layers/attn.py`,
`fla/modules`), and how each piece maps here:
- embeddings `model.embeddings.weight [V, D]` = `embed.embedding`; `lm_head.weight [V, D]` = `lm_head.kernel`.T
  (absent from the file when `tie_word_embeddings`: the head is the embedding, as our `tie_embeddings`).
- blocks: pre-norm `attn_norm` / `mlp_norm` RMSNorms with `norm_eps` = `mixer_norm` / `mlp_norm` scales; the final
  `model.norm` = `norm`. GatedMLP (swish) = SwiGLU, `intermediate_size` or 256 * ceil(int(D * hidden_ratio * 2/3)
  / 256), the rule of `GSAConfig.resolved_intermediate_size`.
- GSA layer: q/k/v/f/o projections `[out, in]` = our kernels `[in, out]` transposed; feature map swish/relu on q, k
  (t2r: `feature_map.layer.weight`, no bias, = `t2r.kernel`.T); silu on v; f = logsigmoid(x W_f) /
  gate_logit_normalizer, s = 1 - exp(f); op with scale 1; grouped kv heads repeated as `(h g)` (query head hq reads
  kv head hq // g, as our op); short convolutions `q_conv1d.weight [C, 1, W]` (nn.Conv1d, causal: tap W-1 is the
  current token) = our `q_conv.weight [W, C]`, no bias, silu. The output norm `g_norm` is applied through
  `rms_norm_linear` without its eps, so it uses 1e-5 whatever `norm_eps` is: converted models set
  `output_norm_eps=1e-5`. `g_norm` is sized `hidden_size`, so the reference needs expand_v = 1 when
  elementwise_affine.
- hybrid `attn` layers (fla `Attention`): q/k/v/o projections, head width D / num_heads, RoPE rotate-half with
  `rope_theta`, causal softmax with scale dh^-0.5 = our CausalSelfAttention. Not supported (refused): qkv_bias,
  window_size, several attn specs with different head counts or rope_theta.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from gsa_jax.convert.io import ConversionError, check_known_keys, check_same_keys
from gsa_jax.models import GSAConfig

REFERENCE_OUTPUT_NORM_EPS = 1e-5  # fla 0.6.0's rms_norm_linear default, used by the GSA layer's g_norm

# Config keys read into GSAConfig.
_MAPPED = {"vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "num_kv_heads", "num_slots", "expand_k",
           "expand_v", "exapnd_k", "exapnd_v", "feature_map", "use_short_conv", "conv_size", "gate_logit_normalizer",
           "hidden_ratio", "intermediate_size", "norm_eps", "elementwise_affine", "tie_word_embeddings", "attn",
           "initializer_range", "hidden_act", "attnres_block_size", "model_type"}
# Config keys the reference GSA model stores but that do not change what it computes from given weights: the
# reference layer does not read them (clamp_min/max, use_output_gate, use_norm), they pick kernels or fusions
# (fuse_*, attn_mode), shape the training loss (use_l2warp), size a cache (max_position_embeddings, use_cache), or
# are Hugging Face bookkeeping and token ids. They are accepted and kept for the way back.
_NO_EFFECT = {"clamp_min", "clamp_max", "use_output_gate", "use_norm", "fuse_norm", "fuse_swiglu",
              "fuse_cross_entropy", "fuse_linear_cross_entropy", "use_l2warp", "attn_mode", "max_position_embeddings",
              "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "architectures", "transformers_version",
              "torch_dtype", "dtype", "auto_map", "return_dict", "output_hidden_states", "output_attentions",
              "torchscript", "use_return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
              "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder", "pruned_heads",
              "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "id2label", "label2id",
              "problem_type", "task_specific_params", "finetuning_task", "_name_or_path", "keys_to_ignore_at_inference",
              "_attn_implementation_autoset", "name_or_path"}


def _attn_spec(attn: Any, num_layers: int) -> tuple[tuple[int, ...], int | None, int | None, float]:
  """(layers, num_heads, num_kv_heads, rope_theta) of the reference's `attn` config; refuses what we lack."""
  if attn is None:
    return (), None, None, 10000.0
  specs = [attn] if isinstance(attn, dict) else list(attn)
  problems, layers = [], []
  for spec in specs:
    if not isinstance(spec, dict) or "layers" not in spec or "num_heads" not in spec:
      raise ConversionError(f"config.attn: every spec needs 'layers' and 'num_heads'; got {spec!r}.")
    unknown = set(spec) - {"layers", "num_heads", "num_kv_heads", "qkv_bias", "window_size", "rope_theta"}
    if unknown:
      problems.append(f"attn has unknown keys {sorted(unknown)}")
    if spec.get("qkv_bias"):
      problems.append("attn.qkv_bias=True (our attention layers have no biases)")
    if spec.get("window_size") is not None:
      problems.append(f"attn.window_size={spec['window_size']} (sliding-window attention is not implemented)")
    layers += list(spec["layers"])
  keys = {(s["num_heads"], s.get("num_kv_heads") or s["num_heads"], float(s.get("rope_theta", 10000.0)))
          for s in specs}
  if len(keys) > 1:
    problems.append(f"attn specs with different (num_heads, num_kv_heads, rope_theta): {sorted(keys)} (we have one "
                    "setting for all attention layers)")
  if problems:
    raise ConversionError("unsupported options in the reference config: " + "; ".join(problems) + ".")
  heads, kv_heads, theta = next(iter(keys))
  return tuple(sorted(int(i) for i in layers)), int(heads), int(kv_heads), theta


def config_from_fla(cfg: dict[str, Any], *, ignore_keys: tuple[str, ...] = ()) -> GSAConfig:
  """Our GSAConfig of a reference config.json; unknown keys and unsupported options raise ConversionError."""
  if cfg.get("model_type", "gsa") != "gsa":
    raise ConversionError(f"config.json has model_type={cfg.get('model_type')!r}; from-fla converts 'gsa' models "
                          "(for a Llama/Mistral checkpoint use from-llama).")
  check_known_keys(cfg, _MAPPED | _NO_EFFECT, ignore_keys, "the reference library ignores them")
  problems = []
  if cfg.get("hidden_act", "swish") not in ("swish", "silu"):
    problems.append(f"hidden_act={cfg['hidden_act']!r} (only swish)")
  if cfg.get("attnres_block_size") is not None:
    problems.append(f"attnres_block_size={cfg['attnres_block_size']} (attention residuals are not implemented)")
  gln = cfg.get("gate_logit_normalizer", 8)
  if not isinstance(gln, (int, float)) or gln <= 0:
    problems.append(f"gate_logit_normalizer={gln!r} (must be a positive number)")
  if problems:
    raise ConversionError("unsupported options in the reference config: " + "; ".join(problems) + ".")
  hidden, heads = int(cfg.get("hidden_size", 2048)), int(cfg.get("num_heads", 4))
  expand_k = float(cfg.get("expand_k", cfg.get("exapnd_k", 1)))
  expand_v = float(cfg.get("expand_v", cfg.get("exapnd_v", 1)))
  for name, e in (("expand_k", expand_k), ("expand_v", expand_v)):
    if not math.isclose(hidden * e, round(hidden * e)):
      raise ConversionError(f"config.json: hidden_size * {name} = {hidden * e} is not an integer.")
  num_slots = cfg.get("num_slots", 64)  # the config's default; an explicit null means the layer's default:
  if num_slots is None:  # the head key width
    num_slots = round(hidden * expand_k) // heads
  num_layers = int(cfg.get("num_hidden_layers", 24))
  attn_layers, attn_heads, attn_kv, theta = _attn_spec(cfg.get("attn"), num_layers)
  try:
    return GSAConfig(
        vocab_size=int(cfg.get("vocab_size", 32000)), hidden_size=hidden, num_layers=num_layers, num_heads=heads,
        num_kv_heads=cfg.get("num_kv_heads"), num_slots=int(num_slots), expand_k=expand_k, expand_v=expand_v,
        feature_map=cfg.get("feature_map", "swish"), use_short_conv=bool(cfg.get("use_short_conv", False)),
        conv_size=int(cfg.get("conv_size", 4)), gate_logit_normalizer=float(gln),
        intermediate_size=cfg.get("intermediate_size"), hidden_ratio=int(cfg.get("hidden_ratio") or 4),
        norm_eps=float(cfg.get("norm_eps", 1e-6)), output_norm_eps=REFERENCE_OUTPUT_NORM_EPS,
        elementwise_affine=bool(cfg.get("elementwise_affine", True)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), attn_layers=attn_layers,
        attn_num_heads=attn_heads, attn_num_kv_heads=attn_kv, rope_theta=theta,
        embed_init_std=float(cfg.get("initializer_range", 0.02)))
  except ValueError as e:
    raise ConversionError(f"the reference config gives an invalid model: {e}") from None


def config_to_fla(c: GSAConfig, base: dict[str, Any] | None = None) -> dict[str, Any]:
  """The reference config.json of our GSAConfig; `base` (the original config, if any) keeps its other keys.

  Raises ConversionError for what the reference cannot represent.
  """
  problems = []
  if not c.forget_gate:
    problems.append("forget_gate=False")
  if c.slot_control != "gsa":
    problems.append(f"slot_control={c.slot_control!r} (the reference's GSA model has GSA's gates only)")
  if c.use_rope:
    problems.append("use_rope=True on GSA layers")
  eps = c.norm_eps if c.output_norm_eps is None else c.output_norm_eps
  if not math.isclose(eps, REFERENCE_OUTPUT_NORM_EPS, rel_tol=1e-9):
    problems.append(f"the GSA output norm's eps is {eps} (the reference always uses {REFERENCE_OUTPUT_NORM_EPS}): "
                    "train with --config.model.output_norm_eps=1e-5 (the default of configs/base.py), or set "
                    '"output_norm_eps": 1e-05 under "model" in the run\'s config.json to export this model with the '
                    "reference's eps (its outputs then change slightly)")
  if c.elementwise_affine and c.value_dim != c.hidden_size:
    problems.append(f"expand_v={c.expand_v} with elementwise_affine (the reference sizes g_norm hidden_size)")
  if problems:
    raise ConversionError("the reference library cannot represent: " + "; ".join(problems) + ".")
  out = dict(base or {})
  for key in ("exapnd_k", "exapnd_v"):
    out.pop(key, None)
  out.update({
      "model_type": "gsa", "architectures": ["GSAForCausalLM"], "vocab_size": c.vocab_size,
      "hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers, "num_heads": c.num_heads,
      "num_kv_heads": c.num_kv_heads, "num_slots": c.num_slots, "expand_k": c.expand_k, "expand_v": c.expand_v,
      "feature_map": c.feature_map, "use_short_conv": c.use_short_conv, "conv_size": c.conv_size,
      "gate_logit_normalizer": c.gate_logit_normalizer, "intermediate_size": c.resolved_intermediate_size,
      "hidden_ratio": c.hidden_ratio, "hidden_act": "swish", "norm_eps": c.norm_eps,
      "elementwise_affine": c.elementwise_affine, "tie_word_embeddings": c.tie_embeddings,
      "initializer_range": c.embed_init_std,
      "attn": ({"layers": list(c.attn_layers), "num_heads": c.resolved_attn_num_heads,
                "num_kv_heads": c.resolved_attn_num_kv_heads, "qkv_bias": False, "window_size": None,
                "rope_theta": c.rope_theta} if c.attn_layers else None),
  })
  return out


# -- parameters ----------------------------------------------------------------------------------------------------

_T = lambda a: np.ascontiguousarray(a.T)
_ID = lambda a: a


def _conv_to_ours(a):  # [C, 1, W] -> [W, C]
  if a.ndim != 3 or a.shape[1] != 1:
    raise ConversionError(f"a short-convolution weight must be [C, 1, W]; got {a.shape}.")
  return np.ascontiguousarray(a[:, 0, :].T)


def _conv_to_fla(a):  # [W, C] -> [C, 1, W]
  return np.ascontiguousarray(a.T[:, None, :])


def param_map(c: GSAConfig) -> list[tuple[str, tuple, Callable, Callable]]:
  """[(reference name, our path, to ours, to reference)] for every parameter of the model `c`."""
  rows = [("model.embeddings.weight", ("embed", "embedding"), _ID, _ID),
          ("model.norm.weight", ("norm", "scale"), _ID, _ID)]
  if not c.tie_embeddings:
    rows.append(("lm_head.weight", ("lm_head", "kernel"), _T, _T))
  for i in range(c.num_layers):
    f, o = f"model.layers.{i}.", ("blocks", i)
    rows += [(f + "attn_norm.weight", o + ("mixer_norm", "scale"), _ID, _ID),
             (f + "mlp_norm.weight", o + ("mlp_norm", "scale"), _ID, _ID)]
    rows += [(f + f"mlp.{p}.weight", o + ("mlp", p, "kernel"), _T, _T) for p in ("gate_proj", "up_proj", "down_proj")]
    projections = ("q_proj", "k_proj", "v_proj", "o_proj") if i in c.attn_layers else (
        "q_proj", "k_proj", "v_proj", "f_proj", "o_proj")
    rows += [(f + f"attn.{p}.weight", o + ("mixer", p, "kernel"), _T, _T) for p in projections]
    if i in c.attn_layers:
      continue
    if c.feature_map == "t2r":
      rows.append((f + "attn.feature_map.layer.weight", o + ("mixer", "t2r", "kernel"), _T, _T))
    if c.use_short_conv:
      rows += [(f + f"attn.{x}_conv1d.weight", o + ("mixer", f"{x}_conv", "weight"), _conv_to_ours, _conv_to_fla)
               for x in "qkv"]
    if c.elementwise_affine:
      rows.append((f + "attn.g_norm.weight", o + ("mixer", "g_norm", "scale"), _ID, _ID))
  return rows


def params_from_fla(c: GSAConfig, tensors: dict[str, np.ndarray]) -> dict[tuple, np.ndarray]:
  """Our parameters {path: array} from the reference's tensors; missing or unexpected names raise, listed."""
  tensors = dict(tensors)
  if c.tie_embeddings and "lm_head.weight" in tensors:
    # Some savers write the tied head anyway; it must then be the embedding itself.
    head = tensors.pop("lm_head.weight")
    if not np.array_equal(head, tensors.get("model.embeddings.weight")):
      raise ConversionError("tie_word_embeddings is true but lm_head.weight differs from model.embeddings.weight.")
  rows = param_map(c)
  check_same_keys(set(tensors), {r[0] for r in rows}, what="tensors of the reference checkpoint")
  return {ours: to_ours(np.asarray(tensors[name])) for name, ours, to_ours, _ in rows}


def params_to_fla(c: GSAConfig, params: dict[tuple, np.ndarray], dtype) -> dict[str, np.ndarray]:
  rows = param_map(c)
  check_same_keys(set(params), {r[1] for r in rows}, what="parameters of our model",
                  ours_name="in the run's checkpoint", theirs_name="mapped")
  return {name: to_fla(np.asarray(params[ours])).astype(dtype) for name, ours, _, to_fla in rows}
