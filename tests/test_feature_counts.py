"""Feature extraction, kNN bank, probe, supervised eval and embed give exactly one row per example
for every split size and replica count.

A finite, statically shaped distributed dataset ends at the first round in which some replica
gets no batch; `pipeline.make_feature_dataset` therefore pads the number of batches to whole
rounds on every host. The replica sweep (tests/feature_sweep.py) and the 3-replica embed run in
one subprocess that splits the CPU into 8 logical devices before TensorFlow initialises.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tf_simclr import config as cfg
from tf_simclr.data import datasets, pipeline
from tf_simclr.evaluation import probe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows_seen(batches_per_host, share_sizes, batch, local):
  """Examples a static-shape distributed iterator delivers: rounds run while every replica of
  every host gets a batch (each host hands its batches to its replicas round-robin)."""
  rounds = min(b // local for b in batches_per_host)
  return sum(min(n, rounds * local * batch) for n in share_sizes)


@pytest.mark.parametrize('shares, batch, local', [
    ([17], 3, 2), ([1], 4, 8), ([0, 1, 1], 2, 2), ([5, 6, 6], 2, 2), ([24, 25], 2, 2),
    ([10, 10, 9, 9], 4, 3), ([0], 4, 2), ([7, 0], 1, 4)])
def test_padded_num_batches_gives_every_replica_every_round(shares, batch, local):
  """Unequal per-host shares: every host yields the same number of whole rounds, enough for its
  own data and no more than the largest share needs."""
  n = pipeline.padded_num_batches(shares, batch, local)
  own = [math.ceil(s / batch) for s in shares]
  assert n % local == 0 and n >= max(own) and n - max(own) < local
  assert _rows_seen([n] * len(shares), shares, batch, local) == sum(shares)
  if local > 1 and any(b % local for b in own):  # unpadded, some host's last round is lost
    assert _rows_seen(own, shares, batch, local) < sum(shares)


def test_hosts_with_unequal_shares_cover_the_split_once():
  """17 examples (or a 7-example subset) on 3 input pipelines of 2 replicas each: equal batch
  counts in whole rounds; the valid rows are the split (or subset) once, with its labels."""
  source = datasets.resolve_dataset('shapes10')
  data = cfg.DataConfig(dataset='shapes10', eval_split='test', image_size=8)
  labels = source.labels('test[:17]')
  for indices in (None, np.array([0, 3, 4, 9, 10, 11, 16])):
    expected = np.arange(17) if indices is None else indices
    got, counts = [], []
    for host in range(3):
      context = tf.distribute.InputContext(num_input_pipelines=3, input_pipeline_id=host,
                                           num_replicas_in_sync=6)
      batches = list(pipeline.make_feature_dataset(source, data, 'test[:17]', 2, indices,
                                                   input_context=context))
      counts.append(len(batches))
      for index, _, label, valid in batches:
        keep = valid.numpy().astype(bool)
        got += list(zip(index.numpy()[keep], label.numpy()[keep]))
    assert len(set(counts)) == 1 and counts[0] % 2 == 0
    assert sorted(i for i, _ in got) == list(expected)
    assert all(labels[i] == y for i, y in got)
    np.testing.assert_array_equal(pipeline.feature_indices(source, 'test[:17]', indices), expected)


def test_a_lost_row_is_an_error_naming_expected_and_actual_rows():
  source = datasets.resolve_dataset('shapes10')
  data = cfg.DataConfig(dataset='shapes10', eval_split='test', image_size=8)
  strategy = tf.distribute.get_strategy()
  step = probe.feature_step(lambda images, training=False: tf.reduce_mean(images, [1, 2]),
                            strategy)
  dataset = pipeline.build_feature_dataset(source, data, 'test[:17]', 4, strategy)
  features, _ = probe.extract_features(step, dataset, np.arange(17))
  assert features.shape == (17, 3)
  with pytest.raises(probe.FeatureCountError, match=r'returned 16 rows for 17 examples \(1 '
                     r'missing, e\.g\. \[16\]; 0 repeated\)'):
    probe.extract_features(step, dataset.take(4), np.arange(17))
  with pytest.raises(probe.FeatureCountError, match=r'returned 21 rows for 17 .* 4 repeated'):
    probe.extract_features(step, dataset.concatenate(dataset.take(1)), np.arange(17))


# One process with 8 logical CPU devices (tests/feature_sweep.py splits the CPU on import) runs
# both checks that need more devices than this session's 2: the replica sweep, then the embed
# journey of test_embed_on_three_cpu_devices_writes_every_image_once, each run.py command line in
# turn through the CLI's flags -> Config -> modes.run (--cpu_devices=3 takes the first 3 devices).
# Each part reports its own result or traceback, so one failing does not hide the other.
CHILD = """
import contextlib, io, json, sys, traceback
sys.path.insert(0, sys.argv[1] + '/tests')
import feature_sweep  # splits the CPU into 8 logical devices before TensorFlow initialises
import tensorflow as tf
import helpers
from tf_simclr.run import modes

out = {}
try:
  with contextlib.redirect_stdout(io.StringIO()) as printed:
    feature_sweep.main([])
  out['sweep'] = json.loads(printed.getvalue().strip().splitlines()[-1])
except Exception:  # pylint: disable=broad-except
  out['sweep_error'] = traceback.format_exc()

def run(argv):
  tf.distribute.MirroredStrategy._collective_key_base += 100000  # one strategy per run, as run.py
  # No SavedModel export after training (tests/test_export.py and test_own_images.py check it).
  return helpers.run_argv(argv, export_fn=modes.no_export)[1]

try:
  out['embed'] = [run(json.loads(argv)) for argv in sys.argv[2:]]
except Exception:  # pylint: disable=broad-except
  out['embed_error'] = traceback.format_exc()
print('RESULT ' + json.dumps(out))
"""


@pytest.fixture(scope='module')
def child(tmp_path_factory):
  """The 8-device process: {'sweep': rows, 'embed': [log of each EMBED_RUNS command]} (or
  'sweep_error' / 'embed_error' with the traceback), and the embed journey's folders."""
  work = tmp_path_factory.mktemp('feature_counts')
  images, model_dir = work / 'photos', work / 'run'
  images.mkdir()
  _constant_images(str(images), 13)
  common = [f'--dataset=images:{images}', f'--model_dir={model_dir}']
  runs = [common + flags for flags in EMBED_RUNS]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='',
             PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  script = work / 'child.py'
  script.write_text(CHILD)
  done = subprocess.run([sys.executable, str(script), ROOT, *map(json.dumps, runs)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  line = [l for l in done.stdout.splitlines() if l.startswith('RESULT ')][-1]
  return {**json.loads(line[len('RESULT '):]), 'images': images, 'model_dir': model_dir}


@pytest.fixture(scope='module')
def sweep(child):
  assert 'sweep' in child, child.get('sweep_error')
  return child['sweep']


@pytest.mark.slow
def test_sweep_one_row_per_example_on_1_to_8_replicas(sweep):
  """Sizes 1, b +- 1, R*b +- 1 and primes on 1, 2, 3, 4 and 8 replicas (b = 3 per replica):
  every example once (rows == size, labels in split order) with the features the encoder gives
  eagerly on one device (the same float32 ops on the same inputs: equal up to rounding)."""
  assert {r['replicas'] for r in sweep} == {1, 2, 3, 4, 8}
  table = {(r['size'], r['replicas']): r['rows'] for r in sweep}
  assert table == {(r['size'], r['replicas']): r['size'] for r in sweep}, sweep
  assert all(r['labels_ok'] for r in sweep)
  assert max(r['max_abs_diff'] for r in sweep) <= 1e-5


def _constant_images(root, count):
  rng = np.random.RandomState(4)
  colours = rng.choice(256 ** 3, count, replace=False)
  for i, c in enumerate(colours):
    rgb = np.array([c // 65536, c // 256 % 256, c % 256], np.uint8)
    Image.fromarray(np.tile(rgb, (12 + i % 5, 14, 1))).save(os.path.join(root, f'im{i:02d}.png'))


# The embed journey (run in the 8-device child): train 1 step on 3 replicas, embed on 3 replicas
# (global batch 6), embed on one device (batch 4) under another split name.
EMBED_RUNS = (
    ['--image_size=16', '--resnet_depth=18', '--width_multiplier=0.0625', '--proj_out_dim=8',
     '--num_proj_layers=1', '--train_batch_size=6', '--train_steps=1', '--eval_batch_size=6',
     '--use_blur=False', '--seed=1', '--cpu_devices=3', '--distribution_strategy=mirrored'],
    ['--mode=embed', '--eval_batch_size=6', '--cpu_devices=3', '--distribution_strategy=mirrored'],
    ['--mode=embed', '--eval_batch_size=4', '--embed_split=train[:13]',
     '--distribution_strategy=default'],
)


@pytest.mark.slow
def test_embed_on_three_cpu_devices_writes_every_image_once(child):
  """--cpu_devices=3: train 1 step, then embed 13 images with global batch 6 (2 rounds + 1 image:
  the unpadded pipeline wrote 12 rows). features.npy has one row per paths.txt line, and row i
  equals image i's row from a one-device embed of the same weights."""
  assert 'embed' in child, child.get('embed_error')
  images, model_dir = child['images'], child['model_dir']
  log, three, _ = child['embed']
  assert 'MirroredStrategy, 3 replicas' in log
  assert 'MirroredStrategy, 3 replicas' in three and 'Wrote 13 rows' in three
  out = {}
  for split in ('train', 'train[:13]'):
    folder = model_dir / 'embeddings' / split
    out[split] = (np.load(folder / 'features.npy'), (folder / 'paths.txt').read_text().split())
  features, paths = out['train']
  assert features.shape[0] == len(paths) == 13
  assert paths == sorted(str(p) for p in images.iterdir())
  assert out['train[:13]'][1] == paths
  # The same inference in other batch groupings: float32 rounding only.
  np.testing.assert_allclose(features, out['train[:13]'][0], rtol=1e-4, atol=1e-5)
  assert len({r.tobytes() for r in np.round(features, 3)}) == 13  # distinct images, distinct rows
