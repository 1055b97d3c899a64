r"""The study's driver: every arm of configs/study.py, then the analysis.

  python launch.py --config configs/study.py --workdir workdir/study

(`configs/study.py` names `run_and_print` as its driver, which launch.py
calls.) What it does, in order (docs/study.md):

1. The first arms (IVLP, IVLP + fixed regularizer, ProMetaR released and
   paper) at the largest shots: each (arm, shots) is one sweep of the
   training system, `prometar_jax.train.train_and_evaluate`, in
   workdir/<arm>/shots<k>/ (its own run folders, run.json identities,
   tables), over the tasks and seeds of the config.
2. The rule of configs/study.py (`RULE`) chooses the ProMetaR behaviour
   from those results (`analysis.choose_behaviour`).
3. The second arms: ProMetaR without task augmentation in that behaviour
   at the largest shots, and IVLP and that behaviour at the other shots.
4. The gate's statistics over training of every ProMetaR run (read back
   from its TensorBoard scalars), and the gradient-alignment measures of
   `prometar_jax.analysis` at the end of every run at the largest shots
   (saved as alignment.json in the run folder).
5. The tables with paired differences and intervals (study/analysis.py),
   figures (PNG, when matplotlib is installed), workdir/study.{json,md}.

Two lanes share the machine, as in the demo (demo/run.py): jobs, longest
first by the budget's estimate, go to two threads; every run computes
exactly what it computes alone. Resumable: a finished run (summary.json)
is reused, a run stopped half-way starts again, alignment.json is kept;
a workdir of another configuration is refused before any work.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import os
import sys
import time
from collections.abc import Mapping

from absl import logging

from configs import study as study_config
from demo import build as demo_build
from demo import datasets as demo_datasets
from demo import run as demo_run
from prometar_jax import fileio, metrics, results
from prometar_jax import workdir as workdir_lib
from study import analysis

LOG_FILE = "study.log"
RESULTS_JSON = "study.json"
RESULTS_MD = "study.md"
FIGURES = "figures"
ALIGNMENT = "alignment.json"
# The budget's estimate (docs/study.md, "Budget"), measured on an idle
# 2-core machine with two lanes busy (the smoke run of docs/study.md):
# seconds per training step, per job (compiling the step, loading the
# sweep), per run (input pipeline, teacher, evaluation), and for the
# alignment per run and per (arm, task) (compiling it).
SECONDS_PER_STEP = {"plain": 0.03, "fixed_reg": 0.05, "prometar": 0.15}
SECONDS_PER_JOB = {"plain": 10.0, "fixed_reg": 12.0, "prometar": 35.0}
SECONDS_PER_RUN = 2.0
SECONDS_ALIGNMENT = (3.0, 6.0)
PROMETAR_ARMS = ("released", "paper", "no_aug")


@dataclasses.dataclass
class Job:
  """One sweep of the training system: an arm at a number of shots."""

  arm: str
  shots: int
  config: object
  path: str
  estimate: float = 0.0


def job_path(workdir: str, arm: str, shots: int) -> str:
  return os.path.join(workdir, arm, f"shots{shots}")


def _steps(config, dataset: str) -> int:
  """Training steps of one run (the demo's base classes x shots)."""
  n = len(demo_datasets.get(demo_datasets.display_name(dataset)).classnames)
  images = ((n + 1) // 2) * config.data.num_shots
  per_epoch = max(1, images // config.data.batch_size)
  return per_epoch * config.optim.epochs


def estimate_seconds(config) -> float:
  """The budget's estimate of one job (all its runs), training only."""
  mode = config.meta.mode
  runs = [(d, s) for d in config.data.datasets for s in config.seeds]
  return SECONDS_PER_JOB[mode] + sum(
    _steps(config, d) * SECONDS_PER_STEP[mode] + SECONDS_PER_RUN
    for d, _ in runs
  )


def alignment_estimate(config) -> float:
  """Estimated seconds of the alignment measures (every arm, main shots)."""
  if not config.study.alignment.enabled:
    return 0.0
  arms, tasks = len(study_config.ARMS), len(config.data.datasets)
  per_run, per_compile = SECONDS_ALIGNMENT
  return arms * tasks * (per_run * len(config.seeds) + per_compile)


def make_job(config, workdir, arm, shots=None, behaviour="") -> Job:
  c = study_config.for_arm(config, arm, shots, behaviour)
  shots = c.data.num_shots
  return Job(arm, shots, c, job_path(workdir, arm, shots), estimate_seconds(c))


def first_jobs(config, workdir) -> list[Job]:
  return [make_job(config, workdir, a) for a in study_config.FIRST_ARMS]


def second_jobs(config, workdir, behaviour: str) -> list[Job]:
  jobs = [make_job(config, workdir, "no_aug", behaviour=behaviour)]
  for shots in config.study.shots[:-1]:
    for arm in (study_config.REFERENCE, behaviour):
      jobs.append(make_job(config, workdir, arm, shots))
  return jobs


def plan_estimate(config) -> float:
  """Estimated seconds of the whole study: training in two lanes (the
  sum halved; the second arms in the costlier behaviour), then the
  alignment in one."""
  jobs = first_jobs(config, "")
  jobs += max(
    (second_jobs(config, "", b) for b in study_config.BEHAVIOURS),
    key=lambda js: sum(j.estimate for j in js),
  )
  return sum(j.estimate for j in jobs) / 2 + alignment_estimate(config)


def _train_jobs(jobs, train_args, progress, lanes: int) -> dict:
  """{(arm, shots): (summaries, wall seconds)}, `lanes` at once, longest
  first."""
  # transformers resolves its names lazily; two threads resolving the same
  # one at once can fail (demo/run.py).
  from transformers import CLIPConfig, CLIPTokenizer  # noqa: F401

  from prometar_jax import train

  bars = progress and sys.stderr.isatty()

  def one(job):
    job.config.progress_bar = bars
    t = time.time()
    runs = train.train_and_evaluate(job.config, job.path, **train_args)["runs"]
    metrics.report(
      "%s, %d shots: %d runs done (%.0f s)",
      study_config.ARMS[job.arm],
      job.shots,
      len(runs),
      time.time() - t,
    )
    return runs, time.time() - t

  order = sorted(jobs, key=lambda j: -j.estimate)
  if lanes == 1:  # in the calling thread, one job after another
    return {(j.arm, j.shots): one(j) for j in order}
  out = {}
  pool = concurrent.futures.ThreadPoolExecutor(lanes, "study-lane")
  try:
    futures = {pool.submit(one, j): j for j in order}
    for f in concurrent.futures.as_completed(futures):
      j = futures[f]
      out[(j.arm, j.shots)] = f.result()
  finally:
    pool.shutdown(wait=False, cancel_futures=True)
  return out


# ---------------------------------------------------------------------------
# Gate traces and alignment
# ---------------------------------------------------------------------------


def read_scalars(run_dir: str, prefix: str = "gamma_") -> dict:
  """{tag: {step: value}} of a run's TensorBoard scalars starting with
  `prefix` (a later write of a step wins: a restarted run)."""
  import tensorflow as tf
  from tensorflow.core.util import event_pb2

  files = sorted(glob.glob(os.path.join(run_dir, "tensorboard", "events.*")))
  found: dict = {}
  for path in files:
    for raw in tf.data.TFRecordDataset(path):
      event = event_pb2.Event.FromString(raw.numpy())
      for v in event.summary.value:
        if not v.tag.startswith(prefix):
          continue
        value = (
          float(tf.make_ndarray(v.tensor))
          if v.HasField("tensor")
          else float(v.simple_value)
        )
        found.setdefault(v.tag, {})[int(event.step)] = (
          event.wall_time,
          value,
        )
  return {
    tag: {s: wv[1] for s, wv in sorted(steps.items())}
    for tag, steps in found.items()
  }


def gate_trace(run_dir: str, total_steps: int) -> dict | None:
  """{"progress": [K], "mean", "std": {branch: [K, depth]}} or None."""
  scalars = read_scalars(run_dir)
  if not scalars:
    return None
  layers: dict = {}
  for tag in scalars:
    name, _, layer = tag.partition("/layer_")
    stat = name.rsplit("_", 1)[1]
    branch = name[len("gamma_") : -len(stat) - 1]
    layers.setdefault((branch, stat), {})[int(layer or 0)] = scalars[tag]
  steps = sorted(next(iter(scalars.values())))
  out = {"progress": [s / total_steps for s in steps], "mean": {}, "std": {}}
  for (branch, stat), by_layer in layers.items():
    depth = max(by_layer) + 1
    out[stat][branch] = [
      [by_layer[i].get(s, float("nan")) for i in range(depth)] for s in steps
    ]
  return out


def measure_alignment(
  job: Job, summaries, settings, clip_cache: dict
) -> list[dict]:
  """The alignment measures at the end of each run of `job` (cached in
  the run folder's alignment.json); `settings`: config.study.alignment.
  Every arm of a (task, seed) gets the same pool and splits."""
  import jax
  import numpy as np

  from prometar_jax import analysis, checkpoint, protocol
  from prometar_jax import run as run_lib
  from prometar_jax.models import clip as clip_lib

  config = job.config
  spec = run_lib.step_spec(config)
  cache = protocol.DataCache(config)
  out = []
  for s in summaries:
    run_dir = workdir_lib.run_dir_of(job.path, s["dataset"], s["seed"])
    path = os.path.join(run_dir, ALIGNMENT)
    if fileio.exists(path):
      out.append(fileio.read_json(path))
      continue
    if "clip" not in clip_cache:
      clip_cache["clip"] = clip_lib.load(
        config.model.name, image_size=config.data.image_size
      )
    clip = clip_cache["clip"]
    prompts = checkpoint.load_prompts(os.path.join(run_dir, run_lib.PROMPTS))
    gnet = {}
    if spec.meta.mode == "prometar":
      gpath = os.path.join(run_dir, run_lib.GRADNET)
      if not fileio.exists(gpath):
        logging.warning("%s: no %s, no alignment", run_dir, run_lib.GRADNET)
        continue
      gnet = checkpoint.load_prompts(gpath)
    split = cache.split(s["dataset"], s["seed"], "base")
    pool = analysis.load_pool(
      split["train"],
      image_size=config.data.image_size,
      per_class=settings.per_class,
      seed=int(s["seed"]),
    )
    feats = analysis.class_features(spec, clip, split["classnames"])
    key = jax.random.fold_in(jax.random.key(settings.key), int(s["seed"]))
    got = jax.device_get(
      analysis.alignment(
        prompts,
        gnet,
        clip,
        feats,
        pool,
        key,
        spec=spec,
        num_splits=settings.num_splits,
        split_batch=min(settings.split_batch, settings.num_splits),
      )
    )
    record = {
      "arm": job.arm,
      "task": demo_datasets.display_name(s["dataset"]),
      "seed": int(s["seed"]),
      "cos": {
        d: float(got["mean"]["cos"][d]["overall"]) for d in analysis.DIRECTIONS
      },
      "cos_layer": analysis.to_jsonable(
        {d: got["mean"]["cos"][d]["layer"] for d in analysis.DIRECTIONS}
      ),
      "loss": float(np.asarray(got["loss"])),
    }
    if "gamma" in got:
      record["gamma"] = analysis.to_jsonable(got["gamma"])
    fileio.write_json(path, record)
    out.append(record)
  return out


# ---------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------


def run_study(
  config,
  workdir: str,
  *,
  progress: bool = True,
  archive_old_runs: bool = False,
  eval_only: bool = False,
  quiet: bool = False,
) -> dict:
  """Trains every arm, analyses, writes workdir/study.{json,md}; returns
  the results dict (see `_analyse`)."""
  log = os.path.join(workdir, LOG_FILE) if quiet else None
  with workdir_lib.hold(workdir), metrics.terminal(log):
    return _run_study(
      config,
      workdir,
      progress,
      dict(archive_old_runs=archive_old_runs, eval_only=eval_only),
    )


def _check(jobs, train_args) -> None:
  if train_args["archive_old_runs"]:
    return
  for j in jobs:
    demo_run.check_workdir(j.path, j.config)


def _run_study(config, workdir, progress, train_args) -> dict:
  t0 = time.time()
  first = first_jobs(config, workdir)
  _check(first, train_args)
  names = tuple(demo_datasets.display_name(d) for d in config.data.datasets)
  demo_build.build(
    config.demo.cache,
    checkpoint=config.model.name,
    per_class=tuple(config.demo.per_class),
    names=names,
    progress=progress,
  )
  seconds = {"assets": time.time() - t0}
  done = _train_jobs(first, train_args, progress, config.study.lanes)
  table = analysis.study_table(
    {j.arm: _scores(done[(j.arm, j.shots)][0], config) for j in first},
    study_config.REFERENCE,
  )
  choice = analysis.choose_behaviour(table, study_config.BEHAVIOURS)
  metrics.report(
    "The rule chose ProMetaR %s (average HM: %s)",
    choice["chosen"],
    ", ".join(f"{b} {h:.2f}" for b, h in choice["hm"].items()),
  )
  second = second_jobs(config, workdir, choice["chosen"])
  _check(second, train_args)
  done.update(_train_jobs(second, train_args, progress, config.study.lanes))
  jobs = first + second
  seconds["jobs"] = {
    f"{j.arm}/shots{j.shots}": done[(j.arm, j.shots)][1] for j in jobs
  }
  seconds["estimate"] = {f"{j.arm}/shots{j.shots}": j.estimate for j in jobs}
  t1 = time.time()
  traces, aligned = {}, []
  main = max(config.study.shots)
  clip_cache: dict = {}
  for j in jobs:
    summaries = done[(j.arm, j.shots)][0]
    if j.shots != main:
      continue
    if j.arm in PROMETAR_ARMS:
      traces[j.arm] = [
        t
        for s in summaries
        if (
          t := gate_trace(
            workdir_lib.run_dir_of(j.path, s["dataset"], s["seed"]),
            int(s["steps"]),
          )
        )
      ]
    if config.study.alignment.enabled and not train_args["eval_only"]:
      aligned += measure_alignment(
        j, summaries, config.study.alignment, clip_cache
      )
  seconds["analysis"] = time.time() - t1
  out = _analyse(config, jobs, done, choice, traces, aligned)
  seconds["total"] = time.time() - t0
  out["seconds"] = seconds
  # Every session of this workdir (a stopped study continues in another).
  previous = os.path.join(workdir, RESULTS_JSON)
  sessions = []
  if fileio.exists(previous):
    sessions = list(fileio.read_json(previous).get("sessions", []))
  sessions.append(
    {
      "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
      "seconds": seconds["total"],
    }
  )
  out["sessions"] = sessions
  out["compute_seconds"] = {
    k: sum(
      s.get("train_seconds", 0.0) + s.get("eval_seconds", 0.0)
      for s in done[(j.arm, j.shots)][0]
    )
    for j in jobs
    for k in [f"{j.arm}/shots{j.shots}"]
  }
  os.makedirs(workdir, exist_ok=True)
  out["figures"] = _figures(out, os.path.join(workdir, FIGURES))
  out["markdown"] = report_markdown(out, config)
  results.write_json(
    os.path.join(workdir, RESULTS_JSON),
    {k: v for k, v in out.items() if k != "markdown"},
  )
  fileio.write_atomically(os.path.join(workdir, RESULTS_MD), out["markdown"])
  return out


def _scores(summaries, config) -> dict:
  return analysis.scores_of(summaries, dict(config.data.display_names))


def _analyse(config, jobs, done, choice, traces, aligned) -> dict:
  s = config.study
  main = max(s.shots)
  kw = dict(level=s.level, draws=s.bootstrap, seed=s.bootstrap_seed)
  scores = {
    (j.arm, j.shots): _scores(done[(j.arm, j.shots)][0], config) for j in jobs
  }
  arms = [a for a in study_config.ARMS if (a, main) in scores]
  main_table = analysis.study_table(
    {a: scores[(a, main)] for a in arms}, s.reference, **kw
  )
  sweep = {}
  for shots in s.shots:
    pair = [a for a in (s.reference, choice["chosen"]) if (a, shots) in scores]
    sweep[shots] = analysis.study_table(
      {a: scores[(a, shots)] for a in pair}, s.reference, **kw
    )
  gates = {a: analysis.gate_summary(t) for a, t in traces.items() if t}
  curves = {a: analysis.gate_curves(t) for a, t in traces.items() if t}
  align = (
    analysis.alignment_table(aligned, s.reference, s.level) if aligned else None
  )
  return {
    "rule": study_config.RULE,
    "choice": choice,
    "shots": list(s.shots),
    "seeds": list(config.seeds),
    "main": main_table,
    "sweep": {str(k): v for k, v in sweep.items()},
    "gate": gates,
    "gate_curves": curves,
    "alignment": align,
    "alignment_runs": aligned,
    "scores": {
      f"{a}/shots{k}": {
        t: {str(sd): v for sd, v in by.items()} for t, by in sc.items()
      }
      for (a, k), sc in scores.items()
    },
  }


def _figures(out, folder) -> list[str]:
  try:
    from study import figures
  except ImportError:  # matplotlib is optional (requirements-test.txt)
    logging.warning("matplotlib is not installed: no figures")
    return []
  return figures.write_all(out, folder, study_config.ARMS)


def _minutes(x: float) -> str:
  return f"{x / 60:.1f} min"


def report_markdown(out: Mapping, config) -> str:
  labels = study_config.ARMS
  main = max(config.study.shots)
  secs = out.get("seconds", {})
  lines = [
    f"# Study: does meta-regularization help? (seeds "
    f"{','.join(str(s) for s in out['seeds'])})",
    "",
    f"## All arms, {main} shots",
    "",
    analysis.table_markdown(out["main"], labels),
    f"Rule (fixed before the first run): {out['rule']}",
    "",
    "Average HM: "
    + ", ".join(f"{b} {h:.2f}" for b, h in out["choice"]["hm"].items())
    + f"; chosen: **{out['choice']['chosen']}**.",
    "",
    f"## Shots sweep: IVLP vs ProMetaR {out['choice']['chosen']}",
    "",
  ]
  for shots, table in out["sweep"].items():
    lines += [f"### {shots} shots", "", analysis.table_markdown(table, labels)]
  if out["gate"]:
    lines += [
      "## The gate over training",
      "",
      analysis.gate_markdown(out["gate"], labels),
    ]
  if out["alignment"]:
    lines += [
      "## Gradient alignment at the end of training",
      "",
      analysis.alignment_markdown(out["alignment"], labels),
    ]
  if out.get("figures"):
    lines += ["## Figures", ""] + [
      f"- {os.path.relpath(p, os.path.dirname(os.path.dirname(p)))}"
      for p in out["figures"]
    ]
    lines.append("")
  if secs:
    est = sum(secs["estimate"].values()) / 2 + alignment_estimate(config)
    sessions = out.get("sessions", [])
    lines += [
      "## Budget",
      "",
      f"Wall time of all {len(sessions)} session(s) of this workdir: "
      f"{_minutes(sum(x['seconds'] for x in sessions))} ("
      + ", ".join(f"{x['started']} {_minutes(x['seconds'])}" for x in sessions)
      + "); training and evaluation recorded in the runs' summaries: "
      f"{_minutes(sum(out.get('compute_seconds', {}).values()))} (two "
      "lanes overlap).",
      "",
      f"This session: {_minutes(secs['total'])} (estimate {_minutes(est)} on an "
      f"idle 2-core machine); analysis {secs['analysis']:.0f} s (estimate "
      f"{alignment_estimate(config):.0f} s). Per job (arm/shots): wall "
      "seconds (about 0 when reused) / estimate:",
      "",
    ]
    lines += [
      f"- {k}: {v:.0f} s / {secs['estimate'][k]:.0f} s"
      for k, v in secs["jobs"].items()
    ]
    lines.append("")
  return "\n".join(lines) + "\n"


def _header(config, workdir) -> str:
  arms = ", ".join(study_config.ARMS.values())
  tasks = ", ".join(demo_datasets.display_name(d) for d in config.data.datasets)
  seeds = ",".join(str(s) for s in config.seeds)
  shots = ",".join(str(s) for s in config.study.shots)
  return (
    f"Study (docs/study.md): {arms} on {tasks}, seeds {seeds}; shots sweep "
    f"{shots}. Estimated {_minutes(plan_estimate(config))} on an idle "
    f"2-core machine (finished runs are reused).\n"
    f"Full log: {os.path.join(workdir, LOG_FILE)}"
  )


def run_and_print(
  config, workdir: str, archive_old_runs=False, eval_only=False
) -> dict:
  """configs/study.py's driver, which launch.py calls."""
  t0 = demo_run.start_quiet_job(config.demo.cache, _header(config, workdir))
  out = run_study(
    config,
    workdir,
    progress=config.progress_bar,
    archive_old_runs=archive_old_runs,
    eval_only=eval_only,
    quiet=True,
  )
  print()
  print(out["markdown"])
  print(
    f"Total {time.time() - t0:.0f} s. Report: "
    f"{os.path.join(workdir, RESULTS_MD)}",
    flush=True,
  )
  return out
