"""Strategy selection on this CPU-only machine; TPU and multi-worker paths with mocks."""

import json

import pytest
import tensorflow as tf

from tf_simclr import cpu_kernels
from tf_simclr import distribute
from tf_simclr.config import ConfigError, DistributeConfig


@pytest.fixture
def no_local_tpu(monkeypatch):
  monkeypatch.setattr(distribute, '_local_tpu_present', lambda: False)


def _tf_config(workers, chief=0):
  cluster = {'worker': [f'host{i}:2222' for i in range(workers)]}
  if chief:
    cluster['chief'] = ['chief:2222']
  return {'TF_CONFIG': json.dumps({'cluster': cluster, 'task': {'type': 'worker', 'index': 0}})}


def test_auto_on_cpu_is_the_default_strategy(no_local_tpu):
  if tf.config.list_physical_devices('GPU'):
    pytest.skip('this machine has a GPU: auto picks MirroredStrategy')
  strategy = distribute.make_strategy(DistributeConfig(strategy='auto'), env={})
  assert strategy is tf.distribute.get_strategy()
  assert strategy.num_replicas_in_sync == 1
  assert distribute.describe(strategy) == '_DefaultDistributionStrategy, 1 replica'


def test_explicit_choices(no_local_tpu):
  mirrored = distribute.make_strategy(DistributeConfig(strategy='mirrored'), env={})
  assert isinstance(mirrored, tf.distribute.MirroredStrategy)
  assert distribute.describe(mirrored).startswith('MirroredStrategy, ')
  default = distribute.make_strategy(DistributeConfig(strategy='default'), env={})
  assert default is tf.distribute.get_strategy()


def test_describe_two_replicas(two_replica_strategy):
  text = distribute.describe(two_replica_strategy)
  assert text.startswith('MirroredStrategy, 2 replicas (') and 'CPU:1' in text


def test_num_workers_from_tf_config():
  assert distribute.num_workers_from_tf_config({}) == 0
  assert distribute.num_workers_from_tf_config({'TF_CONFIG': ''}) == 0
  assert distribute.num_workers_from_tf_config(_tf_config(1)) == 1
  assert distribute.num_workers_from_tf_config(_tf_config(3)) == 3
  assert distribute.num_workers_from_tf_config(_tf_config(1, chief=1)) == 2
  with pytest.raises(ConfigError, match='TF_CONFIG'):
    distribute.num_workers_from_tf_config({'TF_CONFIG': '{not json'})


def test_auto_picks_multi_worker_only_for_several_workers(monkeypatch, no_local_tpu):
  calls = []
  def fake_multi_worker():
    calls.append(True)
    return tf.distribute.get_strategy()
  monkeypatch.setattr(tf.distribute, 'MultiWorkerMirroredStrategy', fake_multi_worker)
  distribute.make_strategy(DistributeConfig(strategy='auto'), env=_tf_config(1))
  assert not calls
  distribute.make_strategy(DistributeConfig(strategy='auto'), env=_tf_config(2))
  assert calls == [True]


def test_tpu_requested_without_one_is_a_clear_error(no_local_tpu):
  with pytest.raises(ConfigError, match='no TPU was found.*--tpu_name'):
    distribute.make_strategy(DistributeConfig(strategy='tpu'), env={})


def test_named_tpu_is_resolved_and_failures_are_reported(monkeypatch, no_local_tpu):
  seen = []
  def fake_resolver(tpu=None, zone=None, project=None):
    seen.append((tpu, zone, project))
    raise ValueError('unreachable')
  monkeypatch.setattr(tf.distribute.cluster_resolver, 'TPUClusterResolver', fake_resolver)
  config = DistributeConfig(strategy='auto', tpu_name='my-tpu', tpu_zone='z', gcp_project='p')
  with pytest.raises(ConfigError, match="Could not connect to the TPU 'my-tpu'"):
    distribute.make_strategy(config, env={})
  # TPU_NAME in the environment is also a request for a TPU (the resolver reads it itself).
  with pytest.raises(ConfigError, match='Could not connect'):
    distribute.make_strategy(DistributeConfig(strategy='auto'), env={'TPU_NAME': 'env-tpu'})
  assert seen == [('my-tpu', 'z', 'p'), (None, None, None)]
  # --use_tpu=false: auto never probes, even with a TPU named in the environment.
  strategy = distribute.make_strategy(DistributeConfig(strategy='auto', allow_tpu=False),
                                      env={'TPU_NAME': 'env-tpu'})
  # No TPU probed: the default strategy here (one replica), or all local GPUs.
  assert len(seen) == 2
  assert strategy.num_replicas_in_sync == max(1, len(tf.config.list_logical_devices('GPU')))
  with pytest.raises(ConfigError, match='use_tpu'):
    distribute.make_strategy(DistributeConfig(strategy='tpu', allow_tpu=False), env={})


def test_nvidia_gpu_that_tensorflow_does_not_see_is_a_warning(monkeypatch, tmp_path, caplog,
                                                              no_local_tpu):
  if tf.config.list_physical_devices('GPU'):
    pytest.skip('this machine has a GPU TensorFlow sees')
  driver = tmp_path / 'proc_driver_nvidia'
  monkeypatch.setattr(cpu_kernels, '_NVIDIA_PATHS', (str(driver),))
  monkeypatch.setattr(cpu_kernels.shutil, 'which', lambda name: None)
  with caplog.at_level('WARNING'):
    assert not distribute.warn_if_gpu_unused()  # no NVIDIA device here
  assert 'sees no GPU' not in caplog.text
  driver.mkdir()  # A faked driver folder, as /proc/driver/nvidia.
  with caplog.at_level('WARNING'):
    distribute.make_strategy(DistributeConfig(strategy='auto'), env={})
  assert f'NVIDIA GPU ({driver}) but TensorFlow sees no GPU' in caplog.text
  assert 'pip install "tensorflow[and-cuda]==' in caplog.text
  caplog.clear()
  driver.rmdir()
  monkeypatch.setattr(distribute.shutil, 'which',
                      lambda name: '/usr/bin/nvidia-smi' if name == 'nvidia-smi' else None)
  with caplog.at_level('WARNING'):
    assert distribute.warn_if_gpu_unused()
  assert '(/usr/bin/nvidia-smi)' in caplog.text
  monkeypatch.setattr(distribute.tf.config, 'list_physical_devices',
                      lambda kind=None: ['GPU:0'] if kind == 'GPU' else [])
  assert not distribute.warn_if_gpu_unused()  # TensorFlow sees it: nothing to say


def test_cpu_devices_mirror_over_logical_cpus(no_local_tpu):
  """--cpu_devices=2 (conftest already split the CPU in two): mirrored and auto both give 2
  replicas on CPU:0 and CPU:1; more devices than the initialised process has is an error."""
  if tf.config.list_physical_devices('GPU'):
    pytest.skip('this machine has a GPU: mirrored uses it')
  for choice in ('mirrored', 'auto'):
    strategy = distribute.make_strategy(DistributeConfig(strategy=choice, cpu_devices=2), env={})
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert strategy.num_replicas_in_sync == 2
    assert [d.split('/')[-1] for d in strategy.extended.worker_devices] == [
        'device:CPU:0', 'device:CPU:1']
  with pytest.raises(ConfigError, match='--cpu_devices=3: TensorFlow already initialised 2'):
    distribute.make_strategy(DistributeConfig(strategy='mirrored', cpu_devices=3), env={})


@pytest.mark.parametrize('kwargs, match', [
    (dict(cpu_devices=-1), r'--cpu_devices=-1 must lie in \[0, 64\]'),
    (dict(cpu_devices=65), r'--cpu_devices=65 must lie in \[0, 64\]'),
    (dict(cpu_devices=2, strategy='default'), "instead of 'default'"),
    (dict(cpu_devices=2, strategy='multi_worker'), "instead of 'multi_worker'"),
])
def test_cpu_devices_validation(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    DistributeConfig(**kwargs)
  DistributeConfig(strategy=kwargs.get('strategy', 'mirrored'), cpu_devices=1)  # 1 is harmless
