r"""The offline demo: every method of configs/demo.py, then one table.

  python launch.py --config configs/demo.py --workdir workdir/demo
  python -m demo.run --workdir workdir/demo3 \
    --config configs/demo.py:seeds=1,2,3

(`configs/demo.py` names `run_and_print` as its driver, which launch.py
calls; `python -m demo.run`, from the checkout's root, is the same job
without launch.py.)

Builds the assets if missing (build.py), then for each method of
`config.demo.methods` calls `prometar_jax.train.train_and_evaluate` with
that method's config (workdir/<method>/, the training system's own files
and tables), and puts the per-method base-to-new tables side by side:
Base, New and HM per dataset and method, and the average row of each
method, with the training system's arithmetic (`results.base2new_table`:
seed means, HM of the means, average = HM of the mean Base and mean New).
The combined table goes to workdir/results.{md,json} and to stdout.

Two lanes share the machine: ProMetaR, the longest method, trains in this
thread while the other methods train one after another in a second one
(each method in its own workdir/<method>, under its own lock). XLA
releases the GIL while a step runs, and two steps at once give about 1.5x
the steps per second of one on two CPU cores; every run computes exactly
what it computes alone.

The terminal (`run_and_print`): one line per run when it ends, a bar
while it trains (the second lane's bars only on a terminal, where tqdm
can draw two), then the table; the full log is in workdir/demo.log.

A method whose runs are done (summary.json) is not trained again, and
more seeds in the same workdir add runs; a workdir holding another
configuration is refused rather than mixed.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from configs import demo as demo_config
from demo import build as demo_build
from demo import datasets as demo_datasets
from prometar_jax import fileio, identity, metrics, results

DEFAULT_CONFIG = os.path.join(demo_build.CHECKOUT, "configs", "demo.py")
CONFIG_JSON = "config.json"
LOG_FILE = "demo.log"
# The method that trains in the calling thread (the longest); the others
# share a second thread (see the module docstring).
MAIN_LANE = "prometar"

# Table labels of configs/demo.py's METHODS.
LABELS = {
  "zeroshot": "Zero-shot CLIP",
  "coop": "CoOp",
  "ivlp": "IVLP",
  "prometar": "ProMetaR",
}


def method_configs(config) -> dict:
  """{method: the config that trains it}, in `config.demo.methods` order."""
  return {m: demo_config.for_method(config, m) for m in config.demo.methods}


def check_workdir(path: str, config) -> None:
  """Refuses, before any work, a method workdir of another configuration.

  Each run's identity (prometar_jax/identity.py) is checked again when its
  method trains; this checks every method's saved sweep config first, so
  that one lane cannot start training while the other is refused. Keys
  that cannot change a result (seeds, datasets, logging, ...) may differ:
  more seeds in the same workdir reuse the runs already done.
  """
  found = os.path.join(path, CONFIG_JSON)
  if not os.path.isfile(found):
    return
  saved = identity.config_identity(fileio.read_json(found))
  now = identity.config_identity(json.loads(config.to_json_best_effort()))
  diff = identity.differences(saved, now)
  if diff:
    raise identity.mismatch_error([identity.describe(path, diff)])


def start_quiet_job(cache: str, header: str) -> float:
  """The start of a driver's job (the demo's, the study's); returns its
  start time.

  JAX's persistent compilation cache in `cache`/jax_cache unless one is
  set (reruns reuse the compiled steps), the job's header line, and
  warnings-only logging until the job holds its workdir and opens its log
  (JAX logs its backends' start at INFO when the lock is taken).
  """
  import jax

  if not jax.config.jax_compilation_cache_dir:
    jax.config.update(
      "jax_compilation_cache_dir", os.path.join(cache, "jax_cache")
    )
  t0 = time.time()
  print(header, flush=True)
  logging.set_verbosity(logging.WARNING)
  return t0


def combine(runs: Mapping[str, Sequence[Mapping]]) -> dict:
  """Per-method base-to-new tables side by side, with demo names.

  Args:
    runs: {method: run summaries of train.train_and_evaluate}.

  Returns:
    {"methods": [...], "datasets": [demo names], "rows": [{"dataset",
    "method", "base", "new", "hm", "base_std", "new_std", "seeds"}],
    "average": {method: {"base", "new", "hm"}}}; the numbers are those of
    `results.base2new_table` for each method.
  """
  rows, average, datasets = [], {}, []
  for method, summaries in runs.items():
    table = results.base2new_table(summaries)
    for r in table["rows"]:
      name = demo_datasets.display_name(r["dataset"])
      if name not in datasets:
        datasets.append(name)
      rows.append(
        {
          "dataset": name,
          "method": method,
          **{
            k: r[k]
            for k in ("base", "new", "hm", "base_std", "new_std", "seeds")
          },
        }
      )
    if table["average"] is not None:
      a = table["average"]
      average[method] = {k: a[k] for k in ("base", "new", "hm")}
  order = {d: i for i, d in enumerate(datasets)}
  methods = list(runs)
  rows.sort(key=lambda r: (order[r["dataset"]], methods.index(r["method"])))
  return {
    "methods": methods,
    "datasets": datasets,
    "rows": rows,
    "average": average,
  }


def _cell(mean, std, seeds):
  return f"{mean:.2f}" if len(seeds) < 2 else f"{mean:.2f} ± {std:.2f}"


def to_markdown(table: Mapping, title: str = "") -> str:
  """The combined table in Markdown (± = std over seeds when > 1 seed)."""
  lines = [f"## {title}", ""] if title else []
  lines += [
    "| Dataset | Method | Base | New | HM | Seeds |",
    "|---|---|---|---|---|---|",
  ]
  for r in table["rows"]:
    seeds = ",".join(str(s) for s in r["seeds"])
    lines.append(
      f"| {r['dataset']} | {LABELS.get(r['method'], r['method'])} | "
      f"{_cell(r['base'], r['base_std'], r['seeds'])} | "
      f"{_cell(r['new'], r['new_std'], r['seeds'])} | {r['hm']:.2f} | "
      f"{seeds} |"
    )
  for m in table["methods"]:
    a = table["average"].get(m)
    if a is None:
      continue
    lines.append(
      f"| **Average** | {LABELS.get(m, m)} | {a['base']:.2f} | "
      f"{a['new']:.2f} | {a['hm']:.2f} | |"
    )
  lines += [
    "",
    "Top-1 accuracy (%). Base and New are means over seeds (± std); HM = "
    "2BN/(B+N) of those means; the average row is HM(mean Base, mean New), "
    "as in the paper.",
  ]
  return "\n".join(lines) + "\n"


def _gamma_note(runs: Mapping[str, Sequence[Mapping]]) -> str:
  """ProMetaR's last logged gamma and losses (the released step's gate)."""
  lines = []
  for method, summaries in runs.items():
    for s in summaries:
      m = s.get("final_metrics") or {}
      gam = {
        k: v for k, v in m.items() if k.startswith("gamma_") and "mean" in k
      }
      if not gam:
        continue
      parts = [
        f"{k[len('gamma_') : -len('_mean')]} "
        + "/".join(f"{x:.3f}" for x in (v if isinstance(v, list) else [v]))
        for k, v in sorted(gam.items())
      ]
      losses = ", ".join(
        f"{k} {m[k]:.4g}"
        for k in ("loss_ce", "loss_meta", "r_text", "r_image")
        if k in m
      )
      lines.append(
        f"- {LABELS.get(method, method)}, "
        f"{demo_datasets.display_name(s['dataset'])} seed {s['seed']}: "
        f"gamma per layer {'; '.join(parts)}; last losses: {losses}"
      )
  return "\n".join(lines)


def run_demo(
  config,
  workdir: str,
  *,
  progress: bool = True,
  archive_old_runs: bool = False,
  eval_only: bool = False,
  quiet: bool = False,
) -> dict:
  """Builds the assets, trains and evaluates every method, writes tables.

  Args:
    config: configs/demo.py's config (its `demo.methods` are swept).
    workdir: output folder; each method under workdir/<method>.
    progress: progress bars for the build and the training.
    archive_old_runs: move runs of another configuration aside instead of
      refusing (train.train_and_evaluate).
    eval_only: evaluate the latest checkpoint (or prompts) of every run,
      no training (train.train_and_evaluate).
    quiet: the full log to workdir/demo.log, and only warnings and one
      line per run on the terminal (`metrics.terminal`).

  Returns:
    {"runs": {method: summaries}, "table": combine(...), "markdown": the
    text of results.md, "seconds": {"assets": ..., method: wall seconds}}.
  """
  from prometar_jax import workdir as workdir_lib

  log = os.path.join(workdir, LOG_FILE) if quiet else None
  with workdir_lib.hold(workdir), metrics.terminal(log):
    return _run_demo(
      config,
      workdir,
      progress,
      dict(archive_old_runs=archive_old_runs, eval_only=eval_only),
    )


def _train_methods(configs: Mapping, workdir, train_args: Mapping) -> dict:
  """{method: (run summaries, wall seconds)}, one method after another.

  `train_args`: train.train_and_evaluate's archive_old_runs, eval_only.
  """
  from prometar_jax import train

  out = {}
  for method, c in configs.items():
    t = time.time()
    path = os.path.join(workdir, method)
    runs = train.train_and_evaluate(c, path, **train_args)["runs"]
    out[method] = (runs, time.time() - t)
  return out


def _say_if_failed(future) -> None:
  """Names a failure of the second lane at once (it is raised at the end)."""
  if not future.cancelled() and future.exception() is not None:
    logging.error(
      "a method of the second lane failed (%s); the demo stops when the "
      "first lane ends",
      future.exception(),
    )


def _title(config) -> str:
  seeds = ",".join(str(s) for s in config.seeds)
  return f"Demo: base-to-new in the generated world (seeds {seeds})"


def _run_demo(config, workdir, progress, train_args) -> dict:
  configs = method_configs(config)
  # Only a terminal can draw two bars at once; elsewhere (a pipe, a file)
  # the second lane's runs show their summary lines only.
  second_bars = progress and sys.stderr.isatty()
  for method, c in configs.items():
    c.progress_bar = c.progress_bar and (
      progress if method == MAIN_LANE else second_bars
    )
    if not train_args["archive_old_runs"]:
      check_workdir(os.path.join(workdir, method), c)
  t0 = time.time()
  names = tuple(demo_datasets.display_name(d) for d in config.data.datasets)
  demo_build.build(
    config.demo.cache,
    checkpoint=config.model.name,
    per_class=tuple(config.demo.per_class),
    names=names,
    progress=progress,
  )
  seconds = {"assets": time.time() - t0}
  # transformers resolves its names lazily, and two threads resolving the
  # same one at once can fail: resolve what loading CLIP imports first.
  from transformers import CLIPConfig, CLIPTokenizer  # noqa: F401

  first = {m: c for m, c in configs.items() if m == MAIN_LANE}
  second = {m: c for m, c in configs.items() if m != MAIN_LANE}
  pool = concurrent.futures.ThreadPoolExecutor(1, "demo-second-lane")
  try:
    lane = None
    if second:
      lane = pool.submit(_train_methods, second, workdir, train_args)
      lane.add_done_callback(_say_if_failed)
    done = _train_methods(first, workdir, train_args)
    if lane is not None:
      done.update(lane.result())
  finally:
    # After a failure the other lane is not waited for (launch.py exits).
    pool.shutdown(wait=False, cancel_futures=True)
  runs = {m: done[m][0] for m in configs}
  seconds.update({m: done[m][1] for m in configs})
  table = combine(runs)
  text = to_markdown(table, _title(config))
  note = _gamma_note(runs)
  if note:
    text += (
      "\nProMetaR's gradient gate at the end of training:\n\n" + note + "\n"
    )
  os.makedirs(workdir, exist_ok=True)
  results.write_json(
    os.path.join(workdir, "results.json"),
    {"table": table, "runs": runs, "seconds": seconds},
  )
  fileio.write_atomically(os.path.join(workdir, "results.md"), text)
  return {"runs": runs, "table": table, "markdown": text, "seconds": seconds}


def _header(config, workdir: str) -> str:
  methods = [LABELS.get(m, m) for m in config.demo.methods]
  tasks = [demo_datasets.display_name(d) for d in config.data.datasets]
  seeds = ",".join(str(s) for s in config.seeds)
  return (
    f"Offline demo (docs/demo.md): {', '.join(methods)} on "
    f"{', '.join(tasks)}, seed(s) {seeds}; {LABELS[MAIN_LANE]} in parallel "
    f"with the others.\nFull log: {os.path.join(workdir, LOG_FILE)}"
  )


def run_and_print(
  config, workdir: str, archive_old_runs=False, eval_only=False
) -> dict:
  """The demo's job: configs/demo.py's driver, which launch.py calls.

  `run_demo` with a quiet terminal and a persistent compilation cache in
  the demo's cache folder (reruns, and the three-seed run after the
  one-seed one, reuse the compiled steps), then the table and the
  timings on stdout.
  """
  t0 = start_quiet_job(config.demo.cache, _header(config, workdir))
  out = run_demo(
    config,
    workdir,
    progress=config.progress_bar,
    archive_old_runs=archive_old_runs,
    eval_only=eval_only,
    quiet=True,
  )
  print()
  print(to_markdown(out["table"], _title(config)))
  took = ", ".join(
    f"{LABELS.get(k, k)} {v:.0f} s" for k, v in out["seconds"].items()
  )
  print(
    f"Total {time.time() - t0:.0f} s ({took}; {LABELS[MAIN_LANE]} "
    f"alongside the others). Tables, and ProMetaR's gate per layer: "
    f"{os.path.join(workdir, 'results.md')}",
    flush=True,
  )
  return out


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  # Tokenizer and config reader only (see launch.py).
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  import tensorflow as tf

  tf.config.set_visible_devices([], "GPU")
  run_and_print(config, workdir)


def main():
  """The command line: flags are defined here, not when importing."""
  config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "configs/demo.py[:args]", lock_config=True
  )
  flags.DEFINE_string("workdir", "workdir/demo", "Output folder.")
  app.run(_main)


if __name__ == "__main__":
  main()
