"""End to end: launch.py base2new over 2 seeds, kill + resume, bad inputs.

One `launch.py` run (tiny CLIP, generated EuroSAT, second-order ProMetaR,
1 device) trains seeds 1 and 2 and writes the table; the other tests
compare against it: a run SIGKILLed after its first epoch and resumed ends
with bit-identical prompts, --eval_only reproduces the accuracies, and
each bad input fails with its message and writes no result file.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import tensorflow as tf
import train_testlib as tl
from conftest import fast_compilation

from configs import common, domain_generalization
from prometar_jax import checkpoint, results, sharding, train
from prometar_jax import prompt_learners as pl
from prometar_jax import workdir as workdir_lib
from prometar_jax.data import synthetic

ARG = tl.E2E_ARG


def _summary(run_dir):
  with open(os.path.join(run_dir, "summary.json")) as f:
    return json.load(f)


def _result_files(workdir):
  out = []
  for dirpath, _, files in os.walk(workdir):
    out += [
      os.path.join(dirpath, f)
      for f in files
      if f in results.RESULT_FILES + (train.SUMMARY, train.PROMPTS)
    ]
  return out


def test_base2new_two_seeds_writes_table(e2e):
  workdir, proc = e2e
  runs = [_summary(workdir / "eurosat" / f"seed{s}") for s in (1, 2)]
  for s in runs:
    assert set(s["accuracy"]) == {"base", "new"}
    assert s["num_classes"] == {"base": 3, "new": 3}
    assert s["num_test"] == {"base": 9, "new": 9}
    assert s["steps"] == tl.EPOCHS * tl.STEPS_PER_EPOCH
    assert s["hm"] == pytest.approx(
      results.harmonic_mean(s["accuracy"]["base"], s["accuracy"]["new"])
    )
  for suffix in ("md", "csv", "json"):
    assert (workdir / f"results.{suffix}").is_file()
  with open(workdir / "results.json") as f:
    table = json.load(f)["table"]
  (row,) = table["rows"]
  base = np.mean([s["accuracy"]["base"] for s in runs])
  new = np.mean([s["accuracy"]["new"] for s in runs])
  assert row["seeds"] == [1, 2]
  assert row["base"] == pytest.approx(base)
  assert row["hm"] == pytest.approx(results.harmonic_mean(base, new))
  assert row["paper"] == list(results.PAPER_BASE2NEW["eurosat"])
  md = (workdir / "results.md").read_text()
  assert "| EuroSAT |" in md and "85.30" in md
  assert "| EuroSAT |" in proc.stderr  # the table is logged too
  # Checkpoints at both epoch ends, exported prompts, TensorBoard scalars.
  run1 = workdir / "eurosat" / "seed1"
  assert sorted(os.listdir(run1 / "checkpoints")) == ["3", "6"]
  prompts = checkpoint.load_prompts(str(run1 / "prompts.npz"))
  assert prompts["text"].shape == (2, 2, 32)
  assert prompts["vision"].shape == (2, 2, 48)
  tags = set()
  for name in os.listdir(run1 / "tensorboard"):
    for event in tf.compat.v1.train.summary_iterator(
      str(run1 / "tensorboard" / name)
    ):
      tags |= {v.tag for v in event.summary.value}
  expected = {"loss_ce", "loss_meta", "lr", "lr_gradnet", "accuracy/base"}
  assert expected | {"gamma_text_mean/layer_0"} <= tags


def test_killed_run_resumes_bit_identical(e2e, assets, tmp_path):
  """SIGKILL after epoch 1 and one more step (a mid-epoch checkpoint)."""
  ref_dir = e2e[0] / "eurosat" / "seed1"
  workdir = tmp_path / "wd"
  env = tl.env(assets)
  kill_step = tl.STEPS_PER_EPOCH + 1
  proc, killed = tl.run_and_kill(
    "dataset=eurosat,seed=1",
    assets,
    workdir,
    kill_step,
    env,
    checkpoint__every_steps=2,
  )
  assert killed, tl.tail(proc)
  run_dir = workdir / "eurosat" / "seed1"
  # Checkpoints 2, 3 (epoch 1), 4 were committed; 2 keeps the last two.
  assert sorted(os.listdir(run_dir / "checkpoints")) == ["3", "4"]
  assert not _result_files(workdir)
  # The killed run held the workdir's lock: its record stays, the lock not.
  assert (workdir / workdir_lib.LOCK_FILE).is_file()
  proc = tl.run(
    tl.launch_cmd("dataset=eurosat,seed=1", workdir, tl.overrides(assets)), env
  )
  assert proc.returncode == 0, tl.tail(proc)
  assert "restored step 4 of 6" in proc.stderr
  assert "continuing at epoch 2, batch 2" in proc.stderr
  ours = np.load(run_dir / "prompts.npz")
  ref = np.load(ref_dir / "prompts.npz")
  assert sorted(ours.files) == sorted(ref.files)
  for k in ref.files:
    np.testing.assert_array_equal(ours[k], ref[k])
  assert _summary(run_dir)["accuracy"] == _summary(ref_dir)["accuracy"]


@pytest.fixture
def like_subprocesses():
  """Compile in this process as the subprocess runs do (same numerics)."""
  with fast_compilation():
    yield


def test_eval_only_reproduces_accuracies(
  e2e, assets, tmp_path, like_subprocesses
):
  # Evaluate a copy of the reference run's checkpoints (in this process).
  src = e2e[0] / "eurosat" / "seed1"
  run_dir = tmp_path / "wd" / "eurosat" / "seed1"
  shutil.copytree(src / "checkpoints", run_dir / "checkpoints")
  shutil.copy(src / "run.json", run_dir / "run.json")
  config = tl.make_config("dataset=eurosat,seed=1", assets)
  out = train.train_and_evaluate(config, str(tmp_path / "wd"), eval_only=True)
  (summary,) = out["runs"]
  assert summary["accuracy"] == _summary(src)["accuracy"]
  assert summary["start_step"] == tl.EPOCHS * tl.STEPS_PER_EPOCH
  assert (tmp_path / "wd" / "results.md").is_file()
  # Padded (masked) classes change shapes, not predictions.
  padded = tmp_path / "padded" / "eurosat" / "seed1"
  shutil.copytree(src / "checkpoints", padded / "checkpoints")
  shutil.copy(src / "run.json", padded / "run.json")
  config.data.class_multiple = 8
  out = train.train_and_evaluate(
    config, str(tmp_path / "padded"), eval_only=True
  )
  assert out["runs"][0]["accuracy"] == summary["accuracy"]


def test_eval_only_without_checkpoint_fails(assets, tmp_path):
  config = tl.make_config("dataset=eurosat,seed=1", assets)
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    train.train_and_evaluate(config, str(tmp_path / "wd"), eval_only=True)
  assert not _result_files(tmp_path)


def test_zeroshot_domain_generalization_table(assets, tmp_path):
  """Zero-shot CLIP (no training) through the DG protocol and its table."""
  root = tmp_path / "data"
  for name in ("imagenet", *common.DOMAIN_GENERALIZATION_TARGETS):
    synthetic.make_coop_dataset(name, root, num_classes=3, per_class=(2, 0, 2))
  config = domain_generalization.get_config("seeds=1")
  config.update_from_flattened_dict(
    dict(tl.overrides(assets), **{"data.root": str(root)})
  )
  config.model.learner = "zeroshot"
  out = train.train_and_evaluate(config, str(tmp_path / "wd"))
  (summary,) = out["runs"]
  assert set(summary["accuracy"]) == {
    "imagenet",
    *common.DOMAIN_GENERALIZATION_TARGETS,
  }
  assert summary["steps"] == 0 and summary["method"] == "zero-shot CLIP"
  (table,) = out["table"]["tables"]
  targets = [v for k, v in table["ours"].items() if k != "imagenet"]
  assert table["target_mean"] == pytest.approx(np.mean(targets))
  md = (tmp_path / "wd" / "results.md").read_text()
  assert "ImageNet-A" in md and "71.29" in md
  assert not (tmp_path / "wd" / "imagenet" / "seed1" / "checkpoints").exists()


# ---------------------------------------------------------------------------
# Bad inputs: a message, and no result file
# ---------------------------------------------------------------------------


def test_unknown_config_key_fails(assets, tmp_path):
  workdir = tmp_path / "wd"
  values = dict(tl.overrides(assets), **{"optim.lrr": 0.1})
  proc = tl.run(
    tl.launch_cmd("dataset=eurosat", workdir, values), tl.env(assets)
  )
  assert proc.returncode != 0
  assert "lrr" in proc.stderr
  assert not workdir.exists()
  proc = tl.run(
    tl.launch_cmd("dataset=eurosat,sedes=3", workdir, tl.overrides(assets)),
    tl.env(assets),
  )
  assert proc.returncode != 0
  assert "unknown config argument 'sedes'" in proc.stderr
  assert not workdir.exists()


def test_missing_weights_fail(assets, tmp_path):
  config = tl.make_config(
    "dataset=eurosat", assets, model__name=str(tmp_path / "no_clip")
  )
  with pytest.raises(FileNotFoundError, match="no CLIP checkpoint folder"):
    train.train_and_evaluate(config, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


def test_missing_dataset_fails(assets, tmp_path):
  config = tl.make_config("dataset=eurosat,dtd", assets)
  with pytest.raises(FileNotFoundError, match="dtd"):
    train.train_and_evaluate(config, str(tmp_path / "wd"))
  # dtd is checked before eurosat trains: nothing at all is written.
  assert not (tmp_path / "wd").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(e2e, assets, tmp_path):
  # lr = nan from epoch 2 on (epoch 1 is the warm-up at 1e-5).
  workdir = tmp_path / "wd"
  values = dict(tl.overrides(assets), **{"optim.lr": "nan"})
  proc = tl.run(
    tl.launch_cmd("dataset=eurosat,seed=1", workdir, values), tl.env(assets)
  )
  assert proc.returncode != 0
  assert "TrainingDiverged" in proc.stderr
  assert "at step 4 (epoch 2/2, batch 1/3)" in proc.stderr
  assert "last checkpoint that passed the checks is step 3" in proc.stderr
  run_dir = workdir / "eurosat" / "seed1"
  assert os.listdir(run_dir / "checkpoints") == ["3"]
  assert not _result_files(workdir)


# ---------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------


def test_epoch_lrs_match_dassl():
  spec = train.step_spec(common.get_base_config())
  lrs = [spec.optim.epoch_lr(e) for e in range(10)]
  # Constant warm-up, then the cosine restarted after it (docs/training.md,
  # "Learning-rate schedule").
  expected = [1e-5, 2.5e-3, 2.4388e-3, 2.2613e-3, 1.9847e-3, 1.6363e-3]
  expected += [1.25e-3, 8.637e-4, 5.153e-4, 2.387e-4]
  np.testing.assert_allclose(lrs, expected, rtol=2e-4)
  assert {spec.optim_gradnet.epoch_lr(e) for e in range(10)} == {1e-6}


def test_pad_classes_masks_padding():
  feats = {
    "token_ids": np.arange(6).reshape(3, 2),
    "teacher": np.ones((3, 4), np.float32),
    "class_mask": np.ones(3, bool),
  }
  out = sharding.pad_classes(feats, 4)
  np.testing.assert_array_equal(out["token_ids"][3], feats["token_ids"][0])
  np.testing.assert_array_equal(out["teacher"][3], 0)
  np.testing.assert_array_equal(out["class_mask"], [1, 1, 1, 0])
  assert sharding.pad_classes(feats, 3)["token_ids"].shape == (3, 2)
  mesh = sharding.make_mesh(-1)
  for multiple in (1, 4, 6):
    put = sharding.put_class_features(feats, mesh, True, multiple)
    want = sharding.round_up(3, np.lcm(multiple, mesh.size))
    assert put["class_mask"].shape == (want,)
    assert int(put["class_mask"].sum()) == 3


def test_pad_classes_pads_each_length_group():
  ids = np.zeros((5, 77), np.int32)
  ids[:, 0] = 98
  for c, k in enumerate([1, 2, 20, 1, 3]):
    ids[c, 1 + k] = 99
  grouped = pl.bucket_token_ids(ids, max_buckets=2, multiple=8)
  assert [b.shape for b in grouped["buckets"]] == [(4, 8), (1, 24)]
  feats = {"token_ids": grouped, "class_mask": np.ones(5, bool)}
  out = sharding.pad_classes(feats, 4)
  buckets = out["token_ids"]["buckets"]
  assert [b.shape for b in buckets] == [(4, 8), (4, 24)]
  np.testing.assert_array_equal(buckets[1][1:], np.repeat(buckets[1][:1], 3, 0))
  # Classes 0..4 keep their rows; the padded classes point at row 0.
  np.testing.assert_array_equal(
    out["token_ids"]["order"], [0, 1, 4, 2, 3, 0, 0, 0]
  )
  np.testing.assert_array_equal(out["class_mask"], [1] * 5 + [0] * 3)
  mesh = sharding.make_mesh(-1)
  put = sharding.put_class_features(feats, mesh, True)
  assert put["token_ids"]["order"].shape == (sharding.round_up(5, mesh.size),)


def test_pad_classes_repoints_order_past_padded_groups():
  """Padding an earlier group shifts the later groups' rows (hand-derived)."""
  ids = np.zeros((3, 77), np.int32)
  ids[:, 0] = 98
  for c, k in enumerate([3, 3, 12]):
    ids[c, 1 + k] = 99
  grouped = pl.bucket_token_ids(ids, max_buckets=2, multiple=8)
  assert [b.shape for b in grouped["buckets"]] == [(2, 8), (1, 16)]
  feats = {"token_ids": grouped, "class_mask": np.ones(3, bool)}
  out = sharding.pad_classes(feats, 4)["token_ids"]
  assert [b.shape for b in out["buckets"]] == [(4, 8), (4, 16)]
  # Concatenated: group 0 is rows 0-3 (classes 0, 1, two pads), group 1
  # rows 4-7: class 2 is row 4 (it was row 2 before the padding).
  np.testing.assert_array_equal(out["order"], [0, 1, 4, 0])
  rows = np.concatenate([b[:, :8] for b in out["buckets"]])
  np.testing.assert_array_equal(rows[out["order"][:3]], ids[:, :8])


def test_batch_layout_replicates_indivisible_batches():
  mesh = sharding.make_mesh(-1)
  assert sharding.batch_layout(4 * mesh.size, mesh).sharded
  if mesh.size > 1:
    assert not sharding.batch_layout(mesh.size + 1, mesh).sharded
  assert jax.device_count() >= mesh.size
