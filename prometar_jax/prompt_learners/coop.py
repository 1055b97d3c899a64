"""CoOp: a learned text context at the input of the text tower only.

Parameters {"text": [1, n_ctx_text, d_t]}: shallow by definition, whatever
`depth_text`; slot 0 starts from the token embeddings of the init words.
"""

from prometar_jax.prompt_learners import learner as learner_lib
from prometar_jax.prompt_learners import text as text_lib


def init(key, clip, config):
  k_text, _, _ = learner_lib.init_keys(key)
  return {"text": text_lib.text_context(k_text, clip, config, depth=1)}


def tower_prompts(params, config):
  del config
  return params["text"], None


LEARNER = learner_lib.register(
  learner_lib.Learner(
    name="coop",
    branches=("text",),
    init=init,
    tower_prompts=tower_prompts,
    # 4 tokens from "a photo of a".
    defaults=dict(n_ctx_text=4, depth_text=1),
  )
)
