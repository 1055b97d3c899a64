"""Zero-shot CLIP: no parameters, no prompts; frozen CLIP on the
hand-crafted "a photo of a {}." (nothing to train)."""

from prometar_jax.prompt_learners import learner as learner_lib


def init(key, clip, config):
  del key, clip, config
  return {}


def tower_prompts(params, config):
  del params, config
  return None, None


LEARNER = learner_lib.register(
  learner_lib.Learner(
    name="zeroshot", branches=(), init=init, tower_prompts=tower_prompts
  )
)
