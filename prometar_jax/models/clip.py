"""CLIP in Flax Linen, numerically equal to transformers' PyTorch CLIPModel.

The towers take prompt tokens as call arguments (never as module parameters),
placed exactly where the official IVLP / ProMetaR code puts them:

* text: `prompts[0]` replaces token positions 1..n_ctx of the input embeddings
  (before the positional embedding is added, so those rows get positions
  1..n_ctx), and `prompts[i]` replaces positions 1..n_ctx at the input of block
  i for i = 1..depth-1 (no positional embedding).
* vision: `prompts[0]` is appended after [CLS, patches] after the positional
  embedding and before `ln_pre`; `prompts[i]` replaces the last n_ctx tokens at
  the input of block i for i = 1..depth-1.

Blocks are `nn.scan`ned over depth (layer = leading axis of every block
parameter), so the per-layer deep prompts are a scanned input with a boolean
"replace here" flag: fixed shapes, no Python branching on the layer index.

`load(name_or_path)` reads a Hugging Face CLIP checkpoint (safetensors through
numpy, no torch) and returns a `CLIP` bundle with `encode_image`,
`encode_text`, `tokenize` and the parameter pytree.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Array = jax.Array

CONTEXT_LENGTH = 77


def _at_least_f32(dtype):
  """Numerically sensitive parts (LN, softmax) run in fp32, or fp64 if asked."""
  return jnp.promote_types(dtype, jnp.float32)


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TowerConfig:
  """Shape of one transformer tower (hashable: used as a static jit arg)."""

  width: int
  layers: int
  heads: int
  mlp_dim: int
  act: str = "quick_gelu"
  eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  """Shapes of a CLIP model, read from a Hugging Face `CLIPConfig`."""

  vision: TowerConfig
  text: TowerConfig
  projection_dim: int
  image_size: int
  patch_size: int
  vocab_size: int = 49408
  context_length: int = CONTEXT_LENGTH
  eos_token_id: int = 49407

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @classmethod
  def from_hf(cls, hf: Any) -> ClipConfig:
    """From a `transformers.CLIPConfig` (or its `to_dict()`)."""
    if not isinstance(hf, dict):
      hf = hf.to_dict()
    v, t = hf["vision_config"], hf["text_config"]

    def tower(c):
      return TowerConfig(
        width=c["hidden_size"],
        layers=c["num_hidden_layers"],
        heads=c["num_attention_heads"],
        mlp_dim=c["intermediate_size"],
        act=c["hidden_act"],
        eps=c["layer_norm_eps"],
      )

    return cls(
      vision=tower(v),
      text=tower(t),
      projection_dim=hf["projection_dim"],
      image_size=v["image_size"],
      patch_size=v["patch_size"],
      vocab_size=t["vocab_size"],
      context_length=t["max_position_embeddings"],
      eos_token_id=t["eos_token_id"],
    )


# openai/clip-vit-base-patch16's shapes (the paper's backbone), for shape
# checks and benchmarks without its weights.
VIT_B16 = ClipConfig(
  vision=TowerConfig(width=768, layers=12, heads=12, mlp_dim=3072),
  text=TowerConfig(width=512, layers=12, heads=8, mlp_dim=2048),
  projection_dim=512,
  image_size=224,
  patch_size=16,
)


_ACTIVATIONS = {
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
  "gelu": functools.partial(jax.nn.gelu, approximate=False),
  "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
  "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
  "relu": jax.nn.relu,
}


# ---------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------


class LayerNorm(nn.Module):
  """LayerNorm computed in float32 whatever the compute dtype (as torch)."""

  eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,))
    bias = self.param("bias", nn.initializers.zeros, (d,))
    x = x.astype(_at_least_f32(x.dtype))
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
    return y.astype(self.dtype)


def _rows(x: Array, index: Array) -> Array:
  """x[i, index[i]] for each sequence i: [N, L, ...] -> [N, ...]."""
  return x[jnp.arange(x.shape[0]), index]


def _heads_major(x: Array, heads: int) -> Array:
  """[..., L, d] -> [..., heads, L, d / heads].

  Heads before rows: each head's rows are contiguous. XLA's CPU backend
  runs attention's batched matmuls far slower on the rows-major layout
  (an attention block 1.3x slower forward; `docs/performance.md`).
  """
  *lead, length, d = x.shape
  x = x.reshape(*lead, length, heads, d // heads)
  return jnp.swapaxes(x, -3, -2)


def _rows_major(x: Array) -> Array:
  """[..., heads, L, c] -> [..., L, heads * c] (the inverse)."""
  x = jnp.swapaxes(x, -3, -2)
  return x.reshape(*x.shape[:-2], -1)


class Attention(nn.Module):
  """Multi-head self-attention with HF's q/k/v/out projections.

  With `pool` ([N] row indices), only those rows are queried: [N, 1, d]
  out, the keys and values still from every row (a tower's last layer,
  whose other rows are never read).
  """

  cfg: TowerConfig
  causal: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, pool=None):
    n, length, d = x.shape
    h = self.cfg.heads
    dense = functools.partial(nn.Dense, d, dtype=self.dtype)
    split = lambda y: _heads_major(y, h)  # noqa: E731
    queries = x if pool is None else _rows(x, pool)[:, None]
    q = split(dense(name="q_proj")(queries)) * (d // h) ** -0.5
    k = split(dense(name="k_proj")(x))
    v = split(dense(name="v_proj")(x))
    scores = jnp.einsum("nhqc,nhkc->nhqk", q, k)
    scores = scores.astype(_at_least_f32(scores.dtype))
    if self.causal:
      keys = jnp.arange(length)
      if pool is None:
        mask = (keys[None, :] <= keys[:, None])[None, None]
      else:  # each pooled row sees the keys up to its own position
        mask = (keys[None, :] <= pool[:, None])[:, None, None, :]
      scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = _rows_major(jnp.einsum("nhqk,nhkc->nhqc", probs, v))
    return dense(name="out_proj")(out)


class Block(nn.Module):
  """Pre-LN residual block; optionally replaces prompt rows at its input.

  Called under `nn.scan`: `carry` is the token sequence, `(prompt, replace)`
  are this layer's slice of the scanned deep prompts ([n_ctx, width] and a
  scalar bool) and `prompt_rows` is a static description of the prompt
  rows. With `pool` ([N] row indices) only those rows come out ([N, 1, D]).
  """

  cfg: TowerConfig
  causal: bool
  prompt_rows: tuple[int, int] | None = None  # (start, n_ctx) or None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, scanned, pool=None):
    prompt, replace = scanned
    if self.prompt_rows is not None:
      # Only the prompt rows are selected (not a where over every row):
      # the prompt's gradient is then a sum over those rows alone.
      start, n_ctx = self.prompt_rows
      end = start + n_ctx
      slot = x[:, start:end]
      prompt = jnp.broadcast_to(prompt.astype(x.dtype), slot.shape)
      slot = jnp.where(replace, prompt, slot)
      x = jnp.concatenate([x[:, :start], slot, x[:, end:]], axis=1)
    cfg = self.cfg
    y = LayerNorm(cfg.eps, self.dtype, name="layer_norm1")(x)
    if pool is not None:
      x = _rows(x, pool)[:, None]
    x = x + Attention(cfg, self.causal, self.dtype, name="self_attn")(y, pool)
    y = LayerNorm(cfg.eps, self.dtype, name="layer_norm2")(x)
    y = nn.Dense(cfg.mlp_dim, dtype=self.dtype, name="fc1")(y)
    y = _ACTIVATIONS[cfg.act](y)
    y = nn.Dense(cfg.width, dtype=self.dtype, name="fc2")(y)
    return x + y, None


class Encoder(nn.Module):
  """`cfg.layers` Blocks over depth, with deep-prompt replacement.

  Returns the outputs of the `pool` rows only ([N, D]: CLS, EOT), which is
  all a tower reads: the last layer computes attention queries and the MLP
  for those rows alone (about 7% of a tower's work, exactly). The parameters
  mirror that split: "layers" holds the first `layers - 1` blocks stacked
  (layer = leading axis, as `nn.scan` creates them; a `lax.scan` runs over
  them) and "last_layer" the pooled block. Stored apart, the step never
  slices the stack, which would copy every layer's weights each call.
  """

  cfg: TowerConfig
  causal: bool
  prompt_rows: tuple[int, int] | None = None
  remat: bool | str = "matmuls"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deep_prompts, replace, pool):
    args = (self.cfg, self.causal, self.prompt_rows, self.dtype)
    if self.is_initializing():  # creates "layers" (stacked) and "last_layer"
      head_inputs = (deep_prompts[:-1], replace[:-1])
      last_inputs = (deep_prompts[-1], replace[-1])
      scanned = nn.scan(
        Block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=0,
        length=self.cfg.layers - 1,
      )
      x, _ = scanned(*args, name="layers")(x, head_inputs)
      out, _ = Block(*args, name="last_layer")(x, last_inputs, pool)
      return out[:, 0]
    block = Block(*args, parent=None)
    out = _through_layers(
      block,
      self.variables["params"],
      x,
      deep_prompts,
      replace,
      pool,
      self.remat,
    )
    return out[:, 0]


# What a block's backward pass keeps of its forward (`model.remat`):
#   "none"     every intermediate;
#   "matmuls"  only the outputs of the weight matmuls (q, k, v, out, fc1,
#              fc2); LayerNorms, attention scores and softmax, activations
#              are recomputed from them. The default: a few percent more
#              FLOPs (attention's own matmuls run twice), a third less
#              memory, and on the CPU a faster step, because every step
#              writes fresh pages of its temporary buffer and each page
#              costs a fault (docs/performance.md);
#   "full"     nothing: the whole block is recomputed (least memory, an
#              extra forward per backward; for hundreds of classes).
REMAT_MODES = ("none", "matmuls", "full")


def remat_mode(remat: bool | str) -> str:
  """The canonical `remat` setting; True / False mean "full" / "none"."""
  if isinstance(remat, bool):
    return "full" if remat else "none"
  if remat not in REMAT_MODES:
    raise ValueError(
      f"remat={remat!r}: use one of {REMAT_MODES} (or True / False for "
      f'"full" / "none")'
    )
  return remat


def _through_layers(block, params, carry, deep_prompts, replace, pool, remat):
  """The layer loop of `Encoder` and `PrefixEncoder` (`block`: a `Block`
  or a `PrefixBlock`): the first `layers - 1` blocks scanned over the
  stacked params["layers"], then params["last_layer"] on the `pool` rows.
  """

  def layer(carry, inputs):
    layer_params, prompt, flag = inputs
    return block.apply({"params": layer_params}, carry, (prompt, flag))

  mode = remat_mode(remat)
  if mode != "none":
    policy = None  # "full": save nothing
    if mode == "matmuls":
      policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    layer = jax.checkpoint(layer, prevent_cse=False, policy=policy)
  head = (params["layers"], deep_prompts[:-1], replace[:-1])
  carry, _ = jax.lax.scan(layer, carry, head)
  last = (deep_prompts[-1], replace[-1])
  out, _ = block.apply({"params": params["last_layer"]}, carry, last, pool)
  return out


# ---------------------------------------------------------------------------
# The prompted text tower over a shared prefix
# ---------------------------------------------------------------------------
#
# With a learned text context, every class prompt starts with the same rows:
# SOT, then the n_ctx context rows (replaced by the same deep prompts at
# every layer). Under the causal mask those rows only ever see each other,
# so at every layer they are the same for every class: they are computed
# once ([P, D], P = 1 + n_ctx) and the class rows attend to their keys and
# values. Exact; at the usual 16-token prompts of 4 context tokens this
# removes 5/16 of the text tower's rows.
#
# The class rows come in length groups ([N_g, S_g] each, S_g = L_g - P:
# `prompt_learners.bucket_token_ids`), all in ONE pass: the tower's carry is
# the stack of the shared rows and every group's rows, [P + sum N_g S_g, D],
# so LayerNorms, projections and MLPs are one matmul over all of them and
# only attention looks at the groups (each sequence sees the shared rows
# and its own). A group then costs a few small attention ops per layer, not
# a pass of its own.

Groups = tuple[tuple[int, int], ...]  # (sequences, own rows) per group


def _group_starts(p: int, groups: Groups) -> list[int]:
  """Row where each group starts in the stacked rows."""
  return [p + int(x) for x in np.cumsum([0] + [n * s for n, s in groups])]


def _shared_count(rows: Array, groups: Groups) -> int:
  """P: the stacked rows before the first group's."""
  return rows.shape[0] - sum(n * s for n, s in groups)


def _split_groups(rows: Array, p: int, groups: Groups):
  """[P + sum N S, d] -> ([P, d], ([N_g, S_g, d], ...))."""
  starts = _group_starts(p, groups)
  return rows[:p], tuple(
    rows[a:b].reshape(n, s, rows.shape[-1])
    for (a, b), (n, s) in zip(zip(starts, starts[1:]), groups)
  )


def _split_pool(pool: Array, groups: Groups) -> list[Array]:
  """[sum N] pooled positions -> one [N_g] array per group."""
  ends = np.cumsum([0] + [n for n, _ in groups])
  return [pool[a:b] for a, b in zip(ends, ends[1:])]


def _pooled_index(p: int, groups: Groups, pool: Array) -> Array:
  """Stacked-row index of the shared rows, then each sequence's pooled row."""
  parts = [jnp.arange(p)]
  for start, (n, s), at in zip(
    _group_starts(p, groups), groups, _split_pool(pool, groups)
  ):
    parts.append(start + s * jnp.arange(n) + at)
  return jnp.concatenate(parts)


class PrefixAttention(nn.Module):
  """Causal self-attention of sequences that share their first P rows.

  `rows` are the stacked [P + sum N_g S_g, d] rows: the shared ones, then
  each group's sequences (`groups`: static (N_g, S_g)). With `pool` ([sum
  N_g] positions within each sequence's own rows) only the shared rows and
  those rows are queried ([P + sum N_g, d] out; an EOT inside the prefix
  can then be pooled too). Same projections (and parameter names) as
  `Attention`.
  """

  cfg: TowerConfig
  groups: Groups
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, rows, pool=None):
    d = rows.shape[-1]
    p = _shared_count(rows, self.groups)
    h = self.cfg.heads
    dense = functools.partial(nn.Dense, d, dtype=self.dtype)
    heads = lambda y: _heads_major(y, h)  # noqa: E731
    k_sh, k_rs = _split_groups(dense(name="k_proj")(rows), p, self.groups)
    v_sh, v_rs = _split_groups(dense(name="v_proj")(rows), p, self.groups)
    if pool is None:
      queries, q_groups = rows, self.groups
    else:
      queries = rows[_pooled_index(p, self.groups, pool)]
      q_groups = tuple((n, 1) for n, _ in self.groups)
    scale = (d // h) ** -0.5
    q_sh, q_rs = _split_groups(dense(name="q_proj")(queries), p, q_groups)
    q_sh, k_sh, v_sh = heads(q_sh) * scale, heads(k_sh), heads(v_sh)
    f32 = _at_least_f32(rows.dtype)
    low = jnp.finfo(f32).min

    # The shared rows: causal among themselves.
    scores = jnp.einsum("hqc,hkc->hqk", q_sh, k_sh).astype(f32)
    causal = jnp.arange(p)[None, :] <= jnp.arange(p)[:, None]
    probs = jax.nn.softmax(jnp.where(causal, scores, low), -1)
    out_sh = jnp.einsum("hqk,hkc->hqc", probs.astype(self.dtype), v_sh)
    outs = [_rows_major(out_sh)]

    # Each sequence's rows: every shared key, its own keys up to the row.
    if pool is None:
      pools = [None] * len(self.groups)
    else:
      pools = _split_pool(pool, self.groups)
    for (_, s), q_r, k_r, v_r, at in zip(self.groups, q_rs, k_rs, v_rs, pools):
      positions = jnp.arange(s)
      if at is None:
        seen = positions[None, :] <= positions[:, None]  # [S queries, S keys]
      else:
        seen = (positions[None, :] <= at[:, None])[:, None, None, :]
      q_r, k_r, v_r = heads(q_r) * scale, heads(k_r), heads(v_r)
      to_shared = jnp.einsum("nhqc,hkc->nhqk", q_r, k_sh).astype(f32)
      to_own = jnp.einsum("nhqc,nhkc->nhqk", q_r, k_r).astype(f32)
      to_own = jnp.where(seen, to_own, low)
      probs = jax.nn.softmax(jnp.concatenate([to_shared, to_own], -1), -1)
      probs = probs.astype(self.dtype)
      out = jnp.einsum("nhqk,hkc->nhqc", probs[..., :p], v_sh)
      out = out + jnp.einsum("nhqk,nhkc->nhqc", probs[..., p:], v_r)
      outs.append(_rows_major(out).reshape(-1, d))
    return dense(name="out_proj")(jnp.concatenate(outs))


class PrefixBlock(nn.Module):
  """`Block` over the stacked rows of `PrefixAttention`; same parameters.

  The deep prompt replaces shared rows 1..n_ctx. With `pool` the shared
  rows and each sequence's pooled row come out ([P + sum N_g, D]).
  """

  cfg: TowerConfig
  n_ctx: int
  groups: Groups
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, rows, scanned, pool=None):
    prompt, replace = scanned
    # A where over every row, not an update of rows 1..n_ctx: on a mesh the
    # stacked rows are split over devices, and an in-place update of a few
    # rows made XLA gather all of them on every device.
    n = rows.shape[0]
    prompted = jnp.pad(
      prompt.astype(rows.dtype), ((1, n - 1 - self.n_ctx), (0, 0))
    )
    at_prompt = (jnp.arange(n) >= 1) & (jnp.arange(n) <= self.n_ctx)
    rows = jnp.where(replace & at_prompt[:, None], prompted, rows)
    cfg = self.cfg
    y = LayerNorm(cfg.eps, self.dtype, name="layer_norm1")(rows)
    attention = PrefixAttention(cfg, self.groups, self.dtype, name="self_attn")
    if pool is not None:
      p = _shared_count(rows, self.groups)
      rows = rows[_pooled_index(p, self.groups, pool)]
    rows = rows + attention(y, pool)
    y = LayerNorm(cfg.eps, self.dtype, name="layer_norm2")(rows)
    y = nn.Dense(cfg.mlp_dim, dtype=self.dtype, name="fc1")(y)
    y = _ACTIVATIONS[cfg.act](y)
    y = nn.Dense(cfg.width, dtype=self.dtype, name="fc2")(y)
    return rows + y, None


class PrefixEncoder(nn.Module):
  """`Encoder` over a shared prefix and length groups; the same parameters.

  Takes the stacked rows ([P + sum N_g S_g, D]) and returns the shared
  rows' outputs and each sequence's pooled row ([P + sum N_g, D]).
  """

  cfg: TowerConfig
  n_ctx: int
  groups: Groups
  remat: bool | str = "matmuls"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, rows, deep_prompts, replace, pool):
    block = PrefixBlock(
      self.cfg, self.n_ctx, self.groups, self.dtype, parent=None
    )
    return _through_layers(
      block,
      self.variables["params"],
      rows,
      deep_prompts,
      replace,
      pool,
      self.remat,
    )


def encoder_layer(encoder_params: PyTree, i: int) -> PyTree:
  """Block i's parameters (0 <= i < layers) from an encoder's parameters."""
  head = encoder_params["layers"]
  n_head = jax.tree.leaves(head)[0].shape[0]
  if i == n_head:
    return encoder_params["last_layer"]
  if not 0 <= i < n_head:
    raise IndexError(f"layer {i} of an encoder with {n_head + 1} layers")
  return jax.tree.map(lambda a: a[i], head)


def _deep_prompt_schedule(prompts, layers: int, width: int):
  """Per-layer deep prompts [layers, n_ctx, width] and replace flags.

  Block 0 never replaces (it sees the input-level prompt); block i in
  1..depth-1 replaces with prompts[i]; blocks >= depth carry tokens forward.
  """
  if prompts is None:
    return jnp.zeros((layers, 1, width)), jnp.zeros((layers,), bool)
  depth, n_ctx, _ = prompts.shape
  if depth > layers:
    raise ValueError(
      f"prompt depth {depth} exceeds the tower's {layers} layers; use a "
      f"depth between 0 and {layers}."
    )
  deep = jnp.zeros((layers, n_ctx, width), prompts.dtype)
  deep = deep.at[1:depth].set(prompts[1:])
  replace = jnp.arange(layers) < depth
  replace = replace.at[0].set(False)
  return deep, replace


def _check_prompts(prompts, width: int, branch: str):
  if prompts is None:
    return None
  if prompts.ndim != 3 or prompts.shape[-1] != width:
    raise ValueError(
      f"{branch} prompts must be [depth, n_ctx, {width}], got "
      f"{tuple(prompts.shape)}."
    )
  if prompts.shape[0] == 0 or prompts.shape[1] == 0:
    return None
  return prompts


def _embed(emb, pos, token_ids, start: int, dtype) -> Array:
  """Token + positional embedding of positions `start`.. of the ids.

  Truncated ids (length < 77) use the first `length` positions: under the
  causal mask the EOT row never sees later positions.
  """
  ids = token_ids[:, start:]
  return (emb(ids) + pos[start : token_ids.shape[1]]).astype(dtype)


class TextTower(nn.Module):
  """Token + positional embedding, causal blocks, final LN, EOT pooling.

  `token_ids`: [N, L] ids, or a tuple of length groups ([N_g, L_g] each,
  `prompt_learners.bucket_token_ids`): the features of every sequence in
  group order, [sum N_g, D]. A prompted tower runs all groups in one pass
  (`PrefixEncoder`), a plain one a pass per group.
  """

  cfg: ClipConfig
  remat: bool | str = "matmuls"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, token_ids, prompts=None):
    tc = self.cfg.text
    prompts = _check_prompts(prompts, tc.width, "text")
    if isinstance(token_ids, (tuple, list)):
      groups = tuple(token_ids)
    else:
      groups = (token_ids,)
    emb = nn.Embed(self.cfg.vocab_size, tc.width, name="token_embedding")
    pos = self.param(
      "position_embedding",
      nn.initializers.normal(0.01),
      (self.cfg.context_length, tc.width),
    )
    eots = [self._eot(ids) for ids in groups]
    deep, replace = _deep_prompt_schedule(prompts, tc.layers, tc.width)
    if prompts is None:
      encoder = Encoder(tc, True, None, self.remat, self.dtype, name="encoder")
      x = jnp.concatenate(
        [
          encoder(_embed(emb, pos, ids, 0, self.dtype), deep, replace, eot)
          for ids, eot in zip(groups, eots)
        ]
      )
    else:
      x = self._over_shared_prefix(
        emb, pos, groups, prompts, deep, replace, jnp.concatenate(eots)
      )
    return LayerNorm(
      tc.eps, _at_least_f32(self.dtype), name="final_layer_norm"
    )(x)

  def _eot(self, token_ids):
    if self.cfg.eos_token_id == 2:
      # Legacy OpenAI configs: the EOT has the largest id.
      return jnp.argmax(token_ids, axis=-1)
    return jnp.argmax(token_ids == self.cfg.eos_token_id, axis=-1)

  def _over_shared_prefix(self, emb, pos, groups, prompts, deep, replace, eot):
    """The pooled rows of a prompted tower, the prefix computed once.

    The prefix rows are SOT from sequence 0 and the context: exact when
    every sequence starts with the same token (SOT: all tokenized text). A
    sequence that does not gets NaN features rather than a silently wrong
    one (`CLIP.encode_text` names such ids before they get here).
    """
    tc = self.cfg.text
    n_ctx = prompts.shape[1]
    p = 1 + n_ctx
    for ids in groups:
      if p >= ids.shape[1]:
        raise ValueError(
          f"{n_ctx} text prompt tokens do not fit in {ids.shape[1]} token "
          f"positions"
        )
    sot = emb(groups[0][0, :1])
    shared = jnp.concatenate([sot, prompts[0].astype(sot.dtype)])
    shared = (shared + pos[:p]).astype(self.dtype)
    rows = [shared] + [
      _embed(emb, pos, ids, p, self.dtype).reshape(-1, tc.width)
      for ids in groups
    ]
    shape = tuple((ids.shape[0], ids.shape[1] - p) for ids in groups)
    encoder = PrefixEncoder(
      tc, n_ctx, shape, self.remat, self.dtype, name="encoder"
    )
    out = encoder(jnp.concatenate(rows), deep, replace, jnp.maximum(eot - p, 0))
    out_sh, out_r = out[:p], out[p:]
    # An EOT among the prefix rows (ids shorter than the context) pools a
    # shared row, as the full tower would.
    out = jnp.where((eot < p)[:, None], out_sh[jnp.minimum(eot, p - 1)], out_r)
    start = jnp.concatenate([ids[:, 0] for ids in groups])
    return jnp.where((start == start[0])[:, None], out, jnp.nan)


class VisionTower(nn.Module):
  """Patch embedding, [CLS] + positions, prompts, pre-LN, blocks, post-LN."""

  cfg: ClipConfig
  remat: bool | str = "matmuls"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels, prompts=None):
    vc, p = self.cfg.vision, self.cfg.patch_size
    prompts = _check_prompts(prompts, vc.width, "vision")
    n = pixels.shape[0]
    x = nn.Conv(
      vc.width,
      (p, p),
      strides=(p, p),
      padding="VALID",
      use_bias=False,
      dtype=self.dtype,
      name="patch_embedding",
    )(pixels.astype(self.dtype))
    x = x.reshape(n, -1, vc.width)
    cls = self.param(
      "class_embedding", nn.initializers.normal(0.02), (vc.width,)
    )
    pos = self.param(
      "position_embedding",
      nn.initializers.normal(0.01),
      (1 + self.cfg.grid**2, vc.width),
    )
    if x.shape[1] + 1 != pos.shape[0]:
      raise ValueError(
        f"images of {pixels.shape[1]}x{pixels.shape[2]} give {x.shape[1]} "
        f"patches but the checkpoint has {pos.shape[0] - 1} positions; "
        f"resize images to {self.cfg.image_size} or load with image_size=..."
      )
    cls = jnp.broadcast_to(cls.astype(x.dtype), (n, 1, vc.width))
    x = jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype)
    rows = None
    if prompts is not None:
      n_ctx = prompts.shape[1]
      rows = (x.shape[1], n_ctx)  # the last n_ctx rows after appending
      ctx = jnp.broadcast_to(prompts[0], (n, n_ctx, vc.width))
      x = jnp.concatenate([x, ctx.astype(x.dtype)], axis=1)
    x = LayerNorm(vc.eps, self.dtype, name="pre_layrnorm")(x)
    deep, replace = _deep_prompt_schedule(prompts, vc.layers, vc.width)
    x = Encoder(vc, False, rows, self.remat, self.dtype, name="encoder")(
      x, deep, replace, jnp.zeros((n,), jnp.int32)
    )
    out_dtype = _at_least_f32(self.dtype)
    return LayerNorm(vc.eps, out_dtype, name="post_layernorm")(x)


class CLIPModule(nn.Module):
  """Both towers, the projections and the logit scale."""

  cfg: ClipConfig
  remat: bool | str = "matmuls"
  dtype: Any = jnp.float32

  def setup(self):
    self.vision_model = VisionTower(self.cfg, self.remat, self.dtype)
    self.text_model = TextTower(self.cfg, self.remat, self.dtype)
    dense = functools.partial(
      nn.Dense,
      self.cfg.projection_dim,
      use_bias=False,
      dtype=_at_least_f32(self.dtype),
    )
    self.visual_projection = dense()
    self.text_projection = dense()
    self.logit_scale = self.param(
      "logit_scale", nn.initializers.constant(np.log(1 / 0.07)), ()
    )

  def encode_image(self, pixels, prompts=None):
    return self.visual_projection(self.vision_model(pixels, prompts))

  def encode_text(self, token_ids, prompts=None):
    return self.text_projection(self.text_model(token_ids, prompts))

  def __call__(self, pixels, token_ids):
    img = self.encode_image(pixels)
    txt = self.encode_text(token_ids)
    return img, txt, self.logit_scale


# ---------------------------------------------------------------------------
# Pure functions over (config, params)
# ---------------------------------------------------------------------------


def make_module(cfg: ClipConfig, dtype=jnp.float32, remat="matmuls"):
  return CLIPModule(cfg, remat=remat, dtype=dtype)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "remat"))
def encode_image(
  params: PyTree,
  pixels: Array,
  prompts: Array | None = None,
  *,
  cfg: ClipConfig,
  dtype=jnp.float32,
  remat: bool | str = "matmuls",
) -> Array:
  """Projected, unnormalized image features.

  Args:
    params: the CLIP parameter pytree.
    pixels: [N, H, W, 3] float32, already normalized with the CLIP mean/std.
    prompts: optional [depth, n_ctx, vision_width] vision prompts.

  Returns:
    [N, projection_dim] float32 features.
  """
  return make_module(cfg, dtype, remat).apply(
    {"params": params}, pixels, prompts, method=CLIPModule.encode_image
  )


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "remat"))
def encode_text(
  params: PyTree,
  token_ids: Array,
  prompts: Array | None = None,
  *,
  cfg: ClipConfig,
  dtype=jnp.float32,
  remat: bool | str = "matmuls",
) -> Array:
  """Projected, unnormalized text features of [N, L] token ids (L <= 77),
  or of a tuple of length groups ([N_g, L_g] each): [sum N_g, D] in group
  order."""
  return make_module(cfg, dtype, remat).apply(
    {"params": params}, token_ids, prompts, method=CLIPModule.encode_text
  )


@functools.partial(jax.jit, static_argnums=0)
def init_params(cfg: ClipConfig, key: Array) -> PyTree:
  """Random parameters (for tests and shape checks)."""
  pixels = jnp.zeros((1, cfg.image_size, cfg.image_size, 3))
  ids = jnp.zeros((1, cfg.context_length), jnp.int32)
  return make_module(cfg).init(key, pixels, ids)["params"]


def normalize(x: Array) -> Array:
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------
# Hugging Face checkpoints
# ---------------------------------------------------------------------------

_IGNORED_KEYS = (
  "text_model.embeddings.position_ids",
  "vision_model.embeddings.position_ids",
)


def convert_hf_state_dict(
  state: dict[str, np.ndarray], cfg: ClipConfig
) -> PyTree:
  """HF `CLIPModel` tensors (numpy, torch layout) -> our parameter pytree.

  Every tensor of the checkpoint must be used exactly once; a missing or an
  unused key raises a ValueError naming it.
  """
  state = {k: v for k, v in state.items() if k not in _IGNORED_KEYS}
  used: set[str] = set()

  def take(key):
    if key not in state:
      raise ValueError(
        f"the checkpoint has no tensor {key!r}: it is not a complete "
        f"Hugging Face CLIPModel checkpoint for this config."
      )
    used.add(key)
    return np.asarray(state[key], dtype=np.float32)

  def dense(prefix, bias=True):
    out = {"kernel": take(prefix + ".weight").T}
    if bias:
      out["bias"] = take(prefix + ".bias")
    return out

  def ln(prefix):
    return {"scale": take(prefix + ".weight"), "bias": take(prefix + ".bias")}

  def encoder(prefix, tower: TowerConfig):
    per_layer = []
    for i in range(tower.layers):
      p = f"{prefix}.encoder.layers.{i}"
      per_layer.append(
        {
          "self_attn": {
            name: dense(f"{p}.self_attn.{name}")
            for name in ("q_proj", "k_proj", "v_proj", "out_proj")
          },
          "layer_norm1": ln(f"{p}.layer_norm1"),
          "layer_norm2": ln(f"{p}.layer_norm2"),
          "fc1": dense(f"{p}.mlp.fc1"),
          "fc2": dense(f"{p}.mlp.fc2"),
        }
      )
    # The first layers - 1 stacked, the last apart (see `Encoder`).
    stacked = jax.tree.map(
      lambda last, *head: (
        np.stack(head) if head else np.zeros((0,) + last.shape, last.dtype)
      ),
      per_layer[-1],
      *per_layer[:-1],
    )
    return {"layers": stacked, "last_layer": per_layer[-1]}

  patch = take("vision_model.embeddings.patch_embedding.weight")
  params = {
    "vision_model": {
      "patch_embedding": {"kernel": patch.transpose(2, 3, 1, 0)},
      "class_embedding": take("vision_model.embeddings.class_embedding"),
      "position_embedding": take(
        "vision_model.embeddings.position_embedding.weight"
      ),
      "pre_layrnorm": ln("vision_model.pre_layrnorm"),
      "encoder": encoder("vision_model", cfg.vision),
      "post_layernorm": ln("vision_model.post_layernorm"),
    },
    "text_model": {
      "token_embedding": {
        "embedding": take("text_model.embeddings.token_embedding.weight")
      },
      "position_embedding": take(
        "text_model.embeddings.position_embedding.weight"
      ),
      "encoder": encoder("text_model", cfg.text),
      "final_layer_norm": ln("text_model.final_layer_norm"),
    },
    "visual_projection": dense("visual_projection", bias=False),
    "text_projection": dense("text_projection", bias=False),
    "logit_scale": take("logit_scale").reshape(()),
  }
  unused = sorted(set(state) - used)
  if unused:
    raise ValueError(
      f"{len(unused)} checkpoint tensors were not used, e.g. {unused[:5]}: "
      f"the checkpoint does not match its config.json."
    )
  return params


def interpolate_position_embedding(params: PyTree, cfg: ClipConfig, size: int):
  """Resize the vision positional grid (bicubic) for another image size."""
  grid, new_grid = cfg.grid, size // cfg.patch_size
  pos = params["vision_model"]["position_embedding"]
  cls, patches = pos[:1], pos[1:].reshape(grid, grid, -1)
  patches = jax.image.resize(
    patches, (new_grid, new_grid, patches.shape[-1]), "bicubic"
  )
  new_pos = np.concatenate([cls, np.asarray(patches).reshape(new_grid**2, -1)])
  vision = dict(params["vision_model"], position_embedding=new_pos)
  return dict(params, vision_model=vision)


_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _resolve_folder(name_or_path: str) -> str:
  """A local checkpoint folder, or the hub cache's snapshot of a hub id."""
  if os.path.isdir(name_or_path):
    return name_or_path
  if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
    raise FileNotFoundError(
      f"no CLIP checkpoint folder at {name_or_path!r}. Pass a folder holding "
      f"config.json and model.safetensors (what save_pretrained writes), or a "
      f"hub id such as 'openai/clip-vit-base-patch16'."
    )
  import huggingface_hub

  patterns = ["*.json", "*.txt", "model.safetensors"]
  try:  # the local cache first: no network needed when it is there
    return huggingface_hub.snapshot_download(
      name_or_path, allow_patterns=patterns, local_files_only=True
    )
  except Exception:
    pass
  try:
    return huggingface_hub.snapshot_download(
      name_or_path, allow_patterns=patterns
    )
  except Exception as e:  # offline, unknown id
    raise FileNotFoundError(
      f"{name_or_path!r} is neither a local folder nor a hub checkpoint that "
      f"can be reached or is cached ({type(e).__name__}). On a machine with "
      f"internet run `hf download {name_or_path}` (it lands in "
      f"{huggingface_hub.constants.HF_HUB_CACHE}, which this loader reads), "
      f"or put config.json, model.safetensors and the tokenizer files "
      f"(vocab.json, merges.txt) in a folder and pass that folder."
    ) from e


def read_config(folder: str) -> ClipConfig:
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{folder!r} has no config.json: it is not a Hugging Face checkpoint "
      f"folder (save one with CLIPModel.save_pretrained)."
    )
  with open(path) as f:
    text = f.read()
  try:
    raw = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(
      f"{path} is not valid JSON ({e}): the checkpoint's config is damaged; "
      "download or save the checkpoint again"
    ) from e
  model_type = raw.get("model_type") if isinstance(raw, dict) else None
  if model_type != "clip" or "vision_config" not in raw:
    raise ValueError(
      f"{path} describes model_type={model_type!r}, not a CLIP model "
      f"(CLIPModel with text_config and vision_config); pass a CLIP "
      f"checkpoint such as openai/clip-vit-base-patch16."
    )
  from transformers import CLIPConfig

  # Through CLIPConfig so fields left at their defaults are filled in.
  return ClipConfig.from_hf(CLIPConfig.from_dict(raw))


def weights_file(folder: str) -> str:
  """The weights file load() reads in `folder` (safetensors first)."""
  for name in _WEIGHT_FILES:
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
    f"{folder!r} has no weights: expected one of {list(_WEIGHT_FILES)}."
  )


def read_state_dict(folder: str) -> dict[str, np.ndarray]:
  st = os.path.join(folder, "model.safetensors")
  if os.path.isfile(st):
    from safetensors.numpy import load_file

    try:
      return load_file(st)
    except Exception as e:  # safetensors' own error types, truncation
      raise ValueError(
        f"{st} cannot be read ({type(e).__name__}: {e}): the file is "
        "truncated or damaged; download or save the checkpoint again"
      ) from e
  pt = os.path.join(folder, "pytorch_model.bin")
  if os.path.isfile(pt):
    try:
      import torch
    except ImportError as e:
      raise ImportError(
        f"{folder!r} holds only pytorch_model.bin, which needs torch to read; "
        f"install torch or convert it to model.safetensors."
      ) from e
    sd = torch.load(pt, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in sd.items()}
  raise FileNotFoundError(
    f"{folder!r} has no weights: expected one of {list(_WEIGHT_FILES)}."
  )


def _check_shared_start(token_ids) -> None:
  """Prompted text shares its first rows (`PrefixEncoder`): every sequence
  (of every length group) must start with the same token. Checked where
  the ids are concrete; under jit a sequence that does not gets NaN
  features instead."""
  groups = token_ids if isinstance(token_ids, (tuple, list)) else [token_ids]
  for ids in groups:
    if isinstance(ids, jax.core.Tracer):
      return
    if isinstance(ids, jax.Array) and not ids.is_fully_addressable:
      return  # rows on other hosts: left to the NaN guard under jit
  starts = np.concatenate([np.asarray(ids)[:, 0] for ids in groups])
  odd = np.flatnonzero(starts != starts[0])
  if odd.size:
    raise ValueError(
      f"prompted text needs every token sequence to start with the same "
      f"token (SOT, as the tokenizer writes it); sequence {odd[0]} starts "
      f"with {starts[odd[0]]}, sequence 0 with {starts[0]}. Tokenize the "
      f"class prompts with the checkpoint's tokenizer (`CLIP.tokenize`)."
    )


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=["params"],
  meta_fields=["config", "folder", "dtype", "remat"],
)
@dataclasses.dataclass
class CLIP:
  """A loaded CLIP: config, parameters and bound convenience functions.

  A pytree whose only leaves are `params`, so it can be passed to jitted
  functions as an argument (config, dtype and remat stay static).
  """

  config: ClipConfig
  params: PyTree
  folder: str | None = None
  dtype: Any = jnp.float32
  remat: bool | str = "matmuls"

  @property
  def logit_scale(self) -> Array:
    """exp of the learned log-scale (100 for the OpenAI checkpoints)."""
    return jnp.exp(self.params["logit_scale"])

  def encode_image(self, pixels, prompts=None) -> Array:
    return encode_image(
      self.params,
      pixels,
      prompts,
      cfg=self.config,
      dtype=self.dtype,
      remat=self.remat,
    )

  def encode_text(self, token_ids, prompts=None) -> Array:
    if prompts is not None:
      _check_shared_start(token_ids)
    return encode_text(
      self.params,
      token_ids,
      prompts,
      cfg=self.config,
      dtype=self.dtype,
      remat=self.remat,
    )

  def replace(self, **changes) -> CLIP:
    """A copy with other fields (e.g. dtype=jnp.bfloat16, remat="full")."""
    return dataclasses.replace(self, **changes)

  @property
  def tokenizer(self):
    return _tokenizer(self.folder)

  def tokenize(self, texts: Sequence[str]) -> np.ndarray:
    """[N, 77] int32 ids: SOT, text, EOT, padded and truncated to 77."""
    return tokenize(self.tokenizer, texts, self.config.context_length)


@functools.lru_cache(maxsize=8)
def _tokenizer(folder: str | None):
  from transformers import CLIPTokenizer

  if folder is None:
    raise ValueError("this CLIP was not loaded from a folder: no tokenizer")
  try:
    return CLIPTokenizer.from_pretrained(folder)
  except Exception as e:
    raise FileNotFoundError(
      f"{folder!r} has no usable tokenizer files (vocab.json and "
      f"merges.txt, or tokenizer.json); copy them from the same hub "
      f"checkpoint ({type(e).__name__}: {e})."
    ) from e


def tokenize(tokenizer, texts: Sequence[str], length: int = 77) -> np.ndarray:
  out = tokenizer(
    list(texts),
    padding="max_length",
    truncation=True,
    max_length=length,
    return_tensors="np",
  )
  return np.asarray(out["input_ids"], dtype=np.int32)


def load(
  name_or_path: str,
  *,
  dtype=jnp.float32,
  image_size: int | None = None,
  remat: bool | str = "matmuls",
) -> CLIP:
  """Loads a Hugging Face CLIP checkpoint (folder or hub id) without torch.

  Args:
    name_or_path: a folder with config.json + model.safetensors (or
      pytorch_model.bin, read with torch if installed), or a hub id resolved
      through huggingface_hub's cache.
    dtype: compute dtype (parameters stay float32); jnp.bfloat16 for speed.
    image_size: optional other input resolution; the positional embedding is
      interpolated bicubically.
    remat: what the backward pass recomputes of each transformer block
      (`REMAT_MODES`): "matmuls" (default) keeps only the weight matmuls'
      outputs, "full" recomputes the block (least memory), "none" keeps
      everything; True / False mean "full" / "none".

  Returns:
    A `CLIP` with `config`, `params`, `encode_image`, `encode_text`,
    `logit_scale` and `tokenize`.
  """
  folder = _resolve_folder(os.path.expanduser(name_or_path))
  cfg = read_config(folder)
  params = convert_hf_state_dict(read_state_dict(folder), cfg)
  if image_size is not None and image_size != cfg.image_size:
    params = interpolate_position_embedding(params, cfg, image_size)
    cfg = dataclasses.replace(cfg, image_size=image_size)
  # fp32 parameters, unless the whole computation is asked for in fp64
  # (finite-difference checks, reference replays; needs jax_enable_x64).
  param_dtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
  params = jax.tree.map(lambda x: jnp.asarray(x, param_dtype), params)
  return CLIP(cfg, params, folder, dtype, remat_mode(remat))
