"""A learner defined outside the package: registered, selected by name,
trained one ProMetaR step; and the registry's errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_testlib  # noqa: F401  (puts the repo root on sys.path)
from conftest import fast_compilation

from configs import common
from prometar_jax import meta_step, schedules, zeroshot
from prometar_jax import prompt_learners as pl
from prometar_jax import run as run_lib
from prometar_jax.models import clip as clip_lib

CLASSES = ["red fox", "golden_retriever", "sailboat"]

# A learner that is none of the built-in ones: a shallow text context (as
# CoOp) and ONE vision prompt shared by every prompted layer, scaled per
# layer by a learned scalar ("scale" is not a prompt branch: the gradnet
# gates "text" and "vision", the scales take the fixed gate).


def shared_init(key, clip, config):
  k_text, k_vision, _ = pl.init_keys(key)
  width = clip.config.vision.width
  return {
    "text": pl.text_context(k_text, clip, config, depth=1),
    "vision": pl.random_prompts(
      k_vision, (1, config.n_ctx_vision, width), config
    ),
    "scale": jnp.linspace(1.0, 0.5, config.depth_vision),
  }


def shared_tower_prompts(params, config):
  del config
  vision = params["scale"][:, None, None] * params["vision"]
  return params["text"], vision


SHARED = pl.Learner(
  name="shared_vision",
  branches=("text", "vision"),
  init=shared_init,
  tower_prompts=shared_tower_prompts,
  defaults=dict(n_ctx_text=2, n_ctx_vision=2, depth_vision=2),
)


@pytest.fixture
def shared_vision():
  learner = pl.register(SHARED)
  yield learner
  pl.unregister(learner.name)


def test_registered_learner_trains_one_prometar_step(
  tiny_clip_with_tokenizer, shared_vision
):
  clip = clip_lib.load(tiny_clip_with_tokenizer)
  # Selected by name, as the configs do.
  config = common.get_base_config()
  common.apply_method(config, "shared_vision", prometar=True)
  assert config.model.learner == "shared_vision"
  prompt = run_lib.step_spec(config).prompt  # as the trainer reads it
  assert prompt.learner is shared_vision
  assert (prompt.n_ctx_vision, prompt.depth_vision) == (2, 2)
  lr = schedules.Optimizer(lr=0.01, schedule="constant")
  spec = meta_step.StepSpec(
    prompt, meta_step.MetaConfig(dim_rate=8), optim=lr, optim_gradnet=lr
  )
  assert run_lib.method_label(spec) == "shared_vision + ProMetaR"

  prompts = pl.init(jax.random.key(0), clip, prompt)
  assert prompts["vision"].shape == (1, 2, 48)
  text, vision = pl.tower_prompts(prompts, prompt)
  assert text.shape == (1, 2, 32) and vision.shape == (2, 2, 48)
  state = meta_step.init_state(
    jax.random.key(1), prompts, spec, steps_per_epoch=1
  )
  # The gradnet covers its prompt branches and nothing else.
  assert set(state.gradnet) == {"text", "vision"}
  assert state.gradnet["vision"]["w1"].shape[0] == 1  # one shared prompt

  # The class prompts hold its text context ("a photo of a" as context).
  assert pl.class_prompt_texts(prompt, clip, CLASSES)[1] == (
    "a photo of a golden retriever."
  )
  teacher = zeroshot.teacher_text_features(clip, CLASSES)
  classes = {
    "token_ids": jnp.asarray(pl.class_token_ids(prompt, clip, CLASSES)),
    "teacher": jnp.asarray(teacher, jnp.float32),
    "class_mask": jnp.ones(len(CLASSES), bool),
  }
  rng = np.random.default_rng(0)
  batch = {
    "image": jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32),
    "label": jnp.asarray([0, 1, 0, 2], jnp.int32),
  }
  step = meta_step.make_train_step(spec, donate=False)
  with fast_compilation():
    new, metrics = step(state, meta_step.Frozen(clip, classes), batch)

  assert float(metrics["meta_valid"]) == 1.0
  assert metrics["gamma_vision_mean"].shape == (1,)
  for name in ("text", "vision", "scale"):
    before, after = np.asarray(prompts[name]), np.asarray(new.prompts[name])
    assert np.isfinite(after).all(), name
    # Moved by its gradients, not only by weight decay (which scales every
    # entry alike: a constant ratio).
    assert np.ptp((after - before) / before) > 1e-5, name
  moved = [
    np.abs(np.asarray(a) - np.asarray(b)).max()
    for a, b in zip(
      jax.tree.leaves(new.gradnet), jax.tree.leaves(state.gradnet)
    )
  ]
  assert np.isfinite(moved).all() and max(moved) > 0


def test_registry_errors(shared_vision):
  with pytest.raises(ValueError, match="already registered"):
    pl.register(SHARED)
  assert pl.register(SHARED, replace=True) is SHARED
  with pytest.raises(ValueError, match=r"registered: .*shared_vision"):
    pl.PromptConfig(kind="no_such_learner")
  with pytest.raises(ValueError, match="coop, .*zeroshot"):
    common.apply_method(common.get_base_config(), "no_such_learner", True)
  with pytest.raises(ValueError, match="not CLIP towers"):
    pl.Learner("bad", ("audio",), shared_init, shared_tower_prompts)
  with pytest.raises(ValueError, match="not PromptConfig fields"):
    pl.Learner(
      "bad", ("text",), shared_init, shared_tower_prompts, dict(lr=1.0)
    )


def test_declared_branches_must_match_the_prompts(tiny_clip_with_tokenizer):
  # A learner that says it prompts only the text tower but gives vision
  # prompts too is refused at its first forward.
  liar = pl.register(
    pl.Learner("text_only_liar", ("text",), shared_init, shared_tower_prompts)
  )
  try:
    clip = clip_lib.load(tiny_clip_with_tokenizer)
    cfg = pl.PromptConfig(kind=liar.name, depth_vision=2)
    params = pl.init(jax.random.key(0), clip, cfg)
    with pytest.raises(ValueError, match="gave vision prompts"):
      pl.tower_prompts(params, cfg)
  finally:
    pl.unregister(liar.name)
  assert liar.name not in pl.names()


def test_config_model_learner_selects_the_learner(shared_vision):
  config = common.get_base_config()
  assert config.model.learner == "ivlp" and "kind" not in config.prompt
  config.model.learner = "shared_vision"
  assert run_lib.step_spec(config).prompt.learner is shared_vision
  config.model.learner = "no_such_learner"
  with pytest.raises(ValueError, match=r"registered: .*shared_vision"):
    run_lib.step_spec(config)
  # The key of earlier versions is named, not silently ignored.
  config.model.learner = "ivlp"
  with config.prompt.unlocked():
    config.prompt.kind = "coop"
  with pytest.raises(ValueError, match=r"config\.model\.learner"):
    run_lib.step_spec(config)
