"""The ProMetaR training step as one pure, jit-compiled function.

`train_step(state, frozen, batch, spec=...)`: one iteration on a batch (x, y)
of B images, theta = prompts, phi = gradnet:

1. Frozen CLIP image features v0 = normalize(f(x)), once per batch.
2. Stage 1 (the released code's plain step): g_ce, g_reg on the whole batch
   from ONE forward (two cotangents of one `jax.vjp`), the update rule's
   direction, e.g. g_ce + gamma_phi(g_ce, g_reg) * g_reg, and an SGD update
   theta -> theta1. Nothing is differentiated through it: no second-order
   graph.
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

Update rules by name (`RULES`, selected by `MetaConfig.mode`): "prometar"
(the learned gate above), "plain" (cross-entropy only: the learner's own
baseline) and "fixed_reg" (g_ce + fixed_gamma * g_reg). Only a rule with a
learned gradnet has steps 3-5.

Two behaviours, set by `MetaConfig` and documented side by side in
docs/method.md: the released code (plain step, lr_ratio = 5e-4, gradnet lr
stuck at 1e-6) and the paper's formulation (no plain step, lr_ratio = 1,
the gradnet on its own schedule). The optimizers and their epoch-stepped
learning rates are optax (schedules.py): the step reads them from its
`StepSpec` and evaluates the lr at `state.step`.

Inputs travel as three small pytrees: `Frozen` (the CLIP and the class
features), `Inputs` (the samples a loss reads) and `Task` (the meta part's
random choices). The functions return the losses the step logs; the
intermediates a replay compares (features, logits, inner gradients, the
adapted prompts...) only with `StepSpec.record_intermediates`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from prometar_jax import gradnet as gradnet_lib
from prometar_jax import losses, schedules
from prometar_jax import prompt_learners as pl
from prometar_jax.models import clip as clip_lib

PyTree = Any


@dataclasses.dataclass(frozen=True)
class MetaConfig:
  """Hyper-parameters of the step (static under jit)."""

  mode: str = "prometar"  # the update rule: a key of RULES
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
  # The paper's task augmentation, Aug(D_val): mixup of each query image
  # with a support partner. False: the same query/support split, every
  # lambda = 1 (the outer loss is the plain CE of the clean query images).
  task_augmentation: bool = True

  def __post_init__(self):
    if self.mode not in RULES:
      raise ValueError(
        f"unknown step mode {self.mode!r}; use one of {tuple(RULES)}"
      )


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Everything static about a step: learner, meta settings, optimizers.

  `record_intermediates` is the one switch for what a replay or an analysis
  compares beyond the losses: with it, `forward`, `inner_adapt`,
  `query_loss` and `meta_loss` also return features, logits, the inner
  gradients and slots and the adapted prompts. The training step never
  needs them.
  """

  prompt: pl.PromptConfig
  meta: MetaConfig
  optim: schedules.Optimizer = schedules.Optimizer()
  # Released code: the gradnet's scheduler is never stepped (its warm-up lr
  # for the whole run, docs/method.md).
  optim_gradnet: schedules.Optimizer = schedules.Optimizer(
    lr=1e-6, schedule="constant", warmup_lr=1e-6
  )
  record_intermediates: bool = False


@flax.struct.dataclass
class TrainState:
  """What a step changes, and where the run stands.

  `steps_per_epoch` is data, not a static setting: the lr schedules are
  epoch-stepped (epoch = step // steps_per_epoch), and one compiled step
  then serves runs of any length.
  """

  step: jax.Array
  steps_per_epoch: jax.Array
  prompts: PyTree
  gradnet: PyTree
  opt_prompts: optax.OptState
  opt_gradnet: optax.OptState
  rng: jax.Array


@flax.struct.dataclass
class Frozen:
  """What a step reads and never trains.

  clip: the frozen CLIP (a pytree; its params are never updated).
  classes: {"token_ids": [C, L] (or the length groups of
    `prompt_learners.bucket_token_ids`), "teacher": [C, D] normalized T0,
    "class_mask": [C] bool (False = padding)}.
  """

  clip: clip_lib.CLIP
  classes: dict


@flax.struct.dataclass
class Inputs:
  """The samples a loss reads.

  images: [B, H, W, 3]; labels: [B]; v0: [B, D] frozen image features;
  rows: [B] bool, the samples of this loss (all, or the support).
  """

  images: jax.Array
  labels: jax.Array
  v0: jax.Array
  rows: jax.Array

  def take(self, index) -> Inputs:
    return jax.tree.map(lambda x: x[index], self)


@flax.struct.dataclass
class Task:
  """The meta part's random choices, all fixed-shape (see `sample_task`).

  query, support: [B] bool; lam: [B] mixup weights; partner: [B] int, a
  support index per sample; valid: bool, False for a single-class batch.
  """

  query: jax.Array
  support: jax.Array
  lam: jax.Array
  partner: jax.Array
  valid: jax.Array


def prompt_shapes(params: PyTree) -> dict[str, tuple[int, int, int]]:
  return {k: tuple(params[k].shape) for k in pl.PROMPT_BRANCHES if k in params}


def init_state(key, prompts: PyTree, spec: StepSpec, steps_per_epoch):
  """TrainState at step 0: optimizer states and, for a rule with a learned
  gradnet, a fresh gradnet for `prompts`."""
  k_gnet, k_rng = jax.random.split(key)
  gnet = {}
  if RULES[spec.meta.mode].learns_gradnet:
    gnet = gradnet_lib.init_gradnet(
      k_gnet, prompt_shapes(prompts), spec.meta.dim_rate
    )
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    steps_per_epoch=jnp.asarray(steps_per_epoch, jnp.int32),
    prompts=prompts,
    gradnet=gnet,
    opt_prompts=spec.optim.init(prompts),
    opt_gradnet=spec.optim_gradnet.init(gnet),
    rng=k_rng,
  )


# ---------------------------------------------------------------------------
# Forward, losses and the two gradients
# ---------------------------------------------------------------------------


def frozen_image_features(clip: clip_lib.CLIP, images) -> jax.Array:
  """Normalized zero-shot image features v0 (no prompts, no gradient)."""
  return jax.lax.stop_gradient(clip_lib.normalize(clip.encode_image(images)))


def forward(params, frozen: Frozen, x: Inputs, spec: StepSpec):
  """((ce, reg), aux): the task loss and the regularizer on x's rows.

  aux: {"ce", "r_text", "r_image"}, and with `spec.record_intermediates`
  the normalized and unnormalized text and image features and the logits.
  """
  meta, clip, classes = spec.meta, frozen.clip, frozen.classes
  text, image = pl.encode(
    params, clip, classes["token_ids"], x.images, spec.prompt
  )
  t, v = clip_lib.normalize(text), clip_lib.normalize(image)
  logits = losses.mask_classes(
    clip.logit_scale * v @ t.T, classes["class_mask"]
  )
  ce = losses.masked_mean(losses.cross_entropy(logits, x.labels), x.rows)
  r_text = losses.l1_regularizer(
    t, classes["teacher"], meta.text_reg_weight, classes["class_mask"]
  )
  r_image = losses.l1_regularizer(v, x.v0, meta.image_reg_weight, x.rows)
  aux = {"ce": ce, "r_text": r_text, "r_image": r_image}
  if spec.record_intermediates:
    aux.update(
      text_features=t,
      image_features=v,
      text_features_unnormalized=text,
      image_features_unnormalized=image,
      logits=logits,
    )
  return (ce, r_text + r_image), aux


def task_and_reg_grads(params, frozen: Frozen, x: Inputs, spec: StepSpec):
  """(g_ce, g_reg, aux) from one forward and two cotangents.

  g_reg is the gradient of R_text + R_image: text prompts only reach R_text
  and vision prompts only R_image, so each prompt tensor gets exactly its
  own regularizer's gradient (the official routing).
  """
  fwd = functools.partial(forward, frozen=frozen, x=x, spec=spec)
  (ce, reg), vjp, aux = jax.vjp(fwd, params, has_aux=True)
  one, zero = jnp.ones_like(ce), jnp.zeros_like(ce)
  (g_ce,) = vjp((one, zero))
  (g_reg,) = vjp((zero, one))
  return g_ce, g_reg, aux


def task_grad(params, frozen: Frozen, x: Inputs, spec: StepSpec):
  """(g_ce, aux): the cross-entropy gradient alone, one backward pass."""

  def ce(p):
    (loss, _), aux = forward(p, frozen, x, spec)
    return loss, aux

  return jax.grad(ce, has_aux=True)(params)


# ---------------------------------------------------------------------------
# Update rules
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UpdateRule:
  """How the task and regularizer gradients become the prompts' update.

  direction: f(g_ce, g_reg, gnet, meta) -> (direction, gammas), gammas the
    learned gates per gradnet branch ({} without a gradnet).
  uses_reg: False for a rule that never reads g_reg: it is then not
    computed at all (one backward pass instead of a two-cotangent vjp) and
    the rule gets None.
  learns_gradnet: the rule's gate is a learned gradnet; only then does the
    state hold one and the step have ProMetaR's bilevel meta part.
  """

  direction: Callable
  uses_reg: bool = True
  learns_gradnet: bool = False


def _plain(g_ce, g_reg, gnet, meta):
  del g_reg, gnet, meta
  return g_ce, {}


def _fixed_reg(g_ce, g_reg, gnet, meta):
  del gnet
  return jax.tree.map(lambda a, b: a + meta.fixed_gamma * b, g_ce, g_reg), {}


def _prometar(g_ce, g_reg, gnet, meta):
  return gradnet_lib.modulate(gnet, g_ce, g_reg, meta.fixed_gamma)


# A new rule is a function and an entry here; `config.meta.mode` names it.
RULES: dict[str, UpdateRule] = {
  "prometar": UpdateRule(_prometar, learns_gradnet=True),
  "plain": UpdateRule(_plain, uses_reg=False),
  "fixed_reg": UpdateRule(_fixed_reg),
}


def gradients(params, frozen: Frozen, x: Inputs, spec: StepSpec):
  """(g_ce, g_reg, aux): the gradients the spec's rule reads (g_reg None
  for a rule that does not)."""
  if RULES[spec.meta.mode].uses_reg:
    return task_and_reg_grads(params, frozen, x, spec)
  g_ce, aux = task_grad(params, frozen, x, spec)
  return g_ce, None, aux


def combine(gnet, g_ce, g_reg, meta: MetaConfig):
  """The update direction of `meta.mode`'s rule, and its gammas."""
  return RULES[meta.mode].direction(g_ce, g_reg, gnet, meta)


# ---------------------------------------------------------------------------
# Task augmentation
# ---------------------------------------------------------------------------


def sample_task(
  key, labels, alpha: float, beta: float, mixup: bool = True
) -> Task:
  """Query/support split, mixup weights and partners, all fixed-shape.

  The query class is uniform over the classes present (one candidate per
  class: its first occurrence); partners are uniform over the support, with
  replacement. `valid` is False when the batch holds a single class. With
  `mixup=False` (no task augmentation) every lambda is 1: the query loss
  is then the plain CE of the query images; the same key draws the same
  split and partners either way.
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
  if not mixup:
    lam = jnp.ones_like(lam)
  support_logits = jnp.where(support, 0.0, -jnp.inf)
  partner = jax.random.categorical(
    k_mix, jnp.broadcast_to(support_logits, (b, b)), axis=-1
  )
  valid = jnp.any(support)
  partner = jnp.where(valid, partner, 0)
  return Task(
    query=query,
    support=support,
    lam=lam,
    partner=partner.astype(jnp.int32),
    valid=valid,
  )


def query_loss(params, frozen: Frozen, x: Inputs, task: Task, spec: StepSpec):
  """Label-mixed CE of mixed unnormalized image features (the outer loss).

  One image forward over the whole batch serves both the query samples and
  their support partners; the loss averages over the query samples.
  aux: {"ce"}, and the features and logits with
  `spec.record_intermediates`.
  """
  clip, classes = frozen.clip, frozen.classes
  text, image = pl.encode(
    params, clip, classes["token_ids"], x.images, spec.prompt
  )
  lam = task.lam
  mixed = lam[:, None] * image + (1 - lam[:, None]) * image[task.partner]
  t, v = clip_lib.normalize(text), clip_lib.normalize(mixed)
  logits = losses.mask_classes(
    clip.logit_scale * v @ t.T, classes["class_mask"]
  )
  per_sample = losses.mixup_cross_entropy(
    logits, x.labels, x.labels[task.partner], lam
  )
  loss = losses.masked_mean(per_sample, task.query)
  aux = {"ce": loss}
  if spec.record_intermediates:
    aux.update(
      text_features=t,
      image_features=v,
      text_features_unnormalized=text,
      image_features_unnormalized=image,
      logits=logits,
    )
  return loss, aux


def support_slots(task: Task) -> jax.Array:
  """Indices of B - 1 samples that hold the whole support, support first.

  The query class has at least one sample, so the support never fills the
  batch: the inner step runs on B - 1 images (fixed shape) instead of B,
  the rows that are not support masked out as before. Exact; it saves a
  quarter of the inner step's image work at the batch size of 4.
  """
  support = task.support
  slots = max(support.shape[0] - 1, 1)
  return jnp.argsort(~support, stable=True)[:slots]


def inner_adapt(theta, gnet, frozen: Frozen, x: Inputs, task: Task, spec):
  """theta_hat = theta - adapt_lr * (the rule's direction on the support).

  Returns (theta_hat, record): record is {} unless
  `spec.record_intermediates`, then {"forward": the support forward's aux,
  "slots", "grad_ce", "grad_reg", "gamma", "combined_grad"}.
  """
  slots = support_slots(task)
  support = x.replace(rows=task.support).take(slots)
  g_ce, g_reg, aux = gradients(theta, frozen, support, spec)
  if spec.meta.first_order:
    g_ce, g_reg = jax.lax.stop_gradient((g_ce, g_reg))
  direction, gammas = combine(gnet, g_ce, g_reg, spec.meta)
  adapted = jax.tree.map(
    lambda p, g: p - spec.meta.adapt_lr * g, theta, direction
  )
  record = {}
  if spec.record_intermediates:
    record = {
      "forward": aux,
      "slots": slots,
      "grad_ce": g_ce,
      "grad_reg": g_reg,
      "gamma": gammas,
      "combined_grad": direction,
    }
  elif _logs_inner_gate(spec.meta):
    record = {"gamma": gammas}
  return adapted, record


def _logs_inner_gate(meta: MetaConfig) -> bool:
  """The gate the step logs is the inner step's: no plain step computes
  one (the paper's formulation). The released step logs its plain step's
  gate and returns nothing more from the meta part."""
  return RULES[meta.mode].learns_gradnet and not meta.plain_step


def meta_loss(theta, gnet, frozen: Frozen, x: Inputs, task: Task, spec):
  """(lr_ratio * L_query(theta_hat(theta, phi)), record).

  record is {} unless `spec.record_intermediates`, then {"inner": see
  `inner_adapt`, "adapted": theta_hat, "query": the query loss's aux}.
  """
  adapted, inner = inner_adapt(theta, gnet, frozen, x, task, spec)
  loss, query = query_loss(adapted, frozen, x, task, spec)
  record = {}
  if spec.record_intermediates:
    record = {"inner": inner, "adapted": adapted, "query": query}
  elif inner:  # the inner gate, for the step's log (`_logs_inner_gate`)
    record = {"gamma": inner["gamma"]}
  return spec.meta.lr_ratio * loss, record


def meta_gradients(theta, gnet, frozen: Frozen, x: Inputs, task: Task, spec):
  """(loss, record, d loss / d theta, d loss / d phi), second order by
  nesting; record as in `meta_loss`."""
  grad_fn = jax.value_and_grad(meta_loss, argnums=(0, 1), has_aux=True)
  (loss, record), (g_theta, g_phi) = grad_fn(theta, gnet, frozen, x, task, spec)
  return loss, record, g_theta, g_phi


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


def _sgd_step(tx, grads, opt_state, params):
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def train_step(
  state: TrainState,
  frozen: Frozen,
  batch: dict,
  *,
  spec: StepSpec,
  task: Task | None = None,
):
  """One iteration; returns (new state, metrics).

  Args:
    state: the TrainState.
    frozen: the CLIP and the class features.
    batch: {"image": [B, H, W, 3], "label": [B] int}.
    spec: static learner, meta and optimizer settings (`make_train_step`
      closes over it).
    task: an injected task (see `sample_task`) to replay a reference;
      drawn from `fold_in(state.rng, state.step)` otherwise.
  """
  meta = spec.meta
  rule = RULES[meta.mode]
  images, labels = batch["image"], batch["label"]
  v0 = frozen_image_features(frozen.clip, images)
  x = Inputs(images, labels, v0, jnp.ones(labels.shape, bool))
  # Both prompt updates of an iteration run at the epoch's lr.
  lr = spec.optim.learning_rate(state.steps_per_epoch)(state.step)
  tx_p = spec.optim.sgd(lr)
  theta, opt_p = state.prompts, state.opt_prompts
  gnet, opt_g = state.gradnet, state.opt_gradnet
  metrics = {"lr": lr}

  if meta.plain_step or not rule.learns_gradnet:
    g_ce, g_reg, aux = gradients(theta, frozen, x, spec)
    direction, gammas = rule.direction(g_ce, g_reg, gnet, meta)
    theta, opt_p = _sgd_step(tx_p, direction, opt_p, theta)
    metrics.update(
      loss_ce=aux["ce"],
      r_text=aux["r_text"],
      r_image=aux["r_image"],
      grad_norm_ce=_tree_norm(g_ce),
      **_gamma_stats(gammas),
    )
    if g_reg is not None:
      metrics["grad_norm_reg"] = _tree_norm(g_reg)

  if rule.learns_gradnet:
    lr_g = spec.optim_gradnet.learning_rate(state.steps_per_epoch)(state.step)
    tx_g = spec.optim_gradnet.sgd(lr_g)
    if task is None:
      key = jax.random.fold_in(state.rng, state.step)
      task = sample_task(
        key,
        labels,
        meta.mixup_alpha,
        meta.mixup_beta,
        mixup=meta.task_augmentation,
      )

    inner_gate = _logs_inner_gate(meta)

    def meta_update(operand):
      theta, opt_p, gnet, opt_g = operand
      loss, record, g_theta, g_phi = meta_gradients(
        theta, gnet, frozen, x, task, spec
      )
      # The gate the inner step applied (paper formulation only), before
      # the gradnet's update.
      gate = _gamma_stats(record["gamma"]) if inner_gate else {}
      theta, opt_p = _sgd_step(tx_p, g_theta, opt_p, theta)
      gnet, opt_g = _sgd_step(tx_g, g_phi, opt_g, gnet)
      stats = (loss, _tree_norm(g_theta), _tree_norm(g_phi))
      return (theta, opt_p, gnet, opt_g), (
        tuple(s.astype(jnp.float32) for s in stats),
        gate,
      )

    def skip(operand):
      zero = jnp.zeros((), jnp.float32)
      gate = {}
      if inner_gate:
        # A single-class batch has no support: the gate is logged on the
        # whole batch's gradients instead (nothing is updated).
        theta, _, gnet, _ = operand
        g_ce, g_reg, _ = gradients(theta, frozen, x, spec)
        gate = _gamma_stats(rule.direction(g_ce, g_reg, gnet, meta)[1])
      return operand, ((zero, zero, zero), gate)

    operand = (theta, opt_p, gnet, opt_g)
    (theta, opt_p, gnet, opt_g), ((loss, n_theta, n_phi), gate) = jax.lax.cond(
      task.valid, meta_update, skip, operand
    )
    metrics.update(
      lr_gradnet=lr_g,
      loss_meta=loss,
      grad_norm_meta=n_theta,
      grad_norm_gradnet=n_phi,
      meta_valid=task.valid.astype(jnp.float32),
      **gate,
    )

  new_state = state.replace(
    step=state.step + 1,
    prompts=theta,
    opt_prompts=opt_p,
    gradnet=gnet,
    opt_gradnet=opt_g,
  )
  return new_state, metrics


def make_train_step(spec: StepSpec, donate: bool = True):
  """`train_step` jit-compiled for `spec`: f(state, frozen, batch[, task])
  (the state buffers donated)."""
  fn = functools.partial(train_step, spec=spec)
  return jax.jit(fn, donate_argnums=(0,) if donate else ())
