"""SimCLR inputs from your own tf.data datasets (the Python front door, `tf_simclr.SimCLR.fit`).

The command line reads its datasets through `pipeline.py`; these functions bring any
`tf.data.Dataset` to the same batches, with the same per-image augmentation
(`augment.preprocess_image`, as `pipeline.make_train_dataset` calls it):

- elements may be images, `(images, labels)` tuples or TFDS dicts (`{'image': ..., 'label': ...}`),
  batched or not (an unbatched dataset needs `batch_size`);
- images uint8 in [0, 255] or floats; `value_range='auto'` treats a float batch whose largest value
  exceeds 1 as [0, 255] (`keras.utils.image_dataset_from_directory` gives float32 0-255), else
  [0, 1]; pass (0, 1) or (0, 255) to say which;
- labels integer class ids or one-hot rows (training batches: one-hot, as the command line's,
  when num_classes is given).
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple, Union

import tensorflow as tf

from tf_simclr import config as config_lib
from tf_simclr.data import augment
from tf_simclr.data.pipeline import to_rgb

AUTOTUNE = tf.data.AUTOTUNE
ValueRange = Union[str, Tuple[float, float]]


def image_and_label(element):
  """(image(s), label(s) or None) of one dataset element (tensor, tuple or TFDS dict)."""
  if isinstance(element, dict):
    if 'image' not in element:
      raise ValueError(f'A dict element needs an "image" key (TFDS style); got {sorted(element)}.')
    return element['image'], element.get('label')
  if isinstance(element, (tuple, list)):
    return element[0], (element[1] if len(element) > 1 else None)
  return element, None


def _element_spec(dataset: tf.data.Dataset):
  return image_and_label(dataset.element_spec)


def to_unit_range(images: tf.Tensor, value_range: ValueRange = 'auto') -> tf.Tensor:
  """float32 images in [0, 1] from uint8, or floats in [0, 1] / [0, 255] (see module docstring)."""
  if images.dtype.is_integer:
    return tf.image.convert_image_dtype(images, tf.float32)
  images = tf.cast(images, tf.float32)
  if value_range == 'auto':
    return tf.cond(tf.reduce_max(images) > 1.0, lambda: images / 255.0, lambda: images)
  low, high = value_range
  return (images - low) / (high - low)


def _one_hot(labels: tf.Tensor, num_classes: Optional[int], batched: bool) -> tf.Tensor:
  if labels.shape.rank == (2 if batched else 1):
    return tf.cast(labels, tf.float32)  # Already one-hot.
  if not num_classes:
    return tf.cast(labels, tf.int32)  # Class ids stay ids without num_classes.
  return tf.one_hot(tf.cast(labels, tf.int32), num_classes)


def _apply(dataset, image_fn, out_size: int, channels: int, num_classes, batch_size,
           value_range, one_hot: bool):
  """Maps `image_fn` over every image (per example) and batches; see `training_views`."""
  image_spec, label_spec = _element_spec(dataset)
  batched = image_spec.shape.rank == 4
  if image_spec.shape.rank not in (3, 4):
    raise ValueError(f'Images must be (H, W, C) or (batch, H, W, C); got {image_spec.shape}.')
  if not batched and batch_size is None:
    raise ValueError('The dataset is not batched: pass batch_size (or batch it first, when its '
                     'images all have one size).')
  def per_example(image):
    return image_fn(to_rgb(image))
  labelled = label_spec is not None

  def convert_labels(labels, is_batched):
    if one_hot:
      return _one_hot(labels, num_classes, is_batched)
    return tf.cast(labels, tf.int32)

  if batch_size is not None:
    ds = dataset.unbatch() if batched else dataset

    def map_example(*element):
      image, label = image_and_label(element if len(element) > 1 else element[0])
      image = per_example(to_unit_range(image, value_range))
      return (image, convert_labels(label, False)) if labelled else image
    return ds.map(map_example, num_parallel_calls=AUTOTUNE).batch(
        batch_size, drop_remainder=True).prefetch(AUTOTUNE)

  signature = tf.TensorSpec([out_size, out_size, channels], tf.float32)

  def map_batch(*element):
    images, labels = image_and_label(element if len(element) > 1 else element[0])
    images = tf.map_fn(per_example, to_unit_range(images, value_range),
                       fn_output_signature=signature)
    return (images, convert_labels(labels, True)) if labelled else images
  return dataset.map(map_batch, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)


def training_views(dataset: tf.data.Dataset, image_size: int, *, num_views: int = 2,
                   color_jitter_strength: float = 1.0, color_jitter_impl: str = 'simclrv2',
                   num_classes: Optional[int] = None, batch_size: Optional[int] = None,
                   value_range: ValueRange = 'auto') -> tf.data.Dataset:
  """Training batches as the command line's: images float32 (B, S, S, 3 * num_views) in [0, 1],
  the independently augmented views on the channel axis, and one-hot labels if the data has any.

  Each view is a random resized crop to `image_size`, a flip and (with num_views > 1, as the
  command line) colour jitter of `color_jitter_strength`; fine-tuning (num_views=1) only crops
  and flips. The Gaussian blur is applied later, per batch, by the training step (use_blur).
  `batch_size`: unbatch and batch again (drop_remainder), needed for unbatched data such as a
  TFDS split; without it the dataset's own batches are kept.
  """
  if num_views < 1:
    raise ValueError(f'num_views={num_views} must be >= 1.')
  strength = color_jitter_strength if num_views > 1 else 0.0
  one_view = functools.partial(augment.preprocess_image, height=image_size, width=image_size,
                               is_training=True, color_jitter_strength=strength,
                               impl=color_jitter_impl)

  def views(image):
    out = [one_view(image) for _ in range(num_views)]
    return tf.concat(out, axis=-1) if num_views > 1 else out[0]
  return _apply(dataset, views, image_size, 3 * num_views, num_classes, batch_size, value_range,
                one_hot=True)


def eval_images(dataset: tf.data.Dataset, image_size: int, *, num_classes: Optional[int] = None,
                batch_size: Optional[int] = None, value_range: ValueRange = 'auto',
                one_hot: bool = False) -> tf.data.Dataset:
  """Evaluation batches as the command line's: a centre crop (0.875; none when image_size <= 32)
  resized to `image_size`, float32 in [0, 1]; labels integer (or one-hot with `one_hot`)."""
  view = functools.partial(augment.preprocess_image, height=image_size, width=image_size,
                           is_training=False,
                           test_crop=not config_lib.small_images(image_size))
  return _apply(dataset, view, image_size, 3, num_classes, batch_size, value_range, one_hot)


def shapes10(split: str = 'train') -> tf.data.Dataset:
  """The built-in shapes10 split (no download) as an unbatched dataset of (uint8 32x32x3 image,
  int64 label); 10 classes, 10000 train and 2000 test images (`data/synthetic.py`)."""
  from tf_simclr.data import synthetic  # pylint: disable=g-import-not-at-top
  images, labels = synthetic.load_split(split)
  return tf.data.Dataset.from_tensor_slices((images, labels))
