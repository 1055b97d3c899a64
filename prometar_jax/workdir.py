"""One writer per workdir: an OS lock held for the lifetime of a sweep.

`hold(workdir)` takes an exclusive `flock` on `<workdir>/.lock` and writes
the holder's PID, host and start time into it. A second run into the same
workdir fails at once with `WorkdirLocked`, naming the holder. The kernel
drops the lock when the holder's process ends, however it ends (SIGKILL
included), so a stale lock file never blocks the next run; the file stays
and only says who held it last.

On several processes (jax.distributed) process 0 holds the lock, and every
process learns whether it got it (`on_main`), so that all stop together.
Non-local workdirs (gs://) have no OS lock: a warning says so.

A workdir holds one folder per run, `run_dir_of(workdir, dataset, seed)`
(the layout is in train.py's docstring).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import jax
import numpy as np
from absl import logging

from prometar_jax import fileio
from prometar_jax.errors import RunError, WorkdirLocked

LOCK_FILE = ".lock"
T = TypeVar("T")


def on_main(fn: Callable[[], T], what: str) -> T | None:
  """Runs `fn` on process 0; every process raises if it raised there.

  Process 0 re-raises its own exception; the others raise a RunError that
  points at process 0's log. Returns fn's result on process 0, else None.
  """
  out, err = None, None
  if jax.process_index() == 0:
    try:
      out = fn()
    except Exception as e:  # re-raised below, after telling the others
      err = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    ok = multihost_utils.broadcast_one_to_all(np.int32(err is None))
    if not int(ok) and err is None:
      raise RunError(f"{what} failed on process 0: see its log")
  if err is not None:
    raise err
  return out


def run_dir_of(workdir: str, dataset: str, seed: int) -> str:
  """The folder of the (dataset, seed) run of a sweep in `workdir`."""
  return os.path.join(workdir, dataset, f"seed{seed}")


def check_is_folder(workdir: str) -> None:
  """A workdir that exists as a file is refused before any work."""
  if fileio.is_local(workdir) and os.path.exists(workdir):
    if not os.path.isdir(workdir):
      raise NotADirectoryError(
        f"--workdir {workdir} is a file, not a folder: pass a folder path"
      )


def _holder(path: str) -> str:
  try:
    with open(path) as f:
      h = json.load(f)
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["time"]))
    return f"PID {h['pid']} on host {h['host']}, started {started}"
  except (OSError, ValueError, KeyError, TypeError):
    return "a process whose details could not be read"


def _acquire(workdir: str) -> tuple[int, bool] | None:
  """(locked fd, whether the workdir was created for it); None off-local."""
  if not fileio.is_local(workdir):
    logging.warning(
      "%s is not a local folder: no lock keeps a second run out of it", workdir
    )
    return None
  created = not os.path.exists(workdir)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    raise WorkdirLocked(
      f"{workdir} is in use by another run ({_holder(path)}); wait for it "
      "to finish, or use another --workdir"
    ) from None
  me = {
    "pid": os.getpid(),
    "host": socket.gethostname(),
    "time": time.time(),
    "argv": sys.argv,
  }
  os.ftruncate(fd, 0)
  os.write(fd, json.dumps(me).encode())
  return fd, created


@contextlib.contextmanager
def hold(workdir: str | None) -> Iterator[None]:
  """Holds the workdir's lock (process 0) for the duration of the block.

  A workdir created here is removed again when the block fails before
  anything but the lock file was written into it (a refused run leaves
  no trace).
  """
  if workdir is None:
    yield
    return
  held = on_main(lambda: _acquire(workdir), f"locking {workdir}")
  try:
    yield
  except BaseException:
    if held is not None and held[1]:
      _remove_if_only_lock(workdir)
    raise
  finally:
    if held is not None:
      os.close(held[0])  # releases the flock


def _remove_if_only_lock(workdir: str) -> None:
  try:
    if os.listdir(workdir) == [LOCK_FILE]:
      os.remove(os.path.join(workdir, LOCK_FILE))
      os.rmdir(workdir)
  except OSError:
    pass


def archive(run_dir: str) -> str:
  """Moves a run folder aside (never deletes it); returns its new path."""
  stamp = time.strftime("%Y%m%d-%H%M%S")
  dest, k = f"{run_dir}.archived-{stamp}", 1
  while fileio.exists(dest):
    k += 1
    dest = f"{run_dir}.archived-{stamp}-{k}"
  if not fileio.is_local(run_dir):
    raise RunError(
      f"cannot archive {run_dir}: only local folders can be moved aside; "
      "use another --workdir"
    )
  os.rename(run_dir, dest)
  return dest
