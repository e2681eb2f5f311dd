"""Pallas kernels for Gated Slot Attention.

`gsa_gpu`: GPU kernels lowered through Triton (forward and backward, a `jax.custom_vjp`). The op in
`gsa_jax.ops` reaches them through `gated_slot_attention(..., backend="pallas_gpu")`; model code never imports
this package directly.
"""

from pallas_kernels.gsa_gpu import BlockSizes, gsa_decode_step, gsa_pallas_gpu, unsupported_reason

__all__ = ["BlockSizes", "gsa_decode_step", "gsa_pallas_gpu", "unsupported_reason"]
