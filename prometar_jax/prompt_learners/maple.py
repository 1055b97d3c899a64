"""MaPLe: text prompts, and vision prompts as learned maps of them.

Parameters {"text": [depth_text, n_ctx_text, d_t], "proj": {"kernel":
[depth_text, d_t, d_v], "bias": [depth_text, d_v]}}: the vision prompts of
layer l are text[l] @ kernel[l] + bias[l] (the coupling), so the vision
tower gets n_ctx_text tokens in depth_text layers (n_ctx_vision and
depth_vision are not read). The gradnet gates the text prompts; the
coupling maps take the fixed gate.
"""

import jax
import jax.numpy as jnp
import numpy as np

from prometar_jax.prompt_learners import learner as learner_lib
from prometar_jax.prompt_learners import text as text_lib


def init(key, clip, config):
  k_text, _, k_proj = learner_lib.init_keys(key)
  d_t, d_v = clip.config.text.width, clip.config.vision.width
  depth = config.depth_text
  # torch nn.Linear default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  bound = 1.0 / np.sqrt(d_t)
  kk, kb = jax.random.split(k_proj)
  return {
    "text": text_lib.text_context(k_text, clip, config, depth),
    "proj": {
      "kernel": jax.random.uniform(
        kk, (depth, d_t, d_v), minval=-bound, maxval=bound
      ),
      "bias": jax.random.uniform(kb, (depth, d_v), minval=-bound, maxval=bound),
    },
  }


def tower_prompts(params, config):
  del config
  text, proj = params["text"], params["proj"]
  vision = jnp.einsum("lnd,lde->lne", text, proj["kernel"])
  return text, vision + proj["bias"][:, None, :]


LEARNER = learner_lib.register(
  learner_lib.Learner(
    name="maple",
    branches=("text", "vision"),
    init=init,
    tower_prompts=tower_prompts,
    # 2 coupled tokens in 9 layers.
    defaults=dict(n_ctx_text=2, n_ctx_vision=2, depth_text=9, depth_vision=9),
  )
)
