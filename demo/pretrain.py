r"""Contrastive pretraining of a tiny CLIP on the world, saved as a HF folder.

  python -m demo.pretrain --out .cache/demo/tiny-clip

1. Tokenizer: BPE merges learned on captions of the world (tokenizer.py).
2. Images: a pool of `pool_size` rendered objects (world.py) in groups of
   4 that differ in one attribute only (`world.sample_groups`: without
   them a tiny CLIP learns colours and backgrounds and never shapes);
   every step draws 32 groups from the pool, flips half of the images
   (captions never mention left or right) and writes a fresh random
   caption for each, naming the attribute its group varies.
3. Model: the CLIP of `models/clip.py` at a tiny size (both towers width
   128, 4 layers, 2 heads; 32x32 images in 8x8 patches; projection 128),
   trained with CLIP's symmetric InfoNCE and a learnable temperature,
   AdamW with warm-up and cosine decay.
4. Export: config.json through `transformers.CLIPConfig`, model.safetensors
   with Hugging Face's tensor names (`to_hf_state_dict`, the inverse of
   `clip.convert_hf_state_dict`), the tokenizer files: a folder that
   `clip.load()` and `transformers.CLIPModel.from_pretrained` both read.

Everything is a function of `PretrainConfig.seed`: the same machine and
library versions give the same checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from demo import tokenizer as tokenizer_lib
from demo import world
from prometar_jax.data import pp_ops
from prometar_jax.models import clip as clip_lib

PyTree = Any


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """Model shape, data and optimisation of the pretraining run."""

  seed: int = 0
  image_size: int = world.IMAGE_SIZE
  patch_size: int = 8
  vision_width: int = 128
  text_width: int = 128
  layers: int = 4
  heads: int = 2
  projection_dim: int = 128
  num_merges: int = 1000
  tokenizer_captions: int = 20000
  pool_size: int = 40000
  # Objects per minimal-pair group (world.sample_groups); divides the batch.
  group_size: int = 4
  steps: int = 1000
  batch_size: int = 128
  # Captions are at most 18 tokens: the text tower trains on the first 24
  # positions (exact under the causal mask; later rows keep their init).
  text_length: int = 24
  lr: float = 1.5e-3
  warmup_steps: int = 40
  weight_decay: float = 0.1
  # Stored precision of model.safetensors ("float32" or "float16").
  save_dtype: str = "float32"


# ---------------------------------------------------------------------------
# Hugging Face config and tensors
# ---------------------------------------------------------------------------


def hf_config(cfg: PretrainConfig, vocab_size: int):
  """The `transformers.CLIPConfig` of the tiny CLIP."""
  from transformers import CLIPConfig

  text = dict(
    vocab_size=vocab_size,
    hidden_size=cfg.text_width,
    intermediate_size=4 * cfg.text_width,
    num_attention_heads=cfg.heads,
    num_hidden_layers=cfg.layers,
    max_position_embeddings=clip_lib.CONTEXT_LENGTH,
    hidden_act="quick_gelu",
    # SOT and EOT are the two last ids (tokenizer.vocabulary).
    bos_token_id=vocab_size - 2,
    eos_token_id=vocab_size - 1,
    pad_token_id=vocab_size - 1,
    projection_dim=cfg.projection_dim,
  )
  vision = dict(
    hidden_size=cfg.vision_width,
    intermediate_size=4 * cfg.vision_width,
    num_attention_heads=cfg.heads,
    num_hidden_layers=cfg.layers,
    image_size=cfg.image_size,
    patch_size=cfg.patch_size,
    hidden_act="quick_gelu",
    projection_dim=cfg.projection_dim,
  )
  return CLIPConfig(
    text_config=text,
    vision_config=vision,
    projection_dim=cfg.projection_dim,
    architectures=["CLIPModel"],
  )


def to_hf_state_dict(params: PyTree, cfg: clip_lib.ClipConfig) -> dict:
  """Our parameter pytree -> HF `CLIPModel` tensors (numpy, torch layout).

  The inverse of `clip.convert_hf_state_dict`: Dense kernels are stored
  transposed ([out, in]), the patch convolution as [out, in, kh, kw], the
  scanned layer axis as one tensor per layer.
  """
  out = {}

  def put(key, value):
    out[key] = np.asarray(value, np.float32)

  def dense(prefix, p):
    put(prefix + ".weight", np.asarray(p["kernel"]).T)
    if "bias" in p:
      put(prefix + ".bias", p["bias"])

  def ln(prefix, p):
    put(prefix + ".weight", p["scale"])
    put(prefix + ".bias", p["bias"])

  def encoder(prefix, p, layers):
    for i in range(layers):
      layer = jax.tree.map(np.asarray, clip_lib.encoder_layer(p, i))
      q = f"{prefix}.encoder.layers.{i}"
      for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        dense(f"{q}.self_attn.{name}", layer["self_attn"][name])
      ln(f"{q}.layer_norm1", layer["layer_norm1"])
      ln(f"{q}.layer_norm2", layer["layer_norm2"])
      dense(f"{q}.mlp.fc1", layer["fc1"])
      dense(f"{q}.mlp.fc2", layer["fc2"])

  v, t = params["vision_model"], params["text_model"]
  put(
    "vision_model.embeddings.patch_embedding.weight",
    np.asarray(v["patch_embedding"]["kernel"]).transpose(3, 2, 0, 1),
  )
  put("vision_model.embeddings.class_embedding", v["class_embedding"])
  put(
    "vision_model.embeddings.position_embedding.weight",
    v["position_embedding"],
  )
  ln("vision_model.pre_layrnorm", v["pre_layrnorm"])
  encoder("vision_model", v["encoder"], cfg.vision.layers)
  ln("vision_model.post_layernorm", v["post_layernorm"])
  put(
    "text_model.embeddings.token_embedding.weight",
    t["token_embedding"]["embedding"],
  )
  put(
    "text_model.embeddings.position_embedding.weight", t["position_embedding"]
  )
  encoder("text_model", t["encoder"], cfg.text.layers)
  ln("text_model.final_layer_norm", t["final_layer_norm"])
  dense("visual_projection", params["visual_projection"])
  dense("text_projection", params["text_projection"])
  put("logit_scale", np.reshape(params["logit_scale"], ()))
  return out


def save_checkpoint(
  folder: str, params: PyTree, hf_cfg, save_dtype: str = "float32"
) -> dict[str, str]:
  """Writes config.json and model.safetensors; returns their paths."""
  from safetensors.numpy import save_file

  os.makedirs(folder, exist_ok=True)
  hf_cfg.save_pretrained(folder)
  cfg = clip_lib.ClipConfig.from_hf(hf_cfg)
  # np.array, not np.ascontiguousarray: that one makes the scalar
  # logit_scale 1-d, which transformers refuses.
  state = {
    k: np.array(v, dtype=save_dtype, order="C")
    for k, v in to_hf_state_dict(params, cfg).items()
  }
  path = os.path.join(folder, "model.safetensors")
  # "pt": the format tag transformers' from_pretrained expects.
  save_file(state, path, metadata={"format": "pt"})
  return {
    "config": os.path.join(folder, "config.json"),
    "weights": path,
  }


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def normalize_pixels(images: np.ndarray) -> np.ndarray:
  """uint8 [N, H, W, 3] -> CLIP-normalized float32 (as the data pipeline)."""
  mean = np.asarray(pp_ops.CLIP_MEAN, np.float32)
  std = np.asarray(pp_ops.CLIP_STD, np.float32)
  return (images.astype(np.float32) / 255.0 - mean) / std


def init_params(key: jax.Array, cfg: clip_lib.ClipConfig) -> PyTree:
  """Random parameters with CLIP's small token-embedding scale."""
  params = clip_lib.init_params(cfg, key)
  # Flax's Embed starts at unit variance; CLIP (and HF) use std 0.02.
  emb = params["text_model"]["token_embedding"]["embedding"]
  params["text_model"]["token_embedding"]["embedding"] = 0.02 * emb
  return params


def contrastive_loss(params, cfg: clip_lib.ClipConfig, pixels, token_ids):
  """CLIP's symmetric InfoNCE over the batch; (loss, accuracy)."""
  module = clip_lib.make_module(cfg)
  img, txt, log_scale = module.apply({"params": params}, pixels, token_ids)
  img, txt = clip_lib.normalize(img), clip_lib.normalize(txt)
  logits = jnp.exp(log_scale) * img @ txt.T
  labels = jnp.arange(logits.shape[0])
  ce = optax.softmax_cross_entropy_with_integer_labels
  loss = 0.5 * (ce(logits, labels).mean() + ce(logits.T, labels).mean())
  acc = jnp.mean(jnp.argmax(logits, -1) == labels)
  return loss, acc


def make_optimizer(cfg: PretrainConfig) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, cfg.lr, cfg.warmup_steps, cfg.steps, end_value=cfg.lr * 0.02
  )
  # No decay on gains, biases and the temperature (as CLIP).
  mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # noqa: E731
  return optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adamw(schedule, b2=0.98, weight_decay=cfg.weight_decay, mask=mask),
  )


def make_train_step(ccfg: clip_lib.ClipConfig, tx):
  def step(params, opt_state, pixels, token_ids):
    (loss, acc), grads = jax.value_and_grad(contrastive_loss, has_aux=True)(
      params, ccfg, pixels, token_ids
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    # CLIP clips the temperature at 100.
    params["logit_scale"] = jnp.minimum(params["logit_scale"], np.log(100.0))
    return params, opt_state, {"loss": loss, "accuracy": acc}

  return jax.jit(step, donate_argnums=(0, 1))


def render_pool(
  cfg: PretrainConfig, progress: bool = True, chunk: int = 500
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
  """Training images in groups of `cfg.group_size` (world.sample_groups).

  Returns:
    (uint8 images [P, S, S, 3], {attribute: int [P]}, the attribute each
    image's captions must name [P]); P = `pool_size`, group after group.
  """
  from tqdm import tqdm

  images, attrs, require = [], [], []
  per_chunk = chunk // cfg.group_size
  n_groups = cfg.pool_size // cfg.group_size
  for start in tqdm(
    range(0, n_groups, per_chunk),
    desc="render world",
    unit="chunk",
    disable=not progress,
  ):
    rng = np.random.default_rng([cfg.seed, 1, start])
    n = min(per_chunk, n_groups - start)
    a, req = world.sample_groups(rng, n, cfg.group_size)
    images.append(world.render(a, rng, cfg.image_size))
    attrs.append(a)
    require += req
  merged = {k: np.concatenate([a[k] for a in attrs]) for k in attrs[0]}
  return np.concatenate(images), merged, np.asarray(require)


def make_batch(cfg, step, pool, tokenize):
  """Batch `step`: groups from the pool, random flips, fresh captions."""
  images, attrs, require = pool
  rng = np.random.default_rng([cfg.seed, 2, step])
  gs = cfg.group_size
  groups = rng.choice(len(images) // gs, cfg.batch_size // gs, replace=False)
  idx = (groups[:, None] * gs + np.arange(gs)).reshape(-1)
  images = images[idx]
  flip = rng.random(len(idx)) < 0.5
  images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
  attrs = {k: v[idx] for k, v in attrs.items()}
  texts = world.captions(attrs, rng, list(require[idx]))
  ids = tokenize(texts)[:, : cfg.text_length]
  return normalize_pixels(images), ids


def write_tokenizer(cfg: PretrainConfig, folder: str) -> dict:
  """Trains the BPE on world captions and writes the tokenizer files."""
  texts = world.corpus(cfg.seed, cfg.tokenizer_captions)
  merges = tokenizer_lib.train_merges(texts, cfg.num_merges)
  return tokenizer_lib.write_tokenizer(folder, merges)


def pretrain(
  cfg: PretrainConfig, out: str, progress: bool = True, log_every: int = 25
) -> dict:
  """Tokenizer, pool, contrastive training, export to `out`; a report.

  Returns:
    {"config", "steps", "seconds", "final_loss", "log": [(step, loss,
    in-batch accuracy)], "vocab_size"}; also written to
    `out/pretrain_log.json`.
  """
  from tqdm import tqdm

  t0 = time.time()
  vocab = write_tokenizer(cfg, out)
  hf_cfg = hf_config(cfg, len(vocab))
  ccfg = clip_lib.ClipConfig.from_hf(hf_cfg)
  from transformers import CLIPTokenizer

  tok = CLIPTokenizer.from_pretrained(out)

  def tokenize(texts):
    return clip_lib.tokenize(tok, texts, clip_lib.CONTEXT_LENGTH)

  pool = render_pool(cfg, progress)
  t_data = time.time() - t0
  params = init_params(jax.random.key(cfg.seed), ccfg)
  tx = make_optimizer(cfg)
  opt_state = tx.init(params)
  step_fn = make_train_step(ccfg, tx)
  log, pending = [], []
  bar = tqdm(total=cfg.steps, desc="pretrain tiny CLIP", disable=not progress)
  for step in range(cfg.steps):
    pixels, ids = make_batch(cfg, step, pool, tokenize)
    params, opt_state, m = step_fn(params, opt_state, pixels, ids)
    pending.append((step + 1, m))
    if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
      for s, mm in jax.device_get(pending):
        log.append((s, float(mm["loss"]), float(mm["accuracy"])))
      pending = []
      bar.set_postfix(loss=f"{log[-1][1]:.3f}", acc=f"{log[-1][2]:.2f}")
    bar.update(1)
  bar.close()
  params = jax.device_get(params)
  save_checkpoint(out, params, hf_cfg, cfg.save_dtype)
  report = {
    "config": dataclasses.asdict(cfg),
    "vocab_size": len(vocab),
    "steps": cfg.steps,
    "seconds": time.time() - t0,
    "data_seconds": t_data,
    "final_loss": log[-1][1] if log else None,
    "log": log,
  }
  with open(os.path.join(out, "pretrain_log.json"), "w") as f:
    json.dump(report, f, indent=1)
  return report


def zero_shot_accuracy(
  clip: clip_lib.CLIP, per_class: int = 40, seed: int = 7
) -> dict[str, dict[str, float]]:
  """Zero-shot top-1 (%) of `clip` on fresh images of the demo datasets.

  "a photo of a {class}." over all classes, the base half and the new half
  (each half classified among its own classes, as base-to-new evaluates).

  Returns:
    {dataset: {"all", "base", "new", "chance_new"}}.
  """
  from demo import datasets as demo_datasets
  from prometar_jax import zeroshot

  out = {}
  for d in demo_datasets.DEMO_DATASETS:
    k = len(d.classnames)
    half = (k + 1) // 2
    images = np.concatenate(
      [
        demo_datasets.render_class(d, y, "test", per_class, seed)
        for y in range(k)
      ]
    )
    labels = np.repeat(np.arange(k), per_class)
    feats = np.concatenate(
      [
        np.asarray(clip.encode_image(normalize_pixels(images[i : i + 500])))
        for i in range(0, len(images), 500)
      ]
    )
    text = zeroshot.class_text_features(clip, d.classnames)
    scores = np.asarray(zeroshot.logits(clip, feats, text))
    base = labels < half
    out[d.name] = {
      "all": zeroshot.top1_accuracy(scores, labels),
      "base": zeroshot.top1_accuracy(scores[base][:, :half], labels[base]),
      "new": zeroshot.top1_accuracy(
        scores[~base][:, half:], labels[~base] - half
      ),
      "chance_new": 100.0 / (k - half),
    }
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="checkpoint folder")
  fields = dataclasses.fields(PretrainConfig)
  for field in fields:
    parser.add_argument(
      f"--{field.name}", type=type(field.default), default=field.default
    )
  args = parser.parse_args(argv)
  cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields})
  report = pretrain(cfg, args.out)
  print(
    f"saved {args.out}: {report['steps']} steps in "
    f"{report['seconds']:.0f} s, final loss {report['final_loss']:.3f}"
  )
  for name, acc in zero_shot_accuracy(clip_lib.load(args.out)).items():
    print(
      f"zero-shot {name}: all {acc['all']:.1f}, base {acc['base']:.1f}, "
      f"new {acc['new']:.1f} (chance {acc['chance_new']:.1f})"
    )


if __name__ == "__main__":
  main()
