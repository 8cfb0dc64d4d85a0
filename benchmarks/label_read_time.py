"""How long the readouts' labels take to read, per dataset kind.

The kNN bank, the linear probe and `--train_label_fraction` need every label of a split. Three
sources, each timed against reading the same split through its images:
- built-in `shapes10` (the quickstart): labels from memory;
- `folder:` (ImageFolder): labels from the file list, no file opened;
- TFDS: a prepared dataset's records hold image and label together, so the first read goes
  through every record (images not decoded) and stores `tf_simclr_labels-<split>.npy` beside the
  data; later reads load that file.

Usage: python benchmarks/label_read_time.py [--examples 5000] [--size 64] [--out results/x.json]
The TFDS and folder datasets are generated in a temporary folder (noise images, so the encoded
bytes are realistic in size rather than compressible to nothing).
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from tf_simclr import cpu_kernels  # noqa: E402
from tf_simclr.data import datasets  # noqa: E402


def _noise(rng, size):
  return rng.integers(0, 256, (size, size, 3), np.uint8)


class LabelTimeNoise(tfds.core.GeneratorBasedBuilder):
  """`examples` noise images in 10 classes, one train split in 8 files."""
  VERSION = tfds.core.Version('1.0.0')
  EXAMPLES, SIZE = 5000, 64

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(self.SIZE, self.SIZE, 3)),
            'label': tfds.features.ClassLabel(num_classes=10)}),
        supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for i in range(self.EXAMPLES):
      yield i, {'image': _noise(rng, self.SIZE), 'label': i % 10}


def _seconds(fn, repeats=3):
  """Median wall time of `fn` over `repeats` calls, and its last result."""
  times, out = [], None
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times)), out


def _through_images(source, split):
  """The alternative: read (and decode) every image to get its label, as a pipeline would."""
  ds = source.as_dataset(split).map(lambda image, label: label).batch(1024)
  return np.concatenate([b.numpy() for b in ds])


def _make_folder(root, examples, size):
  rng = np.random.default_rng(1)
  for i in range(examples):
    folder = os.path.join(root, 'train', f'class{i % 10}')
    os.makedirs(folder, exist_ok=True)
    tf.io.write_file(os.path.join(folder, f'{i:05d}.png'), tf.io.encode_png(_noise(rng, size)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--examples', type=int, default=5000)
  parser.add_argument('--size', type=int, default=64)
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  LabelTimeNoise.EXAMPLES, LabelTimeNoise.SIZE = args.examples, args.size
  rows = {}

  builtin = datasets.resolve_dataset('shapes10')
  for split in ('train', 'test'):
    labels_s, labels = _seconds(lambda: builtin.labels(split))
    images_s, via_images = _seconds(lambda: _through_images(builtin, split), repeats=1)
    assert np.array_equal(labels, via_images)
    rows[f'shapes10 {split} ({len(labels)})'] = {'labels_s': labels_s, 'through_images_s': images_s}

  with tempfile.TemporaryDirectory() as tmp:
    _make_folder(os.path.join(tmp, 'folder'), args.examples, args.size)
    folder = datasets.resolve_dataset('folder:' + os.path.join(tmp, 'folder'))
    labels_s, labels = _seconds(lambda: folder.labels('train'))
    images_s, via_images = _seconds(lambda: _through_images(folder, 'train'), repeats=1)
    assert np.array_equal(labels, via_images)
    rows[f'folder train ({len(labels)} png)'] = {'labels_s': labels_s,
                                                 'through_images_s': images_s}

    data_dir = os.path.join(tmp, 'tfds')
    LabelTimeNoise(data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=8))
    source = datasets.resolve_dataset('label_time_noise', data_dir=data_dir)
    first_s, first = _seconds(lambda: source.labels('train'), repeats=1)  # fills the cache
    cache_path = source._labels_cache_path('train')  # pylint: disable=protected-access
    assert tf.io.gfile.exists(cache_path), cache_path
    cached_s, cached = _seconds(lambda: source.labels('train'))
    images_s, via_images = _seconds(lambda: _through_images(source, 'train'), repeats=1)
    assert np.array_equal(first, cached) and np.array_equal(first, via_images)
    record_bytes = sum(tf.io.gfile.stat(os.path.join(source.builder.data_dir, f)).length
                       for f in tf.io.gfile.listdir(source.builder.data_dir) if '.tfrecord' in f)
    rows[f'tfds train ({len(first)}, {record_bytes / 2**20:.0f} MiB of records)'] = {
        'labels_first_read_s': first_s, 'labels_cached_s': cached_s,
        'through_images_s': images_s}

  result = {'cpu_flags': sorted(cpu_kernels.cpu_flags() & {'avx2', 'avx512f', 'avx512_bf16',
                                                           'amx_bf16'}),
            'examples': args.examples, 'image_size': args.size, 'rows': rows}
  print(json.dumps(result, indent=1))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
