"""A TFDS builder for the CoOp folders, and a pipeline source reading it.

Encoding a dataset once turns thousands of small files into a few
ArrayRecord files that are read with random access afterwards:

    build_tfds("eurosat", root="/data", data_dir="/tfds")      # once
    split = fewshot_split("eurosat", "/data", 16, 1, "base")   # as usual
    source = TfdsSource("eurosat", "/data", data_dir="/tfds")
    train = make_train_dataset(split["train"], 4, 1, source=source)

`CoopDataset` (registered as "coop_dataset", one BuilderConfig per name in
`datasets.DATASET_NAMES`) takes the dataset folder (`<root>/<dirname>`) as
its manual_dir and writes the full split lists in Dassl's order (test-only
datasets: "test"; ImageNet: "train" and "test"). Records are not shuffled
(`disable_shuffling=True`), so record i of a split is item i of the list.
Features: image (the original file bytes, not re-encoded), label, classname,
file_name (path relative to the dataset folder), index (position in the
list). The file names per split are also stored in the dataset's
metadata.json, so `TfdsSource` maps an item's path to its record without
reading the records.

The few-shot selection stays in `fewshot_split` (plain Python on the split
lists): the TFDS records are only a faster way to fetch the same images.
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from prometar_jax.data import datasets

_SPLITS = ("train", "val", "test")
# Keys pack (split, record) into one int64 for tf.data.
_SPLIT_SHIFT = 40


def _builder_splits(name):
  spec = datasets.get_spec(name)
  if spec.name in datasets.TEST_ONLY:
    return ("test",)
  if spec.kind == "imagenet":
    return ("train", "test")  # val is the test list
  return _SPLITS


class CoopDataset(tfds.core.GeneratorBasedBuilder):
  """CoOp-layout dataset folder (manual_dir) -> TFDS records, Dassl order."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "CoOp split lists, original image bytes."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "manual_dir is one CoOp dataset folder, e.g. <DATA>/eurosat, prepared "
    "as in docs/datasets.md (CoOp's DATASETS.md)."
  )
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(
      name=spec.name,
      description=f"CoOp {spec.coop_class}: {datasets.layout_hint(spec)}",
    )
    for spec in datasets.SPECS.values()
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(
            shape=(None, None, 3), encoding_format="jpeg"
          ),
          "label": np.int64,
          "classname": tfds.features.Text(),
          "file_name": tfds.features.Text(),
          "index": np.int64,
        }
      ),
      supervised_keys=("image", "label"),
      # Otherwise TFDS orders records by key hash, not by the split list.
      disable_shuffling=True,
      metadata=tfds.core.MetadataDict(),
      homepage="https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md",
    )

  def _split_generators(self, dl_manager):
    ddir = os.fspath(dl_manager.manual_dir)
    lists = datasets.read_splits(self.builder_config.name, ddir)
    names = _builder_splits(self.builder_config.name)
    file_names = {
      s: [os.path.relpath(p, ddir) for p, _, _ in lists[s]] for s in names
    }
    self.info.metadata["file_names"] = file_names
    return {s: self._generate_examples(lists[s], file_names[s]) for s in names}

  def _generate_examples(self, items, file_names):
    for i, ((path, label, classname), rel) in enumerate(zip(items, file_names)):
      yield (
        i,
        {
          # A path is stored as its raw bytes, without re-encoding.
          "image": path,
          "label": label,
          "classname": classname,
          "file_name": rel,
          "index": i,
        },
      )


def make_builder(name: str, data_dir: str) -> CoopDataset:
  """The `CoopDataset` builder of dataset `name` under `data_dir`."""
  spec = datasets.get_spec(name)
  return CoopDataset(
    config=spec.name, data_dir=os.fspath(data_dir), file_format="array_record"
  )


def build_tfds(name: str, root: str, data_dir: str) -> CoopDataset:
  """Encodes `<root>/<dirname>` into TFDS ArrayRecord files under `data_dir`.

  Args:
    name: dataset config name.
    root: the CoOp data root (as for `fewshot_split`).
    data_dir: TFDS data directory to write to.

  Returns:
    The prepared builder (`as_data_source()` / `as_dataset()` read it).
  """
  ddir = datasets.dataset_dir(name, root)
  spec = datasets.get_spec(name)
  if not os.path.isdir(ddir):
    raise datasets._missing("Dataset folder", ddir, spec)
  builder = make_builder(name, data_dir)
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=ddir)
  )
  return builder


def load_tfds(name: str, data_dir: str) -> CoopDataset:
  """A builder prepared by `build_tfds`; raises if it was not built."""
  builder = make_builder(name, data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(
      f"No TFDS build of '{name}' in {data_dir}: run "
      f"prometar_jax.data.build_tfds({name!r}, <root>, {data_dir!r}) first."
    )
  return builder


def records_dataset(name: str, data_dir: str, split: str) -> tf.data.Dataset:
  """All records of one split of a build, in order, as a tf.data.Dataset.

  ArrayRecord builds have no `as_dataset()`; this reads them by index.
  Elements: {"image": encoded bytes, "label", "classname", "file_name",
  "index"}; decode images with `pp_ops.decode`.
  """
  builder = load_tfds(name, data_dir)
  source = builder.as_data_source(
    split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
  )
  spec = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
    "classname": tf.io.FixedLenFeature([], tf.string),
    "file_name": tf.io.FixedLenFeature([], tf.string),
    "index": tf.io.FixedLenFeature([], tf.int64),
  }

  def read(i):
    record = tf.numpy_function(
      lambda k: source[int(k)], [i], tf.string, stateful=False
    )
    record.set_shape([])
    return tf.io.parse_single_example(record, spec)

  ds = tf.data.Dataset.range(len(source))
  return ds.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsSource:
  """Pipeline source reading image bytes of CoOp items from a TFDS build.

  Args:
    name: dataset config name.
    root: the CoOp data root the items' paths start with.
    data_dir: where `build_tfds` wrote the dataset.
  """

  name: str
  root: str
  data_dir: str

  def __post_init__(self):
    builder = load_tfds(self.name, self.data_dir)
    file_names = builder.info.metadata["file_names"]
    splits = list(file_names)
    ddir = datasets.dataset_dir(self.name, self.root)
    index = {}
    for s_id, split in enumerate(splits):
      for i, rel in enumerate(file_names[split]):
        index.setdefault(os.path.join(ddir, rel), (s_id << _SPLIT_SHIFT) | i)
    # Raw serialized records: parsing them in-graph (read) keeps the work
    # under tf.data's threads instead of Python's GIL.
    sources = builder.as_data_source(
      split=splits, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
    )
    # Frozen dataclass: derived lookup tables are set once, here.
    object.__setattr__(self, "_index", index)
    object.__setattr__(self, "_sources", list(sources))

  def keys(self, refs):
    try:
      return np.asarray([self._index[r] for r in refs], np.int64)
    except KeyError as e:
      raise KeyError(
        f"Image {e.args[0]} is not in the TFDS build of '{self.name}' in "
        f"{self.data_dir}; rebuild it if the dataset folder changed."
      ) from None

  def _fetch(self, key):
    key = int(key)
    return self._sources[key >> _SPLIT_SHIFT][key & ((1 << _SPLIT_SHIFT) - 1)]

  def read(self, key):
    record = tf.numpy_function(self._fetch, [key], tf.string, stateful=False)
    record.set_shape([])
    return _parse_image(record)

  def read_py(self, ref):
    return _parse_image(self._fetch(self.keys([ref])[0])).numpy()


def _parse_image(record):
  # TFDS stores each example as a tf.train.Example; "image" holds the bytes.
  spec = {"image": tf.io.FixedLenFeature([], tf.string)}
  return tf.io.parse_single_example(record, spec)["image"]
