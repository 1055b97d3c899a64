r"""The offline demo: every method of configs/demo.py, then one table.

  python -m prometar_jax.demo.run --workdir workdir/demo
  python -m prometar_jax.demo.run --workdir workdir/demo3 \
    --config configs/demo.py:seeds=1,2,3

Builds the assets if missing (build.py), then for each method of
`config.demo.methods` calls `prometar_jax.train.train_and_evaluate` with
that method's config (workdir/<method>/, the training system's own files
and tables), and puts the per-method base-to-new tables side by side:
Base, New and HM per dataset and method, and the average row of each
method, with the training system's arithmetic (`results.base2new_table`:
seed means, HM of the means, average = HM of the mean Base and mean New).
The combined table goes to workdir/results.{md,json} and to stdout.

A method whose runs are done (summary.json) is not trained again; a
workdir holding another configuration is refused rather than mixed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping, Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from prometar_jax import fileio, results
from prometar_jax.demo import build as demo_build
from prometar_jax.demo import datasets as demo_datasets

_REPO = os.path.dirname(os.path.dirname(demo_build.PACKAGE_DIR))
DEFAULT_CONFIG = os.path.join(_REPO, "configs", "demo.py")
CONFIG_JSON = "config.json"
# Config keys that change what is shown, not what is computed.
_DISPLAY_KEYS = ("progress_bar", "log_every")

# Table labels (configs/demo.py METHODS).
LABELS = {
  "zeroshot": "Zero-shot CLIP",
  "coop": "CoOp",
  "ivlp": "IVLP",
  "prometar": "ProMetaR",
}


def _config_module():
  """configs/demo.py as a module (the `configs` folder is not installed)."""
  if _REPO not in sys.path:
    sys.path.insert(0, _REPO)
  from configs import demo

  return demo


def method_configs(config) -> dict:
  """{method: the config that trains it}, in `config.demo.methods` order."""
  demo = _config_module()
  return {m: demo.for_method(config, m) for m in config.demo.methods}


def _check_workdir(path: str, config) -> None:
  """Refuses a method workdir written by another configuration."""
  found = os.path.join(path, CONFIG_JSON)
  if not os.path.isfile(found):
    return
  with open(found) as f:
    old = json.load(f)
  new = json.loads(config.to_json_best_effort())
  for key in _DISPLAY_KEYS:
    old.pop(key, None)
    new.pop(key, None)
  if old != new:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    raise ValueError(
      f"{path} holds runs of another configuration (differs in "
      f"{', '.join(keys)}); use another --workdir or delete it"
    )


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
  config, workdir: str, *, progress: bool = True, archive_old_runs=False
) -> dict:
  """Builds the assets, trains and evaluates every method, writes tables.

  Args:
    config: configs/demo.py's config (its `demo.methods` are swept).
    workdir: output folder; each method under workdir/<method>.
    progress: progress bars for the build and the training.
    archive_old_runs: move runs of another configuration aside instead of
      refusing (train.train_and_evaluate).

  Returns:
    {"runs": {method: summaries}, "table": combine(...), "markdown": str,
    "seconds": {method: wall seconds, "build": ...}}.
  """
  from prometar_jax import workdir as workdir_lib

  with workdir_lib.hold(workdir):  # one demo per workdir (its tables)
    return _run_demo(config, workdir, progress, archive_old_runs)


def _run_demo(config, workdir, progress, archive_old_runs) -> dict:
  from prometar_jax import train

  configs = method_configs(config)
  for method, c in configs.items():
    c.progress_bar = c.progress_bar and progress
    if not archive_old_runs:
      _check_workdir(os.path.join(workdir, method), c)
  t0 = time.time()
  names = tuple(demo_datasets.display_name(d) for d in config.data.datasets)
  demo_build.build(
    config.demo.cache,
    checkpoint=config.model.name,
    per_class=tuple(config.demo.per_class),
    names=names,
    progress=progress,
  )
  seconds = {"build": time.time() - t0}
  runs = {}
  for method, c in configs.items():
    t = time.time()
    out = train.train_and_evaluate(
      c, os.path.join(workdir, method), archive_old_runs=archive_old_runs
    )
    runs[method] = out["runs"]
    seconds[method] = time.time() - t
  table = combine(runs)
  seeds = ",".join(str(s) for s in config.seeds)
  text = to_markdown(
    table, f"Demo: base-to-new in the generated world (seeds {seeds})"
  )
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


def run_and_print(config, workdir: str, archive_old_runs=False) -> dict:
  """The command line's job (also launch.py's for configs/demo.py).

  `run_demo` with a persistent compilation cache in the demo's cache
  folder (reruns, and the three-seed run after the one-seed one, reuse
  the compiled steps), then the table and the timings on stdout.
  """
  import jax

  if not jax.config.jax_compilation_cache_dir:
    jax.config.update(
      "jax_compilation_cache_dir",
      os.path.join(config.demo.cache, "jax_cache"),
    )
  t0 = time.time()
  out = run_demo(
    config,
    workdir,
    progress=config.progress_bar,
    archive_old_runs=archive_old_runs,
  )
  print()
  print(out["markdown"])
  took = ", ".join(f"{k} {v:.0f} s" for k, v in out["seconds"].items())
  print(f"Total {time.time() - t0:.0f} s ({took}); tables in {workdir}")
  return out


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  import tensorflow as tf

  tf.config.set_visible_devices([], "GPU")
  logging.set_verbosity(logging.WARNING)
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
