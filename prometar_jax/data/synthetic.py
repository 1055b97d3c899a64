"""Tiny CoOp-layout datasets with random JPEGs, for tests and smoke runs.

`make_coop_dataset("eurosat", root, num_classes=4, per_class=(6, 3, 3))`
writes `<root>/eurosat/2750/<Folder>/<Folder>_<i>.jpg` plus a
`split_zhou_EuroSAT.json` in CoOp's format, and returns the split lists it
wrote (absolute paths), so a test can compare a reader against what is on
disk. Every dataset of `datasets.DATASET_NAMES` has a writer that produces
its exact folder layout (docs/datasets.md). Nothing here is used by training.
"""

import json
import os
import random

import numpy as np
from PIL import Image

from prometar_jax.data import datasets


def write_jpeg(path, rng, size=(32, 40), quality=90):
  """A smooth random RGB JPEG of `size` (height, width) at `path`."""
  h, w = size
  coarse = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3))
  img = Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BILINEAR)
  noise = rng.integers(-12, 13, (h, w, 3))
  arr = np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(arr).save(path, quality=quality)


def _classes(name, num_classes):
  """(folder, classname) pairs in label order, styled like the dataset."""
  if name == "eurosat":
    pairs = list(datasets.EUROSAT_NAMES.items())
    if num_classes > len(pairs):
      raise ValueError("EuroSAT has 10 classes.")
    return pairs[:num_classes]
  if name == "oxford_pets":
    # Breed prefixes, capitalised for cats as in the real file names.
    breeds = ["Abyssinian", "american_bulldog", "Bengal", "beagle", "boxer"]
    breeds += [f"breed_{i}" for i in range(len(breeds), num_classes)]
    return [(b, b.lower()) for b in breeds[:num_classes]]
  if name == "ucf101":
    return [(f"Action_Num{i}", f"Action_Num{i}") for i in range(num_classes)]
  if name == "sun397":
    return [
      (f"{c}/{c}class{i}/outdoor", f"outdoor {c}class{i}")
      for i, c in zip(range(num_classes), "abcdefghijklmnopqrstuvwxyz" * 20)
    ]
  return [(f"class_{i:03d}", f"class {i}") for i in range(num_classes)]


def _rel_path(name, folder, label, i):
  if name == "oxford_pets":
    return f"{folder}_{i + 1}.jpg"
  if name == "oxford_flowers":
    return f"image_{label:03d}{i:03d}.jpg"
  if name == "stanford_cars":
    return f"cars_train/{label:03d}{i:03d}.jpg"
  if name == "eurosat":
    return f"{folder}/{folder}_{i + 1}.jpg"
  if name == "ucf101":
    return f"{folder}/v_{folder}_g{i:02d}_c01.jpg"
  return f"{folder}/image_{i:04d}.jpg"


def make_coop_dataset(
  name,
  root,
  num_classes=4,
  per_class=(6, 3, 3),
  image_size=(32, 40),
  order="grouped",
  seed=0,
):
  """Writes a tiny dataset `name` in CoOp layout under `root`.

  Args:
    name: one of `datasets.DATASET_NAMES`.
    root: the data root; the dataset folder is created inside it.
    num_classes: number of classes.
    per_class: images per class in (train, val, test); ImageNet uses
      (train, -, val) and the test-only variants the first entry only.
    image_size: (height, width) of every JPEG.
    order: "grouped" writes split lists grouped by ascending label (CoOp's
      DTD-style splits); "shuffled" shuffles them (labels then first appear
      in a scrambled order, like FGVC's id-sorted lists).
    seed: seeds the pixels and the shuffling.

  Returns:
    {"train", "val", "test"}: the lists written, `(abs_path, label, name)`.
  """
  spec = datasets.get_spec(name)
  ddir = datasets.dataset_dir(name, root)
  rng = np.random.default_rng(seed)
  shuffler = random.Random(seed)
  n_train, n_val, n_test = per_class
  classes = _classes(spec.name, num_classes)

  def arrange(items):
    if order == "shuffled":
      shuffler.shuffle(items)
    return items

  if spec.kind == "json":
    image_dir = os.path.join(ddir, spec.image_dir) if spec.image_dir else ddir
    split = {"train": [], "val": [], "test": []}
    counter = 0
    for label, (folder, classname) in enumerate(classes):
      for key, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for _ in range(n):
          rel = _rel_path(spec.name, folder, label, counter)
          counter += 1
          write_jpeg(os.path.join(image_dir, rel), rng, image_size)
          split[key].append([rel, label, classname])
    split = {k: arrange(v) for k, v in split.items()}
    with open(os.path.join(ddir, spec.split_file), "w") as f:
      json.dump(split, f, indent=4, separators=(",", ": "))
    return {
      k: [(os.path.join(image_dir, r), y, c) for r, y, c in v]
      for k, v in split.items()
    }

  if spec.kind == "fgvc":
    variants = [f"Model-{i}/{i}00" for i in range(num_classes)]
    with open(os.path.join(_mkdir(ddir), "variants.txt"), "w") as f:
      f.write("".join(v + "\n" for v in variants))
    out, image_id = {}, 1000000
    for key, n in (("train", n_train), ("val", n_val), ("test", n_test)):
      entries = []
      for label, variant in enumerate(variants):
        for _ in range(n):
          image_id += 1
          entries.append((str(image_id), label, variant))
      entries = arrange(entries)
      with open(os.path.join(ddir, f"images_variant_{key}.txt"), "w") as f:
        f.write("".join(f"{i} {v}\n" for i, _, v in entries))
      for i, _, _ in entries:
        write_jpeg(os.path.join(ddir, "images", f"{i}.jpg"), rng, image_size)
      out[key] = [
        (os.path.join(ddir, "images", f"{i}.jpg"), y, v) for i, y, v in entries
      ]
    return out

  # ImageNet-style: classnames.txt of "<wnid> <name>" lines.
  # -A and -R hold a subset of the classes listed in classnames.txt.
  subset = spec.name in ("imagenet_a", "imagenet_r")
  n_listed = 2 * num_classes if subset else num_classes
  all_wnids = [f"n{1440764 + 17 * i:08d}" for i in range(n_listed)]
  all_names = [f"class name {i}" for i in range(n_listed)]
  with open(os.path.join(_mkdir(ddir), "classnames.txt"), "w") as f:
    f.write("".join(f"{w} {c}\n" for w, c in zip(all_wnids, all_names)))
  wnids = all_wnids[1::2] if subset else all_wnids
  names = all_names[1::2] if subset else all_names
  image_dir = os.path.join(ddir, spec.image_dir)

  def fill(split_dir, folders, n):
    items = []
    for label, folder in enumerate(folders):
      for i in range(n):
        path = os.path.join(split_dir, folder, f"{folder}_{i:05d}.JPEG")
        write_jpeg(path, rng, image_size)
        items.append((path, label, names[label]))
    return items

  if spec.kind == "imagenet":
    train = fill(os.path.join(image_dir, "train"), wnids, n_train)
    test = fill(os.path.join(image_dir, "val"), wnids, n_test)
    return {"train": train, "val": test, "test": test}
  if spec.kind == "imagenetv2":
    data = fill(image_dir, [str(i) for i in range(num_classes)], n_train)
    return {"train": data, "val": [], "test": data}
  data = fill(image_dir, wnids, n_train)
  if subset:
    with open(os.path.join(image_dir, "README.txt"), "w") as f:
      f.write("ignored by the reader\n")
  return {"train": data, "val": [], "test": data}


def _mkdir(path):
  os.makedirs(path, exist_ok=True)
  return path
