"""The same final prompts on 1 device, 4 devices and 2 processes x 2 devices.

Three runs of the tiny base2new setup (first-order ProMetaR, to keep three
compilations of the step affordable on CI):

* one process with 4 CPU devices: a run on a 1-device mesh, then a run on
  all 4 (batch of 4 split 1 per device, 3 base classes padded to 4 and
  split along the same axis), then a look at the compiled step: the text
  tower runs on one class per device;
* two processes with 2 CPU devices each, joined by jax.distributed on
  127.0.0.1 (`launch.py --distributed`); each process feeds its 2 images.

Measured on CPU: the prompts agree to ~4e-8 (the tolerance is 1e-5).
"""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import train_testlib as tl

ARG = "dataset=eurosat,seed=1"
FIRST_ORDER = {"meta__first_order": True}

# Runs the tiny config on a 1-device mesh and on all devices, then checks
# the compiled step's text-tower shapes: a quarter of the stacked text rows
# per device ([ceil(R / 4), width]), never all R of them.
DEVICES_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import jax, numpy as np
import train_testlib
from prometar_jax import data, features, meta_step, sharding, train
from prometar_jax import prompt_learners as pl
from prometar_jax import run as run_lib
assets, extra = json.loads(sys.argv[1]), json.loads(sys.argv[2])
out = sys.argv[3]
assert jax.device_count() == 4, jax.devices()
for n in (1, -1):
  config = train_testlib.make_config(
    {arg!r}, assets, mesh__num_devices=n, **extra
  )
  train.train_and_evaluate(config, f"{{out}}/devices{{n}}")
mesh = sharding.make_mesh(-1)
spec = train.check_config(config)
clip = train.load_clip(config, mesh)
split = data.fewshot_split("eurosat", assets["data"], 4, 1, "base")
feats = features.class_features(spec, clip, split["classnames"], mesh, True)
state = run_lib._init_fn(spec, mesh)(clip, np.int32(1), np.int32(3))
layout = sharding.batch_layout(4, mesh)
batch = {{
  "image": np.zeros((4, 32, 32, 3), np.float32),
  "label": np.arange(4, dtype=np.int32) % 3,
}}
batch = {{k: jax.device_put(v, layout.sharding) for k, v in batch.items()}}
step = run_lib.sharded_train_step(spec, mesh, True, layout.sharded)
hlo = step.lower(state, meta_step.Frozen(clip, feats), batch)
hlo = hlo.compile().as_text()
# The prompted tower's carry: the shared prefix rows, then every class's
# own rows, stacked (models/clip.py, PrefixEncoder).
c, length = feats["token_ids"].shape
p = pl.shared_prompt_rows(spec.prompt)
rows = p + c * (length - p)
width = clip.config.text.width
print("SHAPES", json.dumps({{
  "per_device": hlo.count(f"f32[{{-(-rows // 4)}},{{width}}]"),
  "whole": hlo.count(f"f32[{{rows}},{{width}}]"),
  "unpadded": hlo.count(f"f32[{{p + 3 * (length - p)}},{{width}}]"),
}}))
"""


@pytest.fixture(scope="module")
def single_process(assets, tmp_path_factory):
  out = tmp_path_factory.mktemp("single")
  script = DEVICES_SCRIPT.format(tests=str(tl.REPO / "tests"), arg=ARG)
  proc = tl.run(
    [sys.executable, "-c", script, json.dumps(assets), json.dumps(FIRST_ORDER)]
    + [str(out)],
    tl.env(assets, devices=4),
  )
  assert proc.returncode == 0, tl.tail(proc)
  shapes = json.loads(proc.stdout.split("SHAPES", 1)[1])
  return out, shapes


@pytest.fixture(scope="module")
def two_processes(assets, tmp_path_factory):
  out = tmp_path_factory.mktemp("multi")
  workdir = out / "wd"
  port = tl.free_port()
  values = tl.overrides(assets, **FIRST_ORDER)
  logs = [out / f"process{i}.log" for i in range(2)]
  procs = []
  for i in range(2):
    cmd = tl.launch_cmd(ARG, workdir, values) + [
      "--distributed",
      f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2",
      f"--process_id={i}",
    ]
    with open(logs[i], "w") as log:
      procs.append(
        subprocess.Popen(
          cmd,
          cwd=tl.REPO,
          env=tl.env(assets, devices=2),
          stdout=log,
          stderr=subprocess.STDOUT,
        )
      )
  deadline = time.monotonic() + 600
  try:
    # One failing process would leave the other waiting for it: stop both.
    while any(p.poll() is None for p in procs):
      failed = any(p.poll() not in (None, 0) for p in procs)
      if failed or time.monotonic() > deadline:
        break
      time.sleep(0.5)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  texts = [path.read_text() for path in logs]
  for p, text in zip(procs, texts):
    assert p.returncode == 0, text[-3000:]
  return workdir, texts


def _prompts(run_dir):
  with np.load(run_dir / "eurosat" / "seed1" / "prompts.npz") as z:
    return {k: z[k] for k in z.files}


def _accuracy(run_dir):
  with open(run_dir / "eurosat" / "seed1" / "summary.json") as f:
    return json.load(f)


def test_same_prompts_on_1_and_4_devices_and_2_processes(
  single_process, two_processes
):
  out, _ = single_process
  runs = {
    "1 device": out / "devices1",
    "4 devices": out / "devices-1",
    "2 processes x 2": two_processes[0],
  }
  prompts = {name: _prompts(d) for name, d in runs.items()}
  ref = prompts["1 device"]
  for name, p in prompts.items():
    assert sorted(p) == sorted(ref)
    for k in ref:
      np.testing.assert_allclose(p[k], ref[k], rtol=0, atol=1e-5, err_msg=name)
  summaries = {name: _accuracy(d) for name, d in runs.items()}
  assert summaries["4 devices"]["devices"] == 4
  assert summaries["2 processes x 2"]["processes"] == 2
  accs = {name: s["accuracy"] for name, s in summaries.items()}
  assert len({json.dumps(a, sort_keys=True) for a in accs.values()}) == 1, accs


def test_text_tower_is_split_over_classes(single_process):
  _, shapes = single_process
  # 3 base classes padded to 4: the text tower's rows are split over the 4
  # devices (its matmuls on a quarter of them), never all on each.
  assert shapes["per_device"] > 0
  assert shapes["whole"] == 0 and shapes["unpadded"] == 0


def test_only_process_0_reports(two_processes):
  workdir, logs = two_processes
  assert "| EuroSAT |" in logs[0]
  assert "| EuroSAT |" not in logs[1]
  assert (workdir / "results.md").is_file()
