"""`shapes10`: the built-in dataset, generated in memory (no download).

32x32 RGB uint8 images of ten shape classes. Each image draws one shape at a random position and
scale with a small rotation (+-15 degrees, so squares stay distinguishable from diamonds and
horizontal bars from vertical ones) over a flat background, plus per-pixel noise.

Colours are deliberately uninformative, for contrastive pretraining: a dark-on-light or
light-on-dark pair of grey levels (one fixed contrast) and one of three tints shared by shape and
background, so only six colourings exist and every batch holds many images with exactly the same
colours. Global colour jitter then scrambles even those, and crops remove position: the shape is the
only salient property two views of one image share, so instance discrimination must learn shape.
(An earlier version drew a unique random colour pair per image; SimCLR solved instance
discrimination from colour alone and its features were no better than a random encoder's.) Colours
are drawn independently of the class, so the label depends on shape alone.

Generation is deterministic: fixed seeds, numpy's PCG64 generator, uniform and integer draws only
and no transcendental functions on the drawn values (rotations come from a rational
parametrisation), so every machine produces the same bytes. Shapes are supersampled 2x2 for
anti-aliasing.
"""

from __future__ import annotations

import functools

import numpy as np

from tf_simclr import config as config_lib

NAME = config_lib.BUILTIN_DATASET
IMAGE_SIZE = 32
NUM_CLASSES = 10
CLASS_NAMES = ('circle', 'square', 'triangle', 'cross', 'ring', 'star', 'horizontal_bars',
               'vertical_bars', 'diamond', 'crescent')
# Split name -> (number of examples, seed).
SPLITS = {'train': (10000, 20240601), 'test': (2000, 20240602)}

_SUPERSAMPLE = 2
_MAX_TAN_HALF_ANGLE = 0.13165  # tan(7.5 degrees): rotations within +-15 degrees.
_CHUNK = 1000
# Palette: grey levels, and for each background level the foreground levels it may take (always far
# apart, so the shape is visible); a tint shared by shape and background.
_LEVELS = (0.2, 0.8)
_FG_OPTIONS = ((1, 1), (0, 0))
_TINTS = ((1.0, 1.0, 1.0), (1.0, 0.8, 0.6), (0.6, 0.8, 1.0))
_NOISE = 0.06


def _inside(class_id: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Shape masks in shape-local coordinates (unit radius, v pointing up)."""
  au, av = np.abs(u), np.abs(v)
  r2 = u * u + v * v
  if class_id == 0:  # circle
    return r2 <= 0.9 * 0.9
  if class_id == 1:  # square
    return np.maximum(au, av) <= 0.75
  if class_id == 2:  # triangle, pointing up
    return (v >= -0.55) & (v + np.sqrt(3.0) * au <= 1.0)
  if class_id == 3:  # plus-shaped cross
    return ((au <= 0.28) & (av <= 0.95)) | ((av <= 0.28) & (au <= 0.95))
  if class_id == 4:  # ring
    return (r2 <= 1.0) & (r2 >= 0.55 * 0.55)
  if class_id == 5:  # four-pointed star (astroid)
    return np.sqrt(au) + np.sqrt(av) <= 1.1
  if class_id == 6:  # horizontal bars
    return (au <= 0.9) & (av <= 0.9) & (np.floor((v + 0.9) / 0.36) % 2 == 0)
  if class_id == 7:  # vertical bars
    return (au <= 0.9) & (av <= 0.9) & (np.floor((u + 0.9) / 0.36) % 2 == 0)
  if class_id == 8:  # diamond (a rhombus taller than wide, never a rotated square)
    return au / 0.7 + av / 1.05 <= 1.0
  if class_id == 9:  # crescent
    return (r2 <= 0.95 * 0.95) & ((u - 0.45) ** 2 + v * v > 0.8 * 0.8)
  raise ValueError(f'shapes10 has no class {class_id}.')


def _draw(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Renders one chunk of images (N, 32, 32, 3) float64 in [0, 1] for the given labels."""
  n = labels.shape[0]
  size = IMAGE_SIZE * _SUPERSAMPLE
  # All random draws first, in a fixed order, so the stream never depends on the class mix.
  scale = rng.uniform(10.0, 14.0, n)
  cy = rng.uniform(0.0, 1.0, n)
  cx = rng.uniform(0.0, 1.0, n)
  t = rng.uniform(-_MAX_TAN_HALF_ANGLE, _MAX_TAN_HALF_ANGLE, n)
  bg_index = rng.integers(0, len(_LEVELS), n)
  fg_choice = rng.integers(0, 2, n)
  tint_index = rng.integers(0, len(_TINTS), n)
  noise = rng.uniform(-_NOISE, _NOISE, (n, IMAGE_SIZE, IMAGE_SIZE, 3))

  # Centre keeps most of the shape inside the image.
  margin = 0.8 * scale
  cy = margin + cy * (IMAGE_SIZE - 2 * margin)
  cx = margin + cx * (IMAGE_SIZE - 2 * margin)
  cos = (1 - t * t) / (1 + t * t)  # Rotation by 2 * atan(t) without trigonometry.
  sin = 2 * t / (1 + t * t)

  grid = (np.arange(size, dtype=np.float64) + 0.5) / _SUPERSAMPLE  # Pixel-space sample points.
  dy = grid[None, :, None] - cy[:, None, None]
  dx = grid[None, None, :] - cx[:, None, None]
  u = (cos[:, None, None] * dx - sin[:, None, None] * dy) / scale[:, None, None]
  v = -(sin[:, None, None] * dx + cos[:, None, None] * dy) / scale[:, None, None]
  mask = np.zeros((n, size, size), dtype=np.float64)
  for class_id in range(NUM_CLASSES):
    sel = labels == class_id
    if sel.any():
      mask[sel] = _inside(class_id, u[sel], v[sel])
  mask = mask.reshape(n, IMAGE_SIZE, _SUPERSAMPLE, IMAGE_SIZE, _SUPERSAMPLE).mean(axis=(2, 4))

  # Background and foreground come from a small shared palette (few (bg, fg, tint) triples, so
  # many images in a batch share their colours): colour cannot tell instances apart, shape must.
  fg_index = np.asarray(_FG_OPTIONS)[bg_index, fg_choice]
  tint = np.asarray(_TINTS)[tint_index]
  bg = np.asarray(_LEVELS)[bg_index][:, None] * tint
  fg = np.asarray(_LEVELS)[fg_index][:, None] * tint
  images = (mask[..., None] * fg[:, None, None, :] + (1 - mask[..., None]) * bg[:, None, None, :]
            + noise)
  return np.clip(images, 0.0, 1.0)


def generate(num_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 (N, 32, 32, 3), labels int64 (N,)), class-balanced and shuffled."""
  rng = np.random.Generator(np.random.PCG64(seed))
  labels = rng.permutation(np.arange(num_examples) % NUM_CLASSES).astype(np.int64)
  images = np.empty((num_examples, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
  for start in range(0, num_examples, _CHUNK):
    stop = min(start + _CHUNK, num_examples)
    images[start:stop] = np.round(_draw(labels[start:stop], rng) * 255.0).astype(np.uint8)
  return images, labels


@functools.lru_cache(maxsize=None)
def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """The named split ('train' or 'test'), generated once per process; arrays are read-only."""
  if split not in SPLITS:
    raise ValueError(f'{NAME} has no split {split!r}; available: {sorted(SPLITS)}.')
  images, labels = generate(*SPLITS[split])
  images.flags.writeable = False
  labels.flags.writeable = False
  return images, labels
