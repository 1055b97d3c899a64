"""Shared fixtures: tiny random Hugging Face CLIP checkpoints and the reference.

The checkpoints are written with transformers' `CLIPModel.save_pretrained`, so
the loader is tested on the real file format. LayerNorm and bias parameters
are perturbed away from their constant init: constants would hide a wrong
name mapping (ln1 <-> ln2, q <-> k).

The reference (one official ProMetaR step) is kept in tests/data/reference:
see its README.md and tests/reference_data.py.
"""

import contextlib
import json
import os

import numpy as np
import pytest
from reference_data import JSON_PATH, NPZ_PATH, rebuild_hf_folder

# Three shapes that differ in everything the port could get wrong.
TINY_CONFIGS = {
  "p8_quickgelu": dict(
    vision=dict(
      hidden_size=48,
      intermediate_size=96,
      num_attention_heads=2,
      num_hidden_layers=2,
      image_size=32,
      patch_size=8,
      hidden_act="quick_gelu",
    ),
    text=dict(
      hidden_size=32,
      intermediate_size=64,
      num_attention_heads=2,
      num_hidden_layers=3,
      hidden_act="quick_gelu",
    ),
    projection_dim=16,
  ),
  "p16_gelu_4heads": dict(
    vision=dict(
      hidden_size=64,
      intermediate_size=128,
      num_attention_heads=4,
      num_hidden_layers=1,
      image_size=48,
      patch_size=16,
      hidden_act="gelu",
    ),
    text=dict(
      hidden_size=64,
      intermediate_size=256,
      num_attention_heads=4,
      num_hidden_layers=2,
      hidden_act="gelu",
    ),
    projection_dim=24,
  ),
  "p4_legacy_eos": dict(
    vision=dict(
      hidden_size=32,
      intermediate_size=64,
      num_attention_heads=2,
      num_hidden_layers=3,
      image_size=16,
      patch_size=4,
      hidden_act="gelu",
    ),
    text=dict(
      hidden_size=48,
      intermediate_size=96,
      num_attention_heads=3,
      num_hidden_layers=1,
      hidden_act="quick_gelu",
      # The OpenAI hub checkpoints carry the legacy ids: pooling by argmax.
      bos_token_id=0,
      eos_token_id=2,
      pad_token_id=1,
    ),
    projection_dim=8,
  ),
}

VOCAB_SIZE = 1000


@contextlib.contextmanager
def fast_compilation():
  """XLA with most optimizations off (tiny test programs: compile time is
  what costs), restored afterwards."""
  import jax

  before = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)


def make_hf_clip(folder, spec, seed=0):
  """Saves a random, perturbed HF CLIPModel in `folder`; returns the model."""
  import torch
  from transformers import CLIPConfig, CLIPModel

  text = dict(
    vocab_size=VOCAB_SIZE,
    max_position_embeddings=77,
    bos_token_id=VOCAB_SIZE - 2,
    eos_token_id=VOCAB_SIZE - 1,
    pad_token_id=0,
  )
  text.update(spec["text"])
  config = CLIPConfig(
    text_config=text,
    vision_config=spec["vision"],
    projection_dim=spec["projection_dim"],
  )
  torch.manual_seed(seed)
  model = CLIPModel(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name == "logit_scale":
        continue
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(folder)
  return model


def random_token_ids(rng, n, eos_id, vocab=VOCAB_SIZE, length=77):
  """Plausible prompts: SOT, 1..20 tokens, EOT, zero padding."""
  sot = vocab - 2 if eos_id != 2 else 0
  ids = np.zeros((n, length), np.int64)
  for i in range(n):
    k = rng.integers(1, 21)
    ids[i, 0] = sot
    ids[i, 1 : 1 + k] = rng.integers(3, vocab - 3 if eos_id != 2 else 400, k)
    ids[i, 1 + k] = eos_id if eos_id != 2 else vocab - 1
  return ids


@pytest.fixture(scope="session")
def hf_clips(tmp_path_factory):
  """{name: (folder, torch model)} for every tiny config."""
  out = {}
  for i, (name, spec) in enumerate(TINY_CONFIGS.items()):
    folder = tmp_path_factory.mktemp(name)
    out[name] = (str(folder), make_hf_clip(folder, spec, seed=i))
  return out


@pytest.fixture(scope="session")
def tiny_clip_with_tokenizer(tmp_path_factory):
  """A tiny checkpoint folder with tokenizer files (SOT/EOT = 998/999)."""
  folder = tmp_path_factory.mktemp("tiny_tok")
  make_hf_clip(folder, TINY_CONFIGS["p8_quickgelu"], seed=7)
  write_tiny_tokenizer(folder, VOCAB_SIZE - 2, VOCAB_SIZE - 1)
  return str(folder)


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
  """The official one-step reference: (npz dict, json dict, tiny_hf dir).

  tiny_hf is rebuilt from the pruned checkpoint in a temporary folder.
  """
  with np.load(NPZ_PATH) as f:
    arrays = {k: f[k] for k in f.files}
  with open(JSON_PATH) as f:
    meta = json.load(f)
  hf_dir = rebuild_hf_folder(tmp_path_factory.mktemp("tiny_hf"))
  return arrays, meta, hf_dir


def _byte_level_alphabet():
  """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2)."""
  printable = (
    list(range(ord("!"), ord("~") + 1))
    + list(range(ord("\xa1"), ord("\xac") + 1))
    + list(range(ord("\xae"), ord("\xff") + 1))
  )
  chars, extra = [], 0
  for b in range(256):
    if b in printable:
      chars.append(chr(b))
    else:
      chars.append(chr(256 + extra))
      extra += 1
  return chars


def write_tiny_tokenizer(folder, sot_id=512, eot_id=513):
  """A byte-level CLIP BPE with no merges: enough for CLIPTokenizer to load.

  Ids: 256 single bytes, 256 bytes + '</w>', then SOT and EOT (by default
  512 and 513; the tiny checkpoints use VOCAB_SIZE - 2 and VOCAB_SIZE - 1).
  """
  chars = _byte_level_alphabet()
  vocab = {c: i for i, c in enumerate(chars)}
  vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
  vocab["<|startoftext|>"] = sot_id
  vocab["<|endoftext|>"] = eot_id
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n")
  return vocab


# The training-system tests (test_train.py, test_runs.py) share one tiny
# setup and one finished launch.py run (train_testlib.py).


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
  import train_testlib

  return train_testlib.make_assets(tmp_path_factory.mktemp("train_assets"))


@pytest.fixture(scope="session")
def e2e(assets, tmp_path_factory):
  """The reference run: launch.py, base2new, seeds 1 and 2. Read only."""
  import train_testlib as tl

  workdir = tmp_path_factory.mktemp("e2e") / "wd"
  proc = tl.run(
    tl.launch_cmd(tl.E2E_ARG, workdir, tl.overrides(assets)), tl.env(assets)
  )
  assert proc.returncode == 0, tl.tail(proc)
  return workdir, proc
