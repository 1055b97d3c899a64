"""A generated image-text world: coloured, patterned shapes on backgrounds.

Every image shows one object with five attributes, each a word of the
world's language:

* shape (12): circle, square, triangle, star, heart, cross, diamond, hexagon,
  crescent, arrow, rectangle, semicircle;
* colour (20): red, orange, yellow, green, cyan, blue, purple, pink, black,
  white, and their finer neighbours maroon, brown, tan, olive, lime, teal,
  azure, navy, magenta, gray;
* pattern (10): the object's fill: plain, striped, dotted, checkered,
  gradient, banded, diagonal, grid, speckled, outlined;
* background (12): grass, sand, water, sky, brick, wood, snow, night, lava,
  forest, clouds, stone;
* size (2): small, large (position and a small rotation vary too, but have
  no word, so that flipping an image never changes its caption).

A caption names a random subset of the attributes inside a random template
("a blurry photo of a large red striped triangle on a grass background.");
a caption without the shape says "shape" instead ("a photo of a red
shape."), so that a class name such as "red shape" is a phrase the text
tower has read. The templates include the 60 ImageNet templates of CLIP's
prompt ensemble, which ProMetaR's frozen text teacher averages over.

Images are rendered with numpy at twice their size and area-averaged (an
antialiased 32x32 by default), all pixels a deterministic function of the
attributes and a seed. Everything here is a pure function of its arguments.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from prometar_jax.templates import IMAGENET_TEMPLATES

IMAGE_SIZE = 32

SHAPES = (
  "circle",
  "square",
  "triangle",
  "star",
  "heart",
  "cross",
  "diamond",
  "hexagon",
  "crescent",
  "arrow",
  "rectangle",
  "semicircle",
)
# Twenty colours: the first ten are the basic ones, the last ten their
# finer neighbours (maroon next to red, navy next to blue, ...).
COLOURS = {
  "red": (215, 25, 30),
  "orange": (245, 135, 20),
  "yellow": (245, 225, 40),
  "green": (40, 160, 60),
  "cyan": (50, 215, 225),
  "blue": (30, 70, 220),
  "purple": (130, 50, 180),
  "pink": (245, 140, 190),
  "black": (20, 20, 20),
  "white": (245, 245, 245),
  "maroon": (120, 20, 30),
  "brown": (130, 80, 40),
  "tan": (205, 170, 120),
  "olive": (120, 120, 30),
  "lime": (170, 230, 50),
  "teal": (20, 130, 130),
  "azure": (135, 190, 245),
  "navy": (20, 30, 110),
  "magenta": (220, 40, 200),
  "gray": (130, 130, 130),
}
PATTERNS = (
  "plain",
  "striped",
  "dotted",
  "checkered",
  "gradient",
  "banded",
  "diagonal",
  "grid",
  "speckled",
  "outlined",
)
BACKGROUNDS = (
  "grass",
  "sand",
  "water",
  "sky",
  "brick",
  "wood",
  "snow",
  "night",
  "lava",
  "forest",
  "clouds",
  "stone",
)
SIZES = ("small", "large")
# Object radius (fraction of half the image) per size.
_RADIUS = {"small": 0.6, "large": 0.85}

ATTRIBUTES = {
  "shape": SHAPES,
  "colour": tuple(COLOURS),
  "pattern": PATTERNS,
  "background": BACKGROUNDS,
  "size": SIZES,
}

# Wrappers of a description: CLIP's 60 ImageNet templates and a few more.
CAPTION_TEMPLATES = tuple(IMAGENET_TEMPLATES) + (
  "{}.",
  "a picture of a {}.",
  "an image of a {}.",
  "there is a {} in the picture.",
  "a {} in the middle of the picture.",
  "a simple drawing of a {}.",
)
# Probability that a caption names each attribute (the shape is otherwise
# called "shape").
_MENTION = {
  "size": 0.4,
  "colour": 0.65,
  "pattern": 0.65,
  "shape": 0.8,
  "background": 0.45,
}


def world_words() -> list[str]:
  """Every attribute word of the world (for checks and the tokenizer)."""
  return [w for values in ATTRIBUTES.values() for w in values]


# ---------------------------------------------------------------------------
# Attributes and captions
# ---------------------------------------------------------------------------


def sample_attributes(
  rng: np.random.Generator, n: int, fixed: dict[str, int] | None = None
) -> dict[str, np.ndarray]:
  """n random attribute index vectors; `fixed` pins some attributes.

  Args:
    rng: the random generator (consumed).
    n: number of objects.
    fixed: {attribute: index} held constant over the n objects.

  Returns:
    {attribute: int64 [n]} indices into the `ATTRIBUTES` tuples.
  """
  out = {}
  for name, values in ATTRIBUTES.items():
    out[name] = rng.integers(0, len(values), n)
  for name, index in (fixed or {}).items():
    out[name] = np.full(n, index, np.int64)
  return out


def describe(
  attrs: dict[str, int], mention: dict[str, bool], noun: str = "shape"
) -> str:
  """The noun phrase of one object naming the `mention`ed attributes."""
  words = []
  for name in ("size", "colour", "pattern"):
    if mention.get(name):
      words.append(ATTRIBUTES[name][attrs[name]])
  words.append(SHAPES[attrs["shape"]] if mention.get("shape") else noun)
  text = " ".join(words)
  if mention.get("background"):
    text += f" on a {BACKGROUNDS[attrs['background']]} background"
  return text


def caption(
  attrs: dict[str, int], rng: np.random.Generator, require: str = ""
) -> str:
  """One random caption of the object `attrs` (one index per attribute).

  `require` names an attribute the caption must mention (see
  `sample_groups`).
  """
  mention = {k: bool(rng.random() < p) for k, p in _MENTION.items()}
  if require:
    mention[require] = True
  if not any(mention.values()):
    mention["shape"] = True
  template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
  return template.format(describe(attrs, mention))


def captions(
  attrs: dict[str, np.ndarray],
  rng: np.random.Generator,
  require: Sequence[str] | None = None,
) -> list[str]:
  """One random caption per object of an attribute batch."""
  n = len(attrs["shape"])
  require = require if require is not None else [""] * n
  return [
    caption({k: int(v[i]) for k, v in attrs.items()}, rng, require[i])
    for i in range(n)
  ]


# Which attribute varies inside a group of `sample_groups` (probabilities):
# the ones a patch-level glance cannot tell apart get most groups.
GROUP_VARIES = {
  "colour": 0.35,
  "background": 0.2,
  "pattern": 0.2,
  "shape": 0.15,
  "size": 0.1,
}


def sample_groups(
  rng: np.random.Generator, n_groups: int, group_size: int
) -> tuple[dict[str, np.ndarray], list[str]]:
  """Groups of objects that differ in one attribute only (minimal pairs).

  In a batch of random objects, colour and background tell almost every
  image apart, and a tiny CLIP trained on such batches never learns
  shapes. Inside a group everything but one attribute is shared, so the
  contrastive loss can only be lowered by seeing that attribute; its
  value differs across the group where the attribute has enough values.

  Returns:
    (attrs {attribute: int [n_groups * group_size]}, the varying attribute
    of each object: the caption must name it).
  """
  names = list(GROUP_VARIES)
  varies = rng.choice(len(names), n_groups, p=list(GROUP_VARIES.values()))
  shared = sample_attributes(rng, n_groups)
  attrs = {k: np.repeat(v, group_size) for k, v in shared.items()}
  require = []
  for g, which in enumerate(varies):
    name = names[which]
    k = len(ATTRIBUTES[name])
    if k >= group_size:
      values = rng.permutation(k)[:group_size]
    else:
      values = rng.permutation(np.arange(group_size) % k)
    attrs[name][g * group_size : (g + 1) * group_size] = values
    require += [name] * group_size
  return attrs, require


def corpus(seed: int, n: int) -> list[str]:
  """n captions of random objects (the tokenizer's training text)."""
  rng = np.random.default_rng(seed)
  return captions(sample_attributes(rng, n), rng)


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


def _shape_mask(name, x, y):
  """Membership of local coordinates in shape `name` (radius 1, y down)."""
  ax, ay = np.abs(x), np.abs(y)
  s3 = np.sqrt(3.0)
  if name == "circle":
    return np.hypot(x, y) <= 0.92
  if name == "square":
    return np.maximum(ax, ay) <= 0.74
  if name == "triangle":
    return (y <= 0.62) & (y >= -0.9) & (ax <= 0.98 * (y + 0.9) / 1.52)
  if name == "star":
    phi = np.arctan2(x, -y)  # 0 at the top
    sector = np.mod(phi, 2 * np.pi / 5) / (2 * np.pi / 5)
    return np.hypot(x, y) <= 0.42 + 0.58 * np.abs(1 - 2 * sector)
  if name == "heart":
    hx, hy = 1.25 * x, -1.25 * y + 0.1  # the classic curve, y up
    return (hx**2 + hy**2 - 1) ** 3 - hx**2 * hy**3 <= 0
  if name == "cross":
    return ((ax <= 0.3) & (ay <= 0.92)) | ((ay <= 0.3) & (ax <= 0.92))
  if name == "diamond":
    return ax + ay <= 0.98
  if name == "hexagon":
    return (ay <= 0.9 * s3 / 2) & (s3 * ax + ay <= s3 * 0.9)
  if name == "crescent":
    return (np.hypot(x, y) <= 0.92) & (np.hypot(x - 0.42, y + 0.12) >= 0.72)
  if name == "arrow":
    shaft = (ay <= 0.22) & (x >= -0.95) & (x <= 0.15)
    head = (x >= 0.05) & (x <= 0.95) & (ay <= 0.8 * (0.95 - x) / 0.9)
    return shaft | head
  if name == "rectangle":
    return (ax <= 0.95) & (ay <= 0.45)
  if name == "semicircle":
    return (np.hypot(x, y - 0.35) <= 1.0) & (y <= 0.35)
  raise ValueError(f"unknown shape {name!r}")


def _shape_masks(shape_idx, x, y):
  """bool [n, H, W]: local coordinates [n, H, W] inside each object."""
  out = np.zeros(x.shape, bool)
  for i, name in enumerate(SHAPES):
    sel = shape_idx == i
    if sel.any():
      out[sel] = _shape_mask(name, x[sel], y[sel])
  return out


def _backgrounds(bg_idx, size, rng):
  """float [n, size, size, 3] background textures in [0, 255]."""
  n = len(bg_idx)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
  yy, xx = yy[None] / size, xx[None] / size
  noise = rng.normal(0, 1, (n, size, size, 1))
  phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
  out = np.zeros((n, size, size, 3))

  def put(name, base, extra):
    sel = bg_idx == BACKGROUNDS.index(name)
    if sel.any():
      out[sel] = np.asarray(base, float) + extra[sel]

  zeros = np.zeros((n, size, size, 1))
  put("grass", (60, 140, 50), 22 * noise)
  put("sand", (212, 190, 140), 9 * noise)
  waves = np.sin(2 * np.pi * (3 * yy + 0.3 * np.sin(6 * xx)) * 2 + phase)
  put("water", (40, 90, 180), (25 * waves)[..., None] + 5 * noise)
  sky = (yy * np.ones_like(phase))[..., None]
  put("sky", (120, 170, 235), sky * np.asarray((80, 55, 15)) + 3 * noise)
  rows = np.floor(yy * size / 4)
  shift = np.mod(rows, 2) * 4
  mortar = (np.mod(yy * size, 4) < 1) | (np.mod(xx * size + shift, 8) < 1)
  mortar = (mortar * np.ones_like(phase))[..., None]
  put("brick", (160, 70, 50), mortar * np.asarray((60, 110, 120)) + 6 * noise)
  grain = np.sin(2 * np.pi * 5 * xx + 1.5 * np.sin(4 * yy + phase) + phase)
  put("wood", (140, 95, 55), (18 * grain)[..., None] + 4 * noise)
  put("snow", (235, 240, 245), 6 * noise)
  stars = rng.random((n, size, size, 1)) < 0.03
  put("night", (15, 20, 50), stars * 200.0 + zeros)
  # Blobs: coarse noise, blocky-upsampled, then lightly blurred by the
  # fine noise on top.
  k = max(size // 8, 1)
  blobs = rng.normal(0, 1, (n, size // k, size // k, 1))
  blobs = blobs.repeat(k, axis=1).repeat(k, axis=2)
  put("lava", (200, 55, 15), blobs * np.asarray((45, 35, 5)) + 8 * noise)
  put("forest", (25, 85, 35), blobs * np.asarray((12, 30, 12)) + 6 * noise)
  cloud = np.clip(blobs, 0, None) * np.asarray((70, 50, 20))
  put("clouds", (150, 190, 235), cloud + 3 * noise)
  grout = (np.mod(yy * size, 8) < 1) | (np.mod(xx * size, 8) < 1)
  grout = (grout * np.ones_like(phase))[..., None]
  put("stone", (125, 122, 115), -60 * grout + 8 * noise)
  return out


def _pattern_weight(name, px, py, y, fine):
  """Weight of the second colour of pattern `name` ([n, H, W] in [0, 1]).

  px, py: output-pixel coordinates (with a random phase); y: the object's
  vertical coordinate (gradient); fine: a random pixel mask (speckles).
  """
  if name == "striped":
    m = np.mod(py, 6) < 3
  elif name == "banded":
    m = np.mod(px, 6) < 3
  elif name == "diagonal":
    m = np.mod(px + py, 6) < 3
  elif name == "checkered":
    m = np.mod(np.floor(px / 4) + np.floor(py / 4), 2) == 1
  elif name == "dotted":
    m = (np.mod(px, 6) - 2.5) ** 2 + (np.mod(py, 6) - 2.5) ** 2 <= 2.3
  elif name == "grid":
    m = (np.mod(px, 6) < 1) | (np.mod(py, 6) < 1)
  elif name == "speckled":
    m = fine
  elif name == "gradient":
    return np.clip((y + 1) / 2, 0, 1)
  else:
    raise ValueError(f"pattern {name!r} has no second colour")
  return m.astype(np.float32)


def _secondary(rgb):
  """The pattern's second colour: a dark shade, or a light one if dark."""
  lum = (rgb @ np.asarray([0.299, 0.587, 0.114]))[..., None]
  dark = rgb * 0.35
  light = rgb + (255 - rgb) * 0.6
  return np.where(lum > 100, dark, light)


def render(
  attrs: dict[str, np.ndarray],
  rng: np.random.Generator,
  size: int = IMAGE_SIZE,
) -> np.ndarray:
  """uint8 [n, size, size, 3] images of the objects `attrs`.

  Rendered at 2x and area-averaged (antialiasing); the background noise,
  colour jitter, position, rotation and pattern phase come from `rng`.
  """
  n = len(attrs["shape"])
  big = 2 * size
  radius = np.asarray([_RADIUS[SIZES[s]] for s in attrs["size"]])
  slack = np.maximum(0.95 - radius, 0.0)
  cx = rng.uniform(-1, 1, n) * slack
  cy = rng.uniform(-1, 1, n) * slack
  theta = rng.uniform(-0.25, 0.25, n)  # radians: a diamond stays a diamond
  colour = np.asarray([list(COLOURS.values())[c] for c in attrs["colour"]])
  colour = np.clip(colour + rng.normal(0, 8, (n, 3)), 0, 255)
  second = _secondary(colour)
  phase = rng.integers(0, 12, (n, 1, 1))

  grid = (np.arange(big) + 0.5) / big * 2 - 1  # pixel centres in [-1, 1]
  v, u = np.meshgrid(grid, grid, indexing="ij")
  du = u[None] - cx[:, None, None]
  dv = v[None] - cy[:, None, None]
  c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
  r = radius[:, None, None]
  x = ((c * du + s * dv) / r).astype(np.float32)
  y = ((-s * du + c * dv) / r).astype(np.float32)
  shape = attrs["shape"]
  inside = _shape_masks(shape, x, y)

  # Pattern coordinates in output pixels (what a patch of the model sees).
  py = (np.floor((v[None] + 1) / 2 * size) + phase).astype(np.float32)
  px = (np.floor((u[None] + 1) / 2 * size) + phase).astype(np.float32)
  fine = rng.random((n, size, size)) < 0.4
  fine = fine.repeat(2, axis=1).repeat(2, axis=2)
  pattern = attrs["pattern"]
  sec = np.zeros(x.shape, np.float32)  # weight of the second colour
  for i, name in enumerate(PATTERNS):
    sel = pattern == i
    if sel.any() and name not in ("plain", "outlined"):
      sec[sel] = _pattern_weight(name, px[sel], py[sel], y[sel], fine[sel])
  drawn = inside.copy()
  outlined = pattern == PATTERNS.index("outlined")
  if outlined.any():
    inner = _shape_masks(shape[outlined], x[outlined] / 0.7, y[outlined] / 0.7)
    drawn[outlined] &= ~inner

  bg = _backgrounds(attrs["background"], size, rng).astype(np.float32)
  bg = bg.repeat(2, axis=1).repeat(2, axis=2)
  first = colour.astype(np.float32)[:, None, None]
  delta = (second - colour).astype(np.float32)[:, None, None]
  fg = first + sec[..., None] * delta
  img = np.where(drawn[..., None], fg, bg)
  img = img.reshape(n, size, 2, size, 2, 3).mean(axis=(2, 4))
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


def sample(
  seed: int, n: int, size: int = IMAGE_SIZE
) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
  """n random (image, attributes, caption) triples, a function of `seed`."""
  rng = np.random.default_rng(seed)
  attrs = sample_attributes(rng, n)
  images = render(attrs, rng, size)
  return images, attrs, captions(attrs, rng)


def attribute_names(attrs: dict[str, np.ndarray], i: int) -> dict[str, str]:
  """The words of object i of an attribute batch."""
  return {k: ATTRIBUTES[k][int(v[i])] for k, v in attrs.items()}


def contact_sheet(images: Sequence[np.ndarray], cols: int = 8) -> np.ndarray:
  """Images tiled in a grid (for docs/demo.md's picture)."""
  images = np.asarray(images)
  n, h, w, _ = images.shape
  rows = -(-n // cols)
  sheet = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
  for i, im in enumerate(images):
    r, c = divmod(i, cols)
    sheet[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = im
  return sheet
