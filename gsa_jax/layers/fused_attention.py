"""Causal softmax attention over packed rows by one of several implementations, the fused ones never building the
[t, t] mask.

    xla         the explicit-mask reference: a [b, t, t] bool mask (causal, same document, key not padding) and
                `jax.nn.dot_product_attention(implementation="xla")`; every platform, the CPU path.
    cudnn       cuDNN flash attention (`jax.nn.dot_product_attention(implementation="cudnn", is_causal=True)`);
                GPU, bfloat16/float16, head width a multiple of 8 up to 128. That API takes no segment ids, so for
                rows with segment ids it runs only when every row of the batch is one document without padding
                (checked on the device, `lax.cond`), and `pallas_gpu` otherwise (resolved name "cudnn+pallas_gpu").
    pallas_gpu  the Triton flash attention of `jax.experimental.pallas.ops.gpu.attention` with segment ids; GPU
                (Pallas interpret mode elsewhere, for tests), head width a power of two >= 16.
    splash      TPU splash attention with a causal mask and segment ids (Pallas interpret mode elsewhere).
    auto        cudnn on GPU, splash on TPU, xla elsewhere.

A request that the inputs do not support falls back (cudnn -> pallas_gpu for rows with segment ids, else -> xla)
with the reason logged once. The Pallas kernels take one segment id per token (`fused_segment_ids`): its document
for a non-padding token, and a distinct negative id for each padding token, so that a padding query reads only
itself (no fully masked row, hence no NaN) and no real query reads a padding key. Padding queries' outputs are
zeroed by the caller, as in the reference.

Shape legend: b batch, t time, hq query heads, h kv heads, dh head width.
"""

from __future__ import annotations

import functools
import logging
import warnings

import jax
import jax.numpy as jnp

from gsa_jax.layers.common import TokenLayout

ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas_gpu", "splash")
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")
_BLOCK = 128  # the fused kernels' sequence block: rows are padded to a multiple of it

_log = logging.getLogger(__name__)


@functools.cache
def _log_once(message: str) -> None:
  _log.warning(message)


def resolve_attention_implementation(implementation: str, *, platform: str, dtype, head_dim: int,
                                     packed: bool) -> tuple[str, str | None]:
  """The implementation that runs for these inputs, and why it differs from the one asked for (None if not)."""
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention implementation={implementation!r} is unknown; expected one of "
                     f"{ATTENTION_IMPLEMENTATIONS}.")
  dtype = jnp.dtype(dtype)
  if implementation == "auto":
    if platform not in _GPU_PLATFORMS + ("tpu",):
      return "xla", None
    implementation = "splash" if platform == "tpu" else "cudnn"
  if implementation == "cudnn":
    if platform not in _GPU_PLATFORMS:
      return "xla", f"cudnn needs a GPU; the platform is {platform}"
    unsupported = None
    if dtype not in (jnp.bfloat16, jnp.float16):
      unsupported = f"cudnn needs bfloat16 or float16 inputs; got {dtype}"
    elif head_dim % 8 or head_dim > 128:
      unsupported = f"cudnn needs a head width that is a multiple of 8 and at most 128; got {head_dim}"
    if packed or unsupported:
      # Rows with segment ids may hold several documents or padding: those batches need segment ids.
      other, why = resolve_attention_implementation("pallas_gpu" if packed else "xla", platform=platform,
                                                    dtype=dtype, head_dim=head_dim, packed=packed)
      if unsupported:
        return other, unsupported + (f"; {why}" if why else "")
      return f"cudnn+{other}", why
    return "cudnn", None
  if implementation == "pallas_gpu":
    if dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
      return "xla", f"pallas_gpu needs float32/bfloat16/float16 inputs; got {dtype}"
    if head_dim < 16 or head_dim & (head_dim - 1):
      return "xla", f"pallas_gpu needs a head width that is a power of two >= 16; got {head_dim}"
  if implementation == "splash" and dtype not in (jnp.bfloat16, jnp.float32):
    return "xla", f"splash needs float32/bfloat16 inputs; got {dtype}"
  return implementation, None


def fused_segment_ids(layout: TokenLayout) -> jax.Array:
  """[b, t] int32: a token's document (>= 1), or -(position + 1) for padding (a segment of its own).

  With these, `causal & (id[query] == id[key])` equals the reference mask on every non-padding query.
  """
  t = layout.valid.shape[1]
  return jnp.where(layout.valid, layout.doc, -1 - jnp.arange(t, dtype=jnp.int32))


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, layout: TokenLayout, implementation: str = "auto",
                     *, packed: bool = True) -> jax.Array:
  """q [b, t, hq, dh], k, v [b, t, h, dh] -> o [b, t, hq, dh], 0 at padding queries.

  packed: whether the row has segment ids (False: one document, no padding; lets cudnn run without them).
  """
  impl, why = resolve_attention_implementation(implementation, platform=jax.default_backend(), dtype=q.dtype,
                                               head_dim=q.shape[-1], packed=packed)
  if why:
    _log_once(f"attention: implementation={implementation!r} runs {impl!r}: {why}.")
  if "+" in impl:
    one_document, several = (_IMPLEMENTATIONS[name] for name in impl.split("+"))
    o = by_row_layout(one_document, several)(q, k, v, layout)
  else:
    o = _IMPLEMENTATIONS[impl](q, k, v, layout)
  return o * layout.valid[:, :, None, None].astype(o.dtype)  # padding queries read nothing


def by_row_layout(one_document, several):
  """attend(q, k, v, layout) that runs `one_document` when every row of the batch is one document without padding
  and `several` otherwise; both have that signature. The choice is made on the device, per call."""
  def attend(q, k, v, layout):
    single = jnp.all(layout.valid & (layout.doc == 1))
    return jax.lax.cond(single, one_document, several, q, k, v, layout)

  return attend


def reference_mask(layout: TokenLayout) -> jax.Array:
  """[b, t(query), t(key)] bool: the key is not after the query, is in its document and is not padding."""
  t = layout.valid.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  same_doc = layout.doc[:, :, None] == layout.doc[:, None, :]
  return causal[None] & same_doc & layout.valid[:, None, :]


def _xla(q, k, v, layout):
  return jax.nn.dot_product_attention(q, k, v, mask=reference_mask(layout)[:, None], implementation="xla")


def _cudnn(q, k, v, layout):
  del layout  # one document without padding (see resolve_attention_implementation)
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def _pad_to_block(q, k, v, segment_ids):
  """Pads time to a multiple of _BLOCK with padding tokens (each its own segment)."""
  t = q.shape[1]
  extra = -t % _BLOCK
  if not extra:
    return q, k, v, segment_ids
  pad = ((0, 0), (0, extra), (0, 0), (0, 0))
  tail = jnp.broadcast_to(-1 - jnp.arange(t, t + extra, dtype=jnp.int32), (q.shape[0], extra))
  return jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad), jnp.concatenate([segment_ids, tail], axis=1)


def _repeat_kv(q, k, v):
  """Grouped kv heads repeated to the query heads (the fused kernels below take one kv head per query head)."""
  groups = q.shape[2] // k.shape[2]
  return jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)


def _pallas_gpu(q, k, v, layout):
  with warnings.catch_warnings():  # deprecated in favour of tokamax, which is not a dependency
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas.ops.gpu import attention  # noqa: PLC0415

  t = q.shape[1]
  k, v = _repeat_kv(q, k, v)
  q, k, v, seg = _pad_to_block(q, k, v, fused_segment_ids(layout))
  o = attention.mha(q, k, v, seg, sm_scale=q.shape[-1] ** -0.5, causal=True,
                    interpret=jax.default_backend() not in _GPU_PLATFORMS)
  return o[:, :t]


def _splash(q, k, v, layout):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # noqa: PLC0415

  t, hq, dh = q.shape[1:]
  k, v = _repeat_kv(q, k, v)
  q, k, v, seg = _pad_to_block(q * jnp.asarray(dh ** -0.5, q.dtype), k, v, fused_segment_ids(layout))
  tp = q.shape[1]
  block = next(size for size in (512, 256, _BLOCK) if tp % size == 0)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  mask = splash.MultiHeadMask([splash.CausalMask((tp, tp)) for _ in range(hq)])
  kernel = splash.make_splash_mha_single_device(mask, block_sizes=sizes,
                                                interpret=jax.default_backend() != "tpu")
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [b, t, h, dh] <-> [b, h, t, dh]
  o = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=splash.SegmentIds(q=s1, kv=s1)))(
      heads_first(q), heads_first(k), heads_first(v), seg)
  return heads_first(o)[:, :t]


_IMPLEMENTATIONS = {"xla": _xla, "cudnn": _cudnn, "pallas_gpu": _pallas_gpu, "splash": _splash}
