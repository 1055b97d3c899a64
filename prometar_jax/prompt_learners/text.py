"""The text side shared by every learner: class prompts and their tokens.

Learner-agnostic pieces: the class prompt texts (a learned context's
placeholders or the hand-crafted template), their token ids tokenized once
on the host, trimmed or grouped by length (exact speedups of the text
tower), the text tower over such groups, and the text context's init from
the embeddings of the init words (IVLP, CoOp, MaPLe).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from prometar_jax.models import clip as clip_lib
from prometar_jax.templates import SINGLE_TEMPLATE

if TYPE_CHECKING:
  from prometar_jax.prompt_learners.learner import PromptConfig


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
  """One prompt per class: the learned context's, or the template.

  A learner that prompts the text tower gets "<prefix> <class>.", whose
  n_ctx_text positions after SOT its text prompts replace; the others get
  the hand-crafted "a photo of a <class>.".
  """
  names = [c.replace("_", " ") for c in classnames]
  if "text" not in config.learner.branches:
    return [SINGLE_TEMPLATE.format(n) for n in names]
  prefix = prompt_prefix(config, clip)
  return [f"{prefix} {n}." for n in names]


def text_context(
  key: jax.Array, clip: clip_lib.CLIP, config: PromptConfig, depth: int
) -> jax.Array:
  """Text prompts [depth, n_ctx_text, width] ~ N(0, init_std^2).

  Slot 0 holds the token embeddings of the init words when they fit in
  n_ctx_text (the words the class prompts then hold, `prompt_prefix`).
  """
  width = clip.config.text.width
  text = config.init_std * jax.random.normal(
    key, (depth, config.n_ctx_text, width)
  )
  if _uses_init_words(config, clip):
    ids = clip.tokenize([config.init_words])[0, 1 : 1 + config.n_ctx_text]
    table = clip.params["text_model"]["token_embedding"]["embedding"]
    text = text.at[0].set(jnp.asarray(table)[ids])
  return text


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
  token_ids: np.ndarray,
  max_buckets: int = 2,
  multiple: int = 1,
  shared_rows: int = 0,
  min_saving: float = 0.05,
):
  """Class prompts in groups of similar length, each trimmed to its longest.

  Exact (see `trim_token_ids`), and the text tower runs over fewer token
  positions: real class names are mostly short with a long tail, so one
  trim length set by the longest name wastes most positions of the others.
  The prompted text tower runs every group in one pass (`clip.TextTower`):
  a group costs a few small attention ops per layer, so groups are cheap,
  but not free; a group is kept only if it saves at least `min_saving` of
  the positions of the grouping with one group fewer. (A plain tower runs
  a pass per group; it only computes the frozen class features, once.)

  Args:
    token_ids: [C, L] class prompt ids.
    max_buckets: at most this many groups (1: the trimmed ids, unchanged).
    multiple: round each group's length up to a multiple of this.
    shared_rows: leading positions every prompt shares (SOT and a learned
      context: `shared_prompt_rows`), which the prompted text tower
      computes once for all classes; they are not counted per class.
    min_saving: the fraction of positions a further group must save.

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
  per_class = np.maximum(values - shared_rows, 1)
  best[0] = upto * per_class
  for k in range(1, max_buckets):
    for j in range(n):
      for i in range(j):  # the last group holds values[i + 1 : j + 1]
        cost = best[k - 1, i] + (upto[j] - upto[i]) * per_class[j]
        if cost < best[k, j]:
          best[k, j], cut[k, j] = cost, i
  groups = 1
  for k in range(1, max_buckets):
    if best[k, n - 1] <= (1 - min_saving) * best[groups - 1, n - 1]:
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


def shared_prompt_rows(config: PromptConfig) -> int:
  """Leading class-prompt positions the text tower shares across classes:
  SOT and the learned context (none without a text branch)."""
  if "text" not in config.learner.branches:
    return 0
  return 1 + config.n_ctx_text


def encode_text(clip: clip_lib.CLIP, token_ids, text_prompts):
  """Unnormalized text features [C, D] of [C, L] ids or `bucket_token_ids`."""
  if isinstance(token_ids, dict):
    groups = tuple(token_ids["buckets"])
    return clip.encode_text(groups, text_prompts)[token_ids["order"]]
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
