"""tf.data training and evaluation pipelines over few-shot item lists.

Items are `(image_ref, label, classname)` tuples from `fewshot_split` (or
`tfds_catalog.catalog_split`). A *source* turns an image ref into encoded
bytes: `FileSource` (the default) reads files; `tfds_coop.TfdsSource` and
`tfds_catalog.CatalogSource` read prepared TFDS records.

Training (`make_train_dataset` -> `TrainPipeline`):
  - Each epoch is a permutation of all items drawn from (seed, epoch), cut to
    `steps_per_epoch = floor(N / B)` global batches (Dassl: drop_last).
  - Per image: RandomResizedCrop(image_size, scale (0.08, 1), ratio (3/4,
    4/3), bicubic), horizontal flip, CLIP normalization; the randomness is
    stateless, seeded by (seed, epoch, item index).
  - `iterate_epoch(epoch, start_step)` yields the batches of one epoch from
    any step on, identical to an uninterrupted run (exact resume).

Evaluation (`make_eval_dataset` -> `EvalPipeline`):
  - Resize shorter side to image_size (bicubic), center crop, normalize;
    items in order, the last global batch padded with zero images and
    `mask == False`, so every batch has the same shape.

Several processes: global batch B, P processes. Each process yields B / P
examples of every global batch: process p holds rows [p * B/P, (p+1) * B/P)
of it. `to_global(batch, sharding)` assembles the global jax.Array.

Batches are numpy dicts: "image" float32 [B/P, S, S, 3] (NHWC), "label" int32
[B/P], and for evaluation "mask" bool [B/P].

Importing this module gives TensorFlow's global intra-op thread pool one
thread, if TensorFlow has not started yet (see `_one_intra_op_thread`).
"""

import dataclasses
import functools
import math
import os
import random
import re
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import jax
import numpy as np
import tensorflow as tf

from prometar_jax.data import pp_ops


class ImageReadError(ValueError):
  """An image of the item list cannot be read or decoded."""


class Source(Protocol):
  """Maps image refs to encoded image bytes, inside and outside tf.data."""

  def keys(self, refs: Sequence[str]) -> np.ndarray:
    """Per-ref keys that `read` understands (strings or ints)."""

  def read(self, key: tf.Tensor) -> tf.Tensor:
    """In-graph: one key -> scalar tf.string of encoded image bytes."""

  def read_py(self, ref: str) -> bytes:
    """Eager: the bytes of one ref, used to name a broken image."""


@dataclasses.dataclass(frozen=True)
class FileSource:
  """Image refs are file paths (local or any tf.io.gfile file system)."""

  def keys(self, refs):
    return np.asarray(list(refs), dtype=object)

  def read(self, key):
    return tf.io.read_file(key)

  def read_py(self, ref):
    with tf.io.gfile.GFile(ref, "rb") as f:
      return f.read()


def _split_items(items, source):
  refs = tuple(item[0] for item in items)
  labels = np.asarray([item[1] for item in items], np.int32)
  source = FileSource() if source is None else source
  return refs, labels, source


def _check_processes(batch_size, process_index, process_count):
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
      f"process_index {process_index} out of range for {process_count} "
      "processes."
    )
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(
      f"Global batch size {batch_size} must be a positive multiple of the "
      f"process count {process_count}."
    )
  return batch_size // process_count


def _with_options(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  # Parallelism comes from the parallel map; ops inside one map call (the
  # resize matmuls) stay on its thread instead of contending for the
  # intra-op pool (big_vision sets the same).
  options.threading.max_intra_op_parallelism = 1
  options.deterministic = True
  return ds.with_options(options)


def _one_intra_op_thread():
  """Gives TensorFlow's global intra-op thread pool a single thread.

  The oneDNN kernels of the resize (matmul, transpose) ignore
  `max_intra_op_parallelism` and split every op over the global pool, on
  top of the parallel map that already keeps every core busy: measured 20-30%
  more CPU per image on 2 cores. TensorFlow only feeds JAX here, so its pool
  is not needed. Only possible before TensorFlow's runtime starts, and left
  alone if the pool size was chosen (TF_NUM_INTRAOP_THREADS or tf.config).
  """
  if os.environ.get("TF_NUM_INTRAOP_THREADS"):
    return
  try:
    if tf.config.threading.get_intra_op_parallelism_threads() == 0:
      tf.config.threading.set_intra_op_parallelism_threads(1)
  except RuntimeError:  # The runtime has started: too late.
    pass


_one_intra_op_thread()


@functools.cache
def _eval_image_fn(size: int):
  """`eval_transform(decode(data), size)` as a tf.function, traced once.

  Every `EvalPipeline.dataset()` calls it instead of tracing the transform
  again (a few hundred ops: about 0.2 s of Python per evaluation).
  """
  return tf.function(
    lambda data: pp_ops.eval_transform(pp_ops.decode(data), size),
    input_signature=[tf.TensorSpec([], tf.string)],
    autograph=False,
  )


def find_broken(source, candidates):
  """The first candidate ref that cannot be read and decoded, with reason."""
  for ref in candidates:
    try:
      pp_ops.decode(tf.constant(source.read_py(ref)))
    except (tf.errors.OpError, OSError, KeyError) as e:
      return ref, _reason(e)
  return None


def _reason(e: Exception) -> str:
  """The first line of an error, without TensorFlow's op decorations."""
  text = (getattr(e, "message", None) or str(e)).strip()
  text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
  text = re.sub(
    r"\s*\[Op:[^\]]*\].*$", "", text.splitlines()[0] if text else ""
  )
  return text or type(e).__name__


def _iterate(ds, source, refs, local_idx, local_batch):
  """Numpy batches of `ds`; a decode failure is re-raised naming the file."""
  it = ds.as_numpy_iterator()
  k = 0
  while True:
    try:
      batch = next(it)
    except StopIteration:
      return
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
      # Deterministic tf.data reports an element's error at its place in
      # the order: the broken image is in batch k (later ones are checked
      # too, in case).
      start = k * local_batch
      candidates = [refs[i] for i in local_idx[start:] if i >= 0]
      found = find_broken(source, candidates)
      if found is None:
        raise
      raise ImageReadError(f"Cannot read image {found[0]}: {found[1]}") from e
    k += 1
    yield batch


@dataclasses.dataclass(frozen=True, eq=False)
class TrainPipeline:
  """Epoch-wise shuffled, augmented training batches for one process.

  Build it with `make_train_dataset`. All state is in the fields; every
  method is a pure function of them and of its arguments.
  """

  refs: tuple[str, ...]
  labels: np.ndarray
  batch_size: int
  seed: int
  image_size: int
  process_index: int
  process_count: int
  source: Any
  scale: tuple[float, float] = pp_ops.RRC_SCALE
  ratio: tuple[float, float] = pp_ops.RRC_RATIO

  @property
  def num_examples(self) -> int:
    return len(self.refs)

  @property
  def local_batch_size(self) -> int:
    return self.batch_size // self.process_count

  @property
  def steps_per_epoch(self) -> int:
    """floor(N / B): Dassl's drop_last train loader length."""
    return self.num_examples // self.batch_size

  def epoch_order(self, epoch: int) -> np.ndarray:
    """Global order of item indices for `epoch`: [steps_per_epoch * B].

    A Python `random.Random` keyed by (seed, epoch) shuffles the indices:
    its output is fixed across Python versions and independent of the
    number of processes.
    """
    order = list(range(self.num_examples))
    random.Random(f"prometar_jax/train/{self.seed}/{epoch}").shuffle(order)
    return np.asarray(order[: self.steps_per_epoch * self.batch_size], np.int64)

  def local_indices(self, epoch: int, start_step: int = 0) -> np.ndarray:
    """This process's item indices for steps [start_step, steps_per_epoch)."""
    if not 0 <= start_step <= self.steps_per_epoch:
      raise ValueError(
        f"start_step {start_step} outside [0, {self.steps_per_epoch}]."
      )
    b = self.local_batch_size
    order = self.epoch_order(epoch).reshape(self.steps_per_epoch, -1)
    rows = order[
      start_step:, self.process_index * b : (self.process_index + 1) * b
    ]
    return rows.reshape(-1)

  def dataset(self, epoch: int, start_step: int = 0) -> tf.data.Dataset:
    """The tf.data pipeline of one epoch from `start_step` on."""
    idx = self.local_indices(epoch, start_step)
    keys = self.source.keys(self.refs)
    size, scale, ratio = self.image_size, self.scale, self.ratio
    seed, source = self.seed, self.source

    def load(key, label, index):
      image = pp_ops.decode(source.read(key))
      example_seed = pp_ops.example_seed(seed, epoch, index)
      image = pp_ops.train_transform(image, example_seed, size, scale, ratio)
      return {"image": image, "label": label}

    ds = tf.data.Dataset.from_tensor_slices((keys[idx], self.labels[idx], idx))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(self.local_batch_size, drop_remainder=True)
    return _with_options(ds.prefetch(tf.data.AUTOTUNE))

  def iterate_epoch(
    self, epoch: int, start_step: int = 0
  ) -> Iterator[dict[str, np.ndarray]]:
    """Yields {"image", "label"} numpy batches of `epoch` from `start_step`."""
    idx = self.local_indices(epoch, start_step)
    ds = self.dataset(epoch, start_step)
    return _iterate(ds, self.source, self.refs, idx, self.local_batch_size)


def make_train_dataset(
  items: Sequence[tuple],
  batch_size: int,
  seed: int,
  image_size: int = 224,
  process_index: int = 0,
  process_count: int = 1,
  source: Source | None = None,
  scale: tuple[float, float] = pp_ops.RRC_SCALE,
  ratio: tuple[float, float] = pp_ops.RRC_RATIO,
) -> TrainPipeline:
  """Training pipeline over `items` (e.g. fewshot_split(...)["train"]).

  Args:
    items: (image_ref, label, classname) tuples.
    batch_size: the global batch size B (ProMetaR: 4).
    seed: seeds the epoch permutations and the augmentations.
    image_size: output height and width.
    process_index: this process (jax.process_index()).
    process_count: number of processes (jax.process_count()); must divide B.
    source: image reader; None reads the refs as files.
    scale: RandomResizedCrop area range.
    ratio: RandomResizedCrop aspect range.

  Returns:
    A `TrainPipeline`: `steps_per_epoch`, `iterate_epoch(epoch, start_step)`.
  """
  _check_processes(batch_size, process_index, process_count)
  refs, labels, source = _split_items(items, source)
  if len(refs) < batch_size:
    raise ValueError(
      f"{len(refs)} training items are fewer than one batch of {batch_size}."
    )
  return TrainPipeline(
    refs=refs,
    labels=labels,
    batch_size=batch_size,
    seed=int(seed),
    image_size=int(image_size),
    process_index=process_index,
    process_count=process_count,
    source=source,
    scale=tuple(scale),
    ratio=tuple(ratio),
  )


@dataclasses.dataclass(frozen=True, eq=False)
class EvalPipeline:
  """Ordered, padded evaluation batches for one process."""

  refs: tuple[str, ...]
  labels: np.ndarray
  batch_size: int
  image_size: int
  process_index: int
  process_count: int
  source: Any

  @property
  def num_examples(self) -> int:
    return len(self.refs)

  @property
  def local_batch_size(self) -> int:
    return self.batch_size // self.process_count

  @property
  def num_batches(self) -> int:
    """ceil(N / B) global batches, the same on every process."""
    return math.ceil(self.num_examples / self.batch_size)

  def local_indices(self) -> np.ndarray:
    """Item index of every local row, -1 for padding: [num_batches * B/P]."""
    b = self.local_batch_size
    pos = np.arange(self.num_batches * self.batch_size).reshape(
      self.num_batches, self.batch_size
    )
    pos = pos[:, self.process_index * b : (self.process_index + 1) * b]
    pos = pos.reshape(-1)
    return np.where(pos < self.num_examples, pos, -1)

  def dataset(self) -> tf.data.Dataset:
    """The tf.data pipeline: real rows first, then zero padding rows."""
    idx = self.local_indices()
    # Positions grow along the local rows, so padding is a suffix.
    real = idx[idx >= 0]
    n_pad = len(idx) - len(real)
    keys = self.source.keys(self.refs)
    size, source = self.image_size, self.source

    transform = _eval_image_fn(size)

    @tf.autograph.experimental.do_not_convert
    def load(key, label):
      image = transform(source.read(key))
      return {"image": image, "label": label, "mask": tf.constant(True)}

    ds = tf.data.Dataset.from_tensor_slices((keys[real], self.labels[real]))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    pad = {
      "image": tf.zeros([size, size, 3], tf.float32),
      "label": tf.constant(0, tf.int32),
      "mask": tf.constant(False),
    }
    ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(n_pad))
    ds = ds.batch(self.local_batch_size, drop_remainder=True)
    return _with_options(ds.prefetch(tf.data.AUTOTUNE))

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    """Yields {"image", "label", "mask"} numpy batches, in item order."""
    idx = self.local_indices()
    return _iterate(
      self.dataset(), self.source, self.refs, idx, self.local_batch_size
    )


def make_eval_dataset(
  items: Sequence[tuple],
  batch_size: int,
  image_size: int = 224,
  process_index: int = 0,
  process_count: int = 1,
  source: Source | None = None,
) -> EvalPipeline:
  """Evaluation pipeline over `items` (e.g. fewshot_split(...)["test"]).

  Args:
    items: (image_ref, label, classname) tuples.
    batch_size: the global batch size B (Dassl's test batch: 100).
    image_size: output height and width.
    process_index: this process.
    process_count: number of processes; must divide B.
    source: image reader; None reads the refs as files.

  Returns:
    An `EvalPipeline`: iterate it for batches; `num_batches` per process.
  """
  _check_processes(batch_size, process_index, process_count)
  refs, labels, source = _split_items(items, source)
  return EvalPipeline(
    refs=refs,
    labels=labels,
    batch_size=batch_size,
    image_size=int(image_size),
    process_index=process_index,
    process_count=process_count,
    source=source,
  )


def to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """Process-local numpy batch -> global jax.Arrays laid out by `sharding`.

  Args:
    batch: this process's rows (leading axis B / P).
    sharding: e.g. NamedSharding(mesh, P("data")) over all devices; the
      global leading axis is B, process p's rows at [p * B/P, (p+1) * B/P)
      when the mesh orders devices by process, as jax.make_mesh does.

  Returns:
    The same keys, each a jax.Array of global shape [B, ...].
  """
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, x), batch
  )
