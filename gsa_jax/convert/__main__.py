"""Checkpoint conversion: `python -m gsa_jax.convert {from-fla,to-fla,from-llama} SRC OUT`.

    # a reference-library GSA checkpoint (flash-linear-attention, config.json + safetensors) -> a run directory
    python -m gsa_jax.convert from-fla gsa-1.3B-100B/ runs/gsa_1p3b_fla
    # a run directory (of train.py or of from-*) -> a reference checkpoint (config.json + model.safetensors)
    python -m gsa_jax.convert to-fla runs/gsa_1p3b_fla exported/ --dtype bfloat16
    # T2R: a Llama/Mistral checkpoint -> a GSA run directory to finetune (configs/t2r_mistral.py)
    python -m gsa_jax.convert from-llama Mistral-7B-v0.1/ runs/mistral_gsa_init --num-slots 64

A run directory holds config.json and checkpoints/0/state (parameters only); `python -m gsa_jax.eval
--checkpoint OUT`, `gsa_jax.run_dir.load_model(OUT)` and `train.py --config.train.init_from=OUT` read it.
The tokenizer (tokenizer.json, else tokenizer.model) of SRC is copied into OUT and named in its config; --tokenizer
names another. Every tensor name is mapped explicitly: missing or unexpected tensors, unknown config keys and
options we do not support are errors that list them. Exit codes: 0 done, 2 bad input (message on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from gsa_jax.convert.io import (BFLOAT16, ConversionError, copy_into, find_tokenizer, read_hf_config, read_run_params,
                                read_safetensors_dir, require_new_dir, write_run_dir, write_safetensors)

_DTYPES = ("float32", "bfloat16", "float16")


def _source_dtype(tensors) -> str:
  kinds = {str(np.asarray(v).dtype) for v in tensors.values()}
  return kinds.pop() if len(kinds) == 1 else "mixed"


def _ids(cfg):
  ids = [cfg.get("bos_token_id"), cfg.get("eos_token_id")]
  return [i if isinstance(i, int) else -1 for i in ids]


def from_fla(src: str, out: str, *, tokenizer: str | None = None, seq_len: int = 2048,
             ignore_keys: tuple[str, ...] = ()) -> None:
  from gsa_jax.convert import fla  # pylint: disable=import-outside-toplevel

  require_new_dir(out)  # before reading what may be gigabytes of tensors
  cfg = read_hf_config(src)
  model_cfg = fla.config_from_fla(cfg, ignore_keys=ignore_keys)
  tensors = read_safetensors_dir(src)
  params = fla.params_from_fla(model_cfg, tensors)
  _write(src, out, model_cfg, params, cfg, tokenizer, seq_len,
         {"format": "fla", "path": os.path.abspath(src), "dtype": _source_dtype(tensors), "config": cfg})


def from_llama(src: str, out: str, *, tokenizer: str | None = None, seq_len: int = 2048, num_slots: int = 64,
               gate_logit_normalizer: float = 8.0, feature_map: str = "swish", attn_layers: tuple[int, ...] = (),
               seed: int = 0, ignore_keys: tuple[str, ...] = ()) -> None:
  from gsa_jax.convert import llama  # pylint: disable=import-outside-toplevel

  require_new_dir(out)
  cfg = read_hf_config(src)
  model_cfg = llama.config_from_llama(cfg, num_slots=num_slots, gate_logit_normalizer=gate_logit_normalizer,
                                      feature_map=feature_map, attn_layers=attn_layers, ignore_keys=ignore_keys)
  tensors = read_safetensors_dir(src)
  params = llama.params_from_llama(model_cfg, tensors, seed=seed)
  _write(src, out, model_cfg, params, cfg, tokenizer, seq_len,
         {"format": "llama", "path": os.path.abspath(src), "dtype": _source_dtype(tensors), "config": cfg,
          "new_parameters": "f_proj (fan-in normal), g_norm scale (ones)" + (", t2r" if feature_map == "t2r" else "")
                            + f", seed {seed}"})


def _write(src, out, model_cfg, params, cfg, tokenizer, seq_len, source):
  """The run directory, naming `tokenizer` or else the source's own tokenizer (copied in after the run is written:
  the run directory must be new). The source config's BOS/EOS ids go with its own tokenizer only."""
  found = find_tokenizer(src) if tokenizer is None else ""
  if tokenizer is None:
    tok = os.path.abspath(os.path.join(out, os.path.basename(found))) if found else ""
    bos, eos = _ids(cfg) if found else (-1, -1)
  else:
    tok, (bos, eos) = tokenizer, (-1, -1)
  write_run_dir(out, model_cfg, params, tokenizer=tok, bos_id=bos, eos_id=eos, seq_len=seq_len, source=source)
  if found:
    copy_into(found, out)


def to_fla(src: str, out: str, *, step: int | None = None, dtype: str | None = None) -> None:
  from gsa_jax.convert import fla  # pylint: disable=import-outside-toplevel

  require_new_dir(out)
  model_cfg, params, run_config, step = read_run_params(src, step)
  source = run_config.get("converted_from") or {}
  base = source.get("config") if source.get("format") == "fla" else None
  if dtype is None:
    dtype = source.get("dtype") if source.get("dtype") in _DTYPES else "float32"
  cfg = fla.config_to_fla(model_cfg, base)
  cfg["torch_dtype"] = dtype
  tensors = fla.params_to_fla(model_cfg, params, BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype))
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
  write_safetensors(os.path.join(out, "model.safetensors"), tensors)
  tok = run_config.get("data", {}).get("tokenizer", "")
  if tok and os.path.isfile(tok):
    copy_into(tok, out)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m gsa_jax.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)

  def common_from(s):
    s.add_argument("src", help="Hugging Face checkpoint directory (config.json + model.safetensors or shards)")
    s.add_argument("out", help="new run directory to write")
    s.add_argument("--tokenizer", default=None,
                   help="tokenizer file the run names (default: SRC's tokenizer.json/tokenizer.model, copied)")
    s.add_argument("--seq-len", type=int, default=2048, help="train.seq_len of the run (eval's default length)")
    s.add_argument("--ignore-config-keys", default="",
                   help="comma-separated config.json keys to accept although the converter does not know them")

  s = sub.add_parser("from-fla", help="reference-library GSA checkpoint -> run directory")
  common_from(s)
  s = sub.add_parser("from-llama", help="Llama/Mistral checkpoint -> GSA run directory (T2R)")
  common_from(s)
  s.add_argument("--num-slots", type=int, default=64)
  s.add_argument("--gate-logit-normalizer", type=float, default=8.0)
  s.add_argument("--feature-map", choices=("swish", "relu", "t2r"), default="swish")
  s.add_argument("--attn-layers", default="", help="comma-separated layer indices that keep softmax attention")
  s.add_argument("--seed", type=int, default=0, help="seed of the new GSA parameters (slot gate projection)")
  s = sub.add_parser("to-fla", help="run directory -> reference-library checkpoint (config.json + model.safetensors)")
  s.add_argument("src", help="run directory (train.py workdir or from-* output)")
  s.add_argument("out", help="new directory to write")
  s.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  s.add_argument("--dtype", choices=_DTYPES, default=None,
                 help="tensor dtype (default: the dtype of the checkpoint it was converted from, else float32)")
  a = p.parse_args(argv)
  try:
    if a.command == "to-fla":
      to_fla(a.src, a.out, step=a.step, dtype=a.dtype)
    else:
      ignore = tuple(k for k in a.ignore_config_keys.split(",") if k)
      kw = dict(tokenizer=a.tokenizer, seq_len=a.seq_len, ignore_keys=ignore)
      if a.command == "from-fla":
        from_fla(a.src, a.out, **kw)
      else:
        try:
          layers = tuple(int(i) for i in a.attn_layers.split(",") if i.strip())
        except ValueError:
          p.error(f"--attn-layers must be comma-separated integers; got {a.attn_layers!r}")
        from_llama(a.src, a.out, num_slots=a.num_slots, gate_logit_normalizer=a.gate_logit_normalizer,
                   feature_map=a.feature_map, attn_layers=layers, seed=a.seed, **kw)
  except (ConversionError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {a.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
