"""What a run trains and evaluates on, and the sweep's data, read once.

Protocols (`config.protocol`):

* base2new: train on the base classes; evaluate on the base test set
  (base class names) and on the new test set (new class names); HM.
* domain_generalization / cross_dataset: train on all classes of the
  source; evaluate on its test set and on each of `config.eval.targets`.
"""

from __future__ import annotations

import dataclasses
import math

from prometar_jax import data


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """One test set of a run: a name in the table, a dataset, its classes."""

  name: str
  dataset: str
  subsample: str


def train_subsample(config) -> str:
  return "base" if config.protocol == "base2new" else "all"


def eval_sets(config, dataset: str) -> list[EvalSet]:
  """The test sets of `dataset`'s run under the config's protocol."""
  if config.protocol == "base2new":
    sets = [EvalSet("base", dataset, "base"), EvalSet("new", dataset, "new")]
  else:
    sets = [EvalSet(dataset, dataset, "all")]
  return sets + [EvalSet(t, t, "all") for t in config.eval.targets]


class DataCache:
  """Few-shot splits and image sources of a sweep, each built once."""

  def __init__(self, config):
    self._data = config.data
    self._max_examples = config.eval.max_examples
    self._splits = {}
    self._sources = {}

  def split(self, name: str, seed: int, subsample: str) -> dict:
    """fewshot_split(name, root, num_shots, seed, subsample), cached."""
    key = (name, seed, subsample)
    if key not in self._splits:
      c = self._data
      self._splits[key] = data.fewshot_split(
        name, c.root, c.num_shots, seed, subsample
      )
    return self._splits[key]

  def eval_items(self, es: EvalSet, seed: int) -> list:
    """The test items of an eval set (evenly thinned to eval.max_examples)."""
    items = self.split(es.dataset, seed, es.subsample)["test"]
    if 0 < self._max_examples < len(items):
      # Evenly spaced: test lists are often grouped by class.
      items = items[:: math.ceil(len(items) / self._max_examples)]
    return items

  def source(self, name: str):
    """The image reader of `name`: files, or a TFDS build if configured."""
    if not self._data.tfds_dir:
      return None
    if name not in self._sources:
      self._sources[name] = data.TfdsSource(
        name, self._data.root, self._data.tfds_dir
      )
    return self._sources[name]
