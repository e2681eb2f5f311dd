"""The GSA language model and its configuration."""

from gsa_jax.models.config import (MIXER_LAYOUTS, PRESETS, REMAT_POLICIES, GSAConfig, all_attention, gsa_1p3b,
                                   gsa_2p7b, gsa_340m, hybrid, mixer_layout, with_attention_layers)
from gsa_jax.models.lm import GSALM, Block, count_params

__all__ = ["Block", "GSAConfig", "GSALM", "MIXER_LAYOUTS", "PRESETS", "REMAT_POLICIES", "all_attention",
           "count_params", "gsa_1p3b", "gsa_2p7b", "gsa_340m", "hybrid", "mixer_layout", "with_attention_layers"]
