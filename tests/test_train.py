"""The training loop, tasks, checkpoints and evaluation, end to end on tiny models."""

import dataclasses
import json
import logging
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from tf_simclr import weights
from tf_simclr.errors import CheckpointMismatchError
from tf_simclr.models import simclr
from tf_simclr.run import modes
from tf_simclr.train import assemble, loop, tasks

from helpers import assert_same_updates, build_state, one_lars_step, tiny_config

# ResNet-18 at 1/16 width (channels 4-8-16-32): every test here checks steps, checkpoints, restores
# or the equality of two computations, none of which depends on the width; full width only made
# each step, trace and export slower.
NARROW = 0.0625


def narrow_config(model_dir, **overrides):
  return tiny_config(model_dir, **{'model__width_multiplier': NARROW, **overrides})


@pytest.fixture(scope='module')
def trained_dir(tmp_path_factory):
  """A model_dir after a 2-step pretraining run (no export); tests copy it before changing it."""
  model_dir = tmp_path_factory.mktemp('trained') / 'run'
  modes.run(narrow_config(model_dir, train__train_steps=2), export_fn=modes.no_export)
  return model_dir


def _copy(trained_dir, tmp_path):
  model_dir = tmp_path / 'run'
  shutil.copytree(trained_dir, model_dir)
  return model_dir

@pytest.mark.slow
def test_pretrain_then_eval_runs_exact_steps_and_writes_results(tmp_path, caplog):
  config = narrow_config(tmp_path, train__mode='train_then_eval', train__train_steps=5,
                       train__steps_per_loop=2)
  result = modes.run(config, flags_dict={'resnet_depth': 18})
  # Loops of 2, 2, 1 steps; a checkpoint every 2 steps and at the very end.
  assert tf.train.latest_checkpoint(str(tmp_path)).endswith('ckpt-5')
  assert sorted(f for f in os.listdir(tmp_path) if f.endswith('.index')) == [
      'ckpt-2.index', 'ckpt-4.index', 'ckpt-5.index']
  assert weights.source.read_global_step(str(tmp_path)) == 5
  stored = json.load(open(tmp_path / 'result.json'))
  assert stored == json.load(open(tmp_path / 'result_5.json'))
  for key in ('eval/label_top_1_accuracy', 'eval/label_top_5_accuracy',
              'eval/regularization_loss', 'global_step'):
    assert key in stored
  assert stored['global_step'] == 5 and stored['num_examples'] == 100
  assert 0 <= stored['eval/label_top_1_accuracy'] <= stored['eval/label_top_5_accuracy'] <= 1
  assert json.load(open(tmp_path / 'flags.json')) == {'resnet_depth': 18}
  assert result['eval/label_top_1_accuracy'] == stored['eval/label_top_1_accuracy']
  assert sorted(os.listdir(tmp_path / 'saved_model')) == ['5']  # exported after the eval

  # --mode=eval evaluates the newest checkpoint and stops: it is at the last training step.
  os.remove(tmp_path / 'result_5.json')
  again = modes.run(dataclasses.replace(
      config, train=dataclasses.replace(config.train, mode='eval')))
  assert again['eval/label_top_1_accuracy'] == pytest.approx(stored['eval/label_top_1_accuracy'])
  assert (tmp_path / 'result_5.json').exists()

  # --mode=export re-exports the newest checkpoint.
  shutil.rmtree(tmp_path / 'saved_model')
  modes.run(dataclasses.replace(
      config, train=dataclasses.replace(config.train, mode='export')))
  assert (tmp_path / 'saved_model' / '5' / 'saved_model.pb').exists()

  # A truncated newest checkpoint: export, eval and probe use the intact one before it and
  # rename nothing (a training run may own the folder). The export of step 4 is not pruned as
  # older than the existing saved_model/5 (--keep_hub_module_max=1), nor is saved_model/5.
  data = tmp_path / 'ckpt-5.data-00000-of-00001'
  with open(data, 'r+b') as f:
    f.truncate(os.path.getsize(data) // 3)
  checkpoint_files = lambda: sorted(f for f in os.listdir(tmp_path) if 'ckpt' in f)
  before = checkpoint_files()
  assert config.train.keep_hub_module_max == 1
  with caplog.at_level(logging.INFO):
    modes.run(dataclasses.replace(
        config, train=dataclasses.replace(config.train, mode='export')))
  assert sorted(os.listdir(tmp_path / 'saved_model')) == ['4', '5']
  assert (tmp_path / 'saved_model' / '4' / 'saved_model.pb').exists()
  assert (f'Exported the hub module to {tmp_path}/saved_model/4 (the newer exports [5] are kept)'
          in caplog.text)
  fallback = modes.run(dataclasses.replace(
      config, train=dataclasses.replace(config.train, mode='eval', eval_timeout=0.5)))
  assert fallback['global_step'] == 4 and (tmp_path / 'result_4.json').exists()
  assert checkpoint_files() == before
  with pytest.raises(weights.state.NoIntactCheckpointError, match='ckpt-5, ckpt-4, ckpt-2'):
    for name in ('ckpt-4', 'ckpt-2'):
      data = tmp_path / f'{name}.data-00000-of-00001'
      with open(data, 'r+b') as f:
        f.truncate(os.path.getsize(data) // 3)
    modes.run(dataclasses.replace(
        config, train=dataclasses.replace(config.train, mode='export')))


@pytest.mark.slow
def test_resume_restores_step_weights_slots_and_bn_statistics(trained_dir, tmp_path):
  model_dir = _copy(trained_dir, tmp_path)
  config = narrow_config(model_dir, train__train_steps=2)
  model, optimizer, state = build_state(config, model_dir)
  assert state.restore_or_initialize(None) == 'resumed'
  assert state.step == 2
  reader = tf.train.load_checkpoint(str(model_dir / 'ckpt-2'))
  keys = {**weights.source.variable_paths(reader, root_child='model'),
          **weights.source.variable_paths(reader, root_child='optimizer',
                                            skip_aliases=False)}
  ours = {**weights.match.object_variable_paths(model, 'model'),
          **weights.match.object_variable_paths(optimizer, 'optimizer')}
  moving = [p for p in ours if p.endswith('moving_mean') or p.endswith('moving_variance')]
  slots = [p for p in ours if p.startswith('optimizer/') and 'momentum' in p.lower()]
  assert moving and slots, 'BN statistics and momentum slots must be tracked'
  for path, var in ours.items():
    np.testing.assert_array_equal(var.numpy(), reader.get_tensor(keys[path]), err_msg=path)
  # After two training steps BN statistics and momenta are no longer at their initial values.
  assert any(np.any(ours[p].numpy() != 0) for p in moving if p.endswith('moving_mean'))
  assert any(np.any(ours[p].numpy() != 0) for p in slots)
  # Continuing the run trains only the remaining steps.
  modes.run(narrow_config(model_dir, train__train_steps=4), export_fn=modes.no_export)
  assert weights.source.read_global_step(str(model_dir)) == 4


class _NaNAfter(tasks.FinetuneTask):
  """A fine-tuning task whose loss turns NaN from a given optimizer step on."""

  def __init__(self, *args, nan_from_step, **kwargs):
    super().__init__(*args, **kwargs)
    self.nan_from_step = nan_from_step

  def train_loss(self, batch):
    loss, logs = super().train_loss(batch)
    loss = tf.where(self.model_step() >= self.nan_from_step, np.float32(np.nan), loss)
    logs['total_loss'] = loss
    return loss, logs


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = narrow_config(tmp_path, train__train_mode='finetune', train__train_steps=6,
                       train__checkpoint_steps=2, model__supervised_head_stop_gradient=False)
  ctx = modes.prepare(config)
  model, optimizer, state = build_state(config, tmp_path)
  task = _NaNAfter(config, model, ctx.strategy, nan_from_step=3)
  task.model_step = lambda: optimizer.iterations
  from tf_simclr.data import pipeline
  dataset = pipeline.build_train_dataset(ctx.source, config.data, 8, ctx.strategy, num_views=1)
  trainer = loop.Trainer(task, optimizer, state, ctx.strategy, ctx.steps, 8, str(tmp_path))
  with pytest.raises(loop.TrainingDivergedError, match='last good checkpoint'):
    trainer.train(iter(dataset))
  assert tf.train.latest_checkpoint(str(tmp_path)).endswith('ckpt-2')
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(tmp_path)))
  for key in reader.get_variable_to_shape_map():
    value = reader.get_tensor(key)
    if isinstance(value, np.ndarray) and value.dtype.kind == 'f':
      assert np.all(np.isfinite(value)), key


def _pretrain_batch(batch_size, image_size, num_classes, seed):
  rng = np.random.RandomState(seed)
  images = rng.uniform(size=(batch_size, image_size, image_size, 6)).astype(np.float32)
  labels = np.eye(num_classes, dtype=np.float32)[rng.randint(num_classes, size=batch_size)]
  return images, labels


@pytest.mark.slow
def test_two_replicas_take_exactly_the_single_device_step(tmp_path, two_replica_strategy):
  """One full pretraining step (NT-Xent across replicas, synchronized BN, LARS, weight decay,
  linear eval head) on 2 replicas equals the same step on one device with the global batch."""
  config = narrow_config(tmp_path, data__use_blur=False, train__train_batch_size=8)
  images, labels = _pretrain_batch(8, 16, 10, seed=0)
  results, initial = [], None
  for strategy in (tf.distribute.get_strategy(), two_replica_strategy):
    with strategy.scope():
      model = simclr.build_model(config.model, 10)
      model.build_for_size(16)
    variables = weights.match.object_variable_paths(model, 'model')
    if initial is None:
      initial = {p: v.numpy() for p, v in variables.items()}
    else:
      for p, v in variables.items():
        v.assign(initial[p])
    results.append(one_lars_step(config, model, strategy, images, labels,
                                 tmp_path / type(strategy).__name__))
  (single, single_metrics), (double, double_metrics) = results
  assert_same_updates(double, single, initial)
  for name in ('contrast_loss', 'supervised_loss', 'weight_decay'):
    assert double_metrics[name] == pytest.approx(single_metrics[name], rel=1e-4), name


@pytest.mark.slow
def test_resuming_a_model_dir_of_another_architecture_names_the_variables(trained_dir, tmp_path):
  model_dir = _copy(trained_dir, tmp_path)
  other = narrow_config(model_dir, train__train_steps=3, model__proj_out_dim=8)
  # The head's input is the encoder's 512 * NARROW = 32 features.
  with pytest.raises(CheckpointMismatchError,
                     match=r'another architecture.*projection_head.*\[32, 16\] vs model \[32, 8\]'):
    modes.run(other, export_fn=modes.no_export)

