"""The pruned reference checkpoint cannot change what the tests compute.

The checkpoint in tests/data/reference keeps only the token-embedding rows
that the reference's token ids use. These tests prove that this is exact:
every token id of the npz has its row, and the values of the other rows do
not reach the features (random values there give bit-identical features).
"""

import dataclasses
import json

import jax
import numpy as np
import pytest
from reference_data import (
  IDS,
  JSON_PATH,
  NPZ_PATH,
  ROWS,
  pruned_tensors,
  rebuild_hf_folder,
  used_token_ids,
)
from safetensors.numpy import load_file

from prometar_jax import zeroshot
from prometar_jax.models import clip as clip_lib

TABLE = "text_model.embeddings.token_embedding.weight"


def _token_id_arrays():
  with np.load(NPZ_PATH) as f:
    return {
      k: f[k] for k in f.files if "token" in k and f[k].dtype.kind in "iu"
    }


def test_stored_rows_cover_every_token_id():
  arrays = _token_id_arrays()
  # What the replay and the reference tests feed to the text encoder.
  assert {"input/tokenized_prompts", "input/zs_template_token_ids"} <= set(
    arrays
  )
  ids = used_token_ids()
  assert ids.dtype == np.int64 and np.all(np.diff(ids) > 0)
  every = np.unique(np.concatenate([a.ravel() for a in arrays.values()]))
  np.testing.assert_array_equal(ids, every)
  tensors, info = pruned_tensors()
  assert info["tensor"] == TABLE
  assert tensors[ROWS].shape == (len(ids), info["shape"][1])


def test_rebuilt_folder_has_the_original_layout(tmp_path):
  tensors = load_file(rebuild_hf_folder(tmp_path) + "/model.safetensors")
  with open(JSON_PATH) as f:
    meta = json.load(f)
  # Every tensor of the official -> HF name mapping, nothing else.
  assert set(tensors) == {m["hf"] for m in meta["hf_mapping"]}
  vocab, width = meta["model"]["vocab_size"], meta["model"]["transformer_width"]
  assert tensors[TABLE].shape == (vocab, width)
  assert all(t.dtype == np.float32 for t in tensors.values())
  stored, _ = pruned_tensors()
  assert IDS not in tensors and ROWS not in tensors
  np.testing.assert_array_equal(tensors[TABLE][stored[IDS]], stored[ROWS])
  unused = np.ones(vocab, bool)
  unused[stored[IDS]] = False
  assert not tensors[TABLE][unused].any()


def _reference_text_prompts():
  with np.load(NPZ_PATH) as f:
    return np.stack(
      [
        f["init/prompt_learner.ctx"],
        f["init/text_encoder.transformer.resblocks.1.VPT_shallow"],
      ]
    )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_unused_rows_do_not_change_text_features(tmp_path, dtype):
  """Zeros or random values in the unused rows: bit-identical features, so
  the original rows (one such choice) give the same results as well."""
  rng = np.random.default_rng(0)

  def noise(shape, dt):
    return (10.0 * rng.standard_normal(shape)).astype(dt)

  arrays = _token_id_arrays()
  prompts = _reference_text_prompts()
  with jax.enable_x64(dtype == "float64"):
    zeros = clip_lib.load(
      rebuild_hf_folder(tmp_path / "zeros"), dtype=np.dtype(dtype)
    )
    noisy = clip_lib.load(
      rebuild_hf_folder(tmp_path / "noise", noise), dtype=np.dtype(dtype)
    )
    a = zeros.params["text_model"]["token_embedding"]["embedding"]
    b = noisy.params["text_model"]["token_embedding"]["embedding"]
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1  # not vacuous

    def features(clip, ids_key, with_prompts):
      ids = arrays[ids_key]
      if ids.ndim == 3:  # templates x classes x length
        return np.asarray(zeroshot.template_text_features(clip, ids, 100))
      return np.asarray(
        clip.encode_text(ids, prompts if with_prompts else None)
      )

    for key, with_prompts in [
      ("input/tokenized_prompts", True),
      ("input/tokenized_prompts", False),
      ("input/zs_template_token_ids", False),
    ]:
      want = features(zeros, key, with_prompts)
      assert want.dtype == np.dtype(dtype) and np.abs(want).max() > 0.1
      np.testing.assert_array_equal(features(noisy, key, with_prompts), want)

    # Negative control: a row that the ids use does change the features
    # (by a random vector: a constant shift would vanish in LayerNorm).
    used = int(arrays["input/tokenized_prompts"][0, 1])
    params = jax.tree.map(lambda x: x, zeros.params)
    table = params["text_model"]["token_embedding"]["embedding"]
    params["text_model"]["token_embedding"]["embedding"] = table.at[used].add(
      rng.standard_normal(table.shape[1])
    )
    moved = dataclasses.replace(zeros, params=params)
    ids = arrays["input/tokenized_prompts"]
    assert np.abs(moved.encode_text(ids) - zeros.encode_text(ids)).max() > 1e-3
