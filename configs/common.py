"""Pieces shared by the config files: argument parsing, defaults, methods.

A config file is `get_config(arg)` where `arg` is the text after the colon
of `--config configs/base2new.py:dataset=eurosat,seeds=1,2,3,runlocal`.
`parse_arg` reads it against typed defaults:

* `key=value` with the default's type (bool accepts true/false/1/0);
* a bare `key` sets a boolean to True (`runlocal`);
* tuple-valued keys take comma-separated values: `seeds=1,2,3`,
  `dataset=eurosat,dtd` (a bare token that is not a key continues the
  previous tuple);
* an unknown key is an error that lists the known ones.

Every key of the returned ConfigDict has a default here, so that
`--config.x.y=...` overrides of a misspelled key fail under
`lock_config=True` (launch.py locks it).
"""

from __future__ import annotations

import os

import ml_collections

from prometar_jax import prompt_learners as pl

# The 11 datasets of the base-to-new table, in the paper's order.
BASE2NEW_DATASETS = (
  "imagenet",
  "caltech101",
  "oxford_pets",
  "stanford_cars",
  "oxford_flowers",
  "food101",
  "fgvc_aircraft",
  "sun397",
  "dtd",
  "eurosat",
  "ucf101",
)
DOMAIN_GENERALIZATION_TARGETS = (
  "imagenetv2",
  "imagenet_sketch",
  "imagenet_a",
  "imagenet_r",
)
CROSS_DATASET_TARGETS = BASE2NEW_DATASETS[1:]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _convert(key, text, default):
  if isinstance(default, bool):
    low = text.lower()
    if low in _TRUE:
      return True
    if low in _FALSE:
      return False
    raise ValueError(f"config argument {key}={text!r}: expected true/false")
  try:
    return type(default)(text)
  except ValueError as e:
    raise ValueError(
      f"config argument {key}={text!r}: expected {type(default).__name__}"
    ) from e


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'k=v,flag,seeds=1,2,3' against typed `defaults`.

  Args:
    arg: the config argument (None or "" gives the defaults).
    **defaults: every accepted key with its default; the default's type is
      the value's type. Tuple defaults take comma-separated values of the
      type of their first element (int if empty).

  Returns:
    A ConfigDict of the parsed values (locked: unknown keys fail).
  """
  out = dict(defaults)
  current = None  # the tuple-valued key that bare tokens continue
  for token in (arg or "").split(","):
    token = token.strip()
    if not token:
      continue
    key, eq, value = token.partition("=")
    key = key.strip()
    if not eq and key not in defaults and current is not None:
      out[current] = out[current] + (_elem(current, defaults, key),)
      continue
    if key not in defaults:
      raise ValueError(
        f"unknown config argument {key!r}; known: {', '.join(sorted(defaults))}"
      )
    default = defaults[key]
    current = None
    if not eq:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      out[key] = True
    elif isinstance(default, tuple):
      out[key] = (_elem(key, defaults, value.strip()),)
      current = key
    else:
      out[key] = _convert(key, value.strip(), default)
  cfg = ml_collections.ConfigDict(out)
  cfg.lock()
  return cfg


def _elem(key, defaults, text):
  sample = defaults[key][0] if defaults[key] else 0
  return _convert(key, text, sample)


def expand_datasets(names: tuple[str, ...]) -> tuple[str, ...]:
  """'all' -> the 11 base-to-new datasets; other names are kept in order."""
  out = []
  for n in names:
    for m in BASE2NEW_DATASETS if n == "all" else (n,):
      if m not in out:
        out.append(m)
  return tuple(out)


def get_base_config() -> ml_collections.ConfigDict:
  """ProMetaR with the released hyper-parameters, base-to-new on EuroSAT.

  Values are those of the official `vit_b16_c2_ep10_batch4_4+4ctx.yaml`
  plus the Dassl defaults it relies on (docs/official_code.md, "Released
  hyper-parameters"): ViT-B/16, 16 shots, batch 4, 10 epochs, SGD lr
  0.0025 (momentum 0.9, weight decay 5e-4) cosine with one constant
  warm-up epoch at 1e-5 stepped per epoch, IVLP
  prompts of depth 9 with 4 text + 4 vision tokens.
  """
  config = ml_collections.ConfigDict()
  # base2new | domain_generalization | cross_dataset.
  config.protocol = "base2new"
  # Dassl seeds: the few-shot selection and the JAX rng both use them.
  config.seeds = (1,)

  # A hub id (read from the Hugging Face cache) or a local folder.
  # learner: a registered prompt learner (prometar_jax/prompt_learners/);
  # config.prompt holds its hyper-parameters.
  config.model = dict(
    name="openai/clip-vit-base-patch16",
    dtype="float32",
    # What the backward pass recomputes of each block: "matmuls" (keeps
    # only the weight matmuls' outputs), "full" (least memory: hundreds of
    # classes) or "none" (models/clip.py REMAT_MODES).
    remat="matmuls",
    learner="ivlp",
  )
  config.prompt = dict(
    n_ctx_text=4,
    n_ctx_vision=4,
    depth_text=9,
    depth_vision=9,
    init_words="a photo of a",
    init_std=0.02,
  )
  # The released code's step (docs/official_code.md, "One iteration of the
  # released code"); `behaviour=paper` in the config argument switches to
  # the paper's formulation (see `apply_behaviour`).
  config.meta = dict(
    mode="prometar",
    first_order=False,
    plain_step=True,
    adapt_lr=5e-4,
    lr_ratio=5e-4,
    mixup_alpha=0.5,
    mixup_beta=0.5,
    dim_rate=8,
    text_reg_weight=50.0,
    image_reg_weight=20.0,
    fixed_gamma=0.5,
    # The paper's task augmentation (mixup of the query images); False is
    # the "w/o task augmentation" ablation (docs/method.md).
    task_augmentation=True,
  )
  config.data = dict(
    datasets=("eurosat",),
    # CoOp data root (the folder holding eurosat/, dtd/, ...). $DATA as in
    # the CoOp scripts.
    root=os.environ.get("DATA", "data"),
    num_shots=16,
    batch_size=4,
    image_size=224,
    # Pad the class axis to a multiple of this (masked classes): datasets
    # of different class counts then share one compiled step.
    class_multiple=1,
    # Group the class prompts by token length (at most this many groups) so
    # the text tower runs over fewer positions; exact. 1: one group. Not
    # with class_multiple > 1 (that padding exists to keep one shape).
    # The prompted tower runs all groups in one pass (docs/performance.md).
    text_buckets=4,
    # RandomResizedCrop's area range for training images (Dassl: 0.08-1).
    crop_scale=(0.08, 1.0),
    # Read images from a TFDS build of the CoOp folders (data.build_tfds)
    # instead of the JPEG files, when set.
    tfds_dir="",
    # Check every image of the sweep before training (prometar_jax/data/
    # verify.py): training images are decoded; evaluation images too when
    # there are at most verify_decode_max of them, else header-checked.
    verify_images=True,
    verify_decode_max=20000,
    # {dataset: name} for data that is not the paper's dataset of that
    # name (the offline demo's tasks, stored in CoOp layouts): tables show
    # the name and leave the paper's numbers out.
    display_names={},
  )
  config.optim = dict(
    lr=0.0025,
    epochs=10,
    schedule="cosine",
    warmup_epochs=1,
    warmup_lr=1e-5,
    momentum=0.9,
    weight_decay=5e-4,
  )
  # Released code: the VNet's scheduler is never stepped, so it trains at
  # its warm-up lr of 1e-6 for the whole run (docs/official_code.md, D2).
  # Its cosine, when set, spans config.optim.epochs.
  config.optim_gradnet = dict(
    lr=1e-6,
    schedule="constant",
    warmup_epochs=1,
    warmup_lr=1e-6,
    momentum=0.9,
    weight_decay=5e-4,
  )
  config.eval = dict(
    batch_size=100,
    # Extra test-only datasets evaluated with all classes after training
    # (domain generalization, cross-dataset).
    targets=(),
    # Evaluate only the first n test images of each set (0: all); runlocal.
    max_examples=0,
  )
  # All devices on one "data" axis: images along it, and the class axis of
  # the text tower too (padded to a multiple of the device count).
  config.mesh = dict(num_devices=-1, shard_classes=True)
  config.checkpoint = dict(
    enabled=True,
    max_to_keep=2,
    # Also save every n steps inside an epoch (0: only at epoch ends).
    every_steps=0,
  )
  # The divergence guard (prometar_jax/guard.py): a run stops when a loss
  # exceeds max_loss or the prompts' norm exceeds this many times its
  # initial norm (finite blow-up), as well as on any NaN/inf.
  config.guard = dict(max_prompt_norm_ratio=100.0, max_loss=1e4)
  config.log_every = 20
  config.progress_bar = True
  return config


def apply_behaviour(config: ml_collections.ConfigDict, behaviour: str):
  """Sets the released code's step or the paper's formulation.

  "released" (default): the plain modulated step before the meta step,
  the meta loss scaled by lr_ratio = 5e-4 and the gradnet at a constant
  1e-6. "paper" (docs/official_code.md, "The paper's formulation"): no
  plain step, lr_ratio = 1 and the gradnet on its own cosine schedule from
  2.5e-4 (the YAML's OPTIM_VNET).
  """
  if behaviour == "released":
    return config
  if behaviour != "paper":
    raise ValueError(f"behaviour {behaviour!r}: use 'released' or 'paper'")
  config.meta.plain_step = False
  config.meta.lr_ratio = 1.0
  config.optim_gradnet.lr = 2.5e-4
  config.optim_gradnet.schedule = "cosine"
  return config


def apply_method(
  config: ml_collections.ConfigDict, method: str, prometar: bool
) -> ml_collections.ConfigDict:
  """Prompt learner `method`, trained with ProMetaR or with plain CE.

  `method` is a registered learner (`prompt_learners.names()`). All
  learners keep ProMetaR's optimisation recipe (batch 4, 10 epochs, lr
  0.0025), so that with/without ProMetaR differ only in the training
  scheme. Prompt shapes are each learner's `defaults`, those of its paper:
  CoOp 4 text tokens from "a photo of a"; VPT-deep 4 vision tokens in 9
  layers; IVLP 4+4 tokens in 9 layers; MaPLe 2 coupled tokens in 9 layers.
  """
  learner = pl.get(method)
  config.model.learner = learner.name
  config.prompt.update(dict(learner.defaults))
  if not prometar:
    config.meta.mode = "plain"
  return config


def apply_runlocal(config: ml_collections.ConfigDict):
  """A quick local check of the whole pipeline, not a result."""
  config.optim.epochs = 1
  config.data.num_shots = 1
  config.eval.max_examples = 200
  config.log_every = 1
  return config


def imagenet_transfer_config(
  arg: str | None, protocol: str, targets: tuple[str, ...]
) -> ml_collections.ConfigDict:
  """Train on all ImageNet classes, test on `targets` (DG, cross-dataset)."""
  arg = parse_arg(
    arg, seed=-1, seeds=(1,), shots=16, behaviour="released", runlocal=False
  )
  config = get_base_config()
  config.protocol = protocol
  config.data.datasets = ("imagenet",)
  config.eval.targets = targets
  config.seeds = (arg.seed,) if arg.seed >= 0 else tuple(arg.seeds)
  config.data.num_shots = arg.shots
  apply_behaviour(config, arg.behaviour)
  if arg.runlocal:
    apply_runlocal(config)
  return config
