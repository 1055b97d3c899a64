"""The offline demo: world, tokenizer, HF export, datasets, end to end.

The end-to-end test runs the whole demo at a reduced size: a micro CLIP
pretrained from scratch for two steps (tokenizer, pretraining and export
included), the three datasets rendered with a few images per class, and
the four methods of configs/demo.py for one epoch of two shots; it checks
the combined table's arithmetic against the runs' summaries.
"""

import importlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import train_testlib  # noqa: F401  (puts the repo root on sys.path)
from conftest import fast_compilation
from train_testlib import REPO

from configs import demo as demo_config
from demo import build, pretrain, run, world
from demo import datasets as demo_datasets
from demo import tokenizer as tokenizer_lib
from prometar_jax import results
from prometar_jax.data import datasets as coop_datasets
from prometar_jax.errors import RunMismatch
from prometar_jax.models import clip as clip_lib

# Small enough to compile fast; 3 layers so that depth-3 prompts fit.
MICRO = pretrain.PretrainConfig(
  vision_width=32,
  text_width=32,
  layers=3,
  heads=1,
  projection_dim=16,
  num_merges=150,
  tokenizer_captions=600,
  pool_size=64,
  steps=2,
  batch_size=16,
  warmup_steps=1,
)
SMALL = (4, 1, 6)  # images per class: train, val, test


@pytest.fixture(scope="module")
def micro_clip(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("micro") / "tiny_clip")
  report = pretrain.pretrain(MICRO, folder, progress=False)
  return folder, report


@pytest.fixture
def fast_compile():
  with fast_compilation():
    yield


def test_world_is_a_function_of_the_seed():
  a_img, a_attrs, a_caps = world.sample(3, 6)
  b_img, b_attrs, b_caps = world.sample(3, 6)
  np.testing.assert_array_equal(a_img, b_img)
  assert a_caps == b_caps
  assert a_img.shape == (6, world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
  assert a_img.dtype == np.uint8
  c_img, _, _ = world.sample(4, 6)
  assert not np.array_equal(a_img, c_img)
  for i, text in enumerate(a_caps):
    words = world.attribute_names(a_attrs, i)
    named = [w for w in world.world_words() if f" {w} " in f" {text[:-1]} "]
    # A caption names only attributes of its own object.
    assert set(named) <= set(words.values()) | {"shape"}, (text, words)


def test_every_class_name_is_a_caption_phrase():
  # Zero-shot prompts "a photo of a {class}." must be sentences the text
  # tower has read: a class name is what a caption says of an object when
  # it names exactly the class's attributes.
  rng = np.random.default_rng(0)
  for d in demo_datasets.DEMO_DATASETS:
    assert len(set(d.classnames)) == len(d.classnames) >= 10
    for label, name in enumerate(d.classnames):
      fixed = dict(d.classes[label])
      attrs = world.sample_attributes(rng, 1, fixed)
      obj = {k: int(v[0]) for k, v in attrs.items()}
      assert world.describe(obj, {k: True for k in fixed}) == name
  texts = world.corpus(0, 3000)
  assert any(" red shape" in t for t in texts)
  assert any(" shape on a grass background" in t for t in texts)


def test_tokenizer_is_clip_compatible(tmp_path):
  from transformers import CLIPTokenizer

  merges = tokenizer_lib.train_merges(world.corpus(1, 3000), 400)
  vocab = tokenizer_lib.write_tokenizer(str(tmp_path), merges)
  assert vocab[tokenizer_lib.SOT] == len(vocab) - 2
  assert vocab[tokenizer_lib.EOT] == len(vocab) - 1
  tok = CLIPTokenizer.from_pretrained(str(tmp_path))
  for text in (
    "a photo of a triangle.",
    "A  Blurry photo of the SEMICIRCLE on a brick background!",
    "X X X X striped shape.",
    "a photo of a dog, 42 times",  # words the world never uses
  ):
    ids = tok(text)["input_ids"]
    assert ids[0] == len(vocab) - 2 and ids[-1] == len(vocab) - 1
    assert ids[1:-1] == tokenizer_lib.encode(merges, text)
    assert tok.unk_token_id not in ids[1:-1]
  tokens = tok.convert_ids_to_tokens(tok("a photo of a triangle.")["input_ids"])
  assert tokens[1:-1] == [
    "a</w>",
    "photo</w>",
    "of</w>",
    "a</w>",
    "triangle</w>",
    ".</w>",
  ]


def test_hf_state_dict_round_trip():
  from transformers import CLIPModel

  hf_cfg = pretrain.hf_config(MICRO, vocab_size=600)
  cfg = clip_lib.ClipConfig.from_hf(hf_cfg)
  params = jax.device_get(clip_lib.init_params(cfg, jax.random.key(0)))
  state = pretrain.to_hf_state_dict(params, cfg)
  back = clip_lib.convert_hf_state_dict(state, cfg)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  # The same tensor names and shapes as transformers' own CLIPModel.
  theirs = {
    k: tuple(v.shape)
    for k, v in CLIPModel(hf_cfg).state_dict().items()
    if not k.endswith("position_ids")
  }
  assert {k: v.shape for k, v in state.items()} == theirs


def test_pretrained_folder_is_a_transformers_checkpoint(micro_clip):
  import torch
  from transformers import CLIPModel

  folder, report = micro_clip
  assert report["steps"] == MICRO.steps and np.isfinite(report["final_loss"])
  ours = clip_lib.load(folder)
  theirs = CLIPModel.from_pretrained(folder).eval()
  images, _, texts = world.sample(9, 4)
  pixels = pretrain.normalize_pixels(images)
  ids = ours.tokenize(texts)
  with torch.no_grad():
    t_img = theirs.get_image_features(
      pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))
    )
    t_txt = theirs.get_text_features(input_ids=torch.from_numpy(ids).long())
  t_img = getattr(t_img, "pooler_output", t_img)
  t_txt = getattr(t_txt, "pooler_output", t_txt)
  np.testing.assert_allclose(
    ours.encode_image(pixels), t_img.numpy(), rtol=1e-4, atol=1e-4
  )
  np.testing.assert_allclose(
    ours.encode_text(ids), t_txt.numpy(), rtol=1e-4, atol=1e-4
  )


def test_datasets_are_read_by_the_coop_readers(tmp_path):
  root = str(tmp_path)
  demo_datasets.write_all(root, SMALL, progress=False)
  assert demo_datasets.is_built(root, SMALL)
  stamp = os.path.getmtime(os.path.join(root, demo_datasets.MANIFEST))
  demo_datasets.write_all(root, SMALL, progress=False)  # a no-op
  assert os.path.getmtime(os.path.join(root, demo_datasets.MANIFEST)) == stamp
  assert not demo_datasets.is_built(root, (5, 1, 6))
  for d in demo_datasets.DEMO_DATASETS:
    n = len(d.classnames)
    full = coop_datasets.read_splits(
      d.coop_name, coop_datasets.dataset_dir(d.coop_name, root)
    )
    assert [len(full[k]) for k in ("train", "val", "test")] == [
      n * s for s in SMALL
    ]
    base = coop_datasets.fewshot_split(d.coop_name, root, 2, 1, "base")
    new = coop_datasets.fewshot_split(d.coop_name, root, 2, 1, "new")
    half = (n + 1) // 2
    assert base["classnames"] == list(d.classnames[:half])
    assert new["classnames"] == list(d.classnames[half:])
    assert len(base["train"]) == 2 * half
    assert len(new["test"]) == SMALL[2] * (n - half)


@pytest.mark.skipif(
  not build.has_checkpoint(build.COMMITTED_CHECKPOINT),
  reason="the committed tiny CLIP is not in this checkout",
)
def test_committed_tiny_clip_transfers_zero_shot():
  # The bar: zero-shot accuracy on the new classes of every demo
  # dataset at least twice chance (docs/demo.md has the demo's own test
  # sets; here 20 fresh images per class).
  clip = clip_lib.load(build.COMMITTED_CHECKPOINT)
  assert clip.config.image_size == world.IMAGE_SIZE
  acc = pretrain.zero_shot_accuracy(clip, per_class=20, seed=11)
  assert set(acc) == set(demo_datasets.DEMO_NAMES)
  for name, a in acc.items():
    assert a["new"] >= 2 * a["chance_new"], (name, a)


def test_default_config_is_the_whole_demo():
  # The whole demo names its driver (every method, one table), which
  # launch.py calls; one method asked for is an ordinary config that the
  # training system trains, and so is each method's config of the sweep.
  config = demo_config.get_config()
  assert config.demo.sweep and config.demo.methods == demo_config.METHODS
  assert config.driver == "demo.run:run_and_print" == demo_config.DRIVER
  module, function = config.driver.split(":")
  assert getattr(importlib.import_module(module), function) is run.run_and_print
  one = demo_config.get_config("method=ivlp")
  assert not one.demo.sweep and one.demo.methods == ("ivlp",)
  assert "driver" not in one
  assert one.model.learner == "ivlp" and one.meta.mode == "plain"
  # The recipe reaches every method (docs/demo.md).
  for m in demo_config.METHODS:
    c = demo_config.for_method(config, m)
    assert "driver" not in c
    assert c.optim.lr == demo_config.LR
    assert c.optim.epochs == demo_config.EPOCHS
    assert tuple(c.data.crop_scale) == demo_config.CROP_SCALE
    if m in ("ivlp", "prometar"):
      assert c.prompt.n_ctx_vision == demo_config.N_CTX_VISION


def test_demo_end_to_end_quick(micro_clip, tmp_path, fast_compile):
  cache = str(tmp_path / "cache")
  config = demo_config.get_config(f"quick,seeds=1,cache={cache}")
  assert config.demo.methods == demo_config.METHODS
  assert config.model.learner == "ivlp" and config.meta.mode == "prometar"
  config.model.name = micro_clip[0]
  config.demo.per_class = SMALL
  config.eval.batch_size = 32
  out = run.run_demo(config, str(tmp_path / "wd"), progress=False)
  table = out["table"]
  assert table["datasets"] == list(demo_datasets.DEMO_NAMES)
  assert len(table["rows"]) == 3 * len(demo_config.METHODS)
  for r in table["rows"]:
    method_runs = out["runs"][r["method"]]
    coop = demo_datasets.get(r["dataset"]).coop_name
    (s,) = [s for s in method_runs if s["dataset"] == coop]
    assert (r["base"], r["new"]) == (
      s["accuracy"]["base"],
      s["accuracy"]["new"],
    )
    assert r["hm"] == pytest.approx(results.harmonic_mean(r["base"], r["new"]))
  for m in demo_config.METHODS:
    rows = [r for r in table["rows"] if r["method"] == m]
    b = np.mean([r["base"] for r in rows])
    n = np.mean([r["new"] for r in rows])
    a = table["average"][m]
    assert (a["base"], a["new"]) == (pytest.approx(b), pytest.approx(n))
    assert a["hm"] == pytest.approx(results.harmonic_mean(b, n))
  # The training system's files, per method, and the combined table.
  for m in demo_config.METHODS:
    assert (tmp_path / "wd" / m / "results.json").is_file()
  text = (tmp_path / "wd" / "results.md").read_text()
  assert "| colours | ProMetaR |" in text and "**Average**" in text
  with open(tmp_path / "wd" / "results.json") as f:
    assert json.load(f)["table"]["rows"] == json.loads(
      json.dumps(table["rows"])
    )
  summary = out["runs"]["prometar"][0]
  assert summary["method"] == "ivlp + ProMetaR"
  assert summary["num_classes"] == {"base": 10, "new": 10}
  # A rerun finds every run done and trains nothing.
  again = run.run_demo(config, str(tmp_path / "wd"), progress=False)
  assert (
    again["table"] == json.loads(json.dumps(table))
    or again["table"]["rows"] == table["rows"]
  )

  # More seeds in the same workdir are welcome (seed 1's runs are reused);
  # another configuration is refused before any work, naming the key.
  def variant(seeds, lr=demo_config.LR):
    c = demo_config.get_config(f"quick,seeds={seeds},cache={cache}")
    c.model.name = micro_clip[0]
    c.demo.per_class = SMALL
    c.eval.batch_size = 32
    c.optim.lr = lr
    return c

  for m, c in run.method_configs(variant("1,2")).items():
    run.check_workdir(str(tmp_path / "wd" / m), c)
  with pytest.raises(RunMismatch, match=r"optim\.lr: 0\.0025 \(saved\)"):
    run.run_demo(variant("1", lr=0.001), str(tmp_path / "wd"), progress=False)


def test_pretraining_is_deterministic(micro_clip, tmp_path):
  folder, _ = micro_clip
  again = str(tmp_path / "again")
  pretrain.pretrain(MICRO, again, progress=False)
  for name in ("model.safetensors", "vocab.json", "merges.txt", "config.json"):
    with open(os.path.join(folder, name), "rb") as a:
      with open(os.path.join(again, name), "rb") as b:
        assert a.read() == b.read(), name


def test_demo_terminal_fits_two_screens(micro_clip, tmp_path):
  # The command a newcomer runs, at the CI size: its whole terminal output
  # (stdout + stderr, as a pipe sees it; a bar redrawn in place is one
  # line) is at most 150 lines: a line per run, the table, no log lines
  # (they go to workdir/demo.log) and no paper column.
  wd = tmp_path / "wd"
  cmd = [
    sys.executable,
    str(REPO / "launch.py"),
    f"--config={REPO / 'configs' / 'demo.py'}:quick,cache={tmp_path}",
    f"--workdir={wd}",
    f"--config.model.name={micro_clip[0]}",
    f"--config.demo.per_class={SMALL}",
    "--config.eval.batch_size=32",
  ]
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  proc = subprocess.run(
    cmd,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env=env,
    timeout=900,
  )
  out = proc.stdout
  assert proc.returncode == 0, out[-3000:]
  assert len(out.split("\n")) <= 150, out
  assert "Paper" not in out and "EuroSAT" not in out
  assert "step 1:" not in out  # quick logs every step, to the log file
  assert "ProMetaR, colours seed 1: step 1:" in (wd / "demo.log").read_text()
  for task in demo_datasets.DEMO_NAMES:
    for label in ("zero-shot CLIP", "coop (plain)", "ivlp (plain)"):
      assert f"{label}, {task} seed 1: base " in out
    assert f"ivlp + ProMetaR, {task} seed 1: base " in out
  assert "| **Average** | ProMetaR |" in out
