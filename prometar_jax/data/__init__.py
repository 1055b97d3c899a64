"""Input data for ProMetaR: CoOp datasets, Dassl few-shot splits, tf.data.

Public API:
  fewshot_split(name, root, num_shots, seed, subsample) -> {"classnames",
    "train", "val", "test"} with (absolute_image_path, label, classname) items,
    in the order Dassl holds them (datasets.py).
  DATASET_NAMES: the 15 CoOp config names.
  make_train_dataset(items, batch_size, seed, image_size=224, process_index=0,
    process_count=1, source=None) -> TrainPipeline with `steps_per_epoch` and
    `iterate_epoch(epoch, start_step=0)` yielding {"image" float32 [B/P, S, S,
    3], "label" int32 [B/P]} numpy batches (input_pipeline.py).
  make_eval_dataset(items, batch_size, image_size=224, process_index=0,
    process_count=1, source=None) -> EvalPipeline, iterable, `num_batches`,
    batches {"image", "label", "mask" bool} of one fixed shape.
  to_global(batch, sharding) -> dict of global jax.Arrays.
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
from prometar_jax.data.input_pipeline import (
  EvalPipeline,
  FileSource,
  ImageReadError,
  TrainPipeline,
  make_eval_dataset,
  make_train_dataset,
  to_global,
)

__all__ = [
  "DATASET_NAMES",
  "EvalPipeline",
  "FileSource",
  "ImageReadError",
  "TrainPipeline",
  "make_eval_dataset",
  "make_train_dataset",
  "to_global",
  "classnames_of",
  "fewshot_split",
  "generate_fewshot",
  "get_spec",
  "read_splits",
  "subsample_classes",
]
