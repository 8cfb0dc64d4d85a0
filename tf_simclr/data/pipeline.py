"""tf.data input pipelines for training and evaluation (after google-research/simclr `tf2/data.py`).

`make_train_dataset` / `make_eval_dataset` build one plain `tf.data.Dataset` (usable in tests and
benchmarks); `build_train_dataset` / `build_eval_dataset` wrap them with
`strategy.distribute_datasets_from_function`, each input pipeline batching
`input_context.get_per_replica_batch_size(global_batch_size)` examples.

Train elements are `(images, labels)` or, with `with_label_mask`, `(images, labels, label_mask)`:
images float32 (B, S, S, 3 * num_views) in [0, 1], the independently augmented views concatenated
on the channel axis; labels one-hot float32 (B, num_classes); label_mask float32 (B,). The batched
Gaussian blur is not applied here: the train step applies `augment.batch_random_blur` per view on
each replica, as the original did.
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import tensorflow as tf

from tf_simclr import config as config_lib
from tf_simclr import run_dir
from tf_simclr.data import augment
from tf_simclr.data.datasets import DatasetError, DatasetSource, host_range, input_pipelines

AUTOTUNE = tf.data.AUTOTUNE


def to_rgb(image: tf.Tensor) -> tf.Tensor:
  """Makes an (H, W, C) image 3-channel: grayscale is tiled, alpha channels are dropped."""
  channels = image.shape[-1]
  if channels == 3:
    return image
  if channels in (1, 2):  # Gray or gray + alpha.
    return tf.tile(image[..., :1], [1, 1, 3])
  if channels == 4:
    return image[..., :3]
  if channels is None:
    image = tf.cond(tf.shape(image)[-1] >= 3, lambda: image[..., :3],
                    lambda: tf.tile(image[..., :1], [1, 1, 3]))
    image.set_shape([None, None, 3])
    return image
  raise DatasetError(f'Images with {channels} channels are not supported (need 1, 2, 3 or 4).')


def _preprocess_fn(data_config, is_training: bool, color_jitter_strength: float):
  """Per-image preprocessing; `DataConfig.test_crop` says whether eval images are centre-cropped."""
  return functools.partial(
      augment.preprocess_image, height=data_config.image_size, width=data_config.image_size,
      is_training=is_training, color_jitter_strength=color_jitter_strength,
      test_crop=data_config.test_crop, impl=data_config.color_jitter_impl)


def _membership(source: DatasetSource, split: str, label_subset) -> np.ndarray:
  """Boolean vector over the split: True for indices in label_subset."""
  n = source.num_examples(split, '--train_split')
  indices = np.asarray(label_subset, dtype=np.int64).reshape([-1])
  if indices.size == 0:
    raise DatasetError('The label subset is empty: raise --train_label_fraction.')
  if indices.min() < 0 or indices.max() >= n:
    raise DatasetError(f'Label subset indices must lie in [0, {n}) for --train_split={split!r} '
                       f'of --dataset={source.name}; got [{indices.min()}, {indices.max()}]. '
                       f'Was {run_dir.LABEL_SUBSET_FILE} written for another split or dataset?')
  member = np.zeros([n], dtype=bool)
  member[indices] = True
  return member


def _host_share(source, split, indices, whole_range, input_context):
  """(start, stop, membership or None) of this input pipeline's contiguous range of the split.

  Without `indices`, a near-equal share of all examples. With them: `whole_range` keeps a
  near-equal share of all examples (their membership becomes a mask), else the range covering a
  near-equal share of the (sorted) indices, to be filtered by membership before decoding.
  """
  num_pipelines, pipeline_id = input_pipelines(input_context)
  if indices is None:
    return host_range(source.num_examples(split), num_pipelines, pipeline_id) + (None,)
  member = _membership(source, split, indices)
  if whole_range:
    return host_range(len(member), num_pipelines, pipeline_id) + (member,)
  wanted = np.flatnonzero(member)
  lo, hi = host_range(len(wanted), num_pipelines, pipeline_id)
  if hi == lo:
    return 0, 0, member
  return int(wanted[lo]), int(wanted[hi - 1]) + 1, member


def _indexed_source(source, split, label_subset, with_label_mask, input_context):
  """The host's share of the split in a fixed order, restricted to / masked by label_subset.

  Each input pipeline reads only its own contiguous range of the split (`_host_share`), filtered
  by index before images are decoded. Yields (image, label, mask) when with_label_mask, else
  (image, label).
  """
  start, stop, member_np = _host_share(source, split, label_subset, with_label_mask,
                                       input_context)
  pipelines = input_pipelines(input_context)[0]
  if not with_label_mask and member_np.sum() < pipelines:
    raise DatasetError(f'The label subset has {member_np.sum()} example(s), fewer than the '
                       f'{pipelines} input pipelines: raise --train_label_fraction.')
  member = tf.constant(member_np)

  def with_mask(index, example):
    return example + (tf.cast(tf.gather(member, index), tf.float32),)

  def is_member(index, example):
    del example
    return tf.gather(member, index)

  def decode(image, label, *mask):
    return (source.decode_image(image), label) + mask

  ds = source.read_range(split, start, stop, decode=False)
  ds = ds.enumerate(start)
  if with_label_mask:
    ds = ds.map(with_mask)
  else:
    ds = ds.filter(is_member).map(lambda index, example: example)
  return ds.map(decode, num_parallel_calls=AUTOTUNE)


def eval_view_fn(data_config):
  """image (uint8, any size and channel count) -> its eval view (S, S, 3) float32 in [0, 1]."""
  preprocess = _preprocess_fn(data_config, is_training=False, color_jitter_strength=0.0)
  return lambda image: preprocess(to_rgb(image))


def train_views_fn(data_config, num_views: int):
  """image -> its `num_views` independently augmented training views concatenated on channels
  (S, S, 3 * num_views), as each training example gets them before batching. num_views=1
  (fine-tuning, distillation) only crops and flips, as the original."""
  strength = data_config.color_jitter_strength if num_views > 1 else 0.0
  preprocess = _preprocess_fn(data_config, is_training=True, color_jitter_strength=strength)

  def fn(image):
    image = to_rgb(image)
    views = [preprocess(image) for _ in range(num_views)]
    return tf.concat(views, axis=-1) if num_views > 1 else views[0]
  return fn


def make_train_dataset(source: DatasetSource, data_config, batch_size: int, num_views: int,
                       label_subset=None, with_label_mask: bool = False,
                       seed: Optional[int] = None, input_context=None) -> tf.data.Dataset:
  """Infinite, shuffled training batches of `batch_size` (see the module docstring).

  num_views=2 (pretraining) uses data_config.color_jitter_strength; num_views=1 (fine-tuning,
  distillation) only crops and flips, as the original. `label_subset` (indices into the split in
  `as_dataset` order) restricts the split; with `with_label_mask` the whole split is kept and the
  mask is 1.0 on those indices (all ones without a subset). `seed` seeds the shuffle buffer and
  keeps the element order deterministic; the augmentations follow TF's global seed.
  """
  if num_views < 1:
    raise ValueError(f'num_views={num_views} must be >= 1.')
  split = data_config.train_split
  num_classes = source.num_classes
  views_fn = train_views_fn(data_config, num_views)
  ordered = label_subset is not None
  if ordered:
    ds = _indexed_source(source, split, label_subset, with_label_mask, input_context)
  else:
    ds = source.as_dataset(split, shuffle_files=True, input_context=input_context, seed=seed)
    if with_label_mask:
      ds = ds.map(lambda image, label: (image, label, tf.constant(1.0)))
  if data_config.cache_dataset:
    ds = ds.cache()
  options = tf.data.Options()
  # The original trades order for speed; an enumerated subset must keep the read order.
  options.deterministic = ordered or seed is not None
  options.experimental_slack = True
  ds = ds.with_options(options)
  buffer_multiplier = 50 if config_lib.small_images(data_config.image_size) else 10
  ds = ds.shuffle(batch_size * buffer_multiplier, seed=seed).repeat(-1)

  def map_fn(image, label, *mask):
    return (views_fn(image), tf.one_hot(label, num_classes)) + tuple(mask)

  ds = ds.map(map_fn, num_parallel_calls=AUTOTUNE)
  return ds.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)


def make_eval_dataset(source: DatasetSource, data_config, batch_size: int,
                      input_context=None) -> tf.data.Dataset:
  """One pass over the eval split in order: centre crop 0.875 (none if image_size <= 32)."""
  num_classes = source.num_classes
  preprocess = _preprocess_fn(data_config, is_training=False, color_jitter_strength=0.0)
  ds = source.as_dataset(data_config.eval_split, shuffle_files=False, input_context=input_context)
  if data_config.cache_dataset:
    ds = ds.cache()
  ds = ds.map(lambda image, label: (preprocess(to_rgb(image)), tf.one_hot(label, num_classes)),
              num_parallel_calls=AUTOTUNE)
  return ds.batch(batch_size, drop_remainder=False).prefetch(AUTOTUNE)


def build_train_dataset(source: DatasetSource, data_config, global_batch_size: int, strategy,
                        num_views: int, label_subset=None, with_label_mask: bool = False,
                        seed: Optional[int] = None):
  """Distributed training dataset; each replica gets global_batch_size / replicas examples."""
  config_lib.check_global_batch('train_batch_size', global_batch_size,
                                strategy.num_replicas_in_sync)
  if label_subset is not None:
    _membership(source, data_config.train_split, label_subset)  # Fail early, outside tf.data.

  def dataset_fn(input_context):
    return make_train_dataset(
        source, data_config, input_context.get_per_replica_batch_size(global_batch_size),
        num_views, label_subset=label_subset, with_label_mask=with_label_mask, seed=seed,
        input_context=input_context)
  return strategy.distribute_datasets_from_function(dataset_fn)


def build_eval_dataset(source: DatasetSource, data_config, global_batch_size: int, strategy):
  """Distributed eval dataset (one pass, last batch may be partial)."""
  config_lib.check_global_batch('eval_batch_size', global_batch_size,
                                strategy.num_replicas_in_sync)

  def dataset_fn(input_context):
    return make_eval_dataset(source, data_config,
                             input_context.get_per_replica_batch_size(global_batch_size),
                             input_context=input_context)
  return strategy.distribute_datasets_from_function(dataset_fn)


def padded_num_batches(share_sizes, batch_size: int, local_replicas: int) -> int:
  """Batches each input pipeline must yield so that no replica runs out of data early.

  `share_sizes` holds every input pipeline's number of examples (hosts' shares may differ). A
  distributed iterator over a finite, statically shaped dataset stops at the first round in which
  any replica gets no batch, dropping what the others got (TensorFlow enables partial-batch
  handling only for dynamic shapes or multi-worker runs; TPUs need static shapes). So every
  pipeline yields the same number of rounds (the most any pipeline needs), each one batch per
  local replica; batches past a pipeline's data are all padding.
  """
  if batch_size < 1 or local_replicas < 1:
    raise ValueError(f'batch_size={batch_size} and local_replicas={local_replicas} must be >= 1.')
  batches = [-(-int(n) // batch_size) for n in share_sizes]
  rounds = -(-max(batches, default=0) // local_replicas)
  return rounds * local_replicas


def feature_indices(source: DatasetSource, split: str, indices=None) -> np.ndarray:
  """The sorted example indices a feature pass over `split` (or its `indices`) yields once each."""
  if indices is None:
    return np.arange(source.num_examples(split), dtype=np.int64)
  return np.flatnonzero(_membership(source, split, indices))


def _padding_batch(batch_size: int, image_size: int):
  """One batch that is padding only: index -1, zero image and label, valid 0."""
  return (tf.fill([batch_size], -1), tf.zeros([batch_size, image_size, image_size, 3]),
          tf.zeros([batch_size], tf.int32), tf.zeros([batch_size], tf.int32))


def make_feature_dataset(source: DatasetSource, data_config, split: str, batch_size: int,
                         indices=None, input_context=None) -> tf.data.Dataset:
  """One ordered pass over `split` (or its `indices`) with eval preprocessing, for readouts.

  Elements are batches (example index in the split, image, integer label, valid) of exactly
  `batch_size` rows: the last batch is padded (index -1, zero image and label) and `valid` (int32
  1/0) marks the real rows, so every replica sees one static shape (TPUStrategy needs it, and its gather
  needs equal shapes on all replicas). Index and label are int32 (TPUs have no int64 path). The
  index lets features gathered from any number of replicas be put back in split order.
  Whole padding batches follow the data so that every input pipeline yields
  `padded_num_batches` batches: each local replica gets a batch in every round, on every host.
  """
  # Each input pipeline reads and decodes only its own contiguous range of the split.
  start, stop, member_np = _host_share(source, split, indices, False, input_context)
  num_pipelines, pipeline_id = input_pipelines(input_context)
  replicas = input_context.num_replicas_in_sync if input_context is not None else 1
  total = len(feature_indices(source, split, indices))
  shares = [b - a for a, b in (host_range(total, num_pipelines, p) for p in range(num_pipelines))]
  filler = (padded_num_batches(shares, batch_size, max(1, replicas // num_pipelines))
            - -(-shares[pipeline_id] // batch_size))
  ds = source.read_range(split, start, stop, decode=False).enumerate(start)
  if member_np is not None:
    member = tf.constant(member_np)
    ds = ds.filter(lambda index, example: tf.gather(member, index))
  preprocess = _preprocess_fn(data_config, is_training=False, color_jitter_strength=0.0)

  def prepare(index, example):
    image, label = example
    return (tf.cast(index, tf.int32), preprocess(to_rgb(source.decode_image(image))),
            tf.cast(label, tf.int32))

  def pad(index, images, labels):
    missing = batch_size - tf.shape(index)[0]
    valid = tf.cast(tf.range(batch_size) < tf.shape(index)[0], tf.int32)  # gathers take no bool
    index = tf.pad(index, [[0, missing]], constant_values=-1)
    images = tf.pad(images, [[0, missing], [0, 0], [0, 0], [0, 0]])
    labels = tf.pad(labels, [[0, missing]])
    size = data_config.image_size
    return (tf.ensure_shape(index, [batch_size]),
            tf.ensure_shape(images, [batch_size, size, size, 3]),
            tf.ensure_shape(labels, [batch_size]), valid)
  ds = ds.map(prepare, num_parallel_calls=AUTOTUNE)
  ds = ds.batch(batch_size, drop_remainder=False).map(pad, num_parallel_calls=AUTOTUNE)
  if filler:
    padding = tf.data.Dataset.from_tensors(_padding_batch(batch_size, data_config.image_size))
    ds = ds.concatenate(padding.repeat(filler))
  return ds.prefetch(AUTOTUNE)


def build_feature_dataset(source: DatasetSource, data_config, split: str, global_batch_size: int,
                          strategy, indices=None):
  """Distributed `make_feature_dataset`: one pass; the last batches, and whole batches up to
  a full round on every replica, are padding (see `valid`)."""
  config_lib.check_global_batch('eval_batch_size', global_batch_size,
                                strategy.num_replicas_in_sync)

  def dataset_fn(input_context):
    return make_feature_dataset(source, data_config, split,
                                input_context.get_per_replica_batch_size(global_batch_size),
                                indices=indices, input_context=input_context)
  return strategy.distribute_datasets_from_function(dataset_fn)
