"""The official one-step reference kept in tests/data/reference (README.md).

The checkpoint is stored pruned: the token-embedding table holds only the
rows that the reference's token ids use. `rebuild_hf_folder` writes a full
Hugging Face folder again (config.json + model.safetensors, the original
names, dtypes and shapes; zeros in the unused vocabulary rows), which is what
the loaders read.
"""

import json
import os
import pathlib
import shutil

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

REFERENCE_DIR = pathlib.Path(__file__).resolve().parent / "data" / "reference"
NPZ_PATH = REFERENCE_DIR / "tiny_reference.npz"
JSON_PATH = REFERENCE_DIR / "tiny_reference.json"
PRUNED_DIR = REFERENCE_DIR / "tiny_hf_pruned"
ROWS = "pruned.token_embedding.rows"
IDS = "pruned.token_embedding.ids"


def pruned_tensors():
  """(tensors, info) of the pruned safetensors file, as stored.

  info: the replaced tensor's name ("tensor"), "shape" and "dtype", and the
  original file's safetensors "metadata".
  """
  path = str(PRUNED_DIR / "model_pruned.safetensors")
  with safe_open(path, "np") as f:
    info = json.loads(f.metadata()["pruned"])
  return load_file(path), info


def rebuild_hf_folder(folder, fill=None):
  """Writes a full HF CLIP folder in `folder`; returns it as a str.

  fill: optional function (shape, dtype) -> array for the unused rows of the
  token-embedding table (zeros by default); the rows in use are always the
  original ones.
  """
  tensors, info = pruned_tensors()
  ids, rows = tensors.pop(IDS), tensors.pop(ROWS)
  shape, dtype = tuple(info["shape"]), np.dtype(info["dtype"])
  table = np.zeros(shape, dtype) if fill is None else fill(shape, dtype)
  table[ids] = rows
  tensors[info["tensor"]] = table
  os.makedirs(folder, exist_ok=True)
  save_file(
    tensors, os.path.join(folder, "model.safetensors"), info["metadata"]
  )
  shutil.copyfile(
    PRUNED_DIR / "config.json", os.path.join(folder, "config.json")
  )
  return str(folder)


def used_token_ids():
  """The row indices stored in the pruned file."""
  tensors, _ = pruned_tensors()
  return tensors[IDS]
