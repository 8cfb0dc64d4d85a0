"""One run from a `Config`: data, model, optimizer, checkpoints, training; then evaluation and
export (tf_simclr/evaluation/, export.py) for the modes that ask for them.

This is what `run.py` calls after turning flags into a Config; notebooks can call `run()` too.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Dict, Optional

import tensorflow as tf

from tf_simclr import distribute
from tf_simclr import run_dir
from tf_simclr import precision as precision_lib
from tf_simclr.config import Config, Steps
from tf_simclr.errors import UserError
from tf_simclr.data import datasets, pipeline
from tf_simclr.evaluation import evaluate as evaluate_lib
from tf_simclr.evaluation import probe, reading
from tf_simclr.evaluation import readouts as readouts_lib
from tf_simclr.models import simclr
from tf_simclr.optim import lars, schedule
from tf_simclr.train import loop, tasks
from tf_simclr.train import prepare as prepare_lib
from tf_simclr.weights import state as weights_state

log = logging.getLogger(__name__)

# What every mode starts from (validated before anything is written): see prepare.py.
Context, TRAINING_MODES, prepare = prepare_lib.Context, prepare_lib.TRAINING_MODES, prepare_lib.prepare


def _build_model(config: Config, strategy, num_classes: int):
  with strategy.scope():
    model = simclr.build_model(config.model, num_classes)
    model.build_for_size(config.data.image_size)
  return model


def build_model(ctx: Context):
  """Builds the model under the strategy's scope with all variables created."""
  return _build_model(ctx.config, ctx.strategy, ctx.num_classes)


@dataclasses.dataclass
class Assembly:
  """The objects of one training run, built by `assemble_trainer`."""
  model: object
  optimizer: object
  state: weights_state.TrainState
  task: tasks.Task
  trainer: loop.Trainer


def assemble_trainer(config: Config, strategy, steps: Steps, num_classes: int, model=None,
                     teacher: Optional[Callable] = None, hooks=()) -> Assembly:
  """Model, learning-rate schedule, optimizer (built), TrainState, task and Trainer: the one
  assembly of a training run (`train` and benchmarks/throughput.py). Restores nothing.

  `model`: an already built model to train (else one is built); `hooks`: the Trainer's
  (every_steps, fn(step)) pairs.
  """
  if model is None:
    model = _build_model(config, strategy, num_classes)
  optim, train_config = config.optim, config.train
  learning_rate = schedule.WarmupCosineSchedule(
      base_learning_rate=optim.learning_rate, batch_size=train_config.train_batch_size,
      scaling=optim.learning_rate_scaling, warmup_steps=steps.warmup_steps,
      total_steps=steps.train_steps)
  with strategy.scope():
    optimizer = lars.build_optimizer(optim, learning_rate,
                                     exclude_from_weight_decay=tasks.lars_exclusions(model))
    optimizer = precision_lib.wrap_optimizer(optimizer, config.model.precision)
    optimizer.build(model.trainable_variables)
  model_dir = train_config.model_dir
  save_dir = distribute.write_dir(model_dir, strategy)
  state = weights_state.TrainState(model, optimizer, model_dir, train_config.keep_checkpoint_max,
                                   save_dir=save_dir,
                                   allow_optimizer_change=train_config.allow_flag_changes)
  task = tasks.make_task(config, model, strategy, teacher=teacher)
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


def initialize_weights(config: Config, model, state: weights_state.TrainState) -> str:
  """Checkpoint precedence, then --logits_layer_init; returns how the weights were set.

  `checkpoint` (default) is the original's behaviour: the head --checkpoint holds is kept when
  its shape fits (else the head stays at its N(0, 0.01) init), and --zero_init_logits_layer does
  nothing, as in the original, whose zeroing ran before the variables existed. `zeros` zeroes the
  head after the restore; `random` puts back the head's own seeded initialisation. A resume
  always continues from the saved head.
  """
  train_config = config.train
  task_class = tasks.task_class(config)
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


def train(ctx: Context, teacher: Optional[Callable] = None):
  """Trains to the last step; returns (model, final step, metrics of the last loop)."""
  config = ctx.config
  precision_lib.warn_if_slow_on_cpu(config.model.precision, ctx.strategy)
  model = build_model(ctx)
  readouts_lib.random_init_baseline(ctx, model)  # Before any restore: the seeded initialisation.
  hooks = readouts_lib.knn_hook(ctx, model)
  if ctx.lock is not None:  # Renew the lock's lease at every loop boundary.
    hooks = hooks + [(1, lambda step: ctx.lock.refresh())]
  built = assemble_trainer(config, ctx.strategy, ctx.steps, ctx.num_classes, model=model,
                           teacher=teacher, hooks=hooks)
  task = built.task
  built.state.optimizer_changed = ctx.optimizer_changed
  initialize_weights(config, model, built.state)
  # Every worker restored from its own --model_dir path: they must be at the same step.
  distribute.check_same_step(ctx.strategy, built.state.step, config.train.model_dir)
  if ctx.flags_dict is not None and distribute.is_chief(ctx.strategy):
    # Only now: the flags, the data, the lock and the restore (architecture) have all passed.
    run_dir.write_flags(config.train.model_dir, ctx.flags_dict)
  dataset = pipeline.build_train_dataset(
      ctx.source, config.data, config.train.train_batch_size, ctx.strategy,
      num_views=task.num_views, label_subset=task.train_label_subset(ctx.label_subset),
      with_label_mask=task.uses_label_mask, seed=config.train.seed)
  with datasets.naming_bad_images(ctx.source, config.data.train_split):
    result = built.trainer.train(iter(dataset))
  return model, result


PREEMPTED = loop.TrainingPreemptedError
INTERRUPTED = loop.TrainingInterruptedError  # SIGINT after saving: exit status 130
# Errors a user can cause (flags, files, data, a diverged run): exit 2 with the message alone.
# Anything else, e.g. a TensorFlow tracing error, keeps its traceback.
USER_ERRORS = (UserError,)


def export_hook(config: Config) -> Callable:
  """The default `export_fn(model, step)`: a hub-style SavedModel in model_dir/saved_model/<step>
  (after each evaluation and at the end of training), keeping --keep_hub_module_max."""
  from tf_simclr import export

  def fn(model, step):
    export.export_step(model, config.train.model_dir, step, config.train.keep_hub_module_max)
  return fn


def no_export(model, step) -> None:  # pylint: disable=unused-argument
  """An `export_fn` that exports nothing (tests and benchmarks that do not check exports)."""


def load_teacher(ctx: Context) -> Callable:
  """The frozen distillation teacher of `ctx.config.distill` (images -> logits)."""
  from tf_simclr import teacher as teacher_lib
  distill = ctx.config.distill
  return teacher_lib.load_teacher(distill.teacher, distill.teacher_checkpoint, ctx.num_classes,
                                  ctx.config.data.image_size, ctx.strategy)


def run(config: Config, flags_dict: Optional[Dict] = None,
        export_fn: Optional[Callable] = None) -> Optional[Dict[str, float]]:
  """Runs `config.train.mode`; returns the last eval result when there is one.

  `export_fn(model, step)` is called after each evaluation and at the end of training (default
  `export_hook(config)`; `no_export` skips it).
  """
  ctx = prepare(config, flags_dict)
  try:
    return _run_mode(ctx, export_fn or export_hook(config))
  finally:
    distribute.remove_worker_dirs()  # A non-chief's throw-away checkpoints and summaries.
    if ctx.lock is not None:
      ctx.lock.release()


def _run_mode(ctx: Context, export_fn: Callable) -> Optional[Dict[str, float]]:
  config = ctx.config
  mode = config.train.mode
  if mode == 'probe':
    return evaluate_lib.probe_checkpoint(ctx, build_model(ctx))
  if mode == 'eval':
    return evaluate_lib.follow_and_evaluate(ctx, lambda: build_model(ctx), export_fn,
                                            timeout=config.train.eval_timeout)
  if mode == 'export':
    model = build_model(ctx)
    export_fn(model, reading.load_weights(ctx.config, model))
    return None
  if mode == 'embed':
    from tf_simclr.evaluation import embed  # pylint: disable=g-import-not-at-top
    model = build_model(ctx)
    reading.load_weights(ctx.config, model)
    embed.embed_split(ctx, model)
    return None
  teacher = load_teacher(ctx) if ctx.task_class.needs_teacher else None
  model, result = train(ctx, teacher=teacher)
  if mode == 'train_then_eval':
    stored = evaluate_lib.evaluate(ctx, model, result.final_step, export_fn=export_fn,
                                   linear_probe=readouts_lib.linear_probe_enabled(ctx))
    if stored and probe.has_readouts(stored):
      log.info('%s', probe.format_table(stored))
    return stored
  if distribute.is_chief(ctx.strategy):
    export_fn(model, result.final_step)
  return None
