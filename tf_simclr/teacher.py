"""The distillation teacher: its architecture, and a frozen callable that returns its logits.

The teacher's architecture comes from, in order: explicit `--teacher_*` flags, the `flags.json`
written next to the teacher's checkpoint by its own training run, and the student's settings.
"""

from __future__ import annotations

import json
import logging
from typing import Callable, Dict, Optional

import tensorflow as tf

from tf_simclr import config
from tf_simclr import run_dir
from tf_simclr.config import ModelConfig

log = logging.getLogger(__name__)

def teacher_model_config(student: ModelConfig, teacher_checkpoint: Optional[str],
                         overrides: Dict[str, object]) -> ModelConfig:
  """The teacher's ModelConfig: overrides, else its flags.json, else the student's values."""
  values = {}
  flags_path = run_dir.find_flags_json(teacher_checkpoint)
  if flags_path:
    with tf.io.gfile.GFile(flags_path) as f:
      saved = json.load(f)
    values.update({k: saved[k] for k in config.ARCHITECTURE_FLAGS if k in saved})
    log.info('Teacher architecture read from %s', flags_path)
  values.update(overrides)
  return config.teacher_model_config(student, **values)


def load_teacher(teacher_config: ModelConfig, checkpoint: str, num_classes: int,
                 image_size: int, strategy: tf.distribute.Strategy
                 ) -> Callable[[tf.Tensor], tf.Tensor]:
  """A callable images -> teacher logits, in inference mode, with no trainable variables."""
  from tf_simclr import export
  from tf_simclr.models import simclr
  from tf_simclr.weights import match, source
  if source.is_saved_model(checkpoint):
    with strategy.scope():
      module = export.load(checkpoint)
    log.info('Teacher: exported SavedModel %s', checkpoint)
    return lambda images: module(images, trainable=False)[simclr.LOGITS_SUP]
  found = source.resolve(checkpoint, flag='teacher_checkpoint')  # Before building anything.
  with strategy.scope():
    model = simclr.build_model(teacher_config, num_classes)
    model.build_for_size(image_size)
  match.load(model, found, lead=(
      f'--teacher_checkpoint={checkpoint} does not match the teacher built from the --teacher_* '
      'flags (else its flags.json, else the student\'s)'))
  model.trainable = False
  log.info('Teacher: ResNet-%d %gx (sk %.4g, %s) from %s', teacher_config.resnet_depth,
           teacher_config.width_multiplier, teacher_config.sk_ratio, teacher_config.precision,
           checkpoint)

  def teacher_fn(images):
    return model(images, training=False)[simclr.LOGITS_SUP]
  teacher_fn.model = model  # For inspection (tests, tools); the callable is what training uses.
  return teacher_fn
