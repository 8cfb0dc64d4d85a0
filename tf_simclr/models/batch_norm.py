"""Batch normalization that stays in the compute dtype under mixed precision.

Keras 3's BatchNormalization upcasts a bfloat16/float16 input to float32, normalizes, and casts
the result back: two full-size activation casts per layer forward, two more in the gradient, plus
a dozen elementwise float32 ops. Under a 16-bit compute dtype this layer runs TensorFlow's fused
kernel instead (FusedBatchNormV3 / FusedBatchNormGradV3, as tf_keras and the original did), which
reads and writes the 16-bit activations and accumulates the statistics, scale and offset in
float32 inside the kernel: no casts, the same float32 statistics.

float32 models take Keras' own path unchanged (bit for bit), as do synchronized layers over
several replicas (the fused kernel cannot all-reduce its statistics), masks and renorm.

`batch_stats_when_frozen`: a frozen layer (trainable=False, e.g. under --fine_tune_after_block)
called with training=True normalises with the batch statistics and updates its moving averages,
as a tf_keras BatchNormalization inside the original's trainable=False block groups did (the
container was frozen, the BN layer itself stayed trainable). Its gamma and beta do not train.
"""

from __future__ import annotations

import keras
from keras import ops
import tensorflow as tf

FUSED_DTYPES = (tf.bfloat16, tf.float16)


def _num_replicas() -> int:
  context = tf.distribute.get_replica_context()
  if context is not None:
    return context.num_replicas_in_sync
  return tf.distribute.get_strategy().num_replicas_in_sync


class BatchNormalization(keras.layers.BatchNormalization):
  """keras.layers.BatchNormalization with a fused kernel for 16-bit inputs (module docstring).

  Moving statistics follow Keras: an exponential average of the batch mean and of the biased
  batch variance (the fused kernel returns the unbiased one; it is rescaled by (n - 1) / n).
  """

  # Set by the encoder on the BN layers of its frozen parts (module docstring).
  batch_stats_when_frozen = False

  def uses_batch_statistics(self, training) -> bool:
    """Whether a call with `training` normalises with (and averages) the batch statistics."""
    return bool(training) and (self.trainable or self.batch_stats_when_frozen)

  def uses_fused_kernel(self, inputs, mask=None) -> bool:
    """Whether `call` runs the fused kernel for `inputs` (else Keras' float32 path)."""
    rank = len(inputs.shape)
    axis = self.axis[0] if isinstance(self.axis, (list, tuple)) else self.axis
    return (inputs.dtype in FUSED_DTYPES and mask is None and not self.renorm
            and rank in (2, 4) and axis in (-1, rank - 1)
            and not (self.synchronized and _num_replicas() > 1))

  def call(self, inputs, training=None, mask=None):
    if not self.uses_fused_kernel(inputs, mask):
      if not self.trainable and self.uses_batch_statistics(training):
        return self._frozen_batch_statistics_call(inputs, mask)
      return super().call(inputs, training=training, mask=mask)
    channels = inputs.shape[-1]
    x = inputs if len(inputs.shape) == 4 else tf.reshape(inputs, [-1, 1, 1, channels])
    gamma = self.gamma if self.scale else tf.ones([channels], tf.float32)
    beta = self.beta if self.center else tf.zeros([channels], tf.float32)
    if self.uses_batch_statistics(training):
      y, mean, unbiased = tf.compat.v1.nn.fused_batch_norm(
          x, gamma, beta, epsilon=self.epsilon, data_format='NHWC', is_training=True)
      count = x.shape[0] * x.shape[1] * x.shape[2] if x.shape[0] is not None else None
      if count is None:
        count = tf.cast(tf.reduce_prod(tf.shape(x)[:3]), tf.float32)
        variance = tf.where(count > 1, unbiased * ((count - 1) / count), 0.0)
      else:
        variance = unbiased * ((count - 1) / count) if count > 1 else tf.zeros_like(unbiased)
      momentum = self.momentum
      self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
      self.moving_variance.assign(
          self.moving_variance * momentum + variance * (1.0 - momentum))
    else:
      y, _, _ = tf.compat.v1.nn.fused_batch_norm(
          x, gamma, beta, mean=self.moving_mean, variance=self.moving_variance,
          epsilon=self.epsilon, data_format='NHWC', is_training=False)
    return y if len(inputs.shape) == 4 else tf.reshape(y, tf.shape(inputs))

  def _frozen_batch_statistics_call(self, inputs, mask):
    """Keras' training branch for a frozen layer (Keras runs a trainable=False layer in
    inference mode): batch moments (all-reduced when synchronized), moving-average update."""
    if self.renorm:
      raise ValueError(f'BatchNormalization {self.name!r}: batch_stats_when_frozen does not '
                       'support renorm.')
    x = ops.cast(inputs, keras.backend.result_type(inputs.dtype, 'float32'))
    mean, variance = self._moments(x, mask)
    momentum = self.momentum
    self.moving_mean.assign(
        ops.cast(self.moving_mean, x.dtype) * momentum + mean * (1.0 - momentum))
    self.moving_variance.assign(
        ops.cast(self.moving_variance, x.dtype) * momentum + variance * (1.0 - momentum))
    outputs = ops.batch_normalization(
        x=x, mean=mean, variance=variance, axis=self.axis,
        offset=ops.cast(self.beta, x.dtype) if self.center else None,
        scale=ops.cast(self.gamma, x.dtype) if self.scale else None, epsilon=self.epsilon)
    return ops.cast(outputs, self.compute_dtype)
