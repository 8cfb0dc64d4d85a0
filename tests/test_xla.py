"""A CPU proxy for the TPU compiler: the train and eval replica steps compile with XLA.

TPUStrategy compiles the whole replica step with XLA, so an op without an XLA kernel there (a
summary write, a string op, a py_function) fails a TPU run at compile time. XLA cannot compile
cross-replica collectives on CPU devices ("Collectives are not yet implemented for CPU devices
when compiling with XLA", TF 2.21), so the proxy compiles the step on one device with
`jit_compile=True` and checks that it takes the same step as the uncompiled step on a 2-replica
MirroredStrategy over logical CPU devices (the cross-replica path: NT-Xent's gather and
offset, synchronized batch norm, the replica-context metric all-reduce).
"""

from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.distribute import mirrored_strategy

from tf_simclr import weights
from tf_simclr import config as cfg
from tf_simclr.data import augment
from tf_simclr.models import simclr
from tf_simclr.optim import decay, lars
from tf_simclr.evaluation import evaluate
from tf_simclr.train import loop, tasks

from helpers import assert_same_updates


@pytest.fixture(autouse=True)
def _seeded():
  """Fixed initial weights whatever ran before: these tests compare two numerical paths from one
  initialisation, and their tolerances were chosen for it."""
  keras.utils.set_random_seed(0)


SIZE, BATCH, CLASSES = 8, 4, 5
MODEL = cfg.ModelConfig(resnet_depth=18, width_multiplier=0.125, cifar_stem=True,
                        proj_out_dim=8, num_proj_layers=2)


def _config(train_mode, tmp_path):
  model = cfg.ModelConfig(**{**MODEL.__dict__,
                             'supervised_head_stop_gradient': train_mode == 'pretrain'})
  distill = cfg.DistillConfig(teacher_checkpoint='unused', label_weight=0.5)
  return cfg.Config(
      distill=distill if train_mode == 'distill' else cfg.DistillConfig(), model=model,
      data=cfg.DataConfig(dataset='shapes10', image_size=SIZE, use_blur=False),
      optim=cfg.OptimConfig(learning_rate=0.2, weight_decay=1e-4, warmup_epochs=0),
      train=cfg.TrainConfig(model_dir=str(tmp_path), train_mode=train_mode,
                            train_batch_size=BATCH, train_steps=2, temperature=0.5))


def _batches(train_mode, seed=0):
  """Two fixed batches (images, labels[, label_mask]) of the global batch size."""
  rng = np.random.RandomState(seed)
  views = 2 if train_mode == 'pretrain' else 1
  out = []
  for _ in range(2):
    images = rng.uniform(size=(BATCH, SIZE, SIZE, 3 * views)).astype(np.float32)
    labels = np.eye(CLASSES, dtype=np.float32)[rng.randint(CLASSES, size=BATCH)]
    mask = np.array([1, 0, 0, 1], np.float32)
    out.append((images, labels, mask) if train_mode == 'distill' else (images, labels))
  return out


def _build(config, strategy, name='model', initial=None):
  with strategy.scope():
    model = simclr.build_model(config.model, CLASSES, name=name)
    model.build_for_size(SIZE)
  variables = weights.match.object_variable_paths(model, name)
  if initial is not None:
    for path, v in variables.items():
      v.assign(initial[path])
  return model, {p: v.numpy() for p, v in variables.items()}


class _PrintingTask(tasks.FinetuneTask):
  """A fine-tuning step with a host-only op in it (what a TPU compile rejects)."""

  def train_loss(self, batch):
    loss, logs = super().train_loss(batch)
    tf.summary.image('host_only', batch[0], step=0)  # Summary write: no XLA kernel.
    return loss, logs


def _train(train_mode, strategy, jit_compile, tmp_path, initial=None, task_cls=None):
  """Two steps in one loop from `initial` weights; returns (loop metrics, weights, initial)."""
  config = _config(train_mode, tmp_path)
  model, init = _build(config, strategy, initial=initial and initial['model'])
  teacher = None
  if train_mode == 'distill':
    teacher_model, teacher_init = _build(config, strategy, name='teacher',
                                         initial=initial and initial['teacher'])
    teacher = lambda images: teacher_model(images, training=False)[simclr.LOGITS_SUP]
    init = {'model': init, 'teacher': teacher_init}
  else:
    init = {'model': init}
  with strategy.scope():
    optimizer = lars.LARS(0.2, momentum=0.9, weight_decay=1e-4,
                          exclude_from_weight_decay=decay.lars_exclusions(model))
    optimizer.build(model.trainable_variables)
  task = (task_cls or tasks.make_task)(config, model, strategy, teacher) if teacher else (
      (task_cls or tasks.make_task)(config, model, strategy))
  steps = cfg.Steps(train_steps=2, epoch_steps=2, warmup_steps=0, checkpoint_steps=2,
                    steps_per_loop=2, eval_steps=1)
  run_dir = tmp_path / f'{train_mode}_{strategy.num_replicas_in_sync}_{jit_compile}'
  state = weights.state.TrainState(model, optimizer, str(run_dir), 1)
  trainer = loop.Trainer(task, optimizer, state, strategy, steps, BATCH, str(run_dir),
                         jit_compile=jit_compile)
  batches = _batches(train_mode)
  dataset = tf.data.Dataset.from_tensor_slices(
      tuple(np.stack(parts) for parts in zip(*batches))).repeat()
  result = trainer.train(iter(strategy.experimental_distribute_dataset(dataset)))
  trained = {p: v.numpy() for p, v in weights.match.object_variable_paths(model, 'model').items()}
  if task_cls is None:  # The host wrote the last step's augmented images after the loop.
    images = _summary_images(run_dir)  # Replica 0's first example of the second batch.
    assert list(images) == [2]
    np.testing.assert_allclose(images[2], batches[1][0][0, ..., :3] * 255, atol=1)
  return result.metrics, trained, init


def _summary_images(log_dir):
  """{step: first decoded image} of the 'image' summaries under log_dir."""
  out = {}
  for path in tf.io.gfile.glob(str(log_dir / 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == 'image':
          encoded = tf.make_ndarray(value.tensor)[2]  # [width, height, png 1, png 2, ...]
          out[event.step] = tf.io.decode_png(encoded).numpy()
  return out


@pytest.mark.slow
@pytest.mark.parametrize('train_mode', ['pretrain', 'finetune', 'distill'])
def test_xla_multi_step_function_takes_the_uncompiled_step(train_mode, tmp_path,
                                                           two_replica_strategy):
  """Compiled on one device vs uncompiled: on 2 replicas for pretraining (NT-Xent across
  replicas, synchronized BN), on one device for the supervised tasks (to stay fast; their
  2-replica path is the same batch norm and metric all-reduce)."""
  xla_metrics, xla_weights, initial = _train(train_mode, tf.distribute.get_strategy(), True,
                                             tmp_path)
  reference = two_replica_strategy if train_mode == 'pretrain' else tf.distribute.get_strategy()
  metrics, weights, _ = _train(train_mode, reference, False, tmp_path, initial)
  assert xla_metrics.keys() == metrics.keys()
  assert np.isfinite(metrics['total_loss']) and metrics['total_loss'] > 0
  for name, value in metrics.items():  # Means over both steps: the second saw the first update.
    assert xla_metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
  # Two LARS steps: each variable's update, relative to its norm (helpers.UPDATE_RTOL says why).
  assert_same_updates(xla_weights, weights, initial['model'])


@pytest.mark.slow
def test_xla_rejects_a_host_only_op_in_the_step(tmp_path):
  """The proxy can fail: a summary write inside the step does not compile."""
  with pytest.raises((tf.errors.InvalidArgumentError, tf.errors.UnimplementedError),
                     match='XLA|tf2xla'):
    _train('finetune', tf.distribute.get_strategy(), True, tmp_path, task_cls=_PrintingTask)


def test_batched_blur_compiles():
  """The pretraining step's random blur (random ops, static shapes) compiles too."""
  tf.random.set_seed(0)
  size = 32  # The kernel is size // 10 wide, as the original's: below 20 px the blur is a no-op.
  images = tf.random.uniform((32, size, size, 3))
  blurred = tf.function(augment.batch_random_blur, jit_compile=True)(images, size, size)
  x, y = images.numpy(), blurred.numpy()
  assert y.shape == x.shape
  # Each image is either itself or blurred (p = 0.5 each: all 32 alike has odds 2^-31). A blur
  # of uniform noise keeps its mean and cuts its total variation; an identity fails here.
  changed = np.abs(y - x).reshape(32, -1).max(axis=1) > 1e-6
  assert 0 < changed.sum() < 32
  tv = lambda a: np.abs(np.diff(a, axis=1)).sum() + np.abs(np.diff(a, axis=2)).sum()
  for i in np.flatnonzero(changed):
    assert tv(y[i]) < tv(x[i]), i
    assert abs(y[i].mean() - x[i].mean()) < 0.03, i


def test_xla_eval_step_matches_numpy(tmp_path):
  strategy = tf.distribute.get_strategy()
  model, _ = _build(_config('finetune', tmp_path), strategy)
  rng = np.random.RandomState(3)
  images = rng.uniform(size=(10, SIZE, SIZE, 3)).astype(np.float32)
  classes = rng.randint(CLASSES, size=10).astype(np.int32)
  labels = np.eye(CLASSES, dtype=np.float32)[classes]
  valid = np.ones([10], np.int32)  # pipeline.make_feature_dataset's (index, image, label, valid)
  dataset = tf.data.Dataset.from_tensor_slices(
      (np.arange(10, dtype=np.int32), images, classes, valid)).batch(5)
  results = [evaluate.Evaluator(model, strategy, [], 0.0, jit_compile=jit).evaluate(dataset, 10)
             for jit in (True, False)]
  logits = model(images, training=False)[simclr.LOGITS_SUP].numpy()
  truth = labels.argmax(1)
  top1 = np.mean(logits.argmax(1) == truth)
  top5 = np.mean([t in np.argsort(-row)[:5] for row, t in zip(logits, truth)])
  for result in results:
    assert result['num_examples'] == 10
    assert result[evaluate.TOP1] == pytest.approx(top1)
    assert result[evaluate.TOP5] == pytest.approx(top5)


def test_metrics_are_all_reduced_and_summed_on_each_replica(two_replica_strategy):
  """Replica-context all-reduce, then per-replica (on-device) sums the host reads once."""
  strategy = two_replica_strategy
  with strategy.scope():
    accumulator = loop.MetricAccumulator(['loss'])

  def replica_step(step):
    context = tf.distribute.get_replica_context()
    value = tf.cast(context.replica_id_in_sync_group, tf.float32) * 10.0 + step  # 0+s, 10+s
    accumulator.add(context.all_reduce(tf.distribute.ReduceOp.MEAN, {'loss': value}))

  @tf.function
  def steps():
    for step in tf.range(3):
      strategy.run(replica_step, args=(tf.cast(step, tf.float32),))

  steps()
  copies = accumulator._sums['loss'].values  # pylint: disable=protected-access
  assert [c.device.split(':')[-1] for c in copies] == ['0', '1']  # one copy per device
  np.testing.assert_allclose([c.numpy() for c in copies], [18.0, 18.0])  # 5 + 6 + 7 each
  assert accumulator.result() == {'loss': pytest.approx(6.0)}
  accumulator.reset()
  assert accumulator.result() == {'loss': 0.0}


@pytest.mark.slow
def test_two_replica_compiled_part_of_the_step_needs_no_merge_call(tmp_path,
                                                                   two_replica_strategy):
  """--jit_compile on several replicas nests the compiled part of the step in a tf.function,
  where MirroredStrategy cannot merge_call (it raises "merge_call called while defining a new
  graph"). With `_use_merge_call()` False, as in an XLA context on GPUs (all-reduces launch
  collectives directly), and the nested function left uncompiled (XLA cannot compile
  collectives on CPU devices), the 2-replica pretraining loop runs and takes the single-device
  step: nothing in the nested part (NT-Xent gather, synchronized BN) makes a merge_call. The
  XLA compile itself under MirroredStrategy on GPUs stays unproven here."""
  metrics, trained, initial = _train('pretrain', tf.distribute.get_strategy(), False, tmp_path)
  with mock.patch.object(mirrored_strategy.MirroredExtended, '_use_merge_call',
                         lambda self: False), \
       mock.patch.object(loop, '_xla', tf.function):
    direct_metrics, direct, _ = _train('pretrain', two_replica_strategy, True,
                                       tmp_path / 'direct', initial)
  assert direct_metrics.keys() == metrics.keys()
  for name, value in metrics.items():
    assert direct_metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
  for path, value in trained.items():
    np.testing.assert_allclose(direct[path], value, rtol=1e-3, atol=1e-4, err_msg=path)
