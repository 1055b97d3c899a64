"""train_and_evaluate(config, workdir): every run of a config, then the table.

The sweep, from the top (launch.py calls it; a notebook can too):

1. Check what can be checked without writing anything: the config, every
   few-shot split of every (dataset, seed) (missing data fails now), the
   CLIP checkpoint (a damaged file is named).
2. Take the workdir's lock (workdir.py): one writer per workdir.
3. Compute each run's identity (identity.py) and compare it with what its
   folder holds: a folder of another configuration, data or model is
   refused, naming the differing keys, before any work (or moved aside
   with `archive_old_runs`).
4. Check that every image of every run can be read (data/verify.py).
5. Write config.json and each run's run.json, then each run (run.py):
   train or resume, guard, save prompts, evaluate, summary.
6. The results table of all runs (results.py).

  workdir/
    .lock                                   who holds (or last held) it
    config.json
    <dataset>/seed<k>/run.json              the run's identity
    <dataset>/seed<k>/checkpoints/<step>/   orbax, every epoch
    <dataset>/seed<k>/tensorboard/          scalars (process 0)
    <dataset>/seed<k>/prompts.npz           the learned prompts
    <dataset>/seed<k>/training.json         the training's record
    <dataset>/seed<k>/summary.json          accuracies, HM, timings
    results.{md,csv,json}                   per-dataset table, paper beside
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from jax.sharding import Mesh

from prometar_jax import fileio, identity, metrics, protocol, results, schedules
from prometar_jax import prompt_learners as pl
from prometar_jax import run as run_lib
from prometar_jax import sharding as sharding_lib
from prometar_jax import workdir as workdir_lib
from prometar_jax.data import datasets as datasets_lib
from prometar_jax.data import verify
from prometar_jax.models import clip as clip_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The run's pieces, under the names the sweep has always had.
step_spec = run_lib.step_spec
eval_sets = protocol.eval_sets
train_subsample = protocol.train_subsample
SUMMARY = run_lib.SUMMARY
PROMPTS = run_lib.PROMPTS


def check_config(config):
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
  g = config.guard
  if not (g.max_prompt_norm_ratio > 1 and g.max_loss > 0):
    raise ValueError(
      "config.guard.max_prompt_norm_ratio must be > 1 and max_loss > 0"
    )
  return step_spec(config)


def load_clip(config, mesh: Mesh) -> clip_lib.CLIP:
  """The frozen CLIP of `config.model`, replicated over the mesh."""
  clip = clip_lib.load(
    config.model.name,
    dtype=DTYPES[config.model.dtype],
    image_size=config.data.image_size,
    remat=config.model.remat,
  )
  return sharding_lib.put_replicated(clip, mesh)


def _runs(config) -> list[tuple[str, int]]:
  return [(d, int(s)) for d in config.data.datasets for s in config.seeds]


def preflight(config, cache: protocol.DataCache) -> None:
  """Reads every split of every run: missing data fails now."""
  for name, seed in _runs(config):
    cache.split(name, seed, train_subsample(config))
    for es in eval_sets(config, name):
      cache.split(es.dataset, seed, es.subsample)


def check_images(config, cache: protocol.DataCache, eval_only: bool) -> None:
  """Every image the sweep will read, checked before any training."""
  if not config.data.verify_images:
    return
  t0 = time.time()
  train_refs, eval_refs = {}, {}
  for name, seed in _runs(config):
    if not eval_only and pl.get(config.model.learner).trained:
      split = cache.split(name, seed, train_subsample(config))
      train_refs.setdefault(name, []).extend(r for r, _, _ in split["train"])
    for es in eval_sets(config, name):
      items = cache.eval_items(es, seed)
      eval_refs.setdefault(es.dataset, []).extend(r for r, _, _ in items)
  num_eval = len({r for refs in eval_refs.values() for r in refs})
  decode_eval = num_eval <= config.data.verify_decode_max
  counts = {"decoded": 0, "header_checked": 0}
  for name in dict.fromkeys([*train_refs, *eval_refs]):
    evals = eval_refs.get(name, [])
    out = verify.check_images(
      train_refs.get(name, []) + (evals if decode_eval else []),
      [] if decode_eval else evals,
      source=cache.source(name),
    )
    for k in counts:
      counts[k] += out[k]
  metrics.info(
    "checked the sweep's images in %.1f s: %d decoded, %d by their headers",
    time.time() - t0,
    counts["decoded"],
    counts["header_checked"],
  )


def _run_identities(config, cache, clip, workdir) -> dict[str, dict]:
  """{run folder: identity} of every run of the sweep."""
  clip_files = [
    os.path.join(clip.folder, "config.json"),
    clip_lib.weights_file(clip.folder),
  ]
  out = {}
  for name, seed in _runs(config):
    split = cache.split(name, seed, train_subsample(config))
    out[workdir_lib.run_dir_of(workdir, name, seed)] = identity.run_identity(
      config,
      name,
      seed,
      train_items=split["train"],
      eval_items={
        es.name: cache.eval_items(es, seed) for es in eval_sets(config, name)
      },
      data_dir=datasets_lib.dataset_dir(name, config.data.root),
      clip_files=clip_files,
    )
  return out


def claim_runs(identities: dict, *, archive: bool) -> dict:
  """Refuses (or archives) run folders that hold another identity.

  Runs on process 0. Every folder is checked before any is moved, so a
  refusal changes nothing. Returns `identities`.
  """
  problems = {}
  for run_dir, ident in identities.items():
    why = identity.problem(run_dir, ident)
    if why is not None:
      problems[run_dir] = why
  if problems and not archive:
    raise identity.mismatch_error(list(problems.values()))
  for run_dir in problems:
    dest = workdir_lib.archive(run_dir)
    logging.warning("moved %s aside to %s (--archive_old_runs)", run_dir, dest)
  return identities


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str | None,
  *,
  eval_only: bool = False,
  on_checkpoint: Callable | None = None,
  archive_old_runs: bool = False,
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
    archive_old_runs: move run folders that hold another identity aside
      (`<run>.archived-<time>`) instead of refusing.

  Returns:
    {"runs": [summary per run], "table": results table dict}.
  """
  check_config(config)
  if workdir:
    workdir_lib.check_is_folder(workdir)
  cache = protocol.DataCache(config)
  preflight(config, cache)
  mesh = sharding_lib.make_mesh(config.mesh.num_devices)
  clip = load_clip(config, mesh)
  metrics.info(
    "%d process(es), %d device(s); %d run(s): %s x seeds %s",
    jax.process_count(),
    mesh.size,
    len(_runs(config)),
    ",".join(config.data.datasets),
    ",".join(str(s) for s in config.seeds),
  )
  with workdir_lib.hold(workdir):
    identities = None
    if workdir:
      identities = workdir_lib.on_main(
        lambda: claim_runs(
          _run_identities(config, cache, clip, workdir),
          archive=archive_old_runs,
        ),
        f"checking the runs in {workdir}",
      )
    check_images(config, cache, eval_only)
    if workdir and metrics.is_main():
      fileio.write_atomically(
        os.path.join(workdir, "config.json"),
        config.to_json_best_effort(indent=2),
      )
      if not eval_only:  # each run folder starts with its identity
        for run_dir, ident in identities.items():
          identity.write(run_dir, ident)
    summaries = []
    for dataset, seed in _runs(config):
      summaries.append(
        run_lib.run(
          config,
          dataset,
          seed,
          workdir_lib.run_dir_of(workdir, dataset, seed) if workdir else None,
          clip=clip,
          mesh=mesh,
          cache=cache,
          eval_only=eval_only,
          on_checkpoint=on_checkpoint,
        )
      )
    names = dict(config.data.display_names)
    table = results.make_table(summaries, config.protocol, names)
    if workdir and metrics.is_main():
      paths = results.write_tables(
        summaries,
        config.protocol,
        workdir,
        title=_title(config, summaries),
        names=names,
      )
      metrics.info("results: %s", ", ".join(paths.values()))
      metrics.info("\n%s", results.to_markdown(table))
  return {"runs": summaries, "table": table}


def _title(config, summaries) -> str:
  method = summaries[0]["method"] if summaries else ""
  name = {
    "base2new": "Base-to-new generalization",
    "domain_generalization": "Domain generalization",
    "cross_dataset": "Cross-dataset transfer",
  }[config.protocol]
  return f"{name}: {method}"
