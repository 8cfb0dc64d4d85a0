"""Learning-rate scaling and the linear-warmup + cosine-decay schedule of the original.

The schedule is called by the Keras optimizer with its iteration count before the update
(0-based), so step 0 of a run with warmup uses learning rate 0, as the original.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

SCALINGS = ('linear', 'sqrt')


def scaled_learning_rate(base_learning_rate: float, batch_size: int, scaling: str) -> float:
  """base * batch / 256 (`linear`) or base * sqrt(batch) (`sqrt`)."""
  if scaling == 'linear':
    return base_learning_rate * batch_size / 256.0
  if scaling == 'sqrt':
    return base_learning_rate * math.sqrt(batch_size)
  raise ValueError(f'learning_rate_scaling={scaling!r} is not one of {list(SCALINGS)}.')


@keras.saving.register_keras_serializable(package='tf_simclr')
class WarmupCosineSchedule(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warmup to the scaled rate over `warmup_steps`, then cosine decay to 0 at `total_steps`.

  For step < warmup_steps the rate is step / warmup_steps * scaled_lr; afterwards it is
  scaled_lr * 0.5 * (1 + cos(pi * (step - warmup_steps) / (total_steps - warmup_steps))),
  held at 0 past total_steps (the original's WarmUpAndCosineDecay).
  """

  def __init__(self, base_learning_rate: float, batch_size: int, scaling: str,
               warmup_steps: int, total_steps: int, name: str = 'WarmupCosineSchedule'):
    super().__init__()
    if warmup_steps < 0 or total_steps < 1:
      raise ValueError(f'WarmupCosineSchedule needs warmup_steps >= 0 and total_steps >= 1; '
                       f'got warmup_steps={warmup_steps}, total_steps={total_steps}.')
    self.base_learning_rate = base_learning_rate
    self.batch_size = batch_size
    self.scaling = scaling
    self.warmup_steps = int(warmup_steps)
    self.total_steps = int(total_steps)
    self.name = name
    self.scaled_lr = scaled_learning_rate(base_learning_rate, batch_size, scaling)

  def __call__(self, step):
    with tf.name_scope(self.name):
      step = tf.cast(tf.convert_to_tensor(step), tf.float32)
      scaled_lr = tf.constant(self.scaled_lr, tf.float32)
      warmup = float(self.warmup_steps)
      # total == warmup never reaches the decay phase in training; avoid dividing by zero.
      decay_steps = float(max(1, self.total_steps - self.warmup_steps))
      progress = tf.clip_by_value((step - warmup) / decay_steps, 0.0, 1.0)
      cosine = scaled_lr * 0.5 * (1.0 + tf.cos(math.pi * progress))
      if self.warmup_steps == 0:
        return cosine
      return tf.where(step < warmup, step / warmup * scaled_lr, cosine)

  def get_config(self):
    return {'base_learning_rate': self.base_learning_rate, 'batch_size': self.batch_size,
            'scaling': self.scaling, 'warmup_steps': self.warmup_steps,
            'total_steps': self.total_steps, 'name': self.name}
