"""Fine-tuning takes the original's steps: two steps through the real assembly (schedule, LARS,
exclusions, FinetuneTask, loop) from fixed weights and fixed batches equal a plain-TF/numpy
reference of google-research/simclr's update rule, whatever the loop size.

The reference shares nothing with the code under test but the model's forward pass: its own
gradient tape over all trainable variables (skipping the ones without a gradient, as the
original's apply_gradients), the original's loss (mean softmax cross-entropy plus the LARS-mode
L2 of the supervised head's kernel), its cosine schedule with sqrt scaling, and its LARS update
with exclusions chosen by name as the original's regexes ('batch_normalization', 'bias',
'head_supervised'), written in numpy. Tiny: ResNet-18 width 0.25, 16 px, batch 8.
"""

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


def _config(model_dir):
  return tiny_config(model_dir, train__train_mode='finetune', model__width_multiplier=0.25,
                     optim__learning_rate=LR, optim__learning_rate_scaling='sqrt',
                     optim__weight_decay=WD, optim__momentum=MOMENTUM,
                     train__train_batch_size=BATCH, train__train_steps=STEPS)


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


def _reference(model, images, labels):
  """The original's fine-tuning steps in plain TF (gradients) and numpy (schedule, LARS)."""
  scaled = LR * math.sqrt(BATCH)
  variables = list(model.trainable_variables)
  velocity = [np.zeros(v.shape, np.float32) for v in variables]
  for t in range(STEPS):
    lr = scaled * 0.5 * (1 + math.cos(math.pi * t / STEPS))  # CosineDecay(scaled, STEPS)(t)
    with tf.GradientTape() as tape:
      logits = model(tf.constant(images[t]), training=True)[simclr.LOGITS_SUP]
      loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels[t], logits))
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


@pytest.mark.parametrize('steps_per_loop', [1, 2])
def test_two_finetune_steps_equal_the_original_update_rule(tmp_path, steps_per_loop):
  images, labels = _fixed_batches()
  config = _config(tmp_path / 'ours')
  ctx = modes.prepare(config)
  steps = cfg.Steps(train_steps=STEPS, epoch_steps=STEPS, warmup_steps=0,
                    checkpoint_steps=STEPS, steps_per_loop=steps_per_loop, eval_steps=1)
  built = assemble.assemble_trainer(config, ctx.strategy, steps, CLASSES)
  model = built.model
  _fixed_weights(model)
  start = _values(model)

  reference = modes.build_model(ctx)
  for v in reference.variables:
    v.assign(start[v.path])
  _reference(reference, images, labels)
  expected = _values(reference)

  dataset = ctx.strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensor_slices((images, labels)))
  try:
    built.trainer.train(iter(dataset))
  finally:
    ctx.lock.release()
  got = _values(model)

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
  assert moved > 0.8 * len(expected)
  head = [p for p in expected if 'head_supervised' in p]
  assert head and all(np.abs(expected[p] - start[p]).max() > 0 for p in head)
