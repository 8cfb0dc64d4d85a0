"""What the modes that read a run (--mode=export, --mode=embed) read: which weights, the model
they hold (a supervised head only if they have one, with their classes), and the strict restore.

Export reads model_dir's newest checkpoint, else --checkpoint; embed reads --checkpoint, else
model_dir (as probe). Neither needs the dataset to know the model.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import tensorflow as tf

from tf_simclr.errors import CheckpointNotFoundError, UserError
from tf_simclr.weights import match as weights_match
from tf_simclr.weights import source as weights_source
from tf_simclr.weights import state as weights_state

log = logging.getLogger(__name__)

MODEL_DIR_LEAD = 'Checkpoint {} does not match the model built from the flags'


def weights_path(config) -> Optional[str]:
  """What --mode=export/embed read: model_dir's newest checkpoint, else --checkpoint (export);
  --checkpoint, else model_dir (embed, as probe); None when there is neither."""
  train = config.train
  in_dir = train.model_dir if weights_source.find_checkpoints(train.model_dir) else None
  if train.mode == 'export':
    return in_dir or train.checkpoint
  return train.checkpoint or in_dir


def model_from_weights(config, mode: str):
  """(config, num_classes) of the model the weights to read hold: a supervised head only if they
  have one, with their number of classes (weights.original.describe)."""
  from tf_simclr import weights  # pylint: disable=g-import-not-at-top
  path = weights_path(config)
  if path is None:
    raise CheckpointNotFoundError(
        f'--mode={mode}: no checkpoint in --model_dir={config.train.model_dir} and no '
        '--checkpoint (ours, an export, or google-research/simclr\'s weights).')
  num_classes = 0
  # model_dir: the newest checkpoint whose index and object graph read (the restore then checks
  # the values); none readable: no head, and the restore reports the damage.
  for prefix in ([path] if path != config.train.model_dir
                 else weights_source.find_checkpoints(path)):
    try:
      num_classes = weights.describe(prefix)['num_classes'] or 0
      break
    except (UserError, ValueError, IndexError, tf.errors.OpError) as e:
      if path != config.train.model_dir:
        raise
      log.warning('Cannot read %s (%s); trying an older checkpoint.', prefix, e)
  model = dataclasses.replace(config.model, supervised_head=num_classes > 0)
  return dataclasses.replace(config, model=model), num_classes


def load_weights(config, model) -> int:
  """--mode=export/embed: restores (strictly) the weights `_weights_path` names; their step."""
  path = weights_path(config)
  model_dir = config.train.model_dir
  if path == model_dir:
    loaded = weights_state.load_newest_intact(model, model_dir, lead=MODEL_DIR_LEAD)
    if loaded is None:
      raise CheckpointNotFoundError(f'--mode={config.train.mode}: no intact checkpoint in '
                                    f'--model_dir={model_dir}.')
    log.info('Read %s (step %d).', loaded[0], loaded[1])
    return loaded[1]
  source = weights_source.resolve(path)
  weights_match.load(model, source)
  step = weights_source.read_step_or_zero(source)
  log.info('Read --checkpoint=%s (%s of %s, step %d).', path, source.kind, source.origin, step)
  return step
