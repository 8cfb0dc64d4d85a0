"""Projection head (SimCLR's g(.)) and supervised (logits) head.

Behaviour follows google-research/simclr `tf2/model.py`, except that the `none` and `linear`
projection modes work (the original returns the wrong structure for both).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tf_simclr.config import PROJ_HEAD_MODES
from tf_simclr.models.batch_norm import BatchNormalization
from tf_simclr.models.resnet import BATCH_NORM_EPSILON


class LinearLayer(keras.layers.Layer):
  """Dense (N(0, 0.01) init) with optional BN; no ReLU inside.

  The dense layer has a bias only if `use_bias` and not `use_bn`; with BN, `use_bias` decides the
  BN's beta instead. `units=None` means "as wide as the input", resolved when built.
  """

  def __init__(self, units=None, use_bias=True, use_bn=False, batch_norm_decay=0.9,
               global_bn=True, name='linear_layer', **kwargs):
    super().__init__(name=name, **kwargs)
    if units is not None and units < 1:
      raise ValueError(f'LinearLayer {name!r}: units={units} must be >= 1 (or None).')
    self.units = units
    self.use_bias = use_bias
    self.use_bn = use_bn
    self.dense = None
    self.bn = (BatchNormalization(
        momentum=batch_norm_decay, epsilon=BATCH_NORM_EPSILON, center=use_bias, scale=True,
        synchronized=global_bn, dtype=self.dtype_policy, name='bn') if use_bn else None)

  def build(self, input_shape):
    if len(input_shape) != 2 or input_shape[-1] is None:
      raise ValueError(f'LinearLayer {self.name!r} needs (batch, features) inputs with a known '
                       f'feature size; got shape {tuple(input_shape)}.')
    units = self.units if self.units is not None else int(input_shape[-1])
    self.dense = keras.layers.Dense(
        units, use_bias=self.use_bias and not self.use_bn,
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
        dtype=self.dtype_policy, name='dense')  # Built late: pass the policy explicitly.
    self.dense.build(input_shape)
    if self.bn is not None:
      self.bn.build((input_shape[0], units))

  def call(self, inputs, training=False):
    x = self.dense(inputs)
    if self.bn is not None:
      x = self.bn(x, training=training)
    return x


class ProjectionHead(keras.layers.Layer):
  """Maps encoder features to the contrastive space.

  call(features) returns `(proj_head_output, hiddens)`; `hiddens` is the tuple
  (head input, layer-1 output, ...) that `ft_proj_selector` indexes (0 = encoder output).
  - none: output = input.
  - linear: one Dense + BN (no bias/beta).
  - nonlinear: `num_layers` layers; the middle ones keep the input width and use bias-BN + ReLU,
    the last maps to `out_dim` with BN without beta and no ReLU.
  float32 under any mixed-precision policy: it reads the float32 `final_avg_pool` features and
  feeds NT-Xent, and is ~0.2% of a ResNet step's FLOPs, so computing it in 16 bits would only add
  casts of its input, weights, output and their gradients.
  """

  def __init__(self, mode='nonlinear', out_dim=128, num_layers=3, ft_proj_selector=0,
               batch_norm_decay=0.9, global_bn=True, name='projection_head', dtype='float32',
               **kwargs):
    super().__init__(name=name, dtype=dtype, **kwargs)
    if mode not in PROJ_HEAD_MODES:
      raise ValueError(f'ProjectionHead: mode={mode!r} is not one of {list(PROJ_HEAD_MODES)}.')
    common = dict(batch_norm_decay=batch_norm_decay, global_bn=global_bn,
                  dtype=self.dtype_policy)
    if mode == 'none':
      layers = ()
    elif mode == 'linear':
      layers = (LinearLayer(out_dim, use_bias=False, use_bn=True, name='l_0', **common),)
    else:
      if num_layers < 1:
        raise ValueError(f'ProjectionHead: num_layers={num_layers} must be >= 1 in nonlinear '
                         'mode (mode none has no layers).')
      layers = tuple(
          LinearLayer(None, use_bias=True, use_bn=True, name=f'nl_{j}', **common)
          if j < num_layers - 1 else
          LinearLayer(out_dim, use_bias=False, use_bn=True, name=f'nl_{j}', **common)
          for j in range(num_layers))
    n = len(layers) + 1
    if not -n <= ft_proj_selector < n:
      raise ValueError(f'ProjectionHead: ft_proj_selector={ft_proj_selector} is out of range for '
                       f'a {mode} projection head with {n - 1} layer(s): use a value in '
                       f'[{-n}, {n - 1}].')
    self.mode = mode
    self.ft_proj_selector = ft_proj_selector
    self.linear_layers = layers

  def call(self, inputs, training=False):
    hiddens = [inputs]
    for j, layer in enumerate(self.linear_layers):
      x = layer(hiddens[-1], training=training)
      if self.mode == 'nonlinear' and j < len(self.linear_layers) - 1:
        x = tf.nn.relu(x)
      hiddens.append(x)
    return hiddens[-1], tuple(hiddens)

  def select(self, hiddens):
    """The hidden that feeds the supervised head (`ft_proj_selector`)."""
    return hiddens[self.ft_proj_selector]

  def layers_after_selector(self):
    """Layers past the selected hidden: unused by a supervised-only objective."""
    selected = self.ft_proj_selector % (len(self.linear_layers) + 1)
    return self.linear_layers[selected:]


class SupervisedHead(keras.layers.Layer):
  """Logits layer: Dense with bias, no BN; float32 under any mixed-precision policy (its logits
  feed softmaxes, and the linear readout of bfloat16 features loses accuracy)."""

  def __init__(self, num_classes, name='head_supervised', dtype='float32', **kwargs):
    super().__init__(name=name, dtype=dtype, **kwargs)
    if num_classes < 1:
      raise ValueError(f'SupervisedHead: num_classes={num_classes} must be >= 1 (check the '
                       'dataset\'s label count).')
    self.num_classes = num_classes
    self.linear_layer = LinearLayer(num_classes, use_bias=True, use_bn=False,
                                    dtype=self.dtype_policy, name='linear_layer')

  def call(self, inputs, training=False):
    return self.linear_layer(inputs, training=training)
