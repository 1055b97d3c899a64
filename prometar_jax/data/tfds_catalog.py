"""TFDS catalog datasets (eurosat, dtd, oxford_flowers102, ...) as a source.

These are NOT the CoOp splits. The catalog versions have other train/val/test
partitions (EuroSAT even has a single split, cut here 50/20/30 by record
position), Caltech101 lists 102 lower-cased classes, SUN397 is re-encoded
and downscaled, and so on (docs/datasets.md, "TFDS catalog datasets").
Numbers obtained with them are not comparable with the paper; use
`fewshot_split` on the CoOp folders (or `tfds_coop`) for that. The catalog
route is for quick experiments where the official files are not at hand.

    split = catalog_split("eurosat", num_shots=16, seed=1, subsample="base")
    source = CatalogSource("eurosat")
    train = make_train_dataset(split["train"], 4, 1, source=source)

The datasets must be prepared in ArrayRecord format, which allows random
access: `tfds.builder(name, file_format="array_record").download_and_prepare()`.
Item refs are "<tfds name>:<split>:<record index>". Few-shot selection and
class subsampling follow Dassl exactly on the record order
(`fewshot.dassl_protocol`).
"""

import dataclasses
import io

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from prometar_jax.data import datasets, fewshot


def _eurosat(name):
  return datasets.EUROSAT_NAMES.get(name, name)


def _cars(name):
  # CoOp moves the trailing year to the front: "2000 AM General Hummer SUV".
  words = name.split(" ")
  return " ".join(words[-1:] + words[:-1])


def _sun397(name):
  # "/a/apartment_building/outdoor" -> "outdoor apartment_building" (CoOp).
  parts = name.strip("/").split("/")[1:]
  return " ".join(reversed(parts))


_CALTECH_RENAME = {
  "airplanes": "airplane",
  "faces": "face",
  "leopards": "leopard",
  "motorbikes": "motorbike",
}


@dataclasses.dataclass(frozen=True)
class CatalogSpec:
  """A catalog dataset and how it stands in for a CoOp dataset.

  Attributes:
    tfds_name: catalog name with config.
    splits: (train, val, test), each None or (split, start, stop) with start
      and stop fractions of that split's records.
    rename: class name processing toward CoOp's names.
    ignore: catalog class names dropped (CoOp drops them too).
    subset: relabel 0..n-1 over the classes present (ImageNet-A/-R).
  """

  tfds_name: str
  splits: tuple
  rename: object = None
  ignore: tuple[str, ...] = ()
  subset: bool = False


_ALL = (0.0, 1.0)
CATALOG = {
  "eurosat": CatalogSpec(
    "eurosat/rgb",
    (("train", 0.0, 0.5), ("train", 0.5, 0.7), ("train", 0.7, 1.0)),
    _eurosat,
  ),
  "dtd": CatalogSpec(
    "dtd", (("train", *_ALL), ("validation", *_ALL), ("test", *_ALL))
  ),
  "oxford_flowers": CatalogSpec(
    "oxford_flowers102",
    (("train", *_ALL), ("validation", *_ALL), ("test", *_ALL)),
  ),
  "oxford_pets": CatalogSpec(
    "oxford_iiit_pet",
    (("train", 0.0, 0.8), ("train", 0.8, 1.0), ("test", *_ALL)),
    str.lower,
  ),
  "caltech101": CatalogSpec(
    "caltech101",
    (("train", 0.0, 0.8), ("train", 0.8, 1.0), ("test", *_ALL)),
    lambda n: _CALTECH_RENAME.get(n, n),
    ignore=("background_google", "faces_easy"),
  ),
  "stanford_cars": CatalogSpec(
    "cars196",
    (("train", 0.0, 0.8), ("train", 0.8, 1.0), ("test", *_ALL)),
    _cars,
  ),
  "food101": CatalogSpec(
    "food101",
    (("train", 0.0, 0.8), ("train", 0.8, 1.0), ("validation", *_ALL)),
  ),
  "sun397": CatalogSpec(
    "sun397/tfds",
    (("train", *_ALL), ("validation", *_ALL), ("test", *_ALL)),
    _sun397,
  ),
  "imagenet": CatalogSpec(
    "imagenet2012", (("train", *_ALL), None, ("validation", *_ALL))
  ),
  "imagenetv2": CatalogSpec(
    "imagenet_v2/matched-frequency", (None, None, ("test", *_ALL))
  ),
  "imagenet_sketch": CatalogSpec(
    "imagenet_sketch", (None, None, ("test", *_ALL))
  ),
  "imagenet_a": CatalogSpec(
    "imagenet_a", (None, None, ("test", *_ALL)), subset=True
  ),
  "imagenet_r": CatalogSpec(
    "imagenet_r", (None, None, ("test", *_ALL)), subset=True
  ),
}
# No catalog counterpart: FGVC only as 72-pixel decathlon images, UCF101 only
# as videos (CoOp uses middle frames).
NOT_IN_CATALOG = ("fgvc_aircraft", "ucf101")


def get_catalog_spec(name: str) -> CatalogSpec:
  if name not in CATALOG:
    hint = (
      " It has no usable TFDS catalog version; use the CoOp folder."
      if name in NOT_IN_CATALOG
      else ""
    )
    raise ValueError(
      f"No catalog dataset for {name!r}.{hint} Available: {sorted(CATALOG)}."
    )
  return CATALOG[name]


def _open_sources(spec, data_dir):
  base_splits = sorted({s[0] for s in spec.splits if s is not None})
  try:
    sources = tfds.data_source(
      spec.tfds_name,
      split=base_splits,
      data_dir=data_dir,
      decoders={"image": tfds.decode.SkipDecoding()},
      download=False,
    )
  except Exception as e:
    raise FileNotFoundError(
      f"TFDS dataset {spec.tfds_name} is not prepared in ArrayRecord format "
      f"in {data_dir or '~/tensorflow_datasets'}: run tfds.builder("
      f"{spec.tfds_name!r}, file_format='array_record').download_and_prepare()"
      " (see docs/datasets.md)."
    ) from e
  return dict(zip(base_splits, sources))


def _labels_of(source):
  n = len(source)
  try:
    # Batched reads are much faster on ArrayRecord data sources.
    records = [
      r
      for start in range(0, n, 4096)
      for r in source.__getitems__(list(range(start, min(start + 4096, n))))
    ]
  except (AttributeError, TypeError):  # e.g. tfds.testing.mock_data sources
    records = [source[i] for i in range(n)]
  return [int(r["label"]) for r in records]


def _read_wnid_names(path):
  names = {}
  with open(path) as f:
    for line in f:
      wnid, _, name = line.strip().partition(" ")
      if wnid:
        names[wnid] = name.strip()
  return names


def catalog_split(
  name: str,
  num_shots: int | None,
  seed: int,
  subsample: str = "all",
  *,
  data_dir: str | None = None,
  classnames_file: str | None = None,
) -> dict[str, list]:
  """Like `fewshot_split`, on a TFDS catalog dataset (not the CoOp splits).

  Args:
    name: CoOp config name with a catalog counterpart (see `CATALOG`).
    num_shots: images per class; None or <= 0 keeps all.
    seed: seed of the Dassl-style selection.
    subsample: "all", "base" or "new".
    data_dir: TFDS data directory (None: TFDS's default).
    classnames_file: ImageNet family only: CoOp's classnames.txt
      ("<wnid> <name>" lines); without it the class names are the wnids.

  Returns:
    {"classnames", "train", "val", "test"} with (ref, label, classname)
    items, refs "<tfds name>:<split>:<index>" for `CatalogSource`.
  """
  spec = get_catalog_spec(name)
  sources = _open_sources(spec, data_dir)
  builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
  names = list(builder.info.features["label"].names)
  if classnames_file is not None:
    wnid_names = _read_wnid_names(classnames_file)
    names = [wnid_names.get(n, n) for n in names]
  labels = {s: _labels_of(src) for s, src in sources.items()}

  if spec.subset:
    kept = sorted({y for ys in labels.values() for y in ys})
  else:
    kept = [i for i, n in enumerate(names) if n not in spec.ignore]
  relabel = {old: new for new, old in enumerate(kept)}
  rename = spec.rename or (lambda n: n)

  lists = {}
  for key, part in zip(("train", "val", "test"), spec.splits):
    items = []
    if part is not None:
      split, start, stop = part
      ys = labels[split]
      lo, hi = int(round(start * len(ys))), int(round(stop * len(ys)))
      for i in range(lo, hi):
        if ys[i] in relabel:
          ref = f"{spec.tfds_name}:{split}:{i}"
          items.append((ref, relabel[ys[i]], rename(names[ys[i]])))
    lists[key] = items
  test_only = spec.splits[0] is None
  if test_only:
    lists["train"] = lists["test"]
  return fewshot.dassl_protocol(
    lists,
    num_shots,
    seed,
    subsample,
    val_is_test=name == "imagenet",
    test_only=test_only,
  )


def _png_bytes(array):
  buf = io.BytesIO()
  Image.fromarray(np.asarray(array, np.uint8)).save(buf, "PNG")
  return buf.getvalue()


@dataclasses.dataclass(frozen=True, eq=False)
class CatalogSource:
  """Pipeline source for the refs of `catalog_split(name, ...)`."""

  name: str
  data_dir: str | None = None

  def __post_init__(self):
    spec = get_catalog_spec(self.name)
    sources = _open_sources(spec, self.data_dir)
    object.__setattr__(self, "_tfds_name", spec.tfds_name)
    object.__setattr__(self, "_splits", list(sources))
    object.__setattr__(self, "_sources", list(sources.values()))

  def _key(self, ref):
    tfds_name, split, index = ref.rsplit(":", 2)
    if tfds_name != self._tfds_name or split not in self._splits:
      raise KeyError(f"{ref} is not a record of {self._tfds_name}.")
    return (self._splits.index(split) << 40) | int(index)

  def keys(self, refs):
    return np.asarray([self._key(r) for r in refs], np.int64)

  def _fetch(self, key):
    key = int(key)
    image = self._sources[key >> 40][key & ((1 << 40) - 1)]["image"]
    # Mocked or non-skipping sources hand out decoded arrays.
    return image if isinstance(image, bytes) else _png_bytes(image)

  def read(self, key):
    data = tf.numpy_function(self._fetch, [key], tf.string, stateful=False)
    data.set_shape([])
    return data

  def read_py(self, ref):
    return self._fetch(self._key(ref))
