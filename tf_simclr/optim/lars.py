"""LARS (You et al., 2017, "Large Batch Training of Convolutional Networks") as a Keras 3 optimizer.

Behaviour follows the original SimCLR `LARSOptimizer`: L2 decay is added to the gradient, then
the step is scaled by the trust ratio eeta * ||w|| / ||g|| (1.0 when either norm is 0), with
classic momentum (learning rate inside the velocity) or the "popular" variant. Exclusions are
lists of variables matched by identity, not name regexes (Keras 3 names are short, `kernel`).

The decay lives in `lars_weight_decay`: the Keras base class's own `weight_decay` stays None, as
the base class would otherwise apply decoupled decay on top and decay every variable twice.
Gradients are summed across replicas by the Keras TF backend before `update_step`.
"""

from __future__ import annotations

from typing import Iterable, Optional

import keras
import tensorflow as tf

from tf_simclr.config import OptimConfig

EETA_DEFAULT = 0.001


@keras.saving.register_keras_serializable(package='tf_simclr')
class LARS(keras.optimizers.Optimizer):
  """Layer-wise Adaptive Rate Scaling with momentum and L2 weight decay."""

  def __init__(self, learning_rate, momentum: float = 0.9, weight_decay: float = 0.0,
               eeta: float = EETA_DEFAULT, classic_momentum: bool = True,
               use_nesterov: bool = False,
               exclude_from_weight_decay: Optional[Iterable] = None,
               exclude_from_layer_adaptation: Optional[Iterable] = None,
               name: str = 'LARS', **kwargs):
    """Args:
      learning_rate: a float or a `LearningRateSchedule` (called with the 0-based iteration).
      momentum: momentum coefficient.
      weight_decay: L2 coefficient added to the gradient (weight_decay * w).
      eeta: trust coefficient of the layer-wise learning rate.
      classic_momentum: learning rate inside the velocity (True), or applied after it.
      use_nesterov: Nesterov momentum.
      exclude_from_weight_decay: variables that get no decay (e.g. batch norm, biases).
      exclude_from_layer_adaptation: variables that get trust ratio 1.0; None (the default)
        means the same variables as `exclude_from_weight_decay`, as the original.
      name: optimizer name.
      **kwargs: other Keras optimizer arguments (clipnorm, ...); not `weight_decay`.
    """
    super().__init__(learning_rate=learning_rate, weight_decay=None, name=name, **kwargs)
    self.momentum = float(momentum)
    self.lars_weight_decay = float(weight_decay)
    self.eeta = float(eeta)
    self.classic_momentum = bool(classic_momentum)
    self.use_nesterov = bool(use_nesterov)
    # None: not given (tf_simclr.SimCLR.compile then sets the model's exclusions).
    self.exclusions_given = exclude_from_weight_decay is not None
    self.set_exclusions(exclude_from_weight_decay, exclude_from_layer_adaptation)

  def set_exclusions(self, exclude_from_weight_decay: Optional[Iterable] = None,
                     exclude_from_layer_adaptation: Optional[Iterable] = None) -> None:
    """Sets the variables that get no decay / no trust ratio (see `__init__`); call before the
    first step is traced."""
    if exclude_from_layer_adaptation is None:
      exclude_from_layer_adaptation = exclude_from_weight_decay
    self._no_decay_keys = self._keys(exclude_from_weight_decay, 'exclude_from_weight_decay')
    self._no_adaptation_keys = self._keys(exclude_from_layer_adaptation,
                                          'exclude_from_layer_adaptation')

  def _keys(self, variables, argument: str) -> frozenset:
    """Identity keys (shared by a mirrored variable and its per-device components)."""
    keys = []
    for v in variables or ():
      if isinstance(v, (str, bytes)):
        raise TypeError(
            f'LARS({argument}=...) takes variables, not name patterns such as {v!r}: Keras 3 '
            'variable names are short and not unique. Pass the variables themselves, e.g. '
            'chosen by layer type.')
      keys.append(self._var_key(v))
    return frozenset(keys)

  def uses_weight_decay(self, variable) -> bool:
    """Whether `variable` is L2-decayed by this optimizer."""
    return bool(self.lars_weight_decay) and self._var_key(variable) not in self._no_decay_keys

  def uses_layer_adaptation(self, variable) -> bool:
    """Whether `variable`'s step is scaled by the trust ratio."""
    return self._var_key(variable) not in self._no_adaptation_keys

  def build(self, var_list):
    """Creates one zero-initialised momentum slot per variable."""
    if self.built:
      return
    super().build(var_list)
    self._momentums = [self.add_variable_from_reference(v, name='momentum') for v in var_list]

  def _trust_ratio(self, w_norm, d_norm):
    # eeta * ||w|| / ||d|| where both norms are > 0 (the division elsewhere is discarded), else 1.
    return tf.where(tf.logical_and(w_norm > 0, d_norm > 0), self.eeta * w_norm / d_norm, 1.0)

  @staticmethod
  def _norm(x):
    """||x||_2 as tf.norm computes it (x * x summed over all elements, square root), without
    its keepdims reshape and squeeze: the same float32 result in 3 ops instead of 4."""
    return tf.sqrt(tf.reduce_sum(tf.square(x)))

  def update_step(self, gradient, variable, learning_rate):
    """Applies one LARS update to `variable` (gradient already summed across replicas)."""
    dtype = variable.dtype
    lr = tf.cast(learning_rate, dtype)
    grad = tf.cast(tf.convert_to_tensor(gradient), dtype)
    param = tf.convert_to_tensor(variable)
    velocity = self._momentums[self._get_variable_index(variable)]
    momentum = tf.cast(self.momentum, dtype)
    adapt = self.uses_layer_adaptation(variable)

    if self.uses_weight_decay(variable):
      grad += tf.cast(self.lars_weight_decay, dtype) * param

    if self.classic_momentum:
      scaled_lr = lr
      if adapt:
        scaled_lr = lr * self._trust_ratio(self._norm(param), self._norm(grad))
      next_v = momentum * velocity + scaled_lr * grad
      update = momentum * next_v + scaled_lr * grad if self.use_nesterov else next_v
      next_param = param - update
    else:
      next_v = momentum * velocity + grad
      update = momentum * next_v + grad if self.use_nesterov else next_v
      scaled_lr = lr
      if adapt:
        scaled_lr = lr * self._trust_ratio(self._norm(param), self._norm(update))
      next_param = param - scaled_lr * update

    self.assign(variable, next_param)
    self.assign(velocity, next_v)

  def get_config(self):
    """Hyperparameters (the exclusion lists are variables and are not serialised)."""
    config = super().get_config()
    config.update({
        'momentum': self.momentum,
        'weight_decay': self.lars_weight_decay,
        'eeta': self.eeta,
        'classic_momentum': self.classic_momentum,
        'use_nesterov': self.use_nesterov,
    })
    return config


def build_optimizer(optim_config: OptimConfig, learning_rate, exclude_from_weight_decay=None):
  """The optimizer named by `--optimizer`, as the original's build_optimizer.

  Only LARS decays weights itself; with momentum/adam the L2 penalty belongs in the loss
  (`losses.l2_weight_decay`), as in the original.
  """
  name = optim_config.optimizer
  if name == 'lars':
    return LARS(learning_rate, momentum=optim_config.momentum,
                weight_decay=optim_config.weight_decay,
                exclude_from_weight_decay=exclude_from_weight_decay)
  if name == 'momentum':
    return keras.optimizers.SGD(learning_rate, momentum=float(optim_config.momentum),
                                nesterov=True)
  if name == 'adam':
    return keras.optimizers.Adam(learning_rate)
  raise ValueError(f'build_optimizer: optimizer={name!r} is not one of lars, momentum, adam.')
