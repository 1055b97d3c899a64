"""Trustworthy runs: a workdir never reuses, mixes or loses results.

Each scenario of the run lifecycle (prometar_jax/{train,run,identity,
workdir,guard}.py, data/verify.py) on the tiny setup of train_testlib:

1. a finished run re-run with another method, shots or lr is refused,
   naming the keys that differ, and nothing is changed;
2. two runs started together into one workdir: exactly one is refused, the
   other's results are its own;
3. (test_train.py) a SIGKILLed run does not block the next one;
4. a finite blow-up (lr 1e6) stops the run; the kept checkpoint is sane;
5. a corrupt image fails before the first step, naming every bad file; an
   evaluation failure never loses a finished training;
6. a full disk during a checkpoint save ends in one line, and the same
   command then resumes; damaged checkpoint files are named.
"""

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import train_testlib as tl

from prometar_jax import (
  checkpoint,
  errors,
  fileio,
  guard,
  identity,
  protocol,
  sharding,
  train,
  workdir,
)
from prometar_jax import run as run_lib
from prometar_jax.data import ImageReadError, verify
from prometar_jax.models import clip as clip_lib

SEED1 = "dataset=eurosat,seed=1"


def _digests(folder) -> dict:
  """{relative path: sha256} of every file under `folder` (not the lock's
  record of its last holder)."""
  out = {}
  for dirpath, _, files in os.walk(folder):
    for f in files:
      if f == workdir.LOCK_FILE:
        continue
      path = os.path.join(dirpath, f)
      with open(path, "rb") as fh:
        out[os.path.relpath(path, folder)] = hashlib.sha256(
          fh.read()
        ).hexdigest()
  return out


def _config(assets, arg=SEED1, **extra):
  return tl.make_config(arg, assets, **extra)


# ---------------------------------------------------------------------------
# 1. Run identity
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
  "changes, keys",
  [
    ({"meta__mode": "plain"}, ["config.meta.mode"]),
    ({"data__num_shots": 2}, ["config.data.num_shots", "data.train_items"]),
    ({"optim__lr": 0.05}, ["config.optim.lr"]),
  ],
  ids=["method", "shots", "lr"],
)
def test_rerun_with_another_config_is_refused(e2e, assets, changes, keys):
  wd = e2e[0]
  before = _digests(wd)
  config = tl.make_config(tl.E2E_ARG, assets, **changes)
  with pytest.raises(errors.RunMismatch) as info:
    train.train_and_evaluate(config, str(wd))
  msg = str(info.value)
  for seed in (1, 2):
    assert f"{wd / 'eurosat' / f'seed{seed}'} holds a run of another" in msg
  for key in keys:
    assert f"  {key}: " in msg
  assert "--archive_old_runs" in msg and "another --workdir" in msg
  assert _digests(wd) == before  # nothing was written, nothing reused


def test_rerun_refusal_at_the_command_line(e2e, assets):
  values = dict(tl.overrides(assets), **{"optim.lr": 0.05})
  proc = tl.run(
    tl.launch_cmd(tl.E2E_ARG, e2e[0], values), tl.env(assets), timeout=300
  )
  assert proc.returncode == 1, tl.tail(proc)
  assert "config.optim.lr: 0.0025 (saved) vs 0.05 (now)" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_same_config_reuses_the_finished_runs(e2e, assets):
  wd = e2e[0]
  before = _digests(wd)
  out = train.train_and_evaluate(_config(assets, tl.E2E_ARG), str(wd))
  for s, seed in zip(out["runs"], (1, 2)):
    with open(wd / "eurosat" / f"seed{seed}" / "summary.json") as f:
      assert s == json.load(f)
  after = _digests(wd)
  # Only the sweep's own files are written again, with the same content.
  assert after == before


def test_identity_ignores_what_cannot_change_the_result(assets, tmp_path):
  config = _config(assets)
  other = _config(
    assets,
    log_every=5,
    progress_bar=True,
    eval__batch_size=3,
    checkpoint__every_steps=1,
    mesh__num_devices=1,
    data__root=str(tmp_path / "moved"),
  )
  shutil.copytree(assets["data"], tmp_path / "moved")

  def ident(c):
    cache = protocol.DataCache(c)
    train.preflight(c, cache)
    clip = clip_lib.load(c.model.name)
    (ident,) = train._run_identities(c, cache, clip, "wd").values()
    return ident

  a, b = ident(config), ident(other)
  assert identity.differences(a, b) == {}
  assert a["run.seed"] == 1 and a["config.optim.lr"] == 0.0025
  assert {"data.train_items", "data.eval_items.new"} <= set(a)
  assert "clip.model.safetensors" in a and "package.version" in a
  # A change of the weights' bytes is a change of identity.
  moved = tmp_path / "clip"
  shutil.copytree(assets["clip"], moved)
  with open(moved / "model.safetensors", "r+b") as f:
    f.seek(-4, 2)
    f.write(b"\0\0\0\1")
  c = _config(assets, model__name=str(moved))
  assert list(identity.differences(a, ident(c))) == ["clip.model.safetensors"]


def test_archive_moves_the_old_run_aside(e2e, assets, tmp_path):
  wd = tmp_path / "wd"
  shutil.copytree(e2e[0] / "eurosat" / "seed1", wd / "eurosat" / "seed1")
  old = _digests(wd / "eurosat" / "seed1")
  config = _config(assets)
  config.model.learner = "zeroshot"  # evaluation only: no training to wait for
  with pytest.raises(errors.RunMismatch):
    train.train_and_evaluate(config, str(wd))
  out = train.train_and_evaluate(config, str(wd), archive_old_runs=True)
  assert out["runs"][0]["method"] == "zero-shot CLIP"
  (archived,) = [p for p in os.listdir(wd / "eurosat") if "archived" in p]
  assert _digests(wd / "eurosat" / archived) == old
  assert not (wd / "eurosat" / "seed1" / "checkpoints").exists()


def test_a_folder_without_run_json_is_not_adopted(e2e, assets, tmp_path):
  wd = tmp_path / "wd"
  shutil.copytree(e2e[0] / "eurosat" / "seed1", wd / "eurosat" / "seed1")
  os.remove(wd / "eurosat" / "seed1" / "run.json")
  with pytest.raises(errors.RunMismatch, match="no run.json"):
    train.train_and_evaluate(_config(assets), str(wd))


# ---------------------------------------------------------------------------
# 2. One writer per workdir
# ---------------------------------------------------------------------------


def test_two_runs_into_one_workdir_one_is_refused(assets, tmp_path):
  wd = tmp_path / "wd"
  env = tl.env(assets)
  lrs = (0.001, 0.002)
  procs = [
    subprocess.Popen(
      tl.launch_cmd(SEED1, wd, dict(tl.overrides(assets), **{"optim.lr": lr})),
      cwd=tl.REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for lr in lrs
  ]
  outs = [p.communicate(timeout=600) for p in procs]
  codes = [p.returncode for p in procs]
  assert sorted(codes) == [0, 1], [o[1][-2000:] for o in outs]
  loser = codes.index(1)
  winner = 1 - loser
  err = outs[loser][1]
  assert (
    f"{wd} is in use by another run (PID {procs[winner].pid} on host" in err
  )
  # The winner's results are its own, complete and unmixed.
  with open(wd / "config.json") as f:
    assert json.load(f)["optim"]["lr"] == lrs[winner]
  run_dir = wd / "eurosat" / "seed1"
  with open(run_dir / "run.json") as f:
    assert json.load(f)["identity"]["config.optim.lr"] == lrs[winner]
  assert (run_dir / "summary.json").is_file()
  events = os.listdir(run_dir / "tensorboard")  # ...<host>.<pid>.<n>.v2
  pids = {re.search(r"\.(\d+)\.\d+\.v2$", e).group(1) for e in events}
  assert events and pids == {str(procs[winner].pid)}


def test_lock_is_released_by_a_dead_holder(tmp_path):
  wd = str(tmp_path / "wd")
  proc = subprocess.run(
    [
      sys.executable,
      "-c",
      "import os, signal, sys; from prometar_jax import workdir\n"
      "with workdir.hold(sys.argv[1]):\n"
      "  print(os.getpid(), flush=True)\n"
      "  os.kill(os.getpid(), signal.SIGKILL)",
      wd,
    ],
    capture_output=True,
    text=True,
  )
  assert proc.returncode == -9, proc.stderr
  with open(os.path.join(wd, workdir.LOCK_FILE)) as f:
    # The file stays (it names the last holder); the lock went with it.
    assert json.load(f)["pid"] == int(proc.stdout)
  with workdir.hold(wd):
    with pytest.raises(errors.WorkdirLocked, match=f"PID {os.getpid()}"):
      # A second holder (another open file: as another process would).
      with workdir.hold(wd):
        pass


def test_refused_run_leaves_no_new_workdir(assets, tmp_path):
  config = _config(assets)
  wd = tmp_path / "wd"
  with pytest.raises(NotADirectoryError, match="is a file"):
    (tmp_path / "file").write_text("x")
    train.train_and_evaluate(config, str(tmp_path / "file"))
  config.data.verify_images = True
  bad = tmp_path / "data"
  shutil.copytree(assets["data"], bad)
  config.data.root = str(bad)
  split = protocol.DataCache(config).split("eurosat", 1, "new")
  with open(split["test"][0][0], "wb") as f:
    f.write(b"not an image")
  with pytest.raises(ImageReadError):
    train.train_and_evaluate(config, str(wd))
  assert not wd.exists()


# ---------------------------------------------------------------------------
# 4. Divergence
# ---------------------------------------------------------------------------


def test_guard_bounds_by_hand():
  where = lambda s: f"at {s}"  # noqa: E731
  g = guard.Guard(guard.Bounds(100.0, 1e4), initial_norm=2.0, where=where)
  state = run_lib.meta_step.TrainState(
    step=np.int32(0),
    steps_per_epoch=np.int32(3),
    prompts={"text": np.full((2, 2), 100.0, np.float32)},  # norm 200
    gradnet={},
    opt_prompts={},
    opt_gradnet={},
    rng=jax.random.key(0),
  )
  assert g.check_state(3, state) == pytest.approx(100.0)
  state = state.replace(prompts={"text": np.full((2, 2), 100.5, np.float32)})
  with pytest.raises(errors.TrainingDiverged, match=r"100.5x its initial 2"):
    g.check_state(3, state)
  with pytest.raises(errors.TrainingDiverged, match=r"step 5 \(at 4\).*1e\+05"):
    g.check_metrics([(3, {"loss_ce": 1.0}), (4, {"loss_ce": 1e5})])
  with pytest.raises(errors.TrainingDiverged, match="non-finite grad_norm"):
    g.check_metrics([(0, {"grad_norm": np.float32("inf")})])
  g.check_metrics([(0, {"loss_ce": 1e4, "grad_norm": 1e9})])  # at the bound


def test_finite_blow_up_stops_and_keeps_a_sane_checkpoint(assets, tmp_path):
  # IVLP (no ProMetaR) at lr 1e6 from epoch 2: the prompts explode to
  # finite values with a zero gradient; only the guard stops it.
  wd = tmp_path / "wd"
  values = dict(tl.overrides(assets), **{"optim.lr": 1e6, "meta.mode": "plain"})
  proc = tl.run(tl.launch_cmd(SEED1, wd, values), tl.env(assets))
  assert proc.returncode == 1, tl.tail(proc)
  assert "training diverged at step 4 (epoch 2/2, batch 1/3)" in proc.stderr
  assert "max_prompt_norm_ratio" in proc.stderr
  assert "the last checkpoint that passed the checks is step 3" in proc.stderr
  assert "Traceback" not in proc.stderr
  run_dir = wd / "eurosat" / "seed1"
  assert os.listdir(run_dir / "checkpoints") == ["3"]
  assert not (run_dir / "summary.json").exists()
  assert not (run_dir / "prompts.npz").exists()
  # The kept state: finite, its prompts near their initial norm.
  config = _config(assets, meta__mode="plain")
  spec = train.check_config(config)
  mesh = sharding.make_mesh(1)
  clip = train.load_clip(config, mesh)
  init = run_lib._init_fn(spec, mesh)(clip, np.int32(1), np.int32(3))
  ckpt = checkpoint.Checkpointer(str(run_dir / "checkpoints"))
  state, meta = ckpt.restore(init)
  ckpt.close()
  assert meta["step"] == 3
  leaves = jax.tree.leaves(jax.device_get(state.prompts))
  assert all(np.all(np.isfinite(x)) for x in leaves)
  ratio = float(guard.global_norm(state.prompts)) / float(
    guard.global_norm(init.prompts)
  )
  assert 0.9 < ratio < 1.1  # warm-up lr 1e-5: barely moved


# ---------------------------------------------------------------------------
# 5. Images checked before training; evaluation never loses training
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("decode_max", [20000, 0], ids=["decode", "header"])
def test_corrupt_images_fail_before_the_first_step(
  assets, tmp_path, decode_max
):
  root = tmp_path / "data"
  shutil.copytree(assets["data"], root)
  config = _config(
    assets, data__root=str(root), data__verify_decode_max=decode_max
  )
  cache = protocol.DataCache(config)
  test_img = cache.split("eurosat", 1, "new")["test"][1][0]
  train_img = cache.split("eurosat", 1, "base")["train"][2][0]
  with open(test_img, "wb") as f:
    f.write(b"GIF89a garbage")  # not an image at all
  with open(train_img, "r+b") as f:
    f.truncate(os.path.getsize(train_img) // 2)  # a cut-off JPEG
  wd = tmp_path / "wd"
  with pytest.raises(ImageReadError) as info:
    train.train_and_evaluate(config, str(wd))
  msg = str(info.value)
  assert "2 image(s)" in msg and test_img in msg and train_img in msg
  assert not wd.exists()


def test_header_check_by_hand(tmp_path):
  from PIL import Image

  jpg, png = tmp_path / "a.jpg", tmp_path / "b.png"
  Image.new("RGB", (40, 30), (200, 10, 10)).save(jpg)
  Image.new("RGB", (40, 30), (10, 200, 10)).save(png)
  assert verify.header_problem(str(jpg)) == verify.HEADER_OK
  assert verify.header_problem(str(png)) == verify.HEADER_OK
  for path, reason in ((jpg, "truncated JPEG"), (png, "truncated PNG")):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])
    assert verify.header_problem(str(path)).startswith(reason)
  (tmp_path / "c.jpg").write_bytes(b"")
  assert verify.header_problem(str(tmp_path / "c.jpg")) == "empty file"
  (tmp_path / "d.jpg").write_bytes(b"BM not a jpeg")
  assert verify.header_problem(str(tmp_path / "d.jpg")) is None  # decode it
  with pytest.raises(ImageReadError, match="d.jpg"):
    verify.check_images([], [str(tmp_path / "d.jpg")])
  good = tmp_path / "e.jpg"
  Image.new("RGB", (40, 30)).save(good)
  out = verify.check_images([], [str(good), str(good)])
  assert out == {"decoded": 0, "header_checked": 1}


def test_evaluation_failure_keeps_the_training(
  e2e, assets, tmp_path, monkeypatch
):
  """Prompts and the training record are saved before any evaluation."""
  wd = tmp_path / "wd"
  config = _config(assets, optim__epochs=0)  # nothing to train: no compile

  def broken_disk(*args, **kwargs):
    raise OSError(errno.EIO, "Input/output error", "a test image")

  monkeypatch.setattr(run_lib.evaluate, "evaluate", broken_disk)
  with pytest.raises(OSError):
    train.train_and_evaluate(config, str(wd))
  run_dir = wd / "eurosat" / "seed1"
  assert (run_dir / "prompts.npz").is_file()
  assert (run_dir / "training.json").is_file()
  assert not (run_dir / "summary.json").exists()
  monkeypatch.undo()
  # A run whose training ended is evaluated, not trained again: here the
  # e2e run's trained prompts, without its summary and checkpoints.
  wd = tmp_path / "wd2"
  src = e2e[0] / "eurosat" / "seed1"
  for f in ("run.json", "prompts.npz", "training.json"):
    (wd / "eurosat" / "seed1").mkdir(parents=True, exist_ok=True)
    shutil.copy(src / f, wd / "eurosat" / "seed1" / f)

  def no_training(*args, **kwargs):
    raise AssertionError("trained again")

  monkeypatch.setattr(run_lib, "_train", no_training)
  out = train.train_and_evaluate(_config(assets), str(wd))
  with open(src / "summary.json") as f:
    assert out["runs"][0]["accuracy"] == json.load(f)["accuracy"]


# ---------------------------------------------------------------------------
# 6. I/O failures: one clear line, nothing stale, resumable
# ---------------------------------------------------------------------------


def test_atomic_write_leaves_the_old_file_and_no_tmp(tmp_path, monkeypatch):
  path = tmp_path / "summary.json"
  fileio.write_json(str(path), {"a": 1})

  def full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(os, "fsync", full)
  with pytest.raises(OSError, match="No space"):
    fileio.write_json(str(path), {"a": 2})
  assert os.listdir(tmp_path) == ["summary.json"]
  assert json.loads(path.read_text()) == {"a": 1}


def test_damaged_checkpoint_files_are_named(assets, tmp_path):
  folder = tmp_path / "clip"
  shutil.copytree(assets["clip"], folder)
  weights = folder / "model.safetensors"
  with open(weights, "r+b") as f:
    f.truncate(os.path.getsize(weights) // 2)
  with pytest.raises(ValueError, match=f"{weights} cannot be read"):
    clip_lib.load(str(folder))
  shutil.copy(os.path.join(assets["clip"], "model.safetensors"), weights)
  (folder / "config.json").write_text('{"model_type": "clip", ')
  with pytest.raises(ValueError, match=f"{folder / 'config.json'} is not va"):
    clip_lib.load(str(folder))
  # At the command line: one line naming the file, exit code 1.
  values = dict(tl.overrides(assets), **{"model.name": str(folder)})
  proc = tl.run(
    tl.launch_cmd(SEED1, tmp_path / "wd", values), tl.env(assets), timeout=300
  )
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-2]
  assert last.startswith("launch.py: ValueError: ") and "config.json" in last
  assert "Traceback" not in proc.stderr


# Runs launch.py's main with Checkpointer.save wrapped: before the save of
# step `fill_at`, a filler file takes every free byte of the workdir's file
# system (a small tmpfs), so orbax meets a real ENOSPC.
DISK_FULL_SCRIPT = """
import runpy, sys
from prometar_jax import checkpoint
fill_at, filler = int(sys.argv[1]), sys.argv[2]
save = checkpoint.Checkpointer.save
def save_on_a_full_disk(self, step, state, meta):
  if step == fill_at:
    with open(filler, "wb") as f:
      try:
        while True:
          f.write(b"\\0" * 65536)
          f.flush()
      except OSError:
        pass
  return save(self, step, state, meta)
checkpoint.Checkpointer.save = save_on_a_full_disk
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture
def small_disk(tmp_path):
  """A 64 MiB tmpfs (needs root, as CI runs), unmounted afterwards."""
  mnt = tmp_path / "disk"
  mnt.mkdir()
  proc = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
    capture_output=True,
  )
  if proc.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode()[:200]}")
  yield mnt
  subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_during_a_save_is_one_line_then_resumes(assets, small_disk):
  wd = small_disk / "wd"
  filler = small_disk / "filler"
  cmd = tl.launch_cmd(SEED1, wd, tl.overrides(assets))
  proc = tl.run(
    [sys.executable, "-c", DISK_FULL_SCRIPT, "6", str(filler), *cmd[1:]],
    tl.env(assets),
  )
  assert proc.returncode == 1, tl.tail(proc)
  lines = proc.stderr.strip().splitlines()
  assert lines[-2].startswith("launch.py: OSError: "), tl.tail(proc)
  assert "cannot save checkpoint 6" in lines[-2]
  assert "No space left on device" in lines[-2]
  assert "Traceback" not in proc.stderr
  assert not [x for x in lines if "meta_path" in x or "Exception in" in x]
  filler.unlink()
  proc = tl.run(cmd, tl.env(assets))
  assert proc.returncode == 0, tl.tail(proc)
  assert "restored step 3 of 6" in proc.stderr
  run_dir = wd / "eurosat" / "seed1"
  assert sorted(os.listdir(run_dir / "checkpoints")) == ["3", "6"]
  stale = [
    os.path.join(d, f)
    for d, dirs, files in os.walk(wd)
    for f in files + dirs
    if ".tmp" in f
  ]
  assert not stale
