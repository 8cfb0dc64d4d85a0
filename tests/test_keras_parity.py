"""One code path: `tf_simclr.SimCLR.fit` and the command line's Trainer make the same update.

From the same weights and the same three batches, 3 steps of fit() and 3 steps of
`train.loop.Trainer` (what `--mode=train` runs) give the same weights, for pretraining and
fine-tuning, on 1 and 2 replicas. The two share `loop.replica_update` and the Task, so the only
differences left are the tf.function around them (Keras' train function vs the Trainer's
while-loop): float32 rounding of the same ops at most, bounded by helpers.UPDATE_RTOL (each
variable's update relative to its own norm; see its derivation in helpers.py). The bugs this
guards against (a second copy of the step without the division by replicas, local negatives,
another weight-decay rule or LARS exclusions) move updates by 10-100%.
"""

import numpy as np
import pytest
import tensorflow as tf

import tf_simclr
from tf_simclr import config as cfg
from tf_simclr import weights
from tf_simclr.models import simclr
from tf_simclr.optim import decay, lars
from tf_simclr.train import loop, tasks

from helpers import TINY_MODEL, assert_same_updates, tiny_config

STEPS = 3
BATCH = 8
SIZE = 16
CLASSES = 10


def _python_arguments(config):
  """SimCLR's arguments for the run `config` describes (the flags of the same names)."""
  m, d, t = config.model, config.data, config.train
  return dict(train_mode=t.train_mode, num_classes=CLASSES, image_size=d.image_size,
              resnet_depth=m.resnet_depth, width_multiplier=m.width_multiplier,
              proj_out_dim=m.proj_out_dim, num_proj_layers=m.num_proj_layers,
              temperature=t.temperature, weight_decay=config.optim.weight_decay,
              color_jitter_strength=d.color_jitter_strength, use_blur=d.use_blur)


def _batches(num_views, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(STEPS * BATCH, SIZE, SIZE, 3 * num_views)).astype(np.float32)
  labels = np.eye(CLASSES, dtype=np.float32)[rng.integers(0, CLASSES, STEPS * BATCH)]
  return images, labels


def _values(model):
  return {p: v.numpy() for p, v in weights.match.object_variable_paths(model, 'model').items()}


def _optimizer():
  return lars.LARS(0.5, momentum=0.9, weight_decay=1e-4)


def _cli_steps(config, strategy, initial, images, labels, model_dir):
  """STEPS steps of the command line's Trainer from `initial`; the weights after."""
  with strategy.scope():
    model = simclr.build_model(config.model, CLASSES).build_for_size(SIZE)
    for path, v in weights.match.object_variable_paths(model, 'model').items():
      v.assign(initial[path])
    optimizer = lars.LARS(0.5, momentum=0.9, weight_decay=1e-4,
                          exclude_from_weight_decay=decay.lars_exclusions(model))
    optimizer.build(model.trainable_variables)
  task = tasks.make_task(config, model, strategy)
  steps = cfg.Steps(train_steps=STEPS, epoch_steps=STEPS, warmup_steps=0,
                    checkpoint_steps=STEPS, steps_per_loop=STEPS, eval_steps=1)
  state = weights.state.TrainState(model, optimizer, str(model_dir), 1)
  trainer = loop.Trainer(task, optimizer, state, strategy, steps, BATCH,
                         str(model_dir) + '_summaries')
  dataset = strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensor_slices((images, labels)).batch(BATCH))
  trainer.train(iter(dataset))
  return _values(model)


@pytest.mark.slow
@pytest.mark.parametrize('train_mode', ['pretrain', 'finetune'])
@pytest.mark.parametrize('replicas', [1, 2])
def test_fit_makes_the_command_lines_update(tmp_path, train_mode, replicas):
  config = tiny_config(tmp_path / 'cli', train__train_mode=train_mode, data__use_blur=False,
                       data__image_size=SIZE, model__width_multiplier=0.25)
  strategy = (tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1']) if replicas == 2
              else tf.distribute.get_strategy())
  with strategy.scope():
    model = tf_simclr.SimCLR(**_python_arguments(config))
    # The arguments map onto the command line's config: one owner of the model's settings.
    assert model.config.model == config.model
    model.compile(optimizer=_optimizer(), steps_per_execution=2)
  initial = _values(model.network)
  num_views = 2 if train_mode == 'pretrain' else 1
  images, labels = _batches(num_views)

  want = _cli_steps(config, strategy, initial, images, labels, tmp_path / 'cli')
  model.fit(tf.data.Dataset.from_tensor_slices((images, labels)).batch(BATCH), augment=False,
            epochs=1, verbose=0)
  assert int(model.optimizer.iterations.numpy()) == STEPS
  got = _values(model.network)
  assert_same_updates(got, want, initial)
  moved = [p for p in initial if not np.array_equal(want[p], initial[p])]
  assert len(moved) > len(initial) // 2  # The comparison is not vacuous.


def test_compile_sets_the_command_lines_lars_exclusions():
  model = tf_simclr.SimCLR(num_classes=CLASSES, image_size=SIZE, **TINY_MODEL_ARGS)
  optimizer = _optimizer()
  model.compile(optimizer=optimizer)
  excluded = {id(v) for v in decay.lars_exclusions(model.network)}
  for v in model.network.trainable_variables:
    assert optimizer.uses_weight_decay(v) == (id(v) not in excluded)
    assert optimizer.uses_layer_adaptation(v) == (id(v) not in excluded)
  assert model.config.optim.optimizer == 'lars'
  # Another optimizer: the L2 penalty of every non-BN variable goes into the loss, as the CLI.
  other = tf_simclr.SimCLR(num_classes=CLASSES, image_size=SIZE, **TINY_MODEL_ARGS)
  other.compile(optimizer='adam')
  assert other.config.optim.optimizer == 'momentum'
  assert len(other.task._decayed) > len(model.task._decayed)  # pylint: disable=protected-access


TINY_MODEL_ARGS = {k: v for k, v in TINY_MODEL.items() if k != 'cifar_stem'}
