"""Flax NNX layers: the GSA token mixer, causal softmax attention for hybrids, and shared pieces."""

from gsa_jax.layers.attention import CausalSelfAttention, KVCache
from gsa_jax.layers.common import (RMSNorm, ShortConvolution, SwiGLU, TokenLayout, apply_rope, previous_taps,
                                   token_layout)
from gsa_jax.layers.gsa import FEATURE_MAPS, GatedSlotAttention, GSACache

__all__ = [
    "CausalSelfAttention", "FEATURE_MAPS", "GSACache", "GatedSlotAttention", "KVCache", "RMSNorm",
    "ShortConvolution", "SwiGLU", "TokenLayout", "apply_rope", "previous_taps", "token_layout",
]
