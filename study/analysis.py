"""The study's arithmetic: tables, paired differences, intervals, gates.

Pure functions of plain numbers (accuracies in %, gate statistics, cosine
means); the driver (study/run.py) reads the runs and calls them, the test
(tests/test_study.py) checks them against numbers computed by hand.

Paired differences (docs/study.md, "How to read the intervals"): for a
task and a seed, an arm's Base, New and HM minus IVLP's on the same seed
(the same few-shot images, data order and initial prompts), HM of each
run computed from that run's own Base and New. The averaged row per seed
is the paper's average over the tasks of that seed: mean Base, mean New,
and their HM. The mean of the per-seed differences gets a 95% interval
from the t distribution with n - 1 degrees of freedom (mean ± t * sd /
sqrt(n), sd with n - 1) and from a paired bootstrap (seeds resampled with
replacement, a fixed generator seed, percentile interval).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from prometar_jax import results

METRICS = ("base", "new", "hm")
AVERAGE = "Average"
# A gate that never learned stays at the sigmoid of its initial output.
GATE_START = 0.5

# Scores: {task: {seed: (base, new)}} of one arm.
Scores = Mapping[str, Mapping[int, tuple[float, float]]]


def hm(base: float, new: float) -> float:
  """2BN/(B+N), the protocol's harmonic mean (results.harmonic_mean)."""
  return results.harmonic_mean(base, new)


def scores_of(
  summaries: Sequence[Mapping], names: Mapping[str, str] | None = None
) -> dict:
  """{task: {seed: (base, new)}} of run summaries (task = display name)."""
  out: dict = {}
  for s in summaries:
    task = results.display_name(s["dataset"], names)
    acc = s["accuracy"]
    out.setdefault(task, {})[int(s["seed"])] = (
      float(acc["base"]),
      float(acc["new"]),
    )
  return out


def average_by_seed(scores: Scores) -> dict:
  """{seed: (mean Base, mean New)} over the tasks, for seeds in every task."""
  tasks = list(scores)
  if not tasks:
    return {}
  seeds = set.intersection(*(set(scores[t]) for t in tasks))
  return {
    s: (
      float(np.mean([scores[t][s][0] for t in tasks])),
      float(np.mean([scores[t][s][1] for t in tasks])),
    )
    for s in sorted(seeds)
  }


def with_average(scores: Scores) -> dict:
  """`scores` plus the averaged task AVERAGE (`average_by_seed`)."""
  return {**scores, AVERAGE: average_by_seed(scores)}


def arm_cell(by_seed: Mapping[int, tuple[float, float]]) -> dict:
  """Means over seeds: {"base", "new", "hm" (HM of the means), "seeds"}."""
  seeds = sorted(by_seed)
  b = float(np.mean([by_seed[s][0] for s in seeds]))
  n = float(np.mean([by_seed[s][1] for s in seeds]))
  return {"base": b, "new": n, "hm": hm(b, n), "seeds": seeds}


def paired_differences(
  arm: Mapping[int, tuple[float, float]],
  reference: Mapping[int, tuple[float, float]],
) -> dict:
  """Per-seed differences arm - reference, on the seeds both have.

  Returns:
    {"seeds": [...], "base": [...], "new": [...], "hm": [...]}, HM of each
    run from its own base and new.
  """
  seeds = sorted(set(arm) & set(reference))
  out = {"seeds": seeds, "base": [], "new": [], "hm": []}
  for s in seeds:
    (b1, n1), (b0, n0) = arm[s], reference[s]
    out["base"].append(b1 - b0)
    out["new"].append(n1 - n0)
    out["hm"].append(hm(b1, n1) - hm(b0, n0))
  return out


def t_quantile(level: float, df: int) -> float:
  """The two-sided `level` quantile of Student's t with `df` dof."""
  from scipy import stats

  return float(stats.t.ppf(0.5 + level / 2, df))


def t_interval(x: Sequence[float], level: float = 0.95) -> dict:
  """Mean, sd (n - 1), and mean ± t_{n-1} * sd / sqrt(n).

  With one value the interval is undefined (NaN bounds).
  """
  x = np.asarray(x, np.float64)
  n = len(x)
  mean = float(np.mean(x)) if n else math.nan
  if n < 2:
    return {"mean": mean, "sd": math.nan, "low": math.nan, "high": math.nan}
  sd = float(np.std(x, ddof=1))
  half = t_quantile(level, n - 1) * sd / math.sqrt(n)
  return {"mean": mean, "sd": sd, "low": mean - half, "high": mean + half}


def bootstrap_interval(
  x: Sequence[float], level: float = 0.95, draws: int = 10000, seed: int = 0
) -> dict:
  """Percentile interval of the mean over `draws` resamples of x.

  Paired: x are per-seed differences, so resampling them resamples seeds.
  A fixed generator (numpy's default, `seed`) makes it reproducible.
  """
  x = np.asarray(x, np.float64)
  if len(x) < 2:
    return {"low": math.nan, "high": math.nan}
  rng = np.random.default_rng(seed)
  means = x[rng.integers(0, len(x), (draws, len(x)))].mean(axis=1)
  lo, hi = np.quantile(means, [0.5 - level / 2, 0.5 + level / 2])
  return {"low": float(lo), "high": float(hi)}


def describe_differences(
  diffs: Mapping, level: float = 0.95, draws: int = 10000, seed: int = 0
) -> dict:
  """{metric: t interval + bootstrap bounds + how many seeds improved}."""
  out = {"seeds": list(diffs["seeds"])}
  for m in METRICS:
    t = t_interval(diffs[m], level)
    boot = bootstrap_interval(diffs[m], level, draws, seed)
    out[m] = {
      **t,
      "boot_low": boot["low"],
      "boot_high": boot["high"],
      "per_seed": list(diffs[m]),
      "better": int(sum(d > 0 for d in diffs[m])),
    }
  return out


def study_table(
  scores: Mapping[str, Scores],
  reference: str,
  *,
  level: float = 0.95,
  draws: int = 10000,
  seed: int = 0,
) -> dict:
  """Per task and averaged: each arm's means and its paired differences.

  Args:
    scores: {arm: {task: {seed: (base, new)}}}.
    reference: the arm every other arm is compared with (IVLP).

  Returns:
    {"arms", "tasks" (AVERAGE last), "reference", "level", "rows": [{"task",
    "arm", "base", "new", "hm", "seeds", "diff": describe_differences(...)
    | None for the reference}]}.
  """
  arms = list(scores)
  full = {a: with_average(scores[a]) for a in arms}
  tasks = []
  for a in arms:
    tasks += [t for t in scores[a] if t not in tasks]
  tasks.append(AVERAGE)
  rows = []
  for task in tasks:
    for a in arms:
      by_seed = full[a].get(task)
      if not by_seed:
        continue
      row = {"task": task, "arm": a, **arm_cell(by_seed), "diff": None}
      ref = full.get(reference, {}).get(task)
      if a != reference and ref:
        row["diff"] = describe_differences(
          paired_differences(by_seed, ref), level, draws, seed
        )
      rows.append(row)
  return {
    "arms": arms,
    "tasks": tasks,
    "reference": reference,
    "level": level,
    "rows": rows,
  }


def average_hm(table: Mapping, arm: str) -> float:
  """The arm's HM in the AVERAGE row of `study_table` (NaN if absent)."""
  for r in table["rows"]:
    if r["task"] == AVERAGE and r["arm"] == arm:
      return r["hm"]
  return math.nan


def choose_behaviour(table: Mapping, behaviours: Sequence[str]) -> dict:
  """The rule of configs/study.py: the higher average HM; ties -> first.

  Returns {"chosen": name, "hm": {behaviour: average HM}}.
  """
  hms = {b: average_hm(table, b) for b in behaviours}
  chosen = behaviours[0]
  for b in behaviours[1:]:
    if hms[b] > hms[chosen]:  # strictly higher (NaN never wins)
      chosen = b
  return {"chosen": chosen, "hm": hms}


# ---------------------------------------------------------------------------
# The gate over training
# ---------------------------------------------------------------------------


def gate_curves(traces: Sequence[Mapping], points: int = 20) -> dict:
  """Per-layer gate means along training, on a common grid, over runs.

  Args:
    traces: one per run, {"progress": [K] in (0, 1] (step / total steps),
      "mean": {branch: [K, depth]}, "std": {branch: [K, depth]}}: the gate
      statistics the step logged at each log point.
    points: grid points from the latest first log point of the runs to
      the end of training; each run is linearly interpolated onto them
      (runs of different tasks log at different fractions).

  Returns:
    {branch: {"x": [points], "mean": [points, depth] (mean over runs),
    "sd": [points, depth] (sd over runs, n - 1; 0 with one run)}}.
  """
  out = {}
  branches = sorted({b for t in traces for b in t["mean"]})
  for branch in branches:
    runs = [t for t in traces if branch in t["mean"]]
    start = max(float(t["progress"][0]) for t in runs)
    x = np.linspace(start, 1.0, points)
    per_run = []
    for t in runs:
      p = np.asarray(t["progress"], np.float64)
      v = np.asarray(t["mean"][branch], np.float64)
      per_run.append(
        np.stack([np.interp(x, p, v[:, i]) for i in range(v.shape[1])], -1)
      )
    stack = np.stack(per_run)
    sd = stack.std(0, ddof=1) if len(runs) > 1 else np.zeros(stack.shape[1:])
    out[branch] = {
      "x": x.tolist(),
      "mean": stack.mean(0).tolist(),
      "sd": sd.tolist(),
    }
  return out


def gate_summary(traces: Sequence[Mapping]) -> dict:
  """Per branch and layer: does the gate move from 0.5 during training?

  Returns {branch: {"mean": [depth] (over runs and log points), "sd_time":
  [depth] (the sd over log points of a run's gate mean, averaged over
  runs: how much it moved), "first", "last": [depth] (over runs),
  "max_dev": [depth] (the largest |gamma mean - 0.5| of any run and log
  point), "within": [depth] (the mean within-layer std of gamma),
  "runs": n}}.
  """
  out = {}
  branches = sorted({b for t in traces for b in t["mean"]})
  for branch in branches:
    runs = [t for t in traces if branch in t["mean"]]
    means = [np.asarray(t["mean"][branch], np.float64) for t in runs]
    stds = [np.asarray(t["std"][branch], np.float64) for t in runs]
    out[branch] = {
      "mean": np.mean([m.mean(0) for m in means], 0).tolist(),
      "sd_time": np.mean([m.std(0) for m in means], 0).tolist(),
      "first": np.mean([m[0] for m in means], 0).tolist(),
      "last": np.mean([m[-1] for m in means], 0).tolist(),
      "max_dev": np.max(
        [np.abs(m - GATE_START).max(0) for m in means], 0
      ).tolist(),
      "within": np.mean([s.mean(0) for s in stds], 0).tolist(),
      "runs": len(runs),
    }
  return out


# ---------------------------------------------------------------------------
# Gradient alignment at the end of training
# ---------------------------------------------------------------------------


def alignment_table(
  records: Sequence[Mapping], reference: str, level: float = 0.95
) -> dict:
  """Cosines with the held-out-class gradient, per arm, paired by seed.

  Args:
    records: one per run, {"arm", "task", "seed", "cos": {direction:
      the overall cosine's mean over splits}}.
    reference: the arm of the paired differences of the update cosine.

  Returns:
    {"directions", "rows": [{"task" (AVERAGE: the mean over tasks per
    seed), "arm", "cos": {direction: t_interval over seeds}, "diff_update":
    t_interval of the per-seed update cosine minus the reference's, or
    None}]}.
  """
  by: dict = {}
  directions: list = []
  for r in records:
    by.setdefault(r["arm"], {}).setdefault(r["task"], {})[int(r["seed"])] = r[
      "cos"
    ]
    directions += [d for d in r["cos"] if d not in directions]
  for tasks in by.values():
    seeds = set.intersection(*(set(v) for v in tasks.values()))
    tasks[AVERAGE] = {
      s: {
        d: float(np.mean([tasks[t][s][d] for t in tasks if t != AVERAGE]))
        for d in directions
      }
      for s in sorted(seeds)
    }
  rows = []
  task_order: list = []
  for arm in by:
    task_order += [t for t in by[arm] if t not in task_order]
  task_order = [t for t in task_order if t != AVERAGE] + [AVERAGE]
  for task in task_order:
    for arm in by:
      cells = by[arm].get(task)
      if not cells:
        continue
      seeds = sorted(cells)
      cos = {
        d: t_interval([cells[s][d] for s in seeds if d in cells[s]], level)
        for d in directions
      }
      diff = None
      ref = by.get(reference, {}).get(task)
      if arm != reference and ref:
        common = [s for s in seeds if s in ref]
        diff = t_interval(
          [cells[s]["update"] - ref[s]["update"] for s in common], level
        )
      rows.append(
        {
          "task": task,
          "arm": arm,
          "seeds": seeds,
          "cos": cos,
          "diff_update": diff,
        }
      )
  return {"directions": directions, "rows": rows}


# ---------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------


def _signed(x: float) -> str:
  return "n/a" if math.isnan(x) else f"{x:+.2f}"


def diff_cell(d: Mapping) -> str:
  """'+1.23 [-0.50, +2.96] 4/5': mean, t interval, seeds better."""
  n = len(d["per_seed"])
  return (
    f"{_signed(d['mean'])} [{_signed(d['low'])}, {_signed(d['high'])}] "
    f"{d['better']}/{n}"
  )


def table_markdown(table: Mapping, labels: Mapping[str, str]) -> str:
  """Means per arm and paired differences vs the reference, per task."""
  pct = round(100 * table["level"])
  lines = [
    "| Task | Arm | Base | New | HM | ΔBase | ΔNew | ΔHM | ΔHM bootstrap |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in table["rows"]:
    task = f"**{r['task']}**" if r["task"] == AVERAGE else r["task"]
    cells = [task, labels.get(r["arm"], r["arm"])]
    cells += [f"{r[m]:.2f}" for m in METRICS]
    d = r["diff"]
    if d is None:
      cells += ["(reference)", "", "", ""]
    else:
      cells += [diff_cell(d[m]) for m in METRICS]
      cells.append(
        f"[{_signed(d['hm']['boot_low'])}, {_signed(d['hm']['boot_high'])}]"
      )
    lines.append("| " + " | ".join(cells) + " |")
  ref = labels.get(table["reference"], table["reference"])
  lines += [
    "",
    f"Top-1 accuracy (%), means over seeds; HM of the means. Δ: the arm "
    f"minus {ref} on the same seed, mean over seeds [{pct}% t interval] "
    f"and the number of seeds where the arm is higher; the HM of a run is "
    f"from its own Base and New; the Average row per seed is the HM of "
    f"the mean Base and mean New over the tasks (the paper's average). "
    f"Bootstrap: {pct}% percentile interval of the mean ΔHM over seeds "
    f"resampled with replacement.",
  ]
  return "\n".join(lines) + "\n"


def gate_markdown(summaries: Mapping[str, Mapping], labels) -> str:
  """Per arm, branch and layer: the gate's statistics over training."""
  lines = [
    "| Arm | Branch | Layer | mean | sd over training | first | last | "
    "max abs(γ - 0.5) | within-layer std |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for arm, by_branch in summaries.items():
    for branch, s in by_branch.items():
      for i in range(len(s["mean"])):
        lines.append(
          f"| {labels.get(arm, arm)} | {branch} | {i} | "
          + " | ".join(
            f"{s[k][i]:.4f}"
            for k in ("mean", "sd_time", "first", "last", "max_dev", "within")
          )
          + " |"
        )
  lines += [
    "",
    "γ: the gate the step applied (released: on the plain step's batch "
    "gradients; paper and its no_aug: on the inner step's support "
    "gradients), the mean and std over each layer's entries at each log "
    "point; mean and sd over training per run, then averaged over runs.",
  ]
  return "\n".join(lines) + "\n"


def alignment_markdown(table: Mapping, labels) -> str:
  dirs = table["directions"]
  lines = [
    "| Task | Arm | "
    + " | ".join(f"cos({d})" for d in dirs)
    + " | Δcos(update) |",
    "|" + "---|" * (len(dirs) + 3),
  ]
  for r in table["rows"]:
    task = f"**{r['task']}**" if r["task"] == AVERAGE else r["task"]
    cells = [task, labels.get(r["arm"], r["arm"])]
    for d in dirs:
      c = r["cos"][d]
      sd = "" if math.isnan(c["sd"]) else f" ± {c['sd']:.3f}"
      cells.append(f"{c['mean']:.3f}{sd}")
    d = r["diff_update"]
    cells.append(
      "(reference)"
      if d is None
      else f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
    )
    lines.append("| " + " | ".join(cells) + " |")
  lines += [
    "",
    "Cosine of each support-side direction with the held-out query class's "
    "cross-entropy gradient (prometar_jax.analysis.alignment, overall, mean "
    "over the splits), at the end of training; mean ± sd over seeds. "
    "Δcos(update): minus IVLP's on the same seed, [95% t interval].",
  ]
  return "\n".join(lines) + "\n"
