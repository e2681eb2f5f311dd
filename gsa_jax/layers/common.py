"""Pieces shared by the GSA and attention layers: RMSNorm, SwiGLU, RoPE, the short convolution and the
per-token view of packed rows (documents, positions, previous tokens).

Packed rows follow the op's `segment_ids` semantics (`gsa_jax.ops.common.segment_masks`): id 0 is padding and is
transparent, and a non-padding token starts a new document when its id differs from the previous non-padding
token's. Every layer here treats a row exactly as the same row with its padding removed: RoPE positions count
non-padding tokens of the document, the short convolution reads the previous non-padding tokens of the document,
and attention never reads padding or another document. That is what makes a right-padded prompt decode like the
prompt alone.

Shape legend: b batch, t time, d model width, h heads, dh head width, w convolution width.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from gsa_jax.ops import segment_masks
from gsa_jax.ops.common import as_segment_ids

# Fan-in ("LeCun") normal initializer for projections: unit-variance outputs for unit-variance inputs.
fan_in_init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def scaled_fan_in_init(scale: float):
  """Fan-in initializer with variance multiplied by `scale` (output projections of deep residual stacks)."""
  return jax.nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")


def check_sizes(**sizes) -> None:
  """Each keyword must be a positive Python or NumPy int (a layer's sizes become array shapes); ValueError naming the
  first that is not."""
  for field, value in sizes.items():
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
      raise ValueError(f"{field}: must be a positive int; got {value!r}.")


def check_compute_dtype(dtype) -> None:
  """A layer's `dtype` must be None or name a floating-point dtype."""
  try:
    ok = dtype is None or jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
  except TypeError:
    ok = False
  if not ok:
    raise ValueError(f"dtype: must be None or a floating-point dtype (e.g. jnp.bfloat16); got {dtype!r}.")


def check_segment_ids(segment_ids, b: int, t: int) -> None:
  """A layer's or model's segment ids must be None or an int or bool array [b, t] matching its input."""
  if segment_ids is None:
    return
  if not hasattr(segment_ids, "shape") or not hasattr(segment_ids, "dtype"):
    raise TypeError(f"segment_ids must be None or an int array [b, t] = [{b}, {t}]; got {type(segment_ids).__name__}"
                    " (wrap a list with jnp.asarray).")
  if tuple(segment_ids.shape) != (b, t):
    raise ValueError(f"segment_ids has shape {tuple(segment_ids.shape)}; expected [b, t] = [{b}, {t}], one id per "
                     "token of the input.")
  if not (jnp.issubdtype(segment_ids.dtype, jnp.integer) or segment_ids.dtype == jnp.bool_):
    raise TypeError(f"segment_ids must be integer (or a bool attention mask); got dtype {segment_ids.dtype}.")


def check_cache(cache, expected, layer: str, batch: int) -> None:
  """A cache handed to a layer's `prefill`/`step` must have the structure and shapes of `expected` (what the layer's
  `init_cache` gives for the input's batch, from `jax.eval_shape`); ValueError saying which entry differs."""
  got_leaves, got_tree = jax.tree.flatten_with_path(cache)
  want_leaves, want_tree = jax.tree.flatten_with_path(expected)
  if got_tree != want_tree:
    raise ValueError(f"cache: not a cache of this {layer}: its structure differs from the layer's init_cache (got "
                     f"{type(cache).__name__} with {len(got_leaves)} arrays, expected {len(want_leaves)}). A cache of "
                     "another kind of layer, or of one built with other options (use_short_conv, slot_control)?")
  for (path, got), (_, want) in zip(got_leaves, want_leaves):
    if tuple(np.shape(got)) != tuple(want.shape):
      raise ValueError(f"cache{jax.tree_util.keystr(path)} has shape {tuple(np.shape(got))}; this {layer} expects "
                       f"{tuple(want.shape)} for the input's batch of {batch} (see its init_cache). A cache of "
                       "another batch size, or of a layer with other sizes?")


def check_layer_input(x, width: int, rank: int) -> None:
  """A layer's input must be a floating-point array [b, t, d] (rank 3) or [b, d] (rank 2, one decoding step) with
  d = width; raises TypeError/ValueError naming what it got."""
  legend = "[b, t, d]" if rank == 3 else "[b, d]"
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"x must be an array {legend}; got {type(x).__name__}.")
  if x.ndim != rank or x.shape[-1] != width:
    raise ValueError(f"x has shape {tuple(x.shape)}; expected {legend} with d = hidden_size = {width}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must be a floating-point array; got dtype {x.dtype}.")


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis, computed in float32 and returned in `dtype` (default: the input's)."""

  def __init__(self, dim: int, *, eps: float = 1e-6, use_scale: bool = True, dtype=None, param_dtype=jnp.float32,
               axis_name: str | None = None):
    self.eps = eps
    self.dtype = dtype
    # axis_name None: replicated (the residual stream's norms).
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), **logical_axes(axis_name)) if use_scale else None

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    if self.scale is not None:
      y = y * self.scale[...].astype(jnp.float32)
    return y.astype(dtype)


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x)), the MLP of the paper's models (no biases)."""

  def __init__(self, dim: int, hidden: int, *, out_init=fan_in_init, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    up = dict(kernel_init=fan_in_init, kernel_metadata=logical_axes("embed", "mlp"), **kw)
    self.gate_proj = nnx.Linear(dim, hidden, **up)
    self.up_proj = nnx.Linear(dim, hidden, **up)
    self.down_proj = nnx.Linear(hidden, dim, kernel_init=out_init, kernel_metadata=logical_axes("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def logical_axes(*names: str | None) -> dict:
  """Variable metadata naming a parameter's axes with logical names (flax's `out_sharding`), without placing it
  at creation (no mesh needed): `nnx.get_partition_spec(state)` under `flax.core.spmd.logical_axis_rules(...)`
  maps the names to a mesh's axes."""
  return {"out_sharding": names, "eager_sharding": False}


def as_matrix_rows(x: jax.Array) -> jax.Array:
  """x [b, ...] with a zero row appended when b = 1, so that a projection of one token is a matrix product: the
  caller keeps the first b rows of the result.

  XLA:GPU rewrites a product of a single row with a matrix of fewer than 10^7 entries (a decode step's 2048 x 2048
  projection) into a multiply that writes the whole elementwise product and a reduction that reads it back: three
  times the weight's bytes. At batch 1 the GSA 1.3B model spent more than half of a decoded token there
  (docs/benchmarks.md); with two rows XLA runs a GEMM that reads the weight once. The extra row costs nothing
  measurable (the product is bound by reading the weight).
  """
  if x.shape[0] != 1:
    return x
  return jnp.concatenate([x, jnp.zeros_like(x)])


def explicit_spec(x: jax.Array, ndim: int | None = None) -> P | None:
  """x's PartitionSpec (padded to `ndim` entries, default x.ndim) when x lives on a mesh with Explicit axes, else
  None: the `out_sharding=` of a flax matmul or lookup whose output is laid out like x. Under Explicit sharding
  a contraction over a sharded axis (an output projection of sharded heads) or a gather has no unambiguous
  output sharding of its own."""
  sharding = jax.typeof(x).sharding
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty or AxisType.Explicit not in mesh.axis_types:
    return None
  spec = tuple(sharding.spec)
  return P(*(spec + (None,) * ((ndim or x.ndim) - len(spec))))


# ---------------------------------------------------------------------------------------------------------------
# Packed rows.


class TokenLayout(NamedTuple):
  """Per-token view of a packed row.

  valid: [b, t] bool, False for padding.
  doc: [b, t] int32, index of the token's document in its row (1, 2, ...; padding takes the previous token's).
  positions: [b, t] int32, index of the token among the non-padding tokens of its document (RoPE position).
  prev: [b, t] int32, position of the previous non-padding token of the row, -1 if none.
  """

  valid: jax.Array
  doc: jax.Array
  positions: jax.Array
  prev: jax.Array


def token_layout(segment_ids: jax.Array | None, b: int, t: int) -> TokenLayout:
  """TokenLayout of `segment_ids [b, t]` (None: one document, no padding)."""
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  if segment_ids is None:
    return TokenLayout(valid=jnp.ones((b, t), bool), doc=jnp.ones((b, t), jnp.int32), positions=pos,
                       prev=pos - 1)
  reset, valid = segment_masks(as_segment_ids(segment_ids))
  count = jnp.cumsum(valid, axis=1, dtype=jnp.int32)  # non-padding tokens so far, inclusive
  start = valid & (reset | (count == 1))
  doc = jnp.cumsum(start, axis=1, dtype=jnp.int32)
  count_at_start = jax.lax.cummax(jnp.where(start, count, 0), axis=1)
  positions = jnp.where(valid, count - count_at_start, 0)
  last = jax.lax.cummax(jnp.where(valid, pos, -1), axis=1)
  prev = jnp.pad(last[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  return TokenLayout(valid=valid, doc=doc, positions=positions, prev=prev)


def _gather_t(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x [b, t, ...] gathered along time at idx [b, n] (clipped to >= 0)."""
  idx = jnp.maximum(idx, 0).reshape(idx.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def previous_taps(layout: TokenLayout, n: int) -> tuple[jax.Array, jax.Array]:
  """For j = 1..n: position of the j-th previous non-padding token of the same document, and whether it exists.

  Returns idx [n, b, t] int32 and ok [n, b, t] bool.
  """
  idx, oks, cur = [], [], jnp.broadcast_to(jnp.arange(layout.prev.shape[1], dtype=jnp.int32), layout.prev.shape)
  for _ in range(n):
    cur = jnp.where(cur >= 0, _gather_t(layout.prev, cur), -1)
    idx.append(cur)
    oks.append((cur >= 0) & (_gather_t(layout.doc, cur) == layout.doc))
  return jnp.stack(idx), jnp.stack(oks)


def last_token_taps(layout: TokenLayout, n: int) -> tuple[jax.Array, jax.Array]:
  """The last n non-padding tokens of each row's last document, oldest first (what a decode step reads next).

  Returns idx [b, n] int32 and ok [b, n] bool (False where the document has fewer tokens, or the row none).
  """
  b, t = layout.valid.shape
  pos = jnp.arange(t, dtype=jnp.int32)
  cur = jnp.max(jnp.where(layout.valid, pos, -1), axis=1)  # [b] last non-padding token, -1 if none
  last_doc = jnp.take_along_axis(layout.doc, jnp.maximum(cur, 0)[:, None], axis=1)[:, 0]
  idx, oks = [], []
  for _ in range(n):
    idx.append(cur)
    doc = jnp.take_along_axis(layout.doc, jnp.maximum(cur, 0)[:, None], axis=1)[:, 0]
    oks.append((cur >= 0) & (doc == last_doc))
    cur = jnp.where(cur >= 0, jnp.take_along_axis(layout.prev, jnp.maximum(cur, 0)[:, None], axis=1)[:, 0], -1)
  return jnp.stack(idx[::-1], axis=1), jnp.stack(oks[::-1], axis=1)


def tail_taps(layout: TokenLayout, n: int) -> tuple[jax.Array, jax.Array]:
  """For j = 1..n: where the j-th previous token of each token lies in a tail of the n inputs that came before
  the row (a cache's short-convolution entry, oldest first), and whether it lies there.

  Only the row's first document continues the tail; a token at position p of that document finds its j-th
  previous token in the tail when j > p, at tail index n - (j - p). Returns idx [n, b, t] int32 and ok [n, b, t].
  """
  first_doc = layout.valid & (layout.doc == 1)
  j = jnp.arange(1, n + 1, dtype=jnp.int32)[:, None, None]
  p = layout.positions[None]
  return jnp.clip(n - (j - p), 0, n - 1), first_doc[None] & (j > p)


def last_doc_continues(layout: TokenLayout) -> jax.Array:
  """[b] bool: whether each row's last document is the one a cache continues (its first, or the row is empty)."""
  return layout.doc[:, -1] <= 1


def last_segment_id(segment_ids: jax.Array) -> jax.Array:
  """segment_ids int [b, t] -> [b] int32: the id of each row's last non-padding token, 0 for an empty row."""
  t = segment_ids.shape[1]
  last = jnp.max(jnp.where(segment_ids > 0, jnp.arange(t), -1), axis=1)
  return jnp.where(last >= 0, jnp.take_along_axis(segment_ids, jnp.maximum(last, 0)[:, None], axis=1)[:, 0],
                   0).astype(jnp.int32)


def first_doc_continues(cache_segment_id: jax.Array, segment_ids: jax.Array | None) -> jax.Array | None:
  """[b] bool: whether each row's first document continues a cache whose last document has the segment id
  `cache_segment_id [b]` (0: any). It does unless both ids are set and differ: a piece split exactly at a document
  boundary starts its first document fresh. A row of padding only keeps the cache. None for segment_ids None
  (plain rows continue)."""
  if segment_ids is None:
    return None
  valid = segment_ids > 0
  first = jnp.take_along_axis(segment_ids, jnp.argmax(valid, axis=1)[:, None], axis=1)[:, 0]
  return (cache_segment_id == 0) | (first == cache_segment_id) | ~jnp.any(valid, axis=1)


def next_segment_id(cache_segment_id: jax.Array | None, segment_ids: jax.Array | None, b: int) -> jax.Array:
  """[b] int32: the segment id of the document a cache ends in after a piece with `segment_ids [b, t]` (None:
  plain rows), from the one before (`cache_segment_id [b]`, None for an empty past): the piece's last id, or
  the previous one where the row is all padding; 0 (any) for plain rows."""
  segment_id = jnp.zeros((b,), jnp.int32) if cache_segment_id is None else cache_segment_id
  if segment_ids is None:
    return segment_id
  last = last_segment_id(segment_ids)
  return jnp.where(last > 0, last, segment_id)


def next_positions(layout: TokenLayout) -> jax.Array:
  """[b] int32: the RoPE position the next token of each row's last document gets (0 for an empty row)."""
  b, t = layout.valid.shape
  last = jnp.max(jnp.where(layout.valid, jnp.arange(t, dtype=jnp.int32), -1), axis=1)
  pos = jnp.take_along_axis(layout.positions, jnp.maximum(last, 0)[:, None], axis=1)[:, 0]
  return jnp.where(last >= 0, pos + 1, 0)


def carry_tail(previous: jax.Array, new: jax.Array, count: jax.Array, continues: jax.Array) -> jax.Array:
  """A short convolution's tail after a piece: previous, new [b, n, d] (oldest first; `new` from the piece alone,
  zero where it has fewer than n tokens), count [b] the piece's entries in `new`, continues [b] whether the
  piece's last document continues `previous`. Returns [b, n, d] in previous's dtype (a cache keeps its dtype)."""
  n = new.shape[1]
  # With c tokens in the piece, entry i < n - c of the new tail is entry c + i of the previous one.
  count = count[:, None]  # [b, 1]
  slot = jnp.arange(n, dtype=jnp.int32)[None]
  carried = _gather_t(previous, jnp.minimum(count + slot, n - 1))
  keep = ((slot < n - count) & continues[:, None])[..., None]
  return jnp.where(keep, carried, new.astype(previous.dtype))


# ---------------------------------------------------------------------------------------------------------------
# RoPE.


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
  """Rotary embedding, rotate-half convention. x [b, t, h, dh] (dh even), positions [b, t] int."""
  dh = x.shape[-1]
  inv_freq = theta ** (-jnp.arange(0, dh, 2, dtype=jnp.float32) / dh)  # [dh / 2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, dh / 2]
  cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Short convolution.


class ShortConvolution(nnx.Module):
  """Causal depthwise convolution of width `w` followed by silu (as the reference's ShortConvolution, no bias).

  weight[w - 1] multiplies the current token, weight[w - 1 - j] the j-th previous non-padding token of the same
  document; taps reaching before the document start read zero. The decode cache is the last w - 1 inputs.
  """

  def __init__(self, dim: int, width: int, *, dtype=None, param_dtype=jnp.float32, axis_name: str | None = None,
               rngs: nnx.Rngs):
    self.width = width
    self.dtype = dtype
    init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=1)
    self.weight = nnx.Param(init(rngs.params(), (width, dim), param_dtype),
                            **logical_axes(None, axis_name))  # [w, d]

  def _w(self, x):
    return self.weight[...].astype(self.dtype or x.dtype)

  def __call__(self, x: jax.Array, taps: tuple[jax.Array, jax.Array] | None = None,
               tail: jax.Array | None = None, tail_idx: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """x [b, t, d] -> [b, t, d]. taps: `previous_taps(layout, w - 1)` for packed rows, None for plain rows.

    tail [b, w - 1, d]: the inputs that came before the row's first document (a cache's entry, or the previous
    shard's last inputs), oldest first, with tail_idx = `tail_taps(layout, w - 1)`; None: nothing came before.
    """
    w = self._w(x)
    y = x * w[-1]
    t = x.shape[1]
    for j in range(1, self.width):
      if taps is None:
        # Plain rows: the j-th previous token is t - j; zero before the row start.
        shifted = jnp.pad(x, ((0, 0), (j, 0), (0, 0)))[:, :t]
      else:
        idx, ok = taps
        shifted = _gather_t(x, idx[j - 1]) * ok[j - 1][..., None].astype(x.dtype)
      if tail is not None:
        idx, ok = tail_idx
        shifted = shifted + _gather_t(tail.astype(x.dtype), idx[j - 1]) * ok[j - 1][..., None].astype(x.dtype)
      y = y + shifted * w[-1 - j]
    return jax.nn.silu(y)

  def tail(self, x: jax.Array, layout: TokenLayout, previous: jax.Array | None = None) -> jax.Array:
    """The last w - 1 inputs of each row's last document, oldest first: x [b, t, d] -> [b, w - 1, d].

    previous [b, w - 1, d]: the tail this row continued (see __call__); where the last document is the row's
    first and has fewer than w - 1 tokens, its oldest entries come from there, and the result has its dtype.
    None: zeros, and x's dtype.
    """
    n = self.width - 1
    idx, ok = last_token_taps(layout, n)
    new = _gather_t(x, idx) * ok[..., None].astype(x.dtype)
    if previous is None:
      return new
    return carry_tail(previous, new, jnp.sum(ok, axis=1, dtype=jnp.int32), last_doc_continues(layout))

  def step(self, x: jax.Array, tail: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One token: x [b, d], tail [b, w - 1, d] -> (y [b, d], new tail in tail's dtype)."""
    window = jnp.concatenate([tail.astype(x.dtype), x[:, None]], axis=1)  # [b, w, d]
    y = jnp.einsum("bwd,wd->bd", window, self._w(x))
    return jax.nn.silu(y), window[:, 1:].astype(tail.dtype)
