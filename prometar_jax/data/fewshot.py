"""Few-shot selection and base/new class split, identical to Dassl's.

Items are `(image_ref, label, classname)` tuples (`image_ref` is usually an
absolute image path). Everything here is plain Python on lists, so the
selection for a seed is the same list Dassl.pytorch would build from the same
split list (docs/datasets.md, "Few-shot sampling" and "Base and new
classes"):

- `generate_fewshot` mirrors `DatasetBase.generate_fewshot_dataset`: labels in
  order of first appearance, `random.sample(items, k)` per label (all items
  when a label has fewer than k), drawn from one `random.Random(seed)` that is
  shared by the train and the val selection, train first.
- `subsample_classes` mirrors CoOp's `OxfordPets.subsample_classes`: the first
  ceil(n/2) sorted labels of the first split are "base", the rest "new", and
  the kept labels are renumbered from 0.
- `classnames_of` mirrors `DatasetBase.get_lab2cname`.
"""

import math
import random
from collections.abc import Sequence

Item = tuple[str, int, str]

SUBSAMPLE_CHOICES = ("all", "base", "new")


def generate_fewshot(
  items: Sequence[Item], num_shots: int, rng: random.Random
) -> list[Item]:
  """Selects `num_shots` items per label exactly as Dassl does.

  Args:
    items: the split list in file order (the order matters).
    num_shots: images per label; a label with fewer images keeps them all
      (Dassl's `repeat=False`).
    rng: consumed in place, as Dassl consumes the global `random` module.

  Returns:
    The selection, label group by label group in order of first appearance,
    each group in `random.sample` order.
  """
  groups: dict[int, list[Item]] = {}
  for item in items:
    # First-appearance order, never sorted: Dassl's defaultdict iteration.
    groups.setdefault(item[1], []).append(item)
  out: list[Item] = []
  for group in groups.values():
    if len(group) >= num_shots:
      out.extend(rng.sample(group, num_shots))
    else:
      out.extend(group)
  return out


def subsample_classes(
  *splits: Sequence[Item], subsample: str = "all"
) -> tuple[list[Item], ...]:
  """Keeps the base or the new half of the classes and relabels from 0.

  Args:
    *splits: lists of items; the classes are taken from the first one (the
      few-shot train list in CoOp).
    subsample: "all" (unchanged), "base" (first ceil(n/2) sorted labels) or
      "new" (the remaining labels).

  Returns:
    One list per split, order preserved, dropped classes removed.
  """
  if subsample not in SUBSAMPLE_CHOICES:
    raise ValueError(
      f"subsample must be one of {SUBSAMPLE_CHOICES}, got {subsample!r}."
    )
  if subsample == "all" or not splits:
    return tuple(list(s) for s in splits)
  labels = sorted({item[1] for item in splits[0]})
  m = math.ceil(len(labels) / 2)
  selected = labels[:m] if subsample == "base" else labels[m:]
  relabel = {old: new for new, old in enumerate(selected)}
  return tuple(
    [(ref, relabel[y], name) for ref, y, name in split if y in relabel]
    for split in splits
  )


def classnames_of(items: Sequence[Item]) -> list[str]:
  """Class names ordered by label, from the items' (label, classname) pairs.

  Raises:
    ValueError: one label carries two different class names (Dassl would
      silently keep an arbitrary one).
  """
  mapping: dict[int, str] = {}
  for ref, label, name in items:
    if mapping.setdefault(label, name) != name:
      raise ValueError(
        f"Class names do not match: label {label} is called both "
        f"{mapping[label]!r} and {name!r} (e.g. at {ref})."
      )
  return [mapping[label] for label in sorted(mapping)]


def dassl_protocol(
  split: dict[str, Sequence[Item]],
  num_shots: int | None,
  seed: int,
  subsample: str = "all",
  *,
  val_is_test: bool = False,
  test_only: bool = False,
) -> dict[str, list]:
  """Few-shot selection then class subsampling, in Dassl + CoOp's order.

  Args:
    split: full {"train", "val", "test"} lists in file order.
    num_shots: images per label; None or < 1 keeps everything.
    seed: `random.Random(seed)` draws train first, then val.
    subsample: "all", "base" or "new".
    val_is_test: ImageNet: only train is sampled, classes are subsampled on
      (train, test) and val is the test list.
    test_only: ImageNet-V2/-Sketch/-A/-R: returned unchanged.

  Returns:
    {"classnames", "train", "val", "test"}.

  Raises:
    ValueError: an invalid subsample, or a label with two class names.
  """
  if subsample not in SUBSAMPLE_CHOICES:
    raise ValueError(
      f"subsample must be one of {SUBSAMPLE_CHOICES}, got {subsample!r}."
    )
  train, val, test = split["train"], split["val"], split["test"]
  if not test_only:
    if num_shots is not None and num_shots >= 1:
      rng = random.Random(seed)
      train = generate_fewshot(train, num_shots, rng)
      if not val_is_test:
        val = generate_fewshot(val, min(num_shots, 4), rng)
    if val_is_test:
      # CoOp's ImageNet passes val=test and subsamples (train, test) only.
      train, test = subsample_classes(train, test, subsample=subsample)
      val = test
    else:
      train, val, test = subsample_classes(
        train, val, test, subsample=subsample
      )
  out = {"train": list(train), "val": list(val), "test": list(test)}
  # Every split must agree on the label -> name map, not only train.
  classnames_of(out["train"] + out["val"] + out["test"])
  return {"classnames": classnames_of(out["train"]), **out}
