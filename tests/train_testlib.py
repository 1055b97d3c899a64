"""Helpers of the training-system tests: tiny assets, configs, subprocesses.

The tests train a tiny random CLIP (the p8_quickgelu shape of conftest, 32x32
images, with the tiny byte-level tokenizer) on a generated CoOp-layout
EuroSAT with 6 classes (3 base, 3 new), 4 shots, batch 4: 3 steps per
epoch, 2 epochs. Runs that need their own device count or a process kill
go through subprocesses (`launch.py` or a short script), which share a
persistent compilation cache and compile with most XLA optimizations off
(the step compiles in ~10 s instead of ~50 s on two CPU cores).
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

from conftest import (
  TINY_CONFIGS,
  VOCAB_SIZE,
  make_hf_clip,
  write_tiny_tokenizer,
)

from prometar_jax.data import synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `configs` is a top-level folder, not installed
  sys.path.insert(0, str(REPO))

NUM_CLASSES = 6  # 3 base + 3 new
SHOTS = 4
EPOCHS = 2
STEPS_PER_EPOCH = 3  # 3 base classes x 4 shots / batch 4
E2E_ARG = "dataset=eurosat,seeds=1,2"  # the conftest `e2e` run


def make_assets(root: pathlib.Path) -> dict:
  """A tiny HF CLIP folder (with tokenizer) and a CoOp data root."""
  clip_dir = root / "clip"
  make_hf_clip(clip_dir, TINY_CONFIGS["p8_quickgelu"], seed=7)
  write_tiny_tokenizer(clip_dir, VOCAB_SIZE - 2, VOCAB_SIZE - 1)
  data_root = root / "data"
  synthetic.make_coop_dataset(
    "eurosat",
    data_root,
    num_classes=NUM_CLASSES,
    per_class=(SHOTS, 1, 3),
    image_size=(36, 44),
  )
  cache = root / "jax_cache"
  cache.mkdir()
  return {"clip": str(clip_dir), "data": str(data_root), "cache": str(cache)}


def overrides(assets: dict, **extra) -> dict:
  """Dotted config overrides that shrink base2new.py to the tiny setup."""
  out = {
    "model.name": assets["clip"],
    "data.root": assets["data"],
    "data.num_shots": SHOTS,
    "data.image_size": 32,
    "prompt.n_ctx_text": 2,
    "prompt.n_ctx_vision": 2,
    "prompt.depth_text": 2,
    "prompt.depth_vision": 2,
    "optim.epochs": EPOCHS,
    "eval.batch_size": 8,
    "log_every": 2,
    "progress_bar": False,
  }
  out.update({k.replace("__", "."): v for k, v in extra.items()})
  return out


def make_config(arg: str, assets: dict, **extra):
  """configs/base2new.py:`arg` with the tiny overrides applied."""
  from configs import base2new

  config = base2new.get_config(arg)
  config.update_from_flattened_dict(overrides(assets, **extra))
  return config


def flag_list(values: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in values.items()]


def env(assets: dict, devices: int = 1) -> dict:
  e = dict(os.environ)
  e.update(
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    JAX_DISABLE_MOST_OPTIMIZATIONS="1",
    JAX_COMPILATION_CACHE_DIR=assets["cache"],
    TF_CPP_MIN_LOG_LEVEL="2",
    PYTHONPATH=os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")]),
  )
  e.pop("JAX_NUM_CPU_DEVICES", None)
  return e


def launch_cmd(arg: str, workdir, values: dict, *more) -> list[str]:
  return [
    sys.executable,
    str(REPO / "launch.py"),
    f"--config={REPO / 'configs' / 'base2new.py'}:{arg}",
    f"--workdir={workdir}",
    *flag_list(values),
    *more,
  ]


def run(cmd, env_vars, timeout=600) -> subprocess.CompletedProcess:
  return subprocess.run(
    cmd,
    cwd=REPO,
    env=env_vars,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def tail(proc, n=3000) -> str:
  return f"rc={proc.returncode}\n{(proc.stdout + proc.stderr)[-n:]}"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# Trains like launch.py, but SIGKILLs itself right after the checkpoint of
# step `kill_step` is committed: a real, unclean process death.
KILL_SCRIPT = """
import json, os, signal, sys
sys.path.insert(0, {tests!r})
import train_testlib
from prometar_jax import train
arg, assets, extra, workdir, kill_step = sys.argv[1:6]
config = train_testlib.make_config(arg, json.loads(assets), **json.loads(extra))
def kill(step, epochs_done):
  if step == int(kill_step):
    os.kill(os.getpid(), signal.SIGKILL)
train.train_and_evaluate(config, workdir, on_checkpoint=kill)
raise SystemExit("not killed")
"""


def run_and_kill(arg, assets, workdir, kill_step, env_vars, **extra):
  script = KILL_SCRIPT.format(tests=str(REPO / "tests"))
  proc = run(
    [
      sys.executable,
      "-c",
      script,
      arg,
      json.dumps(assets),
      json.dumps(extra),
      str(workdir),
      str(kill_step),
    ],
    env_vars,
  )
  return proc, proc.returncode == -signal.SIGKILL
