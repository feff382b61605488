r"""Command-line entry point: flags, process setup, `--mode` dispatch.

  python -m pix2seq_d_jax.main --config=configs/synthetic.py --workdir=DIR \
      [--mode=train|eval|train_eval] [--config.input.batch_size=8 ...] \
      [--distributed [--coordinator_address=H:P --num_processes=N \
      --process_id=I]]

All logic lives in importable modules (`train.train_and_evaluate`), so the
same run can be driven from a notebook. The config is locked: a misspelt
`--config.` override fails at start, and the whole config is validated
before anything is built. Errors of the user's making (config, data paths)
print one line and exit with status 2 instead of a stack trace.
"""

import functools
import logging as py_logging
import os
import sys
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

from pix2seq_d_jax import config_lib, reporting, workdir_lock, xla_env

# The default is added to argv by the parser, not given to ml_collections:
# it would load a default at import, where a bad --config.<field> override
# raises outside any handler. A relative path is also looked up in the
# checkout, so runs started outside the repository root find it.
_DEFAULT_CONFIG = "configs/synthetic.py"
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, f"Config file (path[:args]); default {_DEFAULT_CONFIG}. "
    "A relative path is looked up in the cwd, then in the checkout.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_MODE = flags.DEFINE_enum(
    "mode", "train_eval", ["train", "eval", "train_eval"], "What to run."
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Call jax.distributed.initialize() (multi-host launches set this).",
)
# Explicit peers (launch/local.py); unset values are auto-detected by jax
# (TPU metadata, SLURM environment).
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0's coordinator (with --distributed).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes (with --distributed)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index (with --distributed)."
)
flags.mark_flags_as_required(["workdir"])


class _QuietLibraryInfo(py_logging.Filter):
  """Drops INFO records of orbax, which logs every save in detail."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or (
        "/orbax/" not in record.pathname
    )


def _distributed_kwargs() -> dict:
  """initialize() arguments from the flags; a bad combination exits 2."""
  given = {
      "coordinator_address": _COORDINATOR.value,
      "num_processes": _NUM_PROCESSES.value,
      "process_id": _PROCESS_ID.value,
  }
  given = {k: v for k, v in given.items() if v is not None}
  n, i = given.get("num_processes"), given.get("process_id")
  address = given.get("coordinator_address")
  host, _, port = (address or "").rpartition(":")
  error = None
  if given and not _DISTRIBUTED.value:
    error = f"--{'/--'.join(given)} need --distributed"
  elif n is not None and n < 1:
    error = f"--num_processes={n}: expected >= 1"
  elif i is not None and (i < 0 or (n is not None and i >= n)):
    error = f"--process_id={i}: expected 0 <= process_id < --num_processes"
  elif address is not None and not (host and port.isdigit()):
    error = f"--coordinator_address={address!r}: expected host:port"
  if error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  return given


def _check_workdir(workdir: str) -> str | None:
  """Why `workdir` cannot hold a run (None if it can); creates it.

  Checked before jax is imported, so an empty `--workdir=` (an unset shell
  variable) never trains into the cwd and an unusable folder fails at once.
  """
  if not workdir.strip():
    return ("--workdir is empty (an unset shell variable?); expected the "
            "run directory, e.g. --workdir=/tmp/p2sd")
  if "://" in workdir:
    return None  # Remote (gs://...): checked by the first write.
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    return (f"--workdir={workdir}: {path} exists and is not a directory; "
            "pass a new or existing run directory")
  try:
    os.makedirs(path, exist_ok=True)
    # A real write: os.access says yes to root on a read-only mount.
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    return (f"--workdir={workdir}: {path} is not a writable directory "
            f"({e.strerror or e}); pass a directory you can write")
  return None


def _workdir_child(workdir: str, name: str) -> str:
  """`<workdir>/<name>`; a URL workdir stays a URL (no abspath)."""
  if "://" in workdir:
    return f"{workdir.rstrip('/')}/{name}"
  return os.path.join(os.path.abspath(os.path.expanduser(workdir)), name)


def main(argv):
  reporting.configure_terminal(flags.FLAGS.verbosity)
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraryInfo())
  distributed_kwargs = _distributed_kwargs()
  workdir_error = _check_workdir(_WORKDIR.value)
  if workdir_error:
    print(f"error: {workdir_error}", file=sys.stderr)
    sys.exit(2)
  import jax  # Imported here so --help stays fast.

  if _DISTRIBUTED.value:
    jax.distributed.initialize(**distributed_kwargs)
  jax.config.update("jax_threefry_partitionable", True)
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    # Persistent compilation cache in the workdir: a rerun (resume, eval)
    # skips recompiling the train and predict steps. jax reads and writes
    # it through etils.epath, so a bucket workdir keeps its cache there too.
    jax.config.update(
        "jax_compilation_cache_dir",
        _workdir_child(_WORKDIR.value, "jax_cache"),
    )
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

  from pix2seq_d_jax import train  # After jax's config is set.

  config = _CONFIG.value
  try:
    config_lib.validate(config)
    # Before the first device use: XLA reads its flags, and jax its CPU
    # client's dispatch mode, once.
    xla_env.prepare_backend(config)
    train.train_and_evaluate(config, _WORKDIR.value, _MODE.value)
  except (config_lib.ConfigError, FileNotFoundError, ValueError,
          workdir_lock.WorkdirLockedError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except train.NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  finally:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("pix2seq_d_jax exit")


if __name__ == "__main__":
  app.run(main, flags_parser=functools.partial(
      config_lib.parse_flags, default_config=_DEFAULT_CONFIG))
