r"""Offline demo: the base-to-new protocol in a generated world, tiny CLIP.

Zero-shot CLIP, CoOp, IVLP and IVLP + ProMetaR on three downstream tasks of
the generated world (demo/datasets.py: colours, scenes and compositions;
20, 12 and 24 classes), with a tiny CLIP pretrained on that world
(committed in demo/tiny_clip). Nothing is downloaded: the datasets are
rendered into .cache/demo on first use. All four methods, one seed, the
results table at the end (about 2 minutes from a fresh clone on a 2-core
CPU machine, 4 on a slower one; docs/demo.md):

  python launch.py --config configs/demo.py --workdir workdir/demo

Three seeds (the table of docs/demo.md):

  python launch.py --config configs/demo.py:seeds=1,2,3 \
    --workdir workdir/demo3

With every method (`method=all`, the default) the config names the demo's
driver (`config.driver`, demo/run.py), which launch.py calls instead of
the training system; one method is an ordinary config that launch.py
trains like any other (the assets must exist: `python -m demo.build`):

  python launch.py --config configs/demo.py:method=prometar \
    --workdir workdir/demo/prometar

Arguments: method (all | zeroshot | coop | ivlp | prometar), dataset
(colours, scenes, compositions or all), seed / seeds, shots, epochs, quick (2
shots, 1 epoch, 40 test images per set: a pipeline check, not a result),
cache (the cache folder; default $PROMETAR_DEMO_CACHE or .cache/demo).

Recipe: the released ProMetaR step and optimiser (SGD lr 0.0025, batch 4,
16 shots, cosine with one warm-up epoch, gradnet at 1e-6) scaled to the
tiny CLIP: 32x32 images, prompts in 3 of the 4 layers (the paper: 9 of
12), 4 text + 1 vision tokens (the paper: 4 + 4), training crops of
50-100% of the image (Dassl: 8-100%; see LR below), 5 epochs (the
released 10, halved; see EPOCHS below). Every method shares the recipe;
the method is the only difference between rows.

Expected, seed 1 (the first command), average Base / New / HM of the three
tasks; per task in EXPECTED_SEED1 below and docs/demo.md ("Seed 1, and how
stable it is"), seeds 1-3 there too. Made with this code by the first
command above (2026-12-02); every seed-1 cell came out identical across
three clones, 1/2/4 XLA devices, oneDNN off and AVX2 code. The one cell
known to move on other machines is CoOp on scenes (it can collapse: base
anywhere from about 20 to 72).
  Zero-shot CLIP 46.69 / 39.81 / 42.98
  CoOp           65.98 / 51.83 / 58.06
  IVLP           62.11 / 40.14 / 48.76
  ProMetaR       63.29 / 44.24 / 52.08
"""

from __future__ import annotations

from configs import common
from demo import build as demo_build
from demo import datasets as demo_datasets

METHODS = ("zeroshot", "coop", "ivlp", "prometar")
# The function launch.py calls for the whole demo (every method, one
# table) instead of the training system.
DRIVER = "demo.run:run_and_print"
# Prompt depth in the 4-layer towers (the paper: 9 of 12 layers).
DEPTH = 3
# Chosen on IVLP alone (seed 1, the average HM of the three tasks),
# before any ProMetaR run, among lr {0.0025, 0.001, 0.0005} x vision
# tokens {2, 1} x crop scale {(0.08, 1), (0.5, 1)} (docs/demo.md): the
# released lr, one vision token (the tiny ViT has 16 patches, not 196)
# and crops of at least half the image (an 8% crop of a 32x32 image is
# 9x9 pixels, often without the object).
LR = 0.0025
N_CTX_VISION = 1
CROP_SCALE = (0.5, 1.0)
# Half the released 10 epochs, for every method: the demo must end within
# 5 minutes of a fresh clone on two CPU cores (issue #16). Chosen on IVLP
# alone (seed 1, average HM: 10 epochs 50.95, 6: 49.47, 5: 48.76, 4:
# 47.99) before any ProMetaR run at fewer epochs (docs/demo.md).
EPOCHS = 5
# Seed 1 of the first command: {method: {task: (base, new)}} in % (HM =
# 2BN/(B+N)), read from its table (docs/demo.md). Identical wherever checked
# except coop/scenes, which can collapse on other machines.
EXPECTED_SEED1 = {
  "zeroshot": {
    "colours": (38.00, 31.67),
    "scenes": (61.11, 49.72),
    "compositions": (40.97, 38.06),
  },
  "coop": {
    "colours": (64.33, 50.50),
    "scenes": (70.56, 49.44),
    "compositions": (63.06, 55.56),
  },
  "ivlp": {
    "colours": (55.50, 33.33),
    "scenes": (66.11, 43.89),
    "compositions": (64.72, 43.19),
  },
  "prometar": {
    "colours": (58.33, 48.00),
    "scenes": (76.94, 46.39),
    "compositions": (54.58, 38.33),
  },
}


def _datasets(names) -> tuple[str, ...]:
  out = []
  for n in names:
    for m in demo_datasets.DEMO_NAMES if n == "all" else (n,):
      coop = demo_datasets.get(m).coop_name
      if coop not in out:
        out.append(coop)
  return tuple(out)


def for_method(config, method: str):
  """A copy of the demo config that trains `method` (one of METHODS).

  Prompt lengths and depths are the config's own (so that overrides such
  as --config.prompt.n_ctx_vision=2 reach every method); the method only
  picks the learner and the training scheme. The copy has no driver: the
  training system trains it.
  """
  if method not in METHODS:
    raise ValueError(f"unknown demo method {method!r}; use one of {METHODS}")
  config = config.copy_and_resolve_references()
  if "driver" in config:
    with config.unlocked():
      del config["driver"]
  shape = {
    k: config.prompt[k]
    for k in ("n_ctx_text", "n_ctx_vision", "depth_text", "depth_vision")
  }
  kind = "ivlp" if method == "prometar" else method
  common.apply_method(config, kind, prometar=method == "prometar")
  config.prompt.n_ctx_text = shape["n_ctx_text"]
  if kind == "ivlp":
    config.prompt.update(shape)
  config.demo.method = method
  return config


def get_config(arg=None):
  arg = common.parse_arg(
    arg,
    method="all",
    dataset=("all",),
    seed=-1,
    seeds=(1,),
    shots=16,
    epochs=EPOCHS,
    quick=False,
    cache="",
  )
  if arg.method != "all" and arg.method not in METHODS:
    raise ValueError(f"method={arg.method!r}: use all or one of {METHODS}")
  cache = arg.cache or demo_build.default_cache_dir()
  config = common.get_base_config()
  config.protocol = "base2new"
  config.seeds = (arg.seed,) if arg.seed >= 0 else tuple(arg.seeds)
  config.model.name = demo_build.checkpoint_dir(cache)
  config.data.datasets = _datasets(arg.dataset)
  # Tables name the tasks, not the CoOp layouts that store them (and show
  # no paper numbers beside them).
  config.data.display_names = {
    d.coop_name: d.name for d in demo_datasets.DEMO_DATASETS
  }
  config.data.root = demo_build.data_root(cache)
  config.data.num_shots = arg.shots
  config.data.image_size = 32
  config.prompt.depth_text = config.prompt.depth_vision = DEPTH
  config.prompt.n_ctx_vision = N_CTX_VISION
  config.optim.lr = LR
  config.data.crop_scale = CROP_SCALE
  # 6 to 12 classes per half: one compiled step for the three tasks. Masked
  # classes change no prediction (tests/test_train.py; the colours ProMetaR
  # run gave the same accuracies and losses with and without).
  config.data.class_multiple = 16
  config.optim.epochs = arg.epochs
  config.eval.batch_size = 250
  # Runs are short: a finished run's summary.json is what makes a rerun
  # skip it; orbax saves would cost more than they save.
  config.checkpoint.enabled = False
  # What demo/run.py sweeps when `sweep` (its driver then runs every
  # method); else launch.py trains the config's own method.
  config.demo = dict(
    methods=METHODS if arg.method == "all" else (arg.method,),
    sweep=arg.method == "all",
    method="",
    cache=cache,
    # Images per class (train, val, test) of the rendered datasets.
    per_class=demo_datasets.PER_CLASS,
  )
  if arg.quick:
    config.data.num_shots = 2
    config.optim.epochs = 1
    config.eval.max_examples = 40
    config.log_every = 1
  # The project's main job, ProMetaR, unless one method is asked for.
  if arg.method != "all":
    return for_method(config, arg.method)
  config = for_method(config, "prometar")
  config.driver = DRIVER
  return config
