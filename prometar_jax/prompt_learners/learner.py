"""What a prompt learner is, the registry of learners by name, and the
learner-agnostic forward (`init`, `tower_prompts`, `encode`, `apply`).

A learner is a `Learner` record: its name, the CLIP towers it prompts, a
function giving fresh parameters and a function turning them into the
per-tower prompt arrays that `models.clip` consumes. Every learner file of
this package defines one and registers it; `PromptConfig.kind` (the config's
`model.learner`) selects it by name. Everything above the towers' prompts
(losses, the ProMetaR step, evaluation) is learner-agnostic.

Parameters are a dict pytree. Its entries "text" and "vision"
(`PROMPT_BRANCHES`), when present, are stacked prompt tensors
[depth, n_ctx, width] that ProMetaR's gradnet gates layer by layer; any
other entry (MaPLe's coupling maps) is trained with the fixed gate
`fixed_gamma` (`gradnet.modulate`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from prometar_jax.models import clip as clip_lib
from prometar_jax.prompt_learners import text as text_lib

PyTree = Any
PROMPT_BRANCHES = ("text", "vision")  # entries that hold [depth, n_ctx, d]


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  """Which learner (a registered name), and the common hyper-parameters.

  Each learner reads the fields it needs and ignores the others (CoOp's
  context is one layer deep whatever `depth_text`). A learned text context
  has `n_ctx_text` tokens: the class prompts hold that many placeholders
  (`text.class_prompt_texts`). A hyper-parameter of one learner only is a
  field of that learner's own code, fixed at registration (register a
  second name for a second setting).
  """

  kind: str = "ivlp"
  n_ctx_text: int = 4
  n_ctx_vision: int = 4
  depth_text: int = 9
  depth_vision: int = 9
  init_words: str = "a photo of a"
  init_std: float = 0.02

  def __post_init__(self):
    get(self.kind)  # an unknown name fails here, listing the registered ones

  @property
  def learner(self) -> Learner:
    return get(self.kind)


@dataclasses.dataclass(frozen=True, eq=False)
class Learner:
  """A prompt learner: the interface every learner file fills in.

  Attributes:
    name: its registry key (`PromptConfig.kind`, `config.model.learner`).
    branches: the CLIP towers it prompts, in ("text", "vision"). With
      "text", the class prompts are "<n_ctx_text placeholders> <class>."
      and the learned text prompts replace the placeholders; without, they
      are the hand-crafted "a photo of a <class>.". No branch: frozen
      zero-shot CLIP, nothing to train.
    init: (key, clip, config) -> fresh parameters (a dict pytree).
    tower_prompts: (params, config) -> (text prompts | None, vision
      prompts | None), [depth, n_ctx, width] each, a tower's None exactly
      when it is not in `branches`.
    defaults: `PromptConfig` fields of the learner's published setting,
      which `configs.common.apply_method` sets for `method=<name>`.
  """

  name: str
  branches: tuple[str, ...]
  init: Callable[[jax.Array, clip_lib.CLIP, PromptConfig], PyTree]
  tower_prompts: Callable[[PyTree, PromptConfig], tuple[Any, Any]]
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    unknown = set(self.branches) - set(PROMPT_BRANCHES)
    if unknown:
      raise ValueError(
        f"learner {self.name!r}: branches {sorted(unknown)} are not CLIP "
        f"towers; use some of {PROMPT_BRANCHES}"
      )
    fields = {f.name for f in dataclasses.fields(PromptConfig)} - {"kind"}
    unknown = set(self.defaults) - fields
    if unknown:
      raise ValueError(
        f"learner {self.name!r}: defaults {sorted(unknown)} are not "
        f"PromptConfig fields ({sorted(fields)})"
      )

  @property
  def trained(self) -> bool:
    """False for frozen CLIP (no prompted tower): no training to run."""
    return bool(self.branches)


_REGISTRY: dict[str, Learner] = {}


def register(learner: Learner, replace: bool = False) -> Learner:
  """Makes `learner` usable by its name everywhere; returns it.

  A learner defined outside this package is registered by importing the
  file that defines it (before its name is used, e.g. from the config file
  that selects it). A second learner of a taken name is an error unless
  `replace` (redefining a learner in a notebook).
  """
  if learner.name in _REGISTRY and not replace:
    raise ValueError(
      f"a prompt learner named {learner.name!r} is already registered; "
      "pick another name or pass replace=True"
    )
  _REGISTRY[learner.name] = learner
  return learner


def unregister(name: str) -> None:
  """Forgets a registered learner (undoes `register`)."""
  get(name)
  del _REGISTRY[name]


def names() -> tuple[str, ...]:
  """The registered learner names, in registration order."""
  return tuple(_REGISTRY)


def get(name: str) -> Learner:
  """The learner registered as `name`."""
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(
      f"unknown prompt learner {name!r}; registered: {', '.join(names())}"
    ) from None


# ---------------------------------------------------------------------------
# The learner-agnostic forward
# ---------------------------------------------------------------------------


def init(key: jax.Array, clip: clip_lib.CLIP, config: PromptConfig) -> PyTree:
  """Fresh parameters of the configured learner."""
  return config.learner.init(key, clip, config)


def tower_prompts(params: PyTree, config: PromptConfig):
  """(text_prompts | None, vision_prompts | None) for the CLIP towers."""
  learner = config.learner
  prompts = learner.tower_prompts(params, config)
  for branch, p in zip(PROMPT_BRANCHES, prompts, strict=True):
    if (p is not None) != (branch in learner.branches):
      raise ValueError(
        f"learner {learner.name!r} declares branches {learner.branches} "
        f"but gave {'no ' if p is None else ''}{branch} prompts"
      )
  return prompts


def encode(params, clip: clip_lib.CLIP, token_ids, images, config):
  """Unnormalized prompted (text [C, D], image [N, D]) features.

  `token_ids`: [C, L] ids, or groups of them from `bucket_token_ids`.
  """
  text_prompts, vision_prompts = tower_prompts(params, config)
  text = text_lib.encode_text(clip, token_ids, text_prompts)
  image = clip.encode_image(images, vision_prompts)
  return text, image


def apply(params, clip: clip_lib.CLIP, token_ids, images, config) -> dict:
  """Logits [N, C] and normalized features of a learner.

  Args:
    params: the learner's parameters.
    clip: the frozen CLIP (a pytree: can be a jit argument).
    token_ids: [C, L] class prompt ids from `class_token_ids`.
    images: [N, H, W, 3] CLIP-normalized pixels.
    config: the learner's `PromptConfig`.
  """
  text, image = encode(params, clip, token_ids, images, config)
  t, v = clip_lib.normalize(text), clip_lib.normalize(image)
  return {
    "logits": clip.logit_scale * v @ t.T,
    "text_features": t,
    "image_features": v,
  }


def count_params(params: PyTree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


# ---------------------------------------------------------------------------
# Shared pieces of the built-in learners' init
# ---------------------------------------------------------------------------


def init_keys(key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(text, vision, other) init keys, split the same way in every learner.

  A branch then starts from the same values whichever learner it belongs
  to (IVLP's and CoOp's text context of one seed are equal).
  """
  k_text, k_vision, k_other = jax.random.split(key, 3)
  return k_text, k_vision, k_other


def random_prompts(key: jax.Array, shape, config: PromptConfig) -> jax.Array:
  """Prompts ~ N(0, init_std^2) (the official deep-prompt init)."""
  return config.init_std * jax.random.normal(key, shape)
