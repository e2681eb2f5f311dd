"""Per-token decode latency against context length: GSA (constant-size state) vs softmax attention (KV cache).

    python benchmarks/bench_decode.py                                   # 1.3B shapes, contexts 1K..64K, batch 1
    python benchmarks/bench_decode.py --preset gsa_340m --contexts 1024,8192 --batch 8 --out /tmp/bench

Both models are `GSALM`s of one preset: "gsa" as the preset, "softmax" with every layer causal softmax attention
(RoPE, head width 128, `jax.nn.dot_product_attention`) and the same MLP, embeddings and depth (a Transformer++ of
about the same size; both parameter counts are printed). Parameters and compute are in --dtype.

What is timed: `--steps` decode steps run back to back inside one jitted `lax.fori_loop` (each step feeds its
greedy token to the next, as `gsa_jax.generate` does), after a warm-up call; the figure is the median over
--repeats of (loop time / steps). The caches are built directly in the state a prompt of `context` tokens leaves
(attention: `context` filled KV slots out of context + steps; GSA: its fixed-size state), without running the
prefill: decode cost does not depend on the cache's values. Writes bench_decode.json, bench_decode.md and, when
matplotlib is importable, bench_decode.png to --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from gsa_jax.layers import KVCache
from gsa_jax.models import GSALM, PRESETS, count_params
from gsa_jax.ops.testing import time_calls

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.profiling import print_profile_summary  # noqa: E402


def build(config):
  return GSALM(config, rngs=nnx.Rngs(0))


def cache_at_context(model: GSALM, batch: int, context: int, steps: int):
  """Caches as a prompt of `context` tokens leaves them, with room for `steps` more tokens."""
  caches = model.init_cache(batch, context + steps)
  out = []
  for c in caches:
    if isinstance(c, KVCache):
      mask = jnp.zeros_like(c.mask).at[:, :context].set(True)
      c = c._replace(mask=mask, pos=jnp.full_like(c.pos, context), index=jnp.asarray(context, jnp.int32))
    else:
      c = c._replace(pos=jnp.full_like(c.pos, context))
    out.append(c)
  return out


@functools.partial(jax.jit, static_argnums=(0, 1))
def run_steps(graphdef, steps, state, tokens, caches):
  """`steps` greedy decode steps in one executable (compiled once per model and cache shape)."""
  model = nnx.merge(graphdef, state)

  def body(_, carry):
    tok, caches = carry
    logits, caches = model.step(tok, caches)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), caches

  return jax.lax.fori_loop(0, steps, body, (tokens, caches))


def time_per_token_ms(model, batch, context, steps, repeats, profile_dir=""):
  graphdef, state = nnx.split(model)
  run = functools.partial(run_steps, graphdef, steps)
  tokens = jnp.ones((batch,), jnp.int32)
  caches = cache_at_context(model, batch, context, steps)
  ms = time_calls(lambda: run(state, tokens, caches), repeats, warmup=1).sync_ms  # the warm-up call compiles
  if profile_dir:
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
      jax.block_until_ready(run(state, tokens, caches))
    print_profile_summary(profile_dir, steps=steps, unit="token", top=40)
  cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(caches))
  return ms / steps, cache_bytes / 2**20


def plot(rows, path, title):
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed: no plot (bench_decode.json has the numbers).")
    return False
  fig, ax = plt.subplots(figsize=(6, 4))
  for name in sorted({r["model"] for r in rows}):
    pts = sorted((r["context"], r["ms_per_token"]) for r in rows if r["model"] == name and r["ms_per_token"])
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("ms per decoded token")
  ax.set_title(title, fontsize=9)
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return True


def save(out, title, args, rows):
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "bench_decode.json"), "w") as f:
    json.dump(dict(title=title, jax=jax.__version__, args=vars(args), rows=rows), f, indent=1)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="gsa_1p3b", choices=sorted(PRESETS))
  parser.add_argument("--contexts", default="1024,4096,16384,65536")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--steps", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--attn-head-dim", type=int, default=128)
  parser.add_argument("--models", default="gsa,softmax")
  parser.add_argument("--out", default=os.environ.get("OUT", "."))
  parser.add_argument("--profile", default="", help="a folder: trace each model's decode loop at the first "
                      "context there and print its device time per op (ms per token, kernels per token)")
  parser.add_argument("--plot-from", default=None, help="only plot an existing bench_decode.json")
  args = parser.parse_args()

  if args.plot_from:
    with open(args.plot_from) as f:
      saved = json.load(f)
    plot(saved["rows"], os.path.join(os.path.dirname(args.plot_from), "bench_decode.png"), saved["title"])
    return

  base = PRESETS[args.preset](dtype=args.dtype, param_dtype=args.dtype)
  configs = {
      "gsa": base,
      "softmax": base.replace(attn_layers=tuple(range(base.num_layers)),
                              attn_num_heads=base.hidden_size // args.attn_head_dim),
  }
  device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
  title = f"{args.preset} shapes, batch {args.batch}, {args.dtype}, {device}"
  print(f"device: {device}, jax {jax.__version__}; {title}; {args.steps} steps per timed loop, median of "
        f"{args.repeats}")
  rows = []
  first = int(args.contexts.split(",")[0])
  for name in args.models.split(","):
    model = build(configs[name])
    n_params = count_params(model)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"{name}: {n_params / 1e6:.1f}M parameters, {weight_bytes / 2**30:.2f} GiB of weights (a decode step reads "
          "them all once: their size over the device's copy bandwidth is the step's floor)", flush=True)
    for context in map(int, args.contexts.split(",")):
      row = dict(model=name, params=n_params, context=context, ms_per_token=None, cache_mib=None, error=None)
      try:
        profile_dir = os.path.join(args.profile, f"{name}_{context}") if args.profile and context == first else ""
        row["ms_per_token"], row["cache_mib"] = time_per_token_ms(model, args.batch, context, args.steps,
                                                                  args.repeats, profile_dir)
      except Exception as e:  # out of memory is a result here, not a crash
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
      rows.append(row)
      save(args.out, title, args, rows)  # after every row, so that a run cut short still leaves its numbers
      print(f"  context {context:>6}: " + (f"{row['ms_per_token']:.3f} ms/token, cache {row['cache_mib']:.1f} MiB"
                                           if row["error"] is None else row["error"]), flush=True)
    del model

  contexts = sorted({r["context"] for r in rows})
  names = [n for n in args.models.split(",")]
  get = lambda n, c: next(r for r in rows if r["model"] == n and r["context"] == c)
  fmt = lambda r: "failed" if r["error"] else f"{r['ms_per_token']:.3f} ({r['cache_mib']:.0f} MiB)"
  lines = [f"Decode latency, ms per token (cache size): {title}", "",
           "| context | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
  lines += [f"| {c} | " + " | ".join(fmt(get(n, c)) for n in names) + " |" for c in contexts]
  table = "\n".join(lines)
  print("\n" + table)
  with open(os.path.join(args.out, "bench_decode.md"), "w") as f:
    f.write(table + "\n")
  plot(rows, os.path.join(args.out, "bench_decode.png"), title)


if __name__ == "__main__":
  main()
