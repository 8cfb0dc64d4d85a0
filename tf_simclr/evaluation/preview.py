"""--mode=preview_augment: augment_preview.png, the pretraining views of a few training images.

One row per image (the first --num_preview_images of --train_split): the image as eval sees it,
then --num_preview_pairs pairs of views made exactly as pretraining makes them with the current
flags: the train pipeline's per-example views (`pipeline.train_views_fn`: random crop and resize,
flip, colour jitter of --color_jitter_strength) and the train step's batched blur
(`augment.blur_train_views`, with --use_blur), each pair drawn as one training batch of those
images. Flags not given are read from the run's record (its flags.json) when there is one, so the
default shows what that run trained on; --seed makes it repeatable.
"""

from __future__ import annotations

import logging

import numpy as np
import tensorflow as tf

from tf_simclr import run_dir
from tf_simclr.data import augment, pipeline
from tf_simclr.evaluation import pictures

log = logging.getLogger(__name__)

NUM_VIEWS = 2  # Pretraining's pair of views.


def train_views(images, data_config, num_pairs: int) -> np.ndarray:
  """float32 (num_pairs, 2, N, S, S, 3): for each pair, the two views of each of `images` (a list
  of uint8 (H, W, C) images) as pretraining's pipeline and train step make them."""
  views_fn = pipeline.train_views_fn(data_config, NUM_VIEWS)
  out = []
  for _ in range(num_pairs):
    batch = tf.stack([views_fn(tf.convert_to_tensor(image)) for image in images])
    views = augment.blur_train_views(batch, NUM_VIEWS, data_config.image_size,
                                     data_config.use_blur)
    out.append(np.stack([v.numpy() for v in views]))
  return np.stack(out)


def run(ctx) -> str:
  """Writes model_dir/augment_preview.png; returns its path."""
  config = ctx.config
  data, split = config.data, config.data.train_split
  count = min(config.train.num_preview_images, ctx.source.num_examples(split))
  images = [image.numpy() for image, _ in ctx.source.as_dataset(split).take(count)]
  views = train_views(images, data, config.train.num_preview_pairs)
  originals = pictures.eval_views(ctx.source, data, split, range(count))
  rows, captions = [], []
  for i in range(count):
    rows.append([originals[i]] + [pictures.to_uint8(views[p, v, i])
                                  for p in range(views.shape[0]) for v in range(NUM_VIEWS)])
    captions.append(['eval view'] + [f'pair {p + 1} {"ab"[v]}'
                                     for p in range(views.shape[0]) for v in range(NUM_VIEWS)])
  title = (f'color_jitter_strength={data.color_jitter_strength:g} ({data.color_jitter_impl}), '
           f'use_blur={data.use_blur}, image_size={data.image_size}')
  picture = pictures.grid(rows, captions=captions,
                          row_titles=[title] + [''] * (count - 1))
  path = pictures.save_png(picture, run_dir.augment_preview_path(config.train.model_dir))
  log.info('Augmentation preview of %d images x %d pairs (%s): %s', count, views.shape[0], title,
           path)
  print(f'Wrote {path}')
  return path
