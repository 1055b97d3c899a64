"""Run identity: everything that determines a run's result, and its check.

A run folder (`<workdir>/<dataset>/seed<k>`) starts with `run.json`,
written atomically before any other file of the run. It records the run's
identity, a flat {key: value} of:

* `config.*`: the resolved config, less the keys that cannot change the
  result (`IGNORED`: logging, progress bar, evaluation batch size,
  checkpoint cadence, the device mesh and other layouts of the same
  computation, paths whose content is fingerprinted below, the sweep's
  list of datasets and seeds);
* `run.dataset`, `run.seed`;
* `data.*`: a hash of the dataset's split file(s), of the training items
  the few-shot selection picked and of each evaluation set's items (paths
  relative to the data root, labels, class names);
* `clip.*`: hashes of the CLIP checkpoint's config.json and weights file;
* `package.version`.

A later run into the same folder with the same identity resumes or reuses
it; with another identity it is refused before any work (`RunMismatch`,
naming each differing key, saved vs now), unless asked to move the old run
aside (`--archive_old_runs`). A folder with files but no run.json (written
by an older version, or damaged) is refused the same way.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import prometar_jax
from prometar_jax import fileio
from prometar_jax.errors import RunMismatch

RUN_FILE = "run.json"
MISSING = "<missing>"
# Config keys (prefixes end with ".") that cannot change a run's result.
IGNORED = (
  "seeds",
  "data.datasets",  # the sweep's; a run is one dataset (run.dataset)
  "data.root",  # where the data lives; its content is hashed (data.*)
  "model.name",  # where the checkpoint lives; its files are hashed (clip.*)
  "model.remat",  # recomputes the same values
  # Layouts of the same computation (float summation order only, like the
  # device count): masked class padding, prompts grouped by length.
  "data.class_multiple",
  "data.text_buckets",
  "data.display_names.",  # table labels
  "log_every",
  "progress_bar",
  "eval.batch_size",
  "checkpoint.",
  "mesh.",
  "demo.methods",
  "demo.sweep",
  "demo.cache",
  "study.lanes",  # how many runs train at once
)


# Keys added to the config after runs were made without them: a saved
# identity that lacks one was made with this value (the behaviour before
# the key existed), so it still matches a config that has the default.
ADDED = {
  "config.meta.task_augmentation": True,
}


def _ignored(key: str) -> bool:
  return any(
    key == k or (k.endswith(".") and key.startswith(k)) for k in IGNORED
  )


def _flatten(tree: Mapping, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flatten(v, f"{key}."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def _digest(obj: Any) -> str:
  text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=32)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
  del size, mtime_ns  # the cache key: a changed file is hashed again
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def file_digest(path: str) -> str:
  """sha256 of a local file's content (cached while the file is unchanged)."""
  st = os.stat(path)
  return _file_digest(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def items_digest(items: Sequence, root: str) -> str:
  """Hash of (path relative to `root`, label, class name) items."""
  root = os.path.abspath(root)
  rows = [
    [os.path.relpath(p, root) if fileio.is_local(p) else p, int(y), str(c)]
    for p, y, c in items
  ]
  return _digest(rows)


def config_identity(config: Mapping) -> dict:
  """The config part of an identity: {"config.<key>": value}, less IGNORED.

  Args:
    config: a config as a (nested) mapping: `ConfigDict.to_dict()`, or a
      sweep's config.json as read back.
  """
  flat = _flatten(config)
  return {f"config.{k}": v for k, v in flat.items() if not _ignored(k)}


def run_identity(
  config,
  dataset: str,
  seed: int,
  *,
  train_items: Sequence,
  eval_items: Mapping[str, Sequence],
  data_dir: str,
  clip_files: Sequence[str],
) -> dict:
  """The flat identity of one run (see the module docstring).

  Args:
    config: the run's config (ConfigDict).
    dataset, seed: the run.
    train_items: the few-shot training items.
    eval_items: {eval set name: its test items}.
    data_dir: the dataset's folder; its split_*.json files are hashed.
    clip_files: the CLIP checkpoint's config and weights files.
  """
  out = config_identity(config.to_dict())
  out["run.dataset"] = dataset
  out["run.seed"] = int(seed)
  root = config.data.root
  splits = sorted(glob.glob(os.path.join(data_dir, "split_*.json")))
  for path in splits:
    out[f"data.split_file.{os.path.basename(path)}"] = file_digest(path)
  out["data.train_items"] = items_digest(train_items, root)
  for name, items in eval_items.items():
    out[f"data.eval_items.{name}"] = items_digest(items, root)
  for path in clip_files:
    out[f"clip.{os.path.basename(path)}"] = file_digest(path)
  out["package.version"] = prometar_jax.__version__
  return out


def differences(saved: Mapping, now: Mapping) -> dict:
  """{key: (saved, now)} for every key whose value differs."""
  keys = sorted(set(saved) | set(now))

  def get(identity, k):
    return identity.get(k, ADDED.get(k, MISSING))

  return {
    k: (get(saved, k), get(now, k))
    for k in keys
    if get(saved, k) != get(now, k)
  }


def _short(v) -> str:
  text = json.dumps(v) if not isinstance(v, str) else v
  return text if len(text) <= 60 else text[:57] + "..."


def describe(run_dir: str, diff: Mapping, limit: int = 12) -> str:
  lines = [f"{run_dir} holds a run of another configuration:"]
  for k, (old, new) in list(diff.items())[:limit]:
    lines.append(f"  {k}: {_short(old)} (saved) vs {_short(new)} (now)")
  if len(diff) > limit:
    lines.append(f"  ... and {len(diff) - limit} more")
  return "\n".join(lines)


def problem(run_dir: str, identity: Mapping) -> str | None:
  """Why `run_dir` cannot hold the run of `identity`; None when it can.

  It can when it does not exist, is empty, or holds the same identity.
  """
  if not fileio.exists(run_dir):
    return None
  path = os.path.join(run_dir, RUN_FILE)
  if not fileio.exists(path):
    if fileio.is_local(run_dir) and not os.listdir(run_dir):
      return None
    return (
      f"{run_dir} has files but no {RUN_FILE} (written by an older version "
      "of prometar_jax, or damaged): what made them is unknown"
    )
  diff = differences(fileio.read_json(path)["identity"], identity)
  return describe(run_dir, diff) if diff else None


def write(run_dir: str, identity: Mapping) -> None:
  """run_dir/run.json, atomically (the first file of a run)."""
  if fileio.is_local(run_dir):
    os.makedirs(run_dir, exist_ok=True)
  fileio.write_json(
    os.path.join(run_dir, RUN_FILE),
    {"fingerprint": _digest(dict(identity)), "identity": dict(identity)},
  )


def mismatch_error(problems: Sequence[str]) -> RunMismatch:
  """One error for every run folder that holds another run."""
  parts = list(problems)
  parts.append(
    "Nothing was changed. Use another --workdir, or pass --archive_old_runs "
    "to move these run folders aside (to <run>.archived-<time>) and start "
    "them anew."
  )
  return RunMismatch("\n".join(parts))
