"""Writing result files so that a reader sees the old file or the new one.

Every file a run writes that another process or a later run reads
(run.json, summary.json, prompts.npz, results.*, config.json) goes through
`write_atomically`: the bytes go to a temporary name beside the target,
which is renamed over it once complete. A failed write (disk full, a
kill) leaves the previous file as it was, and the temporary file is
removed, so no `*.tmp-*` survives an error that Python sees.

Local paths use the OS directly (errors are `OSError`s with the errno and
the path); other file systems (gs://) go through `tf.io.gfile`, whose
errors are re-raised as `OSError` naming the path.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any


def is_local(path: str) -> bool:
  return "://" not in os.fspath(path)


def _gfile():
  import tensorflow as tf  # gs:// and other non-local file systems

  return tf.io.gfile


def write_atomically(path: str, data: str | bytes) -> None:
  """Writes `data` to `path` through a temporary file and a rename."""
  path = os.fspath(path)
  tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  mode = "wb" if isinstance(data, bytes) else "w"
  if is_local(path):
    try:
      with open(tmp, mode) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    except BaseException:
      _remove_quietly(tmp, os.remove)
      raise
    return
  gfile = _gfile()
  try:
    with gfile.GFile(tmp, mode) as f:
      f.write(data)
    gfile.rename(tmp, path, overwrite=True)
  except BaseException as e:
    _remove_quietly(tmp, gfile.remove)
    if hasattr(e, "message") and not isinstance(e, OSError):  # tf OpError
      raise OSError(f"cannot write {path}: {e.message}") from e
    raise


def _remove_quietly(path: str, remove) -> None:
  try:
    remove(path)
  except Exception:  # it may never have been created
    pass


def write_json(path: str, obj: Any) -> None:
  """`obj` as indented JSON (numpy scalars and arrays as numbers, lists)."""
  write_atomically(path, json.dumps(obj, indent=2, default=json_default))


def json_default(x):
  import numpy as np

  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serializable: {type(x).__name__}")


def exists(path: str) -> bool:
  return os.path.exists(path) if is_local(path) else _gfile().exists(path)


def read_json(path: str) -> Any:
  """The JSON in `path`; a broken file is a ValueError naming it."""
  path = os.fspath(path)
  if is_local(path):
    with open(path) as f:
      text = f.read()
  else:
    with _gfile().GFile(path) as f:
      text = f.read()
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(
      f"{path} is not valid JSON ({e}); the file is damaged: restore or "
      "delete it"
    ) from e
