"""Results tables: the paper's averaging, seed means, files."""

import csv
import io
import json

import numpy as np
import pytest

from prometar_jax import results


def test_paper_average_is_hm_of_averaged_base_and_new():
  b, n, hm = results.base2new_average(results.PAPER_BASE2NEW)
  assert (round(b, 2), round(n, 2), round(hm, 2)) == (84.39, 76.93, 80.49)
  assert results.PAPER_BASE2NEW_AVERAGE == (84.39, 76.93, 80.49)
  # The mean of the per-dataset HMs is a different number.
  mean_hm = np.mean([v[2] for v in results.PAPER_BASE2NEW.values()])
  assert round(mean_hm, 2) == 80.31


def test_paper_hms_recompute_from_base_and_new():
  for name, (b, n, hm) in results.PAPER_BASE2NEW.items():
    assert round(results.harmonic_mean(b, n), 2) == hm, name


def _runs(values, protocol="base2new"):
  return [
    {"protocol": protocol, "dataset": d, "seed": s, "accuracy": acc}
    for (d, s), acc in values.items()
  ]


def test_base2new_table_seed_means_and_average():
  runs = _runs(
    {
      ("dtd", 1): {"base": 80.0, "new": 60.0},
      ("dtd", 2): {"base": 82.0, "new": 64.0},
      ("eurosat", 1): {"base": 90.0, "new": 70.0},
    }
  )
  t = results.base2new_table(runs)
  dtd, euro = t["rows"]
  assert (dtd["dataset"], dtd["seeds"]) == ("dtd", [1, 2])
  assert (dtd["base"], dtd["new"]) == (81.0, 62.0)
  assert dtd["hm"] == pytest.approx(2 * 81 * 62 / (81 + 62))
  assert dtd["paper"] == results.PAPER_BASE2NEW["dtd"]
  avg = t["average"]
  assert (avg["base"], avg["new"]) == (85.5, 66.0)
  assert avg["hm"] == pytest.approx(results.harmonic_mean(85.5, 66.0))
  # The paper's average over the same two datasets.
  pb = (83.02 + 94.94) / 2
  pn = (64.05 + 77.44) / 2
  assert avg["paper"][:2] == pytest.approx((pb, pn))


def test_base2new_table_of_the_paper_numbers_reproduces_80_49():
  runs = _runs(
    {
      (d, 1): {"base": b, "new": n}
      for d, (b, n, _) in results.PAPER_BASE2NEW.items()
    }
  )
  t = results.base2new_table(runs)
  a = t["average"]
  assert round(a["hm"], 2) == 80.49
  assert a["paper"] == results.PAPER_BASE2NEW_AVERAGE
  md = results.to_markdown(t)
  assert "| **Average** (11) | 84.39 | 76.93 | 80.49 |" in md


def test_transfer_table_means_targets_only():
  acc = {
    "imagenet": 70.0,
    "imagenetv2": 60.0,
    "imagenet_sketch": 50.0,
    "imagenet_a": 40.0,
    "imagenet_r": 80.0,
  }
  runs = _runs({("imagenet", 1): acc}, "domain_generalization")
  t = results.make_table(runs, "domain_generalization")
  (table,) = t["tables"]
  assert table["target_mean"] == pytest.approx(57.5)
  assert table["paper_target_mean"] == pytest.approx(
    np.mean([64.39, 49.55, 51.25, 77.89])
  )
  md = results.to_markdown(t)
  assert "ImageNet-Sketch" in md and "64.39?" in md and "71.29 |" in md


def test_write_tables(tmp_path):
  runs = _runs({("eurosat", 1): {"base": 90.0, "new": 70.0}})
  paths = results.write_tables(runs, "base2new", str(tmp_path), title="T")
  assert sorted(paths) == ["csv", "json", "md"]
  rows = list(
    csv.DictReader(io.StringIO((tmp_path / "results.csv").read_text()))
  )
  assert [r["dataset"] for r in rows] == ["eurosat", "average"]
  assert [r["name"] for r in rows] == ["EuroSAT", "Average"]
  assert float(rows[0]["paper_hm"]) == 85.30
  data = json.loads((tmp_path / "results.json").read_text())
  assert data["runs"][0]["accuracy"]["base"] == 90.0
  assert (tmp_path / "results.md").read_text().startswith("## T")
  assert not list(tmp_path.glob("*.tmp*"))


def test_renamed_datasets_are_not_the_papers():
  # The offline demo stores its tasks in CoOp layouts (colours in
  # eurosat/): its tables name the task and show no paper numbers.
  runs = _runs(
    {
      ("eurosat", 1): {"base": 62.0, "new": 48.5},
      ("sun397", 1): {"base": 86.67, "new": 48.33},
    }
  )
  names = {"eurosat": "colours", "sun397": "scenes"}
  t = results.make_table(runs, "base2new", names)
  assert [r["name"] for r in t["rows"]] == ["colours", "scenes"]
  assert all(r["paper"] is None for r in t["rows"])
  assert t["average"]["paper"] is None
  md = results.to_markdown(t)
  assert "| colours | 62.00 | 48.50 |" in md
  assert "Paper" not in md and "EuroSAT" not in md
  rows = list(csv.DictReader(io.StringIO(results.to_csv(t))))
  assert [r["name"] for r in rows] == ["colours", "scenes", "Average"]
  assert rows[0]["dataset"] == "eurosat" and rows[0]["paper_base"] == ""
  # The paper's own datasets keep their columns.
  md = results.to_markdown(results.make_table(runs, "base2new"))
  assert "| EuroSAT | 62.00 | 48.50 | 54.43 | 1 | 94.94 |" in md


def test_renamed_transfer_source_has_no_paper_row():
  acc = {"imagenet": 70.0, "imagenetv2": 60.0}
  runs = _runs({("imagenet", 1): acc}, "domain_generalization")
  t = results.make_table(runs, "domain_generalization", {"imagenet": "shapes"})
  (table,) = t["tables"]
  assert table["paper"] == {} and table["paper_target_mean"] is None
  md = results.to_markdown(t)
  assert "Source: shapes" in md and "(paper)" not in md
  assert "ImageNet-V2" in md  # a name left as it is


def test_summary_line():
  s = {
    "protocol": "base2new",
    "dataset": "eurosat",
    "seed": 1,
    "method": "ivlp + ProMetaR",
    "accuracy": {"base": 62.0, "new": 48.5},
    "hm": results.harmonic_mean(62.0, 48.5),
    "train_seconds": 80.4,
    "eval_seconds": 1.2,
  }
  assert results.summary_line(s, {"eurosat": "colours"}) == (
    "ivlp + ProMetaR, colours seed 1: base 62.00, new 48.50, HM 54.43 "
    "(train 80 s, eval 1 s)"
  )
  zs = dict(s, method="zero-shot CLIP", protocol="cross_dataset")
  del zs["train_seconds"], zs["hm"]
  zs["accuracy"] = {"eurosat": 40.0, "dtd": 30.5}
  assert results.summary_line(zs) == (
    "zero-shot CLIP, EuroSAT seed 1: EuroSAT 40.00, DTD 30.50 (eval 1 s)"
  )
