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
  assert float(rows[0]["paper_hm"]) == 85.30
  data = json.loads((tmp_path / "results.json").read_text())
  assert data["runs"][0]["accuracy"]["base"] == 90.0
  assert (tmp_path / "results.md").read_text().startswith("## T")
  assert not list(tmp_path.glob("*.tmp*"))
