"""Writes the pruned copy of the reference checkpoint kept in this folder.

Usage (from the repository root):

  python tests/data/reference/make_pruned.py FULL_HF_FOLDER [OUT_FOLDER]

FULL_HF_FOLDER is the original `tiny_hf/` (config.json + model.safetensors);
OUT_FOLDER defaults to tests/data/reference/tiny_hf_pruned. The token ids
are read from tiny_reference.npz beside this script.

The output holds config.json (copied) and model_pruned.safetensors: every
tensor of model.safetensors unchanged, except the token-embedding table,
which is replaced by the rows that the reference's token ids use
(`pruned.token_embedding.rows`) and their indices
(`pruned.token_embedding.ids`). The file's metadata entry "pruned" names
the replaced tensor, its shape and dtype, and the original metadata, so that
tests/reference_data.py can rebuild a full folder (zeros in the unused rows).
"""

import json
import os
import shutil
import sys

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
TABLE = "text_model.embeddings.token_embedding.weight"
ROWS = "pruned.token_embedding.rows"
IDS = "pruned.token_embedding.ids"


def used_token_ids(npz_path: str) -> np.ndarray:
  """Sorted unique ids of every token-id array of the reference npz."""
  with np.load(npz_path) as f:
    keys = [k for k in f.files if "token" in k and f[k].dtype.kind in "iu"]
    return np.unique(np.concatenate([f[k].ravel() for k in keys]))


def main(full: str, out: str) -> None:
  ids = used_token_ids(os.path.join(HERE, "tiny_reference.npz"))
  src = os.path.join(full, "model.safetensors")
  tensors = load_file(src)
  with safe_open(src, "np") as f:
    metadata = f.metadata() or {}
  table = tensors.pop(TABLE)
  tensors[ROWS] = np.ascontiguousarray(table[ids])
  tensors[IDS] = ids.astype(np.int64)
  # One metadata entry: safetensors writes several in random order, and the
  # file should be the same bytes every time it is made.
  pruned = dict(
    tensor=TABLE,
    shape=list(table.shape),
    dtype=str(table.dtype),
    metadata=metadata,
  )
  metadata = {"pruned": json.dumps(pruned, sort_keys=True)}
  os.makedirs(out, exist_ok=True)
  save_file(tensors, os.path.join(out, "model_pruned.safetensors"), metadata)
  shutil.copyfile(
    os.path.join(full, "config.json"), os.path.join(out, "config.json")
  )
  print(f"{len(ids)} of {table.shape[0]} token-embedding rows kept in {out}")


if __name__ == "__main__":
  if len(sys.argv) not in (2, 3):
    sys.exit(__doc__)
  main(
    sys.argv[1],
    sys.argv[2] if len(sys.argv) == 3 else os.path.join(HERE, "tiny_hf_pruned"),
  )
