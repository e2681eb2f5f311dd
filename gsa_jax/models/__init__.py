"""The GSA language model and its configuration."""

from gsa_jax.models.config import PRESETS, REMAT_POLICIES, GSAConfig, gsa_1p3b, gsa_2p7b, gsa_340m
from gsa_jax.models.lm import GSALM, Block, count_params

__all__ = ["Block", "GSAConfig", "GSALM", "PRESETS", "REMAT_POLICIES", "count_params", "gsa_1p3b", "gsa_2p7b",
           "gsa_340m"]
