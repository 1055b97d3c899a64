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
  build_tfds(name, root, data_dir) / TfdsSource(name, root, data_dir): encode
    a CoOp folder once with TFDS and read the images from it;
    records_dataset(name, data_dir, split): a build as tf.data (tfds_coop.py).
  catalog_split(name, num_shots, seed, subsample, data_dir=None) /
    CatalogSource(name, data_dir): TFDS catalog datasets, not the CoOp splits
    (tfds_catalog.py).
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
from prometar_jax.data.tfds_catalog import CatalogSource, catalog_split
from prometar_jax.data.tfds_coop import (
  CoopDataset,
  TfdsSource,
  build_tfds,
  load_tfds,
  make_builder,
  records_dataset,
)

__all__ = [
  "DATASET_NAMES",
  "build_tfds",
  "catalog_split",
  "CatalogSource",
  "classnames_of",
  "CoopDataset",
  "EvalPipeline",
  "fewshot_split",
  "FileSource",
  "generate_fewshot",
  "get_spec",
  "ImageReadError",
  "load_tfds",
  "make_builder",
  "make_eval_dataset",
  "make_train_dataset",
  "read_splits",
  "records_dataset",
  "subsample_classes",
  "TfdsSource",
  "to_global",
  "TrainPipeline",
]
