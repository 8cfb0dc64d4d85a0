"""The pictures the inspection modes write (projector sprite, neighbours, duplicates, augmentation
preview): images as the model sees them, tiled with Pillow into one PNG.

Dataset images are shown as their eval views (`pipeline.make_feature_dataset`: the resize and
centre crop --mode=embed feeds the model), so a picture shows exactly what was embedded, for every
kind of dataset (TFDS, folder:, images:, shapes10).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw

from tf_simclr.data import pipeline

CAPTION_PX = 12  # Height of a caption line under a tile (Pillow's default bitmap font is ~11 px).
BACKGROUND = (255, 255, 255)


def to_uint8(images) -> np.ndarray:
  """float images in [0, 1] (..., H, W, 3) -> uint8, rounded."""
  return np.clip(np.round(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)


def eval_views(source, data_config, split: str, indices: Sequence[int],
               batch_size: int = 64) -> np.ndarray:
  """uint8 (len(indices), S, S, 3): the eval views of examples `indices` of `split`, in the order
  of `indices` (repeats allowed)."""
  wanted = np.unique(np.asarray(indices, np.int64))
  size = data_config.image_size
  if wanted.size == 0:
    return np.zeros([0, size, size, 3], np.uint8)
  found = {}
  dataset = pipeline.make_feature_dataset(source, data_config, split, batch_size, indices=wanted)
  for index, images, _, valid in dataset:
    valid = valid.numpy().astype(bool)
    for i, image in zip(index.numpy()[valid], to_uint8(images.numpy()[valid])):
      found[int(i)] = image
  return np.stack([found[int(i)] for i in indices])


def tile(image: np.ndarray, px: int) -> Image.Image:
  """A uint8 (H, W, 3) image as a px x px Pillow tile (nearest neighbour: small images stay
  sharp-edged rather than blurred)."""
  resample = Image.NEAREST if image.shape[0] < px else Image.BILINEAR
  return Image.fromarray(image).resize((px, px), resample)


def sprite(images: np.ndarray, px: int) -> Image.Image:
  """TensorBoard projector sprite: px x px thumbnails row-major in a square grid."""
  per_row = int(np.ceil(np.sqrt(len(images))))
  out = Image.new('RGB', (per_row * px, per_row * px), BACKGROUND)
  for i, image in enumerate(images):
    out.paste(tile(image, px), ((i % per_row) * px, (i // per_row) * px))
  return out


def grid(rows: List[List[np.ndarray]], px: int = 96,
         captions: Optional[List[List[str]]] = None, row_titles: Optional[List[str]] = None,
         gap: int = 4) -> Image.Image:
  """Rows of tiles (uint8 images, any size), each with an optional caption line under it and a
  title line above each row; rows may differ in length."""
  columns = max(len(r) for r in rows)
  title_px = CAPTION_PX + 2 if row_titles else 0
  caption_px = CAPTION_PX + 2 if captions else 0
  row_px = title_px + px + caption_px + gap
  out = Image.new('RGB', (columns * (px + gap) + gap, len(rows) * row_px + gap), BACKGROUND)
  draw = ImageDraw.Draw(out)
  for r, images in enumerate(rows):
    top = gap + r * row_px
    if row_titles:
      draw.text((gap, top), row_titles[r], fill=(0, 0, 0))
    for c, image in enumerate(images):
      left = gap + c * (px + gap)
      out.paste(tile(image, px), (left, top + title_px))
      if captions and captions[r][c]:
        draw.text((left, top + title_px + px + 1), captions[r][c], fill=(0, 0, 0))
  return out


def save_png(image: Image.Image, path: str) -> str:
  """Writes a Pillow image as PNG to `path` (any tf.io.gfile path)."""
  with tf.io.gfile.GFile(path, 'wb') as f:
    image.save(f, format='PNG')
  return path
