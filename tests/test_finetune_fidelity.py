"""Every mode takes the original's steps: two steps through the real assembly (schedule, LARS,
exclusions, task, loop) from fixed weights and fixed batches equal a plain-TF/numpy reference of
google-research/simclr's update rule, whatever the loop size: fine-tuning, linear eval (below),
pretraining (the original's contrastive loss written out here, plus the online head) and
distillation (the authors' colab `add_kd_loss`, with and without its T^2).

Linear eval and partial fine-tuning: with --fine_tune_after_block=k the reference is
an all-trainable copy of the model whose forward pass the test composes itself, as the original's
Keras semantics run it: frozen parts called with training=True (batch statistics, moving averages
updated; Keras' stock BN path of trainable layers) for --frozen_batch_norm=batch_stats, with
training=False for moving_stats; only the unfrozen variables (chosen by path) train.

The reference shares nothing with the code under test but the model's layers: its own
gradient tape over all trainable variables (skipping the ones without a gradient, as the
original's apply_gradients), the original's loss (mean softmax cross-entropy plus the LARS-mode
L2 of the supervised head's kernel), its cosine schedule with sqrt scaling, and its LARS update
with exclusions chosen by name as the original's regexes ('batch_normalization', 'bias',
'head_supervised'), written in numpy. Tiny: ResNet-18 width 0.25, 16 px, batch 8.
"""

import dataclasses
import math
import re

import numpy as np
import pytest
import tensorflow as tf

from tf_simclr import config as cfg
from tf_simclr.models import simclr
from tf_simclr.run import modes
from tf_simclr.train import assemble

from helpers import tiny_config

BATCH, SIZE, CLASSES, STEPS = 8, 16, 10, 2
LR, WD, MOMENTUM, EETA = 0.05, 1e-3, 0.9, 1e-3
# The original's exclusion regexes, spelled for our variable paths (BN layers' gamma/beta).
EXCLUDED = re.compile(r'/(gamma|beta)$|/bias$|head_supervised')


def _config(model_dir, **model):
  model = {f'model__{name}': value for name, value in model.items()}
  return tiny_config(model_dir, train__train_mode='finetune', model__width_multiplier=0.25,
                     optim__learning_rate=LR, optim__learning_rate_scaling='sqrt',
                     optim__weight_decay=WD, optim__momentum=MOMENTUM,
                     train__train_batch_size=BATCH, train__train_steps=STEPS, **model)


def _fixed_batches():
  rng = np.random.RandomState(0)
  images = rng.uniform(size=(STEPS, BATCH, SIZE, SIZE, 3)).astype(np.float32)
  labels = np.eye(CLASSES, dtype=np.float32)[rng.randint(0, CLASSES, size=(STEPS, BATCH))]
  return images, labels


def _fixed_weights(model):
  """Seeded weights with a non-zero head, so the first step already reaches the encoder."""
  rng = np.random.RandomState(1)
  for v in model.supervised_head.trainable_variables:
    v.assign(rng.normal(0, 0.1, v.shape).astype(np.float32))


def _reference(model, images, labels, variables=None, forward=None, loss_fn=None):
  """The original's fine-tuning steps in plain TF (gradients) and numpy (schedule, LARS):
  `variables` train (default: all trainable), `forward(images)` gives the logits (default: the
  model's own training-mode pass); `loss_fn(images, labels)`, another mode's loss before weight
  decay (default: the supervised cross-entropy of `forward`)."""
  scaled = LR * math.sqrt(BATCH)
  variables = list(model.trainable_variables if variables is None else variables)
  forward = forward or (lambda x: model(x, training=True)[simclr.LOGITS_SUP])
  loss_fn = loss_fn or (lambda x, y: tf.reduce_mean(
      tf.nn.softmax_cross_entropy_with_logits(y, forward(x))))
  velocity = [np.zeros(v.shape, np.float32) for v in variables]
  for t in range(STEPS):
    lr = scaled * 0.5 * (1 + math.cos(math.pi * t / STEPS))  # CosineDecay(scaled, STEPS)(t)
    with tf.GradientTape() as tape:
      loss = loss_fn(tf.constant(images[t]), tf.constant(labels[t]))
      # add_weight_decay(adjust_per_optimizer=True) under LARS: the head's kernels only.
      loss += WD * tf.add_n([tf.nn.l2_loss(v) for v in variables
                             if 'head_supervised' in v.path and 'bias' not in v.path])
    grads = tape.gradient(loss, variables)
    for i, (v, g) in enumerate(zip(variables, grads)):
      if g is None:  # Not reached by the loss (projection-head layers past the selector).
        continue
      w, g = v.numpy().astype(np.float64), g.numpy().astype(np.float64)
      excluded = EXCLUDED.search(v.path) is not None
      if not excluded:
        g = g + WD * w
      trust = 1.0
      if not excluded:
        w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
        trust = EETA * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
      velocity[i] = MOMENTUM * velocity[i] + lr * trust * g
      v.assign((w - velocity[i]).astype(np.float32))


def _values(model):
  return {v.path: v.numpy() for v in model.variables}


def _train_ours(config, steps_per_loop, batches=None, teacher=None):
  """(values before, values after) of STEPS steps of the real trainer on the fixed batches
  (`batches`: (images, labels), default `_fixed_batches()`; `teacher`: distillation's)."""
  images, labels = batches or _fixed_batches()
  ctx = modes.prepare(config)
  steps = cfg.Steps(train_steps=STEPS, epoch_steps=STEPS, warmup_steps=0,
                    checkpoint_steps=STEPS, steps_per_loop=steps_per_loop, eval_steps=1)
  built = assemble.assemble_trainer(config, ctx.strategy, steps, CLASSES, teacher=teacher,
                                    task_class=ctx.task_class)
  _fixed_weights(built.model)
  start = _values(built.model)
  dataset = ctx.strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensor_slices((images, labels)))
  try:
    built.trainer.train(iter(dataset))
  finally:
    ctx.lock.release()
  return start, _values(built.model)


def _all_trainable_copy(config, start):
  """The run's model with nothing frozen, holding the values `start`."""
  model_config = dataclasses.replace(config.model, fine_tune_after_block=-1,
                                     frozen_batch_norm='batch_stats')
  reference = simclr.build_model(model_config, CLASSES).build_for_size(SIZE)
  for v in reference.variables:
    v.assign(start[v.path])
  return reference


@pytest.mark.parametrize('steps_per_loop', [1, 2])
def test_two_finetune_steps_equal_the_original_update_rule(tmp_path, steps_per_loop):
  images, labels = _fixed_batches()
  config = _config(tmp_path / 'ours')
  start, got = _train_ours(config, steps_per_loop)
  reference = _all_trainable_copy(config, start)
  _reference(reference, images, labels)
  expected = _values(reference)
  _assert_same_steps(start, got, expected)


def _assert_same_steps(start, got, expected, min_moved=0.8):
  assert set(got) == set(expected)
  moved = 0
  for path, want in expected.items():
    change, want_change = got[path] - start[path], want - start[path]
    scale = np.abs(want_change).max()
    moved += scale > 0
    # Float32 forward/backward (sums over <= 8x16x16x128 terms, eager vs traced kernels): the
    # changes agree to ~1e-4 of their size; a wrong rule (lr, trust ratio, exclusion, head init,
    # loop) is off by O(1) of it.
    np.testing.assert_allclose(change, want_change, rtol=0,
                               atol=2e-4 * scale + 1e-6 * np.abs(start[path]).max() + 1e-9,
                               err_msg=path)
  # Encoder kernels, BN parameters and statistics, and the head all moved.
  assert moved > min_moved * len(expected)
  head = [p for p in expected if 'head_supervised' in p]
  assert head and all(np.abs(expected[p] - start[p]).max() > 0 for p in head)


def _original_forward(model, k, frozen_batch_norm):
  """The original's training-mode logits with the stem and block groups 1..k frozen: its frozen
  containers' BN layers stay trainable, so they see training=True (batch_stats); moving_stats
  calls them in inference mode. Gradients are taken only for unfrozen variables, so no
  stop_gradient is needed."""
  encoder, selector = model.encoder, model.projection_head.ft_proj_selector

  def forward(images):
    frozen_training = frozen_batch_norm == 'batch_stats'
    _, x = encoder.stem(images, training=frozen_training if k >= 0 else True)
    for i, group in enumerate(encoder.block_groups, start=1):
      x = group(x, training=frozen_training if i <= k else True)
    _, hiddens = model.projection_head(tf.reduce_mean(x, [1, 2]), training=True)
    return model.supervised_head(hiddens[selector], training=True)
  return forward


def _frozen_path(path, k):
  parts = ['model/resnet/stem/'] + [f'model/resnet/block_group{i}/' for i in range(1, k + 1)]
  return path.startswith(tuple(parts))


@pytest.mark.parametrize('k,frozen_batch_norm', [(4, 'batch_stats'), (2, 'batch_stats'),
                                                 (4, 'moving_stats')])
def test_two_linear_eval_steps_equal_the_original_update_rule(tmp_path, k, frozen_batch_norm):
  """--fine_tune_after_block=k: the steps, the frozen layers' BN statistics included, equal the
  original's (batch_stats) or the inference-mode reference (moving_stats, statistics fixed)."""
  images, labels = _fixed_batches()
  config = _config(tmp_path / 'ours', fine_tune_after_block=k,
                   frozen_batch_norm=frozen_batch_norm)
  start, got = _train_ours(config, steps_per_loop=STEPS)
  reference = _all_trainable_copy(config, start)
  unfrozen = [v for v in reference.trainable_variables if not _frozen_path(v.path, k)]
  _reference(reference, images, labels, unfrozen, _original_forward(reference, k,
                                                                    frozen_batch_norm))
  expected = _values(reference)
  _assert_same_steps(start, got, expected, min_moved=0.0)
  frozen = [p for p in expected if _frozen_path(p, k)]
  statistics = [p for p in frozen if p.endswith(('moving_mean', 'moving_variance'))]
  assert statistics and len(statistics) < len(frozen)
  for path in frozen:
    moved = not np.array_equal(got[path], start[path])
    assert moved == (path in statistics and frozen_batch_norm == 'batch_stats'), path


LARGE_NUM = 1e9  # The original's mask for an example's similarity with itself.


def _original_contrastive_loss(hidden, temperature):
  """objective.add_contrastive_loss of the original, one replica, written out in plain TF."""
  hidden = tf.math.l2_normalize(hidden, -1)
  h1, h2 = tf.split(hidden, 2, 0)
  n = tf.shape(h1)[0]
  labels, masks = tf.one_hot(tf.range(n), n * 2), tf.one_hot(tf.range(n), n)
  aa = tf.matmul(h1, h1, transpose_b=True) / temperature - masks * LARGE_NUM
  bb = tf.matmul(h2, h2, transpose_b=True) / temperature - masks * LARGE_NUM
  ab = tf.matmul(h1, h2, transpose_b=True) / temperature
  ba = tf.matmul(h2, h1, transpose_b=True) / temperature
  loss_a = tf.nn.softmax_cross_entropy_with_logits(labels, tf.concat([ab, aa], 1))
  loss_b = tf.nn.softmax_cross_entropy_with_logits(labels, tf.concat([ba, bb], 1))
  return tf.reduce_mean(loss_a + loss_b)


def test_two_pretraining_steps_equal_the_original_update_rule(tmp_path):
  """Pretraining with linear eval while pretraining: contrastive loss on two views (stacked on
  the channel axis, as the original's pipeline delivers them) plus the online head's
  cross-entropy on both views, through the original's LARS; blur off (it is random)."""
  config = tiny_config(tmp_path / 'ours', model__width_multiplier=0.125, data__use_blur=False,
                       optim__learning_rate=LR, optim__learning_rate_scaling='sqrt',
                       optim__weight_decay=WD, optim__momentum=MOMENTUM,
                       train__train_batch_size=BATCH, train__train_steps=STEPS)
  temperature = config.train.temperature
  images, labels = _fixed_batches()
  second = np.clip(images[..., ::-1, :] * 0.8 + 0.1, 0, 1)  # a fixed second view
  views = np.concatenate([images, second], -1)
  start, got = _train_ours(config, steps_per_loop=1, batches=(views, labels))
  reference = simclr.build_model(config.model, CLASSES).build_for_size(SIZE)
  for v in reference.variables:
    v.assign(start[v.path])

  def loss_fn(x, y):
    outputs = reference(tf.concat([x[..., :3], x[..., 3:]], 0), training=True)
    contrastive = _original_contrastive_loss(outputs[simclr.PROJ_HEAD_OUTPUT], temperature)
    supervised = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(
        tf.concat([y, y], 0), outputs[simclr.LOGITS_SUP]))
    return contrastive + supervised
  _reference(reference, views, labels, loss_fn=loss_fn)
  _assert_same_steps(start, got, _values(reference))


@pytest.mark.parametrize('temperature,scale', [(1.0, 'none'), (0.1, 't_squared')])
def test_two_distillation_steps_equal_the_colab_update_rule(tmp_path, temperature, scale):
  """--train_mode=distill against the authors' colab (add_kd_loss: mean of T^2 x
  H(softmax(teacher/T), softmax(student/T)); T^2 only with t_squared) through the original's
  LARS; the teacher a fixed function of the images, labels unused."""
  base = _config(tmp_path / 'ours')
  config = dataclasses.replace(
      base, train=dataclasses.replace(base.train, train_mode='distill'),
      distill=cfg.DistillConfig(teacher=base.model, teacher_checkpoint=str(tmp_path / 't' / 'c'),
                                temperature=temperature, loss_scale=scale))
  teacher_kernel = tf.constant(np.random.RandomState(2).normal(
      0, 0.05, (SIZE * SIZE * 3, CLASSES)).astype(np.float32))

  def teacher(x):
    return tf.matmul(tf.reshape(x, [-1, SIZE * SIZE * 3]), teacher_kernel)
  # The run checks that --teacher_checkpoint exists; the teacher used is the function above.
  holder = tf.Module()
  holder.encoder = tf.Module()
  holder.encoder.v = tf.Variable(1.0)
  tf.train.Checkpoint(model=holder).write(str(tmp_path / 't' / 'c'))
  start, got = _train_ours(config, steps_per_loop=1, teacher=teacher)
  reference = _all_trainable_copy(config, start)
  factor = temperature ** 2 if scale == 't_squared' else 1.0

  def loss_fn(x, y):
    del y
    probs = tf.nn.softmax(teacher(x) / temperature)
    student = reference(x, training=True)[simclr.LOGITS_SUP]
    return tf.reduce_mean(factor * tf.nn.softmax_cross_entropy_with_logits(
        probs, student / temperature))
  images, labels = _fixed_batches()
  _reference(reference, images, labels, loss_fn=loss_fn)
  _assert_same_steps(start, got, _values(reference))
