r"""Builds the demo's assets into a cache folder, each only if missing.

  python -m demo.build                 # what the demo needs
  python -m demo.build --from_scratch  # also re-pretrain CLIP

world -> tokenizer -> pretrained tiny CLIP -> downstream datasets:

* The world is code (world.py): nothing to build.
* The tokenizer and the tiny CLIP come committed, as a Hugging Face folder
  in `demo/tiny_clip` (a few MB): pretraining takes about as
  long as the whole demo budget on two CPU cores, so a fresh clone loads
  it instead. `--from_scratch` (or a checkout without it) trains the BPE
  and pretrains the CLIP into `<cache>/tiny_clip` with pretrain.py, the
  same code and seed that made the committed one.
* The datasets (about 5k PNGs, ~15 MB) are rendered into `<cache>/data` in
  a few seconds, so they are not committed.

Every step is idempotent: a finished step leaves a marker (the checkpoint's
config.json and model.safetensors, the datasets' manifest) and is skipped
when its marker matches. The cache folder is `$PROMETAR_DEMO_CACHE`, else
`.cache/demo` in the checkout (ignored by git).
"""

from __future__ import annotations

import argparse
import os
import shutil

from demo import datasets as demo_datasets

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
COMMITTED_CHECKPOINT = os.path.join(PACKAGE_DIR, "tiny_clip")
CHECKPOINT_FILES = ("config.json", "model.safetensors", "vocab.json")


# The demo is a folder of the checkout, next to configs/ and launch.py.
CHECKOUT = os.path.dirname(PACKAGE_DIR)


def default_cache_dir() -> str:
  """$PROMETAR_DEMO_CACHE, else `<checkout>/.cache/demo`."""
  env = os.environ.get("PROMETAR_DEMO_CACHE")
  if env:
    return os.path.abspath(os.path.expanduser(env))
  return os.path.join(CHECKOUT, ".cache", "demo")


def data_root(cache_dir: str | None = None) -> str:
  return os.path.join(cache_dir or default_cache_dir(), "data")


def has_checkpoint(folder: str) -> bool:
  return all(os.path.isfile(os.path.join(folder, f)) for f in CHECKPOINT_FILES)


def checkpoint_dir(cache_dir: str | None = None, from_scratch=False) -> str:
  """The committed checkpoint, or the cache's own when asked or missing."""
  if not from_scratch and has_checkpoint(COMMITTED_CHECKPOINT):
    return COMMITTED_CHECKPOINT
  return os.path.join(cache_dir or default_cache_dir(), "tiny_clip")


def build(
  cache_dir: str | None = None,
  *,
  checkpoint: str | None = None,
  from_scratch: bool = False,
  pretrain_config=None,
  per_class=demo_datasets.PER_CLASS,
  names=demo_datasets.DEMO_NAMES,
  progress: bool = True,
) -> dict[str, str]:
  """Makes sure the checkpoint and the datasets exist; returns their paths.

  Args:
    cache_dir: the cache folder (default: `default_cache_dir()`).
    checkpoint: the checkpoint folder to use, pretrained into if it holds
      none (default: `checkpoint_dir(cache_dir, from_scratch)`).
    from_scratch: pretrain into the cache even if the committed checkpoint
      is there.
    pretrain_config: a `pretrain.PretrainConfig` (default: the committed
      checkpoint's recipe).
    per_class: dataset sizes (train, val, test) per class.
    names: the demo datasets to write.
    progress: show progress bars.

  Returns:
    {"checkpoint": folder for `clip.load`, "data_root": CoOp data root}.
  """
  cache_dir = cache_dir or default_cache_dir()
  ckpt = checkpoint or checkpoint_dir(cache_dir, from_scratch)
  # The world is code: nothing to build. Each step shows its own bar, and
  # only when it has work to do.
  if not has_checkpoint(ckpt):
    from demo import pretrain

    cfg = pretrain_config or pretrain.PretrainConfig()
    partial = ckpt + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    pretrain.pretrain(cfg, partial, progress=progress)
    shutil.rmtree(ckpt, ignore_errors=True)
    os.replace(partial, ckpt)
  root = data_root(cache_dir)
  demo_datasets.write_all(root, per_class, names=names, progress=progress)
  return {"checkpoint": ckpt, "data_root": root}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cache_dir", default=None)
  parser.add_argument("--from_scratch", action="store_true")
  args = parser.parse_args(argv)
  paths = build(args.cache_dir, from_scratch=args.from_scratch)
  for k, v in paths.items():
    print(f"{k}: {v}")


if __name__ == "__main__":
  main()
