"""--global_bn=False on several replicas: the BN moving statistics, one copy per replica in Keras 3,
are averaged over the replicas at every loop boundary (before each save and readout), as the
original's (Keras 2, aggregation MEAN) were."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_simclr import config as cfg
from tf_simclr.models import simclr
from tf_simclr.train import loop

import helpers

SIZE = 8
MODEL = cfg.model_config('pretrain', SIZE, lineareval_while_pretraining=True, resnet_depth=18,
                         width_multiplier=0.125, proj_out_dim=8, num_proj_layers=2,
                         global_bn=False)


def _moving_statistics(model):
  return [v for layer in model._flatten_layers()  # pylint: disable=protected-access
          if isinstance(layer, keras.layers.BatchNormalization)
          for v in (layer.moving_mean, layer.moving_variance)]


def _copies(variable):
  """The per-replica values of a Keras variable under MirroredStrategy."""
  return [c.numpy() for c in variable.value.values]


def test_averager_sets_every_copy_to_the_mean_of_the_replicas(two_replica_strategy):
  strategy = two_replica_strategy
  keras.utils.set_random_seed(0)
  with strategy.scope():
    model = simclr.build_model(MODEL, 10).build_for_size(SIZE)
  initial = [v.numpy() for v in model.variables]
  rng = np.random.default_rng(0)
  # Different data per replica: other means and spreads, so the statistics differ.
  parts = [rng.uniform(0, 1, size=(4, SIZE, SIZE, 3)).astype(np.float32),
           rng.normal(2, 3, size=(4, SIZE, SIZE, 3)).astype(np.float32)]
  inputs = strategy.experimental_distribute_values_from_function(
      lambda ctx: tf.constant(parts[ctx.replica_id_in_sync_group]))
  tf.function(lambda x: strategy.run(lambda b: model(b, training=True)[simclr.LOGITS_SUP],
                                     args=(x,)))(inputs)
  statistics = _moving_statistics(model)
  assert len(statistics) > 30
  assert any(not np.allclose(*_copies(v)) for v in statistics)  # they drifted apart

  # Independently: each replica's update is a single-device forward pass from the same weights.
  expected = []
  for part in parts:
    single = simclr.build_model(MODEL, 10).build_for_size(SIZE)
    for v, value in zip(single.variables, initial):
      v.assign(value)
    single(part, training=True)
    expected.append([v.numpy() for v in _moving_statistics(single)])
  loop.bn_statistics_averager(model, strategy)()
  for i, v in enumerate(statistics):
    first, second = _copies(v)
    np.testing.assert_array_equal(first, second, err_msg=v.path)
    np.testing.assert_allclose(first, (expected[0][i] + expected[1][i]) / 2, rtol=1e-4,
                               atol=1e-6, err_msg=v.path)


@pytest.mark.slow
def test_training_loop_saves_the_averaged_statistics(two_replica_strategy, tmp_path):
  strategy = two_replica_strategy
  keras.utils.set_random_seed(1)
  config = helpers.tiny_config(tmp_path, model__global_bn=False, data__image_size=SIZE)
  with strategy.scope():
    model = simclr.build_model(config.model, 10).build_for_size(SIZE)
  rng = np.random.default_rng(1)
  images = np.concatenate([rng.uniform(0, 1, size=(4, SIZE, SIZE, 6)),
                           rng.normal(2, 3, size=(4, SIZE, SIZE, 6))]).astype(np.float32)
  labels = np.eye(10, dtype=np.float32)[np.arange(8)]
  helpers.one_lars_step(config, model, strategy, images, labels, tmp_path / 'run')
  saved = helpers.checkpoint_values(tf.train.latest_checkpoint(str(tmp_path / 'run')))
  paths = {id(v): p for p, v in
           __import__('tf_simclr').weights.match.object_variable_paths(model, 'model').items()}
  for v in _moving_statistics(model):
    first, second = _copies(v)
    np.testing.assert_array_equal(first, second, err_msg=v.path)
    np.testing.assert_array_equal(saved[paths[id(v)]], first, err_msg=v.path)
  assert loop.bn_statistics_averager(model, tf.distribute.get_strategy()) is None  # 1 replica
