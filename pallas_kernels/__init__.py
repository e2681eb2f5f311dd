"""Pallas kernels for Gated Slot Attention.

`gsa_gpu`: GPU kernels lowered through Triton (forward and backward, a `jax.custom_vjp`). `gsa_mgpu`: the forward
as Hopper kernels through Mosaic GPU (in progress; the backward is `gsa_gpu`'s; verified in interpret mode on CPU
only). `gsa_tpu`: TPU kernels lowered through Mosaic (verified in TPU interpret mode on CPU only). `gsa_common`:
the XLA math they share. The op in `gsa_jax.ops` reaches them through `gated_slot_attention(...,
backend="pallas_gpu" | "pallas_mgpu" | "pallas_tpu")`; model code never imports this package directly.
"""

from pallas_kernels.gsa_gpu import (BlockSizes, gsa_decode_step, gsa_decode_step_pallas, gsa_pallas_gpu,
                                    unsupported_reason)
from pallas_kernels.gsa_tpu import BlockSizes as TPUBlockSizes
from pallas_kernels.gsa_tpu import gsa_pallas_tpu

__all__ = ["BlockSizes", "TPUBlockSizes", "gsa_decode_step", "gsa_decode_step_pallas", "gsa_pallas_gpu",
           "gsa_pallas_tpu", "unsupported_reason"]
