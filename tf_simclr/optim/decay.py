"""Which variables are weight-decayed and which LARS leaves alone, as the original decides.

One owner for both rules (training and evaluation read them); chosen by the model's variable
groups (layer types), never by variable names.
"""

from __future__ import annotations

from typing import List

import tensorflow as tf


def weight_decay_variables(model, optimizer_name: str) -> List[tf.Variable]:
  """Variables whose L2 penalty is added to the loss, as the original's add_weight_decay.

  With LARS the optimizer decays the encoder and projection head itself, so only the supervised
  head's kernels (not biases) are penalised in the loss. With momentum/adam every trainable
  variable except batch-norm parameters is.
  """
  groups = model.variable_groups()
  trainable = {id(v) for v in model.trainable_variables}
  if optimizer_name == 'lars':
    biases = {id(v) for v in groups.bias}
    return [v for v in groups.supervised_head if id(v) not in biases and id(v) in trainable]
  excluded = {id(v) for v in groups.batch_norm}
  return [v for v in model.trainable_variables if id(v) not in excluded]


def lars_exclusions(model) -> List[tf.Variable]:
  """Variables LARS neither decays nor adapts: batch norm, biases and the supervised head."""
  groups = model.variable_groups()
  seen, out = set(), []
  for v in list(groups.batch_norm) + list(groups.bias) + list(groups.supervised_head):
    if id(v) not in seen:
      seen.add(id(v))
      out.append(v)
  return out
