"""Every image of a run is checked readable before the first step.

A broken file found by the evaluation after hours of training loses the
training (or, with checkpoints, the time to find it); a broken file in the
training set stops the run mid-epoch. `check_images` looks at every image
once, before anything is trained or written, and `ImageReadError` lists
every bad file with its reason.

How deep: a full decode (the pipeline's own `pp_ops.decode`, in a parallel
tf.data map) of every training image and of every evaluation image when
there are at most `decode_max` of them; larger evaluation sets of local
JPEG/PNG files get a header check instead: the file's first and last bytes
must carry the format's start and end markers, which catches empty, foreign
and truncated files at a few microseconds per file (docs/training.md has
the measured costs).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import tensorflow as tf

from prometar_jax.data import pp_ops
from prometar_jax.data.input_pipeline import (
  FileSource,
  ImageReadError,
  find_broken,
)

_JPEG_START = b"\xff\xd8\xff"
_JPEG_END = b"\xff\xd9"
_PNG_START = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND"
# Encoders may pad a file after its end marker: look this far back for it.
_TAIL = 1024


def undecodable(refs: Sequence[str], source=None) -> list[str]:
  """The refs that the training pipeline's decoder cannot read."""
  if not refs:
    return []
  source = FileSource() if source is None else source
  keys = source.keys(refs)
  ds = tf.data.Dataset.from_tensor_slices((tf.range(len(refs)), keys))
  ds = ds.map(
    lambda i, k: (i, tf.shape(pp_ops.decode(source.read(k)))[0]),
    num_parallel_calls=tf.data.AUTOTUNE,
    deterministic=False,
  )
  ds = ds.ignore_errors()
  ok = {int(i) for i, _ in ds.as_numpy_iterator()}
  return [r for i, r in enumerate(refs) if i not in ok]


HEADER_OK = ""
UNKNOWN_FORMAT = None


def header_problem(path: str) -> str | None:
  """Why a local image file is damaged, from its first and last bytes.

  Returns HEADER_OK ("") for a JPEG or PNG whose start and end markers are
  in place, a reason for a damaged one, and UNKNOWN_FORMAT (None) for any
  other content (another format, or garbage): those need a decode.
  """
  size = os.path.getsize(path)
  if size == 0:
    return "empty file"
  with open(path, "rb") as f:
    head = f.read(len(_PNG_START))
    f.seek(max(0, size - _TAIL))
    tail = f.read()
  if head.startswith(_JPEG_START):
    ok = _JPEG_END in tail
    return HEADER_OK if ok else "truncated JPEG (no end-of-image marker)"
  if head.startswith(_PNG_START):
    return HEADER_OK if _PNG_END in tail else "truncated PNG (no IEND chunk)"
  return UNKNOWN_FORMAT


def check_images(
  decode: Sequence[str], header: Sequence[str] = (), source=None
) -> dict:
  """Raises ImageReadError listing every unreadable image.

  Args:
    decode: refs to decode fully.
    header: refs to check by their first and last bytes only (local JPEG
      and PNG files; anything else is decoded).
    source: the image source (None: files).

  Returns:
    {"decoded": n, "header_checked": n}.
  """
  source = FileSource() if source is None else source
  decode = list(dict.fromkeys(decode))
  seen = set(decode)
  by_header, bad = 0, []
  for r in dict.fromkeys(header):
    if r in seen:
      continue
    if not isinstance(source, FileSource) or "://" in r:
      decode.append(r)
      continue
    try:
      why = header_problem(r)
    except OSError as e:
      why = e.strerror or str(e)
    if why is UNKNOWN_FORMAT:
      decode.append(r)
    else:
      by_header += 1
      if why:
        bad.append((r, why))
  for r in undecodable(decode, source):
    found = find_broken(source, [r])
    bad.append(found or (r, "cannot be decoded"))
  if bad:
    lines = "\n".join(f"  {r}: {why}" for r, why in sorted(bad))
    raise ImageReadError(
      f"{len(bad)} image(s) of this run cannot be read; replace or remove "
      f"them (nothing was trained or written):\n{lines}"
    )
  return {"decoded": len(decode), "header_checked": by_header}
