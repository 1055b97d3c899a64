"""Alignment along a training run, from its orbax checkpoints.

`train.train_and_evaluate` saves the `TrainState` of each run under
`<workdir>/<dataset>/seed<k>/checkpoints/<step>/` (every epoch, and every
`config.checkpoint.every_steps` steps; keep them all with a large
`config.checkpoint.max_to_keep`). `alignment_along_run` restores each saved
step and measures `measures.alignment` on a fixed pool with fixed split
keys, so the curves of different checkpoints and different methods are
paired: same images, same splits.

`load_pool` reads a pool of base training images with the evaluation
preprocessing (no augmentation) and `class_features` builds the class
features the training step uses, so the numbers are measured on what the
run trained on.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from prometar_jax import checkpoint as checkpoint_lib
from prometar_jax import data, features, fileio, meta_step
from prometar_jax import prompt_learners as pl
from prometar_jax import sharding as sharding_lib
from prometar_jax import workdir as workdir_lib
from prometar_jax.analysis import measures

PyTree = Any


def checkpoint_dir(workdir: str, dataset: str, seed: int) -> str:
  """Where `train.train_and_evaluate` keeps a run's checkpoints."""
  run_dir = workdir_lib.run_dir_of(workdir, dataset, seed)
  return os.path.join(run_dir, "checkpoints")


def class_features(spec: meta_step.StepSpec, clip, classnames) -> dict:
  """Token ids, teacher T0 and class mask, exactly as training builds them.

  On one device, classes not sharded (the analysis runs on one device).
  """
  mesh = sharding_lib.make_mesh(1)
  return features.class_features(spec, clip, classnames, mesh, False)


def load_pool(
  items: Sequence[tuple],
  *,
  image_size: int,
  num_classes: int | None = None,
  per_class: int | None = None,
  seed: int = 0,
  batch_size: int = 32,
  source=None,
) -> dict:
  """A fixed pool of labelled images for `measures.alignment`.

  Args:
    items: (image_ref, label, classname) training items (e.g.
      `data.fewshot_split(...)["train"]`); labels index the class features.
    image_size: resolution (the run's `config.data.image_size`).
    num_classes: keep this many classes, drawn at random (None: all).
    per_class: keep at most this many images per class (None: all).
    seed: the draw of classes and images.
    batch_size: images decoded per batch.
    source: image reader of the data pipeline (None: files).

  Returns:
    {"image": float32 [N, S, S, 3] CLIP-normalized, "label": int32 [N]},
    grouped by class.
  """
  rng = np.random.default_rng(seed)
  by_class: dict[int, list] = {}
  for item in items:
    by_class.setdefault(int(item[1]), []).append(item)
  classes = sorted(by_class)
  if num_classes is not None and num_classes < len(classes):
    classes = sorted(rng.choice(classes, num_classes, replace=False).tolist())
  chosen = []
  for c in classes:
    group = by_class[c]
    if per_class is not None and per_class < len(group):
      keep = np.sort(rng.choice(len(group), per_class, replace=False))
      group = [group[i] for i in keep]
    chosen += group
  if len(classes) < 2:
    raise ValueError("a pool needs at least two classes to split")
  pipeline = data.make_eval_dataset(
    chosen, batch_size, image_size=image_size, source=source
  )
  images, labels = [], []
  for batch in pipeline:
    keep = batch["mask"]
    images.append(batch["image"][keep])
    labels.append(batch["label"][keep])
  return {
    "image": np.concatenate(images).astype(np.float32),
    "label": np.concatenate(labels).astype(np.int32),
  }


def state_target(spec: meta_step.StepSpec, clip) -> meta_step.TrainState:
  """A TrainState with the structure, shapes and dtypes of a run's states.

  Only shapes matter for a restore, so the text prompts are not filled from
  the init words (no tokenizer needed).
  """
  prompt = dataclasses.replace(spec.prompt, init_words="")
  key = jax.random.key(0)
  prompts = pl.init(key, clip, prompt)
  # Any epoch length: a restore reads the saved one.
  return meta_step.init_state(key, prompts, spec, steps_per_epoch=1)


def restore_states(
  directory: str,
  target: meta_step.TrainState,
  steps: Sequence[int] | None = None,
):
  """Yields (step, state, meta) for each saved step (default: all), in order."""
  ckpt = checkpoint_lib.Checkpointer(directory)
  try:
    saved = sorted(ckpt.all_steps())
    if not saved:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    missing = sorted(set(steps or ()) - set(saved))
    if missing:
      raise ValueError(
        f"steps {missing} are not saved in {directory} (saved: {saved}); "
        "keep them with a larger config.checkpoint.max_to_keep"
      )
    for step in saved if steps is None else sorted(steps):
      state, meta = ckpt.restore(target, step)
      yield step, state, meta
  finally:
    ckpt.close()


def _stack(trees):
  return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def alignment_along_run(
  directory: str,
  clip,
  feats: dict,
  pool: dict,
  key,
  *,
  spec: meta_step.StepSpec,
  target: meta_step.TrainState | None = None,
  steps: Sequence[int] | None = None,
  num_splits: int = 50,
  support_size: int | None = None,
  split_batch: int | None = None,
  heldout: dict | None = None,
  alphas: Sequence[float] | None = None,
  return_gammas: bool = False,
) -> dict:
  """`measures.alignment` at every saved step of a run.

  Args:
    directory: the run's checkpoint folder (see `checkpoint_dir`).
    clip, feats, pool, key: as in `measures.alignment`; the same key at
      every checkpoint, so every step is measured on the same splits.
    spec: the run's StepSpec (`train.step_spec(config)`); its mode picks
      the update u (use `measures.with_mode` to measure another rule on
      the same prompts).
    target: a state laid out like the saved ones (default: `state_target`).
    steps: which saved steps (default: all).
    num_splits, support_size, split_batch, heldout, return_gammas: as in
      `measures.alignment`.
    alphas: if given, also run `measures.first_order_check` on the first
      split at each step.

  Returns:
    {"step": [K], "epochs_done": [K], "mean", "std", "gamma" (with a
    gradnet), "loss", "per_split": the trees of `alignment` stacked over
    the K checkpoints, and "first_order" if `alphas`}; numpy arrays.
  """
  if target is None:
    target = state_target(spec, clip)
  pool = jax.tree.map(np.asarray, pool)
  first_split = measures.sample_split(
    jax.random.split(key, num_splits)[0], pool["label"], support_size
  )
  saved, done, rows, checks = [], [], [], []
  for step, state, meta in restore_states(directory, target, steps):
    out = measures.alignment(
      state.prompts,
      state.gradnet,
      clip,
      feats,
      pool,
      key,
      spec=spec,
      num_splits=num_splits,
      support_size=support_size,
      split_batch=split_batch,
      heldout=heldout,
      return_gammas=return_gammas,
    )
    rows.append(jax.device_get(out))
    saved.append(step)
    done.append(meta.get("epochs_done", -1))
    if alphas is not None:
      check = measures.first_order_check(
        state.prompts,
        state.gradnet,
        clip,
        feats,
        pool,
        first_split,
        np.asarray(alphas, np.float32),
        spec=spec,
      )
      checks.append(jax.device_get(check))
  result = _stack(rows)
  result["step"] = np.asarray(saved, np.int64)
  result["epochs_done"] = np.asarray(done, np.int64)
  if checks:
    result["first_order"] = _stack(checks)
  return result


def to_jsonable(tree: PyTree) -> PyTree:
  """Arrays -> nested lists, for json.dump."""
  return jax.tree.map(lambda x: np.asarray(x).tolist(), tree)


def save_json(path: str, tree: PyTree) -> None:
  """Writes a result tree (numpy / jax leaves) as JSON."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fileio.write_atomically(path, json.dumps(to_jsonable(tree), indent=1))
