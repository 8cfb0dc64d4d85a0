"""SimCLRModel: ResNet encoder + projection head + optional supervised head.

`call(images, training)` returns a dict of named endpoints (keys below, the original's SavedModel
names); training, evaluation and export all read that dict. `build_model` is the one place that
maps a `ModelConfig` to layers.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import keras
import tensorflow as tf

from tf_simclr import precision as precision_lib
from tf_simclr.config import ModelConfig
from tf_simclr.models import heads
from tf_simclr.models import resnet as resnet_lib

INITIAL_CONV = 'initial_conv'
INITIAL_MAX_POOL = 'initial_max_pool'
BLOCK_GROUP1 = 'block_group1'
BLOCK_GROUP2 = 'block_group2'
BLOCK_GROUP3 = 'block_group3'
BLOCK_GROUP4 = 'block_group4'
BLOCK_GROUPS = (BLOCK_GROUP1, BLOCK_GROUP2, BLOCK_GROUP3, BLOCK_GROUP4)
FINAL_AVG_POOL = 'final_avg_pool'
PROJ_HEAD_INPUT = 'proj_head_input'
PROJ_HEAD_OUTPUT = 'proj_head_output'
LOGITS_SUP = 'logits_sup'
ENCODER_ENDPOINTS = (INITIAL_CONV, INITIAL_MAX_POOL) + BLOCK_GROUPS + (FINAL_AVG_POOL,)


# The supervised head's attribute and checkpoint name (heads a --checkpoint may lack).
SUPERVISED_HEAD = 'supervised_head'


@dataclasses.dataclass(frozen=True)
class VariableGroups:
  """Trainable variables chosen by layer type, for weight-decay / LARS exclusions.

  The groups may overlap: the supervised head's bias is in `bias` and in `supervised_head`.
  """
  batch_norm: List[tf.Variable]  # gamma and beta of every BatchNormalization
  bias: List[tf.Variable]  # bias of every Dense / Conv (SE convs included)
  supervised_head: List[tf.Variable]  # every trainable variable of the supervised head


class SimCLRModel(keras.Model):
  """Encoder + heads; see module docstring."""

  def __init__(self, encoder: keras.layers.Layer, projection_head: heads.ProjectionHead,
               supervised_head: Optional[heads.SupervisedHead] = None,
               supervised_head_stop_gradient: bool = False, name='model', **kwargs):
    super().__init__(name=name, **kwargs)
    self.encoder = encoder
    self.projection_head = projection_head
    self.supervised_head = supervised_head
    self.supervised_head_stop_gradient = supervised_head_stop_gradient

  def call(self, images, training=False):
    """images: (N, H, W, 3) floats in [0, 1]. Returns {endpoint name: tensor}."""
    if len(images.shape) != 4 or images.shape[-1] != 3:
      raise ValueError(f'SimCLRModel expects images of shape (batch, height, width, 3); got '
                       f'{tuple(images.shape)}. Split stacked views onto the batch axis first.')
    outputs = dict(self.encoder(images, training=training, return_endpoints=True))
    # The representation and the projections are float32 under any precision policy (probes,
    # kNN and NT-Xent read them); the block-group endpoints keep the compute dtype.
    features = tf.cast(outputs[FINAL_AVG_POOL], tf.float32)
    outputs[FINAL_AVG_POOL] = features
    proj_output, hiddens = self.projection_head(features, training=training)
    outputs[PROJ_HEAD_INPUT] = features
    outputs[PROJ_HEAD_OUTPUT] = tf.cast(proj_output, tf.float32)
    if self.supervised_head is not None:
      sup_input = self.projection_head.select(hiddens)
      if self.supervised_head_stop_gradient:
        # Linear eval while pretraining: no label information flows back into the encoder.
        sup_input = tf.stop_gradient(sup_input)
      outputs[LOGITS_SUP] = self.supervised_head(sup_input, training=training)
    return outputs

  def build_for_size(self, image_size: int, channels: int = 3):
    """Creates every variable by calling the model on a zero batch (Keras 3 cannot defer)."""
    self(tf.zeros((2, image_size, image_size, channels)), training=False)
    return self

  def variable_groups(self) -> VariableGroups:
    """Trainable BN gamma/beta, Dense/Conv biases and supervised-head variables, by layer type."""
    if not self.variables:
      raise ValueError('SimCLRModel.variable_groups() needs a built model: call '
                       'model.build_for_size(image_size) first.')
    batch_norm, bias = [], []
    for layer in self._flatten_layers(include_self=False, recursive=True):
      if isinstance(layer, keras.layers.BatchNormalization):
        batch_norm.extend(v for v in (layer.gamma, layer.beta) if v is not None and v.trainable)
      elif isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D)):
        if layer.bias is not None and layer.bias.trainable:
          bias.append(layer.bias)
    supervised = (list(self.supervised_head.trainable_variables)
                  if self.supervised_head is not None else [])
    return VariableGroups(batch_norm=batch_norm, bias=bias, supervised_head=supervised)


def build_model(model_config: ModelConfig, num_classes: int,
                name: str = 'model') -> SimCLRModel:
  """Maps a ModelConfig onto an (unbuilt) SimCLRModel; call `build_for_size` before restoring.

  `name` prefixes every variable path (e.g. 'teacher' keeps a distillation teacher's paths apart).
  Every layer takes the dtype policy `model_config.precision` (float32 variables whatever it is);
  the global Keras policy is left as it was.
  """
  with precision_lib.policy_scope(model_config.precision):
    return _build_model(model_config, num_classes, name)


def _build_model(model_config: ModelConfig, num_classes: int, name: str) -> SimCLRModel:
  c = model_config
  encoder = resnet_lib.resnet(
      c.resnet_depth, width_multiplier=c.width_multiplier, cifar_stem=c.cifar_stem,
      sk_ratio=c.sk_ratio, se_ratio=c.se_ratio, batch_norm_decay=c.batch_norm_decay,
      global_bn=c.global_bn, fine_tune_after_block=c.fine_tune_after_block,
      frozen_batch_norm=c.frozen_batch_norm, name='resnet')
  projection_head = heads.ProjectionHead(
      c.proj_head_mode, out_dim=c.proj_out_dim, num_layers=c.num_proj_layers,
      ft_proj_selector=c.ft_proj_selector, batch_norm_decay=c.batch_norm_decay,
      global_bn=c.global_bn, name='projection_head')
  supervised_head = None
  if c.supervised_head:
    if num_classes is None or num_classes < 1:
      raise ValueError(f'build_model: num_classes={num_classes} must be >= 1 when the model has '
                       'a supervised head (check the dataset\'s label count).')
    supervised_head = heads.SupervisedHead(num_classes, name='head_supervised')
  return SimCLRModel(encoder, projection_head, supervised_head,
                     supervised_head_stop_gradient=c.supervised_head_stop_gradient, name=name)
