"""Image preprocessing in TensorFlow that reproduces Dassl's PIL transforms.

All functions are pure TF ops on one image, usable eagerly or inside
`tf.data` map functions:

- `decode`: bytes -> uint8 [H, W, 3], like `PIL.Image.open(p).convert("RGB")`.
- `eval_resize_crop`: torchvision `Resize(size)` (shorter side, bicubic) then
  `CenterCrop(size)`, computed as one resize of only the cropped window.
- `random_resized_crop`: torchvision `RandomResizedCrop(size, scale, ratio,
  bicubic)` with its 10-try algorithm, driven by a stateless seed.
- `random_flip`, `normalize` (ToTensor + Normalize with CLIP's mean/std).

Resizing uses TF's antialiased Keys bicubic (a = -0.5), the kernel PIL uses;
the result is rounded and clipped to [0, 255] as PIL's uint8 output is.
"""

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


def _scale_translate(image, out_h, out_w, scale, translation):
  """Antialiased bicubic resampling of a uint8/float [H, W, 3] image.

  Output pixel i samples input coordinate (i + 0.5 - translation) / scale -
  0.5 per axis: tf.image.resize(antialias=True) is the special case
  translation = 0, scale = out / in.
  """
  out = tf.raw_ops.ScaleAndTranslate(
    images=tf.cast(image, tf.float32)[None],
    size=tf.stack([out_h, out_w]),
    scale=scale,
    translation=translation,
    kernel_type="keyscubic",
    antialias=True,
  )
  return out[0]


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
  """[0, 255] -> ToTensor (/255) then Normalize(CLIP_MEAN, CLIP_STD)."""
  mean = tf.constant(CLIP_MEAN, tf.float32)
  std = tf.constant(CLIP_STD, tf.float32)
  return (tf.cast(image, tf.float32) / 255.0 - mean) / std


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
