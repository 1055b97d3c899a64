r"""Trains and evaluates ProMetaR runs from a config file.

  python launch.py --config configs/base2new.py:dataset=eurosat,seed=1 \
    --workdir workdir/eurosat [--config.optim.lr=0.002] [--eval_only]

On every host of a TPU pod slice (or several GPU hosts), the same line with
`--distributed` (jax.distributed.initialize(); on TPU and SLURM it finds
the other hosts by itself, elsewhere pass --coordinator_address,
--num_processes and --process_id). See docs/tpu.md.

Everything happens in the config's driver: by default the training
system, `prometar_jax.train.train_and_evaluate(config, workdir)`, which a
notebook can call directly. A config may name another driver as
`config.driver = "module:function"`, a function called as
`f(config, workdir, eval_only=..., archive_old_runs=...)`; the offline
demo's config (configs/demo.py, docs/demo.md) names the one that trains
its four methods and prints their table:

  python launch.py --config configs/demo.py --workdir workdir/demo
"""

import importlib
import logging as py_logging
import os
import sys

# TensorFlow only reads images here: keep it off the accelerators.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
# transformers serves the tokenizer and the config reader only; without
# torch it would print that its models are unavailable, which we never use.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file(
  "config", None, "Config file (configs/*.py[:args]).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Output folder (local or gs://).")
flags.DEFINE_bool("eval_only", False, "Evaluate the latest checkpoints only.")
flags.DEFINE_bool(
  "archive_old_runs",
  False,
  "Move run folders of another configuration aside (<run>.archived-<time>) "
  "and start them anew, instead of refusing.",
)
flags.DEFINE_bool(
  "verbose", False, "Show the traceback of an expected failure too."
)
flags.DEFINE_bool(
  "distributed", False, "Call jax.distributed.initialize() (multi-host)."
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Number of processes.")
flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


class _QuietLibraries:
  """Drops INFO records of orbax (one per array it saves) from the log."""

  def filter(self, record):
    return (
      record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname
    )


def parse_flags(argv):
  """absl's flag parsing, with a short message instead of a traceback."""
  try:
    return FLAGS(argv)
  except Exception as e:  # bad flag, unknown config key, bad config arg
    inner = e
    while isinstance(inner, BaseException) and inner.args:
      inner = inner.args[0]
    what = (
      "unknown config key"
      if isinstance(e, (AttributeError, KeyError))
      else "invalid command line"
    )
    text = str(inner)
    if "Traceback (most recent call last)" in text:  # from a config file
      lines = text.strip().splitlines()
      text = f"{lines[0]} {lines[-1]}"
    sys.stderr.write(
      f"launch.py: {what}: {text}\nPass --helpshort for the flags.\n"
    )
    sys.exit(2)


def _reason(e: BaseException) -> str:
  """The message of an expected failure: what, where, what to do."""
  if isinstance(e, OSError) and e.strerror and e.filename:
    return f"{e.filename}: {e.strerror}"
  return str(e) or type(e).__name__


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from prometar_jax.errors import RunError

  try:
    _main()
  except (RunError, OSError, ValueError) as e:
    if FLAGS.verbose:
      raise
    name = type(e).__name__
    sys.stderr.write(
      f"launch.py: {name}: {_reason(e)}\n(--verbose shows the traceback)\n"
    )
    _flush()
    os._exit(1)  # not sys.exit: no waiting on library threads at exit
  except KeyboardInterrupt:
    sys.stderr.write(
      "launch.py: interrupted; the same command resumes from the last "
      "checkpoint\n"
    )
    _flush()
    os._exit(130)


def _flush():
  for handler in py_logging.getLogger().handlers:
    handler.flush()
  sys.stdout.flush()
  sys.stderr.flush()


def train(config, workdir, *, eval_only, archive_old_runs):
  """The default driver: the training system, logging from process 0."""
  import jax

  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  logging.info(
    "process %d/%d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  from prometar_jax import train as train_lib

  train_lib.train_and_evaluate(
    config, workdir, eval_only=eval_only, archive_old_runs=archive_old_runs
  )


def driver(config):
  """The function that runs `config`: its `driver`, else `train`."""
  name = config.get("driver") or ""
  if not name:
    return train
  module, sep, attr = name.partition(":")
  try:
    if not sep:
      raise ValueError("expected 'module:function'")
    return getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError, ValueError) as e:
    raise ValueError(f"config.driver={name!r}: {e}") from e


def _main():
  import tensorflow as tf

  tf.config.set_visible_devices([], "GPU")
  config = FLAGS.config
  run = driver(config)
  import jax

  if FLAGS.distributed:
    kwargs = {
      k: getattr(FLAGS, k)
      for k in ("coordinator_address", "num_processes", "process_id")
      if getattr(FLAGS, k) is not None
    }
    jax.distributed.initialize(**kwargs)
  logging.get_absl_logger().addFilter(_QuietLibraries())
  run(
    config,
    FLAGS.workdir,
    eval_only=FLAGS.eval_only,
    archive_old_runs=FLAGS.archive_old_runs,
  )
  if FLAGS.distributed:
    jax.distributed.shutdown()


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
