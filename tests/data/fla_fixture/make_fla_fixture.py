"""Builds the reference-library fixture of tests/test_convert.py: small random GSA models of flash-linear-attention
(0.6.0), saved as the reference saves them (config.json + model.safetensors), with their logits on fixed tokens.

    # on a GPU machine with torch, triton, transformers, safetensors, einops and the fla wheels installed:
    python -u tests/data/fla_fixture/make_fla_fixture.py OUT_DIR [--watchdog SECONDS]
    # on a CPU, with the Triton kernels replaced by the library's own PyTorch references (a dry run of the
    # mapping, not the fixture to commit):
    python -u tests/data/fla_fixture/make_fla_fixture.py OUT_DIR --cpu

For each model NAME it writes OUT_DIR/NAME.tar holding what `save_pretrained` writes (NAME/config.json, NAME/model.safetensors in float32) and
NAME/reference.npz: tokens_T (int32 [2, T]) and logits_fp32_T / logits_bf16_T (float32 [2, T, vocab]) for T = 64
(the layer's fused_recurrent path: fla uses it for T <= 64) and T = 128 (the chunk kernels), plus meta (JSON: fla,
torch and triton versions, device, patches, the Triton configs used). Extract with
`tar xf NAME.tar -C tests/data/fla_fixture/`.

Order and partial results: all models are built first and run at T = 64 (the cheap path); each is then written at
once as OUT_DIR/NAME.t64.tar (T = 64 only: not a fixture for the test, which needs both lengths). Then each model
runs at T = 128 (the chunk kernels, the slow part) and is written as OUT_DIR/NAME.tar, its NAME.t64.tar removed.
Tar files are written to a temporary name and renamed, so a killed run leaves no half-written tar. Every step
prints a timed line (flushed) to stdout and to OUT_DIR/log.txt; `faulthandler` writes a crash's traceback, a
SIGTERM's (e.g. from `timeout`) and, with --watchdog S, every thread's stack after S seconds, to OUT_DIR/log.txt.

Autotuning: fla's kernels are `triton.autotune`d (or `fla_cache_autotune`d, a subclass of Triton's Autotuner)
over up to 36 configs each, every config compiled and timed for every new key (shapes, dtypes); on a fresh machine
that takes minutes per model. fla 0.6.0 has no switch that turns it off: FLA_CACHE_MODE only reads configs from
fla/configs/{GPU}/*.json, which the wheel does not ship, and plain `triton.autotune` kernels ignore it. So unless
--full-autotune is given, this script patches Triton's `Autotuner` class (before fla is imported; it covers fla's
CachedAutotuner too) so that each tuning takes the first config of the kernel's own (pruned) list that compiles
and runs, in the library's order, and times no other. The kernels and their math are the library's; only the
tile sizes / warps / stages differ from what timing would pick, which changes float rounding (order of
summation) and nothing else, far below the test's tolerances (1e-4 fp32, 3e-2 bf16); autotuning itself picks by
timing, so its choice is not reproducible either. The configs used are listed in meta["triton_configs"].

fp32 logits are computed with TF32 off everywhere (torch matmuls, and TRITON_F32_DEFAULT=ieee for the Triton
kernels' dots), so that they are float32 results. Hybrid attention layers need flash-attn; where it is not
installed, `flash_attn_func` is replaced by torch's scaled_dot_product_attention (same math), and meta says so.
"""

from __future__ import annotations

import argparse
import copy
import faulthandler
import io
import json
import os
import signal
import sys
import tarfile
import tempfile
import time

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


TRITON_CONFIGS: list[str] = []  # "kernel key -> config" for each tuning the patch below made


def patch_autotune_first_config() -> None:
  """Makes every Triton autotuning take the first config of the kernel's (pruned) list that compiles and runs,
  without timing the others (see the module docstring). Patches the Autotuner class, so it must run before fla
  builds its kernels (i.e. before fla is imported); it covers fla's CachedAutotuner, a subclass."""
  from triton.runtime.autotuner import Autotuner

  prune, bench = Autotuner.prune_configs, Autotuner._bench

  def prune_configs(self, *args, **kwargs):
    self._fixture_picked = False
    return prune(self, *args, **kwargs)

  def _bench(self, *args, config, **meta):
    if getattr(self, "_fixture_picked", False):
      return [float("inf")] * 3  # a config was already found for this tuning: not compiled, never chosen
    t0 = time.time()
    r = bench(self, *args, config=config, **meta)
    ok = all(x != float("inf") for x in (r if isinstance(r, (list, tuple)) else [r]))
    fn = getattr(self, "base_fn", None) or self.fn
    while not hasattr(fn, "__name__") and hasattr(fn, "fn"):
      fn = fn.fn
    name = getattr(fn, "__name__", repr(fn))
    if ok:
      self._fixture_picked = True
      TRITON_CONFIGS.append(f"{name}: {config}")
    print(f"    [triton] {name}: {'took' if ok else 'rejected'} {config} ({time.time() - t0:.1f}s)", flush=True)
    return r

  Autotuner.prune_configs = prune_configs
  Autotuner._bench = _bench


class Tee:
  """Writes to a stream and to the log file, flushing both."""

  def __init__(self, stream, log):
    self.stream, self.log = stream, log

  def write(self, x):
    self.stream.write(x)
    self.stream.flush()
    self.log.write(x)
    self.log.flush()
    return len(x)

  def flush(self):
    self.stream.flush()
    self.log.flush()

  def isatty(self):
    return False

  def fileno(self):
    return self.stream.fileno()


T0 = time.time()


def log(msg: str) -> None:
  print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def write_tar(path: str, name: str, files: dict[str, bytes]) -> None:
  tmp = path + ".tmp"
  with tarfile.open(tmp, "w") as tar:
    for fname, data in files.items():
      info = tarfile.TarInfo(f"{name}/{fname}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  os.replace(tmp, path)


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
  ap.add_argument("--full-autotune", action="store_true",
                  help="let Triton time every config (minutes per model on a fresh machine) instead of taking the "
                       "first that compiles")
  ap.add_argument("--watchdog", type=float, default=0,
                  help="after this many seconds, write every thread's stack to OUT_DIR/log.txt (0: off)")
  a = ap.parse_args()
  os.makedirs(a.out_dir, exist_ok=True)
  logf = open(os.path.join(a.out_dir, "log.txt"), "a", buffering=1)
  sys.stdout, sys.stderr = Tee(sys.stdout, logf), Tee(sys.stderr, logf)
  faulthandler.enable(file=logf, all_threads=True)
  if hasattr(signal, "SIGTERM"):
    faulthandler.register(signal.SIGTERM, file=logf, all_threads=True, chain=True)
  if a.watchdog > 0:
    faulthandler.dump_traceback_later(a.watchdog, file=logf)
  log(f"start: {' '.join(sys.argv)}; python {sys.version.split()[0]}")

  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  torch.set_float32_matmul_precision("highest")
  patches: list[str] = []
  autotune = "triton autotune over all configs"
  if not a.cpu and not a.full_autotune:
    patch_autotune_first_config()
    autotune = "first config of each kernel's list that compiles and runs (Autotuner patched, nothing timed)"
  log(f"autotune: {autotune if not a.cpu else 'n/a (--cpu)'}; importing fla")
  import fla
  import transformers
  from fla.models import GSAConfig, GSAForCausalLM

  if a.cpu:
    patch_for_cpu(patches)
  patch_flash_attn(patches)
  device = "cpu" if a.cpu else "cuda"
  device_name = "cpu" if a.cpu else str(torch.cuda.get_device_name(0))
  log(f"fla {getattr(fla, '__version__', '?')}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"device {device_name}")
  names = [n for n in a.only.split(",") if n] or list(MODELS)

  # Build every model, save it as the reference does, and draw its tokens.
  state = {}
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
    state[name] = dict(model=model, model_bf16=copy.deepcopy(model).to(torch.bfloat16), files=files, arrays=arrays)
    log(f"{name}: built and saved ({', '.join(f'{k} {len(v)} B' for k, v in files.items())})")

  def run(name: str, t: int) -> None:
    st = state[name]
    tokens = torch.from_numpy(st["arrays"][f"tokens_{t}"]).long().to(device)
    for key, m in (("fp32", st["model"]), ("bf16", st["model_bf16"])):
      log(f"{name}: forward {key} T={t} ...")
      t0 = time.time()
      with torch.no_grad():
        st["arrays"][f"logits_{key}_{t}"] = m(tokens).logits.float().cpu().numpy()
      log(f"{name}: forward {key} T={t} done in {time.time() - t0:.1f}s")

  def save(name: str, lengths: tuple[int, ...]) -> str:
    st = state[name]
    meta = {"fla": getattr(fla, "__version__", "?"), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": device_name, "patches": patches,
            "TRITON_F32_DEFAULT": os.environ.get("TRITON_F32_DEFAULT"), "model": name, "config": MODELS[name],
            "lengths": list(lengths), "autotune": autotune if not a.cpu else None,
            "triton_configs": list(TRITON_CONFIGS)}
    try:
      import triton
      meta["triton"] = triton.__version__
    except ImportError:
      pass
    arrays = {k: v for k, v in st["arrays"].items() if int(k.rsplit("_", 1)[1]) in lengths}
    arrays["meta"] = np.array(json.dumps(meta))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    files = dict(st["files"], **{"reference.npz": buf.getvalue()})
    full = tuple(lengths) == tuple(LENGTHS)
    path = os.path.join(a.out_dir, f"{name}.tar" if full else f"{name}.t{'_'.join(map(str, lengths))}.tar")
    write_tar(path, name, files)
    finite = all(np.isfinite(v).all() for k, v in arrays.items() if k.startswith("logits"))
    t = lengths[-1]
    f32, b16 = arrays[f"logits_fp32_{t}"], arrays[f"logits_bf16_{t}"]
    log(f"{name}: wrote {path} ({sum(len(d) for d in files.values()) / 1e6:.2f} MB), logits finite: {finite}, "
        f"fp32 vs bf16 rel diff (T={t}): {np.linalg.norm(f32 - b16) / np.linalg.norm(f32):.2e}")
    return path

  # The cheap path first (T = 64: fused_recurrent), for every model; then the chunk kernels (T = 128).
  short, rest = LENGTHS[:1], LENGTHS[1:]
  for name in names:
    t0 = time.time()
    for t in short:
      run(name, t)
    save(name, short)
    log(f"{name}: T={short} in {time.time() - t0:.1f}s")
  for name in names:
    t0 = time.time()
    for t in rest:
      run(name, t)
    save(name, LENGTHS)
    partial = os.path.join(a.out_dir, f"{name}.t{'_'.join(map(str, short))}.tar")
    if os.path.exists(partial):
      os.remove(partial)
    log(f"{name}: T={rest} in {time.time() - t0:.1f}s; done")
  log(f"all done; patches: {patches}")
  if a.watchdog > 0:
    faulthandler.cancel_dump_traceback_later()
  return 0


if __name__ == "__main__":
  sys.exit(main())
