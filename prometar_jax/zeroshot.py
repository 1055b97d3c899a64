"""Zero-shot CLIP classification: class text features from templates, top-1.

The template ensemble follows the official ProMetaR teacher: text features of
every (template, class) prompt are averaged over templates while still
unnormalized, and normalized afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prometar_jax.models import clip as clip_lib
from prometar_jax.templates import IMAGENET_TEMPLATES, SINGLE_TEMPLATE


def class_prompts(
  classnames: Sequence[str], templates: Sequence[str]
) -> list[list[str]]:
  """[template][class] prompt strings; underscores in names become spaces."""
  names = [c.replace("_", " ") for c in classnames]
  return [[t.format(n) for n in names] for t in templates]


def template_text_features(
  clip: clip_lib.CLIP, token_ids: np.ndarray, batch_size: int = 256
) -> jax.Array:
  """Mean over templates of unnormalized text features, then normalized.

  Args:
    clip: a loaded CLIP.
    token_ids: [T, C, L] int ids of T templates for C classes.
    batch_size: prompts encoded per call (memory bound on big class sets).

  Returns:
    [C, projection_dim] L2-normalized class features.
  """
  t, c, length = token_ids.shape
  flat = np.asarray(token_ids).reshape(t * c, length)
  feats = jnp.concatenate(
    [
      clip.encode_text(flat[i : i + batch_size])
      for i in range(0, len(flat), batch_size)
    ]
  )
  return clip_lib.normalize(feats.reshape(t, c, -1).mean(0))


def class_text_features(
  clip: clip_lib.CLIP,
  classnames: Sequence[str],
  templates: Sequence[str] = (SINGLE_TEMPLATE,),
) -> jax.Array:
  """Normalized zero-shot classifier weights [C, D] for the class names.

  Use `templates=IMAGENET_TEMPLATES` for the 60-template ensemble of
  ProMetaR's frozen text teacher.
  """
  prompts = class_prompts(classnames, templates)
  ids = np.stack([clip.tokenize(p) for p in prompts])
  return template_text_features(clip, ids)


def teacher_text_features(clip, classnames):
  """ProMetaR's regularization target T0 (60 templates, normalized)."""
  return class_text_features(clip, classnames, IMAGENET_TEMPLATES)


def logits(clip, image_features, text_features):
  """logit_scale * cos: [N, D] x [C, D] -> [N, C]."""
  return (
    clip.logit_scale
    * clip_lib.normalize(image_features)
    @ clip_lib.normalize(text_features).T
  )


def top1_accuracy(scores, labels, mask=None) -> float:
  """Percentage of rows whose argmax equals the label (mask: rows to count)."""
  correct = np.asarray(jnp.argmax(scores, -1) == jnp.asarray(labels))
  mask = np.ones_like(correct) if mask is None else np.asarray(mask, bool)
  return 100.0 * float(correct[mask].sum()) / max(int(mask.sum()), 1)
