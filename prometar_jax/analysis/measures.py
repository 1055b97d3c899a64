"""Gradient alignment of prompt updates with held-out-class gradients.

The first-order view of ProMetaR (docs/method.md, "Gradient alignment"):
with the training-side update u = g + M^phi(g_reg; g) and
theta_hat = theta - a * u,

  L_val(theta_hat) - L_val(theta) = -a * <grad L_val(theta), u> + O(a^2),

so the meta objective rewards updates that point along the gradient of
classes the update never saw. This module measures that on a fixed pool of
labelled images (docs/method.md, "How it is measured"): many random
class-disjoint splits of the pool into a support set (training side) and
one held-out query class, and for each split the cosines between the query
gradient and

  "task"          g      = grad CE(support)
  "reg"           g_reg  = grad (R_text + R_image(support))
  "modulated_reg" u - g  (gamma * g_reg, w * g_reg or 0, per mode)
  "update"        u      = `meta_step.combine(g, g_reg)` of the spec's mode

overall (all prompt leaves), per branch (top-level key: "text", "vision",
"proj") and per layer (leading axis of each branch). Everything is a pure
function of the training pytrees and jit-compiles with fixed shapes: splits
are boolean masks over the pool.

One forward of the pool serves every split: a masked mean loss is linear in
its row weights, so each split's gradients are vector-Jacobian products of
the per-sample losses with the split's normalized masks as cotangents (the
backward passes are batched over splits with `lax.map`). The per-sample
losses are read from `meta_step.forward`, so they are the training losses;
`tests/test_analysis.py` checks them against `meta_step.task_and_reg_grads`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from prometar_jax import losses, meta_step

PyTree = Any
DIRECTIONS = ("task", "reg", "modulated_reg", "update")
_EPS = 1e-30


# ---------------------------------------------------------------------------
# Cosines over prompt pytrees
# ---------------------------------------------------------------------------


def _layer_sums(fn, a: PyTree, b: PyTree) -> dict[str, jax.Array]:
  """{branch: [depth]} sums of fn(a, b) over every axis but the leading one.

  A branch is a top-level key of the prompt dict; all its leaves share the
  layer axis (MaPLe's "proj" kernel and bias both lead with depth).
  """
  out = {}
  for name in a:
    sums = []
    for x, y in zip(jax.tree.leaves(a[name]), jax.tree.leaves(b[name])):
      # At least float32 (bf16 gradients), float64 kept for checks.
      dtype = jnp.promote_types(jnp.promote_types(x.dtype, y.dtype), "float32")
      xy = fn(x.astype(dtype), y.astype(dtype))
      sums.append(jnp.sum(xy.reshape(x.shape[0], -1), axis=-1))
    out[name] = sum(sums)
  return out


def _cos(dot, na, nb):
  # A zero vector has cosine 0 with anything (no direction to align).
  den = jnp.sqrt(na * nb)
  return jnp.where(den > _EPS, dot / jnp.maximum(den, _EPS), 0.0)


def dots(a: PyTree, b: PyTree) -> dict:
  """Inner products <a, b> overall, per branch and per layer.

  Returns:
    {"overall": (), "branch": {name: ()}, "layer": {name: [depth]}}.
  """
  layer = _layer_sums(jnp.multiply, a, b)
  branch = {k: jnp.sum(v) for k, v in layer.items()}
  overall = sum(branch.values()) if branch else jnp.zeros(())
  return {"overall": overall, "branch": branch, "layer": layer}


def cosines(a: PyTree, b: PyTree) -> dict:
  """cos(a, b) overall, per branch and per layer of two prompt pytrees.

  Args:
    a, b: pytrees with the prompts' structure ({"text": [depth, n, d],
      "vision": ...}, any learner).

  Returns:
    {"overall": (), "branch": {name: ()}, "layer": {name: [depth]}}, each
    in [-1, 1]; 0 where either side is the zero vector.
  """
  ab, aa, bb = dots(a, b), dots(a, a), dots(b, b)
  return jax.tree.map(_cos, ab, aa, bb)


# ---------------------------------------------------------------------------
# Splits of a pool
# ---------------------------------------------------------------------------


def sample_split(key, labels, support_size: int | None = None) -> dict:
  """A class-disjoint split of a pool as boolean masks (fixed shapes).

  The query class is drawn uniformly among the classes present, as the
  training step draws it (`meta_step.sample_task`; docs/official_code.md,
  "Virtual tasks"); the query is every pool sample of that class and the
  support the others, or `support_size` of them drawn without replacement.

  Args:
    key: a PRNG key.
    labels: [N] int labels of the pool.
    support_size: support samples kept (None: all the other classes).

  Returns:
    {"query": [N] bool, "support": [N] bool, "query_class": () int}.
  """
  k_task, k_sub = jax.random.split(key)
  task = meta_step.sample_task(k_task, labels, 1.0, 1.0)
  query, support = task.query, task.support
  n = labels.shape[0]
  if support_size is not None and support_size < n:
    score = jnp.where(support, jax.random.uniform(k_sub, (n,)), -1.0)
    # The support_size-th largest score: ties have probability 0, and a
    # support smaller than support_size is kept whole (threshold -1).
    threshold = jnp.sort(score)[n - support_size]
    support = support & (score >= threshold)
  query_class = jnp.max(jnp.where(query, labels, -1))
  return {"query": query, "support": support, "query_class": query_class}


def _weights(mask):
  """Row weights of `losses.masked_mean` over a mask."""
  m = jnp.asarray(mask, float)  # float64 under jax_enable_x64
  return m / jnp.maximum(jnp.sum(m), 1.0)


# ---------------------------------------------------------------------------
# Gradients of a pool from one forward
# ---------------------------------------------------------------------------


def pool_vjp(params, clip, feats, images, labels, spec: meta_step.StepSpec):
  """(grads_fn, aux): gradients of masked losses over a pool, one forward.

  `grads_fn(ce_weights, image_reg_weights, text_reg)` is the gradient of
  sum_i ce_w[i] * CE_i + sum_i reg_w[i] * R_image_i + text_reg * R_text,
  where CE_i and R_image_i are the per-sample terms of `meta_step.forward`
  (R_image_i includes meta.image_reg_weight). With ce_w = mask / |mask| this
  is the CE gradient of the masked rows; with reg_w = mask / |mask| and
  text_reg = 1 the regularizer gradient of `task_and_reg_grads`.
  """
  v0 = meta_step.frozen_image_features(clip, images)
  frozen = meta_step.Frozen(clip, feats)
  x = meta_step.Inputs(images, labels, v0, jnp.ones(labels.shape, bool))
  # The per-sample terms need the features and logits.
  recording = dataclasses.replace(spec, record_intermediates=True)

  def per_sample(p):
    (_, _), aux = meta_step.forward(p, frozen, x, recording)
    ce = losses.cross_entropy(aux["logits"], labels)
    diff = jnp.abs(aux["image_features"] - v0)
    r_image = spec.meta.image_reg_weight * jnp.mean(diff, axis=-1)
    return (ce, r_image.astype(ce.dtype), aux["r_text"]), aux

  out, vjp, aux = jax.vjp(per_sample, params, has_aux=True)
  ce, r_image, r_text = out

  def grads_fn(ce_w, reg_w, text_reg):
    (g,) = vjp(
      (
        ce_w.astype(ce.dtype),
        reg_w.astype(r_image.dtype),
        jnp.asarray(text_reg, r_text.dtype),
      )
    )
    return g

  aux = dict(aux, ce_per_sample=ce, r_image_per_sample=r_image)
  return grads_fn, aux


def heldout_gradient(params, clip, heldout: dict, spec: meta_step.StepSpec):
  """(grad, loss): mean CE gradient on a separate labelled set.

  For the new-class diagnostic (docs/method.md, "How it is measured", 5):
  `heldout` holds new-class images with labels over the new classes and
  the new classes' features ({"feats", "image", "label"}). Never used for
  training.
  """
  images, labels = heldout["image"], heldout["label"]
  v0 = meta_step.frozen_image_features(clip, images)
  frozen = meta_step.Frozen(clip, heldout["feats"])
  x = meta_step.Inputs(images, labels, v0, jnp.ones(labels.shape, bool))

  def ce(p):
    (loss, _), _ = meta_step.forward(p, frozen, x, spec)
    return loss

  loss, grad = jax.value_and_grad(ce)(params)
  return grad, loss


# ---------------------------------------------------------------------------
# Alignment averaged over splits
# ---------------------------------------------------------------------------


def with_mode(
  spec: meta_step.StepSpec, mode: str, fixed_gamma: float | None = None
) -> meta_step.StepSpec:
  """`spec` with another update rule ("prometar", "fixed_reg", "plain")."""
  changes = {"mode": mode}
  if fixed_gamma is not None:
    changes["fixed_gamma"] = fixed_gamma
  return dataclasses.replace(
    spec, meta=dataclasses.replace(spec.meta, **changes)
  )


def _layer_moments(tree):
  """{branch: [depth]} mean and mean square over each layer's entries."""
  mean = {k: jnp.mean(v.reshape(v.shape[0], -1), -1) for k, v in tree.items()}
  sq = {
    k: jnp.mean(jnp.square(v.reshape(v.shape[0], -1)), -1)
    for k, v in tree.items()
  }
  return mean, sq


def split_measures(
  grads_fn, gnet, split, spec, query_grad=None, return_gammas=False
):
  """Cosines, inner products and gammas of one split (see `alignment`)."""
  w_s, w_q = _weights(split["support"]), _weights(split["query"])
  zero = jnp.zeros_like(w_s)
  # One batched backward for the three gradients of the split.
  ce_w = jnp.stack([w_s, zero, w_q])
  reg_w = jnp.stack([zero, w_s, zero])
  text_reg = jnp.asarray([0.0, 1.0, 0.0], w_s.dtype)
  stacked = jax.vmap(grads_fn)(ce_w, reg_w, text_reg)
  g, g_reg, g_q = (jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(3))
  if query_grad is not None:
    g_q = query_grad
  u, gammas = meta_step.combine(gnet, g, g_reg, spec.meta)
  directions = {
    "task": g,
    "reg": g_reg,
    "modulated_reg": jax.tree.map(jnp.subtract, u, g),
    "update": u,
  }
  out = {
    "cos": {k: cosines(d, g_q) for k, d in directions.items()},
    "dot": {k: dots(d, g_q)["overall"] for k, d in directions.items()},
    "norm": {
      **{k: jnp.sqrt(dots(d, d)["overall"]) for k, d in directions.items()},
      "query": jnp.sqrt(dots(g_q, g_q)["overall"]),
    },
    "query_class": split["query_class"],
    "num_support": jnp.sum(split["support"]),
    "num_query": jnp.sum(split["query"]),
  }
  if gammas:
    mean, sq = _layer_moments(gammas)
    out["gamma_mean"], out["gamma_sq"] = mean, sq
    if return_gammas:
      out["gammas"] = gammas
  return out


def _summarize(per_split: dict) -> dict:
  """Mean and std over the split axis; gamma std pooled over entries."""
  skip = ("gammas", "query_class", "num_support", "num_query", "gamma_sq")
  body = {k: v for k, v in per_split.items() if k not in skip}
  mean = jax.tree.map(lambda x: jnp.mean(x, 0), body)
  std = jax.tree.map(lambda x: jnp.std(x, 0), body)
  out = {"mean": mean, "std": std}
  if "gamma_mean" in per_split:
    m = jax.tree.map(lambda x: jnp.mean(x, 0), per_split["gamma_mean"])
    sq = jax.tree.map(lambda x: jnp.mean(x, 0), per_split["gamma_sq"])
    out["gamma"] = {
      "mean": m,
      "std": jax.tree.map(
        lambda s, mu: jnp.sqrt(jnp.maximum(s - mu * mu, 0.0)), sq, m
      ),
    }
  return out


@functools.partial(
  jax.jit,
  static_argnames=(
    "spec",
    "num_splits",
    "support_size",
    "split_batch",
    "return_gammas",
  ),
)
def alignment(
  params,
  gnet,
  clip,
  feats,
  pool: dict,
  key,
  *,
  spec: meta_step.StepSpec,
  num_splits: int = 50,
  support_size: int | None = None,
  split_batch: int | None = None,
  heldout: dict | None = None,
  return_gammas: bool = False,
) -> dict:
  """Alignment of the training-side gradients with held-out-class gradients.

  Args:
    params: the prompts (theta), as in `TrainState.prompts`.
    gnet: the gradnet (phi); {} unless spec.meta.mode == "prometar".
    clip: the frozen CLIP.
    feats: class features of the pool's classes (see `meta_step.forward`).
    pool: {"image": [N, H, W, 3], "label": [N]}: base training images.
    key: PRNG key of the splits (same key = same splits, e.g. at every
      checkpoint of a run and for every method).
    spec: learner and meta settings; spec.meta.mode picks the update u.
    num_splits: S random class-disjoint splits.
    support_size: support samples per split (None: the whole rest of the
      pool).
    split_batch: splits whose backward passes run together (None: all S
      at once; smaller bounds memory on big models, 1 is sequential).
    heldout: optional {"feats", "image", "label"} set (new classes): its CE
      gradient replaces the query-class gradient (the new-class
      diagnostic of docs/method.md, "How it is measured").
    return_gammas: also return every split's gamma (for histograms).

  Returns:
    {"per_split": {"cos": {direction: cosines tree [S, ...]}, "dot":
    {direction: [S]}, "norm": {direction or "query": [S]}, "query_class":
    [S], "num_support": [S], "num_query": [S], and with a gradnet
    "gamma_mean", "gamma_sq": {branch: [S, depth]} (+ "gammas": {branch:
    [S, depth, n, d]})}, "mean" / "std": the cos, dot and norm trees over
    splits, "gamma": {"mean", "std": {branch: [depth]}} (with a gradnet),
    "loss": mean pool CE}. Directions: `DIRECTIONS`.
  """
  images, labels = pool["image"], pool["label"]
  grads_fn, aux = pool_vjp(params, clip, feats, images, labels, spec)
  query_grad = None
  if heldout is not None:
    query_grad, _ = heldout_gradient(params, clip, heldout, spec)

  def one(k):
    split = sample_split(k, labels, support_size)
    return split_measures(
      grads_fn, gnet, split, spec, query_grad, return_gammas
    )

  keys = jax.random.split(key, num_splits)
  if split_batch is None:
    per_split = jax.vmap(one)(keys)
  else:
    per_split = jax.lax.map(one, keys, batch_size=split_batch)
  out = _summarize(per_split)
  out["per_split"] = per_split
  out["loss"] = jnp.mean(aux["ce_per_sample"])
  return out


# ---------------------------------------------------------------------------
# The first-order identity
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("spec",))
def first_order_check(
  params, gnet, clip, feats, pool: dict, split: dict, alphas, *, spec
) -> dict:
  """L_val(theta - a u) - L_val(theta) against -a <grad L_val, u>.

  u is the spec's update on the split's support (from the same gradients
  as training: `task_and_reg_grads` + `combine`), L_val the mean CE on the
  query rows. The error |actual - predicted| is O(a^2): it shrinks ~4x
  when a halves, until float rounding takes over.

  Args:
    params, gnet, clip, feats: as in `alignment`.
    pool: {"image", "label"}.
    split: {"query", "support"} masks (e.g. from `sample_split`).
    alphas: [K] step sizes.
    spec: the StepSpec.

  Returns:
    {"alpha", "actual", "predicted", "error": [K], "loss": L_val(theta),
    "dot": <grad L_val, u>}.
  """
  images, labels = pool["image"], pool["label"]
  frozen = meta_step.Frozen(clip, feats)
  v0 = meta_step.frozen_image_features(clip, images)
  x = meta_step.Inputs(images, labels, v0, split["support"])
  g, g_reg, _ = meta_step.task_and_reg_grads(params, frozen, x, spec)
  u, _ = meta_step.combine(gnet, g, g_reg, spec.meta)

  def val_loss(p):
    (ce, _), _ = meta_step.forward(
      p, frozen, x.replace(rows=split["query"]), spec
    )
    return ce

  loss, g_val = jax.value_and_grad(val_loss)(params)
  dot = dots(g_val, u)["overall"]
  alphas = jnp.asarray(alphas, loss.dtype)

  def moved(a):
    return val_loss(jax.tree.map(lambda p, d: p - a * d, params, u))

  actual = jax.lax.map(moved, alphas) - loss
  predicted = -alphas * dot.astype(loss.dtype)
  return {
    "alpha": alphas,
    "actual": actual,
    "predicted": predicted,
    "error": jnp.abs(actual - predicted),
    "loss": loss,
    "dot": dot,
  }
