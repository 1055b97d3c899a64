"""One run: a (dataset, seed) of a config, trained, guarded and evaluated.

`run(config, dataset, seed, run_dir, ...)` goes through these stages, each
leaving a file that lets a later call pick up where this one stopped:

  run.json        the run's identity (identity.py), written by the sweep
                  before anything else; a different identity is refused
  checkpoints/    orbax, every epoch (and every `checkpoint.every_steps`):
                  a killed run resumes from the latest, bit-identically
  prompts.npz     the learned prompts, written as soon as training ends,
  gradnet.npz     (with the learned gradnet of a ProMetaR rule: analysis
                  only, evaluation uses the prompts alone)
  training.json   with the training's record: an evaluation that fails
                  (a broken test image, a full disk) never loses training
  summary.json    accuracies, HM, timings: the run is done; a later call
                  returns it without training or evaluating again
  tensorboard/    scalars (process 0)

The loop checks the run's health (guard.py) at every log point and before
every save; a failed check stops the run with `TrainingDiverged`, and only
checkpoints that passed a check exist. The step is one jit over a mesh of
all devices of all processes (sharding.py); only process 0 logs and writes
summaries; every process takes part in checkpointing.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from prometar_jax import checkpoint as checkpoint_lib
from prometar_jax import (
  data,
  errors,
  evaluate,
  features,
  fileio,
  guard,
  meta_step,
  metrics,
  protocol,
  results,
  schedules,
)
from prometar_jax import prompt_learners as pl
from prometar_jax import sharding as sharding_lib
from prometar_jax.models import clip as clip_lib

SUMMARY = "summary.json"
PROMPTS = "prompts.npz"
GRADNET = "gradnet.npz"
TRAINING = "training.json"


# ---------------------------------------------------------------------------
# The compiled pieces (cached across the runs of a sweep)
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _init_fn(spec: meta_step.StepSpec, mesh: Mesh):
  """Jitted state init: born replicated on every device of every process."""

  def init(clip, seed, steps_per_epoch):
    k_prompts, k_state = jax.random.split(jax.random.key(seed))
    prompts = pl.init(k_prompts, clip, spec.prompt)
    return meta_step.init_state(k_state, prompts, spec, steps_per_epoch)

  return jax.jit(init, out_shardings=sharding_lib.replicated(mesh))


@functools.lru_cache(maxsize=8)
def sharded_train_step(
  spec: meta_step.StepSpec, mesh: Mesh, shard_classes: bool, batch_sharded
):
  """f(state, frozen, batch): the train step jitted over the mesh (cached
  across runs)."""
  repl = sharding_lib.replicated(mesh)
  cls = sharding_lib.class_sharding(mesh, shard_classes)
  rows = sharding_lib.along_data(mesh) if batch_sharded else repl
  return jax.jit(
    functools.partial(meta_step.train_step, spec=spec),
    in_shardings=(repl, meta_step.Frozen(clip=repl, classes=cls), rows),
    out_shardings=(repl, repl),
    donate_argnums=(0,),
  )


def step_spec(config) -> meta_step.StepSpec:
  """The static learner, meta and optimizer settings of the config
  (validated)."""
  if "kind" in config.prompt:
    raise ValueError(
      "config.prompt.kind is now config.model.learner (the learner's "
      "registered name; config.prompt holds its hyper-parameters)"
    )
  try:
    prompt = pl.PromptConfig(kind=config.model.learner, **config.prompt)
    meta = meta_step.MetaConfig(**config.meta)
    optim = schedules.Optimizer(**config.optim)
    # The gradnet's cosine (paper behaviour) spans the run as well.
    optim_gradnet = schedules.Optimizer(
      **config.optim_gradnet, epochs=config.optim.epochs
    )
  except TypeError as e:  # an unknown field in an unlocked config
    raise ValueError(
      f"invalid config.prompt / config.meta / config.optim*: {e}"
    ) from e
  return meta_step.StepSpec(prompt, meta, optim, optim_gradnet)


def method_label(spec: meta_step.StepSpec) -> str:
  kind, mode = spec.prompt.kind, spec.meta.mode
  if not spec.prompt.learner.trained:
    return "zero-shot CLIP"
  return f"{kind} + ProMetaR" if mode == "prometar" else f"{kind} ({mode})"


# ---------------------------------------------------------------------------
# Training
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
  state = _init_fn(spec, mesh)(clip, np.int32(seed), np.int32(spe))
  initial_norm = float(jax.device_get(guard.global_norm(state.prompts)))
  identity = {
    "seed": int(seed),
    "num_classes": len(split["classnames"]),
    "num_train": len(split["train"]),
    "steps_per_epoch": spe,
  }

  def where(step):
    return f"epoch {step // spe + 1}/{epochs}, batch {step % spe + 1}/{spe}"

  checks = guard.Guard(guard.Bounds(**config.guard), initial_norm, where)
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
      ckpt.close()
      raise ValueError(
        f"the checkpoints in {ckpt.directory} are from another run "
        f"(saved vs now: {mismatch}); use another workdir"
      )
    start = int(meta["step"])
    metrics.info(
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

  feats = features.class_features(
    spec,
    clip,
    split["classnames"],
    mesh,
    shard_classes,
    config.data.class_multiple,
    config.data.text_buckets,
  )
  frozen = meta_step.Frozen(clip, feats)
  step_fn = sharded_train_step(spec, mesh, shard_classes, layout.sharded)
  logger = metrics.Logger(run_dir, total, start, desc, config.progress_bar)
  last_good = start if start else None

  def check(step):
    """The guard over everything since the last check; logs it (the lrs
    are step metrics: the values the step used)."""
    fetched = logger.fetch()
    checks.check_metrics(fetched)
    ratio = checks.check_state(step, state)
    logger.log(fetched, {"prompt_norm_ratio": ratio})

  def checkpoint_now(step):
    nonlocal last_good
    if ckpt is None:
      return
    meta = {**identity, "step": step, "epochs_done": step // spe}
    ckpt.save(step, state, meta)
    last_good = step
    if on_checkpoint is not None:
      on_checkpoint(step=step, epochs_done=step // spe)

  t0 = time.time()
  every = config.checkpoint.every_steps
  try:
    for epoch in range(start // spe, epochs):
      first = start - epoch * spe if epoch == start // spe else 0
      step = epoch * spe + first
      for batch in pipeline.iterate_epoch(epoch, first):
        batch = data.to_global(batch, layout.sharding)
        state, step_metrics = step_fn(state, frozen, batch)
        logger.add(step, step_metrics)
        step += 1
        at_save = every and step % every == 0 and step % spe
        if step % config.log_every == 0 or step % spe == 0 or at_save:
          check(step)
        if at_save:
          checkpoint_now(step)
      check(step)
      checkpoint_now(step)
  except errors.TrainingDiverged as e:
    kept = (
      f"the last checkpoint that passed the checks is step {last_good} in "
      f"{ckpt.directory}"
      if ckpt is not None and last_good
      else "no checkpoint was kept"
    )
    raise errors.TrainingDiverged(
      f"{e}; {kept}. Lower the learning rate (or relax config.guard) and "
      "start again with --archive_old_runs or in another --workdir"
    ) from None
  finally:
    logger.close()
    if ckpt is not None:
      ckpt.close()
  info["train_seconds"] = time.time() - t0
  info["final_metrics"] = logger.last
  return state, info


# ---------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------


def _finished_training(run_dir, eval_only):
  """(prompts, info) of a training that ended before, or None."""
  if not run_dir:
    return None
  paths = [os.path.join(run_dir, f) for f in (PROMPTS, TRAINING)]
  if not all(fileio.exists(p) for p in paths):
    return None
  has_ckpt = fileio.exists(os.path.join(run_dir, "checkpoints"))
  if eval_only and has_ckpt:
    return None  # --eval_only evaluates the latest checkpoint
  return checkpoint_lib.load_prompts(paths[0]), fileio.read_json(paths[1])


def _save_training(run_dir, params, info, gradnet=None) -> None:
  """prompts.npz (gradnet.npz) and training.json, before any evaluation."""
  if run_dir and metrics.is_main():
    checkpoint_lib.export_prompts(os.path.join(run_dir, PROMPTS), params)
    if gradnet:
      checkpoint_lib.export_prompts(os.path.join(run_dir, GRADNET), gradnet)
    fileio.write_json(os.path.join(run_dir, TRAINING), info)


def run(
  config,
  dataset: str,
  seed: int,
  run_dir: str | None,
  *,
  clip: clip_lib.CLIP,
  mesh: Mesh,
  cache: protocol.DataCache | None = None,
  eval_only: bool = False,
  on_checkpoint: Callable | None = None,
) -> dict:
  """Trains and evaluates one (dataset, seed); returns its summary.

  The sweep (train.py) checks the run's identity and writes run.json
  before calling this; called directly, nothing checks that run_dir holds
  this run.

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
  cache = cache or protocol.DataCache(config)
  names = dict(config.data.display_names)
  summary_path = os.path.join(run_dir, SUMMARY) if run_dir else None
  if summary_path and not eval_only and fileio.exists(summary_path):
    metrics.info("%s: done before, its summary is reused", run_dir)
    summary = fileio.read_json(summary_path)
    metrics.report("%s, done before", results.summary_line(summary, names))
    return summary

  train_split = cache.split(dataset, seed, protocol.train_subsample(config))
  desc = results.run_label(method_label(spec), dataset, seed, names)
  finished = _finished_training(run_dir, eval_only)
  if not spec.prompt.learner.trained:
    params, info = {}, {"steps": 0}
  elif finished is not None:
    params, info = finished
    metrics.info("%s: training done before, evaluating it", run_dir)
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
    if not eval_only:
      _save_training(run_dir, params, info, state.gradnet)

  t0 = time.time()
  accuracy, num_test, num_classes = {}, {}, {}
  for es in protocol.eval_sets(config, dataset):
    split = cache.split(es.dataset, seed, es.subsample)
    out = evaluate.evaluate(
      params,
      clip,
      spec.prompt,
      split["classnames"],
      cache.eval_items(es, seed),
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
    metrics.info(
      "%s seed %d: %s accuracy %.2f%%", dataset, seed, es.name, out["accuracy"]
    )

  summary = {
    "protocol": config.protocol,
    "dataset": dataset,
    "seed": int(seed),
    "method": method_label(spec),
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
  if run_dir and metrics.is_main():
    metrics.write_scalars(
      run_dir,
      int(info["steps"]),
      {f"accuracy/{k}": v for k, v in accuracy.items()},
    )
    fileio.write_json(summary_path, summary)
  metrics.report("%s", results.summary_line(summary, names))
  return summary
