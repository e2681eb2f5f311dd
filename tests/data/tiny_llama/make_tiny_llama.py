"""Writes the tiny random Llama checkpoint of tests/test_convert.py (the T2R converter's input), with transformers.

    python tests/data/tiny_llama/make_tiny_llama.py tests/data/tiny_llama

Needs torch and transformers (not dependencies of gsa_jax: run it in a throwaway environment). The files it wrote
(config.json, model.safetensors, tokens.npy, logits.npy) are committed, so the tests need neither.
"""

import os
import sys

import numpy as np
import torch
import transformers


def main(out_dir: str) -> None:
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=256)
  model = transformers.LlamaForCausalLM(config).to(torch.float32)
  with torch.no_grad():  # non-trivial norm scales, so that a test can tell them from a fresh init
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1 + 0.1 * torch.randn_like(p))
  model.save_pretrained(out_dir, safe_serialization=True)
  # The Transformer's logits on fixed tokens: a GSA model converted with every layer kept as softmax attention
  # (--attn-layers 0,1) must reproduce them.
  tokens = torch.arange(24).reshape(2, 12) * 5 % config.vocab_size
  with torch.no_grad():
    logits = model(tokens).logits.float().numpy()
  np.save(os.path.join(out_dir, "tokens.npy"), tokens.numpy().astype(np.int32))
  np.save(os.path.join(out_dir, "logits.npy"), logits)
  print(f"wrote {os.listdir(out_dir)} with transformers {transformers.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__)))
