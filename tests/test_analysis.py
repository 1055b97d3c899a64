"""Gradient-alignment analysis: cosines, splits, first-order identity, runs.

A tiny in-memory CLIP (test_meta_step) and a pool of 12 images of 5
classes. Every test compiles with most XLA optimizations off (like the
training tests' subprocesses): the programs are tiny and compile time is
what costs; the functions compiled here are this module's own jits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_meta_step as tms
from conftest import fast_compilation

from prometar_jax import analysis, checkpoint, meta_step
from prometar_jax.analysis import measures

POOL_LABELS = (0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 2)
# One set of static arguments, so `alignment` compiles once per mode.
KW = dict(num_splits=6, support_size=6, return_gammas=True)
# The gradients do not depend on the mode: one spec, one compilation.
_task_and_reg_grads = jax.jit(
  meta_step.task_and_reg_grads, static_argnames="spec"
)


@pytest.fixture(autouse=True, scope="module")
def fast_compile():
  with fast_compilation():
    yield


def pool_setup(dtype=jnp.float32, mode="prometar"):
  clip, feats, spec, state, batch = tms.setup(dtype, labels=POOL_LABELS)
  spec = analysis.with_mode(spec, mode)
  pool = {"image": batch["image"], "label": batch["label"]}
  gnet = state.gradnet if mode == "prometar" else {}
  return clip, feats, spec, state.prompts, gnet, pool


def grads(params, clip, feats, pool, rows):
  """(g_ce, g_reg) of the training step on the masked rows of the pool."""
  spec = pool_setup()[2]
  v0 = meta_step.frozen_image_features(clip, pool["image"])
  x = meta_step.Inputs(pool["image"], pool["label"], v0, rows)
  g, g_reg, _ = _task_and_reg_grads(
    params, meta_step.Frozen(clip, feats), x, spec
  )
  return g, g_reg


def assert_tree_close(a, b, rtol=1e-5, atol=1e-7):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol, atol)


# ---------------------------------------------------------------------------
# Cosines
# ---------------------------------------------------------------------------


def test_cosine_of_a_gradient_with_itself_is_one():
  clip, feats, _, params, _, pool = pool_setup()
  rows = jnp.ones(len(POOL_LABELS), bool)
  for tree in grads(params, clip, feats, pool, rows):
    cos = analysis.cosines(tree, tree)
    assert set(cos["branch"]) == {"text", "vision"}
    assert cos["layer"]["text"].shape == (2,)
    assert cos["layer"]["vision"].shape == (1,)
    for x in jax.tree.leaves(cos):
      np.testing.assert_allclose(x, 1.0, rtol=1e-6)
    # Scale-free, sign-aware.
    twice = jax.tree.map(lambda x: 3.0 * x, tree)
    neg = jax.tree.map(jnp.negative, tree)
    for x in jax.tree.leaves(analysis.cosines(tree, twice)):
      np.testing.assert_allclose(x, 1.0, rtol=1e-6)
    for x in jax.tree.leaves(analysis.cosines(tree, neg)):
      np.testing.assert_allclose(x, -1.0, rtol=1e-6)


def test_hand_built_gradients_give_the_known_cosines():
  a = {
    "text": jnp.asarray([[[1.0, 0.0]], [[0.0, 1.0]]]),  # [2 layers, 1, 2]
    "vision": jnp.asarray([[[3.0, 4.0]]]),
  }
  b = {
    "text": jnp.asarray([[[1.0, 1.0]], [[0.0, 2.0]]]),
    "vision": jnp.asarray([[[4.0, -3.0]]]),
  }
  cos = analysis.cosines(a, b)
  np.testing.assert_allclose(cos["layer"]["text"], [1 / np.sqrt(2), 1.0])
  np.testing.assert_allclose(cos["layer"]["vision"], [0.0])
  # text: <a,b> = 1 + 2, |a|^2 = 2, |b|^2 = 2 + 4.
  np.testing.assert_allclose(cos["branch"]["text"], 3 / np.sqrt(12))
  np.testing.assert_allclose(cos["branch"]["vision"], 0.0, atol=1e-7)
  # overall: <a,b> = 3 + 0, |a|^2 = 2 + 25, |b|^2 = 6 + 25.
  np.testing.assert_allclose(cos["overall"], 3 / np.sqrt(27 * 31), rtol=1e-6)
  d = analysis.dots(a, b)
  np.testing.assert_allclose(d["layer"]["text"], [1.0, 2.0])
  np.testing.assert_allclose(d["overall"], 3.0)
  # A zero direction has no alignment (0, not NaN).
  zero = jax.tree.map(jnp.zeros_like, a)
  for x in jax.tree.leaves(analysis.cosines(zero, b)):
    np.testing.assert_array_equal(x, 0.0)
  # Nested branches (MaPLe's "proj": kernel and bias share the layer axis).
  c = {"proj": {"kernel": jnp.ones((2, 2, 3)), "bias": jnp.ones((2, 3))}}
  e = {"proj": {"kernel": jnp.ones((2, 2, 3)), "bias": -jnp.ones((2, 3))}}
  np.testing.assert_allclose(
    analysis.cosines(c, e)["layer"]["proj"], [1 / 3, 1 / 3], rtol=1e-6
  )


# ---------------------------------------------------------------------------
# Splits and gradients
# ---------------------------------------------------------------------------


def test_sample_split_is_class_disjoint():
  labels = jnp.asarray(POOL_LABELS)
  split = jax.jit(analysis.sample_split, static_argnames="support_size")
  seen = set()
  for i in range(40):
    s = split(jax.random.key(i), labels, support_size=4)
    q, sup = np.asarray(s["query"]), np.asarray(s["support"])
    cls = int(s["query_class"])
    seen.add(cls)
    np.testing.assert_array_equal(q, np.asarray(POOL_LABELS) == cls)
    assert sup.sum() == 4 and not (q & sup).any()
    assert (np.asarray(POOL_LABELS)[sup] != cls).all()
  assert seen == set(POOL_LABELS)
  full = analysis.sample_split(jax.random.key(0), labels)
  np.testing.assert_array_equal(full["support"], ~np.asarray(full["query"]))
  # A support_size above the support keeps the whole support.
  big = analysis.sample_split(jax.random.key(0), labels, support_size=11)
  np.testing.assert_array_equal(big["support"], full["support"])


def test_pool_gradients_equal_the_training_gradients():
  clip, feats, spec, params, _, pool = pool_setup()
  split = analysis.sample_split(jax.random.key(3), pool["label"], 5)

  @jax.jit
  def pool_grads(params, clip, feats, pool, ce_w, reg_w, text_reg):
    fn, _ = analysis.pool_vjp(
      params, clip, feats, pool["image"], pool["label"], spec
    )
    return fn(ce_w, reg_w, text_reg)

  w = lambda m: m / m.sum()  # noqa: E731
  s = np.asarray(split["support"], np.float32)
  q = np.asarray(split["query"], np.float32)
  zero = np.zeros_like(s)
  args = (params, clip, feats, pool)
  g, g_reg = grads(*args, split["support"])
  assert_tree_close(pool_grads(*args, w(s), zero, 0.0), g)
  assert_tree_close(pool_grads(*args, zero, w(s), 1.0), g_reg)
  g_q, _ = grads(*args, split["query"])
  assert_tree_close(pool_grads(*args, w(q), zero, 0.0), g_q)


@pytest.mark.parametrize("mode", ["prometar", "fixed_reg", "plain"])
def test_alignment_matches_a_direct_computation(mode):
  clip, feats, spec, params, gnet, pool = pool_setup(mode=mode)
  key = jax.random.key(1)
  out = analysis.alignment(
    params, gnet, clip, feats, pool, key, spec=spec, **KW
  )
  per = out["per_split"]
  assert per["cos"]["update"]["overall"].shape == (6,)
  assert per["cos"]["task"]["layer"]["text"].shape == (6, 2)
  assert out["mean"]["cos"]["reg"]["layer"]["vision"].shape == (1,)
  np.testing.assert_array_equal(per["num_support"], 6)
  for x in jax.tree.leaves(per["cos"]):
    assert np.all(np.abs(np.asarray(x)) <= 1 + 1e-5)

  # Split 2, recomputed with the training step's own functions.
  k2 = jax.random.split(key, 6)[2]
  split = analysis.sample_split(k2, pool["label"], 6)
  assert int(per["query_class"][2]) == int(split["query_class"])
  g, g_reg = grads(params, clip, feats, pool, split["support"])
  g_q, _ = grads(params, clip, feats, pool, split["query"])
  u, gammas = meta_step.combine(gnet, g, g_reg, spec.meta)
  pick = lambda t: jax.tree.map(lambda x: x[2], t)  # noqa: E731
  assert_tree_close(pick(per["cos"]["task"]), analysis.cosines(g, g_q), 1e-4)
  assert_tree_close(pick(per["cos"]["update"]), analysis.cosines(u, g_q), 1e-4)
  np.testing.assert_allclose(
    per["dot"]["update"][2], analysis.dots(u, g_q)["overall"], rtol=1e-4
  )
  if mode == "plain":
    assert_tree_close(per["cos"]["update"], per["cos"]["task"])
    for x in jax.tree.leaves(per["cos"]["modulated_reg"]):
      np.testing.assert_array_equal(x, 0.0)
    assert "gamma" not in out
  if mode == "prometar":
    assert_tree_close(pick(per["gammas"]), gammas, 1e-5)
    for branch, m in out["gamma"]["mean"].items():
      allg = np.asarray(per["gammas"][branch])
      want_mean = allg.transpose(1, 0, 2, 3).reshape(allg.shape[1], -1)
      np.testing.assert_allclose(m, want_mean.mean(-1), rtol=1e-5)
      np.testing.assert_allclose(
        out["gamma"]["std"][branch], want_mean.std(-1), rtol=1e-3, atol=1e-6
      )
      assert np.all((m > 0) & (m < 1))

  if mode == "fixed_reg":
    # Splits run in groups give the same numbers.
    seq = analysis.alignment(
      params, gnet, clip, feats, pool, key, spec=spec, split_batch=4, **KW
    )
    assert_tree_close(seq["mean"], out["mean"], 1e-4, 1e-6)


def test_a_zero_gradnet_measures_the_fixed_reg_rule():
  # notebooks/gradient_alignment.ipynb measures the fixed-regularizer run
  # with ProMetaR's rule and a zero gradnet (gate sigmoid(0) = 0.5), so
  # that one compilation serves every run.
  clip, feats, spec, params, gnet, pool = pool_setup(mode="prometar")
  fixed = analysis.with_mode(spec, "fixed_reg")
  assert fixed.meta.fixed_gamma == 0.5
  zero = jax.tree.map(jnp.zeros_like, gnet)
  key = jax.random.key(1)
  got = analysis.alignment(
    params, zero, clip, feats, pool, key, spec=spec, **KW
  )
  want = analysis.alignment(
    params, {}, clip, feats, pool, key, spec=fixed, **KW
  )
  for key in ("cos", "dot", "norm"):
    assert_tree_close(got["mean"][key], want["mean"][key], 1e-5, 1e-7)
  for x in jax.tree.leaves(got["per_split"]["gammas"]):
    np.testing.assert_array_equal(x, 0.5)


def test_heldout_gradient_replaces_the_query_gradient():
  clip, feats, spec, params, gnet, pool = pool_setup()
  rng = np.random.default_rng(5)
  new_feats = tms.class_feats(clip, rng)  # other "classes"
  heldout = {
    "feats": new_feats,
    "image": pool["image"][:4] + 0.1,
    "label": jnp.asarray([0, 1, 2, 3], jnp.int32),
  }
  key = jax.random.key(0)
  out = analysis.alignment(
    params, gnet, clip, feats, pool, key, spec=spec, heldout=heldout, **KW
  )
  g_new, _ = jax.jit(analysis.heldout_gradient, static_argnames="spec")(
    params, clip, heldout, spec=spec
  )
  split = analysis.sample_split(jax.random.split(key, 6)[0], pool["label"], 6)
  g, _ = grads(params, clip, feats, pool, split["support"])
  np.testing.assert_allclose(
    out["per_split"]["cos"]["task"]["overall"][0],
    analysis.cosines(g, g_new)["overall"],
    rtol=1e-4,
  )


# ---------------------------------------------------------------------------
# First-order identity
# ---------------------------------------------------------------------------


def test_first_order_identity_holds_to_second_order():
  with jax.enable_x64(True):
    clip, feats, spec, params, gnet, pool = pool_setup(jnp.float64)
    split = analysis.sample_split(jax.random.key(2), pool["label"])
    # Small enough that the O(a^3) term is negligible for this u.
    alphas = 1.25e-4 * 0.5 ** np.arange(5)
    out = analysis.first_order_check(
      params, gnet, clip, feats, pool, split, alphas, spec=spec
    )
    err = np.asarray(out["error"])
    assert out["dot"].dtype == jnp.float64
    ratios = err[:-1] / err[1:]
    # O(a^2): the error shrinks ~4x each time a halves.
    np.testing.assert_allclose(ratios, 4.0, rtol=0.1)
    # And the prediction is close: the error is a small part of the change.
    assert err[-1] < 0.05 * abs(float(out["actual"][-1]))


# ---------------------------------------------------------------------------
# Along a run
# ---------------------------------------------------------------------------


def test_alignment_along_run_reads_every_checkpoint(tmp_path):
  clip, feats, spec, params, _, pool = pool_setup()
  _, _, _, state, _ = tms.setup(labels=POOL_LABELS)
  states = {
    3: state,
    7: state.replace(
      step=state.step + 7,
      prompts=jax.tree.map(lambda x: 1.5 * x, state.prompts),
      gradnet=jax.tree.map(lambda x: -x, state.gradnet),
    ),
  }
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=5)
  for step, s in states.items():
    ckpt.save(step, s, {"step": step, "epochs_done": step // 3})
  ckpt.close()

  key = jax.random.key(4)
  kw = dict(spec=spec, **KW)
  out = analysis.alignment_along_run(
    str(tmp_path / "checkpoints"),
    clip,
    feats,
    pool,
    key,
    target=state,
    alphas=(0.1, 0.05),
    **kw,
  )
  np.testing.assert_array_equal(out["step"], [3, 7])
  np.testing.assert_array_equal(out["epochs_done"], [1, 2])
  assert out["mean"]["cos"]["update"]["overall"].shape == (2,)
  assert out["gamma"]["mean"]["text"].shape == (2, 2)
  assert out["first_order"]["error"].shape == (2, 2)
  for i, s in enumerate(states.values()):
    want = analysis.alignment(
      s.prompts, s.gradnet, clip, feats, pool, key, **kw
    )
    got = jax.tree.map(lambda x, i=i: x[i], out["mean"])
    assert_tree_close(got, want["mean"], 1e-5, 1e-7)
  # The default target (shapes from the spec) restores the same states.
  again = analysis.alignment_along_run(
    str(tmp_path / "checkpoints"), clip, feats, pool, key, steps=[7], **kw
  )
  assert_tree_close(
    jax.tree.map(lambda x: x[0], again["mean"]),
    jax.tree.map(lambda x: x[1], out["mean"]),
  )
  with pytest.raises(ValueError, match="not saved"):
    next(analysis.restore_states(str(tmp_path / "checkpoints"), state, [5]))
  path = tmp_path / "numbers.json"
  analysis.save_json(str(path), out)
  assert path.stat().st_size > 0


def test_load_pool_reads_a_coop_split(tmp_path):
  from prometar_jax import data
  from prometar_jax.data import synthetic

  synthetic.make_coop_dataset(
    "eurosat", tmp_path, num_classes=4, per_class=(3, 1, 1)
  )
  split = data.fewshot_split("eurosat", str(tmp_path), 3, 1, "all")
  pool = analysis.load_pool(
    split["train"], image_size=16, num_classes=3, per_class=2, seed=0
  )
  assert pool["image"].shape == (6, 16, 16, 3)
  labels = pool["label"]
  assert len(set(labels.tolist())) == 3
  assert all((labels == c).sum() == 2 for c in set(labels.tolist()))
  with pytest.raises(ValueError, match="two classes"):
    analysis.load_pool(split["train"], image_size=16, num_classes=1)


def test_directions_are_documented():
  assert measures.DIRECTIONS == (
    "task",
    "reg",
    "modulated_reg",
    "update",
  )
