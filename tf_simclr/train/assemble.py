"""Assembling one training run: the model, the schedule, the optimizer, the checkpointed state,
the task and the Trainer; and how the weights start (checkpoint precedence, head init).

Restores nothing by itself; `run/modes.py` (the command line) and benchmarks call it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Optional

import tensorflow as tf

from tf_simclr import distribute
from tf_simclr import precision as precision_lib
from tf_simclr.config import Config, Steps
from tf_simclr.models import simclr
from tf_simclr.optim import decay, lars, schedule
from tf_simclr.train import loop, tasks
from tf_simclr.weights import state as weights_state

log = logging.getLogger(__name__)


def build_model(config: Config, strategy, num_classes: int):
  """The model of `config.model` under the strategy's scope, with all variables created."""
  with strategy.scope():
    model = simclr.build_model(config.model, num_classes)
    model.build_for_size(config.data.image_size)
  return model


@dataclasses.dataclass
class Assembly:
  """The objects of one training run, built by `assemble_trainer`."""
  model: object
  optimizer: object
  state: weights_state.TrainState
  task: tasks.Task
  trainer: loop.Trainer


def assemble_trainer(config: Config, strategy, steps: Steps, num_classes: int, model=None,
                     teacher: Optional[Callable] = None, hooks=(),
                     task_class: Optional[type] = None, optimizer_changed: bool = False
                     ) -> Assembly:
  """Model, learning-rate schedule, optimizer (built), TrainState, task and Trainer: the one
  assembly of a training run (`train` and benchmarks/throughput.py). Restores nothing.

  `model`: an already built model to train (else one is built); `hooks`: the Trainer's
  (every_steps, fn(step)) pairs; `task_class`: the run's Task class (else looked up); `optimizer_changed`: a resume
  with another --optimizer (weights_state.TrainState).
  """
  if model is None:
    model = build_model(config, strategy, num_classes)
  optim, train_config = config.optim, config.train
  learning_rate = schedule.WarmupCosineSchedule(
      base_learning_rate=optim.learning_rate, batch_size=train_config.train_batch_size,
      scaling=optim.learning_rate_scaling, warmup_steps=steps.warmup_steps,
      total_steps=steps.train_steps)
  with strategy.scope():
    optimizer = lars.build_optimizer(optim, learning_rate,
                                     exclude_from_weight_decay=decay.lars_exclusions(model))
    optimizer = precision_lib.wrap_optimizer(optimizer, config.model.precision)
    optimizer.build(model.trainable_variables)
  model_dir = train_config.model_dir
  save_dir = distribute.write_dir(model_dir, strategy)
  state = weights_state.TrainState(model, optimizer, model_dir, train_config.keep_checkpoint_max,
                                   save_dir=save_dir,
                                   allow_optimizer_change=train_config.allow_flag_changes,
                                   optimizer_changed=optimizer_changed)
  task = tasks.make_task(config, model, strategy, teacher=teacher, cls=task_class)
  trainer = loop.Trainer(task, optimizer, state, strategy, steps, train_config.train_batch_size,
                         save_dir, learning_rate_fn=learning_rate,
                         jit_compile=train_config.jit_compile, hooks=hooks)
  return Assembly(model=model, optimizer=optimizer, state=state, task=task, trainer=trainer)


def _set_supervised_head(model, values, what: str) -> None:
  """Assigns `values` (one array per head variable, or None for zeros) to the supervised head."""
  head_vars = model.supervised_head.trainable_variables
  for i, v in enumerate(head_vars):
    v.assign(tf.zeros_like(v) if values is None else values[i])
  log.info('Supervised head (%d variables): %s.', len(head_vars), what)


def initialize_weights(config: Config, model, state: weights_state.TrainState,
                       task_class: type) -> str:
  """Checkpoint precedence, then --logits_layer_init; returns how the weights were set.

  `checkpoint` (default) is the original's behaviour: the head --checkpoint holds is kept when
  its shape fits (else the head stays at its N(0, 0.01) init), and --zero_init_logits_layer does
  nothing, as in the original, whose zeroing ran before the variables existed. `zeros` zeroes the
  head after the restore; `random` puts back the head's own seeded initialisation. A resume
  always continues from the saved head. `task_class`: the run's Task class (fresh_ok, warning).
  """
  train_config = config.train
  head = model.supervised_head
  initial = [v.numpy() for v in head.trainable_variables] if head is not None else None
  # --checkpoint: ours, an export of ours, or weights written by google-research/simclr.
  how = state.restore_or_initialize(train_config.checkpoint, fresh_ok=task_class.fresh_ok)
  if how != 'resumed' and head is not None:
    init = train_config.logits_layer_init
    if init == 'zeros':
      _set_supervised_head(model, None, 'zero-initialised after the restore '
                           '(--logits_layer_init=zeros)')
    elif init == 'random' and how == 'initialized':
      _set_supervised_head(model, initial, 'fresh N(0, 0.01) initialisation')
    elif how == 'initialized':
      log.info('Supervised head: kept as --checkpoint set it (the checkpoint\'s head when its '
               'shape fits, else fresh), as the original%s.',
               '; --zero_init_logits_layer has no effect, as in the original (use '
               '--logits_layer_init=zeros to zero it)' if train_config.zero_init_logits_layer
               else '')
  if how == 'scratch' and task_class.scratch_warning:
    log.warning('%s', task_class.scratch_warning)
  return how
