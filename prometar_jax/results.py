"""Results tables: seed means, the paper's averaging, the paper's numbers.

Every finished run writes a `summary.json` (see `train.py`); this module
turns a list of those summaries into one table per protocol, in Markdown,
CSV and JSON, with the paper's ProMetaR numbers beside ours, for the
paper's datasets only: a dataset given another name (`names`, from
`config.data.display_names`: the offline demo's tasks, stored in the CoOp
layout of a real dataset) is another task, shown under its own name and
without paper columns.

Averaging follows the paper (docs/training.md, "Protocols"):

* per dataset, Base and New are the means over seeds, and
  HM = 2 B N / (B + N) is computed from those means;
* the average row is HM(mean of the Bs, mean of the Ns), *not* the mean of
  the per-dataset HMs: the paper's 84.39 / 76.93 give 80.49, while the mean
  of its 11 HMs is 80.31.

Domain generalization and cross-dataset transfer: one column per evaluated
dataset (seed means) and the mean over the target datasets (the source is
not part of the average, as in the papers' tables).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from prometar_jax import fileio

# (B, N, HM) of ProMetaR (docs/training.md, "The paper's numbers"): every
# HM recomputes from its B and N, and the 11 Bs and Ns average to the
# paper's 84.39 and 76.93.
PAPER_BASE2NEW = {
  "imagenet": (77.76, 70.75, 74.09),
  "caltech101": (98.11, 94.29, 96.16),
  "oxford_pets": (95.57, 97.46, 96.51),
  "stanford_cars": (78.32, 75.18, 76.72),
  "oxford_flowers": (98.13, 77.66, 86.70),
  "food101": (90.80, 91.89, 91.34),
  "fgvc_aircraft": (42.02, 38.63, 40.25),
  "sun397": (82.70, 79.02, 80.82),
  "dtd": (83.02, 64.05, 72.31),
  "eurosat": (94.94, 77.44, 85.30),
  "ucf101": (86.97, 79.84, 83.25),
}
PAPER_BASE2NEW_AVERAGE = (84.39, 76.93, 80.49)

# Domain generalization (docs/training.md, "The paper's numbers"): the
# ImageNet source accuracy is confirmed by a third party, the four targets
# are recalled (marked "?").
PAPER_DOMAIN_GENERALIZATION = {
  "imagenet": 71.29,
  "imagenetv2": 64.39,
  "imagenet_sketch": 49.55,
  "imagenet_a": 51.25,
  "imagenet_r": 77.89,
}
# Cross-dataset transfer (same section): a third-party listing gives
# ImageNet and six targets; the other four are recalled (marked "?").
PAPER_CROSS_DATASET = {
  "imagenet": 71.29,
  "caltech101": 93.74,
  "oxford_pets": 90.59,
  "stanford_cars": 65.83,
  "oxford_flowers": 71.13,
  "food101": 86.39,
  "fgvc_aircraft": 24.78,
  "sun397": 67.41,
  "dtd": 47.08,
  "eurosat": 45.02,
  "ucf101": 69.50,
}
# Paper cells that could not be checked against a source.
UNCERTAIN = {
  "domain_generalization": (
    "imagenetv2",
    "imagenet_sketch",
    "imagenet_a",
    "imagenet_r",
  ),
  "cross_dataset": (
    "caltech101",
    "oxford_pets",
    "stanford_cars",
    "fgvc_aircraft",
  ),
}
PAPER_TRANSFER = {
  "domain_generalization": PAPER_DOMAIN_GENERALIZATION,
  "cross_dataset": PAPER_CROSS_DATASET,
}

DISPLAY_NAMES = {
  "imagenet": "ImageNet",
  "caltech101": "Caltech101",
  "oxford_pets": "OxfordPets",
  "stanford_cars": "StanfordCars",
  "oxford_flowers": "Flowers102",
  "food101": "Food101",
  "fgvc_aircraft": "FGVCAircraft",
  "sun397": "SUN397",
  "dtd": "DTD",
  "eurosat": "EuroSAT",
  "ucf101": "UCF101",
  "imagenetv2": "ImageNet-V2",
  "imagenet_sketch": "ImageNet-Sketch",
  "imagenet_a": "ImageNet-A",
  "imagenet_r": "ImageNet-R",
}

PROTOCOLS = ("base2new", "domain_generalization", "cross_dataset")
RESULT_FILES = ("results.md", "results.csv", "results.json")


def harmonic_mean(base: float, new: float) -> float:
  """2 B N / (B + N); 0 when both are 0."""
  return 2.0 * base * new / (base + new) if base + new > 0 else 0.0


def base2new_average(
  per_dataset: Mapping[str, Sequence[float]],
) -> tuple[float, float, float]:
  """The paper's average row: (mean B, mean N, HM of the two means).

  Args:
    per_dataset: {dataset: (B, N, ...)}; extra entries (an HM) are ignored.

  Returns:
    (B_avg, N_avg, HM(B_avg, N_avg)).
  """
  bases = [float(v[0]) for v in per_dataset.values()]
  news = [float(v[1]) for v in per_dataset.values()]
  b, n = float(np.mean(bases)), float(np.mean(news))
  return b, n, harmonic_mean(b, n)


def display_name(dataset: str, names: Mapping[str, str] | None = None) -> str:
  """The name a table shows: `names[dataset]`, else the paper's spelling."""
  if names and dataset in names:
    return names[dataset]
  return DISPLAY_NAMES.get(dataset, dataset)


def paper_base2new(dataset: str, names: Mapping[str, str] | None = None):
  """The paper's (B, N, HM) of `dataset`; None for a renamed (other) task."""
  if names and dataset in names:
    return None
  return PAPER_BASE2NEW.get(dataset)


def run_label(method: str, dataset: str, seed: int, names=None) -> str:
  """The label of a run in bars and lines: 'ivlp + ProMetaR, EuroSAT seed 1'."""
  return f"{method}, {display_name(dataset, names)} seed {seed}"


def summary_line(summary: Mapping, names=None) -> str:
  """A finished run in one line: its label, accuracies (%) and times."""
  acc = summary["accuracy"]
  if summary.get("protocol") == "base2new":
    scores = (
      f"base {acc['base']:.2f}, new {acc['new']:.2f}, HM {summary['hm']:.2f}"
    )
  else:
    scores = ", ".join(
      f"{display_name(k, names)} {v:.2f}" for k, v in acc.items()
    )
  times = [
    f"{k} {summary[key]:.0f} s"
    for k, key in (("train", "train_seconds"), ("eval", "eval_seconds"))
    if key in summary
  ]
  label = run_label(
    summary["method"], summary["dataset"], summary["seed"], names
  )
  return f"{label}: {scores} ({', '.join(times)})"


def _seed_means(summaries, dataset):
  """{eval key: (mean, std, n)} over the summaries of `dataset`."""
  runs = [s for s in summaries if s["dataset"] == dataset]
  keys = []
  for s in runs:
    keys += [k for k in s["accuracy"] if k not in keys]
  out = {}
  for k in keys:
    vals = [s["accuracy"][k] for s in runs if k in s["accuracy"]]
    out[k] = (float(np.mean(vals)), float(np.std(vals)), len(vals))
  return out, sorted(s["seed"] for s in runs)


def _datasets_in_order(summaries):
  seen = []
  for s in summaries:
    if s["dataset"] not in seen:
      seen.append(s["dataset"])
  return seen


def base2new_table(
  summaries: Sequence[Mapping], names: Mapping[str, str] | None = None
) -> dict:
  """Per-dataset seed means, HM, the paper's average row, paper numbers.

  Args:
    summaries: run summaries with "dataset", "seed" and "accuracy" {"base":
      %, "new": %}.
    names: {dataset: table name} of datasets that are not the paper's;
      they get no paper numbers.

  Returns:
    {"protocol", "rows": [{"dataset", "name", "base", "new", "hm", "seeds",
    "base_std", "new_std", "paper": (B, N, HM) | None}], "average": {"base",
    "new", "hm", "datasets", "paper": (B, N, HM) | None}}. The paper average
    is over the same datasets (the paper's 84.39 / 76.93 / 80.49 with all
    11), and None unless every row has paper numbers.
  """
  rows = []
  for d in _datasets_in_order(summaries):
    means, seeds = _seed_means(summaries, d)
    if "base" not in means or "new" not in means:
      continue
    b, n = means["base"][0], means["new"][0]
    rows.append(
      {
        "dataset": d,
        "name": display_name(d, names),
        "base": b,
        "new": n,
        "hm": harmonic_mean(b, n),
        "base_std": means["base"][1],
        "new_std": means["new"][1],
        "seeds": seeds,
        "paper": paper_base2new(d, names),
      }
    )
  average = None
  if rows:
    b, n, hm = base2new_average(
      {r["dataset"]: (r["base"], r["new"]) for r in rows}
    )
    paper = None
    if all(r["paper"] for r in rows):
      paper = base2new_average({r["dataset"]: r["paper"] for r in rows})
      if len(rows) == len(PAPER_BASE2NEW):
        paper = PAPER_BASE2NEW_AVERAGE  # the published, rounded values
    average = {
      "base": b,
      "new": n,
      "hm": hm,
      "datasets": [r["dataset"] for r in rows],
      "paper": paper,
    }
  return {"protocol": "base2new", "rows": rows, "average": average}


def transfer_table(
  summaries: Sequence[Mapping],
  protocol: str,
  source: str = "imagenet",
  names: Mapping[str, str] | None = None,
) -> dict:
  """Seed means per evaluated dataset and the target mean, with the paper's.

  Args:
    summaries: run summaries whose "accuracy" maps dataset -> %.
    protocol: "domain_generalization" or "cross_dataset".
    source: the training dataset (excluded from the target mean).
    names: {dataset: table name} of datasets that are not the paper's.

  Returns:
    {"protocol", "source", "columns": [datasets], "names": {dataset: table
    name}, "ours": {dataset: mean}, "std": {...}, "seeds", "target_mean",
    "paper": {dataset: %} (none when the source is not the paper's),
    "paper_target_mean", "uncertain": [paper cells not checked]}.
  """
  means, seeds = _seed_means(summaries, source)
  columns = list(means)
  names = dict(names or {})
  # A renamed source is another task: none of the paper's cells apply.
  paper_all = {} if source in names else PAPER_TRANSFER.get(protocol, {})
  targets = [c for c in columns if c != source]
  ours_t = [means[c][0] for c in targets]
  paper = {c: paper_all[c] for c in columns if c in paper_all}
  paper_t = [paper[c] for c in targets if c in paper]
  return {
    "protocol": protocol,
    "source": source,
    "columns": columns,
    "names": {c: display_name(c, names) for c in columns},
    "ours": {c: means[c][0] for c in columns},
    "std": {c: means[c][1] for c in columns},
    "seeds": seeds,
    "target_mean": float(np.mean(ours_t)) if ours_t else None,
    "paper": paper,
    "paper_target_mean": (
      float(np.mean(paper_t))
      if paper_t and len(paper_t) == len(targets)
      else None
    ),
    "uncertain": [c for c in UNCERTAIN.get(protocol, ()) if c in paper],
  }


def make_table(
  summaries: Sequence[Mapping],
  protocol: str,
  names: Mapping[str, str] | None = None,
) -> dict:
  """The protocol's table; `names` as in `base2new_table`."""
  if protocol == "base2new":
    return base2new_table(summaries, names)
  if protocol in PROTOCOLS:
    sources = _datasets_in_order(summaries)
    return {
      "protocol": protocol,
      "tables": [
        transfer_table(summaries, protocol, s, names) for s in sources
      ],
    }
  raise ValueError(f"unknown protocol {protocol!r}; use one of {PROTOCOLS}")


# ---------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------


def _f(x) -> str:
  return "-" if x is None else f"{x:.2f}"


def _paper_cell(table, c):
  if c not in table["paper"]:
    return "-"
  mark = "?" if c in table["uncertain"] else ""
  return f"{table['paper'][c]:.2f}{mark}"


def to_markdown(table: Mapping, title: str = "") -> str:
  """A Markdown table, with the paper's ProMetaR numbers where they apply."""
  lines = [f"## {title}", ""] if title else []
  if table["protocol"] == "base2new":
    rows, a = table["rows"], table["average"]
    paper = any(r["paper"] for r in rows)
    head = "| Dataset | Base | New | HM | Seeds |"
    lines += [
      head + (" Paper Base | Paper New | Paper HM |" if paper else ""),
      "|---|---|---|---|---|" + ("---|---|---|" if paper else ""),
    ]

    def cells(values):
      return "".join(f" {_f(x)} |" for x in values) if paper else ""

    for r in rows:
      seeds = ",".join(str(s) for s in r["seeds"])
      lines.append(
        f"| {r['name']} | {_f(r['base'])} | {_f(r['new'])} "
        f"| {_f(r['hm'])} | {seeds} |" + cells(r["paper"] or (None,) * 3)
      )
    if a is not None:
      lines.append(
        f"| **Average** ({len(a['datasets'])}) | {_f(a['base'])} | "
        f"{_f(a['new'])} | {_f(a['hm'])} | |" + cells(a["paper"] or (None,) * 3)
      )
    lines += [
      "",
      "Base and New are means over seeds; HM = 2BN/(B+N) of those means. "
      "The average row is HM(mean Base, mean New), as in the paper.",
    ]
    return "\n".join(lines) + "\n"
  for t in table["tables"]:
    cols = t["columns"]
    head = [t["names"][c] for c in cols] + ["Target mean"]
    lines += [
      f"Source: {t['names'][t['source']]}; seeds "
      + ",".join(str(s) for s in t["seeds"]),
      "",
      "| | " + " | ".join(head) + " |",
      "|---|" + "---|" * len(head),
      "| Ours | "
      + " | ".join(_f(t["ours"][c]) for c in cols)
      + f" | {_f(t['target_mean'])} |",
    ]
    if t["paper"]:
      lines.append(
        "| ProMetaR (paper) | "
        + " | ".join(_paper_cell(t, c) for c in cols)
        + f" | {_f(t['paper_target_mean'])} |"
      )
    lines.append("")
  lines.append(
    "Seed means of top-1 accuracy (%). Target mean: mean over the target "
    "datasets (the source excluded). '?': paper value recalled, not checked."
  )
  return "\n".join(lines) + "\n"


def to_csv(table: Mapping) -> str:
  """One row per dataset (per source and dataset for transfer tables).

  `name` is the table's name of the dataset; the paper columns are empty
  where the paper has no number for it.
  """
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  if table["protocol"] == "base2new":
    w.writerow(
      ["dataset", "name", "base", "new", "hm", "seeds", "paper_base"]
      + ["paper_new", "paper_hm"]
    )
    rows = list(table["rows"])
    if table["average"] is not None:
      a = table["average"]
      rows.append(dict(a, dataset="average", name="Average", seeds=[]))
    for r in rows:
      p = r["paper"] or ("", "", "")
      w.writerow(
        [r["dataset"], r["name"], r["base"], r["new"], r["hm"]]
        + [" ".join(str(s) for s in r["seeds"]), *p]
      )
    return buf.getvalue()
  w.writerow(["source", "dataset", "name", "accuracy", "seeds", "paper"])
  for t in table["tables"]:
    seeds = " ".join(str(s) for s in t["seeds"])
    for c in t["columns"]:
      w.writerow(
        [t["source"], c, t["names"][c], t["ours"][c], seeds]
        + [t["paper"].get(c, "")]
      )
    w.writerow(
      [t["source"], "target_mean", "Target mean", t["target_mean"], seeds]
      + [t["paper_target_mean"] if t["paper_target_mean"] is not None else ""]
    )
  return buf.getvalue()


def write_json(path: str, obj) -> None:
  fileio.write_json(path, obj)


def write_tables(
  summaries: Sequence[Mapping],
  protocol: str,
  out_dir: str,
  title: str = "",
  names: Mapping[str, str] | None = None,
) -> dict[str, str]:
  """Writes results.{md,csv,json} to `out_dir`; returns {suffix: path}.

  `names` as in `base2new_table`.
  """
  table = make_table(summaries, protocol, names)
  texts = {
    "md": to_markdown(table, title),
    "csv": to_csv(table),
    "json": json.dumps(
      {"table": table, "runs": list(summaries)},
      indent=2,
      default=fileio.json_default,
    ),
  }
  paths = {}
  for suffix, text in texts.items():
    paths[suffix] = os.path.join(out_dir, f"results.{suffix}")
    fileio.write_atomically(paths[suffix], text)
  return paths
