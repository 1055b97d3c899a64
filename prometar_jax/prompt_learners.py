"""Prompt learners as pure functions over parameter pytrees.

A learner is described by a `PromptConfig` (hashable, static under jit). Its
parameters are a dict keyed by branch, with the layer as the leading axis:

* IVLP (ProMetaR's base): {"text": [depth_t, n_ctx_t, d_t],
  "vision": [depth_v, n_ctx_v, d_v]}; text slot 0 is initialised from the
  token embeddings of the init words, everything else ~ N(0, 0.02^2).
* CoOp: {"text": [1, n_ctx, d_t]} (shallow text context only).
* VPT: {"vision": [depth_v, n_ctx_v, d_v]} (deep vision prompts; the text
  side is frozen CLIP on "a photo of a {}.").
* MaPLe: {"text": [J, n_ctx, d_t], "proj": {"kernel": [J, d_t, d_v],
  "bias": [J, d_v]}}: vision prompts are learned linear maps of the text
  prompts, layer by layer (coupling).
* zero-shot CLIP: {} (no parameters).

`tower_prompts(params, config)` turns any of them into the per-tower prompt
arrays that `models.clip` consumes, so everything above (losses, the ProMetaR
step) is learner-agnostic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prometar_jax.models import clip as clip_lib
from prometar_jax.templates import SINGLE_TEMPLATE

PyTree = Any
KINDS = ("ivlp", "coop", "vpt", "maple", "zeroshot")
PROMPT_BRANCHES = ("text", "vision")  # keys that hold [depth, n_ctx, d]


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  """Which learner, and its prompt lengths and depths."""

  kind: str = "ivlp"
  n_ctx_text: int = 4
  n_ctx_vision: int = 4
  depth_text: int = 9
  depth_vision: int = 9
  init_words: str = "a photo of a"
  init_std: float = 0.02

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(
        f"unknown prompt learner {self.kind!r}; use one of {KINDS}"
      )

  @property
  def has_text(self) -> bool:
    return self.kind in ("ivlp", "coop", "maple")

  @property
  def has_vision(self) -> bool:
    return self.kind in ("ivlp", "vpt", "maple")

  @property
  def text_depth(self) -> int:
    return 1 if self.kind == "coop" else self.depth_text

  @classmethod
  def from_config(cls, config) -> PromptConfig:
    """From an ml_collections / dict config with the same field names."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(config).items() if k in fields})


def _uses_init_words(config: PromptConfig, clip: clip_lib.CLIP) -> bool:
  if not config.init_words:
    return False
  ids = clip.tokenize([config.init_words])[0]
  n_words = int(np.argmax(ids == ids.max())) - 1  # tokens between SOT and EOT
  return config.n_ctx_text <= n_words


def prompt_prefix(config: PromptConfig, clip: clip_lib.CLIP | None) -> str:
  """The text before the class name: the init words or 'X X ... X'."""
  if clip is not None and _uses_init_words(config, clip):
    return config.init_words.replace("_", " ")
  return " ".join(["X"] * config.n_ctx_text)


def class_prompt_texts(
  config: PromptConfig, clip: clip_lib.CLIP, classnames: Sequence[str]
) -> list[str]:
  names = [c.replace("_", " ") for c in classnames]
  if not config.has_text:
    return [SINGLE_TEMPLATE.format(n) for n in names]
  prefix = prompt_prefix(config, clip)
  return [f"{prefix} {n}." for n in names]


def prompt_lengths(token_ids: np.ndarray) -> np.ndarray:
  """[C] positions of each prompt up to and including its (first) EOT token.

  The EOT token has the largest id of its row (SOT/EOT are the last two ids
  of the CLIP vocabulary), which is also how both pooling rules find it.
  """
  ids = np.asarray(token_ids)
  return np.argmax(ids == ids.max(axis=1, keepdims=True), axis=1) + 1


def prompt_length(token_ids: np.ndarray) -> int:
  """Positions up to and including the longest prompt's EOT token."""
  return int(prompt_lengths(token_ids).max())


def trim_token_ids(token_ids: np.ndarray, multiple: int = 1) -> np.ndarray:
  """Drops the positions after the longest prompt's EOT (exact speedup).

  Under the causal mask a row's EOT feature never sees later positions, so
  the text tower on [C, L] gives the same features as on [C, 77]. `multiple`
  rounds L up (fewer distinct shapes, friendlier to accelerators).
  """
  ids = np.asarray(token_ids)
  length = prompt_length(ids)
  length = min(ids.shape[1], -(-length // multiple) * multiple)
  return ids[:, :length]


def bucket_token_ids(
  token_ids: np.ndarray, max_buckets: int = 2, multiple: int = 8
):
  """Class prompts in groups of similar length, each trimmed to its longest.

  Exact (see `trim_token_ids`), and the text tower runs over fewer token
  positions: real class names are mostly short with a long tail, so one
  trim length set by the longest name wastes most positions of the others.
  A group is kept only if it saves at least a fifth of the positions of the
  grouping with one group fewer (each group is one more text-tower call).

  Args:
    token_ids: [C, L] class prompt ids.
    max_buckets: at most this many groups (1: the trimmed ids, unchanged).
    multiple: round each group's length up to a multiple of this.

  Returns:
    The trimmed [C, L'] array when one group is best; otherwise
    {"buckets": ([C_b, L_b] ids, ...) shortest first, "order": [C] int32},
    where `order[c]` is class c's row in the concatenated buckets (what
    `encode_text` gathers).
  """
  ids = np.asarray(token_ids)
  lengths = -(-prompt_lengths(ids) // multiple) * multiple
  lengths = np.minimum(lengths, ids.shape[1])
  # Candidate group lengths (ascending) and how many classes fit in each.
  values, counts = np.unique(lengths, return_counts=True)
  upto = np.cumsum(counts)  # classes of length <= values[j]
  # best[k][j]: fewest positions covering values[:j + 1] with k + 1 groups.
  n = len(values)
  best = np.full((max_buckets, n), float("inf"))
  cut = np.zeros((max_buckets, n), int)
  best[0] = upto * values
  for k in range(1, max_buckets):
    for j in range(n):
      for i in range(j):  # the last group holds values[i + 1 : j + 1]
        cost = best[k - 1, i] + (upto[j] - upto[i]) * values[j]
        if cost < best[k, j]:
          best[k, j], cut[k, j] = cost, i
  groups = 1
  for k in range(1, max_buckets):
    if best[k, n - 1] <= 0.8 * best[groups - 1, n - 1]:
      groups = k + 1
  if groups == 1:
    return trim_token_ids(ids, multiple)
  tops, j = [], n - 1
  for k in range(groups - 1, -1, -1):
    tops.append(int(values[j]))
    j = cut[k, j]
  tops = tops[::-1]
  buckets, rows = [], []
  lower = 0
  for top in tops:
    members = np.flatnonzero((lengths > lower) & (lengths <= top))
    buckets.append(ids[members, :top])
    rows.append(members)
    lower = top
  order = np.empty(len(ids), np.int32)
  order[np.concatenate(rows)] = np.arange(len(ids), dtype=np.int32)
  return {"buckets": tuple(buckets), "order": order}


def encode_text(clip: clip_lib.CLIP, token_ids, text_prompts):
  """Unnormalized text features [C, D] of [C, L] ids or `bucket_token_ids`."""
  if isinstance(token_ids, dict):
    parts = [
      clip.encode_text(ids, text_prompts) for ids in token_ids["buckets"]
    ]
    return jnp.concatenate(parts)[token_ids["order"]]
  return clip.encode_text(token_ids, text_prompts)


def class_token_ids(
  config: PromptConfig,
  clip: clip_lib.CLIP,
  classnames: Sequence[str],
  trim: bool = True,
) -> np.ndarray:
  """[C, L] int32 ids of the class prompts, tokenized once on the host.

  With a text context, positions 1..n_ctx of these ids are the ones the
  learned context replaces (the official `token_prefix`/`token_suffix` cut).
  With `trim` (default), L is the longest prompt's length (see
  `trim_token_ids`); otherwise 77.
  """
  ids = clip.tokenize(class_prompt_texts(config, clip, classnames))
  return trim_token_ids(ids, multiple=8) if trim else ids


def init(
  key: jax.Array,
  clip: clip_lib.CLIP,
  classnames: Sequence[str],
  config: PromptConfig,
) -> PyTree:
  """Fresh learner parameters (see the module docstring for the layout)."""
  del classnames  # prompts are class-agnostic; kept for the common signature
  cfg = clip.config
  d_t, d_v = cfg.text.width, cfg.vision.width
  k_text, k_vis, k_proj = jax.random.split(key, 3)
  normal = lambda k, shape: config.init_std * jax.random.normal(k, shape)  # noqa: E731
  params = {}
  if config.has_text:
    text = normal(k_text, (config.text_depth, config.n_ctx_text, d_t))
    if _uses_init_words(config, clip):
      ids = clip.tokenize([config.init_words])[0, 1 : 1 + config.n_ctx_text]
      table = clip.params["text_model"]["token_embedding"]["embedding"]
      text = text.at[0].set(jnp.asarray(table)[ids])
    params["text"] = text
  if config.kind in ("ivlp", "vpt"):
    params["vision"] = normal(
      k_vis, (config.depth_vision, config.n_ctx_vision, d_v)
    )
  if config.kind == "maple":
    # torch nn.Linear default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / np.sqrt(d_t)
    kk, kb = jax.random.split(k_proj)
    depth = config.text_depth
    params["proj"] = {
      "kernel": jax.random.uniform(
        kk, (depth, d_t, d_v), minval=-bound, maxval=bound
      ),
      "bias": jax.random.uniform(kb, (depth, d_v), minval=-bound, maxval=bound),
    }
  return params


def tower_prompts(params: PyTree, config: PromptConfig):
  """(text_prompts | None, vision_prompts | None) for the CLIP towers."""
  text = params.get("text")
  if config.kind == "maple":
    proj = params["proj"]
    vision = jnp.einsum("lnd,lde->lne", text, proj["kernel"])
    vision = vision + proj["bias"][:, None, :]
  else:
    vision = params.get("vision")
  return text, vision


def encode(params, clip: clip_lib.CLIP, token_ids, images, config):
  """Unnormalized prompted (text [C, D], image [N, D]) features.

  `token_ids`: [C, L] ids, or groups of them from `bucket_token_ids`.
  """
  text_prompts, vision_prompts = tower_prompts(params, config)
  text = encode_text(clip, token_ids, text_prompts)
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
