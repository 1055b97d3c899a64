"""Image preprocessing in TensorFlow that reproduces Dassl's PIL transforms.

All functions are pure TF ops on one image, usable eagerly or inside
`tf.data` map functions:

- `decode`: bytes -> uint8 [H, W, 3], like `PIL.Image.open(p).convert("RGB")`.
- `eval_resize_crop`: torchvision `Resize(size)` (shorter side, bicubic) then
  `CenterCrop(size)`, computed as one resize of only the cropped window.
- `random_resized_crop`: torchvision `RandomResizedCrop(size, scale, ratio,
  bicubic)` with its 10-try algorithm, driven by a stateless seed.
- `random_flip`, `normalize` (ToTensor + Normalize with CLIP's mean/std).

Resizing uses antialiased Keys bicubic (a = -0.5), the kernel PIL uses, with
the semantics of tf.image.resize(antialias=True); the result is rounded and
clipped to [0, 255] as PIL's uint8 output is.
"""

import dataclasses

import numpy as np
import tensorflow as tf

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# torchvision's RandomResizedCrop tries this many random windows.
_RRC_TRIES = 10
_ALG = "philox"


def decode(data: tf.Tensor) -> tf.Tensor:
  """Encoded JPEG/PNG/GIF/BMP/WebP bytes -> uint8 [H, W, 3].

  JPEGs use libjpeg's accurate integer IDCT: TF's default (fast IDCT) differs
  from PIL by about 1/255 per pixel on average, the accurate one matches PIL
  exactly. Grayscale and CMYK JPEGs come out as RGB, as `convert("RGB")`
  does; PNG alpha is dropped.
  """

  def jpeg():
    return tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")

  def other():
    return tf.io.decode_image(data, channels=3, expand_animations=False)

  image = tf.cond(tf.io.is_jpeg(data), jpeg, other)
  image.set_shape([None, None, 3])
  return image


# Output rows (and columns) are resampled in blocks of this many: each block
# reads one short window of input rows, so a resize is a few small dense
# matmuls instead of one mostly-zero one. 16 was the fastest on 2-core CPUs.
_BLOCK = 16
# A coordinate that puts a tap out of every kernel's reach (weight 0).
_FAR = 1e9


def _keys_cubic(x):
  # Keys' cubic convolution kernel with a = -0.5, as PIL and TF use. Both
  # pieces are exactly 0 at |x| = 2, so clamping there makes the tail 0.
  x = tf.minimum(tf.abs(x), 2.0)
  a = -0.5
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return tf.where(x < 1.0, near, far)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """How to resample an image: which pixels to read, with what weights.

  The taps read the window of the image that starts at `begin` (top, left,
  0) and has `size` (height, width, -1), int32 [3] each. `rows` / `cols`
  index into the window ([n_blocks, span] each) and `wy` / `wx` are the
  weights [n_blocks, _BLOCK, span] of output rows and columns.
  """

  begin: tf.Tensor
  size: tf.Tensor
  rows: tf.Tensor
  wy: tf.Tensor
  cols: tf.Tensor
  wx: tf.Tensor
  out_h: int
  out_w: int


def _plan(in_size, out_h: int, out_w: int, scale, translation) -> _Plan:
  """Antialiased bicubic weights of both axes, grouped in output blocks.

  Output pixel i of an axis is centered at input coordinate (i + 0.5 -
  translation) / scale; when downscaling the kernel is stretched by 1 /
  scale (antialias) and the weights of in-range taps are normalized to sum
  to one, as PIL and tf.image.resize(antialias=True) do. An output centered
  outside the image gets no sample (0), as in ScaleAndTranslate.

  Rows and columns are computed together, along a leading axis of 2, in few
  ops: per image, these small tensors cost mostly per op.

  Args:
    in_size: int [2], the image height and width.
    out_h: output height.
    out_w: output width.
    scale: float32 [2], per axis.
    translation: float32 [2], per axis.
  """
  blocks = (-(-out_h // _BLOCK), -(-out_w // _BLOCK))
  # Per axis, shaped [2, 1, 1] to broadcast against [2, blocks, ...].
  in_size = tf.reshape(tf.cast(in_size, tf.int32), [2, 1, 1])
  inv = tf.reshape(1.0 / tf.cast(scale, tf.float32), [2, 1, 1])
  shift = tf.reshape(tf.cast(translation, tf.float32), [2, 1, 1])
  stretch = tf.maximum(inv, 1.0)
  i = np.arange(max(blocks) * _BLOCK, dtype=np.float32) + np.float32(0.5)
  centers = (i.reshape(1, -1, _BLOCK) - shift) * inv  # [2, blocks, B]
  # Each block reads `span` input indices from its first tap on.
  first = (i[::_BLOCK].reshape(1, -1, 1) - shift) * inv  # [2, blocks, 1]
  start = tf.cast(tf.floor(first - 2.0 * stretch), tf.int32)
  spans = tf.math.ceil((_BLOCK - 1) * inv + 4.0 * stretch)
  spans = tf.reshape(tf.cast(spans, tf.int32), [2]) + 2
  j = start + tf.range(tf.reduce_max(spans))  # [2, blocks, span]
  # Taps outside the image, and outputs centered outside it, are moved out
  # of the kernel's reach; coordinates are divided by the stretch here, on
  # the small tensors.
  pos = (tf.cast(j, tf.float32) + 0.5) / stretch
  pos = tf.where((j >= 0) & (j < in_size), pos, _FAR)
  inside = (centers >= 0.0) & (centers <= tf.cast(in_size, tf.float32))
  centers = tf.where(inside, centers / stretch, -_FAR)
  w = _keys_cubic(tf.expand_dims(pos, 2) - tf.expand_dims(centers, 3))
  w = tf.math.divide_no_nan(w, tf.reduce_sum(w, axis=-1, keepdims=True))
  # The window: all indices the blocks read (start grows with the block),
  # at least one pixel of the image.
  lo = tf.reduce_min(start, axis=[1, 2], keepdims=True)
  lo = tf.clip_by_value(lo, 0, in_size - 1)
  hi = tf.reduce_max(start, axis=[1, 2], keepdims=True) + spans[:, None, None]
  hi = tf.clip_by_value(hi, lo + 1, in_size)
  idx = tf.clip_by_value(j, lo, hi - 1) - lo
  rows, cols = tf.unstack(idx)
  wy, wx = tf.unstack(w)
  span_h, span_w = tf.unstack(spans)
  return _Plan(
    begin=tf.concat([tf.reshape(lo, [2]), [0]], 0),
    size=tf.concat([tf.reshape(hi - lo, [2]), [-1]], 0),
    rows=rows[: blocks[0], :span_h],
    wy=wy[: blocks[0], :, :span_h],
    cols=cols[: blocks[1], :span_w],
    wx=wx[: blocks[1], :, :span_w],
    out_h=out_h,
    out_w=out_w,
  )


def _resample(window, plan: _Plan):
  """Resamples `window` [h, w, 3] (uint8 or float), the plan's window.

  Rows first, on every column of the window, then columns. The rows are
  gathered before the cast to float32: a quarter of the bytes to move.
  """
  width = tf.shape(window)[1]
  x = tf.gather(window, plan.rows)  # [blocks, span, w, 3]
  blocks = -(-plan.out_h // _BLOCK)
  x = tf.cast(tf.reshape(x, [blocks, -1, width * 3]), tf.float32)
  v = tf.matmul(plan.wy, x)  # [blocks, _BLOCK, w * 3]
  v = tf.reshape(v, [-1, width, 3])[: plan.out_h]
  v = tf.reshape(tf.transpose(v, [1, 0, 2]), [width, plan.out_h * 3])
  z = tf.matmul(plan.wx, tf.gather(v, plan.cols))  # [blocks, B, out_h * 3]
  z = tf.reshape(z, [-1, plan.out_h, 3])[: plan.out_w]
  return tf.transpose(z, [1, 0, 2])


def _scale_translate(image, out_h, out_w, scale, translation):
  """Antialiased bicubic resampling of a uint8/float [H, W, 3] image.

  Output pixel (y, x) samples input coordinate ((y, x) + 0.5 - translation)
  / scale - 0.5, the convention of tf.raw_ops.ScaleAndTranslate
  (tf.image.resize(antialias=True) is translation = 0, scale = out / in),
  whose results this reproduces to float rounding at about twice its speed.
  out_h and out_w must be Python ints.
  """
  plan = _plan(tf.shape(image)[:2], out_h, out_w, scale, translation)
  return _resample(tf.slice(image, plan.begin, plan.size), plan)


def resized_shape(hw, size: int):
  """torchvision Resize(size) of an [H, W] image -> int32 [2].

  The shorter side becomes size, the longer one is scaled and truncated.
  """
  hw = tf.cast(hw, tf.int64)
  # int(size * long / short) == (size * long) // short for positive ints,
  # and the shorter side gives size * short // short == size.
  return tf.cast(size * hw // tf.reduce_min(hw), tf.int32)


def _eval_plan(hw, size: int) -> _Plan:
  """The plan of Resize(size, bicubic) + CenterCrop(size) of an [H, W] image.

  Only the cropped window is computed: the kernel still reads the pixels
  around it, so this equals resizing the whole image and then cropping, as
  torchvision does.
  """
  new = tf.cast(resized_shape(hw, size), tf.float32)
  # torchvision: int(round((H - size) / 2)), round half to even like tf.round.
  offset = tf.round((new - size) / 2.0)
  scale = new / tf.cast(hw, tf.float32)
  return _plan(hw, size, size, scale, -offset)


def _finish(out, size):
  # PIL writes uint8: bicubic overshoot is clipped and values rounded.
  out = tf.clip_by_value(tf.round(out), 0.0, 255.0)
  out.set_shape([size, size, 3])
  return out


def eval_resize_crop(image: tf.Tensor, size: int = 224) -> tf.Tensor:
  """Resize(size, bicubic) + CenterCrop(size) -> float32 [size, size, 3].

  Values are in [0, 255]. Only the cropped window is computed: the kernel
  still reads the pixels around it, so this equals resizing the whole image
  and then cropping, as torchvision does.
  """
  plan = _eval_plan(tf.shape(image)[:2], size)
  return _finish(_resample(tf.slice(image, plan.begin, plan.size), plan), size)


def rrc_window(height, width, seed, scale=RRC_SCALE, ratio=RRC_RATIO):
  """torchvision RandomResizedCrop.get_params with a stateless seed.

  Ten (area, log-aspect) candidates are drawn at once and the first that
  fits is used; if none fits, the center crop with the aspect ratio clamped
  to `ratio` (torchvision's fallback).

  Args:
    height: image height (scalar int tensor).
    width: image width.
    seed: int32/int64 [2] stateless seed.
    scale: range of the crop area as a fraction of the image area.
    ratio: range of the crop aspect ratio (width / height).

  Returns:
    int32 (top, left, crop_height, crop_width).
  """
  h_f = tf.cast(height, tf.float32)
  w_f = tf.cast(width, tf.float32)
  u = tf.random.stateless_uniform([4, _RRC_TRIES], seed, alg=_ALG)
  target_area = h_f * w_f * (scale[0] + (scale[1] - scale[0]) * u[0])
  log_lo, log_hi = tf.math.log(ratio[0]), tf.math.log(ratio[1])
  aspect = tf.exp(log_lo + (log_hi - log_lo) * u[1])
  # Python's round() is half-to-even, as tf.round.
  cw = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
  ch = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
  fits = (cw > 0) & (cw <= width) & (ch > 0) & (ch <= height)
  k = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  # torch.randint(0, n + 1) for the offsets.
  top_r = tf.cast(u[2, k] * tf.cast(height - ch[k] + 1, tf.float32), tf.int32)
  left_r = tf.cast(u[3, k] * tf.cast(width - cw[k] + 1, tf.float32), tf.int32)

  in_ratio = w_f / h_f
  fb_w = tf.where(
    in_ratio > ratio[1],
    tf.cast(tf.round(h_f * ratio[1]), tf.int32),
    width,
  )
  fb_h = tf.where(
    in_ratio < ratio[0],
    tf.cast(tf.round(w_f / ratio[0]), tf.int32),
    height,
  )
  ok = tf.reduce_any(fits)
  crop_h = tf.where(ok, ch[k], fb_h)
  crop_w = tf.where(ok, cw[k], fb_w)
  top = tf.where(ok, tf.minimum(top_r, height - crop_h), (height - fb_h) // 2)
  left = tf.where(ok, tf.minimum(left_r, width - crop_w), (width - fb_w) // 2)
  return top, left, crop_h, crop_w


def random_resized_crop(
  image: tf.Tensor,
  seed: tf.Tensor,
  size: int = 224,
  scale=RRC_SCALE,
  ratio=RRC_RATIO,
) -> tf.Tensor:
  """RandomResizedCrop(size, scale, ratio, bicubic) -> float32 [size, size, 3].

  The window is cut first and then resized, as PIL's crop + resize.
  """
  shape = tf.shape(image)
  top, left, crop_h, crop_w = rrc_window(shape[0], shape[1], seed, scale, ratio)
  crop = tf.stack([crop_h, crop_w])
  plan = _plan(crop, size, size, size / tf.cast(crop, tf.float32), [0.0, 0.0])
  # The window of the crop that the taps read, cut from the image at once.
  window = tf.slice(image, plan.begin + tf.stack([top, left, 0]), plan.size)
  return _finish(_resample(window, plan), size)


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Horizontal flip with probability 1/2 (RandomHorizontalFlip)."""
  flip = tf.random.stateless_uniform([], seed, alg=_ALG) < 0.5
  return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def normalize(image: tf.Tensor) -> tf.Tensor:
  """[0, 255] -> ToTensor (/255) then Normalize(CLIP_MEAN, CLIP_STD).

  Computed as x * a + b on rows of W * 3 values: TF's CPU kernels broadcast
  a 3-vector over the innermost axis about three times slower.
  """
  std = np.asarray(CLIP_STD, np.float32)
  scale = 1.0 / (255.0 * std)
  offset = -np.asarray(CLIP_MEAN, np.float32) / std
  width = image.shape[1]
  if width is None:
    width = tf.shape(image)[1]
    scale, offset = tf.tile(scale, [width]), tf.tile(offset, [width])
  else:  # Static: constants, no ops per image.
    scale, offset = np.tile(scale, width), np.tile(offset, width)
  rows = tf.reshape(tf.cast(image, tf.float32), [-1, width * 3])
  return tf.reshape(rows * scale + offset, tf.shape(image))


def example_seed(seed, epoch, index):
  """Stateless seed of one training example: a function of all three ints.

  Keyed by the example's index in the item list (not its position in the
  batch), so crops do not depend on the number of processes.
  """
  base = tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)])
  return tf.random.experimental.stateless_fold_in(
    base, tf.cast(index, tf.int64), alg=_ALG
  )


def train_transform(image, seed, size=224, scale=RRC_SCALE, ratio=RRC_RATIO):
  """Dassl's train transform: random_resized_crop, random_flip, normalize."""
  seeds = tf.random.experimental.stateless_split(seed, num=2, alg=_ALG)
  out = random_resized_crop(image, seeds[0], size, scale, ratio)
  out = random_flip(out, seeds[1])
  return normalize(out)


def eval_transform(image, size=224):
  """Dassl's test transform: Resize, CenterCrop, normalize."""
  return normalize(eval_resize_crop(image, size))
