"""ResNet v1 (post-activation) encoders as used by SimCLR v1/v2.

Behaviour follows google-research/simclr `tf2/resnet.py`: depths 18..200, a width multiplier, a
CIFAR stem (3x3 stride-1 conv, no max-pool), fixed padding for strided convolutions, zero-init
gamma of the last BN in each block, a projection shortcut in the first block of every group,
Selective Kernel convolutions with ResNet-D stem and shortcuts (`sk_ratio`) and Squeeze-Excitation
(`se_ratio`). DropBlock is omitted: the original never enables it.

Frozen parts (`fine_tune_after_block` = k >= 0: the stem and block groups 1..k) train nothing;
with `frozen_batch_norm='batch_stats'` (the original's behaviour: tf_keras BN layers stay trainable
inside its trainable=False block groups) their BN layers normalise with the batch statistics in
training and update their moving averages; with 'moving_stats' they run in inference mode and their
statistics stay fixed.

Differences from the original, on purpose:
- Sub-layers live in tuples or attributes, never lists, so `tf.train.Checkpoint` tracks every
  variable including BN moving statistics (Keras 3 does not checkpoint layers held in a list or
  dict).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tf_simclr.config import FROZEN_BATCH_NORMS
from tf_simclr.models.batch_norm import BatchNormalization

BATCH_NORM_EPSILON = 1e-5
SK_MIN_DIM = 32

# depth -> (uses bottleneck blocks, blocks per group)
_DEPTHS = {
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
    152: (True, (3, 8, 36, 3)),
    200: (True, (3, 24, 36, 3)),
}

ENDPOINT_NAMES = ('initial_conv', 'initial_max_pool', 'block_group1', 'block_group2',
                  'block_group3', 'block_group4', 'final_avg_pool')


def _pad_fixed(inputs, kernel_size):
  """Pads H and W by kernel_size - 1 in total (extra pixel at the end), independent of size."""
  pad_total = kernel_size - 1
  pad_beg = pad_total // 2
  pad_end = pad_total - pad_beg
  return tf.pad(inputs, [[0, 0], [pad_beg, pad_end], [pad_beg, pad_end], [0, 0]])


class Conv2dFixedPadding(keras.layers.Conv2D):
  """Bias-free conv; strided ones pad explicitly then use VALID (the original's convention)."""

  def __init__(self, filters, kernel_size, strides, **kwargs):
    super().__init__(filters=filters, kernel_size=kernel_size, strides=strides,
                     padding='same' if strides == 1 else 'valid', use_bias=False,
                     data_format='channels_last',
                     kernel_initializer=keras.initializers.VarianceScaling(), **kwargs)
    self._fixed_pad = kernel_size if strides > 1 else 0

  def call(self, inputs):
    if self._fixed_pad:
      inputs = _pad_fixed(inputs, self._fixed_pad)
    return super().call(inputs)

  def compute_output_shape(self, input_shape):
    if self._fixed_pad:
      extra = self._fixed_pad - 1
      input_shape = tuple(input_shape[:1]) + tuple(
          None if d is None else d + extra for d in input_shape[1:3]) + tuple(input_shape[3:])
    return super().compute_output_shape(input_shape)


def _batch_norm(decay, global_bn, name, init_zero=False, center=True, scale=True):
  """BatchNormalization as the original's BatchNormRelu (the ReLU is applied by the caller);
  fused, without casts, under a 16-bit compute dtype (models/batch_norm.py)."""
  return BatchNormalization(
      axis=-1, momentum=decay, epsilon=BATCH_NORM_EPSILON, center=center, scale=scale,
      gamma_initializer='zeros' if init_zero else 'ones', synchronized=global_bn, name=name)


def _conv1x1(filters, use_bias, name):
  return keras.layers.Conv2D(filters, kernel_size=1, strides=1, padding='same',
                             use_bias=use_bias, data_format='channels_last',
                             kernel_initializer=keras.initializers.VarianceScaling(), name=name)


class SelectiveKernel(keras.layers.Layer):
  """Selective-kernel conv (arXiv:1903.06586), two 3x3 streams mixed by a learned softmax."""

  def __init__(self, filters, strides, sk_ratio, bn_decay, global_bn, min_dim=SK_MIN_DIM,
               **kwargs):
    super().__init__(**kwargs)
    self.conv = Conv2dFixedPadding(2 * filters, 3, strides, name='conv')
    self.bn = _batch_norm(bn_decay, global_bn, 'bn')
    self.mix_conv0 = _conv1x1(max(int(filters * sk_ratio), min_dim), False, 'mix_conv0')
    self.mix_bn = _batch_norm(bn_decay, global_bn, 'mix_bn')
    self.mix_conv1 = _conv1x1(2 * filters, False, 'mix_conv1')

  def call(self, inputs, training=False):
    x = tf.nn.relu(self.bn(self.conv(inputs), training=training))
    streams = tf.stack(tf.split(x, 2, axis=-1))  # (2, N, H, W, C)
    pooled = tf.reduce_mean(tf.reduce_sum(streams, axis=0), [1, 2], keepdims=True)
    mix = tf.nn.relu(self.mix_bn(self.mix_conv0(pooled), training=training))
    mix = tf.stack(tf.split(self.mix_conv1(mix), 2, axis=-1))
    return tf.reduce_sum(streams * tf.nn.softmax(mix, axis=0), axis=0)


class SqueezeExcitation(keras.layers.Layer):
  """Squeeze-Excitation (arXiv:1709.01507): channel gates from a reduce/expand 1x1 conv pair."""

  def __init__(self, reduce_filters, out_filters, **kwargs):
    super().__init__(**kwargs)
    self.se_reduce = _conv1x1(reduce_filters, True, 'se_reduce')
    self.se_expand = _conv1x1(out_filters, True, 'se_expand')

  def call(self, inputs):
    gates = tf.reduce_mean(inputs, [1, 2], keepdims=True)
    gates = self.se_expand(tf.nn.relu(self.se_reduce(gates)))
    return tf.sigmoid(gates) * inputs


class _Block(keras.layers.Layer):
  """Shared shortcut handling of the basic and bottleneck blocks."""

  def _make_shortcut(self, filters_out, strides, use_projection, sk_ratio, bn_decay, global_bn):
    self._pool_pad = False
    self.shortcut_pool = None
    self.shortcut_conv = None
    self.shortcut_bn = None
    if not use_projection:
      return
    if sk_ratio > 0:  # ResNet-D (arXiv:1812.01187): average-pool, then a stride-1 1x1 conv.
      self._pool_pad = strides > 1
      self.shortcut_pool = keras.layers.AveragePooling2D(
          pool_size=2, strides=strides, padding='same' if strides == 1 else 'valid',
          data_format='channels_last', name='shortcut_pool')
      self.shortcut_conv = Conv2dFixedPadding(filters_out, 1, 1, name='shortcut_conv')
    else:
      self.shortcut_conv = Conv2dFixedPadding(filters_out, 1, strides, name='shortcut_conv')
    self.shortcut_bn = _batch_norm(bn_decay, global_bn, 'shortcut_bn')

  def _shortcut(self, inputs, training):
    if self.shortcut_conv is None:
      return inputs
    x = inputs
    if self.shortcut_pool is not None:
      if self._pool_pad:
        x = _pad_fixed(x, 2)
      x = self.shortcut_pool(x)
    return self.shortcut_bn(self.shortcut_conv(x), training=training)


class BasicBlock(_Block):
  """Two 3x3 convs (ResNet-18/34); SE, if any, after the conv stack."""

  def __init__(self, filters, strides, use_projection, sk_ratio, se_ratio, bn_decay, global_bn,
               **kwargs):
    super().__init__(**kwargs)
    self._make_shortcut(filters, strides, use_projection, sk_ratio, bn_decay, global_bn)
    self.conv1 = Conv2dFixedPadding(filters, 3, strides, name='conv1')
    self.bn1 = _batch_norm(bn_decay, global_bn, 'bn1')
    self.conv2 = Conv2dFixedPadding(filters, 3, 1, name='conv2')
    self.bn2 = _batch_norm(bn_decay, global_bn, 'bn2', init_zero=True)
    self.se = (SqueezeExcitation(max(1, int(filters * se_ratio)), filters, name='se')
               if se_ratio > 0 else None)

  def call(self, inputs, training=False):
    shortcut = self._shortcut(inputs, training)
    x = tf.nn.relu(self.bn1(self.conv1(inputs), training=training))
    x = self.bn2(self.conv2(x), training=training)
    if self.se is not None:
      x = self.se(x)
    return tf.nn.relu(x + shortcut)


class BottleneckBlock(_Block):
  """1x1 -> 3x3 (or SK) -> 1x1 with 4x expansion (ResNet-50 and deeper)."""

  def __init__(self, filters, strides, use_projection, sk_ratio, se_ratio, bn_decay, global_bn,
               **kwargs):
    super().__init__(**kwargs)
    self._make_shortcut(4 * filters, strides, use_projection, sk_ratio, bn_decay, global_bn)
    self.conv1 = Conv2dFixedPadding(filters, 1, 1, name='conv1')
    self.bn1 = _batch_norm(bn_decay, global_bn, 'bn1')
    if sk_ratio > 0:
      self.sk_conv = SelectiveKernel(filters, strides, sk_ratio, bn_decay, global_bn,
                                     name='sk_conv')
      self.conv2 = self.bn2 = None
    else:
      self.sk_conv = None
      self.conv2 = Conv2dFixedPadding(filters, 3, strides, name='conv2')
      self.bn2 = _batch_norm(bn_decay, global_bn, 'bn2')
    self.conv3 = Conv2dFixedPadding(4 * filters, 1, 1, name='conv3')
    self.bn3 = _batch_norm(bn_decay, global_bn, 'bn3', init_zero=True)
    # As the original: the SE reduce width comes from `filters`, not 4 * filters.
    self.se = (SqueezeExcitation(max(1, int(filters * se_ratio)), 4 * filters, name='se')
               if se_ratio > 0 else None)

  def call(self, inputs, training=False):
    shortcut = self._shortcut(inputs, training)
    x = tf.nn.relu(self.bn1(self.conv1(inputs), training=training))
    if self.sk_conv is not None:
      x = self.sk_conv(x, training=training)
    else:
      x = tf.nn.relu(self.bn2(self.conv2(x), training=training))
    x = self.bn3(self.conv3(x), training=training)
    if self.se is not None:
      x = self.se(x)
    return tf.nn.relu(x + shortcut)


class BlockGroup(keras.layers.Layer):
  """`num_blocks` blocks; the first projects the shortcut and carries the stride."""

  def __init__(self, block_cls, filters, num_blocks, strides, name, **block_kwargs):
    super().__init__(name=name)
    self.blocks = tuple(
        block_cls(filters, strides if i == 0 else 1, use_projection=(i == 0),
                  name=f'block{i + 1}', **block_kwargs) for i in range(num_blocks))

  def call(self, inputs, training=False):
    for block in self.blocks:
      inputs = block(inputs, training=training)
    return inputs


class Stem(keras.layers.Layer):
  """CIFAR (3x3/1 conv), ImageNet (7x7/2 conv + max-pool) or ResNet-D (three 3x3) stem."""

  def __init__(self, width, cifar_stem, sk_ratio, bn_decay, global_bn, **kwargs):
    super().__init__(**kwargs)
    if cifar_stem:
      convs = (Conv2dFixedPadding(width, 3, 1, name='conv1'),)
    elif sk_ratio > 0:  # ResNet-D stem (arXiv:1812.01187).
      convs = (Conv2dFixedPadding(width // 2, 3, 2, name='conv1'),
               Conv2dFixedPadding(width // 2, 3, 1, name='conv2'),
               Conv2dFixedPadding(width, 3, 1, name='conv3'))
    else:
      convs = (Conv2dFixedPadding(width, 7, 2, name='conv1'),)
    self.convs = convs
    self.bns = tuple(_batch_norm(bn_decay, global_bn, f'bn{i + 1}') for i in range(len(convs)))
    self.max_pool = (None if cifar_stem else
                     keras.layers.MaxPooling2D(pool_size=3, strides=2, padding='same',
                                               data_format='channels_last', name='max_pool'))

  def call(self, inputs, training=False):
    """Returns (initial_conv, initial_max_pool)."""
    x = inputs
    for conv, bn in zip(self.convs[:-1], self.bns[:-1]):
      x = tf.nn.relu(bn(conv(x), training=training))
    initial_conv = self.convs[-1](x)
    x = tf.nn.relu(self.bns[-1](initial_conv, training=training))
    if self.max_pool is not None:
      x = self.max_pool(x)
    return initial_conv, x


class ResNet(keras.layers.Layer):
  """Images (N, H, W, 3) -> pooled representation (N, C), or all endpoints on request."""

  def __init__(self, depth, width_multiplier=1, cifar_stem=False, sk_ratio=0.0, se_ratio=0.0,
               batch_norm_decay=0.9, global_bn=True, fine_tune_after_block=-1,
               frozen_batch_norm='batch_stats', name='resnet', **kwargs):
    super().__init__(name=name, **kwargs)
    if depth not in _DEPTHS:
      raise ValueError(f'ResNet: resnet_depth={depth} is not one of {sorted(_DEPTHS)}.')
    if not isinstance(width_multiplier, (int, float)) or width_multiplier <= 0:
      raise ValueError(f'ResNet: width_multiplier={width_multiplier} must be a positive number.')
    if not -1 <= fine_tune_after_block <= 4:
      raise ValueError(f'ResNet: fine_tune_after_block={fine_tune_after_block} must be in -1..4.')
    if frozen_batch_norm not in FROZEN_BATCH_NORMS:
      raise ValueError(f'ResNet: frozen_batch_norm={frozen_batch_norm!r} is not one of '
                       f'{list(FROZEN_BATCH_NORMS)}.')
    bottleneck, group_sizes = _DEPTHS[depth]
    self.frozen_batch_norm = frozen_batch_norm
    self.depth = depth
    self.width_multiplier = width_multiplier
    self.fine_tune_after_block = fine_tune_after_block
    common = dict(bn_decay=batch_norm_decay, global_bn=global_bn)
    self.stem = Stem(scaled_width(64, width_multiplier), cifar_stem, sk_ratio, name='stem',
                     **common)
    block_cls = BottleneckBlock if bottleneck else BasicBlock
    self.block_groups = tuple(
        BlockGroup(block_cls, scaled_width(base, width_multiplier), n, 1 if i == 0 else 2,
                   sk_ratio=sk_ratio, se_ratio=se_ratio, name=f'block_group{i + 1}', **common)
        for i, (base, n) in enumerate(zip((64, 128, 256, 512), group_sizes)))
    # Freeze the stem (part 0) and block groups 1..k (parts 1..k).
    for part in self._parts()[:fine_tune_after_block + 1]:
      part.trainable = False
      for layer in part._flatten_layers():  # pylint: disable=protected-access
        if isinstance(layer, BatchNormalization):
          layer.batch_stats_when_frozen = frozen_batch_norm == 'batch_stats'

  def _parts(self):
    return (self.stem,) + self.block_groups

  def _frozen(self, index):
    return index <= self.fine_tune_after_block

  def _part_training(self, index, training):
    """`training` for a trained part or batch-statistics frozen one, else False."""
    if self._frozen(index) and self.frozen_batch_norm == 'moving_stats':
      return False
    return training

  def call(self, inputs, training=False, return_endpoints=False):
    frozen = self._frozen(0)
    initial_conv, x = self.stem(inputs, training=self._part_training(0, training))
    if frozen:
      x = tf.stop_gradient(x)
    endpoints = {'initial_conv': initial_conv, 'initial_max_pool': x}
    for i, group in enumerate(self.block_groups, start=1):
      frozen = self._frozen(i)
      x = group(x, training=self._part_training(i, training))
      if frozen:
        x = tf.stop_gradient(x)
      endpoints[group.name] = x
    # Averaged in float32 under mixed precision: the representation that probes and heads read.
    endpoints['final_avg_pool'] = tf.reduce_mean(tf.cast(x, tf.float32), [1, 2])
    return endpoints if return_endpoints else endpoints['final_avg_pool']


def scaled_width(base: int, width_multiplier) -> int:
  """Channels of a layer: base * multiplier, exact for the papers' integer multipliers."""
  return max(1, int(round(base * width_multiplier)))


def resnet(depth, width_multiplier=1, cifar_stem=False, sk_ratio=0.0, se_ratio=0.0,
           batch_norm_decay=0.9, global_bn=True, fine_tune_after_block=-1,
           frozen_batch_norm='batch_stats', name='resnet'):
  """Returns a ResNet v1 encoder layer; see `ResNet`.

  `fine_tune_after_block` = k >= 0 freezes the stem and block groups 1..k (4 = linear eval):
  those parts are not trainable and pass on stop_gradient outputs; `frozen_batch_norm` says
  whether their BN layers use batch statistics in training ('batch_stats', the original) or run
  in inference mode ('moving_stats').
  """
  return ResNet(depth, width_multiplier=width_multiplier, cifar_stem=cifar_stem,
                sk_ratio=sk_ratio, se_ratio=se_ratio, batch_norm_decay=batch_norm_decay,
                global_bn=global_bn, fine_tune_after_block=fine_tune_after_block,
                frozen_batch_norm=frozen_batch_norm, name=name)


def conv_output_elements(depth: int, width_multiplier, cifar_stem: bool, image_size: int) -> int:
  """Elements of the main convolutions' outputs for one image: a lower bound on the activations a
  training step keeps for its backward pass (BN and ReLU outputs, SK/SE extras come on top)."""
  bottleneck, group_sizes = _DEPTHS[depth]
  half = lambda size: -(-size // 2)  # stride 2 with fixed or 'same' padding: ceil(size / 2)
  stem_width = scaled_width(64, width_multiplier)
  if cifar_stem:
    size, total = image_size, image_size ** 2 * stem_width
  else:
    conv = half(image_size)
    size = half(conv)  # the max-pool
    total = conv ** 2 * stem_width
  for i, (base, blocks) in enumerate(zip((64, 128, 256, 512), group_sizes)):
    filters = scaled_width(base, width_multiplier)
    for b in range(blocks):
      before, size = size, (half(size) if i > 0 and b == 0 else size)
      if bottleneck:  # 1x1 at the input size, strided 3x3, 1x1 to 4x; projection shortcut
        total += before ** 2 * filters + size ** 2 * (filters + 4 * filters * (2 if b == 0 else 1))
      else:  # strided 3x3, 3x3; projection shortcut
        total += size ** 2 * filters * (3 if b == 0 else 2)
  return total
