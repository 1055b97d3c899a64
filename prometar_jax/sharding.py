"""One mesh over all devices, and where each input of the step lives on it.

The step is one `jax.jit` over a 1-D mesh ("data",) of every device of
every process. Parameters, optimizer states and the frozen CLIP are
replicated (ViT-B/16 fits everywhere); what is split across devices is
chosen by the input shardings and XLA's partitioner does the rest:

* the class axis of the class features (token ids, teacher features, class
  mask): with a batch of 4 images, the text tower over all class prompts
  is most of the work of a step (ImageNet base: 500 prompts through the
  text tower, twice per meta step). The classes are padded to a multiple
  of the device count, the padding masked out (`pad_classes`).
* the image batch, along the same axis, when the global batch divides
  the device count; otherwise the batch is replicated (the method fixes
  the batch at 4, which 8 devices cannot split).

Several processes: each process feeds its own rows of a data-sharded batch
(`data.to_global`); replicated host arrays (params, class features) are
built identically on every process and placed with `jax.device_put`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any
AXIS = "data"


def make_mesh(num_devices: int = -1) -> Mesh:
  """A 1-D ("data",) mesh of all devices, or of the first `num_devices`.

  `jax.make_mesh` orders devices so that each process's devices are
  contiguous, which is what `make_array_from_process_local_data` assumes
  for data-sharded batches. Auto axes: shardings of intermediates are left
  to the partitioner.
  """
  n = jax.device_count() if num_devices in (-1, 0, None) else num_devices
  if n == jax.device_count():
    return jax.make_mesh((n,), (AXIS,), axis_types=(AxisType.Auto,))
  if jax.process_count() > 1 or not 0 < n < jax.device_count():
    raise ValueError(
      f"mesh.num_devices={num_devices}: use -1 (all {jax.device_count()} "
      "devices) or, with a single process, a number between 1 and that."
    )
  return Mesh(np.asarray(jax.devices()[:n]), (AXIS,), (AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def along_data(mesh: Mesh) -> NamedSharding:
  """Leading axis split over the mesh."""
  return NamedSharding(mesh, P(AXIS))


def put_replicated(tree: PyTree, mesh: Mesh) -> PyTree:
  """Host values (the same on every process) -> replicated global arrays."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: jax.device_put(np.asarray(x), sharding), tree)


@dataclasses.dataclass(frozen=True)
class BatchLayout:
  """How a global batch is split over processes and devices.

  Attributes:
    sharded: the batch is split along the mesh (else replicated).
    process_index, process_count: what this process passes to the input
      pipeline: its own rows when sharded, the whole batch otherwise.
    sharding: the global batch arrays' sharding.
  """

  sharded: bool
  process_index: int
  process_count: int
  sharding: NamedSharding


def batch_layout(batch_size: int, mesh: Mesh) -> BatchLayout:
  """Split the batch along the mesh when the device count divides it."""
  if batch_size % mesh.size == 0:
    return BatchLayout(
      True, jax.process_index(), jax.process_count(), along_data(mesh)
    )
  return BatchLayout(False, 0, 1, replicated(mesh))


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def pad_classes(feats: dict[str, np.ndarray], multiple: int) -> dict:
  """Pads the class axis of class features to a multiple of `multiple`.

  Padded classes get the token ids of class 0 (any valid prompt: their
  logits are masked), zero teacher rows and class_mask False. Grouped token
  ids (`prompt_learners.bucket_token_ids`) pad each group to the multiple
  (its rows are never gathered) and point the padded classes at row 0.

  Args:
    feats: {"token_ids": [C, L] or grouped ids, "class_mask": [C] bool, and
      optionally "teacher": [C, D]} numpy arrays.
    multiple: the device count of the class axis.

  Returns:
    The same keys with leading axis round_up(C, multiple).
  """

  def pad(v, count, fill_from_first):
    v = np.asarray(v)
    if count == 0:
      return v
    if fill_from_first:
      fill = np.repeat(v[:1], count, axis=0)
    else:
      fill = np.zeros((count,) + v.shape[1:], v.dtype)
    return np.concatenate([v, fill])

  c = len(feats["class_mask"])
  extra = round_up(c, multiple) - c
  out = {}
  for k, v in feats.items():
    if k == "token_ids" and isinstance(v, dict):
      buckets = tuple(
        pad(b, round_up(len(b), multiple) - len(b), True) for b in v["buckets"]
      )
      out[k] = {
        "buckets": buckets,
        "order": pad(_padded_order(v, buckets), extra, False),
      }
    else:
      out[k] = pad(v, extra, k == "token_ids")
  return out


def _padded_order(grouped: dict, padded_buckets) -> np.ndarray:
  """`order` re-pointed at the padded groups: a group's padding shifts the
  rows of every later group in the concatenation."""
  sizes = np.array([len(b) for b in grouped["buckets"]])
  padded = np.array([len(b) for b in padded_buckets])
  order = np.asarray(grouped["order"])
  group = np.searchsorted(np.cumsum(sizes), order, side="right")
  old_start = np.cumsum(sizes) - sizes
  new_start = np.cumsum(padded) - padded
  return (order - old_start[group] + new_start[group]).astype(order.dtype)


def class_sharding(mesh: Mesh, shard_classes: bool) -> NamedSharding:
  return along_data(mesh) if shard_classes else replicated(mesh)


def put_class_features(
  feats: dict[str, np.ndarray],
  mesh: Mesh,
  shard_classes: bool = True,
  multiple: int = 1,
) -> dict[str, jax.Array]:
  """Pads and places class features along the class axis.

  The class axis is padded to a multiple of `multiple` (one compiled step
  for datasets of different class counts) and, when sharded, of the mesh.
  """
  if shard_classes:
    multiple = math.lcm(multiple, mesh.size)
  if multiple > 1:
    feats = pad_classes(feats, multiple)
  sharding = class_sharding(mesh, shard_classes)
  return jax.tree.map(lambda v: jax.device_put(np.asarray(v), sharding), feats)
