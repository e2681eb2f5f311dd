"""Pretraining entry point.

    python train.py                                              # configs/mqar.py: MQAR recall, a few CPU minutes
    python train.py --config=configs/lm_tiny.py --config.data.path=my.txt --config.workdir=runs/tiny
    python train.py --config=configs/gsa_1p3b.py --config.mesh.fsdp=8 --config.train.batch_size=64

Restarting the same command resumes from the run's latest checkpoint. Exit codes: 0 done; 2 bad config or
command line (nothing was written); 3 stopped on non-finite loss/gradients (see config.train.nonfinite); 143 saved
and stopped on SIGTERM.
"""

import logging
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _config_error(e: Exception, argv) -> None:
  """One line for an unknown key, a wrong type or a config file that does not load; exit code 2."""
  if isinstance(e, flags.Error):
    _fail(str(e))
  if isinstance(e, (AttributeError, KeyError)):  # ml_collections: an override of a key that does not exist
    text = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'").replace("\n", " ")
    key = re.match(r"'?([\w.]+)'?", text)
    culprit = [a for a in argv if key and a.startswith("--config.") and key.group(1) in a.split("=")[0]]
    where = f" in {culprit[0].split('=')[0]}" if culprit else ""
    _fail(f"unknown config key{where}: {text}")
  _fail(f"cannot load the config: {type(e).__name__}: {e}")


_CONFIG_ERRORS = (flags.Error, AttributeError, KeyError, OSError, TypeError, ValueError, SyntaxError, ImportError)

try:  # ml_collections loads the config file and applies --config.* overrides while defining the flag.
  _CONFIG = config_flags.DEFINE_config_file(
      "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "mqar.py"),
      "Path to a config file (configs/NAME.py); override keys with --config.KEY=VALUE.", lock_config=True)
except _CONFIG_ERRORS as e:
  _config_error(e, sys.argv)


def parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except _CONFIG_ERRORS as e:
    _config_error(e, argv)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; config values are set with --config.KEY=VALUE.")
  logging.getLogger().setLevel(logging.INFO)
  from gsa_jax.train import EXIT_NONFINITE, EXIT_SIGTERM, ConfigError, NonFiniteError, Preempted, train_and_evaluate

  try:
    train_and_evaluate(_CONFIG.value)
  except ConfigError as e:
    _fail(str(e))
  except NonFiniteError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_NONFINITE)
  except Preempted:
    sys.exit(EXIT_SIGTERM)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
