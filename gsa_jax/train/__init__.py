"""Training library: config validation, optimizer, sharding, metrics and the loop (checkpoints: gsa_jax.run_dir)."""

from gsa_jax.train.config import ConfigError, validate_config
from gsa_jax.train.trainer import (EXIT_NO_CHECKPOINT, EXIT_NONFINITE, EXIT_SIGINT, EXIT_SIGTERM, NonFiniteError,
                                   Preempted, train_and_evaluate)

__all__ = ["ConfigError", "EXIT_NO_CHECKPOINT", "EXIT_NONFINITE", "EXIT_SIGINT", "EXIT_SIGTERM", "NonFiniteError",
           "Preempted", "train_and_evaluate", "validate_config"]
