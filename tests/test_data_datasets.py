"""CoOp layout readers, Dassl's few-shot selection and the base/new split.

Datasets are generated in tmp_path (tiny JPEGs, CoOp folder layout). The
expected few-shot lists come from `_dassl_reference`, an independent
plain-Python transcription of what Dassl + CoOp do (global `random`,
defaultdict tracker, read_split), not from the package code.
"""

import json
import math
import os
import random
from collections import defaultdict

import pytest

from prometar_jax import data
from prometar_jax.data import datasets, synthetic


def _dassl_reference(name, root, num_shots, seed, subsample):
  """Dassl's DatasetBase + CoOp dataset __init__, transcribed for the test."""
  ddir = os.path.join(os.path.abspath(root), datasets.get_spec(name).dirname)

  def read_json(split_file, prefix):
    with open(os.path.join(ddir, split_file)) as f:
      obj = json.load(f)
    return [
      [(os.path.join(prefix, p), int(y), c) for p, y, c in obj[k]]
      for k in ("train", "val", "test")
    ]

  def read_imagenet(split_dir, classnames):
    folders = sorted(f.name for f in os.scandir(split_dir) if f.is_dir())
    items = []
    for label, folder in enumerate(folders):
      names = [f for f in os.listdir(os.path.join(split_dir, folder))]
      names = [f for f in names if not f.startswith(".")]
      for n in names:
        items.append(
          (os.path.join(split_dir, folder, n), label, classnames[folder])
        )
    return items

  def generate_fewshot_dataset(data_source, k):
    tracker = defaultdict(list)
    for item in data_source:
      tracker[item[1]].append(item)
    out = []
    for _, items in tracker.items():
      out.extend(random.sample(items, k) if len(items) >= k else items)
    return out

  def subsample_classes(*args):
    if subsample == "all":
      return args
    labels = sorted({item[1] for item in args[0]})
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabeler = {y: i for i, y in enumerate(selected)}
    return [
      [(p, relabeler[y], c) for p, y, c in d if y in selected] for d in args
    ]

  if name == "eurosat":
    train, val, test = read_json(
      "split_zhou_EuroSAT.json", os.path.join(ddir, "2750")
    )
  elif name == "oxford_pets":
    train, val, test = read_json(
      "split_zhou_OxfordPets.json", os.path.join(ddir, "images")
    )
  elif name == "fgvc_aircraft":
    with open(os.path.join(ddir, "variants.txt")) as f:
      cname2lab = {c.strip(): i for i, c in enumerate(f.readlines())}
    splits = []
    for s in ("train", "val", "test"):
      with open(os.path.join(ddir, f"images_variant_{s}.txt")) as f:
        items = []
        for line in f.readlines():
          parts = line.strip().split(" ")
          c = " ".join(parts[1:])
          items.append(
            (os.path.join(ddir, "images", parts[0] + ".jpg"), cname2lab[c], c)
          )
        splits.append(items)
    train, val, test = splits
  elif name == "imagenet":
    classnames = {}
    with open(os.path.join(ddir, "classnames.txt")) as f:
      for line in f.readlines():
        parts = line.strip().split(" ")
        classnames[parts[0]] = " ".join(parts[1:])
    train = read_imagenet(os.path.join(ddir, "images", "train"), classnames)
    test = read_imagenet(os.path.join(ddir, "images", "val"), classnames)
    val = None
  else:
    raise NotImplementedError(name)

  state = random.getstate()
  try:
    random.seed(seed)  # Dassl's set_random_seed, first consumer after it.
    if num_shots >= 1:
      train = generate_fewshot_dataset(train, num_shots)
      if val is not None:
        val = generate_fewshot_dataset(val, min(num_shots, 4))
  finally:
    random.setstate(state)
  if val is None:
    train, test = subsample_classes(train, test)
    val = test
  else:
    train, val, test = subsample_classes(train, val, test)
  lab2cname = {y: c for _, y, c in train}
  classnames = [lab2cname[y] for y in sorted(lab2cname)]
  return {
    "classnames": classnames,
    "train": list(train),
    "val": list(val),
    "test": list(test),
  }


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """One root with EuroSAT-, Pets-, ImageNet- and FGVC-style datasets."""
  root = tmp_path_factory.mktemp("coop")
  # 7 classes: odd, so base (4) and new (3) differ in size.
  synthetic.make_coop_dataset(
    "eurosat", root, num_classes=7, per_class=(6, 5, 3), order="grouped"
  )
  synthetic.make_coop_dataset(
    "oxford_pets",
    root,
    num_classes=5,
    per_class=(7, 5, 2),
    order="shuffled",
    seed=1,
  )
  synthetic.make_coop_dataset(
    "imagenet", root, num_classes=5, per_class=(6, 0, 2), seed=2
  )
  synthetic.make_coop_dataset(
    "fgvc_aircraft",
    root,
    num_classes=6,
    per_class=(5, 5, 2),
    order="shuffled",
    seed=3,
  )
  return str(root)


def test_dataset_names():
  assert data.DATASET_NAMES == (
    "imagenet", "caltech101", "oxford_pets", "stanford_cars",
    "oxford_flowers", "food101", "fgvc_aircraft", "sun397", "dtd", "eurosat",
    "ucf101", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r",
  )  # fmt: skip
  assert datasets.get_spec("OxfordPets").name == "oxford_pets"
  assert datasets.get_spec("DescribableTextures").name == "dtd"
  with pytest.raises(ValueError, match="Unknown dataset"):
    datasets.get_spec("cifar10")


def test_eurosat_classnames_labels_counts(root):
  split = data.fewshot_split("eurosat", root, 0, 1, "all")
  names = list(datasets.EUROSAT_NAMES.values())[:7]
  assert split["classnames"] == names
  assert [len(split[k]) for k in ("train", "val", "test")] == [42, 35, 21]
  path, label, name = split["train"][6]
  assert path == os.path.join(
    root, "eurosat", "2750", "Forest", os.path.basename(path)
  )
  assert (label, name) == (1, "Forest") and os.path.isabs(path)
  for k in ("train", "val", "test"):
    assert all(names[y] == c for _, y, c in split[k])


@pytest.mark.parametrize("subsample", ["all", "base", "new"])
def test_eurosat_base_new(root, subsample):
  split = data.fewshot_split("eurosat", root, 4, 1, subsample)
  names = list(datasets.EUROSAT_NAMES.values())[:7]
  expected = {"all": names, "base": names[:4], "new": names[4:]}[subsample]
  assert split["classnames"] == expected
  n = len(expected)
  assert [len(split[k]) for k in ("train", "val", "test")] == [
    4 * n,
    4 * n,
    3 * n,
  ]
  for k in ("train", "val", "test"):
    assert sorted({y for _, y, _ in split[k]}) == list(range(n))
    assert all(expected[y] == c for _, y, c in split[k])


def test_oxford_pets_layout(root):
  split = data.fewshot_split("oxford_pets", root, 16, 1, "all")
  # Fewer than 16 images per class: Dassl keeps all (repeat=False).
  assert [len(split[k]) for k in ("train", "val", "test")] == [35, 20, 10]
  assert split["classnames"] == [
    "abyssinian", "american_bulldog", "bengal", "beagle", "boxer"
  ]  # fmt: skip
  path = split["train"][0][0]
  assert os.path.dirname(path) == os.path.join(root, "oxford_pets", "images")
  base = data.fewshot_split("oxford_pets", root, 2, 1, "base")
  new = data.fewshot_split("oxford_pets", root, 2, 1, "new")
  # 5 classes: ceil(5/2) = 3 base, 2 new, both relabeled from 0.
  assert base["classnames"] == ["abyssinian", "american_bulldog", "bengal"]
  assert new["classnames"] == ["beagle", "boxer"]
  assert len(base["test"]) == 6 and len(new["test"]) == 4


def test_imagenet_layout(root):
  split = data.fewshot_split("imagenet", root, 3, 1, "all")
  assert split["classnames"] == [f"class name {i}" for i in range(5)]
  assert len(split["train"]) == 15 and len(split["test"]) == 10
  # CoOp evaluates ImageNet's val folder and uses it as val too.
  assert split["val"] == split["test"]
  assert all(
    os.sep + os.path.join("images", "val") + os.sep in p
    for p, _, _ in split["test"]
  )
  new = data.fewshot_split("imagenet", root, 3, 1, "new")
  assert new["classnames"] == ["class name 3", "class name 4"]
  assert sorted({y for _, y, _ in new["test"]}) == [0, 1]


def test_imagenet_sorted_order_is_portable(root):
  a = data.fewshot_split("imagenet", root, 0, 1, imagenet_order="sorted")
  paths = [p for p, _, _ in a["train"]]
  assert paths == sorted(paths)


def test_fgvc_layout(root):
  split = data.fewshot_split("fgvc_aircraft", root, 0, 1, "all")
  assert split["classnames"] == [f"Model-{i}/{i}00" for i in range(6)]
  assert [len(split[k]) for k in ("train", "val", "test")] == [30, 30, 12]
  path, label, name = split["test"][0]
  assert os.path.dirname(path) == os.path.join(root, "fgvc_aircraft", "images")
  assert name == f"Model-{label}/{label}00"


@pytest.mark.parametrize(
  "name", ["eurosat", "oxford_pets", "imagenet", "fgvc_aircraft"]
)
@pytest.mark.parametrize("subsample", ["all", "base", "new"])
def test_fewshot_equals_dassl_reference(root, name, subsample):
  for seed in (1, 2, 3):
    ours = data.fewshot_split(name, root, 2, seed, subsample)
    ref = _dassl_reference(name, root, 2, seed, subsample)
    assert ours == ref


@pytest.mark.parametrize("name", ["eurosat", "oxford_pets", "fgvc_aircraft"])
def test_fewshot_seed_changes_selection(root, name):
  a = data.fewshot_split(name, root, 2, 1, "all")
  b = data.fewshot_split(name, root, 2, 1, "all")
  c = data.fewshot_split(name, root, 2, 2, "all")
  assert a == b
  assert a["train"] != c["train"]
  assert a["test"] == c["test"]


def test_first_appearance_order(root):
  # Pets' list is shuffled: the few-shot train groups must follow the label
  # order of first appearance in the JSON, not sorted labels.
  full = data.fewshot_split("oxford_pets", root, 0, 1)["train"]
  first_seen = list(dict.fromkeys(y for _, y, _ in full))
  assert first_seen != sorted(first_seen)
  few = data.fewshot_split("oxford_pets", root, 2, 1)["train"]
  assert [y for _, y, _ in few][::2] == first_seen


def test_random_sample_vectors():
  # The CPython stream the selection relies on (docs/datasets.md,
  # "Few-shot sampling").
  rng = random.Random(1)
  assert rng.sample(range(100), 16) == [
    17, 72, 97, 8, 32, 15, 63, 57, 60, 83, 48, 26, 12, 62, 3, 49
  ]  # fmt: skip
  assert rng.sample(range(50), 16) == [
    27, 38, 0, 44, 28, 17, 14, 37, 6, 20, 1, 39, 48, 34, 47, 24
  ]  # fmt: skip
  assert rng.sample(range(10), 4) == [3, 6, 0, 4]


def test_generate_fewshot_small_classes_kept_whole():
  items = [(f"p{i}", i % 3, f"c{i % 3}") for i in range(7)]
  out = data.generate_fewshot(items, 3, random.Random(0))
  # label 0 has 3 items (sampled), labels 1 and 2 have 2 (kept in order).
  assert [y for _, y, _ in out] == [0, 0, 0, 1, 1, 2, 2]
  assert out[3:] == [items[1], items[4], items[2], items[5]]


def test_subsample_classes_uses_first_split():
  train = [("a", 3, "d"), ("b", 1, "b"), ("c", 5, "f")]
  test = [("x", 0, "a"), ("y", 5, "f"), ("z", 1, "b")]
  base = data.subsample_classes(train, test, subsample="base")
  assert base == ([("a", 1, "d"), ("b", 0, "b")], [("z", 0, "b")])
  new = data.subsample_classes(train, test, subsample="new")
  assert new == ([("c", 0, "f")], [("y", 0, "f")])
  with pytest.raises(ValueError, match="subsample"):
    data.subsample_classes(train, subsample="novel")


@pytest.mark.parametrize(
  "name", ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
)
def test_imagenet_variants(tmp_path, name):
  written = synthetic.make_coop_dataset(
    name, tmp_path, num_classes=3, per_class=(2, 0, 0)
  )
  split = data.fewshot_split(name, tmp_path, 16, 1, "base")
  # Test-only: no few-shot selection, no subsampling, train = test.
  assert split["train"] == split["test"] and split["val"] == []
  assert sorted(split["test"]) == sorted(written["test"])
  if name in ("imagenet_a", "imagenet_r"):
    # Labels 0..n-1 over the sorted folders present, not classnames.txt rows.
    assert split["classnames"] == [
      "class name 1",
      "class name 3",
      "class name 5",
    ]
  else:
    assert split["classnames"] == [
      "class name 0",
      "class name 1",
      "class name 2",
    ]


def test_error_missing_dataset_folder(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    data.fewshot_split("dtd", tmp_path, 16, 1, "base")
  msg = str(e.value)
  assert os.path.join(str(tmp_path), "dtd") in msg
  assert "docs/datasets.md" in msg
  assert "split_zhou_DescribableTextures.json" in msg


def test_error_missing_split_file(tmp_path):
  os.makedirs(tmp_path / "caltech-101" / "101_ObjectCategories")
  with pytest.raises(FileNotFoundError, match="split_zhou_Caltech101.json"):
    data.fewshot_split("caltech101", tmp_path, 16, 1, "all")


def test_error_missing_fgvc_file(tmp_path):
  synthetic.make_coop_dataset("fgvc_aircraft", tmp_path, 2, (1, 1, 1))
  os.remove(tmp_path / "fgvc_aircraft" / "images_variant_val.txt")
  with pytest.raises(FileNotFoundError, match="images_variant_val.txt"):
    data.fewshot_split("fgvc_aircraft", tmp_path, 1, 1, "all")


def test_error_missing_image(tmp_path):
  written = synthetic.make_coop_dataset("dtd", tmp_path, 2, (2, 1, 1))
  os.remove(written["test"][1][0])
  with pytest.raises(FileNotFoundError, match=written["test"][1][0]):
    data.fewshot_split("dtd", tmp_path, 1, 1, "all")


def test_error_classnames_mismatch_json(tmp_path):
  synthetic.make_coop_dataset("food101", tmp_path, 2, (2, 1, 1))
  path = tmp_path / "food-101" / "split_zhou_Food101.json"
  obj = json.loads(path.read_text())
  obj["test"][0][2] = "apple pie"
  path.write_text(json.dumps(obj))
  with pytest.raises(ValueError, match="Class names do not match.*apple pie"):
    data.fewshot_split("food101", tmp_path, 0, 1, "all")


def test_error_classnames_mismatch_imagenet(tmp_path):
  synthetic.make_coop_dataset("imagenet_sketch", tmp_path, 3, (1, 0, 0))
  path = tmp_path / "imagenet-sketch" / "classnames.txt"
  lines = path.read_text().splitlines()
  path.write_text("\n".join(lines[1:]) + "\n")
  with pytest.raises(ValueError, match="Class names do not match.*n01440764"):
    data.fewshot_split("imagenet_sketch", tmp_path, 0, 1, "all")


def test_error_classnames_mismatch_fgvc(tmp_path):
  synthetic.make_coop_dataset("fgvc_aircraft", tmp_path, 2, (1, 1, 1))
  path = tmp_path / "fgvc_aircraft" / "variants.txt"
  path.write_text("Model-0/000\nBoeing 737\n")
  with pytest.raises(ValueError, match="Class names do not match.*Model-1/100"):
    data.fewshot_split("fgvc_aircraft", tmp_path, 1, 1, "all")


def test_error_bad_split_json(tmp_path):
  synthetic.make_coop_dataset("sun397", tmp_path, 2, (1, 1, 1))
  (tmp_path / "sun397" / "split_zhou_SUN397.json").write_text('{"train": []}')
  with pytest.raises(ValueError, match="'train', 'val' and 'test'"):
    data.fewshot_split("sun397", tmp_path, 1, 1, "all")
