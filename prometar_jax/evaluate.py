"""Top-1 accuracy of learned prompts on a test set, sharded like training.

The class text features are computed once per class set (the prompts are
class-agnostic: new classes only need their names tokenized), with the
class axis split over the mesh like the training step; the test images
come in padded batches along the data axis, and only the rows whose mask
is set are counted (Dassl's micro top-1: 100 * correct / total).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from prometar_jax import data, losses
from prometar_jax import prompt_learners as pl
from prometar_jax import sharding as sharding_lib
from prometar_jax.models import clip as clip_lib

PyTree = Any


def text_features(params, clip, token_ids, *, cfg: pl.PromptConfig):
  """Normalized prompted class features [C, D]."""
  text_prompts, _ = pl.tower_prompts(params, cfg)
  return clip_lib.normalize(clip.encode_text(token_ids, text_prompts))


def count_correct(params, clip, text, class_mask, batch, *, cfg):
  """Number of masked rows of `batch` whose argmax class is the label."""
  _, vision_prompts = pl.tower_prompts(params, cfg)
  image = clip.encode_image(batch["image"], vision_prompts)
  # The logit scale and the image norm do not change the argmax.
  logits = losses.mask_classes(image @ text.T, class_mask)
  hit = (jnp.argmax(logits, axis=-1) == batch["label"]) & batch["mask"]
  return jnp.sum(hit.astype(jnp.int32))


@functools.lru_cache(maxsize=16)
def _eval_fns(cfg: pl.PromptConfig, mesh: Mesh, shard_classes: bool):
  """Jitted (text_fn, count_fn), cached so that seeds reuse compilations."""
  repl = sharding_lib.replicated(mesh)
  cls = sharding_lib.class_sharding(mesh, shard_classes)
  rows = sharding_lib.along_data(mesh)
  text_fn = jax.jit(
    functools.partial(text_features, cfg=cfg),
    in_shardings=(repl, repl, cls),
    out_shardings=cls,
  )
  count_fn = jax.jit(
    functools.partial(count_correct, cfg=cfg),
    in_shardings=(repl, repl, cls, cls, rows),
    out_shardings=repl,
  )
  return text_fn, count_fn


def eval_batch_size(batch_size: int, mesh: Mesh) -> int:
  """`batch_size` rounded up to a multiple of the device count.

  Evaluation has no batch statistics, so its batch only sets memory and
  speed; rounding it up lets every device take an equal slice.
  """
  return sharding_lib.round_up(batch_size, mesh.size)


def evaluate(
  params: PyTree,
  clip: clip_lib.CLIP,
  cfg: pl.PromptConfig,
  classnames: Sequence[str],
  items: Sequence[tuple],
  *,
  mesh: Mesh,
  batch_size: int = 100,
  image_size: int = 224,
  shard_classes: bool = True,
  source=None,
  class_multiple: int = 1,
) -> dict:
  """Top-1 accuracy (%) of `params` on `items` over `classnames`.

  Args:
    params: the learner's parameters (replicated global arrays; {} for
      zero-shot CLIP).
    clip: the frozen CLIP (replicated).
    cfg: the learner's PromptConfig.
    classnames: names by label of the evaluated class set.
    items: (image_ref, label, classname) test items.
    mesh: the device mesh.
    batch_size: global test batch (rounded up to the device count).
    image_size: test resolution.
    shard_classes: split the class axis over the mesh.
    class_multiple: pad the class axis to a multiple of this (masked).
    source: image reader for the pipeline (None: files).

  Returns:
    {"accuracy": %, "correct": int, "total": int, "num_classes": int}.
  """
  if not items:
    raise ValueError("no test items to evaluate")
  text_fn, count_fn = _eval_fns(cfg, mesh, shard_classes)
  ids = pl.class_token_ids(cfg, clip, classnames)
  feats = sharding_lib.put_class_features(
    {"token_ids": ids, "class_mask": np.ones(len(ids), bool)},
    mesh,
    shard_classes,
    class_multiple,
  )
  text = text_fn(params, clip, feats["token_ids"])
  bs = eval_batch_size(batch_size, mesh)
  pipeline = data.make_eval_dataset(
    items,
    bs,
    image_size=image_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    source=source,
  )
  rows = sharding_lib.along_data(mesh)
  correct = []
  for batch in pipeline:
    batch = data.to_global(batch, rows)
    correct.append(count_fn(params, clip, text, feats["class_mask"], batch))
  n_correct = int(sum(int(c) for c in jax.device_get(correct)))
  total = len(items)
  return {
    "accuracy": 100.0 * n_correct / total,
    "correct": n_correct,
    "total": total,
    "num_classes": len(classnames),
  }
