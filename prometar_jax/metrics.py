"""Step metrics: fetched in groups, logged, shown, written to TensorBoard.

The step returns its metrics on the device; `Logger.add` keeps them
without waiting, `Logger.fetch` brings the pending ones to the host in one
transfer (at log points, epoch ends and before checkpoints), and
`Logger.log` writes their means: an INFO line, the progress bar's
postfix, and TensorBoard scalars (process 0 only).

The terminal: while a bar is open, log lines are written above it (never
through it: a bar is one line, redrawn in place). `terminal(log_file)`
sends the full log to a file and keeps the terminal to the bars,
warnings and `report` lines (one per run): what the offline demo shows.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import sys

import jax
import numpy as np
import tensorflow as tf
from absl import logging


def is_main() -> bool:
  return jax.process_index() == 0


def info(msg: str, *args) -> None:
  """logging.info on process 0 only."""
  if is_main():
    logging.info(msg, *args)


class _AboveBars:
  """A text stream whose writes go above the open tqdm bars, flushed.

  tqdm clears its bars, the text is written, the bars are drawn again; the
  flush keeps the order of stdout and stderr lines in a pipe.
  """

  def __init__(self, stream):
    self.stream = stream

  def write(self, text: str) -> None:
    from tqdm import tqdm

    with tqdm.external_write_mode(file=self.stream):
      self.stream.write(text)
      self.stream.flush()

  def flush(self) -> None:
    self.stream.flush()


@contextlib.contextmanager
def _logs_above_bars():
  """absl's log lines (stderr) written above the bars while inside."""
  handler = logging.get_absl_handler().python_handler
  if isinstance(handler.stream, _AboveBars):  # nested: already so
    yield
    return
  old = handler.setStream(_AboveBars(handler.stream))
  try:
    yield
  finally:
    handler.setStream(old)


# Set by `terminal(log_file)`: the terminal shows warnings, not INFO lines.
_quiet = False


@contextlib.contextmanager
def terminal(log_file: str | None = None):
  """Log lines above the bars; with `log_file`, a quiet terminal.

  With `log_file`, every log record of INFO and above is appended to it
  (absl's format) and the terminal shows warnings and `report` lines only.
  """
  global _quiet
  with _logs_above_bars():
    if not (log_file and is_main()):
      yield
      return
    os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
    to_file = std_logging.FileHandler(log_file)
    to_file.setFormatter(logging.PythonFormatter())
    absl_handler = logging.get_absl_handler()
    saved = (logging.get_verbosity(), absl_handler.level, _quiet)
    std_logging.getLogger().addHandler(to_file)
    logging.set_verbosity(max(saved[0], logging.INFO))  # the file gets INFO
    absl_handler.setLevel(std_logging.WARNING)
    _quiet = True
    try:
      yield
    finally:
      std_logging.getLogger().removeHandler(to_file)
      to_file.close()
      logging.set_verbosity(saved[0])
      absl_handler.setLevel(saved[1])
      _quiet = saved[2]


def report(msg: str, *args) -> None:
  """An INFO line that the terminal shows also when quiet (`terminal`)."""
  if not is_main():
    return
  logging.info(msg, *args)
  if _quiet:
    _AboveBars(sys.stdout).write((msg % args if args else msg) + "\n")


def write_scalar(tag: str, value) -> None:
  """A TensorBoard scalar under the default writer and step.

  What `tf.summary.scalar` writes, without needing the tensorboard package
  at training time (it is only needed to look at the logs).
  """
  from tensorflow.core.framework import summary_pb2

  metadata = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
    data_class=summary_pb2.DATA_CLASS_SCALAR,
  )
  tf.summary.write(
    tag, tf.constant(float(value), tf.float32), metadata=metadata
  )


def write_scalars(run_dir: str, step: int, values: dict) -> None:
  """Scalars (and per-layer vectors as `tag/layer_i`) at `step`."""
  writer = tf.summary.create_file_writer(os.path.join(run_dir, "tensorboard"))
  with writer.as_default(step=step):
    _write(values)
  writer.close()


def _write(values: dict) -> None:
  for k, v in values.items():
    v = np.asarray(v)
    if v.ndim == 0:
      write_scalar(k, v)
    else:  # per-layer statistics (gamma of each prompt layer)
      for i, x in enumerate(v.reshape(-1)):
        write_scalar(f"{k}/layer_{i}", x)


class Logger:
  """Buffers step metrics; logs their means, shows progress, writes TB."""

  def __init__(self, run_dir, total, initial, desc, progress_bar):
    self.desc = desc  # names the run in its log lines
    self.pending = []  # (0-based step, device metrics)
    self.last = {}
    self.writer = None
    self.bar = None
    if is_main():
      if run_dir:
        self.writer = tf.summary.create_file_writer(
          os.path.join(run_dir, "tensorboard")
        )
      if progress_bar:
        from tqdm import tqdm

        # Not left behind: the run's one-line summary takes its place.
        self.bar = tqdm(
          total=total, initial=initial, desc=desc, unit="step", leave=False
        )
        self._above = contextlib.ExitStack()
        self._above.enter_context(_logs_above_bars())

  def add(self, step: int, metrics: dict) -> None:
    self.pending.append((step, metrics))

  def fetch(self) -> list[tuple[int, dict]]:
    """The pending (step, metrics) pairs, on the host."""
    if not self.pending:
      return []
    steps = [s for s, _ in self.pending]
    host = jax.device_get([m for _, m in self.pending])
    self.pending = []
    return list(zip(steps, host))

  def log(self, fetched: list[tuple[int, dict]], extra: dict) -> None:
    """Means of `fetched` (plus `extra` scalars) to the log, bar and TB."""
    if not fetched:
      return
    host = [m for _, m in fetched]
    means = {k: np.mean([m[k] for m in host], axis=0) for k in host[0]}
    self.last = {k: v.tolist() for k, v in means.items()}
    last = fetched[-1][0] + 1
    if self.bar is not None:
      self.bar.update(len(fetched))
      self.bar.set_postfix(
        {
          k: f"{float(means[k]):.4g}"
          for k in ("loss_ce", "loss_meta")
          if k in means
        }
      )
    info(
      "%s: step %d: %s",
      self.desc,
      last,
      ", ".join(
        f"{k}={float(v):.5g}" for k, v in means.items() if np.ndim(v) == 0
      ),
    )
    if self.writer is not None:
      with self.writer.as_default(step=last):
        _write({**means, **extra})
      self.writer.flush()

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self._above.close()
    if self.writer is not None:
      self.writer.close()
