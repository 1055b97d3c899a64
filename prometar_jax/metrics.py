"""Step metrics: fetched in groups, logged, shown, written to TensorBoard.

The step returns its metrics on the device; `Logger.add` keeps them
without waiting, `Logger.fetch` brings the pending ones to the host in one
transfer (at log points, epoch ends and before checkpoints), and
`Logger.log` writes their means: an INFO line, the progress bar's
postfix, and TensorBoard scalars (process 0 only).
"""

from __future__ import annotations

import os

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

        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step")

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
      "step %d: %s",
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
    if self.writer is not None:
      self.writer.close()
