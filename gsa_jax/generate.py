"""Decoding for GSALM: prefill a right-padded batch of prompts, step one token at a time, sample under jit.

Caches (one per layer, from `GSALM.prefill` / `GSALM.init_cache`): a GSA layer keeps `GSACache` (the float32
state (hk, hv), the short convolutions' last inputs, the next RoPE position and segment id), its size independent
of the context; an attention layer keeps a `KVCache` with `max_len` slots. `prefill` and `generate` continue
either from the caches of what came before.

Prompts of different lengths share a batch as right-padded rows: `lengths [b]` or `segment_ids [b, t]` with 0 for
padding. Padding is transparent to every layer, so a row decodes exactly as its prompt alone. Every prompt needs
at least one token.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gsa_jax.layers import KVCache
from gsa_jax.layers.attention import check_room
from gsa_jax.models.lm import GSALM


def lengths_to_segment_ids(lengths: jax.Array, t: int) -> jax.Array:
  """lengths int [b] -> segment_ids int32 [b, t]: 1 for the first lengths[i] tokens of row i, 0 after."""
  return (jnp.arange(t)[None, :] < jnp.asarray(lengths)[:, None]).astype(jnp.int32)


def _segment_ids(tokens, segment_ids, lengths):
  if segment_ids is not None and lengths is not None:
    raise ValueError("pass segment_ids or lengths, not both.")
  if lengths is not None:
    return lengths_to_segment_ids(lengths, tokens.shape[1])
  return segment_ids


def check_prompts(model: GSALM, prompts, lengths=None, segment_ids=None) -> None:
  """Raises ValueError/TypeError for prompts the model cannot continue: prompts int [b, t] (t >= 1) of ids in
  [0, vocab_size); lengths int [b] in [1, t]; segment_ids int [b, t] (or a bool mask) with a token (id > 0) in
  every row. Values are checked when the arrays are concrete (not traced)."""
  if not hasattr(prompts, "shape") or not hasattr(prompts, "dtype"):
    raise TypeError(f"prompts must be an int array [b, t]; got {type(prompts).__name__}.")
  if prompts.ndim != 2:
    raise ValueError(f"prompts has shape {tuple(prompts.shape)}; expected [b, t] (one row per prompt: a single "
                     "prompt is prompts[None]).")
  if not jnp.issubdtype(prompts.dtype, jnp.integer):
    raise TypeError(f"prompts must be an integer array; got dtype {prompts.dtype}.")
  b, t = prompts.shape
  if b == 0 or t == 0:
    raise ValueError(f"prompts has shape {(b, t)}: every prompt needs at least one token.")
  vocab = model.config.vocab_size
  if not isinstance(prompts, jax.core.Tracer):
    ids = np.asarray(prompts)
    if ids.min() < 0 or ids.max() >= vocab:
      bad = ids.min() if ids.min() < 0 else ids.max()
      raise ValueError(f"prompts holds token id {bad}; expected ids in [0, {vocab}) (the model's vocab_size).")
  for name, x, shape, legend in (("lengths", lengths, (b,), "[b]"), ("segment_ids", segment_ids, (b, t), "[b, t]")):
    if x is None:
      continue
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(f"{name} must be an int array {legend}; got {type(x).__name__}.")
    mask_ok = name == "segment_ids" and x.dtype == jnp.bool_  # an HF-style attention mask
    if tuple(x.shape) != shape or not (jnp.issubdtype(x.dtype, jnp.integer) or mask_ok):
      kind = "int (or a bool mask)" if name == "segment_ids" else "int"
      raise ValueError(f"{name} has shape {tuple(x.shape)} and dtype {x.dtype}; expected {kind} {legend} = {shape}.")
    if isinstance(x, jax.core.Tracer):
      continue
    x = np.asarray(x)
    tokens_per_row = x if name == "lengths" else (x > 0).sum(axis=1)
    if name == "lengths" and (x.max() > t):
      row = int(np.argmax(x > t))
      raise ValueError(f"lengths[{row}] = {x[row]} is longer than the prompts (t = {t}).")
    if tokens_per_row.min() < 1:
      row = int(np.argmin(tokens_per_row))
      raise ValueError(f"row {row} of the prompts has {int(tokens_per_row[row])} tokens ({name}); every prompt needs "
                       "at least one.")


def last_logits(logits: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
  """logits [b, t, vocab] -> [b, vocab] at each row's last non-padding token."""
  b, t, _ = logits.shape
  if segment_ids is None:
    return logits[:, -1]
  last = jnp.max(jnp.where(segment_ids > 0, jnp.arange(t), -1), axis=1)
  return jnp.take_along_axis(logits, jnp.maximum(last, 0)[:, None, None], axis=1)[:, 0]


def cached_tokens(caches: list[Any] | None) -> int:
  """The slots the KV caches of `caches` have used (their index; their size where the index is traced, an upper
  bound), 0 without KV caches."""
  used = [c.k.shape[1] if isinstance(c.index, jax.core.Tracer) else int(c.index)
          for c in caches or () if isinstance(c, KVCache)]
  return max(used, default=0)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("max_len",))
def _prefill(graphdef, state, tokens, segment_ids, caches, *, max_len):
  return nnx.merge(graphdef, state).prefill(tokens, segment_ids, max_len=max_len, caches=caches)


@functools.partial(jax.jit, static_argnums=(0,))
def _decode(graphdef, state, tokens, caches):
  return nnx.merge(graphdef, state).step(tokens, caches)


def prefill(model: GSALM, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
            lengths: jax.Array | None = None, max_len: int | None = None,
            caches: list[Any] | None = None) -> tuple[jax.Array, list[Any]]:
  """Runs the chunked (training) form over the prompts and returns their logits and the caches.

  tokens int [b, t]; segment_ids int [b, t] (0 = padding) or lengths int [b]; max_len: how many tokens the
  attention layers' KV caches hold, those of `caches` included (default: the cached tokens + t, no room to
  decode when the model has attention layers; a continued KV cache with fewer slots is grown to it).
  caches: None, or the caches of what came before (`prefill`, `generate`'s output): the prompts continue them.
  Returns logits float32 [b, t, vocab] and the per-layer caches. Jitted.
  """
  check_prompts(model, tokens, lengths, segment_ids)
  segment_ids = _segment_ids(tokens, segment_ids, lengths)
  needed = cached_tokens(caches) + tokens.shape[1]
  if max_len is not None and max_len < needed:
    raise ValueError(f"max_len={max_len}: the caches hold {needed - tokens.shape[1]} tokens and the prompts have "
                     f"{tokens.shape[1]}; pass max_len >= {needed}.")
  graphdef, state = nnx.split(model)
  return _prefill(graphdef, state, tokens, segment_ids, caches, max_len=max_len or needed)


def decode_step(model: GSALM, tokens: jax.Array, caches: list[Any]) -> tuple[jax.Array, list[Any]]:
  """One token for every row with the recurrent form: tokens int [b] -> (logits float32 [b, vocab], caches).
  An attention layer's KV cache needs a free slot (ValueError when it is full: prefill with a larger max_len)."""
  for cache in caches if isinstance(caches, (list, tuple)) else ():
    if isinstance(cache, KVCache):
      check_room(cache, 1)
  graphdef, state = nnx.split(model)
  return _decode(graphdef, state, tokens, caches)


def sample_logits(logits: jax.Array, key: jax.Array | None, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """Samples one token per row from logits [b, vocab] -> int32 [b].

  temperature 0 is greedy (argmax; key unused). top_k > 0 keeps the k largest logits; top_p < 1 keeps the
  smallest set of most likely tokens whose probability reaches top_p (always at least one).
  """
  if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
    raise ValueError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got {temperature=}, {top_k=}, "
                     f"{top_p=}.")
  logits = logits.astype(jnp.float32)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k > 0 and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # A token is kept when the tokens more likely than it have not yet reached top_p.
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class GenerateOutput(NamedTuple):
  """tokens: int32 [b, max_new_tokens], pad_id after a row's eos (the eos itself is kept).
  num_tokens: int32 [b], the tokens each row generated, eos included.
  caches: the per-layer caches after the prompt and each row's generated tokens (eos included, nothing after),
    for continuing the conversation: `generate(model, next_prompts, caches=out.caches, ...)`."""

  tokens: jax.Array
  num_tokens: jax.Array
  caches: list[Any]


def _freeze_rows(done: jax.Array, old: list[Any], new: list[Any]) -> list[Any]:
  """The per-layer caches `new`, except that rows where done [b] is True keep `old` (a stopped row's cache stays
  at its eos)."""
  freeze = lambda o, n: jnp.where(done.reshape(done.shape + (1,) * (n.ndim - 1)), o, n)

  def layer(o, n):
    if isinstance(n, KVCache):
      # What a stopped row writes into k, v stays unreadable once its mask is kept: no copy of the large arrays.
      return n._replace(mask=freeze(o.mask, n.mask), pos=freeze(o.pos, n.pos))
    return jax.tree.map(freeze, o, n)

  return [layer(o, n) for o, n in zip(old, new)]


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("max_len", "max_new_tokens", "temperature", "top_k",
                                                                 "top_p", "eos_id", "pad_id"))
def _generate(graphdef, state, prompts, segment_ids, key, caches, *, max_len, max_new_tokens, temperature, top_k,
              top_p, eos_id, pad_id):
  model = nnx.merge(graphdef, state)
  b, t = prompts.shape
  logits, caches = model.prefill(prompts, segment_ids, max_len=max_len, caches=caches)
  logits = last_logits(logits, segment_ids)
  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
  done = jnp.zeros((b,), bool)
  count = jnp.zeros((b,), jnp.int32)

  def cond(carry):
    i, _, _, _, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, logits, caches, out, done, count = carry
    tok = sample_logits(logits, jax.random.fold_in(key, i), temperature=temperature, top_k=top_k, top_p=top_p)
    tok = jnp.where(done, pad_id, tok)
    out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
    count = count + (~done).astype(jnp.int32)
    # The step after the last token is wasted for the logits (one of max_new_tokens) but puts the token into the
    # returned caches; rows stopped before this token keep theirs.
    logits, new_caches = model.step(tok, caches)
    caches = _freeze_rows(done, caches, new_caches)
    if eos_id is not None:
      done = done | (tok == eos_id)
    return i + 1, logits, caches, out, done, count

  carry = (jnp.zeros((), jnp.int32), logits, caches, out, done, count)
  _, _, caches, out, _, count = jax.lax.while_loop(cond, body, carry)
  return GenerateOutput(tokens=out, num_tokens=count, caches=caches)


def generate(model: GSALM, prompts: jax.Array, *, max_new_tokens: int, lengths: jax.Array | None = None,
             segment_ids: jax.Array | None = None, key: jax.Array | None = None, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None, pad_id: int = 0,
             caches: list[Any] | None = None) -> GenerateOutput:
  """Prefill + a `lax.while_loop` of decode steps, all under one `jax.jit`.

  prompts int [b, t], right-padded, with lengths int [b] or segment_ids [b, t] (none: every row is full).
  caches: None, or the caches of what came before (a previous `generate`'s `caches`, `prefill`): the prompts
  continue them (multi-turn, see GSALM.prefill). Attention layers' KV caches are sized to the cached tokens +
  t + max_new_tokens (a continued cache with fewer slots is grown).
  Sampling as `sample_logits` (temperature 0: greedy, no key needed). A row stops after `eos_id`; the loop
  stops when every row has or after max_new_tokens.
  """
  if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1.")
  check_prompts(model, prompts, lengths, segment_ids)
  if key is None:
    if temperature != 0:
      raise ValueError("sampling with temperature > 0 needs a PRNG key.")
    key = jax.random.key(0)
  segment_ids = _segment_ids(prompts, segment_ids, lengths)
  graphdef, state = nnx.split(model)
  max_len = cached_tokens(caches) + prompts.shape[1] + max_new_tokens
  return _generate(graphdef, state, prompts, segment_ids, key, caches, max_len=max_len,
                   max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
                   top_p=float(top_p), eos_id=eos_id, pad_id=pad_id)
