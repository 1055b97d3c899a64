"""Prompt learners: one file each, one interface, selected by name.

Built in (each file registers its learner on import):

* ivlp.py: IVLP, ProMetaR's base (deep prompts in both towers);
* coop.py: CoOp (a shallow text context);
* vpt.py: VPT-deep (deep vision prompts);
* maple.py: MaPLe (text prompts, vision prompts as learned maps of them);
* zeroshot.py: zero-shot CLIP (no parameters).

learner.py defines the interface (`Learner`: name, prompted towers, init,
tower prompts, published defaults), the registry (`register`, `get`,
`names`) and the learner-agnostic forward (`init`, `tower_prompts`,
`encode`, `apply`); text.py the text side every learner shares (class
prompts, their token ids, trimming and length groups).

A new learner is one new file that defines its `init` and
`tower_prompts` and registers a `Learner` under a new name; once that file
is imported, `config.model.learner=<name>` trains and evaluates it like the
built-in ones (docs/method.md, "Adding a learner").
"""

# The built-in learners, registered by importing them.
from prometar_jax.prompt_learners import coop, ivlp, maple, vpt, zeroshot
from prometar_jax.prompt_learners.learner import (
  PROMPT_BRANCHES,
  Learner,
  PromptConfig,
  apply,
  count_params,
  encode,
  get,
  init,
  init_keys,
  names,
  random_prompts,
  register,
  tower_prompts,
  unregister,
)
from prometar_jax.prompt_learners.text import (
  bucket_token_ids,
  class_prompt_texts,
  class_token_ids,
  encode_text,
  prompt_length,
  prompt_lengths,
  prompt_prefix,
  shared_prompt_rows,
  text_context,
  trim_token_ids,
)

__all__ = [
  "apply",
  "bucket_token_ids",
  "class_prompt_texts",
  "class_token_ids",
  "coop",
  "count_params",
  "encode",
  "encode_text",
  "get",
  "init",
  "init_keys",
  "ivlp",
  "Learner",
  "maple",
  "names",
  "prompt_length",
  "prompt_lengths",
  "prompt_prefix",
  "shared_prompt_rows",
  "PROMPT_BRANCHES",
  "PromptConfig",
  "random_prompts",
  "register",
  "text_context",
  "tower_prompts",
  "trim_token_ids",
  "unregister",
  "vpt",
  "zeroshot",
]
