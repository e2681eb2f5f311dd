"""What tests, benchmarks and `gsa_jax.ops.check` share to exercise the op: random inputs, relative errors, outputs
and gradients for a random cotangent, and a timer.

It is part of the package (not of tests/ or benchmarks/, which the package must not import) so that all three can
import it; nothing else in the library does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gsa_jax.ops.api import gated_slot_attention
from gsa_jax.ops.common import GSAState

# Interpreted kernels are large programs; the CPU compiler's cheap mode halves their compile time.
FAST_CPU_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
GATES = ("logsigmoid", "zero", "very_negative", "mixed")
FEATURE_MAPS = (None, "swish")


def make_inputs(seed, *, b=2, t=40, hq=2, h=2, dk=16, dv=16, m=8, normalizer=8.0, gate="logsigmoid",
                feature_map=None, with_state=False, dtype=jnp.float32):
  """Random inputs as the layer makes them (g = logsigmoid(x) / normalizer, s = 1 - exp(g)).

  q [b, t, hq, dk], k [b, t, h, dk], v [b, t, h, dv], s, g [b, t, h, m]; with_state: also
  initial_state = (hk [b, h, dk, m], hv [b, h, m, dv]).
  gate: "logsigmoid" (the layer's recipe), "zero" (g = 0 exactly), "very_negative" (g = -1e3), or "mixed"
  (each entry one of 0, -1e3, or the layer's recipe). For the extreme gates s is drawn independently, since the
  tied s = 1 - exp(g) would be 0 or 1 everywhere.
  feature_map: None (q, k standard normal) or "swish" (q, k = swish(standard normal), the layer's default feature
  map: the benchmarks' anchor recipe).
  Returns a dict of numpy float64 arrays (already rounded through `dtype`), so that references see exactly the
  values the tested backend sees.
  """
  if gate not in GATES:
    raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
  if feature_map not in FEATURE_MAPS:
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
  rng = np.random.default_rng(seed)
  x = {
      "q": rng.standard_normal((b, t, hq, dk)),
      "k": rng.standard_normal((b, t, h, dk)),
      "v": rng.standard_normal((b, t, h, dv)),
  }
  if feature_map == "swish":
    x["q"], x["k"] = (a / (1.0 + np.exp(-a)) for a in (x["q"], x["k"]))
  g = np.log(1.0 / (1.0 + np.exp(-rng.standard_normal((b, t, h, m))))) / normalizer
  s = 1.0 - np.exp(g)
  if gate != "logsigmoid":
    s = rng.uniform(0.0, 1.0, (b, t, h, m))
    if gate == "zero":
      g = np.zeros_like(g)
    elif gate == "very_negative":
      g = np.full_like(g, -1e3)
    else:  # mixed
      g = np.choose(rng.integers(0, 3, g.shape), [np.zeros_like(g), np.full_like(g, -1e3), g])
  x["s"], x["g"] = s, g
  if with_state:
    x["initial_state"] = (rng.standard_normal((b, h, dk, m)), rng.standard_normal((b, h, m, dv)))
  return jax.tree.map(lambda a: np.asarray(jnp.asarray(a, dtype), np.float64), x)


def anchor_inputs(b, t, h, d, m, *, dtype=jnp.bfloat16, seed=0):
  """The benchmarks' anchor problem (q, k = swish(randn), v = randn, g = logsigmoid(randn) / 8, s = 1 - exp(g),
  K = V = d, no grouped heads; run at scale 1) as jax arrays [q, k, v, s, g] in `dtype`, and a random output
  cotangent do [b, t, h, d] in `dtype`."""
  x = cast(make_inputs(seed, b=b, t=t, hq=h, h=h, dk=d, dv=d, m=m, feature_map="swish", dtype=dtype), dtype)
  do = jnp.asarray(np.random.default_rng((seed, 1)).standard_normal((b, t, h, d)), dtype)
  return [x[n] for n in "qkvsg"], do


def random_segment_ids(rng: np.random.Generator, b: int, t: int) -> np.ndarray:
  """[b, t] int32 packed documents of random lengths 1..t/2 (ids 1, 2, ...), then right padding (id 0) on odd
  rows."""
  ids = np.zeros((b, t), np.int32)
  for row in range(b):
    pos, doc = 0, 1
    end = t - (rng.integers(0, t // 4 + 1) if row % 2 else 0)
    while pos < end:
      length = int(rng.integers(1, max(2, t // 2)))
      ids[row, pos:min(end, pos + length)] = doc
      pos, doc = pos + length, doc + 1
  return ids


def cast(inputs, dtype, state_dtype=None):
  """Inputs as jax arrays: q, k, v, s, g in `dtype`, the initial state in `state_dtype` (default float32 or
  float64 to match)."""
  state_dtype = state_dtype or (jnp.float64 if dtype == jnp.float64 else jnp.float32)
  out = {name: jnp.asarray(inputs[name], dtype) for name in "qkvsg"}
  if "initial_state" in inputs:
    out["initial_state"] = tuple(jnp.asarray(x, state_dtype) for x in inputs["initial_state"])
  return out


def rel_err(x, ref) -> float:
  """Relative L2 error ||x - ref|| / ||ref||, computed in float64. An all-zero ref needs x all (near) zero."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  denom = np.linalg.norm(ref)
  num = np.linalg.norm(x - ref)
  return float(num / denom) if denom > 0 else float(num)


def _outputs_and_grads(fn, inputs, cotangent_seed, compiler_options=None, jit=False):
  """Runs fn(q, k, v, s, g, initial_state or None) -> (o, hk, hv) and its VJP for a random cotangent.

  Returns a flat dict: o, hk, hv, dq, dk, dv, ds, dg (+ dhk0, dhv0 with an initial state)."""
  names = list("qkvsg")
  has_state = "initial_state" in inputs
  args = [inputs[n] for n in names] + (list(inputs["initial_state"]) if has_state else [])
  call = lambda *a: fn(*a[:5], GSAState(*a[5:]) if has_state else None)
  rng = np.random.default_rng(cotangent_seed)
  # Rounded through bfloat16 so that every dtype under test sees exactly the same cotangent.
  cts = tuple(jnp.asarray(jnp.asarray(rng.standard_normal(x.shape), jnp.bfloat16), x.dtype)
              for x in jax.eval_shape(call, *args))

  def fwd_bwd(*args):
    outs, vjp = jax.vjp(call, *args)
    return outs, vjp(cts)

  if jit:
    outs, grads = jax.jit(fwd_bwd).lower(*args).compile(compiler_options=compiler_options)(*args)
  else:
    outs, grads = fwd_bwd(*args)
  result = dict(zip(("o", "hk", "hv"), outs))
  result.update(zip(["d" + n for n in names] + (["dhk0", "dhv0"] if has_state else []), grads))
  return result


def forward_and_grads(inputs, *, backend, cotangent_seed=0, **kw):
  """o, final state and every input gradient of `gated_slot_attention` for a random cotangent on (o, hk, hv)."""
  def fn(q, k, v, s, g, state):
    o, final = gated_slot_attention(q, k, v, s, g, initial_state=state, output_final_state=True, backend=backend,
                                    **kw)
    return o, final.hk, final.hv
  return _outputs_and_grads(fn, inputs, cotangent_seed)


def kernel_forward_and_grads(kernel, inputs, *, fast_cpu_compile, cotangent_seed=0, **kw):
  """As `forward_and_grads`, through a kernel entry point (gsa_pallas_gpu / gsa_pallas_tpu) called with **kw,
  jitted; `fast_cpu_compile` compiles with FAST_CPU_COMPILE (for interpreted kernels on CPU)."""
  def fn(q, k, v, s, g, state):
    o, final = kernel(q, k, v, s, g, initial_state=state, **kw)
    return o, final.hk, final.hv
  return _outputs_and_grads(fn, inputs, cotangent_seed, FAST_CPU_COMPILE if fast_cpu_compile else None, jit=True)


class Timing(NamedTuple):
  """sync_ms: the median of calls each synchronized from the host (what a training step sees); loop_ms: the mean of
  back-to-back calls synchronized once at the end (the device's pace without host round trips), or None."""
  sync_ms: float
  loop_ms: float | None


def time_calls(call: Callable[[], Any], repeats: int, *, warmup: int = 2, loop: bool = False,
               sync: Callable[[Any], Any] = jax.block_until_ready) -> Timing:
  """Times `call()` after `warmup` calls (the first compiles); `sync(result)` waits for the device (default
  `jax.block_until_ready`; for torch, `lambda _: torch.cuda.synchronize()`). loop: also time `repeats`
  back-to-back calls."""
  for _ in range(warmup):
    sync(call())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    sync(call())
    times.append(time.perf_counter() - start)
  loop_ms = None
  if loop:
    start = time.perf_counter()
    for _ in range(repeats):
      out = call()
    sync(out)
    loop_ms = (time.perf_counter() - start) / repeats * 1e3
  return Timing(float(np.median(times)) * 1e3, loop_ms)
