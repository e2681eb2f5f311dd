"""Pretraining entry point.

    python train.py                                              # configs/mqar.py: MQAR recall, a few CPU minutes
    python train.py --config=configs/lm_tiny.py --config.data.path=my.txt --config.workdir=runs/tiny
    python train.py --config=configs/gsa_1p3b.py --config.mesh.fsdp=8 --config.train.batch_size=64

Restarting the same command resumes from the run's latest checkpoint. Exit codes: 0 done (or nothing to do: the
run is already at train.steps); 2 bad config, data, workdir or command line (nothing was written); 3 stopped on
non-finite loss/gradients (see config.train.nonfinite); 4 the run has checkpoints and none can be restored (nothing
deleted); 143 saved and stopped on SIGTERM; 130 saved and stopped on Ctrl-C (a second Ctrl-C stops at once).

The console shows this program's lines and every warning, one line each; all log records, libraries' INFO (orbax,
jax) and tracebacks of handled faults included, go to WORKDIR/train.log.
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


class _ConsoleFilter(logging.Filter):
  """Our own lines (INFO and up) and every library's warnings reach the console; libraries' INFO (orbax, jax) goes
  only to the run's train.log."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name == "asyncio" and "exception was never retrieved" in str(record.msg):
      # After a handled restore failure orbax drops the futures of the other reads (intermittently logged when
      # they are collected): the fault was already reported once; the record stays in train.log.
      return False
    return record.levelno >= logging.WARNING or record.name.split(".")[0] == "gsa_jax"


class _ConsoleFormatter(logging.Formatter):
  """One line per record: its message's first line ("warning: ..." for warnings and errors). Tracebacks and
  multi-line details stay in the run's train.log."""

  def format(self, record: logging.LogRecord) -> str:
    lines = record.getMessage().strip().splitlines() or [""]
    text = lines[0] + (" (details in the run's train.log)" if len(lines) > 1 or record.exc_info else "")
    return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def _log_unraisable(unraisable) -> None:
  """Exceptions Python can only ignore (after a handled restore failure orbax's dropped coroutines raise "Event loop
  is closed" by the hundred) go to the run's train.log with their traceback, not to the console."""
  logging.getLogger("unraisable").info(
      "exception ignored in %r: %s", unraisable.object, unraisable.exc_value,
      exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))


def _configure_logging() -> None:
  """INFO records are produced (the trainer copies all of them to WORKDIR/train.log); the console shows what
  `_ConsoleFilter` lets through, in place of absl's handler (and of any other)."""
  sys.unraisablehook = _log_unraisable
  root = logging.getLogger()
  root.setLevel(logging.INFO)
  for handler in list(root.handlers):  # absl's, and any a library installed with logging.basicConfig
    root.removeHandler(handler)
  console = logging.StreamHandler(sys.stderr)
  console.addFilter(_ConsoleFilter())
  console.setFormatter(_ConsoleFormatter())
  root.addHandler(console)


def _one_line(text: str) -> str:
  """A multi-line loader message (ml_collections appends the traceback or the paths it tried) as its first and
  last lines: what failed and why."""
  lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
  return lines[0] if len(lines) < 2 else f"{lines[0].rstrip(':')}: {lines[-1]}"


def _config_error(e: Exception, argv) -> None:
  """One line for an unknown key, a wrong type or a config file that does not load; exit code 2."""
  if isinstance(e, flags.Error):
    _fail(_one_line(str(e)))
  cause = e.__cause__ if isinstance(e, OSError) and e.__cause__ is not None else None
  if cause is not None and "earlier failure to load" in str(e):  # ml_collections defers a load error to first use
    e = cause
  if isinstance(e, (AttributeError, KeyError)):  # ml_collections: an override of a key that does not exist
    text = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'").replace("\n", " ")
    key = re.match(r"'?([\w.]+)'?", text)
    culprit = [a for a in argv if key and a.startswith("--config.") and key.group(1) in a.split("=")[0]]
    where = f" in {culprit[0].split('=')[0]}" if culprit else ""
    _fail(f"unknown config key{where}: {text}")
  text = str(e).strip()
  if text.startswith("Failed loading config file"):  # ml_collections names the flag's module, then the paths tried
    _fail(f"cannot load the --config file: {text.splitlines()[-1].strip()}")
  _fail(f"cannot load the config: {type(e).__name__}: {_one_line(text)}")


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
  try:
    config = _CONFIG.value
    config.workdir  # pylint: disable=pointless-statement  # a config file that failed to load raises here
  except _CONFIG_ERRORS as e:
    _config_error(e, argv)
  _configure_logging()
  from gsa_jax.run_dir import CheckpointRestoreError
  from gsa_jax.train import (EXIT_NO_CHECKPOINT, EXIT_NONFINITE, EXIT_SIGINT, ConfigError, NonFiniteError, Preempted,
                             train_and_evaluate)

  try:
    train_and_evaluate(config)
  except ConfigError as e:
    _fail(str(e))
  except NonFiniteError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_NONFINITE)
  except Preempted as e:
    sys.exit(e.exit_code)
  except KeyboardInterrupt:  # a second Ctrl-C: the step in progress was not saved
    print("error: stopped by a second Ctrl-C without saving; restarting resumes from the last checkpoint.",
          file=sys.stderr)
    sys.exit(EXIT_SIGINT)
  except CheckpointRestoreError as e:
    print(f"error: {e} (details in the run's train.log). Nothing was deleted or moved: repair the run, or start it "
          "anew in another --config.workdir.", file=sys.stderr)
    sys.exit(EXIT_NO_CHECKPOINT)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
