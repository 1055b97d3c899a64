"""The ProMetaR step: golden replay, second order, masks, compilation."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from conftest import fast_compilation
from reference_data import NPZ_PATH

from prometar_jax import gradnet as gradnet_lib
from prometar_jax import meta_step, schedules, testing
from prometar_jax import prompt_learners as pl
from prometar_jax.models import clip as clip_lib

TINY = clip_lib.ClipConfig(
  vision=clip_lib.TowerConfig(width=32, layers=2, heads=2, mlp_dim=64),
  text=clip_lib.TowerConfig(width=32, layers=2, heads=2, mlp_dim=64),
  projection_dim=16,
  image_size=16,
  patch_size=8,
  vocab_size=100,
  eos_token_id=99,
)
N_CLS, LENGTH = 5, 10
# Compiled once per test instead of dispatched op by op (much faster).
meta_gradients = jax.jit(meta_step.meta_gradients, static_argnames="spec")
task_and_reg_grads = jax.jit(
  meta_step.task_and_reg_grads, static_argnames="spec"
)


@functools.lru_cache(maxsize=4)
def tiny_clip(dtype=jnp.float32, seed=0):
  params = clip_lib.init_params(TINY, jax.random.key(seed))
  # Break the constant LayerNorm / bias init (it would hide layout bugs).
  rng = np.random.default_rng(seed)
  params = jax.tree.map(
    lambda x: np.asarray(x) + 0.05 * rng.normal(size=x.shape), params
  )
  params["logit_scale"] = np.log(100.0)
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
  return clip_lib.CLIP(TINY, params, dtype=dtype)


def class_feats(clip, rng, dtype=jnp.float32):
  ids = np.zeros((N_CLS, LENGTH), np.int32)
  for c in range(N_CLS):
    k = 5 + c % 3
    ids[c, 0] = 98
    ids[c, 1:k] = rng.integers(1, 90, k - 1)
    ids[c, k] = 99
  teacher = clip_lib.normalize(jnp.asarray(rng.normal(size=(N_CLS, 16)), dtype))
  return {
    "token_ids": jnp.asarray(ids),
    "teacher": teacher,
    "class_mask": jnp.ones((N_CLS,), bool),
  }


# Constant learning rates: the step's lr is tested on its own below.
CONSTANT = schedules.Optimizer(lr=0.01, schedule="constant")


def setup(dtype=jnp.float32, labels=(1, 3, 1, 4), first_order=False, seed=0):
  clip = tiny_clip(dtype, seed)
  rng = np.random.default_rng(seed)
  feats = class_feats(clip, rng, dtype)
  prompt_cfg = pl.PromptConfig(
    kind="ivlp", n_ctx_text=2, n_ctx_vision=3, depth_text=2, depth_vision=1
  )
  meta = meta_step.MetaConfig(first_order=first_order, dim_rate=8)
  spec = meta_step.StepSpec(prompt_cfg, meta, CONSTANT, CONSTANT)
  prompts = {
    "text": jnp.asarray(rng.normal(0, 0.3, (2, 2, 32)), dtype),
    "vision": jnp.asarray(rng.normal(0, 0.3, (1, 3, 32)), dtype),
  }
  state = meta_step.init_state(
    jax.random.key(seed), prompts, spec, steps_per_epoch=2
  )
  # Big enough gradnet weights that gamma is far from 0.5 and matters.
  state = state.replace(
    gradnet=jax.tree.map(lambda w: jnp.asarray(w * 30, dtype), state.gradnet)
  )
  images = jnp.asarray(rng.normal(size=(len(labels), 16, 16, 3)), dtype)
  batch = {"image": images, "label": jnp.asarray(labels, jnp.int32)}
  return clip, feats, spec, state, batch


def fixed_task(labels, query_class, lam, partner, dtype=jnp.float32):
  labels = np.asarray(labels)
  q = labels == query_class
  return meta_step.Task(
    query=jnp.asarray(q),
    support=jnp.asarray(~q),
    lam=jnp.asarray(lam, dtype),
    partner=jnp.asarray(partner, jnp.int32),
    valid=jnp.asarray(bool((~q).any())),
  )


def inputs(clip, batch, rows=None):
  """`meta_step.Inputs` of a batch (all rows unless `rows`)."""
  images, labels = batch["image"], batch["label"]
  v0 = meta_step.frozen_image_features(clip, images)
  if rows is None:
    rows = jnp.ones(labels.shape, bool)
  return meta_step.Inputs(images, labels, v0, jnp.asarray(rows))


# ---------------------------------------------------------------------------
# Golden test against the official step
# ---------------------------------------------------------------------------


def test_replay_matches_official_step(reference):
  arrays, _, hf_dir = reference
  out = testing.replay_official_step(str(NPZ_PATH), hf_dir)
  groups = ("stage1", "inner", "query", "meta", "after")
  wanted = [k for k in arrays if k.split("/")[0] in groups]
  assert sorted(k for k in out if k in arrays) == sorted(wanted)
  worst = {}
  for k in wanted:
    assert out[k].shape == arrays[k].shape, k
    ref = arrays[k].astype(np.float64)
    err = np.abs(out[k] - ref).max() / max(np.abs(ref).max(), 1e-30)
    group = "/".join(k.split("/")[:2])
    worst[group] = max(worst.get(group, 0.0), err)
  bad = {g: e for g, e in worst.items() if not e < 1e-5}
  assert not bad, bad
  # The meta gradient is tested directly: after/* hardly depends on it.
  for k in wanted:
    if k.startswith("meta/"):
      assert np.abs(out[k]).max() > 0, k


# ---------------------------------------------------------------------------
# Second order, first order, masks
# ---------------------------------------------------------------------------


def test_meta_gradient_matches_finite_differences_float64():
  with jax.enable_x64(True):
    clip, feats, spec, state, batch = setup(jnp.float64)
    # A large inner step makes the second-order term visible in the check.
    spec = dataclasses.replace(
      spec, meta=dataclasses.replace(spec.meta, adapt_lr=0.5, lr_ratio=1.0)
    )
    task = fixed_task(
      batch["label"], 1, [0.3, 0, 0.8, 0], [3, 0, 1, 0], jnp.float64
    )
    frozen = meta_step.Frozen(clip, feats)
    args = (frozen, inputs(clip, batch), task, spec)

    @jax.jit
    def loss(theta, gnet):
      return meta_step.meta_loss(theta, gnet, *args)[0]

    theta, gnet = state.prompts, state.gradnet
    _, _, g_theta, g_phi = meta_gradients(theta, gnet, *args)
    rng = np.random.default_rng(0)
    eps = 1e-5
    for _ in range(3):
      d_t = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), theta)
      d_p = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), gnet)
      plus = loss(
        jax.tree.map(lambda x, d: x + eps * d, theta, d_t),
        jax.tree.map(lambda x, d: x + eps * d, gnet, d_p),
      )
      minus = loss(
        jax.tree.map(lambda x, d: x - eps * d, theta, d_t),
        jax.tree.map(lambda x, d: x - eps * d, gnet, d_p),
      )
      fd = (plus - minus) / (2 * eps)
      dot = lambda a, b: sum(  # noqa: E731
        jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
      )
      analytic = dot(g_theta, d_t) + dot(g_phi, d_p)
      np.testing.assert_allclose(analytic, fd, rtol=1e-6)
    # The first-order gradient is measurably different: second order matters.
    spec_fo = dataclasses.replace(
      spec, meta=dataclasses.replace(spec.meta, first_order=True)
    )
    args_fo = args[:-1] + (spec_fo,)
    _, _, g_fo, _ = meta_gradients(theta, gnet, *args_fo)
    diff = jax.tree.map(lambda a, b: jnp.abs(a - b).max(), g_theta, g_fo)
    assert max(jax.tree.leaves(diff)) > 1e-6


def test_first_order_equals_explicit_stop_gradient():
  clip, feats, spec, state, batch = setup(first_order=True)
  task = fixed_task(batch["label"], 3, [0, 0.6, 0, 0], [0, 0, 0, 0])
  frozen = meta_step.Frozen(clip, feats)
  x = inputs(clip, batch)
  theta, gnet = state.prompts, state.gradnet
  _, _, g_theta, g_phi = meta_gradients(theta, gnet, frozen, x, task, spec)

  # Explicit: the inner gradients are constants computed beforehand.
  g_ce, g_reg, _ = task_and_reg_grads(
    theta, frozen, x.replace(rows=task.support), spec
  )

  def explicit(theta, gnet):
    gam = {k: gradnet_lib.gamma(gnet[k], g_ce[k], g_reg[k]) for k in theta}
    adapted = {
      k: theta[k] - spec.meta.adapt_lr * (g_ce[k] + gam[k] * g_reg[k])
      for k in theta
    }
    loss, _ = meta_step.query_loss(adapted, frozen, x, task, spec)
    return spec.meta.lr_ratio * loss

  e_theta, e_phi = jax.jit(jax.grad(explicit, argnums=(0, 1)))(theta, gnet)
  # float32 rounding: compare relative to each tensor's largest entry.
  for a, b in zip(
    jax.tree.leaves((g_theta, g_phi)), jax.tree.leaves((e_theta, e_phi))
  ):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())
  # phi still learns in first-order mode.
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_phi)) > 0


def test_masked_computation_equals_slicing():
  clip, feats, spec, state, batch = setup(labels=(0, 2, 2, 4, 1, 2))
  images, labels = batch["image"], batch["label"]
  theta = state.prompts
  frozen = meta_step.Frozen(clip, feats)
  support = np.array([True, False, False, True, True, False])
  idx = np.flatnonzero(support)
  x = inputs(clip, batch, support)
  (ce_m, reg_m), _ = meta_step.forward(theta, frozen, x, spec)
  sliced = x.take(idx).replace(rows=jnp.ones(len(idx), bool))
  (ce_s, reg_s), _ = meta_step.forward(theta, frozen, sliced, spec)
  np.testing.assert_allclose(ce_m, ce_s, rtol=1e-6)
  np.testing.assert_allclose(reg_m, reg_s, rtol=1e-6)
  # Query loss: the official way, with explicit query / support tensors.
  query = ~support
  lam = np.array([0.0, 0.7, 0.2, 0.0, 0.0, 0.9], np.float32)
  partner = np.array([0, 4, 0, 0, 0, 3])
  task = meta_step.Task(
    query=jnp.asarray(query),
    support=jnp.asarray(support),
    lam=jnp.asarray(lam),
    partner=jnp.asarray(partner),
    valid=jnp.asarray(True),
  )
  got, _ = meta_step.query_loss(theta, frozen, x, task, spec)
  q_ids = np.flatnonzero(query)
  text, img_q = pl.encode(
    theta, clip, feats["token_ids"], images[q_ids], spec.prompt
  )
  _, img_s = pl.encode(
    theta, clip, feats["token_ids"], images[idx], spec.prompt
  )
  mix_ids = np.searchsorted(idx, partner[q_ids])
  lq = lam[q_ids][:, None]
  mixed = lq * np.asarray(img_q) + (1 - lq) * np.asarray(img_s)[mix_ids]
  logits = np.asarray(
    clip.logit_scale
    * clip_lib.normalize(mixed)
    @ np.asarray(clip_lib.normalize(text)).T
  )
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  y_a = np.asarray(labels)[q_ids]
  y_b = np.asarray(labels)[idx][mix_ids]
  rows = np.arange(len(q_ids))
  want = np.mean(
    -lam[q_ids] * logp[rows, y_a] - (1 - lam[q_ids]) * logp[rows, y_b]
  )
  np.testing.assert_allclose(got, want, rtol=1e-5)


# ---------------------------------------------------------------------------
# The jitted step
# ---------------------------------------------------------------------------


def sgd_by_hand(optim, lr, grads, opt_state, params):
  updates, opt_state = optim.sgd(lr).update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def assert_trees_close(a, b, rtol=1e-6, atol=1e-7):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def test_step_by_hand_at_the_epochs_learning_rates():
  """Stage 1, the skipped and the run meta part, each optimizer at its
  schedule's lr of the state's epoch (both prompt updates at the same)."""
  clip, feats, spec, state, batch = setup(labels=(2, 2, 2, 2))
  spec = dataclasses.replace(
    spec,
    optim=schedules.Optimizer(lr=0.01, warmup_lr=1e-3, epochs=4),
    optim_gradnet=schedules.Optimizer(lr=0.02, warmup_lr=2e-3, epochs=4),
  )
  # Step 5 at 2 steps an epoch: epoch 2 of 4, the cosine's second value
  # 0.01 * (1 + cos(pi / 4)) / 2 (and twice that for the gradnet).
  state = state.replace(step=jnp.asarray(5, jnp.int32))
  lr = np.float32(schedules.warmup_cosine(2, 0.01, 4, 1, 1e-3))
  lr_g = np.float32(schedules.warmup_cosine(2, 0.02, 4, 1, 2e-3))
  assert lr == pytest.approx(0.0085355, rel=1e-5)
  frozen = meta_step.Frozen(clip, feats)
  step = meta_step.make_train_step(spec, donate=False)
  new, metrics = step(state, frozen, batch)
  assert float(metrics["meta_valid"]) == 0.0
  assert float(metrics["loss_meta"]) == 0.0
  assert (metrics["lr"], metrics["lr_gradnet"]) == (lr, lr_g)
  assert int(new.step) == 6
  for a, b in zip(jax.tree.leaves(new.gradnet), jax.tree.leaves(state.gradnet)):
    np.testing.assert_array_equal(a, b)

  def stage1(batch):
    g_ce, g_reg, _ = task_and_reg_grads(
      state.prompts, frozen, inputs(clip, batch), spec
    )
    direction, _ = meta_step.combine(state.gradnet, g_ce, g_reg, spec.meta)
    return sgd_by_hand(
      spec.optim, lr, direction, state.opt_prompts, state.prompts
    )

  # A single class: the prompts took exactly the stage-1 step.
  assert_trees_close(new.prompts, stage1(batch)[0])

  # Two classes: the meta part runs, at the same lr, and moves the gradnet.
  batch2 = dict(batch, label=jnp.asarray([2, 2, 0, 2], jnp.int32))
  new2, metrics2 = step(state, frozen, batch2)
  assert float(metrics2["meta_valid"]) == 1.0
  theta1, opt1 = stage1(batch2)
  key = jax.random.fold_in(state.rng, state.step)
  task = meta_step.sample_task(key, batch2["label"], 0.5, 0.5)
  _, _, g_theta, g_phi = meta_gradients(
    theta1, state.gradnet, frozen, inputs(clip, batch2), task, spec
  )
  want_theta, want_opt = sgd_by_hand(spec.optim, lr, g_theta, opt1, theta1)
  want_gnet, _ = sgd_by_hand(
    spec.optim_gradnet, lr_g, g_phi, state.opt_gradnet, state.gradnet
  )
  assert_trees_close(new2.prompts, want_theta, rtol=1e-5)
  assert_trees_close(new2.opt_prompts, want_opt, rtol=1e-5, atol=1e-6)
  assert_trees_close(new2.gradnet, want_gnet, rtol=1e-5)
  moved = [
    float(jnp.abs(a - b).max())
    for a, b in zip(
      jax.tree.leaves(new2.gradnet), jax.tree.leaves(state.gradnet)
    )
  ]
  assert max(moved) > 0


def test_step_with_class_prompts_in_length_groups_equals_one_group():
  # float64: the step amplifies float32 summation-order noise (gamma is
  # steep here), and this checks the math, not the rounding.
  with jax.enable_x64(True):
    clip, feats, spec, state, batch = setup(jnp.float64)
    rng = np.random.default_rng(7)
    ids = np.zeros((N_CLS, 40), np.int32)
    for c, k in enumerate([3, 30, 2, 3, 11]):
      ids[c, 0] = 98
      ids[c, 1 : 1 + k] = rng.integers(1, 90, k)
      ids[c, 1 + k] = 99
    grouped = pl.bucket_token_ids(ids, max_buckets=3, multiple=4)
    assert [b.shape for b in grouped["buckets"]] == [(3, 8), (1, 16), (1, 32)]
    step = meta_step.make_train_step(spec, donate=False)

    def run(token_ids):
      frozen = meta_step.Frozen(clip, dict(feats, token_ids=token_ids))
      return step(state, frozen, batch)

    want, m_want = run(jnp.asarray(ids))
    got, m_got = run(grouped)
    assert float(m_got["meta_valid"]) == 1.0

    def learned(s, m):
      return jax.tree.leaves((s.prompts, s.gradnet, s.opt_prompts, m))

    for a, b in zip(learned(got, m_got), learned(want, m_want)):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    # The grouping matters: every class on one row's prompt differs.
    _, m_wrong = run(dict(grouped, order=np.zeros(N_CLS, np.int32)))
    assert abs(float(m_wrong["loss_ce"]) - float(m_want["loss_ce"])) > 1e-3


def test_step_is_the_same_for_every_remat_mode():
  # What the backward pass keeps of each block ("none": everything,
  # "matmuls": the weight matmuls' outputs, the default; "full": nothing)
  # changes the program, never the numbers: float64, the whole second-order
  # step.
  with jax.enable_x64(True), fast_compilation():
    clip, feats, spec, state, batch = setup(jnp.float64)
    step = meta_step.make_train_step(spec, donate=False)
    results, temp = {}, {}
    for mode in clip_lib.REMAT_MODES:
      frozen = meta_step.Frozen(clip.replace(remat=mode), feats)
      compiled = step.lower(state, frozen, batch).compile()
      temp[mode] = compiled.memory_analysis().temp_size_in_bytes
      new, metrics = compiled(state, frozen, batch)
      assert float(metrics["meta_valid"]) == 1.0
      results[mode] = jax.tree.leaves(
        (new.prompts, new.gradnet, new.opt_prompts, metrics)
      )
    for mode in ("matmuls", "full"):
      for a, b in zip(results[mode], results["none"]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
  # The modes are different programs: each keeps less than the one before.
  assert temp["full"] < temp["matmuls"] < temp["none"], temp


def test_remat_modes_and_their_errors():
  assert clip_lib.remat_mode(True) == "full"
  assert clip_lib.remat_mode(False) == "none"
  assert clip_lib.remat_mode("matmuls") == "matmuls"
  with pytest.raises(ValueError, match="use one of"):
    clip_lib.remat_mode("dots")


def test_step_compiles_once_for_every_label_pattern_and_epoch():
  clip, feats, spec, state, batch = setup()
  spec = dataclasses.replace(spec, optim=schedules.Optimizer(epochs=3))
  frozen = meta_step.Frozen(clip, feats)
  traces = []

  def counted(*args, **kw):
    traces.append(1)
    return meta_step.train_step(*args, **kw)

  step = jax.jit(functools.partial(counted, spec=spec))
  lrs = []
  for labels in ([1, 3, 1, 4], [2, 2, 2, 2], [0, 1, 2, 3], [4, 4, 0, 0]):
    b = dict(batch, label=jnp.asarray(labels, jnp.int32))
    state, metrics = step(state, frozen, b)
    assert np.isfinite(float(metrics["loss_ce"]))
    lrs.append(float(metrics["lr"]))
  assert len(traces) == 1
  # 2 steps an epoch: the warm-up epoch, then the cosine's first value.
  assert lrs == [np.float32(x) for x in (1e-5, 1e-5, 0.0025, 0.0025)]


def test_sample_task_rules():
  labels = jnp.asarray([1, 3, 1, 4, 3, 3])
  seen = set()
  for i in range(60):
    t = meta_step.sample_task(jax.random.key(i), labels, 0.5, 0.5)
    q = np.asarray(t.query)
    cls = set(np.asarray(labels)[q].tolist())
    assert len(cls) == 1 and (np.asarray(labels)[~q] != cls.pop()).all()
    seen.add(int(np.asarray(labels)[q][0]))
    support = np.asarray(t.support)
    assert support[np.asarray(t.partner)[q]].all()
    lam = np.asarray(t.lam)
    assert ((lam > 0) & (lam < 1)).all()
    assert bool(t.valid)
    # The inner step's B - 1 slots hold the whole support, support first.
    slots = np.asarray(meta_step.support_slots(t))
    assert len(slots) == len(set(slots.tolist())) == 5
    k = int(support.sum())
    assert set(slots[:k].tolist()) == set(np.flatnonzero(support).tolist())
  assert seen == {1, 3, 4}  # uniform over classes, not samples: all appear
  single = meta_step.sample_task(
    jax.random.key(0), jnp.asarray([2, 2]), 0.5, 0.5
  )
  assert not bool(single.valid)


def test_without_task_augmentation_the_query_is_not_mixed():
  # The "w/o task augmentation" ablation: the same split and partners from
  # the same key, every lambda 1, so the outer loss is the query's CE.
  clip, feats, spec, state, batch = setup()
  labels = batch["label"]
  key = jax.random.key(3)
  mixed = meta_step.sample_task(key, labels, 0.5, 0.5)
  plain = meta_step.sample_task(key, labels, 0.5, 0.5, mixup=False)
  for f in ("query", "support", "partner", "valid"):
    np.testing.assert_array_equal(getattr(plain, f), getattr(mixed, f))
  np.testing.assert_array_equal(plain.lam, np.ones(labels.shape))
  frozen = meta_step.Frozen(clip, feats)
  x = inputs(clip, batch)
  loss, _ = meta_step.query_loss(state.prompts, frozen, x, plain, spec)
  (ce, _), _ = meta_step.forward(
    state.prompts, frozen, x.replace(rows=plain.query), spec
  )
  np.testing.assert_allclose(loss, ce, rtol=1e-6)
  # The config switch reaches the step: another outer loss, same rest.
  off = dataclasses.replace(
    spec, meta=dataclasses.replace(spec.meta, task_augmentation=False)
  )
  with fast_compilation():
    on_step = meta_step.make_train_step(spec, donate=False)
    _, m_on = on_step(state, frozen, batch)
    off_step = meta_step.make_train_step(off, donate=False)
    _, m_off = off_step(state, frozen, batch)
  assert float(m_on["loss_ce"]) == float(m_off["loss_ce"])
  assert float(m_on["loss_meta"]) != float(m_off["loss_meta"])


def test_paper_formulation_logs_the_inner_steps_gate():
  # Without the plain step the only gate is the inner step's: the step
  # logs its per-layer mean and std, also on a single-class batch.
  clip, feats, spec, state, batch = setup()
  paper = dataclasses.replace(
    spec,
    meta=dataclasses.replace(spec.meta, plain_step=False, lr_ratio=1.0),
  )
  frozen = meta_step.Frozen(clip, feats)
  with fast_compilation():
    step = meta_step.make_train_step(paper, donate=False)
    for labels in ([1, 3, 1, 4], [2, 2, 2, 2]):
      b = dict(batch, label=jnp.asarray(labels, jnp.int32))
      _, m = step(state, frozen, b)
      assert float(m["meta_valid"]) == float(len(set(labels)) > 1)
      assert m["gamma_text_mean"].shape == (2,)
      assert m["gamma_vision_std"].shape == (1,)
      g = np.asarray(m["gamma_text_mean"])
      assert ((g > 0) & (g < 1)).all()
    # The released step's metrics are those of its plain step, as before.
    released = meta_step.make_train_step(spec, donate=False)
    _, m = released(state, frozen, batch)
  assert sorted(k for k in m if k.startswith("gamma_")) == [
    "gamma_text_mean",
    "gamma_text_std",
    "gamma_vision_mean",
    "gamma_vision_std",
  ]


def test_plain_rule_takes_one_backward_pass_and_no_gradnet():
  clip, feats, spec, prometar, batch = setup()
  plain = dataclasses.replace(
    spec, meta=dataclasses.replace(spec.meta, mode="plain")
  )
  assert not meta_step.RULES["plain"].uses_reg
  state = meta_step.init_state(jax.random.key(0), prometar.prompts, plain, 2)
  assert state.gradnet == {}
  frozen = meta_step.Frozen(clip, feats)
  x = inputs(clip, batch)
  g_ce, g_reg, _ = meta_step.gradients(state.prompts, frozen, x, plain)
  assert g_reg is None
  want, _, _ = task_and_reg_grads(state.prompts, frozen, x, spec)
  assert_trees_close(g_ce, want, rtol=1e-4, atol=1e-5)  # float32, eager
  _, metrics = meta_step.make_train_step(plain, donate=False)(
    state, frozen, batch
  )
  assert "grad_norm_reg" not in metrics and "loss_meta" not in metrics


# ---------------------------------------------------------------------------
# Optimizers and learning rates
# ---------------------------------------------------------------------------


def test_sgd_equals_torch_sgd():
  rng = np.random.default_rng(0)
  p0 = rng.normal(size=(3, 4)).astype(np.float32)
  grads = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(3)]
  tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
  opt = torch.optim.SGD([tp], lr=0.1, momentum=0.9, weight_decay=5e-4)
  tx = schedules.sgd(0.1, 0.9, 5e-4)
  p, state = jnp.asarray(p0), tx.init(jnp.asarray(p0))
  for g in grads:
    tp.grad = torch.from_numpy(g)
    opt.step()
    updates, state = tx.update(jnp.asarray(g), state, p)
    p = optax.apply_updates(p, updates)
  np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_schedule_equals_torch_sgd_with_dassl_epoch_lrs():
  """The schedule as a plain optax schedule (one update per step) against
  torch SGD whose lr is set at each epoch start, as Dassl's scheduler does."""
  optim = schedules.Optimizer(lr=0.1, warmup_lr=0.01, epochs=3)
  spe = 2
  rng = np.random.default_rng(1)
  p0 = rng.normal(size=(5,)).astype(np.float32)
  tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
  opt = torch.optim.SGD([tp], lr=0.0, momentum=0.9, weight_decay=5e-4)
  tx = optim.sgd(optim.learning_rate(spe))
  p, state = jnp.asarray(p0), tx.init(jnp.asarray(p0))
  for epoch in range(3):
    for group in opt.param_groups:
      group["lr"] = schedules.warmup_cosine(epoch, 0.1, 3, 1, 0.01)
    for _ in range(spe):
      g = rng.normal(size=(5,)).astype(np.float32)
      tp.grad = torch.from_numpy(g)
      opt.step()
      updates, state = tx.update(jnp.asarray(g), state, p)
      p = optax.apply_updates(p, updates)
  np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_learning_rate_per_step_is_dassls_per_epoch_value():
  """Released ProMetaR over 3 epochs of 3 steps: Dassl's values, exactly
  the float32 of the double-precision formula."""
  optim = schedules.Optimizer()  # lr 0.0025, 1 warm-up epoch at 1e-5
  schedule = jax.jit(optim.learning_rate(jnp.int32(3)))
  got = [schedule(jnp.int32(s)) for s in range(9)]
  per_epoch = [1e-5, 2.5e-3, 2.4388e-3]
  np.testing.assert_allclose(got, np.repeat(per_epoch, 3), rtol=2e-4)
  exact = [
    np.float32(schedules.warmup_cosine(s // 3, 0.0025, 10, 1, 1e-5))
    for s in range(9)
  ]
  assert [np.float32(x) for x in got] == exact
  # Past the run's last epoch the lr stays at the last epoch's value.
  last = np.float32(schedules.warmup_cosine(9, 0.0025, 10, 1, 1e-5))
  assert schedule(jnp.int32(10 * 3)) == last == pytest.approx(2.387e-4, 1e-3)
  # The released gradnet: its scheduler is never stepped.
  gradnet = meta_step.StepSpec(pl.PromptConfig(), meta_step.MetaConfig())
  stuck = gradnet.optim_gradnet.learning_rate(3)
  assert {float(stuck(s)) for s in range(30)} == {float(np.float32(1e-6))}


# ---------------------------------------------------------------------------
# Gradnet
# ---------------------------------------------------------------------------


def test_gamma_layout_equals_torch_repeat_interleave():
  rng = np.random.default_rng(0)
  n_ctx, d, rate = 2, 16, 8
  w = gradnet_lib.init_gradnet(jax.random.key(0), {"text": (1, n_ctx, d)}, rate)
  g_ce = rng.normal(size=(1, n_ctx, d)).astype(np.float32)
  g_reg = rng.normal(size=(1, n_ctx, d)).astype(np.float32)
  got = gradnet_lib.gamma(w["text"], g_ce, g_reg)[0]
  w1 = torch.from_numpy(np.asarray(w["text"]["w1"][0]).T.copy())
  w2 = torch.from_numpy(np.asarray(w["text"]["w2"][0]).T.copy())
  x = torch.cat([torch.from_numpy(g_ce[0]), torch.from_numpy(g_reg[0])], 0)
  h = torch.nn.functional.linear(
    torch.nn.functional.linear(x.reshape(1, -1), w1), w2
  )
  want = torch.sigmoid(h).repeat_interleave(rate, -1).reshape(n_ctx, d)
  np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)


def test_gradnet_size_and_shapes_for_vit_b16():
  cfg = clip_lib.VIT_B16
  shapes = {"text": (9, 4, 512), "vision": (9, 4, 768)}
  gnet = jax.eval_shape(
    functools.partial(
      gradnet_lib.init_gradnet, prompt_shapes=shapes, dim_rate=8
    ),
    jax.random.key(0),
  )
  assert gradnet_lib.count_params(gnet) == 32_587_776
  assert gnet["vision"]["w1"].shape == (9, 6144, 384)
  assert gnet["text"]["w2"].shape == (9, 256, 256)
  # The whole step traces at ViT-B/16 shapes (abstractly, no compute).
  clip = jax.eval_shape(
    lambda k: clip_lib.CLIP(cfg, clip_lib.init_params(cfg, k)),
    jax.random.key(0),
  )
  spec = meta_step.StepSpec(pl.PromptConfig(), meta_step.MetaConfig())
  prompts = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
  state = jax.eval_shape(
    lambda p: meta_step.init_state(jax.random.key(0), p, spec, 100), prompts
  )
  frozen = meta_step.Frozen(
    clip,
    {
      "token_ids": jax.ShapeDtypeStruct((10, 77), jnp.int32),
      "teacher": jax.ShapeDtypeStruct((10, 512), jnp.float32),
      "class_mask": jax.ShapeDtypeStruct((10,), bool),
    },
  )
  batch = {
    "image": jax.ShapeDtypeStruct((4, 224, 224, 3), jnp.float32),
    "label": jax.ShapeDtypeStruct((4,), jnp.int32),
  }
  new, metrics = jax.eval_shape(
    functools.partial(meta_step.train_step, spec=spec), state, frozen, batch
  )
  assert new.prompts["vision"].shape == (9, 4, 768)
  assert metrics["gamma_text_mean"].shape == (9,)
