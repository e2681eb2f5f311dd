"""Per-device memory of one GSA layer's op, forward + backward, with the sequence split over n devices: XLA's
compiled memory analysis of `context_parallel_gsa` (nothing is run or allocated). Prints a markdown table.

    python benchmarks/context_parallel_memory.py --cpu-devices 8          # 8 fake CPU devices, backend chunked
    python benchmarks/context_parallel_memory.py --preset gsa_1p3b --lengths 16384,65536 --shards 1,2,4

One row (B = 1) at the preset's head sizes, inputs in --dtype, the gradients of q, k, v, s, g. "temp" is the
scratch XLA assigns a device, "arguments" the inputs' shard; "x n / n = 1" is n devices' total against one device
(1.0: nothing duplicated). Only the op: the layer's projections and the rest of a train step are not included.
"""

from __future__ import annotations

import argparse
import os


def parse(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="gsa_340m")
  parser.add_argument("--lengths", default="16384,65536,262144", help="comma-separated T")
  parser.add_argument("--shards", default="1,2,4,8", help="comma-separated n, the devices along the sequence")
  parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  parser.add_argument("--backend", default="auto")
  parser.add_argument("--cpu-devices", type=int, default=0,
                      help="run on this many fake CPU devices (set before JAX starts); 0: the real devices")
  return parser.parse_args(argv)


def measure(preset: str, t: int, n: int, dtype: str, backend: str) -> tuple[int, int]:
  """(temp bytes, argument bytes) per device for the op's forward + backward on n sequence shards."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: PLC0415

  from gsa_jax.models import PRESETS  # noqa: PLC0415
  from gsa_jax.ops import context_parallel_gsa  # noqa: PLC0415

  cfg = PRESETS[preset]()
  hq, h, m = cfg.num_heads, cfg.resolved_num_kv_heads, cfg.num_slots
  dk, dv = cfg.key_dim // cfg.num_heads, cfg.value_dim // cfg.num_heads
  mesh = jax.make_mesh((n,), ("sequence",), devices=jax.devices()[:n])
  laid = lambda heads, width: jax.ShapeDtypeStruct((1, t, heads, width), jnp.dtype(dtype),
                                                   sharding=NamedSharding(mesh, P(None, "sequence")))
  args = (laid(hq, dk), laid(h, dk), laid(h, dv), laid(h, m), laid(h, m))

  def loss(args):
    o, _ = context_parallel_gsa(*args, axis_name="sequence", scale=1.0, chunk_size=cfg.chunk_size, backend=backend)
    return jnp.sum(o.astype(jnp.float32))

  with jax.set_mesh(mesh):
    analysis = jax.jit(jax.grad(loss)).lower(args).compile().memory_analysis()
  return analysis.temp_size_in_bytes, analysis.argument_size_in_bytes


def main(argv=None):
  args = parse(argv)
  if args.cpu_devices:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.cpu_devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # noqa: PLC0415

  ints = lambda text: [int(x) for x in text.split(",")]
  shards = ints(args.shards)
  print(f"{args.preset}, one row, {args.dtype}, backend {args.backend}, on {jax.devices()[0].device_kind}; "
        "per-device MiB from XLA's memory analysis of the op's forward + backward.\n")
  print("| T | n | temp | arguments | x n / n = 1 |\n|---|---|---|---|---|")
  for t in ints(args.lengths):
    single = None
    for n in shards:
      temp, arguments = measure(args.preset, t, n, args.dtype, args.backend)
      single = single or (temp + arguments if n == 1 else None)
      ratio = f"{n * (temp + arguments) / single:.2f}" if single else "n/a"
      print(f"| {t:,} | {n} | {temp / 2**20:,.0f} | {arguments / 2**20:,.0f} | {ratio} |", flush=True)


if __name__ == "__main__":
  main()
