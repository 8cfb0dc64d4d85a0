"""Test-session set-up shared by every test module.

Splits the host CPU into two logical devices before TensorFlow initialises, so that
multi-replica behaviour (cross-replica negatives, synchronized batch norm, gradient
aggregation) is tested with a real 2-replica MirroredStrategy on a CPU-only machine.
"""

import os
import pathlib

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices('CPU')
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_FIXTURES = PROJECT_ROOT.parent / 'shared' / 'fixtures'


@pytest.fixture(autouse=True)
def _fresh_collective_keys():
  """Gives every test's MirroredStrategy its own collective keys.

  Strategies created in one process start their collective instance keys at the same values, so
  a test whose first collective is an all_gather followed by one whose first is an all_reduce
  fails with "Collective instance 100 expected type ...". TF's own tests bump the base the same
  way (strategy_combinations.py). A real run has one strategy per process and is unaffected.
  """
  tf.distribute.MirroredStrategy._collective_key_base += 100000
  yield


@pytest.fixture
def two_replica_strategy():
  """A MirroredStrategy over the two logical CPU devices."""
  return tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])


@pytest.fixture(scope='module')
def run_module():
  """run.py as a module (its flags defined): config_from_flags, fill_flags_from_record, ..."""
  from helpers import run_cli  # pylint: disable=g-import-not-at-top
  return run_cli()


@pytest.fixture
def original_fixture_dir():
  """shared/fixtures/original_tf2, present in CI beside the clone; skipped in a user's clone."""
  path = SHARED_FIXTURES / 'original_tf2'
  if not path.is_dir() and os.environ.get('CI'):  # In CI a missing fixture is a failure.
    pytest.fail(f'{path} is missing, and CI is set: the tests of weights written by '
                'google-research/simclr must run in CI.')
  if not path.is_dir():
    pytest.skip('shared/fixtures/original_tf2 is not beside this clone (it is in CI); '
                'these tests check import of weights written by google-research/simclr.')
  return path


# The heaviest test files first (their summed durations in CI, minutes on 2 cores): pytest-xdist
# (`-n 2 --dist loadfile --no-loadscope-reorder`, pytest.ini) hands files out in this order, so
# the two workers end together instead of one running a 3-minute file alone at the end.
HEAVY_FIRST = ('test_fault_injection.py', 'test_train.py', 'test_multi_worker.py', 'test_xla.py',
               'test_own_images.py', 'test_precision.py', 'test_finetune.py', 'test_export.py',
               'test_probe.py', 'test_distill.py', 'test_export_original.py')


def pytest_collection_modifyitems(session, config, items):
  del session, config
  rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep order
