"""The Gated Slot Attention layer (spec section 3) and its decode cache.

Matches the reference layer (flash-linear-attention `fla/layers/gsa.py`), in this order:
  q, k, v = x W_q, x W_k, x W_v  (-> short conv + silu on each, if use_short_conv)
  q, k = feature_map(q), feature_map(k) per head     (swish | relu | t2r: one shared [dk, dk] map + relu)
  v = silu(v)
  f = logsigmoid(x W_f) / gate_logit_normalizer;  g = f;  s = 1 - exp(f)     (computed in float32)
  o = GSA(q, k, v, s, g, scale=1.0)
  y = RMSNorm(silu(o) flattened over heads) W_o
`forget_gate=False` is an ablation (g = 0, s = sigmoid(x W_f)): GSA without forgetting, for recall studies.
`slot_control="abc"` is GSA's ancestor ABC with the same layer around it: e = x W_f are ABC's slot logits, and each
slot is the running average of the writes weighted by exp(e) over the document so far (`gsa_jax.ops.abc`: exactly
GSA's op with gates that are not learned, g_t = log(Z_{t-1} / Z_t), s_t = exp(e_t) / Z_t). Its cache also keeps
log Z. (The reference library's ABC layer differs around the op: RoPE and an output gate by default, e clamped to
[-32, 32], and its cache drops Z; here only the slot control differs from GSA.)
Differences from the reference, all deliberate: the output norm is sized to the value width (the reference sizes
it `hidden_size`, which only works for expand_v = 1); grouped kv heads are shared by the op, not repeated;
`use_rope=True` (which the reference layer does not have) rotates q and k before the feature map; the reference's
`use_output_gate` is accepted there but unused, so it is not an option here.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from gsa_jax.layers.common import (RMSNorm, ShortConvolution, apply_rope, as_matrix_rows, check_cache,
                                   check_compute_dtype, check_layer_input, check_segment_ids, check_sizes,
                                   explicit_spec, fan_in_init, first_doc_continues, last_doc_continues, logical_axes,
                                   next_positions, next_segment_id, previous_taps, tail_taps, token_layout)
from gsa_jax.layers.context_parallel import (ShardCarry, carry_across_shards, from_last_shard, per_shard, row_spec,
                                             sequence_axis)
from gsa_jax.ops import (DEFAULT_CHUNK_SIZE, GSAState, check_backend, context_parallel_gsa, gated_slot_attention,
                         gsa_step, kernel_block_sizes_spec, zero_state)
from gsa_jax.ops.abc import NO_PAST, abc_gates, no_past
from gsa_jax.ops.common import as_segment_ids

FEATURE_MAPS = ("swish", "relu", "t2r")
# How the slots are written and forgotten: "gsa" (a learned forget gate, writes tied to it) | "abc" (ABC: running
# averages normalized by their running sum, no learned forgetting).
SLOT_CONTROLS = ("gsa", "abc")
# The logical axis names on the layer's parameters (flax `out_sharding` metadata; see `logical_axes`).
LOGICAL_AXES = {
    "embed": "the model width (hidden_size)",
    "heads": "heads x head width: q/k/v/f projections' outputs, the convolutions, the output norm, o_proj's inputs",
}
GSA_OUTPUT_NAME = "gsa_output"  # the op's output, named for remat policies


class GSACache(NamedTuple):
  """Decode cache of one GSA layer.

  state: GSAState(hk [b, h, dk, m], hv [b, h, m, dv]) float32.
  conv: None, or the short convolutions' last inputs (q [b, w-1, hq*dk], k [b, w-1, h*dk], v [b, w-1, h*dv]).
  pos: [b] int32, RoPE position of the next token (used only with use_rope).
  segment_id: [b] int32, the segment id of the document the cache ends in; 0: any (plain rows, an empty past).
    A prefill from this cache continues it only where its first document has this id (or either id is 0).
  log_normalizer: None (GSA), or ABC's log Z [b, h, m] float32: the log of the running sum of exp(slot logits)
    over the document so far (`gsa_jax.ops.abc.NO_PAST`: an empty past).
  """

  state: GSAState
  conv: tuple[jax.Array, jax.Array, jax.Array] | None
  pos: jax.Array
  segment_id: jax.Array
  log_normalizer: jax.Array | None = None


def _check(cond: bool, field: str, message: str) -> None:
  if not cond:
    raise ValueError(f"{field}: {message}")


def heads_mesh_axes(kernel: jax.Array) -> tuple[tuple[str, ...], int]:
  """The mesh axes a "heads" parameter axis is split over, and their total size, for an input projection's kernel
  [d, heads * width]: from its type on an Explicit mesh, else from flax's logical axis rules and the current
  mesh. ((), 1) when it is not split."""
  spec = explicit_spec(kernel)
  if spec is not None:
    axes, mesh = spec[-1], jax.typeof(kernel).sharding.mesh
  else:
    mesh = jax.sharding.get_abstract_mesh()
    rules = dict(flax.core.spmd.get_logical_axis_rules() or ())
    axes = rules.get("heads")
    if mesh.empty:
      return (), 1
  axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
  axes = tuple(a for a in axes if a in mesh.axis_names)
  return axes, math.prod(mesh.shape[a] for a in axes)


def continued_cache(cache: GSACache, segment_ids: jax.Array | None) -> GSACache:
  """The part of `cache` a piece with `segment_ids [b, t]` continues: rows whose first document has another id
  than the cache's last one start from an empty past (a piece split exactly at a document boundary)."""
  keep = first_doc_continues(cache.segment_id, segment_ids)
  if keep is None:
    return cache
  zero_other = lambda a: jnp.where(keep.reshape((-1,) + (1,) * (a.ndim - 1)), a, jnp.zeros_like(a))
  log_normalizer = cache.log_normalizer
  if log_normalizer is not None:
    log_normalizer = jnp.where(keep[:, None, None], log_normalizer, NO_PAST)
  return cache._replace(state=jax.tree.map(zero_other, cache.state), conv=jax.tree.map(zero_other, cache.conv),
                        pos=zero_other(cache.pos), log_normalizer=log_normalizer)


class GatedSlotAttention(nnx.Module):
  """GSA token mixer: x [b, t, d] -> y [b, t, d].

  Widths: key_dim = int(hidden_size * expand_k) split over num_heads query heads (dk = key_dim / num_heads) and
  num_kv_heads key/value heads; value_dim = int(hidden_size * expand_v) likewise (dv); num_slots slots per kv head.
  dtype is the compute dtype of the projections, the op and the output; None follows flax's rule: the promotion of
  the input's and the parameters' dtypes (a bfloat16 input with float32 parameters computes in float32 and returns
  float32; pass dtype=jnp.bfloat16 to compute in bfloat16 with float32 parameters). param_dtype is the
  parameters'. The recurrent state is float32 whatever the dtypes; the short convolutions' cache entries keep the
  dtype of the cache they continue (`init_cache`: dtype, or param_dtype when dtype is None). backend, chunk_size
  and kernel_block_sizes go to the op (`gsa_jax.ops.gated_slot_attention`; kernel_block_sizes is validated here).
  """

  def __init__(
      self,
      hidden_size: int,
      num_heads: int = 4,
      num_kv_heads: int | None = None,
      num_slots: int = 64,
      expand_k: float = 1.0,
      expand_v: float = 1.0,
      feature_map: str = "swish",
      use_short_conv: bool = False,
      conv_size: int = 4,
      gate_logit_normalizer: float = 8.0,
      forget_gate: bool = True,
      slot_control: str = "gsa",
      norm_eps: float = 1e-6,
      elementwise_affine: bool = True,
      use_rope: bool = False,
      rope_theta: float = 10000.0,
      backend: str = "auto",
      chunk_size: int = DEFAULT_CHUNK_SIZE,
      *,
      kernel_block_sizes=None,
      out_init=fan_in_init,
      dtype=None,
      param_dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    check_sizes(hidden_size=hidden_size, num_heads=num_heads, num_kv_heads=num_kv_heads, num_slots=num_slots,
                conv_size=conv_size, chunk_size=chunk_size)
    check_compute_dtype(dtype)
    key_dim, value_dim = int(hidden_size * expand_k), int(hidden_size * expand_v)
    _check(num_heads % num_kv_heads == 0, "num_kv_heads",
           f"must be a positive divisor of num_heads={num_heads}; got {num_kv_heads}.")
    # Name the field the user most likely got wrong: hidden_size itself when the expansion is 1.
    _check(key_dim > 0 and key_dim % num_heads == 0, "hidden_size" if expand_k == 1 else "expand_k",
           f"hidden_size * expand_k = {hidden_size} * {expand_k} = {key_dim} must be a positive multiple of "
           f"num_heads={num_heads}.")
    _check(value_dim > 0 and value_dim % num_heads == 0, "hidden_size" if expand_v == 1 else "expand_v",
           f"hidden_size * expand_v = {hidden_size} * {expand_v} = {value_dim} must be a positive multiple of "
           f"num_heads={num_heads}.")
    _check(feature_map in FEATURE_MAPS, "feature_map", f"{feature_map!r} is unknown; expected one of {FEATURE_MAPS}.")
    _check(not use_short_conv or conv_size >= 2, "conv_size",
           f"must be at least 2 with use_short_conv (a 1-tap convolution has no past tokens); got {conv_size}.")
    _check(norm_eps > 0, "norm_eps", f"must be positive; got {norm_eps}.")
    _check(not use_rope or rope_theta > 0, "rope_theta", f"must be positive; got {rope_theta}.")
    _check(slot_control in SLOT_CONTROLS, "slot_control",
           f"{slot_control!r} is unknown; expected one of {SLOT_CONTROLS}.")
    _check(forget_gate or slot_control == "gsa", "forget_gate",
           f"False is GSA's ablation; slot_control={slot_control!r} has no forget gate to disable (leave it True).")
    _check(gate_logit_normalizer > 0, "gate_logit_normalizer", f"must be positive; got {gate_logit_normalizer}.")
    check_backend(backend)
    _check(chunk_size & (chunk_size - 1) == 0, "chunk_size",
           f"must be a positive power of two; got {chunk_size}.")
    dk, dv = key_dim // num_heads, value_dim // num_heads
    _check(not use_rope or dk % 2 == 0, "use_rope", f"needs an even head key width; got {dk}.")

    self.hidden_size, self.num_heads, self.num_kv_heads, self.num_slots = hidden_size, num_heads, num_kv_heads, num_slots
    self.head_k_dim, self.head_v_dim = dk, dv
    self.feature_map, self.use_short_conv, self.conv_size = feature_map, use_short_conv, conv_size
    self.gate_logit_normalizer = float(gate_logit_normalizer)
    self.forget_gate, self.slot_control = forget_gate, slot_control
    self.use_rope, self.rope_theta = use_rope, rope_theta
    self.backend, self.chunk_size = backend, chunk_size
    self.kernel_block_sizes = kernel_block_sizes_spec(kernel_block_sizes)  # validated; a hashable string
    self.dtype = dtype

    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # Logical axes (LOGICAL_AXES): input projections and convolutions split "heads" on their outputs, the output
    # projection on its inputs; map the names to mesh axes with flax's logical_axis_rules.
    proj = dict(kernel_init=fan_in_init, kernel_metadata=logical_axes("embed", "heads"), **kw)
    self.q_proj = nnx.Linear(hidden_size, num_heads * dk, **proj)
    self.k_proj = nnx.Linear(hidden_size, num_kv_heads * dk, **proj)
    self.v_proj = nnx.Linear(hidden_size, num_kv_heads * dv, **proj)
    self.f_proj = nnx.Linear(hidden_size, num_kv_heads * num_slots, **proj)
    self.o_proj = nnx.Linear(num_heads * dv, hidden_size, kernel_init=out_init,
                             kernel_metadata=logical_axes("heads", "embed"), **kw)
    # t2r: one learned [dk, dk] map shared by all heads and by q and k, as the reference's T2RFeatureMap.
    self.t2r = (nnx.Linear(dk, dk, kernel_init=fan_in_init, kernel_metadata=logical_axes(None, None), **kw)
                if feature_map == "t2r" else None)
    conv_kw = dict(dtype=dtype, param_dtype=param_dtype, axis_name="heads", rngs=rngs)
    if use_short_conv:
      self.q_conv = ShortConvolution(num_heads * dk, conv_size, **conv_kw)
      self.k_conv = ShortConvolution(num_kv_heads * dk, conv_size, **conv_kw)
      self.v_conv = ShortConvolution(num_kv_heads * dv, conv_size, **conv_kw)
    else:
      self.q_conv = self.k_conv = self.v_conv = None
    self.g_norm = RMSNorm(num_heads * dv, eps=norm_eps, use_scale=elementwise_affine, dtype=dtype,
                          param_dtype=param_dtype, axis_name="heads")

  # -- pieces shared by the sequence and the step forms ------------------------------------------------------------

  def _phi(self, x: jax.Array) -> jax.Array:
    if self.feature_map == "swish":
      return jax.nn.silu(x)
    if self.feature_map == "relu":
      return jax.nn.relu(x)
    return jax.nn.relu(self.t2r(x))

  def _heads(self, q, k, v, positions):
    """Splits heads and applies RoPE and the feature maps. Inputs [..., features]; positions [b, t] (sequence
    form) or [b] (step form)."""
    lead = q.shape[:-1]
    q = q.reshape(lead + (self.num_heads, self.head_k_dim))
    k = k.reshape(lead + (self.num_kv_heads, self.head_k_dim))
    v = v.reshape(lead + (self.num_kv_heads, self.head_v_dim))
    if self.use_rope:
      step = q.ndim == 3
      rot = lambda x: apply_rope(x[:, None] if step else x, positions[:, None] if step else positions,
                                 self.rope_theta)
      q, k = rot(q), rot(k)
      if step:
        q, k = q[:, 0], k[:, 0]
    return self._phi(q), self._phi(k), jax.nn.silu(v)

  def _slot_gates(self, f, segment_ids, past):
    """f = x W_f [b, t, num_kv_heads * num_slots] -> (s in the compute dtype, g float32, each [b, t, h, m]; ABC's
    log Z after the piece [b, h, m] or None). past: ABC's log Z before the piece (None: an empty past)."""
    z = None
    if self.slot_control == "abc":
      s, g, z = abc_gates(f.reshape(f.shape[:-1] + (self.num_kv_heads, self.num_slots)), segment_ids, past)
    else:
      s, g = self.gates(f)
    # s in [0, 1] only scales the keys and values it writes: it goes to the op in their dtype. (A float32 s would
    # promote the whole op to float32; on GPU that made the kernels 25x slower in bf16 training.)
    return s.astype(f.dtype), g, z

  def gates(self, f: jax.Array) -> tuple[jax.Array, jax.Array]:
    """GSA's gates (slot_control "gsa"): the gate projection's output f = x W_f [..., num_kv_heads * num_slots] ->
    (s, g), each float32 [..., num_kv_heads, num_slots]: the write strength and the log retention of every slot."""
    if self.slot_control != "gsa":
      raise ValueError(f"gates: slot_control={self.slot_control!r} has no per-token gates; ABC's depend on the "
                       "document so far (gsa_jax.ops.abc.abc_gates(f, segment_ids, past)).")
    # Gates in float32: their cumulative sums set every decay, and bf16 would round small log gates to 0.
    f = jax.nn.log_sigmoid(f.astype(jnp.float32)).reshape(f.shape[:-1] + (self.num_kv_heads, self.num_slots))
    g = f / self.gate_logit_normalizer
    s = 1.0 - jnp.exp(g)
    if not self.forget_gate:
      # The ablation without forgetting (GSA's ancestor ABC has no decay): the slots never fade (g = 0) and the
      # same projection, through a sigmoid, still sets how strongly each token writes each slot. The barrier keeps
      # g from being a compile-time constant: XLA on GPU would otherwise constant-fold every gate prefix sum of the
      # op, 4 minutes of compilation for a 2-layer MQAR model (the op's arithmetic on zeros costs microseconds).
      s, g = jnp.exp(f), jax.lax.optimization_barrier(jnp.zeros_like(g))
    return s, g

  def _out(self, o: jax.Array, x: jax.Array, dtype) -> jax.Array:
    """o [..., hq, dv] -> y [..., d] computed in `dtype` (the projections'), laid out like the layer's input
    x [..., d] on an Explicit mesh."""
    o = jax.nn.silu(o.astype(dtype))
    o = o.reshape(o.shape[:-2] + (self.num_heads * self.head_v_dim,))
    return self.o_proj(self.g_norm(o), out_sharding=explicit_spec(x))

  def _warn_if_heads_split(self) -> None:
    """A warning (once per layer shape and mesh) when "heads" are sharded over mesh axes whose size does not divide
    the kv heads: the op runs per kv head, so XLA would gather them around it, silently, in every step."""
    axes, size = heads_mesh_axes(self.q_proj.kernel[...])
    if size > 1 and self.num_kv_heads % size:
      warnings.warn(f"GatedSlotAttention: num_kv_heads={self.num_kv_heads} (num_heads={self.num_heads}) is not "
                    f"divisible by the {size} devices of mesh axes {axes} that the 'heads' parameter axis is "
                    "sharded over; XLA gathers the heads around the op (all-gathers in the forward and backward). "
                    f"Use a number of kv heads divisible by {size}, or map 'heads' to fewer devices.", stacklevel=3)

  def _sequence(self, x, segment_ids, cache, output_final_state):
    """The sequence form -> (y, the cache after x, or None without output_final_state); with `cache` (a GSACache)
    each row's first document continues it. Under a mesh with a "sequence" axis, each device runs its slice of T
    (gsa_jax.layers.context_parallel)."""
    self._warn_if_heads_split()
    segment_ids = None if segment_ids is None else as_segment_ids(segment_ids)
    axis = sequence_axis(x.shape[1])
    if axis is None:
      return self._piece(x, segment_ids, cache, output_final_state, None)
    graphdef, variables = nnx.split(self)
    shard = lambda variables, x, segment_ids, cache: nnx.merge(graphdef, variables)._piece(
        x, segment_ids, cache, output_final_state, axis)
    row = row_spec(axis)
    return per_shard(shard, axis, in_specs=(P(), row, None if segment_ids is None else row,
                                            None if cache is None else P()),
                     out_specs=(row, P() if output_final_state else None))(variables, x, segment_ids, cache)

  def _piece(self, x, segment_ids, cache, output_final_state, axis):
    """`_sequence` on the tokens x [b, t, d] at hand: a whole row (axis None), or this device's slice of rows split
    over the mesh axis `axis` (inside a shard_map over it), which takes the state, the convolutions' inputs and the
    RoPE position of the shards before it."""
    b, t, _ = x.shape
    layout = token_layout(segment_ids, b, t)
    q, k, v, f = self.q_proj(x), self.k_proj(x), self.v_proj(x), self.f_proj(x)
    conv_in = (q, k, v)
    convs = (self.q_conv, self.k_conv, self.v_conv) if self.use_short_conv else None
    carry = None if cache is None else ShardCarry(cache.conv, cache.pos, cache.segment_id, cache.log_normalizer)
    final_carry = None
    if axis is not None:
      shard_z = None  # ABC: this shard's log Z from an empty past, which the shards fold into each one's past
      if self.slot_control == "abc":
        shard_z = self._slot_gates(f, segment_ids, None)[2]
      carry, final_carry = carry_across_shards(carry, layout, segment_ids, convs, conv_in, axis, shard_z)
    positions = layout.positions
    if carry is not None:
      positions = positions + jnp.where(layout.doc <= 1, carry.pos[:, None], 0)
    if self.use_short_conv:
      taps = None if segment_ids is None else previous_taps(layout, self.conv_size - 1)
      tails, tail_idx = (None,) * 3, None
      if carry is not None:
        tails, tail_idx = carry.conv, tail_taps(layout, self.conv_size - 1)
      q, k, v = (c(a, taps, tail, tail_idx) for c, a, tail in zip(convs, conv_in, tails))
    dtype = q.dtype
    q, k, v = self._heads(q, k, v, positions)
    s, g, log_normalizer = self._slot_gates(f, segment_ids, None if carry is None else carry.log_normalizer)
    op = gated_slot_attention if axis is None else functools.partial(context_parallel_gsa, axis_name=axis)
    o, state = op(q, k, v, s, g, scale=1.0, initial_state=None if cache is None else cache.state,
                  output_final_state=output_final_state, segment_ids=segment_ids, chunk_size=self.chunk_size,
                  backend=self.backend, kernel_block_sizes=self.kernel_block_sizes)
    o = checkpoint_name(o, GSA_OUTPUT_NAME)  # a remat policy may keep it (gsa_jax.models: remat="matmuls_gsa")
    y = self._out(o, x, dtype)
    if not output_final_state:
      return y, None
    if axis is None:
      return y, self._next_cache((state, log_normalizer), layout, conv_in, segment_ids, cache)
    return y, GSACache(state, *from_last_shard(final_carry, axis))

  def _next_cache(self, state, layout, conv_in, segment_ids, cache) -> GSACache:
    """The cache after a piece: its final state (with ABC's log Z), its convolution tails, the next position and
    segment id."""
    state, log_normalizer = state
    conv = None
    if self.use_short_conv:
      previous = (None,) * 3 if cache is None else cache.conv
      conv = tuple(c.tail(a, layout, prev) for c, a, prev in zip((self.q_conv, self.k_conv, self.v_conv),
                                                                 conv_in, previous))
    pos = next_positions(layout)
    if cache is not None:
      pos = pos + jnp.where(last_doc_continues(layout), cache.pos, 0)
    segment_id = next_segment_id(None if cache is None else cache.segment_id, segment_ids, pos.shape[0])
    return GSACache(state=state, conv=conv, pos=pos, segment_id=segment_id, log_normalizer=log_normalizer)

  # -- public forms ------------------------------------------------------------------------------------------------

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """x [b, t, d], segment_ids None or int [b, t] (0 = padding; or a bool attention mask, see the op) ->
    y [b, t, d] (0 at padding)."""
    check_layer_input(x, self.q_proj.in_features, 3)
    check_segment_ids(segment_ids, *x.shape[:2])
    return self._sequence(x, segment_ids, None, False)[0]

  def prefill(self, x: jax.Array, segment_ids: jax.Array | None = None,
              cache: GSACache | None = None) -> tuple[jax.Array, GSACache]:
    """The sequence form plus the cache to continue each row's last document with `step` or another `prefill`.

    cache: None (an empty past), or the cache of the tokens before x (`init_cache`, `prefill`, `step`): each row's
    first document continues it (state, short-convolution inputs, RoPE position), as the op's initial_state; a
    later document of the row starts fresh. So a prompt prefilled in pieces of any sizes, each from the previous
    piece's cache, gives the outputs and the cache of the prompt prefilled at once (chunked prefill, multi-turn
    continuation; differentiable, for truncated backpropagation through long documents).
    """
    check_layer_input(x, self.q_proj.in_features, 3)
    check_segment_ids(segment_ids, *x.shape[:2])
    segment_ids = None if segment_ids is None else as_segment_ids(segment_ids)
    if cache is not None:
      self._check_cache(cache, x.shape[0])
      cache = continued_cache(cache, segment_ids)
    return self._sequence(x, segment_ids, cache, True)

  def step(self, x: jax.Array, cache: GSACache) -> tuple[jax.Array, GSACache]:
    """One token per row with the recurrent form: x [b, d] -> (y [b, d], new cache)."""
    check_layer_input(x, self.q_proj.in_features, 2)
    self._check_cache(cache, x.shape[0])
    b, rows = x.shape[0], as_matrix_rows(x)
    q, k, v, f = (p(rows)[:b] for p in (self.q_proj, self.k_proj, self.v_proj, self.f_proj))
    conv = None
    if self.use_short_conv:
      (q, tq), (k, tk), (v, tv) = (c.step(a, tail) for c, a, tail in
                                   zip((self.q_conv, self.k_conv, self.v_conv), (q, k, v), cache.conv))
      conv = (tq, tk, tv)
    dtype = q.dtype
    q, k, v = self._heads(q, k, v, cache.pos)
    s, g, log_normalizer = self._slot_gates(f[:, None], None, cache.log_normalizer)
    o, state = gsa_step(q, k, v, s[:, 0], g[:, 0], cache.state, scale=1.0)
    y = self._out(as_matrix_rows(o), as_matrix_rows(x), dtype)[:b]
    return y, GSACache(state=state, conv=conv, pos=cache.pos + 1, segment_id=cache.segment_id,
                       log_normalizer=log_normalizer)

  def _check_cache(self, cache, batch: int) -> None:
    check_cache(cache, jax.eval_shape(lambda: self.init_cache(batch)), "GatedSlotAttention", batch)

  def init_cache(self, batch_size: int) -> GSACache:
    """The cache of an empty prompt: zero state, zero convolution inputs."""
    state = zero_state(batch_size, self.num_kv_heads, self.head_k_dim, self.head_v_dim, self.num_slots)
    conv = None
    if self.use_short_conv:
      dtype = self.dtype or self.q_proj.param_dtype
      conv = tuple(jnp.zeros((batch_size, self.conv_size - 1, c.weight.shape[1]), dtype)
                   for c in (self.q_conv, self.k_conv, self.v_conv))
    zeros = jnp.zeros((batch_size,), jnp.int32)
    log_normalizer = no_past(batch_size, self.num_kv_heads, self.num_slots) if self.slot_control == "abc" else None
    return GSACache(state=state, conv=conv, pos=zeros, segment_id=zeros, log_normalizer=log_normalizer)
