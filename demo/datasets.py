"""The demo's downstream datasets, written in CoOp layout with split_zhou json.

Three classification tasks on the world (world.py); in each, the
attributes that are not the class vary at random:

| demo name    | classes | class name                           | CoOp layout |
|--------------|---------|--------------------------------------|-------------|
| colours      | 20      | "red shape"                          | eurosat     |
| scenes       | 12      | "shape on a grass background"        | sun397      |
| compositions | 24      | "red shape on a grass background"    | caltech101  |

The data registry (`prometar_jax.data.datasets`) knows the 15 CoOp
datasets only, so each demo dataset is written under the folder and split
file of one of them, below its own data root (the demo never shares a root
with real data): `fewshot_split("sun397", root, ...)` then reads the scenes
task through the same code as the real SUN397. `DEMO_DATASETS` maps one
name to the other; the demo's tables show the demo names.

Labels follow a fixed order, so base (the first half, CoOp's rule) and new
classes are fixed: colours base = the ten basic colours (red ... white),
new = their finer neighbours (maroon, brown, tan, olive, lime, teal, azure,
navy, magenta, gray); scenes base = grass, sand, water, sky, brick, wood,
new = snow, night, lava, forest, clouds, stone; compositions = 24 (colour,
background) pairs drawn once at random (a colour or a background may recur
across pairs, and across base and new). Every class name is a phrase the
pretraining captions use, but no class set ever reached the tiny CLIP as
labels.

Images are PNG (lossless: 32x32 JPEGs smear colours), rendered from seeds
that depend on (dataset, class, split, index) only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

import numpy as np
from PIL import Image

from demo import world
from prometar_jax.data import datasets as coop_datasets

# Changing the world's pictures or the datasets' sizes changes this
# version, so that a cached build is rebuilt rather than reused.
DATA_VERSION = 2
MANIFEST = "demo_manifest.json"


@dataclasses.dataclass(frozen=True)
class DemoDataset:
  """One downstream task of the world.

  Attributes:
    name: the demo's name ("colours").
    coop_name: the CoOp dataset whose layout holds it ("eurosat").
    classes: per class, the attribute values that define it
      ({"colour": 0} is "red shape").
    lighting: the task's domain: per-channel (gain, offset) applied to
      every rendered image, as a tinted light and camera would.
  """

  name: str
  coop_name: str
  classes: tuple[tuple[tuple[str, int], ...], ...]
  lighting: tuple[tuple[float, float, float], tuple[float, float, float]]

  @property
  def classnames(self) -> tuple[str, ...]:
    return tuple(classname(dict(c)) for c in self.classes)


def classname(fixed: dict[str, int]) -> str:
  """The caption phrase of a class: world.describe of its attributes."""
  return world.describe(fixed, {k: True for k in fixed})


def _single(attribute: str):
  n = len(world.ATTRIBUTES[attribute])
  return tuple(((attribute, i),) for i in range(n))


def _pairs(n: int, seed: int = 0):
  """n distinct (colour, pattern) pairs, drawn once from `seed`."""
  rng = np.random.default_rng(seed)
  n_c, n_p = len(world.COLOURS), len(world.PATTERNS)
  flat = rng.choice(n_c * n_p, n, replace=False)
  return tuple(
    (("colour", int(i // n_p)), ("pattern", int(i % n_p))) for i in flat
  )


# Each task sees the world in its own light, as a downstream dataset is
# not the pretraining distribution (satellite images, sketches, ...).
# Pretraining never saw tinted images, so zero-shot CLIP loses accuracy
# and adapting to the light on base classes has something to gain.
COOL_LIGHT = ((0.55, 0.8, 1.0), (0.0, 15.0, 40.0))
WARM_LIGHT = ((1.0, 0.75, 0.45), (40.0, 20.0, 0.0))
DUSK_LIGHT = ((0.75, 0.6, 0.6), (30.0, 10.0, 20.0))

DEMO_DATASETS = (
  DemoDataset("colours", "eurosat", _single("colour"), COOL_LIGHT),
  DemoDataset("scenes", "sun397", _single("background"), WARM_LIGHT),
  DemoDataset("compositions", "caltech101", _pairs(24), DUSK_LIGHT),
)
DEMO_NAMES = tuple(d.name for d in DEMO_DATASETS)
# Images per class in (train, val, test). 16 shots come out of train.
PER_CLASS = (32, 8, 60)


def get(name: str) -> DemoDataset:
  """The demo dataset of a demo name ("shapes") or CoOp name ("caltech101")."""
  for d in DEMO_DATASETS:
    if name in (d.name, d.coop_name):
      return d
  known = ", ".join(DEMO_NAMES)
  raise ValueError(f"unknown demo dataset {name!r}; known: {known}")


def display_name(coop_name: str) -> str:
  """The demo name of a CoOp name used for a demo dataset (else itself)."""
  for d in DEMO_DATASETS:
    if coop_name == d.coop_name:
      return d.name
  return coop_name


def _folder(classname: str) -> str:
  return classname.replace(" ", "_")


def _rel_path(d: DemoDataset, label: int, split: str, i: int) -> str:
  folder = _folder(d.classnames[label])
  return f"{folder}/{folder}_{split}_{i:04d}.png"


def render_class(
  d: DemoDataset, label: int, split: str, n: int, seed: int = 0
) -> np.ndarray:
  """uint8 [n, 32, 32, 3]: n objects of class `label`, the rest random."""
  index = DEMO_NAMES.index(d.name)
  split_index = ("train", "val", "test").index(split)
  rng = np.random.default_rng([seed, 100 + index, label, split_index])
  attrs = world.sample_attributes(rng, n, fixed=dict(d.classes[label]))
  return relight(world.render(attrs, rng), d.lighting)


def relight(images: np.ndarray, lighting) -> np.ndarray:
  """uint8 images under `lighting` ((gain, offset) per RGB channel)."""
  gain, offset = (np.asarray(v, np.float32) for v in lighting)
  out = images.astype(np.float32) * gain + offset
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def write_dataset(
  d: DemoDataset,
  root: str,
  per_class: tuple[int, int, int] = PER_CLASS,
  seed: int = 0,
) -> dict[str, list]:
  """Writes `d` in its CoOp layout under `root`; returns the split json.

  Written into a temporary folder that is renamed at the end: an
  interrupted build leaves no half dataset behind.
  """
  spec = coop_datasets.get_spec(d.coop_name)
  final = coop_datasets.dataset_dir(d.coop_name, root)
  tmp = final + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  image_dir = os.path.join(tmp, spec.image_dir) if spec.image_dir else tmp
  split = {"train": [], "val": [], "test": []}
  for label, classname in enumerate(d.classnames):
    for key, n in zip(("train", "val", "test"), per_class):
      images = render_class(d, label, key, n, seed)
      for i, image in enumerate(images):
        rel = _rel_path(d, label, key, i)
        path = os.path.join(image_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(image).save(path)
        split[key].append([rel, label, classname])
  with open(os.path.join(tmp, spec.split_file), "w") as f:
    # Dassl's write_json format.
    json.dump(split, f, indent=4, separators=(",", ": "))
  shutil.rmtree(final, ignore_errors=True)
  os.replace(tmp, final)
  return split


def manifest(per_class=PER_CLASS, seed: int = 0, names=DEMO_NAMES) -> dict:
  """What a build of the datasets is a function of (compared on reuse)."""
  spec = {
    "version": DATA_VERSION,
    "per_class": list(per_class),
    "seed": seed,
    "datasets": {
      n: {
        "coop_name": get(n).coop_name,
        "classnames": list(get(n).classnames),
        "lighting": [list(v) for v in get(n).lighting],
      }
      for n in names
    },
  }
  blob = json.dumps(spec, sort_keys=True).encode()
  spec["id"] = hashlib.sha256(blob).hexdigest()[:16]
  return spec


def is_built(root: str, per_class=PER_CLASS, seed=0, names=DEMO_NAMES) -> bool:
  """True when `root` holds exactly this build (manifest and split files)."""
  path = os.path.join(root, MANIFEST)
  if not os.path.isfile(path):
    return False
  with open(path) as f:
    found = json.load(f)
  if found.get("id") != manifest(per_class, seed, names)["id"]:
    return False
  for n in names:
    spec = coop_datasets.get_spec(get(n).coop_name)
    ddir = coop_datasets.dataset_dir(spec.name, root)
    if not os.path.isfile(os.path.join(ddir, spec.split_file)):
      return False
  return True


def write_all(
  root: str,
  per_class=PER_CLASS,
  seed: int = 0,
  names=DEMO_NAMES,
  progress: bool = True,
) -> dict:
  """Writes every demo dataset under `root` (skipped if already built)."""
  from tqdm import tqdm

  if is_built(root, per_class, seed, names):
    return manifest(per_class, seed, names)
  os.makedirs(root, exist_ok=True)
  stale = os.path.join(root, MANIFEST)
  if os.path.exists(stale):
    os.remove(stale)
  bar = tqdm(names, desc="rendering the demo datasets", disable=not progress)
  for n in bar:
    write_dataset(get(n), root, per_class, seed)
  spec = manifest(per_class, seed, names)
  with open(os.path.join(root, MANIFEST), "w") as f:
    json.dump(spec, f, indent=2)
  return spec
