"""Tests for tf_simclr.data.pipeline: element shapes, distribution, label subsets, RGB handling."""

import os

import numpy as np
import pytest
import tensorflow as tf

import helpers
from tf_simclr.config import DataConfig
from tf_simclr.data import datasets, pipeline
from tf_simclr.data.datasets import DatasetError


@pytest.fixture(scope='module')
def shapes():
  return datasets.resolve_dataset('shapes10')


def _config(**kwargs):
  defaults = dict(dataset='shapes10', train_split='train[:256]', eval_split='test[:50]',
                  image_size=32, color_jitter_strength=0.5)
  defaults.update(kwargs)
  return DataConfig(**defaults)


def _local(strategy, value):
  return [t.numpy() for t in strategy.experimental_local_results(value)]


@pytest.mark.parametrize('num_views', [1, 2])
def test_train_elements_two_replicas(shapes, two_replica_strategy, num_views):
  strategy = two_replica_strategy
  ds = pipeline.build_train_dataset(shapes, _config(), 16, strategy, num_views=num_views)
  images, labels = next(iter(ds))
  per_replica = _local(strategy, images)
  assert len(per_replica) == 2
  for x, y in zip(per_replica, _local(strategy, labels)):
    assert x.shape == (8, 32, 32, 3 * num_views) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert y.shape == (8, 10) and y.dtype == np.float32
    np.testing.assert_array_equal(y.sum(1), 1.0)  # One-hot.


@pytest.mark.parametrize('num_views', [1, 2])
def test_train_elements_default_strategy(shapes, num_views):
  strategy = tf.distribute.get_strategy()
  ds = pipeline.build_train_dataset(shapes, _config(), 12, strategy, num_views=num_views)
  images, labels = next(iter(ds))
  assert images.shape == (12, 32, 32, 3 * num_views) and labels.shape == (12, 10)


def test_views_differ_and_finetune_view_has_no_colour_jitter(shapes):
  """Two views are independent augmentations; a single view is crop + flip only."""
  cfg = _config(color_jitter_strength=1.0)
  images, _ = next(iter(pipeline.make_train_dataset(shapes, cfg, 16, num_views=2)))
  a, b = images[..., :3].numpy(), images[..., 3:].numpy()
  assert np.abs(a - b).reshape(16, -1).max(1).min() > 1e-3
  # With colour distortion, about 20% of views would be grey (colour drop); the single
  # fine-tuning view must ignore color_jitter_strength, so none of 64 may be grey.
  views = [x.numpy() for x, _ in pipeline.make_train_dataset(shapes, cfg, 16, num_views=1).take(4)]
  views = np.concatenate(views)
  assert views.shape == (64, 32, 32, 3)
  gray = np.abs(views - views[..., :1]).reshape(64, -1).max(1) < 1e-6
  assert not gray.any()


def test_eval_dataset_covers_split_once(shapes, two_replica_strategy):
  strategy = two_replica_strategy
  ds = pipeline.build_eval_dataset(shapes, _config(), 16, strategy)
  seen = []
  for images, labels in ds:
    for x, y in zip(_local(strategy, images), _local(strategy, labels)):
      assert x.shape[0] <= 8 and x.shape[1:] == (32, 32, 3) and y.shape[1:] == (10,)
      seen.append(np.argmax(y, 1))
  seen = np.concatenate(seen)
  assert len(seen) == 50
  np.testing.assert_array_equal(np.sort(seen), np.sort(shapes.labels('test[:50]')))


def test_eval_is_unaugmented(shapes):
  ds = pipeline.make_eval_dataset(shapes, _config(), 50)
  images, labels = next(iter(ds))
  raw = datasets.synthetic.load_split('test')
  np.testing.assert_allclose(images.numpy(), raw[0][:50] / 255.0, atol=1e-6)
  np.testing.assert_array_equal(np.argmax(labels, 1), raw[1][:50])


def test_label_subset_restricts_train_split(shapes):
  cfg = _config(train_split='train[:300]')
  labels = shapes.labels('train[:300]')
  subset = np.flatnonzero(labels == 3)
  ds = pipeline.make_train_dataset(shapes, cfg, 8, num_views=1, label_subset=subset)
  assert ds.options().deterministic  # Enumerated indices need the read order kept.
  for _, y in ds.take(10):
    np.testing.assert_array_equal(np.argmax(y, 1), 3)
  # With several input pipelines each reads its own shard of the subset.
  ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1)
  ds = pipeline.make_train_dataset(shapes, cfg, 8, num_views=1, label_subset=subset,
                                   input_context=ctx)
  for _, y in ds.take(5):
    np.testing.assert_array_equal(np.argmax(y, 1), 3)


def test_label_mask_marks_subset(shapes, two_replica_strategy):
  cfg = _config(train_split='train[:300]')
  subset = np.flatnonzero(shapes.labels('train[:300]') == 3)
  ds = pipeline.build_train_dataset(shapes, cfg, 16, two_replica_strategy, num_views=1,
                                    label_subset=subset, with_label_mask=True)
  masks = []
  for step, (_, y, m) in enumerate(ds):
    for yy, mm in zip(_local(two_replica_strategy, y), _local(two_replica_strategy, m)):
      assert mm.shape == (8,) and mm.dtype == np.float32
      np.testing.assert_array_equal(mm, (np.argmax(yy, 1) == 3).astype(np.float32))
      masks.append(mm)
    if step == 9:
      break
  masks = np.concatenate(masks)
  assert 0 < masks.mean() < 0.5  # Class 3 is about 10% of the full split kept.
  unmasked = pipeline.make_train_dataset(shapes, cfg, 8, num_views=1, with_label_mask=True)
  np.testing.assert_array_equal(next(iter(unmasked))[2], np.ones(8))


def test_bad_batch_and_subset_errors(shapes, two_replica_strategy):
  with pytest.raises(DatasetError, match='--train_batch_size=15'):
    pipeline.build_train_dataset(shapes, _config(), 15, two_replica_strategy, num_views=2)
  with pytest.raises(DatasetError, match='--eval_batch_size=7'):
    pipeline.build_eval_dataset(shapes, _config(), 7, two_replica_strategy)
  with pytest.raises(DatasetError, match='label_subset.json'):
    pipeline.build_train_dataset(shapes, _config(), 16, two_replica_strategy, num_views=1,
                                 label_subset=np.array([0, 256]))
  with pytest.raises(DatasetError, match='--train_label_fraction'):
    pipeline.make_train_dataset(shapes, _config(), 8, num_views=1, label_subset=np.array([]))


@pytest.mark.parametrize('channels', [1, 2, 3, 4, None])
def test_to_rgb(channels):
  c = channels or 4
  image = np.random.default_rng(0).uniform(size=(5, 6, c)).astype(np.float32)
  expected = np.repeat(image[..., :1], 3, -1) if c < 3 else image[..., :3]
  if channels is None:
    fn = tf.function(pipeline.to_rgb, input_signature=[tf.TensorSpec([None, None, None])])
    out = fn(tf.constant(image))
  else:
    out = pipeline.to_rgb(tf.constant(image))
  np.testing.assert_array_equal(out.numpy(), expected)


def test_folder_grayscale_and_rgba_through_pipeline(tmp_path):
  rng = np.random.default_rng(1)
  pngs = {'a/rgb.png': rng.integers(0, 256, (20, 18, 3), np.uint8),
          'b/gray.png': rng.integers(0, 256, (16, 16, 1), np.uint8),
          'b/rgba.png': rng.integers(0, 256, (17, 19, 4), np.uint8)}
  for split in ('train', 'test'):
    for rel, array in pngs.items():
      helpers.write_png(os.path.join(str(tmp_path), split, rel), array)
  src = datasets.resolve_dataset(f'folder:{tmp_path}')
  cfg = _config(dataset=f'folder:{tmp_path}', train_split='train', eval_split='test',
                image_size=16, cache_dataset=True)
  x, y = next(iter(pipeline.make_train_dataset(src, cfg, 6, num_views=2)))
  assert x.shape == (6, 16, 16, 6) and y.shape == (6, 2)
  x, y = next(iter(pipeline.make_eval_dataset(src, cfg, 8)))
  assert x.shape == (3, 16, 16, 3)  # Partial final batch kept.
  for image, label in zip(x.numpy(), np.argmax(y, 1)):
    if np.allclose(image, image[..., :1]):
      assert label == 1  # Only the grayscale PNG has equal channels.
