"""--seed fixes the order in which a split's files are read (TFDS ReadConfig.shuffle_seed, images:)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

import helpers
from tf_simclr import config as cfg
from tf_simclr.data import datasets, pipeline


# 60 8x8 images in 6 files; each image's pixel value is its index, and so is its label.
TinyShardedDataset = helpers.tiny_tfds_builder(
    'TinyShardedDataset', {'train': 60}, (8, 8, 1), 60,
    lambda split, i: (np.full((8, 8, 1), i, np.uint8), i))


@pytest.fixture(scope='module')
def sharded(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  TinyShardedDataset(data_dir=data_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(num_shards=6))
  source = datasets.resolve_dataset('tiny_sharded_dataset', data_dir=data_dir)
  assert source.num_files('train') == 6
  return source


def _order(ds):
  return [int(label) for _, label in ds.as_numpy_iterator()]


def test_same_seed_reads_files_in_the_same_order(sharded):
  orders = [_order(sharded.as_dataset('train', shuffle_files=True, seed=3)) for _ in range(4)]
  assert sorted(orders[0]) == list(range(60))
  assert all(order == orders[0] for order in orders)  # unseeded: 1 in 720**3 by chance
  others = {tuple(_order(sharded.as_dataset('train', shuffle_files=True, seed=s)))
            for s in range(4, 10)}
  assert len(others | {tuple(orders[0])}) > 1  # the seed decides the order


def test_train_pipeline_passes_the_seed(sharded):
  data = cfg.DataConfig(dataset='tiny_sharded_dataset', train_split='train', image_size=8,
                        use_blur=False)

  def labels(seed):
    ds = pipeline.make_train_dataset(sharded, data, batch_size=6, num_views=1, seed=seed)
    return [int(np.argmax(row)) for _, label in ds.take(10).as_numpy_iterator() for row in label]

  first = labels(11)
  assert sorted(first) == list(range(60))  # one epoch, 60 examples in 10 batches
  assert labels(11) == first


def test_labels_are_read_once_then_from_the_cache(sharded, monkeypatch):
  """TFDS records hold the image with the label: the second call must not read them again."""
  labels = sharded.labels('train[5:40]')
  np.testing.assert_array_equal(labels, _order(sharded.as_dataset('train[5:40]')))

  def no_reading(*args, **kwargs):
    raise AssertionError('read the records again')
  monkeypatch.setattr(sharded.builder, 'as_dataset', no_reading)
  np.testing.assert_array_equal(sharded.labels('train[5:40]'), labels)
  with pytest.raises(AssertionError, match='read the records again'):
    sharded.labels('train[:5]')  # another split: not cached yet


def test_same_seed_shuffles_an_images_folder_the_same_way(tmp_path):
  """images:PATH shuffles its file list with --seed (before: unseeded, a new order each run)."""
  for i in range(12):
    helpers.write_png(tmp_path / f'{i:02d}.png', np.full((2, 2, 1), i))
  source = datasets.resolve_dataset(f'images:{tmp_path}')

  def order(seed):
    ds = source.as_dataset('train', shuffle_files=True, seed=seed)
    return [int(image[0, 0, 0]) for image, _ in ds.as_numpy_iterator()]

  first = order(5)
  assert sorted(first) == list(range(12))
  assert all(order(5) == first for _ in range(3))  # unseeded: 1 in (12!)**3 by chance
  assert len({tuple(order(s)) for s in range(6, 10)} | {tuple(first)}) > 1
