"""VPT-deep: learned prompts in the vision tower only.

Parameters {"vision": [depth_vision, n_ctx_vision, d_v]} ~ N(0,
init_std^2); the text side is frozen CLIP on "a photo of a {}.".
"""

from prometar_jax.prompt_learners import learner as learner_lib


def init(key, clip, config):
  _, k_vision, _ = learner_lib.init_keys(key)
  d_v = clip.config.vision.width
  shape = (config.depth_vision, config.n_ctx_vision, d_v)
  return {"vision": learner_lib.random_prompts(k_vision, shape, config)}


def tower_prompts(params, config):
  del config
  return None, params["vision"]


LEARNER = learner_lib.register(
  learner_lib.Learner(
    name="vpt",
    branches=("vision",),
    init=init,
    tower_prompts=tower_prompts,
    # VPT-deep: 4 tokens in 9 layers.
    defaults=dict(n_ctx_vision=4, depth_vision=9),
  )
)
