"""Builds the reference-library fixture of tests/test_convert.py: small random GSA models of flash-linear-attention
(0.6.0), saved as the reference saves them (config.json + model.safetensors), with their logits on fixed tokens.

    # on a GPU machine with torch, triton, transformers, safetensors, einops and the fla wheels installed:
    python tests/data/fla_fixture/make_fla_fixture.py OUT_DIR
    # on a CPU, with the Triton kernels replaced by the library's own PyTorch references (a dry run of the
    # mapping, not the fixture to commit):
    python tests/data/fla_fixture/make_fla_fixture.py OUT_DIR --cpu

For each model NAME it writes OUT_DIR/NAME.tar holding what `save_pretrained` writes (NAME/config.json, NAME/model.safetensors in float32) and
NAME/reference.npz: tokens_T (int32 [2, T]) and logits_fp32_T / logits_bf16_T (float32 [2, T, vocab]) for T = 64
(the layer's fused_recurrent path: fla uses it for T <= 64) and T = 128 (the chunk kernels), plus meta (JSON: fla,
torch and triton versions, device, patches). Extract with `tar xf NAME.tar -C tests/data/fla_fixture/`.

fp32 logits are computed with TF32 off everywhere (torch matmuls, and TRITON_F32_DEFAULT=ieee for the Triton
kernels' dots), so that they are float32 results. Hybrid attention layers need flash-attn; where it is not
installed, `flash_attn_func` is replaced by torch's scaled_dot_product_attention (same math), and meta says so.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import sys
import tarfile
import tempfile

os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")  # before triton is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

MODELS = {
    # GQA off, swish, learned output-norm scale, untied, the MLP width from the hidden_ratio rule.
    "mha": dict(hidden_size=64, num_hidden_layers=2, num_heads=4, num_slots=16, vocab_size=256, hidden_ratio=2,
                gate_logit_normalizer=8, norm_eps=1e-6),
    # GQA on (4 query heads over 2 kv heads), tied embeddings, no output-norm scale, relu feature map.
    "gqa": dict(hidden_size=64, num_hidden_layers=2, num_heads=4, num_kv_heads=2, num_slots=16, vocab_size=256,
                intermediate_size=128, feature_map="relu", tie_word_embeddings=True, elementwise_affine=False,
                gate_logit_normalizer=4, norm_eps=1e-5),
    # Short convolutions on q, k, v; the learned t2r feature map; slots from the default (num_slots=None -> dk).
    "conv": dict(hidden_size=64, num_hidden_layers=2, num_heads=2, num_kv_heads=1, num_slots=None, vocab_size=256,
                 intermediate_size=128, use_short_conv=True, conv_size=4, feature_map="t2r", expand_k=0.5),
    # A hybrid: layer 1 is softmax attention (RoPE, grouped kv heads).
    "hybrid": dict(hidden_size=64, num_hidden_layers=2, num_heads=4, num_slots=16, vocab_size=256,
                   intermediate_size=128,
                   attn={"layers": [1], "num_heads": 4, "num_kv_heads": 2, "rope_theta": 10000.0}),
}
LENGTHS = (64, 128)


def patch_for_cpu(patches: list[str]) -> None:
  """Replaces each Triton kernel the forward pass uses by a PyTorch equivalent (the library's own references
  where it has them)."""
  import fla.layers.gsa as gsa_layer
  import fla.modules.causal_conv1d.ops as conv_ops
  import fla.modules.feature_map as fmap
  import fla.modules.mlp as mlp
  from fla.modules.rotary import RotaryEmbedding
  from fla.modules.rotary.ops import rotary_embedding_ref
  from fla.ops.gsa.naive import naive_recurrent_gsa

  def gsa(q, k, v, s, g, initial_state=None, output_final_state=False, scale=None, cu_seqlens=None, **_):
    assert cu_seqlens is None
    return naive_recurrent_gsa(q, k, v, s, g, scale=scale, initial_state=initial_state,
                               output_final_state=output_final_state)

  def norm_linear(x, norm_weight, norm_bias, linear_weight, linear_bias, residual=None, eps=1e-5, **_):
    # eps defaults to 1e-5, as fla's rms_norm_linear: the GSA layer does not pass its norm_eps.
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if norm_weight is not None:
      y = y * norm_weight.float()
    if norm_bias is not None:
      y = y + norm_bias.float()
    return F.linear(y.to(x.dtype), linear_weight, linear_bias)

  def conv_forward(self, x, residual=None, mask=None, cache=None, output_final_state=False, cu_seqlens=None, **_):
    assert cache is None and cu_seqlens is None and residual is None and mask is None
    w = self.kernel_size[0]
    y = F.conv1d(x.transpose(1, 2), self.weight, self.bias, padding=w - 1, groups=self.hidden_size)
    y = y[..., :x.shape[1]].transpose(1, 2)
    return (F.silu(y) if self.activation else y), None

  def rotary_forward(self, q, k, seqlen_offset=0, max_seqlen=None, cu_seqlens=None, **_):
    assert cu_seqlens is None and seqlen_offset == 0
    t = torch.arange(q.shape[1], dtype=torch.float32, device=q.device)
    freqs = torch.outer(t, self._compute_inv_freq(device=q.device))
    cos, sin = freqs.cos(), freqs.sin()
    return (rotary_embedding_ref(q.float(), cos, sin).to(q.dtype), rotary_embedding_ref(k.float(), cos, sin).to(k.dtype))

  gsa_layer.fused_recurrent_gsa = gsa
  gsa_layer.chunk_gsa = gsa
  gsa_layer.rms_norm_linear = norm_linear
  conv_ops.ShortConvolution.forward = conv_forward
  fmap.swish = F.silu
  mlp.swiglu = lambda x, y: F.silu(x) * y
  RotaryEmbedding.forward = rotary_forward
  patches += ["gsa op -> fla.ops.gsa.naive.naive_recurrent_gsa", "rms_norm_linear -> torch (eps 1e-5)",
              "ShortConvolution -> torch conv1d", "swish/swiglu -> torch", "rotary -> rotary_embedding_ref",
              "fuse_norm=False, fuse_swiglu=False"]


def patch_flash_attn(patches: list[str]) -> None:
  import fla.layers.attn as attn

  if attn.flash_attn_func is not None:
    return

  def flash_attn_func(q, k, v, causal=True, window_size=(-1, -1), **_):
    assert tuple(window_size) == (-1, -1)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                       enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)

  attn.flash_attn_func = flash_attn_func
  patches.append("flash_attn_func -> torch scaled_dot_product_attention (flash-attn not installed)")


def randomize(model: torch.nn.Module, seed: int) -> None:
  """Weights of order-one activations (the reference init, normal(0.02), makes near-constant logits)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
      elif "embeddings" in name:
        p.copy_(torch.randn(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("out_dir")
  ap.add_argument("--cpu", action="store_true", help="replace the Triton kernels by PyTorch (dry run on a CPU)")
  ap.add_argument("--only", default="", help="comma-separated model names (default: all)")
  a = ap.parse_args()
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  torch.set_float32_matmul_precision("highest")
  import fla
  import transformers
  from fla.models import GSAConfig, GSAForCausalLM

  patches: list[str] = []
  if a.cpu:
    patch_for_cpu(patches)
  patch_flash_attn(patches)
  device = "cpu" if a.cpu else "cuda"
  os.makedirs(a.out_dir, exist_ok=True)
  names = [n for n in a.only.split(",") if n] or list(MODELS)
  for i, name in enumerate(names):
    kw = dict(MODELS[name])
    if "expand_k" in kw:  # the reference GSAConfig's argument is spelled `exapnd_k`
      kw["exapnd_k"] = kw.pop("expand_k")
    if a.cpu:
      kw.update(fuse_norm=False, fuse_swiglu=False)
    config = GSAConfig(**kw)
    torch.manual_seed(i)
    model = GSAForCausalLM(config)
    randomize(model, seed=100 + i)
    model = model.to(device=device, dtype=torch.float32).eval()
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
      model.save_pretrained(tmp)  # exactly what the reference writes: config.json, model.safetensors (float32)
      for fname in sorted(os.listdir(tmp)):
        with open(os.path.join(tmp, fname), "rb") as f:
          files[fname] = f.read()
    arrays = {}
    gen = torch.Generator().manual_seed(1000 + i)
    for t in LENGTHS:
      arrays[f"tokens_{t}"] = torch.randint(0, config.vocab_size, (2, t), generator=gen).numpy().astype(np.int32)
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
      for t in LENGTHS:
        tokens = torch.from_numpy(arrays[f"tokens_{t}"]).long().to(device)
        arrays[f"logits_fp32_{t}"] = model(tokens).logits.float().cpu().numpy()
        arrays[f"logits_bf16_{t}"] = model_bf16(tokens).logits.float().cpu().numpy()
    meta = {"fla": getattr(fla, "__version__", "?"), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": str(torch.cuda.get_device_name(0)) if not a.cpu
            else "cpu", "patches": patches, "TRITON_F32_DEFAULT": os.environ.get("TRITON_F32_DEFAULT"),
            "model": name, "config": MODELS[name]}
    try:
      import triton
      meta["triton"] = triton.__version__
    except ImportError:
      pass
    arrays["meta"] = np.array(json.dumps(meta))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    files["reference.npz"] = buf.getvalue()
    with tarfile.open(os.path.join(a.out_dir, f"{name}.tar"), "w") as tar:
      for fname, data in files.items():
        info = tarfile.TarInfo(f"{name}/{fname}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    finite = all(np.isfinite(v).all() for k, v in arrays.items() if k.startswith("logits"))
    print(f"{name}: {sum(len(d) for d in files.values()) / 1e6:.2f} MB, logits finite: {finite}, "
          f"fp32 vs bf16 rel diff (T=128): "
          f"{np.linalg.norm(arrays['logits_fp32_128'] - arrays['logits_bf16_128']) / np.linalg.norm(arrays['logits_fp32_128']):.2e}",
          flush=True)
  print("patches:", patches)
  return 0


if __name__ == "__main__":
  sys.exit(main())
