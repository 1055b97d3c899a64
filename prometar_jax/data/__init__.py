"""Input data for ProMetaR: CoOp datasets, Dassl few-shot splits, tf.data.

Public API:
  fewshot_split(name, root, num_shots, seed, subsample) -> {"classnames",
    "train", "val", "test"} with (absolute_image_path, label, classname) items,
    in the order Dassl holds them (datasets.py).
  DATASET_NAMES: the 15 CoOp config names.
"""

from prometar_jax.data.datasets import (
  DATASET_NAMES,
  fewshot_split,
  get_spec,
  read_splits,
)
from prometar_jax.data.fewshot import (
  classnames_of,
  generate_fewshot,
  subsample_classes,
)

__all__ = [
  "DATASET_NAMES",
  "classnames_of",
  "fewshot_split",
  "generate_fewshot",
  "get_spec",
  "read_splits",
  "subsample_classes",
]
