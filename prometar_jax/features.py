"""The class side of a step: token ids, teacher features, class mask.

`class_features` turns a list of class names into what the training step
(and the gradient-alignment analysis, which must measure exactly what
training computes) reads for those classes: the learner's class prompt
token ids, the frozen teacher text features T0 (CLIP's 60 ImageNet
templates, averaged) and a mask of real classes, placed on the mesh.
"""

from __future__ import annotations

import numpy as np

from prometar_jax import prompt_learners as pl
from prometar_jax import sharding as sharding_lib
from prometar_jax import zeroshot


def class_features(
  spec, clip, classnames, mesh, shard_classes, multiple=1, text_buckets=1
) -> dict:
  """Token ids, the 60-template teacher T0 and the mask, on the mesh.

  With `text_buckets` > 1 the class prompts are grouped by length
  (`prompt_learners.bucket_token_ids`, exact); not with class padding
  (`multiple` > 1), whose point is one shape for every dataset.
  """
  ids = pl.class_token_ids(spec.prompt, clip, classnames)
  teacher = np.asarray(zeroshot.teacher_text_features(clip, classnames))
  feats = {
    "token_ids": ids,
    "teacher": teacher.astype(np.float32),
    "class_mask": np.ones(len(ids), bool),
  }
  if text_buckets > 1 and multiple == 1:
    feats["token_ids"] = pl.bucket_token_ids(
      ids, text_buckets, shared_rows=pl.shared_prompt_rows(spec.prompt)
    )
  return sharding_lib.put_class_features(feats, mesh, shard_classes, multiple)
