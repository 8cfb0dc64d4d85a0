"""Tests for the built-in dataset, dataset resolution and label subsets (tf_simclr.data).

TFDS is exercised offline with tiny GeneratorBasedBuilder datasets defined here.
"""

import hashlib
import json
import os

import numpy as np
import pytest
import tensorflow as tf

import helpers
from tf_simclr.config import DataConfig
from tf_simclr.data import datasets, pipeline, subsets, synthetic
from tf_simclr.data.datasets import DatasetError


# ----------------------------------------------------------------------------- shapes10


def test_synthetic_is_deterministic():
  a_images, a_labels = synthetic.generate(300, seed=5)
  b_images, b_labels = synthetic.generate(300, seed=5)
  assert a_images.tobytes() == b_images.tobytes() and a_labels.tobytes() == b_labels.tobytes()
  c_images, _ = synthetic.generate(300, seed=6)
  assert a_images.tobytes() != c_images.tobytes()


def test_synthetic_bytes_are_pinned():
  """Same bytes on every machine: a change here means runs are no longer comparable."""
  images, labels = synthetic.generate(20, seed=123)
  digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
  assert digest == 'a0644da02a4e6a2546e292fa3cdb37f1f254f7685300c6dd493fc42ed778696c'


def test_synthetic_splits_are_balanced_and_cached():
  for split, (n, _) in synthetic.SPLITS.items():
    images, labels = synthetic.load_split(split)
    assert images.shape == (n, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, n // 10))
  assert synthetic.load_split('train')[0] is synthetic.load_split('train')[0]
  assert len(synthetic.CLASS_NAMES) == synthetic.NUM_CLASSES == 10
  train, test = synthetic.load_split('train')[0], synthetic.load_split('test')[0]
  assert not np.array_equal(train[:len(test)], test)
  with pytest.raises(ValueError, match='validation'):
    synthetic.load_split('validation')


def test_synthetic_colour_does_not_predict_class():
  """Nearest-centroid on colour statistics is near chance, so the class lives in the shape."""
  def colour_features(images):
    x = images.reshape(len(images), -1, 3).astype(np.float64) / 255
    return np.concatenate([x.mean(1), x.std(1)], axis=1)
  tr_x, tr_y = synthetic.load_split('train')
  te_x, te_y = synthetic.load_split('test')
  f_tr, f_te = colour_features(tr_x), colour_features(te_x)
  centroids = np.stack([f_tr[tr_y == c].mean(0) for c in range(10)])
  pred = np.argmin(((f_te[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
  assert (pred == te_y).mean() < 0.2
  # The foreground always contrasts with the background (the shape is visible).
  gray = te_x.astype(np.float64).mean(-1)
  assert np.percentile(gray.max((1, 2)) - gray.min((1, 2)), 1) > 50


def test_synthetic_colours_cannot_identify_an_instance():
  """Few colourings, each shared by many images of a batch of 128 (a unique colour pair per image
  let contrastive pretraining solve instance discrimination from colour, never learning shape)."""
  images = synthetic.load_split('train')[0][:128].reshape(128, -1, 3).astype(np.float64)
  colourings = set()
  for image in images:  # (dark colour, light colour): medians of the two luminance halves.
    lum = image.mean(1)
    dark = lum < (lum.min() + lum.max()) / 2
    pair = np.concatenate([np.median(image[dark], 0), np.median(image[~dark], 0)])
    colourings.add(tuple(np.round(pair / 32).astype(int)))
  assert len(colourings) <= 8


# ----------------------------------------------------------------------------- resolution


def test_builtin_source_and_slicing():
  src = datasets.resolve_dataset('shapes10')
  assert (src.kind, src.num_classes, src.image_shape) == ('builtin', 10, (32, 32, 3))
  assert src.num_examples('train') == 10000 and src.num_examples('test') == 2000
  assert src.num_examples('train[:10%]') == 1000
  assert src.num_examples('train[:500]+test[-100:]') == 600
  ds = src.as_dataset('train[10:20]')
  images, labels = next(iter(ds.batch(100)))
  assert images.dtype == tf.uint8 and labels.dtype == tf.int64 and images.shape == (10, 32, 32, 3)
  np.testing.assert_array_equal(images.numpy(), synthetic.load_split('train')[0][10:20])
  np.testing.assert_array_equal(src.labels('train[10:20]'), labels.numpy())


def test_builtin_shards_by_input_context():
  src = datasets.resolve_dataset('shapes10')
  parts = []
  for pipeline_id in range(2):
    ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline_id)
    ds = src.as_dataset('test[:50]', input_context=ctx).batch(64)
    parts.append(np.concatenate([l.numpy() for _, l in ds]))
  assert len(parts[0]) == 25 and len(parts[1]) == 25
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.sort(src.labels('test[:50]')))


@pytest.mark.parametrize('flag,split', [('--eval_split', 'validation'),
                                        ('--train_split', 'train[:abc]'),
                                        ('--train_split', 'train[:20000]')])
def test_bad_split_errors_name_flag_and_splits(flag, split):
  src = datasets.resolve_dataset('shapes10')
  with pytest.raises(DatasetError) as info:
    src.validate_split(split, flag)
  assert flag in str(info.value) and "'test'" in str(info.value) and "'train'" in str(info.value)


def test_empty_split_is_an_error():
  src = datasets.resolve_dataset('shapes10')
  with pytest.raises(DatasetError, match='--train_split.*no examples'):
    src.validate_split('train[:0]', '--train_split')


def test_unknown_dataset_error(tmp_path):
  with pytest.raises(DatasetError) as info:
    datasets.resolve_dataset('no_such_dataset_xyz', data_dir=str(tmp_path))
  message = str(info.value)
  assert '--dataset' in message and 'folder:PATH' in message and 'shapes10' in message


@pytest.fixture
def image_folder(tmp_path):
  """train/{a,b}, test/{a,b}; class b holds a grayscale and an RGBA PNG."""
  rng = np.random.default_rng(0)
  root = tmp_path / 'imgs'
  rgba = rng.integers(0, 256, (9, 7, 4), dtype=np.uint8)
  gray = rng.integers(0, 256, (8, 8, 1), dtype=np.uint8)
  for i in range(3):
    helpers.write_png(str(root / 'train' / 'a' / f'{i}.png'),
               rng.integers(0, 256, (10, 12, 3), dtype=np.uint8))
  helpers.write_png(str(root / 'train' / 'b' / 'gray.png'), gray)
  helpers.write_png(str(root / 'train' / 'b' / 'rgba.png'), rgba)
  helpers.write_png(str(root / 'test' / 'a' / '0.png'), rng.integers(0, 256, (10, 12, 3), np.uint8))
  helpers.write_png(str(root / 'test' / 'b' / '0.png'), gray)
  return root, gray, rgba


def test_folder_dataset(image_folder):
  root, gray, rgba = image_folder
  src = datasets.resolve_dataset(f'folder:{root}')
  assert src.kind == 'folder' and src.num_classes == 2 and src.class_names == ('a', 'b')
  assert src.split_sizes == {'train': 5, 'test': 2} and src.channels == 3
  examples = [(i.numpy(), int(l)) for i, l in src.as_dataset('train')]
  assert all(i.shape[-1] == 3 and i.dtype == np.uint8 for i, _ in examples)
  by_shape = {i.shape[:2]: (i, l) for i, l in examples}
  g, g_label = by_shape[(8, 8)]
  np.testing.assert_array_equal(g, np.repeat(gray, 3, axis=-1))  # Grayscale tiled to RGB.
  r, r_label = by_shape[(9, 7)]
  np.testing.assert_array_equal(r, rgba[..., :3])  # Alpha dropped.
  assert g_label == r_label == 1
  np.testing.assert_array_equal(src.labels('train'), [l for _, l in examples])
  assert src.num_examples('train[:2]') == 2
  np.testing.assert_array_equal(src.labels('train[1:3]'), [l for _, l in examples[1:3]])
  assert len(list(src.as_dataset('train[1:3]'))) == 2
  with pytest.raises(DatasetError, match="--eval_split='validation'.*'test', 'train'"):
    src.validate_split('validation', '--eval_split')


def test_folder_errors(tmp_path):
  with pytest.raises(DatasetError, match='does_not_exist.*<split>/<class>'):
    datasets.resolve_dataset(f'folder:{tmp_path / "does_not_exist"}')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(DatasetError, match='no split folders'):
    datasets.resolve_dataset(f'folder:{tmp_path / "empty"}')


# ----------------------------------------------------------------------------- TFDS builders


def _gray_example(split, i):
  """8x8 grayscale, 3 classes; pixel value 20 * label + index (labels seeded per split)."""
  label = np.random.default_rng({'train': 0, 'test': 1}[split]).integers(0, 3, i + 1)[i]
  return np.full((8, 8, 1), 20 * label + i, dtype=np.uint8), label


TinyGrayDataset = helpers.tiny_tfds_builder('TinyGrayDataset', {'train': 40, 'test': 12},
                                            (8, 8, 1), 3, _gray_example)


class TinyManualDataset(TinyGrayDataset):
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'Put tiny.tar in the manual folder.'

  def _split_generators(self, dl_manager):
    _ = dl_manager.manual_dir
    return super()._split_generators(dl_manager)


class TinyOfflineDataset(TinyGrayDataset):

  def _split_generators(self, dl_manager):
    raise ConnectionError('simulated: no route to host')


@pytest.fixture(scope='module')
def tiny_tfds(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  return datasets.resolve_dataset('tiny_gray_dataset', data_dir=data_dir)


def test_tfds_source(tiny_tfds):
  src = tiny_tfds
  assert src.kind == 'tfds' and src.num_classes == 3 and src.image_shape == (8, 8, 1)
  assert src.num_examples('train') == 40 and src.num_examples('train[:25%]') == 10
  pairs = [(i.numpy(), int(l)) for i, l in src.as_dataset('train')]
  assert pairs[0][0].dtype == np.uint8
  # labels() skips image decoding but must follow as_dataset's order exactly.
  np.testing.assert_array_equal(src.labels('train'), [l for _, l in pairs])
  np.testing.assert_array_equal(src.labels('train[:25%]'), [l for _, l in pairs[:10]])
  with pytest.raises(DatasetError, match='--eval_split.*validation.*available splits'):
    src.validate_split('validation', '--eval_split')


def test_tfds_manual_download_error(tmp_path):
  with pytest.raises(DatasetError) as info:
    datasets.resolve_dataset('tiny_manual_dataset', data_dir=str(tmp_path))
  message = str(info.value)
  assert os.path.join(str(tmp_path), 'downloads', 'manual') in message
  assert 'Put tiny.tar' in message and '--dataset=tiny_manual_dataset' in message


def test_tfds_network_error(tmp_path):
  with pytest.raises(DatasetError) as info:
    datasets.resolve_dataset('tiny_offline_dataset', data_dir=str(tmp_path))
  message = str(info.value)
  assert 'could not be downloaded' in message and 'download_and_prepare' in message
  assert '--data_dir' in message


def test_pipeline_label_subset_follows_tfds_order(tiny_tfds):
  """The index filter follows TFDS's read order (SkipDecoding labels vs decoded images)."""
  src = tiny_tfds
  labels = src.labels('train')
  subset = np.flatnonzero(labels == 1)
  cfg = DataConfig(dataset='tiny_gray_dataset', train_split='train', image_size=8)
  ds = pipeline.make_train_dataset(src, cfg, 4, num_views=2, label_subset=subset)
  for x, y in ds.take(5):
    assert x.shape == (4, 8, 8, 6)
    np.testing.assert_array_equal(np.argmax(y, 1), 1)
    gray = x.numpy().reshape(4, 8, 8, 2, 3)
    np.testing.assert_allclose(gray, np.repeat(gray[..., :1], 3, -1), atol=1e-6)


# ----------------------------------------------------------------------------- label subsets


def test_label_subset_is_class_balanced():
  labels = np.repeat([0, 1, 2, 3], [100, 50, 7, 1])
  np.random.default_rng(0).shuffle(labels)
  ids = subsets.select_label_subset(labels, 0.1, seed=3)
  assert np.all(np.diff(ids) > 0)  # Sorted, unique.
  np.testing.assert_array_equal(np.bincount(labels[ids], minlength=4), [10, 5, 1, 1])
  half = subsets.select_label_subset(labels, 0.5, seed=3)
  np.testing.assert_array_equal(np.bincount(labels[half], minlength=4), [50, 25, 4, 1])
  np.testing.assert_array_equal(subsets.select_label_subset(labels, 1.0, seed=3),
                                np.arange(len(labels)))


def test_label_subset_determinism():
  labels = np.arange(1000) % 10
  a = subsets.select_label_subset(labels, 0.05, seed=1)
  b = subsets.select_label_subset(labels, 0.05, seed=1)
  c = subsets.select_label_subset(labels, 0.05, seed=2)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c) and len(a) == len(c) == 50
  with pytest.raises(DatasetError, match='--train_label_fraction'):
    subsets.select_label_subset(labels, 0.0, seed=1)


def test_label_subset_for_source_and_json(tmp_path):
  src = datasets.resolve_dataset('shapes10')
  ids = datasets.label_subset_for(src, 'train', 0.01, seed=0)
  np.testing.assert_array_equal(np.bincount(synthetic.load_split('train')[1][ids]), [10] * 10)
  path = datasets.write_label_subset(str(tmp_path / 'run'), dataset='shapes10', split='train',
                                     fraction=0.01, seed=0, indices=ids)
  assert os.path.basename(path) == 'label_subset.json'
  with open(path) as f:
    raw = json.load(f)
  assert (raw['dataset'], raw['split'], raw['fraction'], raw['seed']) == ('shapes10', 'train',
                                                                         0.01, 0)
  np.testing.assert_array_equal(datasets.read_label_subset(path)['indices'], ids)


# ----------------------------------------------------------------------------- input per host


def _pairs(ds):
  return [(int(image.numpy().ravel()[0]), int(label)) for image, label in ds]


def test_one_file_split_falls_back_to_example_sharding(tiny_tfds, caplog):
  """4 input pipelines on a split stored in one file (TFDS file sharding would raise): each
  pipeline reads its own contiguous examples; together they cover the split exactly once."""
  assert tiny_tfds.num_files('train') == 1
  whole = _pairs(tiny_tfds.as_dataset('train'))
  assert len(set(whole)) == 40  # (pixel value, label) identifies an example
  with caplog.at_level('INFO'):
    shares = [_pairs(tiny_tfds.as_dataset('train', input_context=tf.distribute.InputContext(
        num_input_pipelines=4, input_pipeline_id=i))) for i in range(4)]
  assert 'sharding by example' in caplog.text
  assert [len(s) for s in shares] == [10, 10, 10, 10]
  assert sum(shares, []) == whole  # disjoint, covering, each share in the split's order
  # A sliced split too (13 examples: shares of 3, 3, 3, 4).
  shares = [_pairs(tiny_tfds.as_dataset('train[5:18]', input_context=tf.distribute.InputContext(
      num_input_pipelines=4, input_pipeline_id=i))) for i in range(4)]
  assert sum(shares, []) == whole[5:18] and [len(s) for s in shares] == [3, 3, 3, 4]


def test_label_subset_and_mask_read_only_the_hosts_share(tiny_tfds, monkeypatch):
  reads = []
  real_read_range = datasets.DatasetSource.read_range

  def spy(self, split, start, stop, shuffle_files=False, decode=True):
    reads.append((split, start, stop, decode))
    return real_read_range(self, split, start, stop, shuffle_files, decode)

  monkeypatch.setattr(datasets.DatasetSource, 'read_range', spy)
  cfg = DataConfig(dataset='tiny_gray_dataset', train_split='train', image_size=8)
  labels = tiny_tfds.labels('train')
  subset = np.flatnonzero(labels == 1)
  whole = _pairs(tiny_tfds.as_dataset('train'))
  members = [whole[i] for i in subset]
  shares, masked = [], []
  for i in range(4):
    ctx = tf.distribute.InputContext(num_input_pipelines=4, input_pipeline_id=i)
    ds = pipeline._indexed_source(tiny_tfds, 'train', subset, False, ctx)
    shares.append(_pairs(ds))
    ds = pipeline._indexed_source(tiny_tfds, 'train', subset, True, ctx)
    masked.append([(int(im.numpy().ravel()[0]), int(l), float(m)) for im, l, m in ds])
  assert sum(shares, []) == members  # disjoint and covering the subset
  assert max(len(s) for s in shares) - min(len(s) for s in shares) <= 1
  assert [(v, l) for v, l, _ in sum(masked, [])] == whole  # masks: the whole split, once
  assert [m for *_, m in sum(masked, [])] == [float(l == 1) for l in labels]
  assert [len(m) for m in masked] == [10, 10, 10, 10]  # each host reads a quarter
  # Each host read only its range, undecoded (filtered before decoding): for the subset the
  # span from its first to its last member, disjoint from the other hosts' spans.
  subset_reads, mask_reads = reads[0::2], reads[1::2]
  assert all(not decode for *_, decode in reads)
  assert [r[1:3] for r in mask_reads] == [(0, 10), (10, 20), (20, 30), (30, 40)]
  spans = [r[1:3] for r in subset_reads]
  for (start, stop), share in zip(spans, shares):
    inside = subset[(subset >= start) & (subset < stop)]
    assert [whole[i] for i in inside] == share and stop == inside[-1] + 1
  assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
  # The pipeline on top: batches of subset members only.
  ds = pipeline.make_train_dataset(tiny_tfds, cfg, 2, num_views=1, label_subset=subset,
                                   input_context=tf.distribute.InputContext(4, 3))
  for _, y in ds.take(3):
    np.testing.assert_array_equal(np.argmax(y, 1), 1)


def test_feature_dataset_hosts_read_only_their_range_in_split_order(tiny_tfds, monkeypatch):
  """Readout features on 4 input pipelines: each reads and decodes only its own contiguous
  range; the (index, image, label) triples together are the split (or its indices) once."""
  reads = []
  real_read_range = datasets.DatasetSource.read_range

  def spy(self, split, start, stop, shuffle_files=False, decode=True):
    reads.append((start, stop, decode))
    return real_read_range(self, split, start, stop, shuffle_files, decode)

  monkeypatch.setattr(datasets.DatasetSource, 'read_range', spy)
  cfg = DataConfig(dataset='tiny_gray_dataset', eval_split='train', image_size=8)
  whole = _pairs(tiny_tfds.as_dataset('train'))
  subset = np.flatnonzero(tiny_tfds.labels('train') == 2)
  for indices, expected in ((None, list(range(40))), (subset, list(subset))):
    reads.clear()
    got = []
    for i in range(4):
      ctx = tf.distribute.InputContext(num_input_pipelines=4, input_pipeline_id=i)
      ds = pipeline.make_feature_dataset(tiny_tfds, cfg, 'train', 3, indices=indices,
                                         input_context=ctx)
      for index, images, labels, valid in ds:
        assert index.shape == (3,)  # padded to the batch size
        got += [(int(j), int(round(float(im[0, 0, 0]) * 255)), int(l))
                for j, im, l, v in zip(index, images, labels, valid) if v]
    assert [j for j, _, _ in got] == expected  # disjoint, covering, in split order
    assert [(v, l) for _, v, l in got] == [whole[j] for j in expected]
    assert all(not decode for *_, decode in reads) and len(reads) == 4
    assert all(a[1] <= b[0] for a, b in zip(reads, reads[1:]))  # disjoint ranges
  assert [r[:2] for r in reads] != [(0, 40)] * 4


def test_label_subset_smaller_than_the_input_pipelines_is_an_error(tiny_tfds):
  ctx = tf.distribute.InputContext(num_input_pipelines=4, input_pipeline_id=0)
  with pytest.raises(DatasetError, match=r'has 3 example\(s\), fewer than the 4 input pipelines'):
    pipeline._indexed_source(tiny_tfds, 'train', [0, 5, 9], False, ctx)
  pipeline._indexed_source(tiny_tfds, 'train', [0, 5, 9], True, ctx)  # a mask keeps the split
