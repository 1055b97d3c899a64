"""Replay of one official ProMetaR step (tests/data/reference format).

`replay_official_step(npz_path, hf_dir)` loads the Hugging Face checkpoint,
injects the recorded prompts, gradnet weights, batch and random choices into
this project's step functions and returns, for every npz key of the groups
stage1, inner, query, meta and after, this project's value in the npz's
layout. Official parameter names are translated to (branch, layer) here and
only here: the library itself never parses names.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prometar_jax import gradnet as gradnet_lib
from prometar_jax import meta_step, schedules
from prometar_jax import prompt_learners as pl
from prometar_jax.models import clip as clip_lib

GROUPS = ("stage1", "inner", "query", "meta", "after")


def official_prompt_name(branch: str, layer: int) -> str:
  if branch == "text":
    if layer == 0:
      return "prompt_learner.ctx"
    return f"text_encoder.transformer.resblocks.{layer}.VPT_shallow"
  if layer == 0:
    return "image_encoder.VPT"
  return f"image_encoder.transformer.resblocks.{layer}.VPT_shallow"


def _gradnet_name(branch: str, layer: int, which: int) -> str:
  side = "text" if branch == "text" else "vision"
  return f"vnet.linear_{side}_gamma.{layer}.{which}.weight"


def _depth(arrays, branch):
  d = 0
  while f"init/{official_prompt_name(branch, d)}" in arrays:
    d += 1
  return d


def _load(npz_path):
  with np.load(npz_path) as f:
    arrays = {k: f[k] for k in f.files}
  json_path = os.path.splitext(npz_path)[0] + ".json"
  meta = {}
  if os.path.exists(json_path):
    with open(json_path) as f:
      meta = json.load(f)
  return arrays, meta


def _stack(arrays, group, branch, depth):
  return np.stack(
    [arrays[f"{group}/{official_prompt_name(branch, i)}"] for i in range(depth)]
  )


def replay_official_step(
  npz_path: str, hf_dir: str, precision: str = "float64"
) -> dict[str, np.ndarray]:
  """Runs the recorded step with this project's code; {npz key: value}.

  Works for any reference in this format: text and vision prompt lengths and
  depths may differ (a vision depth of 0 means no vision prompts), heads,
  widths, batch size and class count vary, first or second order.

  By default the replay computes in float64, so that what remains of the
  difference is the official float32 run's own rounding; pass
  precision="float32" to replay at the official precision. Values are
  returned in the npz's dtype and layout.
  """
  if precision not in ("float32", "float64"):
    raise ValueError(f"precision must be float32 or float64, not {precision!r}")
  with jax.enable_x64(precision == "float64"):
    out = _replay(npz_path, hf_dir, jnp.dtype(precision))
  arrays, _ = _load(npz_path)
  return {
    k: np.asarray(v, arrays[k].dtype if k in arrays else None)
    for k, v in out.items()
  }


def _replay(npz_path, hf_dir, dtype):
  arrays, meta = _load(npz_path)
  arrays = {
    k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in arrays.items()
  }
  hp = meta.get("hyperparameters", {})
  clip = clip_lib.load(hf_dir, dtype=dtype)

  depths = {"text": _depth(arrays, "text"), "vision": _depth(arrays, "vision")}
  branches = [b for b in ("text", "vision") if depths[b] > 0]
  prompts = {
    b: jnp.asarray(_stack(arrays, "init", b, depths[b])) for b in branches
  }
  gnet = {
    b: {
      f"w{which + 1}": jnp.asarray(
        np.stack(
          [
            arrays[f"init/{_gradnet_name(b, i, which)}"].T
            for i in range(depths[b])
          ]
        )
      )
      for which in (0, 1)
    }
    for b in branches
  }
  n_ctx = {b: prompts[b].shape[1] for b in branches}
  prompt_cfg = pl.PromptConfig(
    kind="ivlp",
    n_ctx_text=n_ctx.get("text", 0),
    n_ctx_vision=n_ctx.get("vision", 0),
    depth_text=depths["text"],
    depth_vision=depths["vision"],
  )
  dim_rate = int(hp.get("dim_rate", 8))
  meta_cfg = meta_step.MetaConfig(
    mode="prometar",
    first_order=bool(hp.get("first_order", False)),
    plain_step=True,
    adapt_lr=float(hp.get("adapt_lr", 5e-4)),
    lr_ratio=float(hp.get("lr_ratio", 5e-4)),
    dim_rate=dim_rate,
    text_reg_weight=float(hp.get("rag_text_weight", 50.0)),
    image_reg_weight=float(hp.get("rag_image_weight", 20.0)),
  )
  momentum = float(hp.get("momentum", 0.9))
  weight_decay = float(hp.get("weight_decay", 5e-4))
  # One recorded step: each optimizer at its recorded lr.
  spec = meta_step.StepSpec(
    prompt_cfg,
    meta_cfg,
    optim=schedules.Optimizer(
      lr=float(hp.get("prompt_lr", 0.0025)),
      momentum=momentum,
      weight_decay=weight_decay,
      schedule="constant",
    ),
    optim_gradnet=schedules.Optimizer(
      lr=float(hp.get("vnet_lr", 0.00025)),
      momentum=float(hp.get("vnet_momentum", momentum)),
      weight_decay=float(hp.get("vnet_weight_decay", weight_decay)),
      schedule="constant",
    ),
  )
  # The functions below also return what the npz recorded.
  recording = dataclasses.replace(spec, record_intermediates=True)

  images = jnp.asarray(arrays["input/images"].transpose(0, 2, 3, 1))
  labels = jnp.asarray(arrays["input/labels"], jnp.int32)
  n_cls = arrays["input/tokenized_prompts"].shape[0]
  teacher = arrays["input/zs_fixed_embeddings"]
  frozen = meta_step.Frozen(
    clip,
    {
      "token_ids": jnp.asarray(arrays["input/tokenized_prompts"], jnp.int32),
      "teacher": clip_lib.normalize(jnp.asarray(teacher)),
      "class_mask": jnp.ones((n_cls,), bool),
    },
  )
  b = labels.shape[0]
  q_ids = arrays["random/query_ids"]
  s_ids = arrays["random/support_ids"]
  query = np.zeros(b, bool)
  query[q_ids] = True
  lam = np.zeros(b, dtype)
  lam[q_ids] = arrays["random/lam"]
  partner = np.zeros(b, np.int32)
  partner[q_ids] = s_ids[arrays["random/mix_ids"]]
  task = meta_step.Task(
    query=jnp.asarray(query),
    support=jnp.asarray(~query),
    lam=jnp.asarray(lam),
    partner=jnp.asarray(partner),
    valid=jnp.asarray(len(s_ids) > 0),
  )

  out: dict[str, np.ndarray] = {}

  def put_prompts(prefix, tree):
    for br in branches:
      for i in range(depths[br]):
        out[f"{prefix}/{official_prompt_name(br, i)}"] = np.asarray(tree[br][i])

  def put_gradnet(prefix, tree):
    for br in branches:
      for i in range(depths[br]):
        for which in (0, 1):
          w = tree[br][f"w{which + 1}"][i]
          out[f"{prefix}/{_gradnet_name(br, i, which)}"] = np.asarray(w).T

  def put_forward(prefix, fwd, rows, batch_rows):
    """`rows` of the forward's batch are the samples `batch_rows`."""
    out[f"{prefix}/forward/ce_loss"] = np.asarray(fwd["ce"])
    for name in ("text_features", "text_features_unnormalized"):
      out[f"{prefix}/forward/{name}"] = np.asarray(fwd[name])
    for name in ("image_features", "image_features_unnormalized", "logits"):
      out[f"{prefix}/forward/{name}"] = np.asarray(fwd[name])[rows]
    out[f"{prefix}/forward/zs_image_features"] = np.asarray(v0)[batch_rows]

  def put_grads(prefix, g_ce, g_reg, state_gnet, combined):
    put_prompts(f"{prefix}/grad_ce", g_ce)
    put_prompts(f"{prefix}/grad_reg", g_reg)
    put_prompts(f"{prefix}/combined_grad", combined)
    gate, gam = {}, {}
    for br in branches:
      gate[br] = gradnet_lib.gate_logits(state_gnet[br], g_ce[br], g_reg[br])
      gam[br] = gradnet_lib.gamma(state_gnet[br], g_ce[br], g_reg[br])
    put_prompts(f"{prefix}/gamma", gam)
    for br in branches:
      for i in range(depths[br]):
        key = f"{prefix}/gate_logits/{official_prompt_name(br, i)}"
        out[key] = np.asarray(gate[br][i])[None]

  # Stage 1: the modulated plain step on the whole batch.
  v0 = meta_step.frozen_image_features(clip, images)
  x = meta_step.Inputs(images, labels, v0, jnp.ones((b,), bool))
  g_ce, g_reg, fwd = jax.jit(
    meta_step.task_and_reg_grads, static_argnames="spec"
  )(prompts, frozen, x, recording)
  combined, _ = meta_step.combine(gnet, g_ce, g_reg, meta_cfg)
  put_forward("stage1", fwd, np.arange(b), np.arange(b))
  out["stage1/loss_ce"] = np.asarray(fwd["ce"])
  out["stage1/rag_text"] = np.asarray(fwd["r_text"])
  out["stage1/rag_image"] = np.asarray(fwd["r_image"])
  put_grads("stage1", g_ce, g_reg, gnet, combined)
  state = meta_step.init_state(
    jax.random.key(0), prompts, spec, steps_per_epoch=1
  )
  state = state.replace(gradnet=gnet, opt_gradnet=spec.optim_gradnet.init(gnet))
  updates, opt1 = spec.optim.sgd(spec.optim.lr).update(
    combined, state.opt_prompts, prompts
  )
  theta1 = optax.apply_updates(prompts, updates)
  put_prompts("stage1/params_after_step", theta1)
  put_prompts("stage1/momentum_buffer", _momentum(opt1))

  # Inner, query and meta gradients, from the functions the step uses.
  loss, aux, g_theta, g_phi = jax.jit(
    meta_step.meta_gradients, static_argnames="spec"
  )(theta1, gnet, frozen, x, task, recording)
  inner = aux["inner"]
  slots = list(np.asarray(inner["slots"]))
  put_forward("inner", inner["forward"], [slots.index(i) for i in s_ids], s_ids)
  out["inner/loss_ce"] = np.asarray(inner["forward"]["ce"])
  out["inner/rag_text"] = np.asarray(inner["forward"]["r_text"])
  out["inner/rag_image"] = np.asarray(inner["forward"]["r_image"])
  put_grads(
    "inner", inner["grad_ce"], inner["grad_reg"], gnet, inner["combined_grad"]
  )
  put_prompts("inner/adapted", aux["adapted"])
  q = aux["query"]
  out["query/forward/ce_loss"] = np.asarray(q["ce"])
  out["query/forward/text_features"] = np.asarray(q["text_features"])
  out["query/forward/text_features_unnormalized"] = np.asarray(
    q["text_features_unnormalized"]
  )
  out["query/forward/image_features"] = np.asarray(q["image_features"])[q_ids]
  out["query/forward/logits"] = np.asarray(q["logits"])[q_ids]
  img = np.asarray(q["image_features_unnormalized"])
  out["query/forward/image_features_qry_unnormalized"] = img[q_ids]
  out["query/forward/image_features_sup_unnormalized"] = img[s_ids]
  out["query/forward/zs_image_features"] = np.asarray(v0)[q_ids]
  out["query/loss_ce"] = np.asarray(q["ce"])
  out["query/loss"] = np.asarray(loss)
  out["query/loss_tensor_value"] = np.asarray(loss)
  put_prompts("meta/grad", g_theta)
  put_gradnet("meta/grad_vnet", g_phi)

  # after/*: the whole jitted training step with the injected task.
  step = meta_step.make_train_step(spec, donate=False)
  new, _ = step(state, frozen, {"image": images, "label": labels}, task=task)
  put_prompts("after", new.prompts)
  put_prompts("after/momentum_buffer", _momentum(new.opt_prompts))
  put_gradnet("after", new.gradnet)
  put_gradnet("after/vnet_momentum_buffer", _momentum(new.opt_gradnet))
  return out


def _momentum(opt_state):
  """The SGD momentum buffer (optax trace) inside a `schedules.sgd` state."""
  for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "trace")):
    if hasattr(s, "trace"):
      return s.trace
  raise ValueError("no momentum trace in this optimizer state")


def compare(replayed: dict, npz_path: str) -> dict[str, float]:
  """Worst relative difference per group: max|a-b| / max(max|b|, 1e-12)."""
  arrays, _ = _load(npz_path)
  worst: dict[str, float] = {}
  for k, v in replayed.items():
    ref = arrays[k]
    scale = max(float(np.abs(ref).max()), 1e-12)
    err = float(np.abs(np.asarray(v, np.float64) - ref).max()) / scale
    g = k.split("/")[0] + "/" + re.sub(r"/.*", "", k.split("/", 1)[1])
    worst[g] = max(worst.get(g, 0.0), err)
  return worst
