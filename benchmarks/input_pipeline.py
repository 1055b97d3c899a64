"""Evaluation input pipeline throughput: tf.data vs a sequential PIL loader.

The PIL loader is what Dassl does per test image, one after the other:
`Image.open(p).convert("RGB")`, Resize(224, bicubic) on the shorter side,
CenterCrop(224), ToTensor + Normalize (here in numpy), batches stacked. The
tf.data side is `make_eval_dataset` (parallel decode + resize). Both read
the same generated JPEGs (ImageNet-like 500x375 by default) in the same run;
rounds alternate so background load hits both alike, and the best round of
each is reported, with the process CPU time per image (a per-core figure
that background load on a shared machine distorts less than wall time).

    python benchmarks/input_pipeline.py                 # eval, file source
    python benchmarks/input_pipeline.py --tfds --train  # + TFDS source, train

Prints images/s of each loader and the speed-up.
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from prometar_jax import data  # noqa: E402
from prometar_jax.data import pp_ops, synthetic  # noqa: E402

MEAN = np.asarray(pp_ops.CLIP_MEAN, np.float32)
STD = np.asarray(pp_ops.CLIP_STD, np.float32)


def pil_eval_image(path, size):
  """Dassl's test transform on one image, torchvision semantics."""
  im = Image.open(path).convert("RGB")
  w, h = im.size
  if w <= h:
    nw, nh = size, int(size * h / w)
  else:
    nw, nh = int(size * w / h), size
  im = im.resize((nw, nh), Image.BICUBIC)
  top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
  im = im.crop((left, top, left + size, top + size))
  return (np.asarray(im, np.float32) / 255.0 - MEAN) / STD


def run_pil(items, batch_size, size):
  n = 0
  for start in range(0, len(items), batch_size):
    chunk = items[start : start + batch_size]
    batch = np.stack([pil_eval_image(p, size) for p, _, _ in chunk])
    n += len(batch)
  return n


def run_pipeline(pipe):
  n = 0
  for batch in pipe:
    n += int(batch["mask"].sum()) if "mask" in batch else len(batch["label"])
  return n


def run_train(pipe):
  n = 0
  for batch in pipe.iterate_epoch(0):
    n += len(batch["label"])
  return n


def timed(fn, *args):
  """(images/s wall, process CPU ms per image) of one full pass."""
  start, cpu = time.perf_counter(), time.process_time()
  n = fn(*args)
  wall = time.perf_counter() - start
  return n / wall, (time.process_time() - cpu) / n * 1e3


def make_images(folder, num, height, width, seed=0):
  rng = np.random.default_rng(seed)
  items = []
  for i in range(num):
    path = os.path.join(folder, "images", f"c{i % 10}", f"img_{i:05d}.jpg")
    # Jitter the size a little, as real datasets are not all one shape.
    h = height + int(rng.integers(-20, 21))
    w = width + int(rng.integers(-20, 21))
    synthetic.write_jpeg(path, rng, (h, w))
    items.append((path, i % 10, f"class {i % 10}"))
  return items


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_images", type=int, default=400)
  parser.add_argument("--height", type=int, default=375)
  parser.add_argument("--width", type=int, default=500)
  parser.add_argument("--batch_size", type=int, default=100)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--tfds", action="store_true", help="also TfdsSource")
  parser.add_argument("--train", action="store_true", help="also training")
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as tmp:
    items = make_images(tmp, args.num_images, args.height, args.width)
    pipe = data.make_eval_dataset(items, args.batch_size, args.image_size)
    loaders = {
      "PIL sequential (Dassl way)": (
        run_pil,
        items,
        args.batch_size,
        args.image_size,
      ),
      "tf.data eval, files": (run_pipeline, pipe),
    }
    if args.tfds:
      import tensorflow_datasets as tfds

      tfds.disable_progress_bar()
      root = os.path.join(tmp, "coop")
      split = _tfds_dataset(root, items)
      data.build_tfds("imagenet_sketch", root, os.path.join(tmp, "tfds"))
      source = data.TfdsSource(
        "imagenet_sketch", root, os.path.join(tmp, "tfds")
      )
      tpipe = data.make_eval_dataset(
        split, args.batch_size, args.image_size, source=source
      )
      loaders["tf.data eval, TFDS records"] = (run_pipeline, tpipe)
    if args.train:
      train = data.make_train_dataset(items, 4, 0, args.image_size)
      loaders["tf.data train (batch 4)"] = (run_train, train)

    # Warm-up: file cache, tf.data tracing.
    for fn, *fargs in loaders.values():
      fn(*fargs) if fn is not run_pil else fn(items[:20], *fargs[1:])
    best = {name: 0.0 for name in loaders}
    cpu_ms = {name: [] for name in loaders}
    for _ in range(args.rounds):
      for name, (fn, *fargs) in loaders.items():
        speed, ms = timed(fn, *fargs)
        best[name] = max(best[name], speed)
        cpu_ms[name].append(ms)

  print(
    f"{args.num_images} JPEGs of about {args.height}x{args.width} -> "
    f"{args.image_size}x{args.image_size}, eval batch {args.batch_size}, "
    f"{os.cpu_count()} CPU cores, best of {args.rounds} rounds, TF intra-op "
    f"threads {tf.config.threading.get_intra_op_parallelism_threads()}"
  )
  base = best["PIL sequential (Dassl way)"]
  for name, value in best.items():
    print(
      f"  {name:28s} {value:7.1f} images/s ({value / base:4.2f}x)"
      f"   CPU {np.median(cpu_ms[name]):5.2f} ms/image"
    )


def _tfds_dataset(root, items):
  """Lays the benchmark images out as an ImageNet-Sketch folder."""
  ddir = os.path.join(root, "imagenet-sketch")
  classes = sorted({y for _, y, _ in items})
  wnids = [f"n{i:08d}" for i in classes]
  os.makedirs(ddir, exist_ok=True)
  with open(os.path.join(ddir, "classnames.txt"), "w") as f:
    f.write("".join(f"{w} class {i}\n" for i, w in zip(classes, wnids)))
  for path, y, _ in items:
    dst = os.path.join(ddir, "images", wnids[y], os.path.basename(path))
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.link(path, dst)
  return data.fewshot_split("imagenet_sketch", root, 0, 0)["test"]


if __name__ == "__main__":
  main()
