"""The Flax CLIP port against transformers' PyTorch CLIPModel and the reference."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
  TINY_CONFIGS,
  VOCAB_SIZE,
  random_token_ids,
  write_tiny_tokenizer,
)

from prometar_jax.models import clip as clip_lib


def _torch_features(model, pixels_nhwc, ids):
  import torch

  with torch.no_grad():
    pix = torch.from_numpy(pixels_nhwc.transpose(0, 3, 1, 2).copy())
    ids_t = torch.from_numpy(ids)
    img = model.get_image_features(pixel_values=pix).pooler_output
    txt = model.get_text_features(input_ids=ids_t).pooler_output
    logits = model(input_ids=ids_t, pixel_values=pix).logits_per_image
  return img.numpy(), txt.numpy(), logits.numpy()


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_parity_with_hf_pytorch(hf_clips, name):
  folder, model = hf_clips[name]
  clip = clip_lib.load(folder)
  cfg = clip.config
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(3, cfg.image_size, cfg.image_size, 3))
  pixels = pixels.astype(np.float32)
  ids = random_token_ids(rng, 5, cfg.eos_token_id)
  want_img, want_txt, want_logits = _torch_features(model, pixels, ids)

  img = np.asarray(clip.encode_image(pixels))
  txt = np.asarray(clip.encode_text(ids))
  logits = (
    clip.logit_scale * clip_lib.normalize(img) @ clip_lib.normalize(txt).T
  )
  # Features are O(1): absolute tolerance 1e-5.
  assert np.abs(want_img).max() > 0.1 and np.abs(want_txt).max() > 0.1
  np.testing.assert_allclose(img, want_img, atol=1e-5, rtol=0)
  np.testing.assert_allclose(txt, want_txt, atol=1e-5, rtol=0)
  np.testing.assert_allclose(logits, want_logits, atol=1e-4 * 100, rtol=1e-5)


def test_parity_with_hf_on_reference_checkpoint(reference):
  import torch
  from transformers import CLIPModel

  arrays, _, hf_dir = reference
  clip = clip_lib.load(hf_dir)
  model = CLIPModel.from_pretrained(hf_dir).eval()
  pixels = arrays["input/images"].transpose(0, 2, 3, 1)
  ids = arrays["input/tokenized_prompts"]
  want_img, want_txt, want_logits = _torch_features(model, pixels, ids)
  np.testing.assert_allclose(clip.encode_image(pixels), want_img, atol=1e-5)
  np.testing.assert_allclose(clip.encode_text(ids), want_txt, atol=1e-5)
  # The frozen zero-shot image features of the official step, too.
  zs = clip_lib.normalize(clip.encode_image(pixels))
  np.testing.assert_allclose(
    zs, arrays["stage1/forward/zs_image_features"], atol=1e-5
  )
  del torch


def _reference_prompts(arrays):
  text = np.stack(
    [
      arrays["init/prompt_learner.ctx"],
      arrays["init/text_encoder.transformer.resblocks.1.VPT_shallow"],
    ]
  )
  vision = np.stack(
    [
      arrays["init/image_encoder.VPT"],
      arrays["init/image_encoder.transformer.resblocks.1.VPT_shallow"],
    ]
  )
  return text, vision


def test_prompted_features_equal_official(reference):
  arrays, _, hf_dir = reference
  clip = clip_lib.load(hf_dir)
  text_prompts, vision_prompts = _reference_prompts(arrays)
  pixels = arrays["input/images"].transpose(0, 2, 3, 1)
  ids = arrays["input/tokenized_prompts"]
  img = clip.encode_image(pixels, vision_prompts)
  txt = clip.encode_text(ids, text_prompts)
  f = "stage1/forward/"
  np.testing.assert_allclose(
    img, arrays[f + "image_features_unnormalized"], atol=1e-5
  )
  np.testing.assert_allclose(
    txt, arrays[f + "text_features_unnormalized"], atol=1e-5
  )
  logits = (
    clip.logit_scale * clip_lib.normalize(img) @ clip_lib.normalize(txt).T
  )
  np.testing.assert_allclose(logits, arrays[f + "logits"], atol=1e-4, rtol=1e-5)
  # A prompt in the wrong slot must change the features (negative control).
  moved = np.roll(text_prompts, 1, axis=0)
  assert np.abs(clip.encode_text(ids, moved) - txt).max() > 1e-3


def test_prompt_slots_match_manual_construction(hf_clips):
  """Deep prompts replace rows at block inputs; block >= depth carries on.

  Independent check: a hand-written forward in numpy of the same semantics.
  """
  folder, _ = hf_clips["p8_quickgelu"]
  clip = clip_lib.load(folder)
  cfg = clip.config
  rng = np.random.default_rng(1)
  depth, n_ctx = 2, 3
  vp = rng.normal(0, 0.5, (depth, n_ctx, cfg.vision.width)).astype(np.float32)
  pixels = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  got = np.asarray(clip.encode_image(pixels, vp))
  want = _numpy_vision(clip.params, cfg, pixels, vp)
  np.testing.assert_allclose(got, want, atol=2e-5)
  # Zero-size prompts are plain CLIP.
  empty = np.zeros((0, 0, cfg.vision.width), np.float32)
  np.testing.assert_allclose(
    clip.encode_image(pixels, empty), clip.encode_image(pixels), atol=1e-6
  )


def _np_ln(x, p, eps=1e-5):
  m = x.mean(-1, keepdims=True)
  v = ((x - m) ** 2).mean(-1, keepdims=True)
  return (x - m) / np.sqrt(v + eps) * p["scale"] + p["bias"]


def _np_block(x, p, heads, act):
  def dense(y, q):
    return y @ np.asarray(q["kernel"]) + np.asarray(q["bias"])

  n, length, d = x.shape
  y = _np_ln(x, p["layer_norm1"])
  a = p["self_attn"]
  sh = lambda t: t.reshape(n, length, heads, d // heads)  # noqa: E731
  q = sh(dense(y, a["q_proj"])) * (d // heads) ** -0.5
  k, v = sh(dense(y, a["k_proj"])), sh(dense(y, a["v_proj"]))
  s = np.einsum("nqhc,nkhc->nhqk", q, k)
  s = np.exp(s - s.max(-1, keepdims=True))
  s = s / s.sum(-1, keepdims=True)
  o = np.einsum("nhqk,nkhc->nqhc", s, v).reshape(n, length, d)
  x = x + dense(o, a["out_proj"])
  y = dense(_np_ln(x, p["layer_norm2"]), p["fc1"])
  y = y / (1 + np.exp(-1.702 * y)) if act == "quick_gelu" else y
  return x + dense(y, p["fc2"])


def _numpy_vision(params, cfg, pixels, prompts):
  params = jax.tree.map(np.asarray, params)
  vm = params["vision_model"]
  p, g = cfg.patch_size, cfg.grid
  n = pixels.shape[0]
  patches = pixels.reshape(n, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
  kernel = vm["patch_embedding"]["kernel"]  # [p, p, 3, d]
  x = np.einsum("nijabc,abcd->nijd", patches, kernel).reshape(n, g * g, -1)
  cls = np.broadcast_to(vm["class_embedding"], (n, 1, x.shape[-1]))
  x = np.concatenate([cls, x], 1) + vm["position_embedding"]
  n_ctx = prompts.shape[1]
  x = np.concatenate(
    [x, np.broadcast_to(prompts[0], (n,) + prompts[0].shape)], 1
  )
  x = _np_ln(x, vm["pre_layrnorm"])
  for i in range(cfg.vision.layers):
    if 0 < i < prompts.shape[0]:
      x = x.copy()
      x[:, -n_ctx:] = prompts[i]
    layer = clip_lib.encoder_layer(vm["encoder"], i)
    x = _np_block(x, layer, cfg.vision.heads, cfg.vision.act)
  pooled = _np_ln(x[:, 0], vm["post_layernorm"])
  return pooled @ params["visual_projection"]["kernel"]


def test_bf16_compute_close_to_fp32(hf_clips):
  folder, _ = hf_clips["p16_gelu_4heads"]
  f32 = clip_lib.load(folder)
  bf16 = clip_lib.load(folder, dtype=jnp.bfloat16)
  assert jax.tree.leaves(bf16.params)[0].dtype == jnp.float32
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(2, 48, 48, 3)).astype(np.float32)
  a, b = f32.encode_image(pixels), bf16.encode_image(pixels)
  assert b.dtype == jnp.float32
  rel = np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(a).max()
  assert 0 < rel < 5e-2


def test_vit_b16_shapes_convert_with_every_tensor_used_once():
  import torch
  from transformers import CLIPConfig, CLIPModel

  hf_cfg = CLIPConfig(
    text_config=dict(
      hidden_size=512,
      intermediate_size=2048,
      num_attention_heads=8,
      num_hidden_layers=12,
    ),
    vision_config=dict(
      hidden_size=768,
      intermediate_size=3072,
      num_attention_heads=12,
      num_hidden_layers=12,
      image_size=224,
      patch_size=16,
    ),
    projection_dim=512,
  )
  with torch.device("meta"):
    model = CLIPModel(hf_cfg)
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  cfg = clip_lib.ClipConfig.from_hf(hf_cfg)
  assert cfg == clip_lib.VIT_B16
  # Zero-stride views: every tensor "exists" without allocating it.
  zero = np.zeros((), np.float32)
  state = {k: np.broadcast_to(zero, s) for k, s in shapes.items()}
  params = clip_lib.convert_hf_state_dict(state, cfg)
  init = functools.partial(clip_lib.init_params, cfg)
  abstract = jax.eval_shape(init, jax.random.key(0))
  got = jax.tree.map(lambda x: tuple(x.shape), params)
  want = jax.tree.map(lambda x: tuple(x.shape), abstract)
  assert got == want
  n_params = sum(int(np.prod(s)) for s in shapes.values())
  assert n_params == sum(x.size for x in jax.tree.leaves(params))
  # An extra or a missing tensor is an error.
  with pytest.raises(ValueError, match="not used"):
    clip_lib.convert_hf_state_dict(dict(state, extra=zero), cfg)
  del state["text_model.final_layer_norm.bias"]
  with pytest.raises(ValueError, match="final_layer_norm.bias"):
    clip_lib.convert_hf_state_dict(state, cfg)


def test_position_embedding_interpolation(hf_clips):
  folder, _ = hf_clips["p8_quickgelu"]
  clip = clip_lib.load(folder, image_size=48)
  assert clip.config.grid == 6
  out = clip.encode_image(np.zeros((1, 48, 48, 3), np.float32))
  assert out.shape == (1, 16) and np.isfinite(out).all()
  with pytest.raises(ValueError, match="patches"):
    clip_lib.load(folder).encode_image(np.zeros((1, 48, 48, 3), np.float32))


def test_tokenize_with_checkpoint_tokenizer(hf_clips, tmp_path):
  folder, _ = hf_clips["p8_quickgelu"]
  import shutil

  shutil.copytree(folder, tmp_path / "ckpt")
  vocab = write_tiny_tokenizer(tmp_path / "ckpt")
  clip = clip_lib.load(str(tmp_path / "ckpt"))
  ids = clip.tokenize(["a Dog.", "x" * 100])
  assert ids.shape == (2, 77) and ids.dtype == np.int32
  # No merges: one token per character, lower-cased; "</w>" ends a word.
  want = [
    512,
    vocab["a</w>"],
    vocab["d"],
    vocab["o"],
    vocab["g</w>"],
    vocab[".</w>"],
    513,
  ]
  assert list(ids[0, :7]) == want
  # Truncated to 77 with EOT kept last.
  assert ids[1, 0] == 512 and ids[1, 76] == 513


def test_clear_errors(tmp_path, hf_clips, monkeypatch):
  with pytest.raises(FileNotFoundError, match="no CLIP checkpoint folder"):
    clip_lib.load(str(tmp_path / "missing" / "ckpt"))
  folder, _ = hf_clips["p8_quickgelu"]
  only_config = tmp_path / "no_weights"
  only_config.mkdir()
  (only_config / "config.json").write_text(
    open(os.path.join(folder, "config.json")).read()
  )
  with pytest.raises(FileNotFoundError, match="has no weights"):
    clip_lib.load(str(only_config))
  not_clip = tmp_path / "bert"
  not_clip.mkdir()
  (not_clip / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(ValueError, match="not a CLIP"):
    clip_lib.load(str(not_clip))
  no_config = tmp_path / "empty"
  no_config.mkdir()
  with pytest.raises(FileNotFoundError, match="no config.json"):
    clip_lib.load(str(no_config))
  # A hub id while offline and not cached: says what to download and where.
  import huggingface_hub

  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(
    huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub")
  )
  with pytest.raises(FileNotFoundError, match="hf download openai/clip"):
    clip_lib.load("openai/clip-vit-base-patch16")


def test_truncated_text_tower_equals_full_77_tokens(hf_clips):
  """Under the causal mask nothing after a row's EOT changes its feature."""
  from prometar_jax import prompt_learners as pl

  for name in ("p8_quickgelu", "p4_legacy_eos"):
    folder, _ = hf_clips[name]
    clip = clip_lib.load(folder)
    rng = np.random.default_rng(3)
    ids = random_token_ids(rng, 6, clip.config.eos_token_id)
    # Garbage after the EOT must not matter either (HF pads with EOT).
    eot = np.argmax(ids == ids.max(1, keepdims=True), 1)
    for i, e in enumerate(eot):
      ids[i, e + 1 :] = rng.integers(3, 400, 76 - e)
    trimmed = pl.trim_token_ids(ids)
    assert trimmed.shape[1] == eot.max() + 1 < 77
    depth = min(2, clip.config.text.layers)
    prompts = rng.normal(0, 0.3, (depth, 3, clip.config.text.width))
    prompts = prompts.astype(np.float32)
    for p in (None, prompts):
      full = clip.encode_text(ids, p)
      short = clip.encode_text(trimmed, p)
      np.testing.assert_allclose(short, full, atol=1e-6, rtol=1e-6)


def _full_layers_then_pool(clip, tower, x, deep, replace, pool, causal, rows):
  """Every block over every row, then the pooled rows: the plain tower."""
  cfg = getattr(clip.config, tower)
  block = clip_lib.Block(cfg, causal, rows, clip.dtype, parent=None)
  encoder = clip.params[f"{tower}_model"]["encoder"]
  for i in range(cfg.layers):
    p = clip_lib.encoder_layer(encoder, i)
    x, _ = block.apply({"params": p}, x, (deep[i], replace[i]))
  return x[np.arange(x.shape[0]), pool]


def test_last_layer_on_pooled_rows_equals_full_last_layer(hf_clips):
  """The last block computed for CLS / EOT rows only is exact (float64)."""
  jax.config.update("jax_enable_x64", True)
  try:
    folder, _ = hf_clips["p8_quickgelu"]
    clip = clip_lib.load(folder, dtype=jnp.float64)
    rng = np.random.default_rng(11)
    for tower, causal in (("text", True), ("vision", False)):
      cfg = getattr(clip.config, tower)
      n, length = 5, 9
      x = jnp.asarray(rng.normal(size=(n, length, cfg.width)))
      pool = np.array([0, 8, 3, 5, 1]) if causal else np.zeros(n, int)
      # Deep prompts everywhere, the last layer included (rows 2..3).
      deep = jnp.asarray(rng.normal(size=(cfg.layers, 2, cfg.width)))
      replace = jnp.ones((cfg.layers,), bool)
      rows = (2, 2)
      enc = clip_lib.Encoder(cfg, causal, rows, False, jnp.float64)
      params = {"params": clip.params[f"{tower}_model"]["encoder"]}
      ours = enc.apply(params, x, deep, replace, jnp.asarray(pool))
      want = _full_layers_then_pool(
        clip, tower, x, deep, replace, pool, causal, rows
      )
      assert ours.shape == (n, cfg.width)
      np.testing.assert_allclose(ours, want, rtol=1e-12, atol=1e-12)
      # The pooled row depends on the others (attention): not a no-op.
      bump = rng.normal(size=cfg.width)  # LayerNorm removes a constant
      other = x.at[1, 1].add(bump)  # row 1: not a prompt row, before EOT
      moved = enc.apply(params, other, deep, replace, jnp.asarray(pool))
      assert np.abs(np.asarray(moved - ours)).max() > 1e-3
  finally:
    jax.config.update("jax_enable_x64", False)


def _plain_prompted_text(clip, ids, prompts):
  """The prompted text tower with every block over every row (float64)."""
  cfg, tc = clip.config, clip.config.text
  tp = clip.params["text_model"]
  n, length = ids.shape
  n_ctx = prompts.shape[1]
  x = np.asarray(tp["token_embedding"]["embedding"])[ids]
  x[:, 1 : 1 + n_ctx] = prompts[0]
  x = jnp.asarray(x + np.asarray(tp["position_embedding"])[:length])
  deep, replace = clip_lib._deep_prompt_schedule(
    jnp.asarray(prompts), tc.layers, tc.width
  )
  eot = np.argmax(ids == cfg.eos_token_id, 1)
  x = _full_layers_then_pool(
    clip, "text", x, deep, replace, eot, True, (1, n_ctx)
  )
  x = clip_lib.LayerNorm(tc.eps, jnp.float64).apply(
    {"params": tp["final_layer_norm"]}, x
  )
  return x @ clip.params["text_projection"]["kernel"]


def test_prompted_text_over_shared_prefix_equals_every_row(hf_clips):
  """SOT and the context rows computed once for all sequences (float64)."""
  jax.config.update("jax_enable_x64", True)
  try:
    for name in ("p8_quickgelu", "p16_gelu_4heads"):  # 2 and 3 text layers
      folder, _ = hf_clips[name]
      clip = clip_lib.load(folder, dtype=jnp.float64)
      tc = clip.config.text
      rng = np.random.default_rng(13)
      ids = random_token_ids(rng, 7, clip.config.eos_token_id, length=24)
      n_ctx = 3
      # Sequence 5's EOT falls among the context rows (position 2): it
      # pools a shared row, as the full tower does.
      ids[5] = 0
      ids[5, 0], ids[5, 1], ids[5, 2] = ids[0, 0], 7, clip.config.eos_token_id
      # Deep prompts at every layer, the last included.
      prompts = rng.normal(0, 0.3, (tc.layers, n_ctx, tc.width))
      ours = np.asarray(clip.encode_text(ids, prompts))
      want = np.asarray(_plain_prompted_text(clip, ids, prompts))
      assert ours.shape == (7, clip.config.projection_dim)
      np.testing.assert_allclose(ours, want, rtol=1e-12, atol=1e-12)
      # The shared rows matter: another deep prompt moves every feature.
      other = prompts.copy()
      other[tc.layers - 1, 1] += rng.normal(size=tc.width)  # not constant:
      # LayerNorm would remove that
      moved = np.asarray(clip.encode_text(ids, other))
      assert np.abs(moved - ours).max(1).min() > 1e-4
  finally:
    jax.config.update("jax_enable_x64", False)


def test_prompted_text_in_length_groups_in_one_pass_equals_every_row(hf_clips):
  """Length groups of different trims stacked in one prefix pass (float64):
  each sequence attends to the shared rows and its own only."""
  from prometar_jax import prompt_learners as pl

  jax.config.update("jax_enable_x64", True)
  try:
    folder, _ = hf_clips["p16_gelu_4heads"]  # 3 text layers, 4 heads
    clip = clip_lib.load(folder, dtype=jnp.float64)
    tc, eos = clip.config.text, clip.config.eos_token_id
    rng = np.random.default_rng(21)
    n_ctx = 3
    name_lengths = [1, 9, 2, 1, 17, 4, 2, 9]
    ids = np.zeros((len(name_lengths), 24), np.int64)
    for i, k in enumerate(name_lengths):
      ids[i, 0] = VOCAB_SIZE - 2
      ids[i, 1 : 1 + n_ctx + k] = rng.integers(3, VOCAB_SIZE - 3, n_ctx + k)
      ids[i, 1 + n_ctx + k] = eos
    prompts = rng.normal(0, 0.3, (tc.layers, n_ctx, tc.width))
    want = np.asarray(_plain_prompted_text(clip, ids, prompts))
    # Three groups, listed longest first: order is the caller's.
    groups = ([4, 7], [1, 5, 6], [0, 2, 3])
    parts = tuple(pl.trim_token_ids(ids[g]) for g in groups)
    assert [x.shape[1] for x in parts] == [22, 14, 7]
    ours = np.asarray(clip.encode_text(parts, prompts))
    np.testing.assert_allclose(
      ours, want[np.concatenate(groups)], rtol=1e-12, atol=1e-12
    )
    # Through `bucket_token_ids` and `encode_text`: the same features.
    grouped = pl.bucket_token_ids(ids, 3, shared_rows=1 + n_ctx)
    assert len(grouped["buckets"]) == 3
    np.testing.assert_allclose(
      pl.encode_text(clip, grouped, prompts), want, rtol=1e-12, atol=1e-12
    )
    # A group whose first token differs is named by its stacked row.
    bad = (parts[0], parts[1].copy())
    bad[1][2, 0] -= 1
    with pytest.raises(ValueError, match="sequence 4 starts with"):
      clip.encode_text(bad, prompts)
  finally:
    jax.config.update("jax_enable_x64", False)


def test_prompted_text_refuses_sequences_with_another_start(hf_clips):
  folder, _ = hf_clips["p8_quickgelu"]
  clip = clip_lib.load(folder)
  rng = np.random.default_rng(2)
  ids = random_token_ids(rng, 4, clip.config.eos_token_id, length=24)
  prompts = rng.normal(0, 0.3, (1, 2, clip.config.text.width))
  ids[2, 0] = ids[0, 0] - 1
  with pytest.raises(ValueError, match="sequence 2 starts with"):
    clip.encode_text(ids, prompts)
  # Without prompts nothing is shared: any ids are fine.
  assert np.isfinite(clip.encode_text(ids)).all()
  # Traced (no check possible): that sequence's features are NaN, the
  # others the same as without it.
  fn = jax.jit(clip_lib.encode_text, static_argnames=("cfg",))
  out = np.asarray(fn(clip.params, ids, prompts, cfg=clip.config))
  assert np.isnan(out[2]).all()
  keep = [0, 1, 3]
  clean = np.asarray(clip.encode_text(ids[keep], prompts))
  np.testing.assert_allclose(out[keep], clean, atol=1e-6, rtol=1e-6)


def test_length_groups_count_the_shared_prefix_once():
  from prometar_jax import prompt_learners as pl

  ids = np.zeros((10, 77), np.int64)
  ids[:, 0] = 98
  for c in range(10):
    ids[c, 1 + (6 if c < 9 else 8)] = 99  # lengths 8 (x9) and 10
  # All positions: 100 in one group, 9 x 8 + 10 = 82 in two: 18% fewer,
  # one group when a group must save a fifth, two when 5% (the default).
  one = pl.bucket_token_ids(ids, 2, multiple=1, min_saving=0.2)
  assert one.shape == (10, 10)
  two = pl.bucket_token_ids(ids, 2, multiple=1)
  assert [b.shape for b in two["buckets"]] == [(9, 8), (1, 10)]
  # Without the 5 shared rows: 50 -> 9 x 3 + 5 = 32 rows (36% fewer): two
  # groups even when a group must save a fifth.
  grouped = pl.bucket_token_ids(
    ids, 2, multiple=1, shared_rows=5, min_saving=0.2
  )
  assert [b.shape for b in grouped["buckets"]] == [(9, 8), (1, 10)]
  # Nine prompts of 20 positions and one of 21: 210 -> 201 in two groups,
  # 4.3% fewer: one group at the default 5%.
  near = np.zeros((10, 77), np.int64)
  near[:, 0] = 98
  for c in range(10):
    near[c, 19 if c < 9 else 20] = 99
  assert pl.bucket_token_ids(near, 2).shape == (10, 21)
  ivlp = pl.PromptConfig(kind="ivlp", n_ctx_text=4)
  assert pl.shared_prompt_rows(ivlp) == 5
  assert pl.shared_prompt_rows(pl.PromptConfig(kind="vpt")) == 0


def test_text_in_length_groups_equals_one_trim_and_full_77(hf_clips):
  """Each group trimmed to its own longest prompt gives the same features."""
  from prometar_jax import prompt_learners as pl

  folder, _ = hf_clips["p8_quickgelu"]
  clip = clip_lib.load(folder)
  eos = clip.config.eos_token_id
  rng = np.random.default_rng(5)
  # Mostly short prompts and a long tail, as real class names.
  name_lengths = [1, 2, 1, 3, 25, 2, 1, 12, 2]
  ids = np.zeros((len(name_lengths), 77), np.int64)
  for i, k in enumerate(name_lengths):
    ids[i, 0] = VOCAB_SIZE - 2
    ids[i, 1 : 1 + k] = rng.integers(3, VOCAB_SIZE - 3, k)
    ids[i, 1 + k] = eos
  grouped = pl.bucket_token_ids(ids, max_buckets=3, multiple=4)
  # Lengths 2 + k round up to 4, 4, 4, 8, 28, 4, 4, 16, 4. One trim: 9 x 28
  # = 252 positions; best two groups {4} {8, 16, 28}: 24 + 84 = 108 (kept:
  # <= 0.95 x 252); best three {4} {8, 16} {28}: 24 + 32 + 28 = 84 (kept:
  # <= 0.95 x 108).
  shapes = [b.shape for b in grouped["buckets"]]
  assert shapes == [(6, 4), (2, 16), (1, 28)]
  depth = min(2, clip.config.text.layers)
  prompts = rng.normal(0, 0.3, (depth, 1, clip.config.text.width))
  prompts = prompts.astype(np.float32)
  for p in (None, prompts):
    full = clip.encode_text(ids, p)
    # Same math; only float32 summation order differs with the row count.
    np.testing.assert_allclose(
      pl.encode_text(clip, grouped, p), full, atol=1e-6, rtol=1e-5
    )
  # Prompts of one length: one group.
  same = ids[[0, 2, 6]]
  kept = pl.bucket_token_ids(same, max_buckets=3, multiple=4)
  assert isinstance(kept, np.ndarray) and kept.shape == (3, 4)
  assert isinstance(pl.bucket_token_ids(ids, max_buckets=1), np.ndarray)
