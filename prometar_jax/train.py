"""train_and_evaluate(config, workdir): every run of a config, then the table.

A config (see configs/) names datasets and seeds; each (dataset, seed) is a
run: train the prompts on the protocol's training classes, evaluate the
last-epoch prompts on the protocol's test sets, write a `summary.json`.
When all runs are done the results table is written next to them:

  workdir/
    config.json
    <dataset>/seed<k>/checkpoints/<step>/   orbax, every epoch
    <dataset>/seed<k>/tensorboard/          scalars (process 0)
    <dataset>/seed<k>/summary.json          accuracies, HM, timings
    <dataset>/seed<k>/prompts.npz           the learned prompts
    results.{md,csv,json}                   per-dataset table, paper beside

Protocols (`config.protocol`):

* base2new: train on the base classes; evaluate on the base test set
  (base class names) and on the new test set (new class names); HM.
* domain_generalization / cross_dataset: train on all classes of the
  source; evaluate on its test set and on each of `config.eval.targets`.

A run whose summary.json exists is skipped; a run with checkpoints resumes
from the latest one exactly (same batches, same rng, same optimizer
states). Everything that can be checked before training is checked before
anything is written: the config, every dataset of the sweep, the CLIP
weights. A non-finite loss or state stops the run naming the step; the
checkpoints written before it are kept and no summary is written.

The step is one jit over a mesh of all devices of all processes (see
sharding.py); only process 0 logs, writes TensorBoard, summaries and
tables; every process takes part in checkpointing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging
from jax.sharding import Mesh

from prometar_jax import checkpoint as checkpoint_lib
from prometar_jax import data, evaluate, meta_step, results, schedules, zeroshot
from prometar_jax import prompt_learners as pl
from prometar_jax import sharding as sharding_lib
from prometar_jax.data import datasets as datasets_lib
from prometar_jax.models import clip as clip_lib

PyTree = Any
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SUMMARY = "summary.json"
PROMPTS = "prompts.npz"


class TrainingDiverged(FloatingPointError):
  """A loss or the state became NaN/inf; names the step."""


def _is_main() -> bool:
  return jax.process_index() == 0


def _info(msg: str, *args) -> None:
  if _is_main():
    logging.info(msg, *args)


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


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


def step_spec(config) -> meta_step.StepSpec:
  """The static learner + meta settings of the config (validated)."""
  try:
    prompt = pl.PromptConfig(**config.prompt)
    meta = meta_step.MetaConfig(
      **config.meta,
      momentum=config.optim.momentum,
      weight_decay=config.optim.weight_decay,
      gradnet_momentum=config.optim_gradnet.momentum,
      gradnet_weight_decay=config.optim_gradnet.weight_decay,
    )
  except TypeError as e:  # an unknown field in an unlocked config
    raise ValueError(f"invalid config.prompt / config.meta: {e}") from e
  return meta_step.StepSpec(prompt, meta)


def check_config(config) -> meta_step.StepSpec:
  """Raises ValueError for a config that cannot run; returns its spec."""
  if config.protocol not in results.PROTOCOLS:
    raise ValueError(
      f"config.protocol={config.protocol!r}: use one of {results.PROTOCOLS}"
    )
  if not config.data.datasets:
    raise ValueError("config.data.datasets is empty")
  if not config.seeds:
    raise ValueError("config.seeds is empty")
  names = list(config.data.datasets) + list(config.eval.targets)
  for name in names:
    datasets_lib.get_spec(name)  # ValueError naming the known datasets
  for name in config.data.datasets:
    if datasets_lib.get_spec(name).name in datasets_lib.TEST_ONLY:
      raise ValueError(
        f"{name} is a test-only dataset: use it in config.eval.targets"
      )
  if config.model.dtype not in DTYPES:
    raise ValueError(
      f"config.model.dtype={config.model.dtype!r}: use one of {list(DTYPES)}"
    )
  for key in ("optim", "optim_gradnet"):
    if config[key].schedule not in schedules.SCHEDULES:
      raise ValueError(
        f"config.{key}.schedule={config[key].schedule!r}: use one of "
        f"{schedules.SCHEDULES}"
      )
  if config.data.batch_size < 1 or config.optim.epochs < 0:
    raise ValueError("config.data.batch_size must be >= 1, epochs >= 0")
  return step_spec(config)


# ---------------------------------------------------------------------------
# Setup helpers
# ---------------------------------------------------------------------------


class DataCache:
  """Few-shot splits and image sources of a sweep, each built once."""

  def __init__(self, config):
    self._data = config.data
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

  def source(self, name: str):
    """The image reader of `name`: files, or a TFDS build if configured."""
    if not self._data.tfds_dir:
      return None
    if name not in self._sources:
      self._sources[name] = data.TfdsSource(
        name, self._data.root, self._data.tfds_dir
      )
    return self._sources[name]


def load_clip(config, mesh: Mesh) -> clip_lib.CLIP:
  """The frozen CLIP of `config.model`, replicated over the mesh."""
  clip = clip_lib.load(
    config.model.name,
    dtype=DTYPES[config.model.dtype],
    image_size=config.data.image_size,
    remat=config.model.remat,
  )
  return sharding_lib.put_replicated(clip, mesh)


@functools.lru_cache(maxsize=8)
def _init_fn(spec: meta_step.StepSpec, mesh: Mesh):
  """Jitted state init: born replicated on every device of every process."""

  def init(clip, seed):
    k_prompts, k_state = jax.random.split(jax.random.key(seed))
    prompts = pl.init(k_prompts, clip, (), spec.prompt)
    return meta_step.init_state(k_state, prompts, spec)

  return jax.jit(init, out_shardings=sharding_lib.replicated(mesh))


@functools.lru_cache(maxsize=8)
def make_train_step(
  spec: meta_step.StepSpec, mesh: Mesh, shard_classes: bool, batch_sharded
):
  """The train step jitted over the mesh (cached across runs)."""
  repl = sharding_lib.replicated(mesh)
  cls = sharding_lib.class_sharding(mesh, shard_classes)
  rows = sharding_lib.along_data(mesh) if batch_sharded else repl
  return jax.jit(
    functools.partial(meta_step.train_step, spec=spec),
    in_shardings=(repl, repl, cls, rows, repl, repl),
    out_shardings=(repl, repl),
    donate_argnums=(0,),
  )


def class_features(
  spec, clip, classnames, mesh, shard_classes, multiple=1, text_buckets=1
) -> dict:
  """Token ids, the 60-template teacher T0 and the mask, on the mesh.

  With `text_buckets` > 1 the class prompts are grouped by length
  (`prompt_learners.bucket_token_ids`, exact); not with class padding
  (`multiple` > 1), whose point is one shape for every dataset.
  """
  ids = pl.class_token_ids(spec.prompt, clip, classnames)
  teacher = np.asarray(zeroshot.teacher_text_features(clip, classnames))
  feats = {
    "token_ids": ids,
    "teacher": teacher.astype(np.float32),
    "class_mask": np.ones(len(ids), bool),
  }
  if text_buckets > 1 and multiple == 1:
    feats["token_ids"] = pl.bucket_token_ids(ids, text_buckets)
  return sharding_lib.put_class_features(feats, mesh, shard_classes, multiple)


def _write_text(path: str, text: str) -> None:
  tmp = f"{path}.tmp"
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(text)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def _read_json(path: str):
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


# ---------------------------------------------------------------------------
# Metrics, logging, NaN guard
# ---------------------------------------------------------------------------


def write_scalar(tag: str, value) -> None:
  """A TensorBoard scalar under the default writer and step.

  What `tf.summary.scalar` writes, without needing the tensorboard package
  at training time (it is only needed to look at the logs).
  """
  from tensorflow.core.framework import summary_pb2

  metadata = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
    data_class=summary_pb2.DATA_CLASS_SCALAR,
  )
  tf.summary.write(
    tag, tf.constant(float(value), tf.float32), metadata=metadata
  )


class _Logger:
  """Buffers step metrics; checks them, logs them, writes TensorBoard."""

  def __init__(self, run_dir, total, initial, desc, progress_bar):
    self.pending = []  # (step, device metrics)
    self.last = {}
    self.writer = None
    self.bar = None
    if _is_main():
      if run_dir:
        self.writer = tf.summary.create_file_writer(
          os.path.join(run_dir, "tensorboard")
        )
      if progress_bar:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step")

  def add(self, step: int, metrics: dict) -> None:
    self.pending.append((step, metrics))

  def flush(self, scalars: dict, where: Callable[[int], str]) -> None:
    """Fetches pending metrics; raises TrainingDiverged on a NaN/inf."""
    if not self.pending:
      return
    steps = [s for s, _ in self.pending]
    host = jax.device_get([m for _, m in self.pending])
    self.pending = []
    for step, m in zip(steps, host):
      bad = sorted(k for k, v in m.items() if not np.all(np.isfinite(v)))
      if bad:
        raise TrainingDiverged(
          f"non-finite {', '.join(bad)} at step {step + 1} ({where(step)})"
        )
    means = {k: np.mean([m[k] for m in host], axis=0) for k in host[0]}
    self.last = {k: v.tolist() for k, v in means.items()}
    last = steps[-1] + 1
    if self.bar is not None:
      self.bar.update(len(steps))
      self.bar.set_postfix(
        {
          k: f"{float(means[k]):.4g}"
          for k in ("loss_ce", "loss_meta")
          if k in means
        }
      )
    _info(
      "step %d: %s",
      last,
      ", ".join(
        f"{k}={float(v):.5g}" for k, v in means.items() if np.ndim(v) == 0
      ),
    )
    self._write(last, {**means, **scalars})

  def _write(self, step: int, values: dict) -> None:
    if self.writer is None:
      return
    with self.writer.as_default(step=step):
      for k, v in values.items():
        v = np.asarray(v)
        if v.ndim == 0:
          write_scalar(k, v)
        else:  # per-layer statistics (gamma of each prompt layer)
          for i, x in enumerate(v.reshape(-1)):
            write_scalar(f"{k}/layer_{i}", x)
    self.writer.flush()

  def scalars(self, step: int, values: dict) -> None:
    self._write(step, values)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    if self.writer is not None:
      self.writer.close()


@jax.jit
def _finite(tree) -> jax.Array:
  """True when every float leaf of `tree` is finite (one small program)."""
  leaves = [
    x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves]))


# ---------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------


def _train(
  config,
  spec,
  clip,
  mesh,
  dataset,
  split,
  seed,
  run_dir,
  *,
  eval_only,
  on_checkpoint,
  cache,
  desc,
):
  """Trains (or restores) the prompts of one run; returns (state, info)."""
  shard_classes = config.mesh.shard_classes
  c = config.data
  layout = sharding_lib.batch_layout(c.batch_size, mesh)
  pipeline = data.make_train_dataset(
    split["train"],
    c.batch_size,
    seed,
    image_size=c.image_size,
    scale=tuple(c.crop_scale),
    process_index=layout.process_index,
    process_count=layout.process_count,
    source=cache.source(dataset),
  )
  spe = pipeline.steps_per_epoch
  epochs = config.optim.epochs
  total = epochs * spe
  state = _init_fn(spec, mesh)(clip, np.int32(seed))
  identity = {
    "seed": int(seed),
    "num_classes": len(split["classnames"]),
    "num_train": len(split["train"]),
    "steps_per_epoch": spe,
  }

  ckpt = None
  if run_dir and config.checkpoint.enabled:
    ckpt = checkpoint_lib.Checkpointer(
      os.path.join(run_dir, "checkpoints"), config.checkpoint.max_to_keep
    )
  start = 0
  if ckpt is not None and ckpt.latest_step() is not None:
    state, meta = ckpt.restore(state)
    mismatch = {
      k: (meta.get(k), v) for k, v in identity.items() if meta.get(k) != v
    }
    if mismatch:
      raise ValueError(
        f"the checkpoints in {ckpt.directory} are from another run "
        f"(saved vs now: {mismatch}); use another workdir"
      )
    start = int(meta["step"])
    _info(
      "restored step %d of %d from %s: continuing at epoch %d, batch %d",
      start,
      total,
      ckpt.directory,
      start // spe + 1,
      start % spe + 1,
    )
  elif eval_only:
    raise FileNotFoundError(
      f"--eval_only: no checkpoint under {run_dir}/checkpoints; train first "
      "(same --workdir) or point --workdir at a training workdir"
    )
  info = {"steps": total, "steps_per_epoch": spe, "start_step": start}
  if eval_only or start >= total:
    if ckpt is not None:
      ckpt.close()
    if eval_only and start < total:
      logging.warning(
        "evaluating an unfinished run: step %d of %d", start, total
      )
    return state, info

  feats = class_features(
    spec,
    clip,
    split["classnames"],
    mesh,
    shard_classes,
    config.data.class_multiple,
    config.data.text_buckets,
  )
  step_fn = make_train_step(spec, mesh, shard_classes, layout.sharded)
  logger = _Logger(run_dir, total, start, desc, config.progress_bar)
  last_saved = start if start else None

  def where(step):
    return f"epoch {step // spe + 1}/{epochs}, batch {step % spe + 1}/{spe}"

  def checkpoint_now(step):
    nonlocal last_saved
    if ckpt is None:
      return
    if not bool(_finite(state)):
      raise TrainingDiverged(f"non-finite state after step {step}")
    meta = {**identity, "step": step, "epochs_done": step // spe}
    ckpt.save(step, state, meta)
    last_saved = step
    if on_checkpoint is not None:
      on_checkpoint(step=step, epochs_done=step // spe)

  t0 = time.time()
  every = config.checkpoint.every_steps
  try:
    for epoch in range(start // spe, epochs):
      lr = schedules.epoch_lr(config.optim, epoch, epochs)
      lr_g = schedules.epoch_lr(config.optim_gradnet, epoch, epochs)
      lrs = {"lr": lr, "lr_gradnet": lr_g}
      first = start - epoch * spe if epoch == start // spe else 0
      step = epoch * spe + first
      for batch in pipeline.iterate_epoch(epoch, first):
        batch = data.to_global(batch, layout.sharding)
        state, metrics = step_fn(
          state, clip, feats, batch, np.float32(lr), np.float32(lr_g)
        )
        logger.add(step, metrics)
        step += 1
        if step % config.log_every == 0 or step % spe == 0:
          logger.flush(lrs, where)
        if every and step % every == 0 and step % spe:
          logger.flush(lrs, where)  # the NaN guard runs before any save
          checkpoint_now(step)
      logger.flush(lrs, where)
      checkpoint_now(step)
  except TrainingDiverged as e:
    kept = (
      f"the last good checkpoint is step {last_saved} in {ckpt.directory}"
      if ckpt is not None and last_saved
      else "no checkpoint was written"
    )
    raise TrainingDiverged(f"training diverged: {e}; {kept}") from None
  finally:
    logger.close()
    if ckpt is not None:
      ckpt.close()
  info["train_seconds"] = time.time() - t0
  info["final_metrics"] = logger.last
  return state, info


def run(
  config,
  dataset: str,
  seed: int,
  run_dir: str | None,
  *,
  clip: clip_lib.CLIP,
  mesh: Mesh,
  cache: DataCache | None = None,
  eval_only: bool = False,
  on_checkpoint: Callable | None = None,
) -> dict:
  """Trains and evaluates one (dataset, seed); returns its summary.

  Args:
    config: the experiment config.
    dataset: the training dataset.
    seed: the Dassl seed (few-shot selection, data order) and JAX seed.
    run_dir: where checkpoints, TensorBoard and summary go (None: nothing
      is written and nothing resumed).
    clip: the frozen CLIP, replicated over `mesh`.
    mesh: the device mesh.
    cache: the sweep's DataCache (splits read once).
    eval_only: restore the latest checkpoint and only evaluate.
    on_checkpoint: called as f(step=, epochs_done=) on every process after
      each checkpoint is committed.

  Returns:
    The summary dict (also written to run_dir/summary.json on process 0).
  """
  spec = step_spec(config)
  cache = cache or DataCache(config)
  summary_path = os.path.join(run_dir, SUMMARY) if run_dir else None
  if summary_path and not eval_only and tf.io.gfile.exists(summary_path):
    _info("%s exists: run already done (delete it to redo)", summary_path)
    return _read_json(summary_path)

  train_split = cache.split(dataset, seed, train_subsample(config))
  desc = f"{dataset} seed {seed}"
  if spec.prompt.kind == "zeroshot":
    params, info = {}, {"steps": 0}
  else:
    state, info = _train(
      config,
      spec,
      clip,
      mesh,
      dataset,
      train_split,
      seed,
      run_dir,
      eval_only=eval_only,
      on_checkpoint=on_checkpoint,
      cache=cache,
      desc=desc,
    )
    params = state.prompts

  t0 = time.time()
  accuracy, num_test, num_classes = {}, {}, {}
  for es in eval_sets(config, dataset):
    split = cache.split(es.dataset, seed, es.subsample)
    items = split["test"]
    if 0 < config.eval.max_examples < len(items):
      # Evenly spaced: test lists are often grouped by class.
      items = items[:: math.ceil(len(items) / config.eval.max_examples)]
    out = evaluate.evaluate(
      params,
      clip,
      spec.prompt,
      split["classnames"],
      items,
      mesh=mesh,
      batch_size=config.eval.batch_size,
      image_size=config.data.image_size,
      shard_classes=config.mesh.shard_classes,
      class_multiple=config.data.class_multiple,
      source=cache.source(es.dataset),
    )
    accuracy[es.name] = out["accuracy"]
    num_test[es.name] = out["total"]
    num_classes[es.name] = out["num_classes"]
    _info(
      "%s seed %d: %s accuracy %.2f%%", dataset, seed, es.name, out["accuracy"]
    )

  summary = {
    "protocol": config.protocol,
    "dataset": dataset,
    "seed": int(seed),
    "method": _method_label(spec),
    "accuracy": accuracy,
    "num_test": num_test,
    "num_classes": num_classes,
    **info,
    "eval_seconds": time.time() - t0,
    "devices": int(mesh.size),
    "processes": jax.process_count(),
  }
  if config.protocol == "base2new":
    summary["hm"] = results.harmonic_mean(accuracy["base"], accuracy["new"])
  if run_dir and _is_main():
    if params:
      checkpoint_lib.export_prompts(os.path.join(run_dir, PROMPTS), params)
    writer = tf.summary.create_file_writer(os.path.join(run_dir, "tensorboard"))
    with writer.as_default(step=int(info["steps"])):
      for k, v in accuracy.items():
        write_scalar(f"accuracy/{k}", v)
    writer.close()
    results.write_json(summary_path, summary)
  return summary


def _method_label(spec: meta_step.StepSpec) -> str:
  kind, mode = spec.prompt.kind, spec.meta.mode
  if kind == "zeroshot":
    return "zero-shot CLIP"
  return f"{kind} + ProMetaR" if mode == "prometar" else f"{kind} ({mode})"


def preflight(config, cache: DataCache) -> None:
  """Reads every split the sweep needs (first seed): missing data fails now."""
  seed = config.seeds[0]
  for name in config.data.datasets:
    cache.split(name, seed, train_subsample(config))
    for es in eval_sets(config, name):
      cache.split(es.dataset, seed, es.subsample)


def run_dir_of(workdir: str, dataset: str, seed: int) -> str:
  return os.path.join(workdir, dataset, f"seed{seed}")


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str | None,
  *,
  eval_only: bool = False,
  on_checkpoint: Callable | None = None,
) -> dict:
  """Runs every (dataset, seed) of `config` and writes the results table.

  Args:
    config: an experiment config (configs/*.py).
    workdir: output folder (local or gs://); None writes nothing (no
      checkpoints, no resume), for notebooks.
    eval_only: evaluate the latest checkpoint of every run, no training.
    on_checkpoint: optional f(step=, epochs_done=) called after each
      committed checkpoint (every epoch, and every
      `config.checkpoint.every_steps` steps if set).

  Returns:
    {"runs": [summary per run], "table": results table dict}.
  """
  check_config(config)
  cache = DataCache(config)
  preflight(config, cache)
  mesh = sharding_lib.make_mesh(config.mesh.num_devices)
  clip = load_clip(config, mesh)
  _info(
    "%d process(es), %d device(s); %d run(s): %s x seeds %s",
    jax.process_count(),
    mesh.size,
    len(config.data.datasets) * len(config.seeds),
    ",".join(config.data.datasets),
    ",".join(str(s) for s in config.seeds),
  )
  if workdir and _is_main():
    tf.io.gfile.makedirs(workdir)
    _write_text(
      os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2)
    )

  summaries = []
  for dataset in config.data.datasets:
    for seed in config.seeds:
      run_dir = run_dir_of(workdir, dataset, seed) if workdir else None
      summaries.append(
        run(
          config,
          dataset,
          seed,
          run_dir,
          clip=clip,
          mesh=mesh,
          cache=cache,
          eval_only=eval_only,
          on_checkpoint=on_checkpoint,
        )
      )
  table = results.make_table(summaries, config.protocol)
  if workdir and _is_main():
    paths = results.write_tables(
      summaries, config.protocol, workdir, title=_title(config, summaries)
    )
    _info("results: %s", ", ".join(paths.values()))
    _info("\n%s", results.to_markdown(table))
  return {"runs": summaries, "table": table}


def _title(config, summaries) -> str:
  method = summaries[0]["method"] if summaries else ""
  name = {
    "base2new": "Base-to-new generalization",
    "domain_generalization": "Domain generalization",
    "cross_dataset": "Cross-dataset transfer",
  }[config.protocol]
  return f"{name}: {method}"
