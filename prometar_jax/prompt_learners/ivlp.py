"""IVLP, ProMetaR's base: deep prompts in both towers, independent.

Parameters {"text": [depth_text, n_ctx_text, d_t], "vision":
[depth_vision, n_ctx_vision, d_v]}; text slot 0 starts from the token
embeddings of the init words, everything else ~ N(0, init_std^2).
"""

from prometar_jax.prompt_learners import learner as learner_lib
from prometar_jax.prompt_learners import text as text_lib


def init(key, clip, config):
  k_text, k_vision, _ = learner_lib.init_keys(key)
  d_v = clip.config.vision.width
  return {
    "text": text_lib.text_context(k_text, clip, config, config.depth_text),
    "vision": learner_lib.random_prompts(
      k_vision, (config.depth_vision, config.n_ctx_vision, d_v), config
    ),
  }


def tower_prompts(params, config):
  del config
  return params["text"], params["vision"]


LEARNER = learner_lib.register(
  learner_lib.Learner(
    name="ivlp",
    branches=("text", "vision"),
    init=init,
    tower_prompts=tower_prompts,
    # 4 + 4 tokens in 9 layers (ProMetaR's and PromptSRC's setting).
    defaults=dict(n_ctx_text=4, n_ctx_vision=4, depth_text=9, depth_vision=9),
  )
)
