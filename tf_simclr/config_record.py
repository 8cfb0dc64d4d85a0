"""The flag rules of a run's record (model_dir's flags.json): which flags a reading mode fills from
it or must agree with, how a recorded value is read, what weights without a record imply, and which
flags a resumed training run may not change. Config validation, kept beside config.py (which owns
the single-flag rules) for size; run_dir.py reads and writes the record itself.
"""

from __future__ import annotations

import json
import logging
from typing import Dict, List, Optional, Tuple

import tensorflow as tf

from tf_simclr import run_dir
from tf_simclr.config import ARCHITECTURE_FLAGS, ConfigError, same_value

log = logging.getLogger(__name__)

# ---- The run's record for --mode=eval|export|probe|embed (docs/restarts.md).
# Architecture and head flags: filled from the record when not given; a given value must agree.
RECORD_MUST_AGREE = ARCHITECTURE_FLAGS
# The rest of the model and the data: filled from the record when not given; a given value wins
# (e.g. --dataset=images:OTHER to embed another folder, --eval_split=test).
RECORD_FILLS = ('train_mode', 'lineareval_while_pretraining', 'image_size', 'batch_norm_decay',
                'global_bn', 'precision', 'dataset', 'data_dir', 'train_split', 'eval_split',
                'skip_bad_images', 'color_jitter_impl')
# --mode=preview_augment also shows the run's augmentation unless flags change it.
RECORD_FILLS_PREVIEW = ('color_jitter_strength', 'use_blur')


def recorded_value(name: str, value):
  """A recorded flag value as a reading mode uses it: a distilled student is read as a fine-tuned
  model (same heads), without its teacher."""
  return 'finetune' if (name, value) == ('train_mode', 'distill') else value


def describe_flags(arch: Dict[str, object]) -> Dict[str, object]:
  """The flag values that build the architecture `weights.original.describe` found (unknowns
  left out): the record of weights that come without a run's flags.json (`read_record`)."""
  flags = {n: arch[n] for n in ARCHITECTURE_FLAGS if arch.get(n) is not None}
  if arch.get('proj_head_mode') != 'nonlinear':
    flags.pop('num_proj_layers', None)
  if arch.get('cifar_stem'):
    flags['image_size'] = 32
  flags['train_mode'] = 'pretrain'
  flags['lineareval_while_pretraining'] = bool(arch.get('num_classes'))
  return flags


def read_record(model_dir: Optional[str], checkpoint: Optional[str] = None
                ) -> Tuple[Optional[Dict], str]:
  """(flag values the run recorded, where from) for a mode that reads a run (not training).

  In order: model_dir's flags.json; the flags.json of the run that wrote --checkpoint; the
  architecture read off --checkpoint's variables (`weights.original.describe`, works for ours and
  the original's weights). (None, '') when there is nothing to read.
  """
  if model_dir:
    stored = run_dir.read_flags(model_dir)
    if stored is not None:
      return stored, run_dir.flags_path(model_dir)
  if not checkpoint:
    return None, ''
  path = run_dir.find_flags_json(checkpoint)
  if path:
    with tf.io.gfile.GFile(path) as f:
      return json.load(f), path
  from tf_simclr import weights  # pylint: disable=g-import-not-at-top
  return describe_flags(weights.describe(checkpoint)), f'the variables of {checkpoint}'


def fill_from_record(record: Dict, values: Dict, given, where: str,
                     names=RECORD_MUST_AGREE + RECORD_FILLS) -> Dict:
  """The flag values to use: `values` with every record flag not in `given` taken from `record`.

  `values`: current values of the flags (defaults included); `given`: names set explicitly on
  the command line or a flagfile. Raises ConfigError naming both values when a given
  architecture/head flag contradicts the record.
  """
  out = dict(values)
  wrong = []
  for name in names:
    if name not in record or record[name] is None:
      continue
    if name not in given:
      out[name] = recorded_value(name, record[name])
    elif name in RECORD_MUST_AGREE and not same_value(record[name], values[name]):
      wrong.append(f'--{name}={values[name]!r} here but {record[name]!r} in the run')
  if wrong:
    raise ConfigError(
        f'The flags contradict the run recorded in {where}: ' + '; '.join(wrong) +
        '. Drop these flags (they are read from the record), or use another --model_dir.')
  return out


# Flags a resumed training run must keep (the weights, optimizer state and step were made with
# them): changing one is an error unless --allow_flag_changes. Any other flag (--train_steps /
# --train_epochs, eval, logging, export and checkpoint intervals, paths) may change and is logged.
RESUME_FIXED_FLAGS = (
    'train_mode', 'dataset', 'train_split', 'train_label_fraction', 'label_fraction_seed',
    'train_batch_size', 'optimizer', 'momentum', 'learning_rate', 'learning_rate_scaling',
    'warmup_epochs', 'weight_decay', 'temperature', 'hidden_norm', 'distill_temperature',
    'distill_loss_scale', 'distill_label_weight', 'image_size', 'fine_tune_after_block',
    'frozen_batch_norm', 'lineareval_while_pretraining', 'batch_norm_decay',
    'global_bn') + ARCHITECTURE_FLAGS
HISTORY_KEY = 'history'
# Not compared: the record's own history and the override itself.
_NOT_COMPARED = (HISTORY_KEY, 'allow_flag_changes')


class FlagChangeError(ConfigError):
  """A resumed training run was given other values of flags its checkpoints depend on."""


def check_resume_flags(model_dir: str, stored: Dict, given: Dict, allow_changes: bool,
                       step: int) -> Tuple[Dict, List[str]]:
  """Compares a resumed run's flags with its flags.json (`stored`); the one place that does.

  Logs every differing flag (old -> new). Raises FlagChangeError naming each changed
  RESUME_FIXED_FLAGS entry unless `allow_changes`. Returns (the record to write: `given` plus
  the history of earlier values, each entry {'checkpoint_step': step, 'flags': {name: old}}, the
  names of the changed fixed flags). Flags absent from `stored` (an older record) are skipped.
  """
  changed = {name: (stored[name], value) for name, value in given.items()
             if name not in _NOT_COMPARED and name in stored
             and not same_value(stored[name], value)}
  for name, (old, new) in sorted(changed.items()):
    log.info('Resuming with a changed flag: --%s %r -> %r', name, old, new)
  fixed = [name for name in RESUME_FIXED_FLAGS if name in changed]
  if fixed and not allow_changes:
    listed = ', '.join(f'--{n} {changed[n][0]!r} -> {changed[n][1]!r}' for n in fixed)
    raise FlagChangeError(
        f'--model_dir={model_dir} holds checkpoints (up to step {step}) of a run made with other '
        f'values of flags it cannot change on a resume: {listed} (its {run_dir.FLAGS_FILE} vs this '
        f'command). To start from these weights use --checkpoint={model_dir} with a new '
        '--model_dir; to continue anyway pass --allow_flag_changes; to resume the run, drop '
        'the changed flags.')
  if fixed:
    log.warning('Continuing with changed flags (--allow_flag_changes): %s; %s keeps the earlier '
                'values under "%s".', ', '.join(f'--{n}' for n in fixed), run_dir.FLAGS_FILE,
                HISTORY_KEY)
  record = dict(given)
  history = list(stored.get(HISTORY_KEY) or [])
  if changed:
    history.append({'checkpoint_step': step,
                    'flags': {name: old for name, (old, _) in sorted(changed.items())}})
  if history:
    record[HISTORY_KEY] = history
  return record, fixed
