"""The GSA op and its backends."""

from gsa_jax.ops.api import (BACKENDS, check_backend, gated_slot_attention, kernel_block_sizes_spec,
                             parse_kernel_block_sizes, resolve_backend, select_backend, validate_inputs)
from gsa_jax.ops.chunked import chunk_gsa
from gsa_jax.ops.common import DEFAULT_CHUNK_SIZE, GSAState, segment_masks
from gsa_jax.ops.context_parallel import context_parallel_gsa
from gsa_jax.ops.recurrent import gsa_step, recurrent_gsa, zero_state

__all__ = [
    "BACKENDS", "DEFAULT_CHUNK_SIZE", "GSAState", "check_backend", "chunk_gsa", "context_parallel_gsa",
    "gated_slot_attention", "gsa_step", "kernel_block_sizes_spec", "parse_kernel_block_sizes", "recurrent_gsa",
    "resolve_backend", "segment_masks", "select_backend",
    "validate_inputs", "zero_state",
]
