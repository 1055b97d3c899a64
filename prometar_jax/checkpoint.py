"""Orbax checkpoints of the training state, and exported prompts.

A checkpoint holds everything a run needs to continue exactly: the
`TrainState` (prompts, gradnet, both optimizer states, step, rng) and a
JSON record of the data position (epochs done, step, steps per epoch) plus
the run's identity. The frozen CLIP is not saved: it is reloaded from its
checkpoint. Layout (orbax): `<dir>/<step>/{state,meta}/`, written to a
temporary name and renamed when complete, so a run killed mid-save leaves
the previous checkpoint as the latest.

Every process creates the manager and calls save/restore on the same
directory (a shared or gs:// path on a pod); orbax coordinates the writes.

`export_prompts` writes the learned prompts to a `.npz` file (keys joined
with "/", e.g. "text", "vision", "proj/kernel") that numpy or torch can
read; `load_prompts` reads it back.
"""

from __future__ import annotations

import errno
import io
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from prometar_jax import fileio

PyTree = Any


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(
    x.dtype, jax.dtypes.prng_key
  )


def _to_saveable(tree: PyTree) -> PyTree:
  """Typed PRNG keys -> their uint32 key data (what orbax can store)."""
  return jax.tree.map(
    lambda x: jax.random.key_data(x) if _is_key(x) else x, tree
  )


def _from_saveable(saved: PyTree, target: PyTree) -> PyTree:
  return jax.tree.map(
    lambda s, t: (
      jax.random.wrap_key_data(s, impl=jax.random.key_impl(t))
      if _is_key(t)
      else s
    ),
    saved,
    target,
  )


class Checkpointer:
  """Saves and restores (state, meta) per step under `directory`.

  Args:
    directory: the checkpoint folder (local or gs://).
    max_to_keep: checkpoints kept (the oldest are deleted).
  """

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = directory
    # Synchronous saves: the state is small (prompts, gradnet, momentum)
    # and a returned save() is a committed checkpoint, which is what the
    # NaN guard and a kill right after an epoch rely on.
    # A save that failed half-way (disk full, a kill) leaves a temporary
    # folder: the next manager on this directory removes it.
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=True,
      enable_async_checkpointing=False,
      cleanup_tmp_directories=True,
    )
    self._mngr = ocp.CheckpointManager(
      directory, options=options, item_names=("state", "meta")
    )

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state: PyTree, meta: dict) -> None:
    """Saves and commits checkpoint `step`; OSError naming the cause."""
    try:
      self._mngr.save(
        int(step),
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(_to_saveable(state)),
          meta=ocp.args.JsonSave(meta),
        ),
        force=True,
      )
      self._mngr.wait_until_finished()
    except Exception as e:  # orbax/tensorstore wrap OS errors in their own
      errno_, cause = os_cause(e)
      raise OSError(
        errno_,
        f"cannot save checkpoint {step} in {self.directory}: {cause}. The "
        "previous checkpoint is intact: free the space (or fix the folder) "
        "and run the same command again to resume from it",
      ) from e

  def restore(self, target: PyTree, step: int | None = None):
    """(state, meta) of `step` (default: the latest), laid out as `target`.

    Args:
      target: a state with the structure, dtypes and shardings to restore
        into (e.g. the freshly initialised state).
      step: which checkpoint; None for the latest.

    Returns:
      (state, meta dict).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(
      ocp.utils.to_shape_dtype_struct, _to_saveable(target)
    )
    try:
      out = self._mngr.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract),
          meta=ocp.args.JsonRestore(),
        ),
      )
    except ValueError as e:  # orbax: the saved tree is not target's
      raise ValueError(
        f"checkpoint {step} in {self.directory} does not fit this version's "
        "training state (saved by an older prometar_jax, or another "
        f"learner?): {e}"
      ) from e
    return _from_saveable(out["state"], target), dict(out["meta"])

  def close(self) -> None:
    self._mngr.close()


_OS_REASONS = {
  errno.ENOSPC: "No space left on device",
  errno.EDQUOT: "Disk quota exceeded",
  errno.EROFS: "Read-only file system",
  errno.EACCES: "Permission denied",
}


def os_cause(e: BaseException) -> tuple[int | None, str]:
  """(errno, reason) of the OS error behind a wrapped exception.

  Follows causes, contexts and exception groups; orbax and tensorstore
  report an OS error as text inside their own exceptions, so the text is
  searched too. Falls back to the first line of `e`.
  """
  seen, todo = set(), [e]
  while todo:
    x = todo.pop()
    if x is None or id(x) in seen:
      continue
    seen.add(id(x))
    if isinstance(x, OSError) and x.errno in _OS_REASONS:
      return x.errno, _OS_REASONS[x.errno]
    text = str(x)
    for code, reason in _OS_REASONS.items():
      if reason.lower() in text.lower():
        return code, reason
    todo += [x.__cause__, x.__context__, *getattr(x, "exceptions", ())]
  first = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return None, first[:300]


def prompts_to_numpy(prompts: PyTree) -> dict[str, np.ndarray]:
  """{"text": ..., "proj/kernel": ...}: flat numpy arrays of the prompts."""
  flat = traverse_util.flatten_dict(dict(prompts), sep="/")
  return {k: np.asarray(jax.device_get(v)) for k, v in flat.items()}


def export_prompts(path: str, prompts: PyTree) -> None:
  """Writes the learned prompts to a .npz file (local or gs://)."""
  buf = io.BytesIO()
  np.savez(buf, **prompts_to_numpy(prompts))
  fileio.write_atomically(path, buf.getvalue())


def load_prompts(path: str) -> PyTree:
  """The nested prompt dict of an `export_prompts` file."""
  import tensorflow as tf

  with tf.io.gfile.GFile(path, "rb") as f:
    with np.load(io.BytesIO(f.read())) as z:
      flat = {k: z[k] for k in z.files}
  return traverse_util.unflatten_dict(flat, sep="/")
