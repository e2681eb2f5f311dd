"""The public GSA op: input validation and the one place where a backend is chosen."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, PartitionSpec as P

from gsa_jax.ops.chunked import chunk_gsa
from gsa_jax.ops.common import DEFAULT_CHUNK_SIZE, GSAState, as_segment_ids, to_varying, varying_axes
from gsa_jax.ops.recurrent import recurrent_gsa

BACKENDS = ("auto", "recurrent", "chunked", "pallas_gpu", "pallas_mgpu", "pallas_tpu")

_log = logging.getLogger(__name__)


def _recurrent(q, k, v, s, g, *, scale, initial_state, segment_ids, chunk_size):
  del chunk_size  # The recurrence has no chunks.
  return recurrent_gsa(q, k, v, s, g, scale=scale, initial_state=initial_state, segment_ids=segment_ids)


# The kernel backends: the module of each (imported on first use: the kernels import this package, and an import of
# `pallas_kernels` before `gsa_jax.ops` must not meet a half-initialised module) and the backend that runs the
# inputs its kernels do not support (the module's `unsupported_reason` says which).
_KERNEL_MODULES = {"pallas_gpu": "pallas_kernels.gsa_gpu", "pallas_mgpu": "pallas_kernels.gsa_mgpu",
                   "pallas_tpu": "pallas_kernels.gsa_tpu"}
_FALLBACK = {"pallas_gpu": "chunked", "pallas_mgpu": "pallas_gpu", "pallas_tpu": "chunked"}


def _kernel_module(name: str):
  return importlib.import_module(_KERNEL_MODULES[name])


# The kernels' chunk is their own (their BlockSizes.chunk); `chunk_size` is the chunked form's, `block_sizes` the
# kernels' tiles (None: their defaults).
def _pallas_gpu(q, k, v, s, g, *, chunk_size, **kwargs):
  del chunk_size
  return _kernel_module("pallas_gpu").gsa_pallas_gpu(q, k, v, s, g, **kwargs)


def _pallas_mgpu(q, k, v, s, g, *, chunk_size, **kwargs):
  del chunk_size
  return _kernel_module("pallas_mgpu").gsa_pallas_mgpu(q, k, v, s, g, **kwargs)


def _pallas_tpu(q, k, v, s, g, *, chunk_size, **kwargs):
  del chunk_size
  return _kernel_module("pallas_tpu").gsa_pallas_tpu(q, k, v, s, g, **kwargs)


def _without_tiles(fn):
  """A reference backend takes (and ignores) the kernels' `block_sizes` too, so every backend is called alike."""
  def call(*args, block_sizes=None, **kwargs):
    del block_sizes
    return fn(*args, **kwargs)
  return call


# Implemented backends: name -> function with the signature of `chunk_gsa` plus `block_sizes`, jitted with static
# scale, chunk and tiles.
_IMPLEMENTATIONS: dict[str, Callable] = {
    name: jax.jit(fn, static_argnames=("scale", "chunk_size", "block_sizes"))
    for name, fn in (("recurrent", _without_tiles(_recurrent)), ("chunked", _without_tiles(chunk_gsa)),
                     ("pallas_gpu", _pallas_gpu), ("pallas_mgpu", _pallas_mgpu), ("pallas_tpu", _pallas_tpu))
}


def _parse_value(text: str):
  """'128' -> 128, 'true'/'false' -> bool, 'none' -> None (the string form of `kernel_block_sizes`)."""
  lowered = text.strip().lower()
  if lowered in ("true", "false"):
    return lowered == "true"
  if lowered == "none":
    return None
  try:
    return int(lowered)
  except ValueError:
    return text.strip()  # left for the kernel's BlockSizes to refuse with its own message


def parse_kernel_block_sizes(spec: str | Mapping[str, Any] | None) -> dict[str, Any]:
  """Validates the kernels' tile settings and builds each kernel backend's `BlockSizes`; the one place that does.

  `spec` is None or "" (every kernel's defaults), a string "BACKEND.FIELD=VALUE,..." (the form configs and the
  command line use, e.g. "pallas_gpu.block_k=128,pallas_gpu.num_warps=8"), or a mapping {BACKEND: that backend's
  BlockSizes, or a mapping of its fields}. BACKEND is a kernel backend (pallas_gpu, pallas_mgpu, pallas_tpu); the
  fields are those of its module's `BlockSizes` (pallas_kernels/gsa_gpu.py, gsa_mgpu.py, gsa_tpu.py), whose own
  checks judge the values. Returns {BACKEND: BlockSizes}; ValueError naming the backend and field otherwise.
  """
  if spec is None or (isinstance(spec, str) and not spec.strip()):
    return {}
  if isinstance(spec, str):
    fields: dict[str, dict[str, Any]] = {}
    for item in spec.split(","):
      key, eq, value = item.partition("=")
      backend, dot, field = key.strip().partition(".")
      if not (eq and dot and field):
        raise ValueError(f"kernel_block_sizes: {item.strip()!r} is not BACKEND.FIELD=VALUE (e.g. "
                         "'pallas_gpu.block_k=128'); separate several with commas.")
      fields.setdefault(backend, {})[field] = _parse_value(value)
    spec = fields
  if not isinstance(spec, Mapping):
    raise TypeError(f"kernel_block_sizes must be None, a 'BACKEND.FIELD=VALUE,...' string or a mapping "
                    f"{{backend: BlockSizes or {{field: value}}}}; got {type(spec).__name__}.")
  built = {}
  for backend, sizes in spec.items():
    if backend not in _KERNEL_MODULES:
      raise ValueError(f"kernel_block_sizes: {backend!r} is not a kernel backend; expected one of "
                       f"{tuple(_KERNEL_MODULES)}.")
    cls = _kernel_module(backend).BlockSizes
    if isinstance(sizes, cls):
      built[backend] = sizes
      continue
    if not isinstance(sizes, Mapping):
      raise TypeError(f"kernel_block_sizes[{backend!r}] must be a {cls.__module__}.BlockSizes or a mapping of its "
                      f"fields; got {type(sizes).__name__}.")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(sizes) - set(known))
    if unknown:
      raise ValueError(f"kernel_block_sizes: {backend} has no tile setting {unknown}; its fields are {known}.")
    try:
      built[backend] = cls(**sizes)
    except (TypeError, ValueError) as e:
      raise ValueError(f"kernel_block_sizes: {backend}: {e}") from e
  return built


def kernel_block_sizes_spec(spec: str | Mapping[str, Any] | None) -> str:
  """The canonical string of `spec` (validated): the fields that differ from each kernel's defaults, sorted; ""
  for none. Configs store this form: hashable, and it survives JSON and the command line."""
  items = []
  for backend, sizes in sorted(parse_kernel_block_sizes(spec).items()):
    default = type(sizes)()
    items += [f"{backend}.{f.name}={getattr(sizes, f.name)}" for f in dataclasses.fields(sizes)
              if getattr(sizes, f.name) != getattr(default, f.name)]
  return ",".join(items)


def check_backend(backend, field: str = "backend") -> None:
  """ValueError naming `field` unless `backend` is one of BACKENDS (the op, the layer and GSAConfig call this)."""
  if backend not in BACKENDS:
    raise ValueError(f"{field}={backend!r} is unknown; expected one of {BACKENDS}.")


def resolve_backend(backend: str, platform: str | None = None) -> str:
  """Maps 'auto' to the best implemented backend for `platform` (default: JAX's default backend)."""
  check_backend(backend)
  if backend != "auto":
    return backend
  platform = platform or jax.default_backend()
  preferred = {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu", "tpu": "pallas_tpu"}.get(platform)
  if preferred in _IMPLEMENTATIONS:
    return preferred
  if preferred is not None:
    _log_once(f"gated_slot_attention: backend='auto' on {platform} uses 'chunked' ({preferred!r} is not "
              "implemented yet).")
  return "chunked"


def select_backend(backend: str, q, k, v, s, g, segment_ids=None) -> str:
  """The backend that runs these inputs (q [b, t, hq, dk]; k [b, t, h, dk]; v [b, t, h, dv]; s, g [b, t, h, m];
  segment_ids None or [b, t]; as the implementation receives them, so per shard under shard_map).

  `resolve_backend`'s choice, or else the first backend down its fallback chain (pallas_mgpu -> pallas_gpu ->
  chunked, pallas_tpu -> chunked) whose kernels support the inputs; each fallback is logged once, with its reason.
  The kernel entry points themselves raise on inputs they do not support.
  """
  name = resolve_backend(backend)
  while name in _FALLBACK:
    reason = _kernel_module(name).unsupported_reason(q, k, v, s, g, segment_ids)
    if reason is None:
      break
    _log_once(f"gated_slot_attention: backend {name!r} does not support {reason}; using {_FALLBACK[name]!r}.")
    name = _FALLBACK[name]
  return name


@functools.cache
def _log_once(message: str) -> None:
  _log.warning(message)


def _check_float(name: str, x) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating-point array; got dtype {x.dtype}.")


def _check_shape(name: str, x, expected: tuple, legend: str) -> None:
  if tuple(x.shape) != tuple(expected):
    raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {tuple(expected)} ({legend}).")


def validate_inputs(q, k, v, s, g, *, initial_state=None, segment_ids=None, chunk_size=DEFAULT_CHUNK_SIZE,
                    scale=None) -> None:
  """Raises ValueError/TypeError naming the offending argument, its shape and the expected one."""
  for name, x, dims in (("q", q, "[B, T, HQ, K]"), ("k", k, "[B, T, H, K]"), ("v", v, "[B, T, H, V]"),
                        ("s", s, "[B, T, H, M]"), ("g", g, "[B, T, H, M]")):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(f"{name} must be an array {dims}; got {type(x).__name__}.")
    if x.ndim != 4:
      raise ValueError(f"{name} must have rank 4 {dims}; got shape {tuple(x.shape)}.")
    _check_float(name, x)
  for name, x, axis in (("q", q, "K"), ("v", v, "V"), ("s", s, "M")):
    if x.shape[3] < 1:
      raise ValueError(f"{name} has shape {tuple(x.shape)}: its last axis ({axis}) must be at least 1.")
  b, t, hq, dk = q.shape
  _, _, h, _ = k.shape
  dv, m = v.shape[3], s.shape[3]
  if t < 1:
    raise ValueError(f"q has shape {tuple(q.shape)}: the sequence length T must be at least 1.")
  _check_shape("k", k, (b, t, k.shape[2], dk), "B, T and K must match q")
  if h == 0 or hq % h:
    raise ValueError(f"q has {hq} heads and k has {h}: HQ must be a positive multiple of H (grouped-query).")
  _check_shape("v", v, (b, t, h, dv), "B, T, H must match k")
  _check_shape("s", s, (b, t, h, m), "B, T, H must match k")
  _check_shape("g", g, (b, t, h, m), "must match s")
  if initial_state is not None:
    if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
      raise TypeError("initial_state must be None or a pair (hk [B, H, K, M], hv [B, H, M, V]); got "
                      f"{type(initial_state).__name__}.")
    hk, hv = initial_state
    for name, x in (("initial_state[0] (hk)", hk), ("initial_state[1] (hv)", hv)):
      if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array; got {type(x).__name__}.")
    _check_shape("initial_state[0] (hk)", hk, (b, h, dk, m), "B, H, K, M")
    _check_shape("initial_state[1] (hv)", hv, (b, h, m, dv), "B, H, M, V")
    _check_float("initial_state[0] (hk)", hk)
    _check_float("initial_state[1] (hv)", hv)
  if segment_ids is not None:
    if not hasattr(segment_ids, "shape") or not hasattr(segment_ids, "dtype"):
      raise TypeError(f"segment_ids must be None or an int array [B, T]; got {type(segment_ids).__name__} "
                      "(wrap it in jnp.asarray).")
    _check_shape("segment_ids", segment_ids, (b, t), "B, T")
    if not (jnp.issubdtype(segment_ids.dtype, jnp.integer) or segment_ids.dtype == jnp.bool_):
      raise TypeError(f"segment_ids must be an integer array (or a bool attention mask); got dtype "
                      f"{segment_ids.dtype}.")
  if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool):
    raise TypeError(f"chunk_size must be an int (a positive power of two); got {type(chunk_size).__name__} "
                    f"{chunk_size!r}.")
  if chunk_size < 1 or chunk_size & (chunk_size - 1):
    raise ValueError(f"chunk_size={chunk_size!r} must be a positive power of two.")
  if isinstance(scale, jax.Array):  # traced or not: its value is not checked here
    if scale.ndim:
      raise ValueError(f"scale must be a scalar; got an array of shape {scale.shape}.")
    if not jnp.issubdtype(scale.dtype, jnp.floating):
      raise TypeError(f"scale must be a floating-point scalar; got dtype {scale.dtype}.")
    return
  try:
    scale_ok = scale is None or (not isinstance(scale, (bool, str)) and np.ndim(scale) == 0
                                 and bool(np.isfinite(float(scale))))
  except (TypeError, ValueError):
    scale_ok = False
  if not scale_ok:
    raise TypeError(f"scale must be None or a finite number or a jax.Array scalar; got {type(scale).__name__} "
                    f"{scale!r}.")


def static_scale(q: jax.Array, scale: float | jax.Array | None) -> tuple[jax.Array, float]:
  """(q, scale) with the scale as a Python float the backends compile in: None is K ** -0.5, and a jax.Array scalar
  (a learned temperature, a traced value) is folded into q (the logits are linear in q, so scaling q is scaling
  them; a new value then neither fails nor compiles anew), leaving 1.0."""
  if isinstance(scale, jax.Array):
    if scale.ndim:
      raise ValueError(f"scale must be a scalar; got an array of shape {scale.shape}.")
    return (q.astype(jnp.float32) * scale.astype(jnp.float32)).astype(q.dtype), 1.0
  return q, q.shape[-1] ** -0.5 if scale is None else float(scale)


def _explicit_axes(spec_entry) -> tuple:
  """Mesh axis names of one PartitionSpec entry (None, a name, or a tuple of names)."""
  if spec_entry is None:
    return ()
  return tuple(spec_entry) if isinstance(spec_entry, tuple) else (spec_entry,)


def _split_over_batch_and_heads(fn, q, k, v, s, g, initial_state, segment_ids):
  """Runs `fn` (an implementation) per shard when the inputs are sharded over Explicit mesh axes, else None.

  GSA is independent across batch rows and kv heads, so under an Explicit mesh the op runs in a `shard_map` over
  the axes that split q's batch and k's heads; every input is resharded to those two axes first (a no-op when it
  already is). Time and feature axes must not be sharded: the op would need the whole row (context parallelism
  is a separate op, `context_parallel_gsa`).
  """
  inputs = {"q": q, "k": k, "v": v, "s": s, "g": g, "segment_ids": segment_ids}
  if initial_state is not None:
    inputs.update({"initial_state[0] (hk)": initial_state[0], "initial_state[1] (hv)": initial_state[1]})
  sharding = jax.typeof(q).sharding
  mesh = sharding.mesh
  if mesh.empty or AxisType.Explicit not in mesh.axis_types:
    return None
  spec_q, spec_k = tuple(sharding.spec) + (None,) * 4, tuple(jax.typeof(k).sharding.spec) + (None,) * 4
  batch, heads = spec_q[0], spec_k[2]
  time_axis = {"q": 1, "k": 1, "v": 1, "s": 1, "g": 1, "segment_ids": 1}
  for name, x in inputs.items():
    if x is None:
      continue
    spec = tuple(jax.typeof(x).sharding.spec) + (None,) * x.ndim
    if name in time_axis and spec[1] is not None:
      raise ValueError(f"{name} is sharded along T ({jax.typeof(x).sharding.spec}); gated_slot_attention splits "
                       "only batch and heads over a mesh. Reshard T to None (jax.sharding.reshard) or split the "
                       "sequence with gsa_jax.ops.context_parallel_gsa (docs/context_parallel.md).")
  used = set(_explicit_axes(batch)) | set(_explicit_axes(heads))
  if not used:
    return None
  row, heads4 = P(batch, None, heads, None), P(batch, heads, None, None)
  specs = {"q": row, "k": row, "v": row, "s": row, "g": row, "segment_ids": P(batch, None),
           "initial_state[0] (hk)": heads4, "initial_state[1] (hv)": heads4}
  args = {name: (None if x is None else jax.sharding.reshard(x, specs[name])) for name, x in inputs.items()}
  state_in = None if initial_state is None else (args["initial_state[0] (hk)"], args["initial_state[1] (hv)"])

  def per_shard(q, k, v, s, g, state, seg):
    return fn(q, k, v, s, g, GSAState(*state) if state is not None else None, seg)

  in_specs = (row,) * 5 + ((None if state_in is None else (heads4, heads4)), (None if segment_ids is None else
                                                                             P(batch, None)))
  # Manual over every mesh axis (the others replicate these arrays anyway): Pallas' TPU interpreter, for one,
  # runs only in fully manual computations.
  return jax.shard_map(per_shard, mesh=mesh, in_specs=in_specs, out_specs=(row, GSAState(heads4, heads4)))(args["q"], args["k"], args["v"], args["s"], args["g"], state_in,
                                        args["segment_ids"])


def gated_slot_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    s: jax.Array,
    g: jax.Array,
    *,
    scale: float | jax.Array | None = None,
    initial_state: tuple[jax.Array, jax.Array] | None = None,
    output_final_state: bool = False,
    segment_ids: jax.Array | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    backend: str = "auto",
    kernel_block_sizes: str | Mapping[str, Any] | None = None,
) -> tuple[jax.Array, GSAState | None]:
  """Gated Slot Attention (Zhang et al., NeurIPS 2024), spec section 1.

  Per batch element and kv head, with alpha_t = exp(g_t):
    Hk_t = Hk_{t-1} * alpha_t[None, :] + outer(k_t, s_t)     p_t = softmax(scale * q_t @ Hk_t)
    Hv_t = alpha_t[:, None] * Hv_{t-1} + outer(s_t, v_t)     o_t = p_t @ Hv_t

  Args:
    q: [B, T, HQ, K] queries. HQ a multiple of H: query head i reads kv head i // (HQ // H).
    k: [B, T, H, K] keys.  v: [B, T, H, V] values.
    s: [B, T, H, M] slot write weights.
    g: [B, T, H, M] log forget gates. Must be <= 0 (finite); positive g is a caller bug and is not clamped.
    scale: multiplies the slot logits; None means K ** -0.5. A Python number is static (compiled in: each new
      value compiles anew); a jax.Array scalar (a learned temperature, a traced value) is traced and differentiable:
      it is folded into q (q * scale, rounded to q's dtype).
    initial_state: None or (hk [B, H, K, M], hv [B, H, M, V]) float32; applies to the first document of a row.
    output_final_state: if True also return the state after the last non-padding token of each row.
    segment_ids: None or int [B, T]. Id > 0 names a token's document and the state resets to zero where it
      changes (relative to the previous non-padding token); id 0 (as any id <= 0) is padding: it leaves the state
      unchanged and gets o = 0. A Hugging Face-style attention mask (bool, or 0/1 ints; 1 = token, 0 = padding) is
      accepted as is: one document per row, its padding (left or right) skipped.
    chunk_size: chunk length of the 'chunked' backend (the kernels have their own); a positive power of two.
    backend: "auto" | "recurrent" | "chunked" | "pallas_gpu" | "pallas_mgpu" | "pallas_tpu".
    kernel_block_sizes: the kernels' tiles, per kernel backend (`parse_kernel_block_sizes` says the forms: e.g.
      "pallas_gpu.block_k=128,pallas_gpu.num_warps=8", or {"pallas_gpu": gsa_gpu.BlockSizes(...)}); the backend
      that runs uses its entry, the others are only validated. None: every kernel's defaults.

  Returns:
    o [B, T, HQ, V] in q's dtype, and GSAState(hk, hv) in float32 (float64 for float64 inputs) or None.
  """
  validate_inputs(q, k, v, s, g, initial_state=initial_state, segment_ids=segment_ids, chunk_size=chunk_size,
                  scale=scale)
  tiles = parse_kernel_block_sizes(kernel_block_sizes)
  chunk_size = int(chunk_size)  # a numpy integer is a different static argument of the jitted backends
  name = resolve_backend(backend)
  q, scale = static_scale(q, scale)
  if initial_state is not None:
    initial_state = GSAState(*initial_state)
  if segment_ids is not None:
    segment_ids = as_segment_ids(segment_ids)
  # Under shard_map, inputs that vary over different mesh axes (say q sharded by heads, a replicated initial
  # state) are typed alike here, so that every backend sees one set of axes; autodiff sums the gradient of a
  # replicated input over the axes it was cast to.
  axes = varying_axes(q, k, v, s, g, segment_ids, *(initial_state or ()))
  if axes:
    q, k, v, s, g = (to_varying(x, axes) for x in (q, k, v, s, g))
    if segment_ids is not None:
      segment_ids = to_varying(segment_ids, axes)
    if initial_state is not None:
      initial_state = GSAState(*(to_varying(x, axes) for x in initial_state))
  if name not in _IMPLEMENTATIONS:
    raise NotImplementedError(f"backend={name!r} is not implemented yet; use backend='chunked' (exact, any "
                              "platform), 'recurrent' or 'auto'.")

  def fn(q, k, v, s, g, state, seg):
    # Chosen on the values the implementation gets: per shard, typed as varying, when split over a mesh.
    chosen = select_backend(name, q, k, v, s, g, seg)
    return _IMPLEMENTATIONS[chosen](q, k, v, s, g, scale=scale, chunk_size=chunk_size, initial_state=state,
                                    segment_ids=seg, block_sizes=tiles.get(chosen))

  split = _split_over_batch_and_heads(fn, q, k, v, s, g, initial_state, segment_ids)
  o, state = split if split is not None else fn(q, k, v, s, g, initial_state, segment_ids)
  return o, (state if output_final_state else None)
