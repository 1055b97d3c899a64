"""tf.data pipelines: PIL parity, crop ranges, determinism, process sharding."""

import io
import math
import os

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from prometar_jax import data
from prometar_jax.data import pp_ops, synthetic

MEAN = np.asarray(pp_ops.CLIP_MEAN, np.float32)
STD = np.asarray(pp_ops.CLIP_STD, np.float32)


def _pil_eval(path, size):
  """Dassl's test transform with PIL, torchvision semantics, in [0, 255]."""
  im = Image.open(path).convert("RGB")
  w, h = im.size
  if w <= h:
    nw, nh = size, int(size * h / w)
  else:
    nw, nh = int(size * w / h), size
  im = im.resize((nw, nh), Image.BICUBIC)
  top = int(round((nh - size) / 2.0))
  left = int(round((nw - size) / 2.0))
  im = im.crop((left, top, left + size, top + size))
  return np.asarray(im, np.float32)


def _denormalize(x):
  return (x * STD + MEAN) * 255.0


@pytest.fixture(scope="module")
def eurosat_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipe")
  synthetic.make_coop_dataset(
    "eurosat", root, num_classes=5, per_class=(6, 2, 3), image_size=(36, 44)
  )
  return str(root)


@pytest.fixture(scope="module")
def eurosat(eurosat_root):
  return data.fewshot_split("eurosat", eurosat_root, 4, 1, "all")


@pytest.mark.parametrize(
  "shape", [(375, 500), (500, 333), (224, 301), (41, 97), (64, 64)]
)
def test_eval_preprocessing_matches_pil(tmp_path, shape):
  path = str(tmp_path / "img.jpg")
  synthetic.write_jpeg(path, np.random.default_rng(shape[0]), shape)
  ref = _pil_eval(path, 224)
  raw = tf.io.read_file(path)
  ours = pp_ops.eval_resize_crop(pp_ops.decode(raw), 224).numpy()
  assert ours.shape == (224, 224, 3)
  assert np.abs(ours - ref).mean() <= 2.0
  # Measured: about 0.2 (of 255) mean, at most 1 per pixel.
  assert np.abs(ours - ref).max() <= 2.0
  # Through the pipeline (normalized, batched) it is the same image.
  batch = next(iter(data.make_eval_dataset([(path, 0, "x")], 1)))
  np.testing.assert_allclose(_denormalize(batch["image"][0]), ours, atol=1e-3)


@pytest.mark.parametrize(
  "in_shape,out_size,scale,translation",
  [
    ((375, 500), 224, (224 / 375, 298 / 500), (0.0, -37.0)),
    (
      (41, 97),
      24,
      (24 / 41, 56 / 97),
      (0.0, -16.0),
    ),  # size not a block multiple
    ((20, 30), 48, (48 / 20, 48 / 30), (0.0, 0.0)),  # upsampling
    ((300, 200), 33, (0.11, 0.165), (-1.5, 0.25)),
    ((30, 40), 8, (1.0, 1.0), (-100.0, 50.0)),  # all outside: zeros
  ],
)
def test_resampling_equals_tf_scale_and_translate(
  in_shape, out_size, scale, translation
):
  rng = np.random.default_rng(0)
  image = tf.constant(rng.integers(0, 256, in_shape + (3,)), tf.uint8)
  ours = pp_ops._scale_translate(image, out_size, out_size, scale, translation)
  ref = tf.raw_ops.ScaleAndTranslate(
    images=tf.cast(image, tf.float32)[None],
    size=[out_size, out_size],
    scale=scale,
    translation=translation,
    kernel_type="keyscubic",
    antialias=True,
  )[0]
  # Float32 sums in another order: differences of a few thousandths of a level.
  np.testing.assert_allclose(ours.numpy(), ref.numpy(), atol=1e-2)


def test_resampling_rectangular_output():
  # Rows and columns are planned together; out_h != out_w pads the shorter.
  rng = np.random.default_rng(1)
  image = tf.constant(rng.integers(0, 256, (90, 70, 3)), tf.uint8)
  scale, translation = (20 / 90, 37 / 70), (0.5, -1.0)
  ours = pp_ops._scale_translate(image, 20, 37, scale, translation)
  ref = tf.raw_ops.ScaleAndTranslate(
    images=tf.cast(image, tf.float32)[None],
    size=[20, 37],
    scale=scale,
    translation=translation,
    kernel_type="keyscubic",
    antialias=True,
  )[0]
  assert ours.shape == (20, 37, 3)
  np.testing.assert_allclose(ours.numpy(), ref.numpy(), atol=1e-2)


def test_random_resized_crop_equals_crop_then_resize():
  # The crop's window is cut from the image directly: same pixels, same
  # weights, so exactly the resize of the cut-out crop.
  rng = np.random.default_rng(2)
  image = tf.constant(rng.integers(0, 256, (120, 90, 3)), tf.uint8)
  for i in range(8):
    seed = pp_ops.example_seed(5, 0, i)
    top, left, ch, cw = (int(v) for v in _window(120, 90, seed))
    crop = image[top : top + ch, left : left + cw]
    scale = (32 / ch, 32 / cw)
    ref = pp_ops._scale_translate(crop, 32, 32, scale, (0.0, 0.0))
    ref = np.clip(np.round(ref.numpy()), 0, 255)
    ours = pp_ops.random_resized_crop(image, seed, 32).numpy()
    np.testing.assert_array_equal(ours, ref)


def test_decode_matches_pil(tmp_path):
  rng = np.random.default_rng(0)
  path = str(tmp_path / "a.jpg")
  synthetic.write_jpeg(path, rng, (48, 64))
  rgb = Image.open(path).convert("RGB")
  ours = pp_ops.decode(tf.io.read_file(path)).numpy()
  # Accurate IDCT: bit-identical to PIL for baseline RGB JPEGs.
  np.testing.assert_array_equal(ours, np.asarray(rgb))
  for mode, fmt in [("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG")]:
    buf = io.BytesIO()
    rgb.convert(mode).save(buf, fmt)
    ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    ours = pp_ops.decode(tf.constant(buf.getvalue())).numpy()
    assert ours.shape == ref.shape
    assert np.abs(ours.astype(float) - ref).mean() < 0.5, mode


@tf.function
def _window(height, width, seed):
  return pp_ops.rrc_window(height, width, seed)


def test_random_resized_crop_ranges():
  shapes = [(375, 500), (500, 333), (64, 64), (20, 300), (300, 20)]
  for h, w in shapes:
    for i in range(100):
      seed = pp_ops.example_seed(3, 0, i)
      top, left, ch, cw = (int(v) for v in _window(h, w, seed))
      assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
      if min(h, w) == 20 and (ch, cw) in ((20, 27), (27, 20)):
        # torchvision's fallback: center crop, aspect clamped to 3/4..4/3.
        assert (top, left) == ((0, 136) if h == 20 else (136, 0))
        continue
      # Rounding w and h to pixels widens the ranges by a pixel at most.
      area = ch * cw / (h * w)
      assert 0.08 * (1 - 2 / min(ch, cw)) - 1e-6 <= area <= 1.0
      assert 0.75 - 1.0 / ch <= cw / ch <= 4 / 3 + 1.0 / ch


def test_random_resized_crop_fallback():
  # No window of area >= 8% fits a 10-pixel-high strip: the center crop with
  # aspect ratio clamped to 4/3 (or 3/4) is used, as in torchvision.
  for i in range(5):
    seed = pp_ops.example_seed(0, 0, i)
    assert [int(v) for v in _window(10, 1000, seed)] == [0, 493, 10, 13]
    assert [int(v) for v in _window(1000, 10, seed)] == [493, 0, 13, 10]
    # An image of aspect inside the range falls back to the whole image.
    window = pp_ops.rrc_window(10, 10, seed, scale=(1.5, 2.0))
    assert [int(v) for v in window] == [0, 0, 10, 10]


def test_random_resized_crop_spread():
  # The crops really vary: areas cover the range, both aspect extremes hit.
  areas, ratios = [], []
  for i in range(200):
    _, _, ch, cw = _window(375, 500, pp_ops.example_seed(0, 1, i))
    areas.append(int(ch) * int(cw) / (375 * 500))
    ratios.append(int(cw) / int(ch))
  assert min(areas) < 0.15 and max(areas) > 0.85
  assert min(ratios) < 0.8 and max(ratios) > 1.25


def test_train_batches_shapes_and_values(eurosat):
  pipe = data.make_train_dataset(eurosat["train"], 4, seed=1, image_size=32)
  assert pipe.steps_per_epoch == 20 // 4
  batches = list(pipe.iterate_epoch(0))
  assert len(batches) == 5
  b = batches[0]
  assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.float32
  assert b["label"].shape == (4,) and b["label"].dtype == np.int32
  pixels = _denormalize(np.concatenate([x["image"] for x in batches]))
  assert pixels.min() > -0.01 and pixels.max() < 255.01
  # Every item once per epoch, with its own label.
  order = pipe.epoch_order(0)
  labels = np.concatenate([x["label"] for x in batches])
  np.testing.assert_array_equal(labels, pipe.labels[order])
  assert sorted(order) == list(range(20))


def test_train_steps_drop_remainder(eurosat):
  items = eurosat["train"][:15]
  pipe = data.make_train_dataset(items, 4, seed=1, image_size=16)
  assert pipe.steps_per_epoch == 3
  assert len(pipe.epoch_order(2)) == 12
  with pytest.raises(ValueError, match="fewer than one batch"):
    data.make_train_dataset(items[:3], 4, seed=1)


def test_train_same_seed_same_batches(eurosat):
  items = eurosat["train"]
  a = data.make_train_dataset(items, 4, seed=7, image_size=24)
  b = data.make_train_dataset(items, 4, seed=7, image_size=24)
  c = data.make_train_dataset(items, 4, seed=8, image_size=24)
  ea, eb, ec = (list(p.iterate_epoch(1)) for p in (a, b, c))
  for x, y in zip(ea, eb):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert not np.array_equal(a.epoch_order(1), c.epoch_order(1))
  assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(ea, ec))
  # Reshuffled every epoch.
  assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))


def test_train_resume_mid_epoch(eurosat):
  pipe = data.make_train_dataset(eurosat["train"], 4, seed=3, image_size=24)
  full = list(pipe.iterate_epoch(2))
  tail = list(pipe.iterate_epoch(2, start_step=3))
  assert len(tail) == 2
  for x, y in zip(full[3:], tail):
    np.testing.assert_array_equal(x["image"], y["image"])
  assert list(pipe.iterate_epoch(2, start_step=5)) == []
  with pytest.raises(ValueError, match="start_step"):
    pipe.local_indices(2, start_step=6)


@pytest.mark.parametrize("count", [2, 4])
def test_train_process_parts(eurosat, count):
  items = eurosat["train"]
  single = data.make_train_dataset(items, 8, seed=5, image_size=16)
  parts = [
    data.make_train_dataset(
      items, 8, seed=5, image_size=16, process_index=p, process_count=count
    )
    for p in range(count)
  ]
  for epoch in (0, 1):
    idx = np.stack(
      [
        p.local_indices(epoch).reshape(single.steps_per_epoch, -1)
        for p in parts
      ],
      axis=1,
    )
    # Rows of a global batch, process by process, are the single-process batch.
    np.testing.assert_array_equal(idx.reshape(-1), single.epoch_order(epoch))
    assert len(set(idx.reshape(-1))) == idx.size
  # And the pixels agree: augmentation does not depend on the process count.
  whole = list(single.iterate_epoch(1))
  local = [list(p.iterate_epoch(1)) for p in parts]
  for step, batch in enumerate(whole):
    for key in ("image", "label"):
      joined = np.concatenate([local[p][step][key] for p in range(count)])
      np.testing.assert_array_equal(joined, batch[key])


@pytest.mark.parametrize("count", [1, 2, 5])
def test_eval_padding_and_process_parts(eurosat, count):
  items = eurosat["test"]  # 15 items
  batch_size = 10 if count != 1 else 4
  parts = [
    data.make_eval_dataset(items, batch_size, 16, p, count)
    for p in range(count)
  ]
  batches = [list(p) for p in parts]
  n_batches = math.ceil(15 / batch_size)
  assert all(
    len(b) == n_batches == p.num_batches for b, p in zip(batches, parts)
  )
  seen = []
  for step in range(n_batches):
    for p in range(count):
      b = batches[p][step]
      assert b["image"].shape == (batch_size // count, 16, 16, 3)
      assert b["mask"].dtype == bool
      rows = parts[p].local_indices().reshape(n_batches, -1)[step]
      np.testing.assert_array_equal(b["mask"], rows >= 0)
      np.testing.assert_array_equal(b["image"][~b["mask"]], 0.0)
      seen.extend(rows[rows >= 0].tolist())
      labels = [items[i][1] for i in rows[rows >= 0]]
      np.testing.assert_array_equal(b["label"][b["mask"]], labels)
  # Every example exactly once, in item order.
  assert seen == list(range(15))


def test_eval_images_independent_of_batching(eurosat):
  items = eurosat["test"][:5]
  a = np.concatenate([b["image"] for b in data.make_eval_dataset(items, 5, 24)])
  b = [x for x in data.make_eval_dataset(items, 2, 24)]
  b = np.concatenate([x["image"][x["mask"]] for x in b])
  np.testing.assert_array_equal(a, b)


def test_eval_transform_traced_once(eurosat):
  # Every EvalPipeline of one image size reuses one trace of the transform.
  fn = data.input_pipeline._eval_image_fn(20)
  for batch_size in (3, 5):
    list(data.make_eval_dataset(eurosat["test"][:4], batch_size, 20))
  assert fn.experimental_get_tracing_count() == 1


def test_import_gives_tf_one_intra_op_thread():
  # oneDNN ops ignore tf.data's max_intra_op_parallelism: importing the
  # package shrinks TF's global pool to one thread (unless it was chosen).
  import subprocess
  import sys

  code = (
    "import prometar_jax.data, tensorflow as tf; "
    "print(tf.config.threading.get_intra_op_parallelism_threads())"
  )
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("TF_NUM_INTRAOP_THREADS", None)
  out = subprocess.run(
    [sys.executable, "-c", code],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=True,
  )
  assert out.stdout.split()[-1] == "1", out.stdout + out.stderr


def test_unreadable_image_is_named(tmp_path, eurosat):
  items = list(eurosat["test"][:6])
  bad = str(tmp_path / "broken.jpg")
  with open(bad, "wb") as f:
    f.write(b"this is not a JPEG")
  items[4] = (bad, items[4][1], items[4][2])
  with pytest.raises(data.ImageReadError, match="broken.jpg"):
    list(data.make_eval_dataset(items, 2, 16))
  with pytest.raises(data.ImageReadError, match="broken.jpg"):
    list(data.make_train_dataset(items, 2, 0, 16).iterate_epoch(0))
  items[4] = (str(tmp_path / "gone.jpg"), 0, "x")
  with pytest.raises(data.ImageReadError, match="gone.jpg"):
    list(data.make_eval_dataset(items, 2, 16))


def test_bad_process_arguments(eurosat):
  with pytest.raises(ValueError, match="multiple of the process count"):
    data.make_train_dataset(eurosat["train"], 6, 0, process_count=4)
  with pytest.raises(ValueError, match="process_index"):
    data.make_eval_dataset(eurosat["test"], 4, process_index=2, process_count=2)


def test_to_global_single_process(eurosat):
  pipe = data.make_eval_dataset(eurosat["test"][:3], 4, 8)
  batch = next(iter(pipe))
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  sharding = jax.NamedSharding(mesh, jax.P("data"))
  out = data.to_global(batch, sharding)
  assert set(out) == {"image", "label", "mask"}
  assert out["image"].shape == (4, 8, 8, 3)
  np.testing.assert_array_equal(np.asarray(out["label"]), batch["label"])
  np.testing.assert_array_equal(np.asarray(out["mask"]), [1, 1, 1, 0])
  assert out["image"].sharding == sharding
  assert os.path.isabs(pipe.refs[0])


_TWO_PROCESS_SCRIPT = r"""
import sys
import jax
import numpy as np

port, pid, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
from jax.experimental import multihost_utils
from prometar_jax import data

split = data.fewshot_split("eurosat", root, 4, 1, "all")
mesh = jax.make_mesh((2,), ("data",))
sharding = jax.NamedSharding(mesh, jax.P("data"))
args = dict(process_index=jax.process_index(), process_count=2)
train = data.make_train_dataset(split["train"], 4, 3, 16, **args)
whole = data.make_train_dataset(split["train"], 4, 3, 16)
for local, ref in zip(train.iterate_epoch(1), whole.iterate_epoch(1)):
  batch = data.to_global(local, sharding)
  assert batch["image"].shape == (4, 16, 16, 3), batch["image"].shape
  got = multihost_utils.process_allgather(batch, tiled=True)
  np.testing.assert_array_equal(got["image"], ref["image"])
  np.testing.assert_array_equal(got["label"], ref["label"])
total = 0
for local in data.make_eval_dataset(split["test"], 4, 16, **args):
  batch = data.to_global(local, sharding)
  total += int(jax.jit(lambda b: ((b["label"] + 1) * b["mask"]).sum())(batch))
assert total == sum(y + 1 for _, y, _ in split["test"]), total
print("OK", pid)
"""


def test_to_global_two_processes(tmp_path, eurosat_root):
  # Two real JAX processes (CPU, gloo) each feed their part of every batch.
  import socket
  import subprocess
  import sys

  script = tmp_path / "two_proc.py"
  script.write_text(_TWO_PROCESS_SCRIPT)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
  procs = [
    subprocess.Popen(
      [sys.executable, str(script), str(port), str(i), eurosat_root],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      env=env,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=240)[0].decode() for p in procs]
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0 and f"OK {i}" in out, out[-3000:]
