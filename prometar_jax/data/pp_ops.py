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


def _to_uint8_range(image: tf.Tensor) -> tf.Tensor:
  # PIL writes uint8: bicubic overshoot is clipped and values rounded.
  return tf.clip_by_value(tf.round(image), 0.0, 255.0)


# Output rows (and columns) are resampled in blocks of this many: each block
# reads one short window of input rows, so a resize is a few small dense
# matmuls instead of one mostly-zero one. 16 was the fastest on 2-core CPUs.
_BLOCK = 16


def _keys_cubic(x):
  # Keys' cubic convolution kernel with a = -0.5, as PIL and TF use.
  x = tf.abs(x)
  a = -0.5
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return tf.where(x < 1.0, near, tf.where(x < 2.0, far, 0.0))


def _block_weights(in_size, out_size, scale, translation):
  """Antialiased bicubic weights of one axis, grouped in output blocks.

  Output pixel i is centered at input coordinate (i + 0.5 - translation) /
  scale; when downscaling the kernel is stretched by 1 / scale (antialias)
  and the weights of in-range taps are normalized to sum to one, as PIL
  and tf.image.resize(antialias=True) do.

  Returns:
    Input indices [n_blocks, span] (clamped into range) and weights
    [n_blocks, _BLOCK, span]; rows past out_size are padding.
  """
  n_blocks = -(-out_size // _BLOCK)
  inv = 1.0 / scale
  stretch = tf.maximum(inv, 1.0)
  support = 2.0 * stretch
  i = tf.range(n_blocks * _BLOCK, dtype=tf.float32)
  centers = tf.reshape((i + 0.5 - translation) * inv, [n_blocks, _BLOCK])
  start = tf.cast(tf.floor(centers[:, 0] - support), tf.int32)
  span = tf.cast(tf.math.ceil((_BLOCK - 1) * inv + 2.0 * support), tf.int32) + 2
  j = start[:, None] + tf.range(span)[None, :]
  pos = tf.cast(j, tf.float32)[:, None, :] + 0.5
  w = _keys_cubic((pos - centers[:, :, None]) / stretch)
  w = tf.where(((j >= 0) & (j < in_size))[:, None, :], w, 0.0)
  # Like ScaleAndTranslate: no sample from outside the image (output 0).
  in_f = tf.cast(in_size, tf.float32)
  inside = (centers >= 0.0) & (centers <= in_f)
  w = tf.where(inside[:, :, None], w, 0.0)
  total = tf.reduce_sum(w, axis=-1, keepdims=True)
  w = w / tf.where(total == 0.0, 1.0, total)
  return tf.clip_by_value(j, 0, in_size - 1), w


def _scale_translate(image, out_h, out_w, scale, translation):
  """Antialiased bicubic resampling of a uint8/float [H, W, 3] image.

  Output pixel (y, x) samples input coordinate ((y, x) + 0.5 - translation)
  / scale - 0.5, the convention of tf.raw_ops.ScaleAndTranslate
  (tf.image.resize(antialias=True) is translation = 0, scale = out / in),
  whose results this reproduces to float rounding at about twice its speed.
  Rows are resampled first (on the input columns the output needs), then
  columns. out_h and out_w must be Python ints.
  """
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  rows, wy = _block_weights(height, out_h, scale[0], translation[0])
  cols, wx = _block_weights(width, out_w, scale[1], translation[1])
  c0 = tf.reduce_min(cols)
  c1 = tf.reduce_max(cols) + 1
  x = tf.cast(image[:, c0:c1], tf.float32)
  n_cols = c1 - c0
  x = tf.reshape(x, [height, n_cols * 3])
  v = tf.matmul(wy, tf.gather(x, rows))  # [blocks, _BLOCK, n_cols * 3]
  v = tf.reshape(v, [-1, n_cols, 3])[:out_h]
  v = tf.reshape(tf.transpose(v, [1, 0, 2]), [n_cols, out_h * 3])
  z = tf.matmul(wx, tf.gather(v, cols - c0))  # [blocks, _BLOCK, out_h * 3]
  z = tf.reshape(z, [-1, out_h, 3])[:out_w]
  return tf.transpose(z, [1, 0, 2])


def resized_shape(height, width, size: int):
  """torchvision Resize(size): shorter side -> size, longer side truncated."""
  height = tf.cast(height, tf.int64)
  width = tf.cast(width, tf.int64)
  size = tf.constant(size, tf.int64)
  # int(size * long / short) == (size * long) // short for positive ints.
  new_h = tf.where(height <= width, size, (size * height) // width)
  new_w = tf.where(height <= width, (size * width) // height, size)
  return tf.cast(new_h, tf.int32), tf.cast(new_w, tf.int32)


def eval_resize_crop(image: tf.Tensor, size: int = 224) -> tf.Tensor:
  """Resize(size, bicubic) + CenterCrop(size) -> float32 [size, size, 3].

  Values are in [0, 255]. Only the cropped window is computed: the kernel
  still reads the pixels around it, so this equals resizing the whole image
  and then cropping, as torchvision does.
  """
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  new_h, new_w = resized_shape(height, width, size)
  # torchvision: int(round((H - size) / 2)), round half to even like tf.round.
  top = tf.round(tf.cast(new_h - size, tf.float32) / 2.0)
  left = tf.round(tf.cast(new_w - size, tf.float32) / 2.0)
  scale = tf.stack(
    [
      tf.cast(new_h, tf.float32) / tf.cast(height, tf.float32),
      tf.cast(new_w, tf.float32) / tf.cast(width, tf.float32),
    ]
  )
  out = _scale_translate(image, size, size, scale, tf.stack([-top, -left]))
  out = _to_uint8_range(out)
  out.set_shape([size, size, 3])
  return out


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
  crop = image[top : top + crop_h, left : left + crop_w]
  s = tf.stack(
    [size / tf.cast(crop_h, tf.float32), size / tf.cast(crop_w, tf.float32)]
  )
  out = _scale_translate(crop, size, size, s, tf.zeros([2]))
  out = _to_uint8_range(out)
  out.set_shape([size, size, 3])
  return out


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
  shape = tf.shape(image)
  rows = tf.reshape(tf.cast(image, tf.float32), [shape[0], shape[1] * 3])
  rows = rows * tf.tile(scale, [shape[1]]) + tf.tile(offset, [shape[1]])
  return tf.reshape(rows, shape)


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
