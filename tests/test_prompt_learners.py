"""Prompt learners: initialisation, layouts, and the zero-shot limit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prometar_jax import prompt_learners as pl
from prometar_jax import zeroshot
from prometar_jax.models import clip as clip_lib

CLASSES = ["red fox", "golden_retriever", "sailboat"]


def test_ivlp_init_from_word_embeddings(tiny_clip_with_tokenizer):
  clip = clip_lib.load(tiny_clip_with_tokenizer)
  cfg = pl.PromptConfig(
    n_ctx_text=4, n_ctx_vision=3, depth_text=2, depth_vision=2
  )
  params = pl.init(jax.random.key(0), clip, cfg)
  assert params["text"].shape == (2, 4, 32)
  assert params["vision"].shape == (2, 3, 48)
  # Slot 0 = embeddings of the tokens of "a photo of a" (one char each here).
  table = np.asarray(clip.params["text_model"]["token_embedding"]["embedding"])
  word_ids = clip.tokenize(["a photo of a"])[0, 1:5]
  np.testing.assert_array_equal(params["text"][0], table[word_ids])
  # Deep prompts ~ N(0, 0.02^2).
  assert 0.01 < float(jnp.std(params["vision"])) < 0.03
  # Class prompts: "a photo of a {name}." with underscores as spaces.
  texts = pl.class_prompt_texts(cfg, clip, CLASSES)
  assert texts[1] == "a photo of a golden retriever."
  ids = pl.class_token_ids(cfg, clip, CLASSES)
  full = clip.tokenize(texts)
  # Trimmed after the longest prompt's EOT (rounded up to a multiple of 8).
  eot = [list(row).index(999) for row in full]
  assert ids.shape[1] == -(-(max(eot) + 1) // 8) * 8 < 77
  np.testing.assert_array_equal(ids, full[:, : ids.shape[1]])
  np.testing.assert_array_equal(
    pl.class_token_ids(cfg, clip, CLASSES, trim=False), full
  )


def test_fewer_ctx_than_init_tokens_keeps_the_rest_in_the_suffix(
  tiny_clip_with_tokenizer,
):
  clip = clip_lib.load(tiny_clip_with_tokenizer)
  cfg = pl.PromptConfig(n_ctx_text=2, depth_text=1, depth_vision=0, kind="coop")
  params = pl.init(jax.random.key(0), clip, cfg)
  table = np.asarray(clip.params["text_model"]["token_embedding"]["embedding"])
  ids = pl.class_token_ids(cfg, clip, CLASSES)
  np.testing.assert_array_equal(params["text"][0], table[ids[0, 1:3]])
  # The prompt still holds all init words: positions 3.. are the suffix.
  assert pl.class_prompt_texts(cfg, clip, CLASSES)[0] == "a photo of a red fox."
  # A longer context than the init words: random init and "X" placeholders.
  long = pl.PromptConfig(n_ctx_text=40, kind="coop")
  assert pl.class_prompt_texts(long, clip, ["dog"])[0].startswith("X X X")


@pytest.mark.parametrize("kind", pl.names())
def test_empty_prompts_reproduce_zero_shot_clip(tiny_clip_with_tokenizer, kind):
  clip = clip_lib.load(tiny_clip_with_tokenizer)
  cfg = pl.PromptConfig(
    kind=kind, n_ctx_text=0, n_ctx_vision=0, depth_text=3, depth_vision=2
  )
  params = pl.init(jax.random.key(0), clip, cfg)
  ids = pl.class_token_ids(cfg, clip, CLASSES)
  images = (
    np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  )
  out = pl.apply(params, clip, ids, images, cfg)
  text = zeroshot.class_text_features(clip, CLASSES)  # "a photo of a {}."
  want = zeroshot.logits(clip, clip.encode_image(images), text)
  np.testing.assert_allclose(out["logits"], want, atol=1e-4)


def test_nonempty_prompts_change_logits_and_maple_couples_branches(
  tiny_clip_with_tokenizer,
):
  clip = clip_lib.load(tiny_clip_with_tokenizer)
  cfg = pl.PromptConfig(kind="maple", n_ctx_text=2, depth_text=2)
  params = pl.init(jax.random.key(0), clip, cfg)
  assert params["proj"]["kernel"].shape == (2, 32, 48)
  text, vision = pl.tower_prompts(params, cfg)
  want = np.einsum("lnd,lde->lne", params["text"], params["proj"]["kernel"])
  np.testing.assert_allclose(
    vision, want + params["proj"]["bias"][:, None], rtol=1e-5
  )
  # Gradients of the image features reach the text prompts through the maps.
  images = np.ones((1, 32, 32, 3), np.float32)
  ids = pl.class_token_ids(cfg, clip, CLASSES)

  def image_norm(p):
    return jnp.sum(pl.encode(p, clip, ids, images, cfg)[1])

  g = jax.grad(image_norm)(params)
  assert float(jnp.abs(g["text"]).max()) > 0


def test_learner_shapes_at_vit_b16():
  cfg_b16 = clip_lib.VIT_B16
  clip = jax.eval_shape(
    lambda k: clip_lib.CLIP(cfg_b16, clip_lib.init_params(cfg_b16, k)),
    jax.random.key(0),
  )
  ids = jax.ShapeDtypeStruct((10, 77), jnp.int32)
  images = jax.ShapeDtypeStruct((4, 224, 224, 3), jnp.float32)
  sizes = {}
  for kind, prompts in {
    "ivlp": {"text": (9, 4, 512), "vision": (9, 4, 768)},
    "coop": {"text": (1, 16, 512)},
    "vpt": {"vision": (9, 4, 768)},
    "maple": {"text": (9, 2, 512)},
  }.items():
    cfg = pl.PromptConfig(kind=kind)
    params = {
      k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in prompts.items()
    }
    if kind == "maple":
      params["proj"] = {
        "kernel": jax.ShapeDtypeStruct((9, 512, 768), jnp.float32),
        "bias": jax.ShapeDtypeStruct((9, 768), jnp.float32),
      }
    out = jax.eval_shape(
      functools.partial(pl.apply, config=cfg), params, clip, ids, images
    )
    assert out["logits"].shape == (4, 10)
    sizes[kind] = pl.count_params(params)
  assert sizes["ivlp"] == 9 * 4 * 512 + 9 * 4 * 768 == 46_080
