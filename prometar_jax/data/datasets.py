"""The 15 CoOp datasets read from the CoOp folder layout, and `fewshot_split`.

`fewshot_split(name, root, num_shots, seed, subsample)` returns the train, val
and test lists that Dassl.pytorch + CoOp's `datasets/*.py` hold for the same
config (DATASET.NAME, ROOT, NUM_SHOTS, SEED, SUBSAMPLE_CLASSES):

    >>> split = fewshot_split("eurosat", "/data", 16, seed=1, subsample="base")
    >>> split["classnames"][:2], split["train"][0]
    (['Annual Crop Land', 'Forest'],
     ('/data/eurosat/2750/AnnualCrop/AnnualCrop_2.jpg', 0, 'Annual Crop Land'))

Items are `(absolute_image_path, label, classname)` tuples. The folder layout
of every dataset is in docs/datasets.md (CoOp's DATASETS.md); the facts this
module follows are in docs/datasets.md, "What Dassl does, step by step":

- JSON datasets read `split_zhou_*.json` in list order, relative paths joined
  to the dataset's image folder, labels and class names taken verbatim.
- ImageNet reads `classnames.txt` and the class folders of `images/train` and
  `images/val` (labels = sorted folder index; val = test); files inside a
  class folder keep `os.listdir` order, as Dassl does (see `imagenet_order`).
- FGVCAircraft reads `variants.txt` and `images_variant_{train,val,test}.txt`.
- ImageNet-V2/-Sketch/-A/-R are test-only (train = test = all images, no
  few-shot selection, no class subsampling); -A and -R use labels 0..199 over
  the sorted 200 folders present.

Dassl's `split_fewshot/*.pkl` caches are not read (they need Dassl to
unpickle); the same selection is recomputed from the split lists.
"""

import dataclasses
import json
import os

from prometar_jax.data import fewshot

Item = fewshot.Item

LAYOUT_DOC = "docs/datasets.md"

# EuroSAT's folders and the class names CoOp's split file holds for them
# (CoOp renamed the folders to phrases when it wrote the split).
EUROSAT_NAMES = {
  "AnnualCrop": "Annual Crop Land",
  "Forest": "Forest",
  "HerbaceousVegetation": "Herbaceous Vegetation Land",
  "Highway": "Highway or Road",
  "Industrial": "Industrial Buildings",
  "Pasture": "Pasture Land",
  "PermanentCrop": "Permanent Crop Land",
  "Residential": "Residential Buildings",
  "River": "River",
  "SeaLake": "Sea or Lake",
}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Where a CoOp dataset lives and how it is read.

  Attributes:
    name: the config name (CoOp's configs/datasets/<name>.yaml).
    coop_class: Dassl's DATASET.NAME for it.
    dirname: folder under the data root.
    image_dir: image folder inside `dirname`; "" means `dirname` itself.
    kind: "json", "imagenet", "fgvc", "imagenetv2" or "imagenet_folders".
    split_file: the `split_zhou_*.json` name (kind "json" only).
    num_classes: classes of the full dataset (for messages and docs).
  """

  name: str
  coop_class: str
  dirname: str
  image_dir: str
  kind: str
  split_file: str | None = None
  num_classes: int = 0


_SPECS = (
  DatasetSpec(
    "imagenet", "ImageNet", "imagenet", "images", "imagenet", None, 1000
  ),
  DatasetSpec(
    "caltech101",
    "Caltech101",
    "caltech-101",
    "101_ObjectCategories",
    "json",
    "split_zhou_Caltech101.json",
    100,
  ),
  DatasetSpec(
    "oxford_pets",
    "OxfordPets",
    "oxford_pets",
    "images",
    "json",
    "split_zhou_OxfordPets.json",
    37,
  ),
  DatasetSpec(
    "stanford_cars",
    "StanfordCars",
    "stanford_cars",
    "",
    "json",
    "split_zhou_StanfordCars.json",
    196,
  ),
  DatasetSpec(
    "oxford_flowers",
    "OxfordFlowers",
    "oxford_flowers",
    "jpg",
    "json",
    "split_zhou_OxfordFlowers.json",
    102,
  ),
  DatasetSpec(
    "food101",
    "Food101",
    "food-101",
    "images",
    "json",
    "split_zhou_Food101.json",
    101,
  ),
  DatasetSpec(
    "fgvc_aircraft",
    "FGVCAircraft",
    "fgvc_aircraft",
    "images",
    "fgvc",
    None,
    100,
  ),
  DatasetSpec(
    "sun397",
    "SUN397",
    "sun397",
    "SUN397",
    "json",
    "split_zhou_SUN397.json",
    397,
  ),
  DatasetSpec(
    "dtd",
    "DescribableTextures",
    "dtd",
    "images",
    "json",
    "split_zhou_DescribableTextures.json",
    47,
  ),
  DatasetSpec(
    "eurosat",
    "EuroSAT",
    "eurosat",
    "2750",
    "json",
    "split_zhou_EuroSAT.json",
    10,
  ),
  DatasetSpec(
    "ucf101",
    "UCF101",
    "ucf101",
    "UCF-101-midframes",
    "json",
    "split_zhou_UCF101.json",
    101,
  ),
  DatasetSpec(
    "imagenetv2",
    "ImageNetV2",
    "imagenetv2",
    "imagenetv2-matched-frequency-format-val",
    "imagenetv2",
    None,
    1000,
  ),
  DatasetSpec(
    "imagenet_sketch",
    "ImageNetSketch",
    "imagenet-sketch",
    "images",
    "imagenet_folders",
    None,
    1000,
  ),
  DatasetSpec(
    "imagenet_a",
    "ImageNetA",
    "imagenet-adversarial",
    "imagenet-a",
    "imagenet_folders",
    None,
    200,
  ),
  DatasetSpec(
    "imagenet_r",
    "ImageNetR",
    "imagenet-rendition",
    "imagenet-r",
    "imagenet_folders",
    None,
    200,
  ),
)

SPECS = {s.name: s for s in _SPECS}
DATASET_NAMES = tuple(SPECS)
# The four ImageNet variants are test-only in CoOp (domain generalization).
TEST_ONLY = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")

# Short layout reminders for error messages; the full text is in LAYOUT_DOC.
_LAYOUT_HINT = {
  "json": "{dirname}/{split_file} and images under {dirname}/{image_dir}/",
  "imagenet": (
    "{dirname}/classnames.txt and {dirname}/images/{{train,val}}/<wnid>/*"
  ),
  "fgvc": (
    "{dirname}/variants.txt, {dirname}/images_variant_{{train,val,test}}.txt"
    " and {dirname}/images/<id>.jpg"
  ),
  "imagenetv2": "{dirname}/classnames.txt and {dirname}/{image_dir}/<0..999>/*",
  "imagenet_folders": (
    "{dirname}/classnames.txt and {dirname}/{image_dir}/<wnid>/*"
  ),
}
# Dassl reads these folders but skips this file (imagenet_a.py, imagenet_r.py).
_IGNORED_ENTRIES = ("README.txt",)


def get_spec(name: str) -> DatasetSpec:
  """The spec for a config name ("oxford_pets") or Dassl name ("OxfordPets")."""
  key = name.strip()
  if key in SPECS:
    return SPECS[key]
  for spec in _SPECS:
    if key.lower() in (spec.coop_class.lower(), spec.name.replace("_", "")):
      return spec
  raise ValueError(
    f"Unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}."
  )


def layout_hint(spec: DatasetSpec) -> str:
  """One line describing the files `spec` expects, relative to the root."""
  return _LAYOUT_HINT[spec.kind].format(**dataclasses.asdict(spec))


def dataset_dir(name: str, root: str) -> str:
  """Absolute path of the dataset folder under the CoOp data root."""
  root = os.path.abspath(os.path.expanduser(os.fspath(root)))
  return os.path.join(root, get_spec(name).dirname)


def _missing(what: str, path: str, spec: DatasetSpec) -> FileNotFoundError:
  return FileNotFoundError(
    f"{what} for dataset '{spec.name}' not found: expected {path}. The CoOp "
    f"layout is {layout_hint(spec)} (under the data root); see {LAYOUT_DOC} "
    "for how to prepare it."
  )


def _listdir_nohidden(path: str) -> list[str]:
  # Dassl's listdir_nohidden: raw os.listdir order, dot-files dropped.
  return [f for f in os.listdir(path) if not f.startswith(".")]


def _read_lines(
  path: str, spec: DatasetSpec, what: str, keep_blank: bool = False
) -> list[str]:
  # Stripped lines, as CoOp's readers use them. Blank lines only count where
  # CoOp would count them (a line index is a label in variants.txt).
  if not os.path.isfile(path):
    raise _missing(what, path, spec)
  with open(path) as f:
    return [line.strip() for line in f if keep_blank or line.strip()]


def read_imagenet_classnames(path: str, spec: DatasetSpec) -> dict[str, str]:
  """`classnames.txt`: lines `<wnid> <class name>` -> ordered {wnid: name}."""
  names = {}
  for line in _read_lines(path, spec, "classnames.txt"):
    # CoOp: split(" "), first word = wnid, the rest joined by " " (kept as
    # is, even with doubled spaces).
    folder, _, classname = line.partition(" ")
    names[folder] = classname
  return names


def _read_json_split(spec: DatasetSpec, ddir: str) -> dict[str, list[Item]]:
  path = os.path.join(ddir, spec.split_file)
  if not os.path.isfile(path):
    raise _missing("Split file", path, spec)
  with open(path) as f:
    try:
      obj = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"Split file {path} is not valid JSON: {e}") from e
  if not isinstance(obj, dict) or not {"train", "val", "test"} <= set(obj):
    raise ValueError(
      f"Split file {path} must be a JSON object with 'train', 'val' and "
      "'test' lists (CoOp's split_zhou_*.json format)."
    )
  image_dir = os.path.join(ddir, spec.image_dir) if spec.image_dir else ddir
  out = {}
  for split in ("train", "val", "test"):
    items = []
    for entry in obj[split]:
      if not isinstance(entry, (list, tuple)) or len(entry) != 3:
        raise ValueError(
          f"Split file {path}, '{split}': expected [path, label, classname] "
          f"entries, found {entry!r}."
        )
      rel, label, classname = entry
      # os.path.join as CoOp's read_split: an absolute entry would win.
      items.append((os.path.join(image_dir, rel), int(label), classname))
    out[split] = items
  return out


def _read_imagenet_folder(
  image_dir: str, classnames: dict[str, str], spec: DatasetSpec, sort_files
) -> list[Item]:
  if not os.path.isdir(image_dir):
    raise _missing("Image folder", image_dir, spec)
  folders = sorted(e.name for e in os.scandir(image_dir) if e.is_dir())
  if spec.kind == "imagenet_folders":
    # Sketch/-A/-R list with listdir_nohidden(sort=True), so hidden folders
    # are not classes there; ImageNet's own reader uses os.scandir.
    folders = [
      f for f in folders if not f.startswith(".") and f not in _IGNORED_ENTRIES
    ]
  unknown = [f for f in folders if f not in classnames]
  if unknown:
    raise ValueError(
      f"Class names do not match for '{spec.name}': folder(s) "
      f"{unknown[:5]} of {image_dir} have no line in classnames.txt."
    )
  items = []
  for label, folder in enumerate(folders):
    class_dir = os.path.join(image_dir, folder)
    names = _listdir_nohidden(class_dir)
    if sort_files:
      names.sort()
    items.extend(
      (os.path.join(class_dir, n), label, classnames[folder]) for n in names
    )
  return items


def _read_fgvc(spec: DatasetSpec, ddir: str) -> dict[str, list[Item]]:
  variants = _read_lines(
    os.path.join(ddir, "variants.txt"), spec, "variants.txt", keep_blank=True
  )
  cname2lab = {c: i for i, c in enumerate(variants)}
  out = {}
  for split in ("train", "val", "test"):
    fname = f"images_variant_{split}.txt"
    items = []
    for line in _read_lines(os.path.join(ddir, fname), spec, fname):
      image_id, _, variant = line.partition(" ")
      if variant not in cname2lab:
        raise ValueError(
          f"Class names do not match for 'fgvc_aircraft': {fname} names "
          f"variant {variant!r} (image {image_id}) that is not in variants.txt."
        )
      path = os.path.join(ddir, "images", image_id + ".jpg")
      items.append((path, cname2lab[variant], variant))
    out[split] = items
  return out


def read_splits(
  name: str, ddir: str, imagenet_order: str = "listdir"
) -> dict[str, list[Item]]:
  """The full train/val/test lists of a dataset folder, in Dassl's order.

  Args:
    name: dataset config name.
    ddir: the dataset folder (e.g. `<root>/eurosat`).
    imagenet_order: "listdir" keeps `os.listdir` order of the files inside an
      ImageNet-style class folder (what Dassl holds on this file system);
      "sorted" sorts them, which makes the few-shot choice portable across
      file systems but different from Dassl's.

  Returns:
    {"train", "val", "test"}: lists of items. Test-only datasets have
    train = test and an empty val; ImageNet has val = test.
  """
  spec = get_spec(name)
  ddir = os.path.abspath(ddir)
  if not os.path.isdir(ddir):
    raise _missing("Dataset folder", ddir, spec)
  if imagenet_order not in ("listdir", "sorted"):
    raise ValueError("imagenet_order must be 'listdir' or 'sorted'.")
  sort_files = imagenet_order == "sorted"
  if spec.kind == "json":
    return _read_json_split(spec, ddir)
  if spec.kind == "fgvc":
    return _read_fgvc(spec, ddir)
  classnames = read_imagenet_classnames(
    os.path.join(ddir, "classnames.txt"), spec
  )
  image_dir = os.path.join(ddir, spec.image_dir)
  if spec.kind == "imagenet":
    train = _read_imagenet_folder(
      os.path.join(image_dir, "train"), classnames, spec, sort_files
    )
    test = _read_imagenet_folder(
      os.path.join(image_dir, "val"), classnames, spec, sort_files
    )
    return {"train": train, "val": test, "test": test}
  if spec.kind == "imagenet_folders":
    data = _read_imagenet_folder(image_dir, classnames, spec, sort_files)
    return {"train": data, "val": [], "test": data}
  # imagenetv2: folder i holds class i of classnames.txt (Dassl loops over
  # range(1000); the number of lines is used so small test sets work too).
  if not os.path.isdir(image_dir):
    raise _missing("Image folder", image_dir, spec)
  names = list(classnames.values())
  data = []
  for label, classname in enumerate(names):
    class_dir = os.path.join(image_dir, str(label))
    if not os.path.isdir(class_dir):
      raise _missing(f"Class folder {label}", class_dir, spec)
    files = _listdir_nohidden(class_dir)
    if sort_files:
      files.sort()
    data.extend((os.path.join(class_dir, f), label, classname) for f in files)
  return {"train": data, "val": [], "test": data}


def _check_files_exist(split: dict[str, list[Item]], spec: DatasetSpec):
  # Dassl's Datum asserts every file exists; one message for all of them.
  missing = [
    ref
    for key in ("train", "val", "test")
    for ref, _, _ in split[key]
    if not os.path.isfile(ref)
  ]
  if missing:
    raise FileNotFoundError(
      f"{len(missing)} image file(s) of dataset '{spec.name}' not found, "
      f"e.g. {missing[:3]}. Check the folder layout ({layout_hint(spec)}; "
      f"see {LAYOUT_DOC})."
    )


def fewshot_split(
  name: str,
  root: str,
  num_shots: int | None,
  seed: int,
  subsample: str = "all",
  *,
  imagenet_order: str = "listdir",
  check_files: bool = True,
) -> dict[str, list]:
  """The few-shot split Dassl builds for a CoOp config.

  Steps, in Dassl's order: read the full split lists; if `num_shots >= 1`,
  select `num_shots` train items per label, then min(num_shots, 4) val items
  per label, with one `random.Random(seed)` (ImageNet: train only; test-only
  datasets: nothing); then keep the base or new classes and relabel.

  Args:
    name: config name, one of DATASET_NAMES (or Dassl's class name).
    root: the CoOp data root, the folder that holds e.g. `eurosat/`.
    num_shots: images per class; None or <= 0 keeps all images.
    seed: the run's seed (cfg.SEED). Dassl seeds Python's `random` with it
      right before the selection, so `random.Random(seed)` gives the same
      draws. (ProMetaR's train.py ignores `--seed 0`; 0 is a plain seed here.)
    subsample: "all", "base" or "new" (cfg.DATASET.SUBSAMPLE_CLASSES); test-only
      datasets ignore it, as in CoOp.
    imagenet_order: see `read_splits`.
    check_files: raise if a returned image file does not exist (Dassl's Datum
      check).

  Returns:
    {"classnames": names by label (from train, as Dassl), "train": [...],
     "val": [...], "test": [...]}, items `(absolute_path, label, classname)`.
  """
  spec = get_spec(name)
  split = read_splits(spec.name, dataset_dir(spec.name, root), imagenet_order)
  out = fewshot.dassl_protocol(
    split,
    num_shots,
    seed,
    subsample,
    val_is_test=spec.kind == "imagenet",
    test_only=spec.name in TEST_ONLY,
  )
  if check_files and spec.kind in ("json", "fgvc"):
    # Folder-based datasets list existing files; only split files can be stale.
    _check_files_exist(out, spec)
  return out
