"""Refuses a training batch whose activations cannot fit in this machine's memory (CPU runs).

The estimate is a lower bound (the main convolutions' outputs of every image of one step, which
the backward pass keeps), so a refused run could never have run; one that passes may still need
more (BN/ReLU outputs, gradients, the input pipeline).
"""

from __future__ import annotations

import os
from typing import Optional

from tf_simclr.config import ConfigError, Config
from tf_simclr.models import resnet

_BYTES = {'float32': 4, 'mixed_bfloat16': 2, 'mixed_float16': 2}


def physical_memory_bytes() -> Optional[int]:
  """This machine's physical memory, or None where sysconf does not tell."""
  try:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError, AttributeError):
    return None


def batch_activation_bytes(config: Config, num_views: int) -> int:
  """Lower bound on the activation memory of one training step (the global batch)."""
  model = config.model
  per_image = resnet.conv_output_elements(model.resnet_depth, model.width_multiplier,
                                          model.cifar_stem, config.data.image_size)
  images = config.train.train_batch_size * num_views
  return per_image * images * _BYTES.get(model.precision, 4)


def check_batch_fits(config: Config, num_views: int, memory: Optional[int] = None) -> None:
  """Raises ConfigError naming the estimate when one batch cannot fit in `memory` (default:
  physical memory). For runs on CPUs only: accelerators have their own memory."""
  memory = physical_memory_bytes() if memory is None else memory
  if not memory:
    return
  need = batch_activation_bytes(config, num_views)
  if need <= memory:
    return
  gib = 2.0 ** 30
  model, train = config.model, config.train
  raise ConfigError(
      f'--image_size={config.data.image_size} is too large for this machine: one training batch '
      f'(--train_batch_size={train.train_batch_size} x {num_views} view(s), ResNet-'
      f'{model.resnet_depth} {model.width_multiplier:g}x, {model.precision}) needs at least '
      f'{need / gib:.3g} GiB of activations, more than its {memory / gib:.3g} GiB of memory. '
      'Lower --image_size or --train_batch_size.')
