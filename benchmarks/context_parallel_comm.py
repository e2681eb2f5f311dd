"""Bytes a device exchanges per training step with the sequence split over n devices: GSA's context parallelism
(`gsa_jax.ops.context_parallel`) against ring attention's key/value traffic at the same T. A formula, not a
measurement; prints a markdown table (docs/context_parallel.md).

    python benchmarks/context_parallel_comm.py                         # gsa_1p3b, T = 16K..1M, n = 2, 4, 8
    python benchmarks/context_parallel_comm.py --preset gsa_340m --lengths 65536 --shards 4,16

Per layer and device, with S the bytes of one shard's summary (its state map: hk [H, K, M], hv [H, M, V] and
the gate product [H, M] in float32, and two int32 segment ids; taken from `shard_summary`'s output shapes, so it is
what the all_gather moves):
  GSA forward: an all_gather receives the n - 1 other summaries: (n - 1) * S.
  GSA backward: its transpose, a reduce-scatter of the float32 part S_f: (n - 1) * S_f.
  Ring attention forward: each device's K and V blocks (T / n tokens, `--kv-dim` each, bfloat16) pass around the
    ring: (n - 1) * (T / n) * 2 * kv_dim * 2 bytes.
  Ring attention backward (as Liu et al.'s ring attention): the K and V blocks pass around again and their
    gradients dK, dV (float32 accumulators) with them: (n - 1) * (T / n) * 2 * kv_dim * (2 + 4) bytes.
Both are per row of the batch (B = 1); multiply by the rows a device holds. The prefill of a prompt is the
forward alone. Not counted: what both share (the data-parallel gradient reduction), the final state's psum (only
with output_final_state; one state), and a hybrid's attention layers.
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp

from gsa_jax.models import PRESETS
from gsa_jax.ops.context_parallel import shard_summary


def summary_bytes(h: int, dk: int, dv: int, m: int) -> tuple[int, int]:
  """(all bytes, float bytes) of one row's shard summary, from the shapes `shard_summary` returns."""
  one = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  out = jax.eval_shape(shard_summary, one(1, 1, h, dk), one(1, 1, h, dv), one(1, 1, h, m), one(1, 1, h, m),
                       jax.ShapeDtypeStruct((1, 1), jnp.int32))
  size = lambda x: math.prod(x.shape) * x.dtype.itemsize
  leaves = jax.tree.leaves(out)
  return sum(map(size, leaves)), sum(size(x) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating))


def step_bytes(t: int, n: int, layers: int, summary: tuple[int, int], kv_dim: int) -> tuple[int, int]:
  """(GSA context parallel, ring attention) bytes one device exchanges in a forward + backward, one row."""
  s_all, s_float = summary
  gsa = layers * (n - 1) * (s_all + s_float)
  ring = layers * (n - 1) * (t // n) * 2 * kv_dim * (2 + 2 + 4)
  return gsa, ring


def human(x: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if x < 1024 or unit == "TiB":
      return f"{x:.3g} {unit}"
    x /= 1024
  raise AssertionError


def table(preset: str, lengths, shards, kv_dim: int | None) -> str:
  cfg = PRESETS[preset]()
  h, m = cfg.resolved_num_kv_heads, cfg.num_slots
  dk, dv = cfg.key_dim // cfg.num_heads, cfg.value_dim // cfg.num_heads
  kv_dim = cfg.hidden_size if kv_dim is None else kv_dim
  summary = summary_bytes(h, dk, dv, m)
  lines = [f"{preset}: {cfg.num_layers} layers, H = {h}, K = {dk}, V = {dv}, M = {m}; one shard summary "
           f"{human(summary[0])}; ring attention with kv_dim = {kv_dim} (bfloat16 K/V, float32 dK/dV). "
           "Bytes one device exchanges per forward + backward, one row.", "",
           "| T | n | GSA context parallel | ring attention | ring / GSA |", "|---|---|---|---|---|"]
  for t in lengths:
    for n in shards:
      gsa, ring = step_bytes(t, n, cfg.num_layers, summary, kv_dim)
      lines.append(f"| {t:,} | {n} | {human(gsa)} | {human(ring)} | {ring / gsa:,.0f} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="gsa_1p3b", choices=sorted(PRESETS))
  parser.add_argument("--lengths", default="16384,65536,262144,1048576", help="comma-separated T")
  parser.add_argument("--shards", default="2,4,8", help="comma-separated n, the devices along the sequence")
  parser.add_argument("--kv-dim", type=int, default=None,
                      help="ring attention's key (= value) width per token, all heads; default the model's hidden size")
  args = parser.parse_args(argv)
  ints = lambda text: [int(x) for x in text.split(",")]
  print(table(args.preset, ints(args.lengths), ints(args.shards), args.kv_dim))


if __name__ == "__main__":
  main()
