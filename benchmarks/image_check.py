"""Cost of the up-front image check (prometar_jax/data/verify.py).

Before the first step a run checks every image it will read: training
images are decoded, evaluation sets are decoded up to
`config.data.verify_decode_max` images and header-checked beyond. This
times both on generated ImageNet-like JPEGs (500x375 by default) and, with
--demo, on the offline demo's three tasks (built if missing), and
extrapolates to a 50,000-image test set (ImageNet's validation set).

    python benchmarks/image_check.py [--num 2000] [--demo]

Prints milliseconds per image for each check and the extrapolated seconds.
"""

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from prometar_jax.data import synthetic, verify  # noqa: E402


def _timed(fn, *args):
  t0 = time.perf_counter()
  fn(*args)
  return time.perf_counter() - t0


def measure(paths, rounds):
  """Best-of-rounds seconds of a decode check and of a header check."""
  decode = min(_timed(verify.check_images, paths) for _ in range(rounds))
  header = min(_timed(verify.check_images, [], paths) for _ in range(rounds))
  return decode, header


def report(name, n, decode, header, scale_to=50_000):
  print(
    f"{name}: {n} images; decode {1e3 * decode / n:.3f} ms/image "
    f"({decode:.2f} s), header {1e3 * header / n:.4f} ms/image "
    f"({header:.3f} s); at {scale_to:,} images: decode "
    f"{decode / n * scale_to:.0f} s, header {header / n * scale_to:.1f} s"
  )


def demo_images():
  # demo/ is a folder of the checkout (a client of the library, not
  # installed), beside benchmarks/.
  sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  )
  from demo import build as demo_build

  root = demo_build.data_root()
  if not os.path.isdir(root):
    demo_build.build()
  paths = []
  for dirpath, _, files in os.walk(root):
    paths += [os.path.join(dirpath, f) for f in files if f.endswith(".png")]
  return sorted(paths)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num", type=int, default=2000)
  parser.add_argument("--height", type=int, default=375)
  parser.add_argument("--width", type=int, default=500)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--demo", action="store_true")
  args = parser.parse_args()
  print(f"{os.cpu_count()} CPU cores")
  with tempfile.TemporaryDirectory() as tmp:
    rng = np.random.default_rng(0)
    paths = [os.path.join(tmp, f"{i:06d}.jpg") for i in range(args.num)]
    for p in paths:
      synthetic.write_jpeg(p, rng, (args.height, args.width))
    decode, header = measure(paths, args.rounds)
    report(f"JPEG {args.width}x{args.height}", len(paths), decode, header)
  if args.demo:
    paths = demo_images()
    decode, header = measure(paths, args.rounds)
    report("demo (all three tasks, PNG)", len(paths), decode, header)


if __name__ == "__main__":
  main()
