"""Feature extraction over split sizes x replica counts on simulated CPU devices; prints JSON.

Run as its own process (tests/test_feature_counts.py does): logical devices are fixed once per
process, so this script splits the CPU into 8 logical devices before TensorFlow initialises and
then builds MirroredStrategies over 1, 2, 3, 4 and 8 of them.

For every (split size, replicas) it extracts features of shapes10 `test[:size]` (8 px) with a
trivial encoder through the distributed pipeline and reports the rows returned, whether the
example indices are exactly 0..size-1 and the largest difference from the same encoder applied
eagerly to the undistributed pipeline (one device, no strategy). A shortfall that raises is
reported as rows=-1 with the error text.

  python tests/feature_sweep.py [--replicas 1,2,3,4,8] [--per_replica_batch 3]
"""

import argparse
import json
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

MAX_DEVICES = 8
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices('CPU')[0],
    [tf.config.LogicalDeviceConfiguration() for _ in range(MAX_DEVICES)])

from tf_simclr import config as cfg  # noqa: E402
from tf_simclr.data import datasets, pipeline  # noqa: E402
from tf_simclr.evaluation import probe  # noqa: E402

PRIMES = (7, 13, 29, 37)


def sizes_for(batch: int, replicas: int) -> list:
  """1, batch +- 1, replicas * batch +- 1 and a few primes (batch = per-replica batch)."""
  round_size = replicas * batch
  wanted = {1, batch - 1, batch + 1, round_size - 1, round_size + 1, *PRIMES}
  return sorted(s for s in wanted if s >= 1)


# Features: the per-channel means and a fixed projection of the pixels (cheap, exact in float32
# up to summation order).
_PROJECTION = np.random.default_rng(0).standard_normal([8 * 8 * 3, 5]).astype(np.float32)


def encoder(images, training=False):
  del training
  flat = tf.reshape(images, [tf.shape(images)[0], -1])
  return tf.concat([tf.reduce_mean(images, axis=[1, 2]), tf.matmul(flat, _PROJECTION)], axis=1)


def reference(source, data, split):
  """{index: features} from the undistributed pipeline and the encoder run eagerly."""
  out = {}
  for index, images, _, valid in pipeline.make_feature_dataset(source, data, split, 4):
    keep = valid.numpy().astype(bool)
    for i, f in zip(index.numpy()[keep], encoder(images).numpy()[keep]):
      out[int(i)] = f
  return out


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument('--replicas', default='1,2,3,4,8')
  parser.add_argument('--per_replica_batch', type=int, default=3)
  args = parser.parse_args(argv)
  source = datasets.resolve_dataset('shapes10')
  data = cfg.DataConfig(dataset='shapes10', eval_split='test', image_size=8)
  batch = args.per_replica_batch
  largest = max(max(sizes_for(batch, int(r))) for r in args.replicas.split(','))
  want_all = reference(source, data, f'test[:{largest}]')
  want_labels = source.labels('test')
  rows = []
  for replicas in (int(r) for r in args.replicas.split(',')):
    # Strategies of one process share collective keys unless the base moves (see conftest.py).
    tf.distribute.MirroredStrategy._collective_key_base += 100000  # pylint: disable=protected-access
    strategy = tf.distribute.MirroredStrategy([f'/cpu:{d}' for d in range(replicas)])
    step = probe.feature_step(encoder, strategy)
    for size in sizes_for(batch, replicas):
      split = f'test[:{size}]'
      dataset = pipeline.build_feature_dataset(source, data, split, batch * replicas, strategy)
      row = {'size': size, 'replicas': replicas, 'global_batch': batch * replicas}
      try:
        features, labels = probe.extract_features(
            step, dataset, np.arange(size))
      except (AssertionError, ValueError, RuntimeError) as e:
        rows.append({**row, 'rows': -1, 'error': str(e)})
        continue
      want = np.stack([want_all[i] for i in range(min(size, len(features)))])
      rows.append({**row, 'rows': int(len(features)),
                   'labels_ok': bool(np.array_equal(labels, want_labels[:len(labels)])),
                   'max_abs_diff': float(np.max(np.abs(features[:len(want)] - want)))})
  json.dump(rows, sys.stdout)
  print()


if __name__ == '__main__':
  main()
