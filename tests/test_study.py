"""The study (docs/study.md): its arithmetic by hand, its driver end to end.

The arithmetic of study/analysis.py is checked against numbers computed by
hand below (not by calling the same functions); the driver runs at the CI
size: the micro CLIP of tests/test_demo.py, one task, two seeds, one
epoch of 1 and 2 shots, every arm, the alignment on 4 splits.
"""

import json
import math
import os
import sys

import jax
import numpy as np
import pytest
import train_testlib  # noqa: F401  (puts the repo root on sys.path)
from test_demo import SMALL, micro_clip  # noqa: F401  (a fixture)

from configs import study as study_config
from prometar_jax import identity, results
from prometar_jax import run as run_lib
from prometar_jax import sharding as sharding_lib
from prometar_jax.models import clip as clip_lib
from study import analysis
from study import run as study_run

# Two tasks, three seeds, (base, new) in %: a reference arm R and an arm A.
R = {
  "t1": {1: (60.0, 40.0), 2: (50.0, 50.0), 3: (70.0, 30.0)},
  "t2": {1: (80.0, 20.0), 2: (90.0, 30.0), 3: (70.0, 50.0)},
}
A = {
  "t1": {1: (62.0, 44.0), 2: (50.0, 52.0), 3: (68.0, 36.0)},
  "t2": {1: (80.0, 30.0), 2: (86.0, 30.0), 3: (72.0, 54.0)},
}
# t1, per seed: ΔBase = 2, 0, -2 (mean 0, sd 2); ΔNew = 4, 2, 6 (mean 4,
# sd sqrt(((0)^2 + (-2)^2 + 2^2) / 2) = 2). t_{0.975, 2} = 4.3027 (the
# t table), so the half width is 4.302653 * 2 / sqrt(3) = 4.968275.
T_975_2 = 4.302653
HALF_T1 = 4.968275
# HM per run, 2BN/(B+N): R: 2*60*40/100 = 48, 50, 2*70*30/100 = 42; A:
# 2*62*44/106 = 51.471698, 2*50*52/102 = 50.980392, 2*68*36/104 =
# 47.076923. ΔHM = 3.471698, 0.980392, 5.076923; mean 9.529013 / 3.
DHM_T1 = (3.471698, 0.980392, 5.076923)
DHM_T1_MEAN = 3.176338
# The averaged row per seed (mean over t1, t2): R: (70, 30), (70, 40),
# (70, 40) -> HM 42, 50.909091, 50.909091; A: (71, 37), (68, 41), (70, 45)
# -> HM 5254/108 = 48.648148, 5576/109 = 51.155963, 6300/115 = 54.782609.
DHM_AVG = (6.648148, 0.246872, 3.873518)
DHM_AVG_MEAN = 3.589513
# The paper's average row of A: mean Base over tasks of the seed means,
# (60 + 79.333333) / 2 = 69.666667; New (44 + 38) / 2 = 41; HM 51.620482.
A_AVG = (69.666667, 41.0, 51.620482)


def test_paired_differences_by_hand():
  d = analysis.paired_differences(A["t1"], R["t1"])
  assert d["seeds"] == [1, 2, 3]
  assert d["base"] == [2.0, 0.0, -2.0] and d["new"] == [4.0, 2.0, 6.0]
  np.testing.assert_allclose(d["hm"], DHM_T1, atol=1e-6)
  assert analysis.t_quantile(0.95, 2) == pytest.approx(T_975_2, abs=1e-6)
  t = analysis.t_interval(d["new"])
  assert (t["mean"], t["sd"]) == (pytest.approx(4.0), pytest.approx(2.0))
  assert (t["low"], t["high"]) == (
    pytest.approx(4 - HALF_T1, abs=1e-6),
    pytest.approx(4 + HALF_T1, abs=1e-6),
  )
  t = analysis.t_interval(d["base"])
  assert (t["low"], t["high"]) == (
    pytest.approx(-HALF_T1, abs=1e-6),
    pytest.approx(HALF_T1, abs=1e-6),
  )
  one = analysis.t_interval([1.5])
  assert one["mean"] == 1.5 and math.isnan(one["low"])


def test_study_table_by_hand():
  table = analysis.study_table({"R": R, "A": A}, "R", draws=2000, seed=3)
  assert table["tasks"] == ["t1", "t2", analysis.AVERAGE]
  rows = {(r["task"], r["arm"]): r for r in table["rows"]}
  assert rows[("t1", "R")]["diff"] is None
  t1 = rows[("t1", "A")]
  assert (t1["base"], t1["new"]) == (pytest.approx(60.0), pytest.approx(44.0))
  assert t1["hm"] == pytest.approx(2 * 60 * 44 / 104)  # HM of the means
  assert t1["diff"]["hm"]["mean"] == pytest.approx(DHM_T1_MEAN, abs=1e-6)
  assert t1["diff"]["new"]["better"] == 3 and t1["diff"]["base"]["better"] == 1
  avg = rows[(analysis.AVERAGE, "A")]
  assert (avg["base"], avg["new"], avg["hm"]) == tuple(
    pytest.approx(x, abs=1e-6) for x in A_AVG
  )
  np.testing.assert_allclose(avg["diff"]["hm"]["per_seed"], DHM_AVG, atol=1e-6)
  assert avg["diff"]["hm"]["mean"] == pytest.approx(DHM_AVG_MEAN, abs=1e-6)
  # The bootstrap: reproducible, inside the range of the per-seed values.
  again = analysis.study_table({"R": R, "A": A}, "R", draws=2000, seed=3)
  assert again == table
  b = avg["diff"]["hm"]
  assert min(DHM_AVG) - 1e-6 <= b["boot_low"] <= b["mean"] <= b["boot_high"]
  assert b["boot_high"] <= max(DHM_AVG) + 1e-6
  text = analysis.table_markdown(table, {"A": "Arm A"})
  assert "| **Average** | Arm A | 69.67 | 41.00 | 51.62 | " in text
  assert "+3.18 [" in text and " 3/3 |" in text


def test_choose_behaviour_rule():
  def table(hms):
    rows = [
      {"task": analysis.AVERAGE, "arm": a, "hm": h} for a, h in hms.items()
    ]
    return {"rows": rows}

  rule = analysis.choose_behaviour
  both = ("released", "paper")
  assert rule(table({"released": 50.0, "paper": 51.0}), both)["chosen"] == (
    "paper"
  )
  assert rule(table({"released": 52.0, "paper": 51.0}), both)["chosen"] == (
    "released"
  )
  # A tie goes to released (the first).
  assert rule(table({"released": 51.0, "paper": 51.0}), both)["chosen"] == (
    "released"
  )


def test_gate_summary_by_hand():
  # One run, 3 log points, one layer: 0.5, 0.6, 0.7 -> mean 0.6, sd over
  # training sqrt((0.01 + 0 + 0.01) / 3) = 0.081650, max |γ - 0.5| 0.2.
  trace = {
    "progress": [1 / 3, 2 / 3, 1.0],
    "mean": {"text": [[0.5], [0.6], [0.7]]},
    "std": {"text": [[0.0], [0.1], [0.2]]},
  }
  s = analysis.gate_summary([trace])["text"]
  assert s["mean"][0] == pytest.approx(0.6)
  assert s["sd_time"][0] == pytest.approx(0.081650, abs=1e-6)
  assert (s["first"][0], s["last"][0]) == (0.5, 0.7)
  assert s["max_dev"][0] == pytest.approx(0.2)
  assert s["within"][0] == pytest.approx(0.1)
  # On a grid from the first log point (1/3) to the end: 5 points, the
  # run interpolated linearly (0.55 half-way between 1/3 and 2/3).
  curves = analysis.gate_curves([trace, trace], points=5)["text"]
  np.testing.assert_allclose(curves["x"], [1 / 3, 1 / 2, 2 / 3, 5 / 6, 1])
  np.testing.assert_allclose(
    np.asarray(curves["mean"])[:, 0], [0.5, 0.55, 0.6, 0.65, 0.7]
  )
  np.testing.assert_allclose(np.asarray(curves["sd"])[:, 0], 0.0)


def test_identity_of_runs_before_task_augmentation():
  # A run saved before config.meta.task_augmentation existed had it on.
  saved = {"config.meta.mode": "prometar"}
  now = dict(saved, **{"config.meta.task_augmentation": True})
  assert identity.differences(saved, now) == {}
  off = dict(saved, **{"config.meta.task_augmentation": False})
  assert identity.differences(saved, off) == {
    "config.meta.task_augmentation": (True, False)
  }


def _small(config, clip_folder):
  config.model.name = clip_folder
  config.demo.per_class = SMALL
  config.eval.batch_size = 32
  return config


def test_arms_share_seeds_and_differ_only_in_the_scheme(micro_clip):  # noqa: F811
  config = study_config.get_config("seeds=1,2")
  ivlp = study_config.for_arm(config, "ivlp")
  for arm in study_config.ARMS:
    c = study_config.for_arm(config, arm, behaviour="paper")
    assert "driver" not in c and "study" not in c
    assert c.to_dict()["prompt"] == ivlp.to_dict()["prompt"]
    for key in ("optim", "data", "eval", "guard"):
      assert c.to_dict()[key] == ivlp.to_dict()[key], (arm, key)
  # The same seed gives every arm the same initial prompts: the prompt key
  # is split from the seed before the gradnet's (prometar_jax/run.py).
  clip = clip_lib.load(micro_clip[0])
  mesh = sharding_lib.make_mesh(1)
  inits = {}
  for arm in ("ivlp", "fixed_reg", "released", "paper"):
    c = _small(study_config.for_arm(config, arm), micro_clip[0])
    spec = run_lib.step_spec(c)
    state = run_lib._init_fn(spec, mesh)(clip, np.int32(2), np.int32(3))
    inits[arm] = jax.device_get(state.prompts)
  for p in inits.values():
    jax.tree.map(np.testing.assert_array_equal, p, inits["ivlp"])


def test_study_end_to_end_quick(micro_clip, tmp_path):  # noqa: F811
  # The command a user types, in its own process (as the training-system
  # tests run launch.py): the driver at the CI size, one lane.
  cache = str(tmp_path / "cache")
  arg = f"quick,seeds=1,2,dataset=colours,splits=4,cache={cache}"
  config = _small(study_config.get_config(arg), micro_clip[0])
  assert config.study.shots == (1, 2)
  wd = str(tmp_path / "wd")
  env = train_testlib.env({"cache": str(tmp_path / "jax_cache")})
  proc = train_testlib.run(
    [
      sys.executable,
      str(train_testlib.REPO / "launch.py"),
      f"--config={train_testlib.REPO / 'configs' / 'study.py'}:{arg}",
      f"--workdir={wd}",
      f"--config.model.name={micro_clip[0]}",
      f"--config.demo.per_class={SMALL}",
      "--config.eval.batch_size=32",
      "--config.study.lanes=1",
      "--config.progress_bar=False",
    ],
    env,
    timeout=900,
  )
  assert proc.returncode == 0, train_testlib.tail(proc)
  assert "Total" in proc.stdout, train_testlib.tail(proc)
  with open(os.path.join(wd, study_run.RESULTS_JSON)) as f:
    out = json.load(f)
  chosen = out["choice"]["chosen"]
  assert chosen in study_config.BEHAVIOURS
  # Every arm at 2 shots, and the sweep of IVLP vs the chosen behaviour.
  assert out["main"]["arms"] == list(study_config.ARMS)
  assert set(out["sweep"]) == {"1", "2"}
  assert out["sweep"]["1"]["arms"] == ["ivlp", chosen]

  def summary(arm, shots, seed):
    path = os.path.join(wd, arm, f"shots{shots}", "eurosat", f"seed{seed}")
    with open(os.path.join(path, "summary.json")) as f:
      return json.load(f), path

  # The paired differences are those of the runs' own summaries.
  rows = {(r["task"], r["arm"]): r for r in out["main"]["rows"]}
  for arm in study_config.ARMS:
    if arm == "ivlp":
      continue
    d = rows[("colours", arm)]["diff"]
    want = {"base": [], "new": [], "hm": []}
    for seed in (1, 2):
      a, a_dir = summary(arm, 2, seed)
      r, r_dir = summary("ivlp", 2, seed)
      for m in ("base", "new"):
        want[m].append(a["accuracy"][m] - r["accuracy"][m])
      want["hm"].append(a["hm"] - r["hm"])
      # Paired: the same few-shot images for every arm of a seed.
      with open(os.path.join(a_dir, "run.json")) as f1:
        with open(os.path.join(r_dir, "run.json")) as f2:
          ids = json.load(f1)["identity"], json.load(f2)["identity"]
      assert ids[0]["data.train_items"] == ids[1]["data.train_items"]
    for m in want:
      np.testing.assert_allclose(d[m]["per_seed"], want[m], atol=1e-9)
  # The rule, applied by the driver to the 2-shot average HM.
  hms = out["choice"]["hm"]
  assert hms["released"] == rows[("Average", "released")]["hm"]
  assert chosen == ("paper" if hms["paper"] > hms["released"] else "released")
  assert (
    results.harmonic_mean(
      rows[("Average", "paper")]["base"], rows[("Average", "paper")]["new"]
    )
    == hms["paper"]
  )
  # The gate over training, per layer (3 prompt layers), in every
  # ProMetaR arm; the paper's formulation logs its inner step's gate.
  assert set(out["gate"]) == {"released", "paper", "no_aug"}
  for arm in out["gate"]:
    assert set(out["gate"][arm]) == {"text", "vision"}
    assert len(out["gate"][arm]["text"]["mean"]) == 3
    assert out["gate"][arm]["text"]["runs"] == 2
  # The alignment at the end of every 2-shot run, the gradnet saved.
  assert len(out["alignment_runs"]) == 2 * len(study_config.ARMS)
  assert os.path.isfile(
    os.path.join(wd, "paper", "shots2", "eurosat", "seed1", "gradnet.npz")
  )
  avg = [r for r in out["alignment"]["rows"] if r["task"] == analysis.AVERAGE]
  assert {r["arm"] for r in avg} == set(study_config.ARMS)
  # The report, its JSON and figures.
  text = open(os.path.join(wd, "study.md")).read()
  assert "| **Average** | ProMetaR (paper) |" in text and "## Budget" in text
  with open(os.path.join(wd, "study.json")) as f:
    assert json.load(f)["choice"]["chosen"] == chosen
  for name in ("differences.png", "shots.png", "gate.png"):
    assert os.path.getsize(os.path.join(wd, "figures", name)) > 0
  # A rerun reuses every run and measure: the same tables.
  again = study_run.run_study(config, wd, progress=False)
  assert again["main"] == out["main"] and again["sweep"] == out["sweep"]
  assert again["alignment"] == out["alignment"]
