"""Config files: argument parsing, locking, protocols, variants, docstrings."""

import dataclasses
import importlib
import json
import os
import pathlib
import subprocess
import sys

import pytest
import train_testlib  # noqa: F401  (puts the repo root on sys.path)
from absl import flags
from ml_collections import config_flags

from configs import common
from prometar_jax import meta_step, schedules, train
from prometar_jax import prompt_learners as pl

CONFIGS = ("base2new", "domain_generalization", "cross_dataset", "variants")
CONFIG_DIR = pathlib.Path(train_testlib.REPO) / "configs"


def get(name, arg=None):
  return importlib.import_module(f"configs.{name}").get_config(arg)


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_are_valid_and_documented(name):
  config = get(name)
  train.check_config(config)
  doc = importlib.import_module(f"configs.{name}").__doc__
  assert "python launch.py" in doc and f"configs/{name}.py" in doc
  assert "Expected" in doc


def test_base2new_has_the_released_hyper_parameters():
  c = get("base2new")
  assert c.model.name == "openai/clip-vit-base-patch16"
  assert (c.data.num_shots, c.data.batch_size, c.optim.epochs) == (16, 4, 10)
  assert (c.optim.lr, c.optim.warmup_epochs, c.optim.warmup_lr) == (
    0.0025,
    1,
    1e-5,
  )
  assert c.optim.schedule == "cosine"
  p = c.prompt
  assert c.model.learner == "ivlp" and (p.depth_text, p.depth_vision) == (9, 9)
  assert (p.n_ctx_text, p.n_ctx_vision) == (4, 4)
  assert c.meta.plain_step and c.meta.lr_ratio == 5e-4
  assert (c.optim_gradnet.lr, c.optim_gradnet.schedule) == (1e-6, "constant")
  assert (
    "84.39 / 76.93 / 80.49"
    in importlib.import_module("configs.base2new").__doc__
  )


def test_every_step_field_is_a_config_key():
  # No hidden defaults: each PromptConfig / MetaConfig field has a key.
  c = common.get_base_config()
  # The learner's name is config.model.learner; the rest of PromptConfig
  # is config.prompt.
  prompt_fields = {f.name for f in dataclasses.fields(pl.PromptConfig)}
  assert prompt_fields == set(c.prompt) | {"kind"}
  meta_fields = {f.name for f in dataclasses.fields(meta_step.MetaConfig)}
  assert meta_fields == set(c.meta)
  # The gradnet's schedule spans the run: its epochs are config.optim's.
  optim_fields = {f.name for f in dataclasses.fields(schedules.Optimizer)}
  assert optim_fields == set(c.optim) == set(c.optim_gradnet) | {"epochs"}
  spec = train.step_spec(c)
  assert spec.optim == schedules.Optimizer(**c.optim)
  assert spec.optim_gradnet.epochs == c.optim.epochs


def test_parse_arg_types_tuples_and_flags():
  a = common.parse_arg(
    "dataset=eurosat,dtd,seeds=1,2,3,shots=4,runlocal",
    dataset=("eurosat",),
    seeds=(1,),
    shots=16,
    runlocal=False,
    behaviour="released",
  )
  assert a.dataset == ("eurosat", "dtd")
  assert a.seeds == (1, 2, 3)
  assert a.shots == 4 and a.runlocal is True
  assert a.behaviour == "released"
  with pytest.raises(ValueError, match="unknown config argument 'shot'"):
    common.parse_arg("shot=4", shots=16)
  with pytest.raises(ValueError, match="expected int"):
    common.parse_arg("shots=four", shots=16)
  with pytest.raises(ValueError, match="true/false"):
    common.parse_arg("runlocal=maybe", runlocal=False)


def test_sweeps_and_seeds():
  c = get("base2new", "dataset=all,seeds=1,2,3")
  assert c.data.datasets == common.BASE2NEW_DATASETS
  assert len(c.data.datasets) == 11 and c.seeds == (1, 2, 3)
  assert get("base2new", "dataset=dtd,seed=2").seeds == (2,)
  assert get("base2new").seeds == (1,)


def test_protocol_configs():
  dg = get("domain_generalization", "seeds=1,2")
  assert dg.protocol == "domain_generalization"
  assert dg.data.datasets == ("imagenet",)
  assert dg.eval.targets == common.DOMAIN_GENERALIZATION_TARGETS
  cross = get("cross_dataset")
  assert len(cross.eval.targets) == 10 and "imagenet" not in cross.eval.targets
  sets = train.eval_sets(get("base2new", "dataset=dtd"), "dtd")
  assert [(s.name, s.subsample) for s in sets] == [
    ("base", "base"),
    ("new", "new"),
  ]
  assert train.train_subsample(dg) == "all"


def test_behaviour_paper_and_runlocal():
  c = get("base2new", "behaviour=paper,runlocal")
  assert not c.meta.plain_step and c.meta.lr_ratio == 1.0
  assert (c.optim_gradnet.lr, c.optim_gradnet.schedule) == (2.5e-4, "cosine")
  assert c.optim.epochs == 1 and c.eval.max_examples > 0
  with pytest.raises(ValueError, match="behaviour"):
    get("base2new", "behaviour=mine")


@pytest.mark.parametrize("method", pl.names())
@pytest.mark.parametrize("prometar", [True, False])
def test_variants(method, prometar):
  c = get("variants", f"method={method},prometar={prometar},dataset=dtd")
  spec = train.check_config(c)
  assert spec.prompt.kind == method
  assert spec.meta.mode == ("prometar" if prometar else "plain")
  assert c.data.datasets == ("dtd",)


def test_variants_on_other_protocols():
  c = get("variants", "method=coop,protocol=cross_dataset,seeds=1,2")
  assert c.protocol == "cross_dataset" and c.model.learner == "coop"
  assert c.seeds == (1, 2)
  with pytest.raises(ValueError, match="protocol"):
    get("variants", "protocol=fewshot")


def _parse(argv):
  # config_flags registers the --config.* overrides it finds in argv.
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, "", fv, lock_config=True, sys_argv=argv
  )
  fv(argv)
  return fv.config


def test_command_line_overrides_are_locked():
  path = CONFIG_DIR / "base2new.py"
  config = _parse(
    [
      "prog",
      f"--config={path}:dataset=dtd",
      "--config.optim.lr=0.002",
      "--config.seeds=(1,2)",
    ]
  )
  assert config.optim.lr == 0.002 and config.seeds == (1, 2)
  assert config.data.datasets == ("dtd",)
  with pytest.raises(Exception, match="lrr"):
    _parse(["prog", f"--config={path}", "--config.optim.lrr=0.002"])


def test_check_config_rejects_bad_values():
  c = get("base2new")
  c.protocol = "fewshot"
  with pytest.raises(ValueError, match="protocol"):
    train.check_config(c)
  c = get("base2new", "dataset=imagenet_a")
  with pytest.raises(ValueError, match="test-only"):
    train.check_config(c)
  c = get("base2new", "dataset=mnist")
  with pytest.raises(ValueError, match="Unknown dataset"):
    train.check_config(c)
  c = get("base2new")
  c.meta.mode = "maml"
  with pytest.raises(ValueError, match="mode"):
    train.check_config(c)


ECHO_DRIVER = """
import json
def main(config, workdir, *, eval_only, archive_old_runs):
  print(json.dumps([config.protocol, workdir, eval_only, archive_old_runs]))
"""
ECHO_CONFIG = """
from configs import base2new
def get_config(arg=None):
  config = base2new.get_config(arg)
  config.driver = "echo_driver:main"
  return config
"""


def test_launch_calls_the_driver_a_config_names(tmp_path):
  # launch.py has no case per config: a config may name the function that
  # runs it ("module:function"; configs/demo.py does), else the training
  # system runs it.
  (tmp_path / "echo_driver.py").write_text(ECHO_DRIVER)
  (tmp_path / "echo.py").write_text(ECHO_CONFIG)
  paths = [str(tmp_path), str(train_testlib.REPO)]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
  cmd = [
    sys.executable,
    str(train_testlib.REPO / "launch.py"),
    f"--config={tmp_path / 'echo.py'}",
    f"--workdir={tmp_path / 'wd'}",
  ]

  def launch(*more):
    return subprocess.run(
      cmd + list(more), capture_output=True, text=True, env=env, timeout=300
    )

  proc = launch("--eval_only")
  assert proc.returncode == 0, proc.stderr[-3000:]
  last = proc.stdout.strip().splitlines()[-1]
  assert json.loads(last) == ["base2new", str(tmp_path / "wd"), True, False]
  proc = launch("--config.driver=echo_driver:absent")
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "launch.py: ValueError: config.driver='echo_driver:absent'" in (
    proc.stderr
  )
