"""The ProMetaR training step as one pure, jit-compiled function.

One iteration on a batch (x, y) of B images, theta = prompts, phi = gradnet:

1. Frozen CLIP image features v0 = normalize(f(x)), once per batch.
2. Stage 1 (the released code's plain step): g_ce, g_reg on the whole batch
   from ONE forward (two cotangents of one `jax.vjp`), the modulated gradient
   g_ce + gamma_phi(g_ce, g_reg) * g_reg, and an SGD update theta -> theta1.
   Nothing is differentiated through it: no second-order graph.
3. Task augmentation with fixed shapes: a query class among the classes
   present, query / support masks, lambda ~ Beta(a, b) per sample and a
   partner drawn from the support. With a single class in the batch the meta
   part is skipped (`lax.cond`), exactly as the official code does.
4. Inner update on the support (gathered into B - 1 slots: the query class
   always has a sample): theta_hat = theta1 - adapt_lr * (g_ce + gamma
   * g_reg) (paper Eq. 19); differentiated through by nesting `jax.grad`
   (second order), or with `stop_gradient` on the inner gradients
   (first order: phi still learns through gamma).
5. Outer loss: label-mixed CE of mixed unnormalized query/partner image
   features computed with theta_hat, times lr_ratio; its gradients update
   theta1 (same SGD state, second step) and phi (its own SGD).

Two behaviours, set by `MetaConfig` and documented side by side in
docs/method.md: the released code (plain step, lr_ratio = 5e-4, gradnet lr
stuck at 1e-6: PAPER.md D1-D5) and the paper's formulation (no plain step,
lr_ratio = 1, the gradnet on its own schedule).

`mode` also selects the baselines that share this code: "plain" trains the
learner with cross-entropy only; "fixed_reg" adds the regularizer gradient
with a fixed weight (gamma = fixed_gamma), no meta-learning.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from prometar_jax import gradnet as gradnet_lib
from prometar_jax import losses
from prometar_jax import prompt_learners as pl
from prometar_jax.models import clip as clip_lib

PyTree = Any
MODES = ("prometar", "plain", "fixed_reg")


@dataclasses.dataclass(frozen=True)
class MetaConfig:
  """Hyper-parameters of the step (static under jit)."""

  mode: str = "prometar"
  first_order: bool = False
  plain_step: bool = True  # released code: the stage-1 update happens
  adapt_lr: float = 5e-4
  lr_ratio: float = 5e-4
  mixup_alpha: float = 0.5
  mixup_beta: float = 0.5
  dim_rate: int = 8
  text_reg_weight: float = 50.0
  image_reg_weight: float = 20.0
  fixed_gamma: float = 0.5
  momentum: float = 0.9
  weight_decay: float = 5e-4
  gradnet_momentum: float = 0.9
  gradnet_weight_decay: float = 5e-4

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"unknown step mode {self.mode!r}; use one of {MODES}")

  @classmethod
  def from_config(cls, config) -> MetaConfig:
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(config).items() if k in fields})


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Everything static about a step: the learner and the meta settings."""

  prompt: pl.PromptConfig
  meta: MetaConfig


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  prompts: PyTree
  gradnet: PyTree
  opt_prompts: PyTree
  opt_gradnet: PyTree
  rng: jax.Array


def sgd(momentum: float, weight_decay: float) -> optax.GradientTransformation:
  """torch.optim.SGD's buffer: buf = m * buf + (g + wd * p); p -= lr * buf.

  The learning rate is applied by `sgd_update` so that it can change every
  epoch without retracing (it is a traced argument of the step).
  """
  return optax.chain(
    optax.add_decayed_weights(weight_decay), optax.trace(decay=momentum)
  )


def sgd_update(tx, grads, opt_state, params, lr):
  buf, opt_state = tx.update(grads, opt_state, params)
  params = jax.tree.map(lambda p, b: p - lr * b, params, buf)
  return params, opt_state


def prompt_tx(meta: MetaConfig):
  return sgd(meta.momentum, meta.weight_decay)


def gradnet_tx(meta: MetaConfig):
  return sgd(meta.gradnet_momentum, meta.gradnet_weight_decay)


def prompt_shapes(params: PyTree) -> dict[str, tuple[int, int, int]]:
  return {k: tuple(params[k].shape) for k in pl.PROMPT_BRANCHES if k in params}


def init_state(key, prompts: PyTree, spec: StepSpec) -> TrainState:
  """Optimizer states and, for ProMetaR, a fresh gradnet for `prompts`."""
  k_gnet, k_rng = jax.random.split(key)
  gnet = {}
  if spec.meta.mode == "prometar":
    gnet = gradnet_lib.init_gradnet(
      k_gnet, prompt_shapes(prompts), spec.meta.dim_rate
    )
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    prompts=prompts,
    gradnet=gnet,
    opt_prompts=prompt_tx(spec.meta).init(prompts),
    opt_gradnet=gradnet_tx(spec.meta).init(gnet),
    rng=k_rng,
  )


# ---------------------------------------------------------------------------
# Forward, losses and the two gradients
# ---------------------------------------------------------------------------


def frozen_image_features(clip: clip_lib.CLIP, images) -> jax.Array:
  """Normalized zero-shot image features v0 (no prompts, no gradient)."""
  return jax.lax.stop_gradient(clip_lib.normalize(clip.encode_image(images)))


def forward(params, clip, feats, images, labels, v0, rows, spec: StepSpec):
  """((ce, reg), aux): the task loss and the regularizer on masked rows.

  Args:
    params: learner parameters (theta).
    clip: the frozen CLIP.
    feats: {"token_ids": [C, L], "teacher": [C, D] normalized T0,
      "class_mask": [C] bool (False = padding)}.
    images: [B, H, W, 3]; labels: [B]; v0: [B, D] frozen image features.
    rows: [B] bool, the samples of this task (all, or the support).
  """
  meta = spec.meta
  text, image = pl.encode(params, clip, feats["token_ids"], images, spec.prompt)
  t, v = clip_lib.normalize(text), clip_lib.normalize(image)
  logits = losses.mask_classes(clip.logit_scale * v @ t.T, feats["class_mask"])
  ce = losses.masked_mean(losses.cross_entropy(logits, labels), rows)
  r_text = losses.l1_regularizer(
    t, feats["teacher"], meta.text_reg_weight, feats["class_mask"]
  )
  r_image = losses.l1_regularizer(v, v0, meta.image_reg_weight, rows)
  aux = {
    "ce": ce,
    "r_text": r_text,
    "r_image": r_image,
    "text_features": t,
    "image_features": v,
    "text_features_unnormalized": text,
    "image_features_unnormalized": image,
    "logits": logits,
  }
  return (ce, r_text + r_image), aux


def task_and_reg_grads(params, clip, feats, images, labels, v0, rows, spec):
  """(g_ce, g_reg, aux) from one forward and two cotangents.

  g_reg is the gradient of R_text + R_image: text prompts only reach R_text
  and vision prompts only R_image, so each prompt tensor gets exactly its
  own regularizer's gradient (the official routing).
  """
  fwd = functools.partial(
    forward,
    clip=clip,
    feats=feats,
    images=images,
    labels=labels,
    v0=v0,
    rows=rows,
    spec=spec,
  )
  (ce, reg), vjp, aux = jax.vjp(fwd, params, has_aux=True)
  one, zero = jnp.ones_like(ce), jnp.zeros_like(ce)
  (g_ce,) = vjp((one, zero))
  (g_reg,) = vjp((zero, one))
  return g_ce, g_reg, aux


def combine(gnet, g_ce, g_reg, meta: MetaConfig):
  """The update direction of the step's mode, and the gammas (if learned)."""
  if meta.mode == "prometar":
    return gradnet_lib.modulate(gnet, g_ce, g_reg, meta.fixed_gamma)
  if meta.mode == "fixed_reg":
    return jax.tree.map(lambda a, b: a + meta.fixed_gamma * b, g_ce, g_reg), {}
  return g_ce, {}


# ---------------------------------------------------------------------------
# Task augmentation
# ---------------------------------------------------------------------------


def sample_task(key, labels, alpha: float, beta: float) -> dict:
  """Query/support split, mixup weights and partners, all fixed-shape.

  Returns {"query": [B] bool, "support": [B] bool, "lam": [B] float,
  "partner": [B] int (a support index per sample), "valid": bool}. The query
  class is uniform over the classes present (one candidate per class: its
  first occurrence); partners are uniform over the support, with
  replacement. `valid` is False when the batch holds a single class.
  """
  k_q, k_lam, k_mix = jax.random.split(key, 3)
  b = labels.shape[0]
  same = labels[:, None] == labels[None, :]
  earlier = jnp.tril(jnp.ones((b, b), bool), k=-1)
  first = ~jnp.any(same & earlier, axis=1)
  pick = jax.random.categorical(k_q, jnp.where(first, 0.0, -jnp.inf))
  query = labels == labels[pick]
  support = ~query
  lam = jax.random.beta(k_lam, alpha, beta, (b,))
  support_logits = jnp.where(support, 0.0, -jnp.inf)
  partner = jax.random.categorical(
    k_mix, jnp.broadcast_to(support_logits, (b, b)), axis=-1
  )
  valid = jnp.any(support)
  partner = jnp.where(valid, partner, 0)
  return {
    "query": query,
    "support": support,
    "lam": lam,
    "partner": partner.astype(jnp.int32),
    "valid": valid,
  }


def query_loss(params, clip, feats, images, labels, task, spec: StepSpec):
  """Label-mixed CE of mixed unnormalized image features (the outer loss).

  One image forward over the whole batch serves both the query samples and
  their support partners; the loss averages over the query samples.
  """
  text, image = pl.encode(params, clip, feats["token_ids"], images, spec.prompt)
  lam = task["lam"]
  mixed = lam[:, None] * image + (1 - lam[:, None]) * image[task["partner"]]
  t, v = clip_lib.normalize(text), clip_lib.normalize(mixed)
  logits = losses.mask_classes(clip.logit_scale * v @ t.T, feats["class_mask"])
  per_sample = losses.mixup_cross_entropy(
    logits, labels, labels[task["partner"]], lam
  )
  loss = losses.masked_mean(per_sample, task["query"])
  aux = {
    "text_features": t,
    "image_features": v,
    "text_features_unnormalized": text,
    "image_features_unnormalized": image,
    "logits": logits,
    "ce": loss,
  }
  return loss, aux


def support_slots(task) -> jax.Array:
  """Indices of B - 1 samples that hold the whole support, support first.

  The query class has at least one sample, so the support never fills the
  batch: the inner step runs on B - 1 images (fixed shape) instead of B,
  the rows that are not support masked out as before. Exact; it saves a
  quarter of the inner step's image work at the batch size of 4.
  """
  support = task["support"]
  slots = max(support.shape[0] - 1, 1)
  return jnp.argsort(~support, stable=True)[:slots]


def inner_adapt(theta, gnet, clip, feats, images, labels, v0, task, spec):
  """theta_hat = theta - adapt_lr * (g_ce + gamma * g_reg) on the support."""
  slots = support_slots(task)
  g_ce, g_reg, aux = task_and_reg_grads(
    theta,
    clip,
    feats,
    images[slots],
    labels[slots],
    v0[slots],
    task["support"][slots],
    spec,
  )
  if spec.meta.first_order:
    g_ce, g_reg = jax.lax.stop_gradient((g_ce, g_reg))
  direction, gammas = combine(gnet, g_ce, g_reg, spec.meta)
  adapted = jax.tree.map(
    lambda p, g: p - spec.meta.adapt_lr * g, theta, direction
  )
  grads = {"grad_ce": g_ce, "grad_reg": g_reg, "gamma": gammas}
  info = {"forward": aux, "slots": slots, **grads, "combined_grad": direction}
  return adapted, info


def meta_loss(theta, gnet, clip, feats, images, labels, v0, task, spec):
  """lr_ratio * L_query(theta_hat(theta, phi)), and intermediates."""
  adapted, inner = inner_adapt(
    theta, gnet, clip, feats, images, labels, v0, task, spec
  )
  loss, query = query_loss(adapted, clip, feats, images, labels, task, spec)
  aux = {"inner": inner, "adapted": adapted, "query": query}
  return spec.meta.lr_ratio * loss, aux


def meta_gradients(theta, gnet, clip, feats, images, labels, v0, task, spec):
  """(loss, aux, d loss / d theta, d loss / d phi), second order by nesting."""
  grad_fn = jax.value_and_grad(meta_loss, argnums=(0, 1), has_aux=True)
  (loss, aux), (g_theta, g_phi) = grad_fn(
    theta, gnet, clip, feats, images, labels, v0, task, spec
  )
  return loss, aux, g_theta, g_phi


# ---------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------


def _tree_norm(tree):
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros(())
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in leaves))


def _gamma_stats(gammas):
  return {
    f"gamma_{k}_{stat}": fn(g.reshape(g.shape[0], -1), axis=-1)
    for k, g in gammas.items()
    for stat, fn in (("mean", jnp.mean), ("std", jnp.std))
  }


def train_step(
  state: TrainState,
  clip: clip_lib.CLIP,
  feats: dict,
  batch: dict,
  lr,
  lr_gradnet,
  spec: StepSpec,
  task: dict | None = None,
):
  """One iteration; returns (new state, metrics).

  Args:
    state: the TrainState.
    clip: the frozen CLIP (pytree; its params are never updated).
    feats: class features, see `forward`.
    batch: {"image": [B, H, W, 3], "label": [B] int}.
    lr, lr_gradnet: this epoch's learning rates (traced scalars).
    spec: static learner and meta settings.
    task: optional injected task (see `sample_task`) to replay a reference;
      drawn from `fold_in(state.rng, state.step)` otherwise.
  """
  meta = spec.meta
  images, labels = batch["image"], batch["label"]
  tx_p, tx_g = prompt_tx(meta), gradnet_tx(meta)
  v0 = frozen_image_features(clip, images)
  all_rows = jnp.ones(labels.shape, bool)
  theta, opt_p = state.prompts, state.opt_prompts
  metrics = {}

  if meta.mode != "prometar" or meta.plain_step:
    if meta.mode == "plain":
      # Cross-entropy only: one backward, no regularizer gradient at all.
      def ce_only(p):
        (ce, _), aux = forward(
          p, clip, feats, images, labels, v0, all_rows, spec
        )
        return ce, aux

      g_ce, aux = jax.grad(ce_only, has_aux=True)(theta)
      direction, gammas = g_ce, {}
    else:
      g_ce, g_reg, aux = task_and_reg_grads(
        theta, clip, feats, images, labels, v0, all_rows, spec
      )
      direction, gammas = combine(state.gradnet, g_ce, g_reg, meta)
      metrics["grad_norm_reg"] = _tree_norm(g_reg)
    theta, opt_p = sgd_update(tx_p, direction, opt_p, theta, lr)
    metrics.update(
      loss_ce=aux["ce"],
      r_text=aux["r_text"],
      r_image=aux["r_image"],
      grad_norm_ce=_tree_norm(g_ce),
      **_gamma_stats(gammas),
    )

  if meta.mode == "prometar":
    if task is None:
      key = jax.random.fold_in(state.rng, state.step)
      task = sample_task(key, labels, meta.mixup_alpha, meta.mixup_beta)

    def meta_update(operand):
      theta, opt_p, gnet, opt_g = operand
      loss, _, g_theta, g_phi = meta_gradients(
        theta, gnet, clip, feats, images, labels, v0, task, spec
      )
      theta, opt_p = sgd_update(tx_p, g_theta, opt_p, theta, lr)
      gnet, opt_g = sgd_update(tx_g, g_phi, opt_g, gnet, lr_gradnet)
      stats = (loss, _tree_norm(g_theta), _tree_norm(g_phi))
      return (theta, opt_p, gnet, opt_g), tuple(
        x.astype(jnp.float32) for x in stats
      )

    def skip(operand):
      zero = jnp.zeros((), jnp.float32)
      return operand, (zero, zero, zero)

    operand = (theta, opt_p, state.gradnet, state.opt_gradnet)
    (theta, opt_p, gnet, opt_g), (loss, n_theta, n_phi) = jax.lax.cond(
      task["valid"], meta_update, skip, operand
    )
    metrics.update(
      loss_meta=loss,
      grad_norm_meta=n_theta,
      grad_norm_gradnet=n_phi,
      meta_valid=task["valid"].astype(jnp.float32),
    )
  else:
    gnet, opt_g = state.gradnet, state.opt_gradnet

  new_state = state.replace(
    step=state.step + 1,
    prompts=theta,
    opt_prompts=opt_p,
    gradnet=gnet,
    opt_gradnet=opt_g,
  )
  return new_state, metrics


def make_train_step(spec: StepSpec, donate: bool = True):
  """`train_step` jit-compiled for `spec` (the state buffers donated)."""
  fn = functools.partial(train_step, spec=spec)
  return jax.jit(fn, donate_argnums=(0,) if donate else ())
