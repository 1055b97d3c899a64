"""TFDS routes: the CoOp manual_dir builder and the catalog datasets."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from prometar_jax import data
from prometar_jax.data import datasets, synthetic, tfds_catalog, tfds_coop


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """A tiny EuroSAT folder and its TFDS build: (root, data_dir, builder)."""
  root = str(tmp_path_factory.mktemp("coop"))
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  synthetic.make_coop_dataset(
    "eurosat", root, num_classes=4, per_class=(5, 3, 3), order="shuffled"
  )
  tfds.disable_progress_bar()
  builder = tfds_coop.build_tfds("eurosat", root, data_dir)
  return root, data_dir, builder


def test_builder_records_follow_split_lists(built):
  root, _, builder = built
  ddir = datasets.dataset_dir("eurosat", root)
  lists = datasets.read_splits("eurosat", ddir)
  sources = builder.as_data_source(
    split=["train", "val", "test"],
    decoders={"image": tfds.decode.SkipDecoding()},
  )
  for split, source in zip(("train", "val", "test"), sources):
    assert builder.info.splits[split].num_examples == len(lists[split])
    for i, (path, label, classname) in enumerate(lists[split]):
      record = source[i]
      assert record["index"] == i and record["label"] == label
      assert record["classname"].decode() == classname
      assert os.path.join(ddir, record["file_name"].decode()) == path
      with open(path, "rb") as f:
        assert record["image"] == f.read()  # stored without re-encoding
  meta = builder.info.metadata["file_names"]
  assert list(meta) == ["train", "val", "test"]


def test_records_dataset(built):
  root, data_dir, _ = built
  lists = datasets.read_splits("eurosat", datasets.dataset_dir("eurosat", root))
  records = list(tfds_coop.records_dataset("eurosat", data_dir, "val"))
  assert len(records) == len(lists["val"])
  for i, (record, (path, label, classname)) in enumerate(
    zip(records, lists["val"])
  ):
    assert int(record["index"]) == i and int(record["label"]) == label
    assert record["classname"].numpy().decode() == classname
    assert path.endswith(record["file_name"].numpy().decode())
    with open(path, "rb") as f:
      assert record["image"].numpy() == f.read()


def test_builder_configs_cover_all_datasets():
  names = [c.name for c in tfds_coop.CoopDataset.BUILDER_CONFIGS]
  assert tuple(names) == data.DATASET_NAMES
  assert tfds_coop._builder_splits("imagenet") == ("train", "test")
  assert tfds_coop._builder_splits("imagenet_r") == ("test",)


def test_tfds_source_gives_the_same_batches(built):
  root, data_dir, _ = built
  split = data.fewshot_split("eurosat", root, 2, 1, "base")
  source = tfds_coop.TfdsSource("eurosat", root, data_dir)
  for pipe_fn in (
    lambda src: list(
      data.make_train_dataset(
        split["train"], 2, 3, 24, source=src
      ).iterate_epoch(1)
    ),
    lambda src: list(data.make_eval_dataset(split["test"], 4, 24, source=src)),
  ):
    ours, files = pipe_fn(source), pipe_fn(None)
    assert len(ours) == len(files) > 0
    for a, b in zip(ours, files):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_tfds_source_unknown_ref(built):
  root, data_dir, _ = built
  source = tfds_coop.TfdsSource("eurosat", root, data_dir)
  with pytest.raises(KeyError, match="not in the TFDS build"):
    source.keys([os.path.join(root, "eurosat", "2750", "new.jpg")])


def test_tfds_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="build_tfds"):
    tfds_coop.load_tfds("dtd", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="docs/datasets.md"):
    tfds_coop.build_tfds("dtd", str(tmp_path), str(tmp_path / "out"))


def test_catalog_eurosat_mock(tmp_path):
  with tfds.testing.mock_data(num_examples=60):
    split = tfds_catalog.catalog_split(
      "eurosat", 2, 1, "all", data_dir=str(tmp_path)
    )
    assert set(split["classnames"]) <= set(datasets.EUROSAT_NAMES.values())
    assert all(r.startswith("eurosat/rgb:train:") for r, _, _ in split["train"])
    # 50/20/30 of the single catalog split, by record position.
    assert all(int(r.split(":")[-1]) < 30 for r, _, _ in split["train"])
    assert all(int(r.split(":")[-1]) >= 42 for r, _, _ in split["test"])
    counts = np.bincount([y for _, y, _ in split["train"]])
    assert counts.max() <= 2
    base = tfds_catalog.catalog_split(
      "eurosat", 2, 1, "base", data_dir=str(tmp_path)
    )
    n = len(split["classnames"])
    assert base["classnames"] == split["classnames"][: (n + 1) // 2]
    source = tfds_catalog.CatalogSource("eurosat", str(tmp_path))
    pipe = data.make_eval_dataset(base["test"], 4, 16, source=source)
    batches = list(pipe)
  assert len(batches) == pipe.num_batches
  assert batches[0]["image"].shape == (4, 16, 16, 3)


def test_catalog_imagenet_a_subset_mock(tmp_path):
  names = tmp_path / "classnames.txt"
  names.write_text("n01440764 tench\nn01443537 goldfish\n")
  with tfds.testing.mock_data(num_examples=30):
    split = tfds_catalog.catalog_split(
      "imagenet_a", 16, 1, "base", data_dir=str(tmp_path), classnames_file=names
    )
  labels = sorted({y for _, y, _ in split["test"]})
  # Labels are 0..n-1 over the classes present, as CoOp's 200-class subset;
  # test-only: no few-shot selection, no subsampling.
  assert labels == list(range(len(split["classnames"])))
  assert len(split["test"]) == 30
  assert split["train"] == split["test"] and split["val"] == []


def test_catalog_errors(tmp_path):
  with pytest.raises(ValueError, match="no usable TFDS catalog"):
    tfds_catalog.catalog_split("fgvc_aircraft", 16, 1)
  with pytest.raises(FileNotFoundError, match="array_record"):
    tfds_catalog.catalog_split("dtd", 16, 1, data_dir=str(tmp_path))
