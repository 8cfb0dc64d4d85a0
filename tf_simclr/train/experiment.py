"""One run from a `Config`: data, model, optimizer, checkpoints, training, evaluation, export.

This is what `run.py` calls after turning flags into a Config; notebooks can call `run()` too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Callable, Dict, Optional

import keras
import tensorflow as tf

from tf_simclr import checkpoints
from tf_simclr import distribute
from tf_simclr import precision as precision_lib
from tf_simclr.config import Config, Steps, resolve_steps
from tf_simclr.data import datasets, pipeline
from tf_simclr.models import simclr
from tf_simclr.optim import lars, schedule
from tf_simclr.train import evaluate as evaluate_lib
from tf_simclr.train import loop, tasks

log = logging.getLogger(__name__)

SUPERVISED_HEAD = 'supervised_head'


@dataclasses.dataclass
class Context:
  """What every mode needs: the strategy, the data source, the step counts, the model."""
  config: Config
  strategy: tf.distribute.Strategy
  source: 'datasets.DatasetSource'
  steps: Steps
  num_classes: int
  label_subset: Optional[object] = None


def _write_json(path: str, payload) -> None:
  with tf.io.gfile.GFile(path, 'w') as f:
    json.dump(payload, f, indent=2, sort_keys=True)


def prepare(config: Config, flags_dict: Optional[Dict] = None) -> Context:
  """Validates data and settings before any expensive work; writes flags.json."""
  train = config.train
  # First: MultiWorkerMirroredStrategy must exist before any other TensorFlow op runs.
  strategy = distribute.make_strategy(config.distribute)
  tf.io.gfile.makedirs(train.model_dir)
  if flags_dict is not None and distribute.is_chief(strategy):
    _write_json(os.path.join(train.model_dir, 'flags.json'), flags_dict)
  if train.seed is not None:
    keras.utils.set_random_seed(train.seed)
  data = config.data
  source = datasets.resolve_from_config(data)
  needs_train = train.mode in ('train', 'train_then_eval')
  num_train = source.num_examples(data.train_split)
  label_subset = None
  if data.train_label_fraction < 1.0 and needs_train:
    label_subset = datasets.label_subset_for(source, data.train_split,
                                             data.train_label_fraction, data.label_fraction_seed)
    if train.train_mode != 'distill':
      num_train = len(label_subset)
    if distribute.is_chief(strategy):
      path = datasets.write_label_subset(
          train.model_dir, dataset=data.dataset, split=data.train_split,
          fraction=data.train_label_fraction, seed=data.label_fraction_seed, indices=label_subset)
      log.info('Label fraction %.4g of %s: %d labelled examples (ids in %s).',
               data.train_label_fraction, data.train_split, len(label_subset), path)
  num_eval = source.num_examples(data.eval_split)
  steps = resolve_steps(train, config.optim, num_train, num_eval)
  replicas = strategy.num_replicas_in_sync
  for flag, batch in (('train_batch_size', train.train_batch_size),
                      ('eval_batch_size', train.eval_batch_size)):
    if batch % replicas:
      raise ValueError(f'--{flag}={batch} is not divisible by the {replicas} replicas; use a '
                       f'multiple of {replicas}.')
  log.info('Dataset %s: %d train examples (%s), %d eval examples (%s), %d classes.',
           config.data.dataset, num_train, config.data.train_split, num_eval,
           config.data.eval_split, source.num_classes)
  if needs_train:
    log.info('Steps: %d train (%d per epoch, %d warmup), checkpoint every %d, %d per loop; '
             '%d eval steps.', steps.train_steps, steps.epoch_steps, steps.warmup_steps,
             steps.checkpoint_steps, steps.steps_per_loop, steps.eval_steps)
  return Context(config=config, strategy=strategy, source=source, steps=steps,
                 num_classes=source.num_classes, label_subset=label_subset)


def build_model(ctx: Context, model_config=None):
  """Builds the model under the strategy's scope with all variables created."""
  with ctx.strategy.scope():
    model = simclr.build_model(model_config or ctx.config.model, ctx.num_classes)
    model.build_for_size(ctx.config.data.image_size)
  return model


def make_learning_rate(ctx: Context):
  optim, train = ctx.config.optim, ctx.config.train
  return schedule.WarmupCosineSchedule(
      base_learning_rate=optim.learning_rate, batch_size=train.train_batch_size,
      scaling=optim.learning_rate_scaling, warmup_steps=ctx.steps.warmup_steps,
      total_steps=ctx.steps.train_steps)


def _zero_supervised_head(model) -> None:
  """--zero_init_logits_layer, applied after the restore so it really zeroes the head."""
  head_vars = model.supervised_head.trainable_variables
  for v in head_vars:
    v.assign(tf.zeros_like(v))
  log.info('Zero-initialised the supervised head (%d variables).', len(head_vars))


def initialize_weights(config: Config, model, state: checkpoints.TrainState,
                       init_fn: Optional[Callable] = None) -> str:
  """Checkpoint precedence, then --zero_init_logits_layer; returns how the weights were set.

  The zeroing runs after the restore (the original's ran before the variables existed and zeroed
  nothing) and never on a resume, which must continue from the saved head.
  """
  train_config = config.train
  fresh_ok = (SUPERVISED_HEAD,) if train_config.train_mode != 'pretrain' else ()
  if init_fn is None:
    # Our checkpoints and exports, and weights written by google-research/simclr.
    from tf_simclr import original_weights
    init_fn = lambda path: original_weights.load_pretrained(model, path, fresh_ok=fresh_ok)
  how = state.restore_or_initialize(train_config.checkpoint, fresh_ok=fresh_ok, init_fn=init_fn)
  if how != 'resumed' and train_config.zero_init_logits_layer and model.supervised_head:
    _zero_supervised_head(model)
  if how == 'scratch' and train_config.train_mode == 'finetune':
    log.warning('Fine-tuning without --checkpoint: training from random initialisation '
                '(the supervised baseline).')
  return how


def _warn_slow_precision(ctx: Context) -> None:
  """On CPUs, TensorFlow's bfloat16/float16 convolution gradients without XLA are an order of
  magnitude slower than float32 (benchmarks/README.md); XLA compiles them efficiently."""
  config = ctx.config
  on_cpu = (not tf.config.list_physical_devices('GPU')
            and not isinstance(ctx.strategy, tf.distribute.TPUStrategy))
  if on_cpu and config.model.precision != 'float32' and not config.train.jit_compile:
    log.warning('--precision=%s on a CPU without --jit_compile: TensorFlow\'s 16-bit convolution '
                'gradients are about 10x slower than float32 here; add --jit_compile=True (or '
                'use --precision=float32).', config.model.precision)


def train(ctx: Context, teacher: Optional[Callable] = None,
          init_fn: Optional[Callable] = None):
  """Trains to the last step; returns (model, final step, metrics of the last loop)."""
  config = ctx.config
  _warn_slow_precision(ctx)
  model = build_model(ctx)
  learning_rate = make_learning_rate(ctx)
  with ctx.strategy.scope():
    optimizer = lars.build_optimizer(config.optim, learning_rate,
                                     exclude_from_weight_decay=tasks.lars_exclusions(model))
    optimizer = precision_lib.wrap_optimizer(optimizer, config.model.precision)
    optimizer.build(model.trainable_variables)
  model_dir = config.train.model_dir
  state = checkpoints.TrainState(model, optimizer, model_dir, config.train.keep_checkpoint_max,
                                 save_dir=distribute.write_dir(model_dir, ctx.strategy))
  initialize_weights(config, model, state, init_fn=init_fn)
  task = tasks.make_task(config, model, ctx.strategy, teacher=teacher)
  dataset = pipeline.build_train_dataset(
      ctx.source, config.data, config.train.train_batch_size, ctx.strategy,
      num_views=task.num_views,
      # Distillation reads the whole (unlabelled) split; the subset only marks labelled ones.
      label_subset=(ctx.label_subset if task.name != 'distill' or task.uses_label_mask
                    else None),
      with_label_mask=task.uses_label_mask, seed=config.train.seed)
  trainer = loop.Trainer(task, optimizer, state, ctx.strategy, ctx.steps,
                         config.train.train_batch_size,
                         distribute.write_dir(model_dir, ctx.strategy),
                         learning_rate_fn=learning_rate, jit_compile=config.train.jit_compile)
  result = trainer.train(iter(dataset))
  return model, result


def evaluate(ctx: Context, model, global_step: int,
             export_fn: Optional[Callable] = None) -> Optional[Dict[str, float]]:
  """Evaluates the supervised head on --eval_split and writes the result files."""
  config = ctx.config
  if model.supervised_head is None:
    log.info('Skipping eval: pretraining without --lineareval_while_pretraining has no '
             'supervised head.')
    return None
  dataset = pipeline.build_eval_dataset(ctx.source, config.data, config.train.eval_batch_size,
                                        ctx.strategy)
  evaluator = evaluate_lib.Evaluator(model, ctx.strategy,
                                     tasks.weight_decay_variables(model, config.optim.optimizer),
                                     config.optim.weight_decay,
                                     jit_compile=config.train.jit_compile)
  result = evaluator.evaluate(dataset, ctx.steps.eval_steps)
  if not distribute.is_chief(ctx.strategy):
    return result
  summary_dir = config.train.model_dir
  if config.train.eval_name:
    summary_dir = os.path.join(summary_dir, f'eval_{config.train.eval_name}')
  stored = evaluate_lib.write_results(config.train.model_dir, result, global_step, summary_dir)
  if export_fn is not None:
    export_fn(model, global_step)
  return stored


def follow_and_evaluate(ctx: Context, export_fn: Optional[Callable] = None,
                        timeout: Optional[float] = None) -> Optional[Dict[str, float]]:
  """--mode=eval: evaluates each new checkpoint in model_dir until the last training step."""
  model = build_model(ctx)
  result = None
  for path in checkpoints.iter_checkpoints(ctx.config.train.model_dir, timeout=timeout):
    checkpoints.restore_model_variables(model, path)
    step = checkpoints.read_global_step(path)
    log.info('Evaluating %s (step %d).', path, step)
    result = evaluate(ctx, model, step, export_fn=export_fn)
    if result is None or step >= ctx.steps.train_steps:
      log.info('Eval complete.')
      break
  return result


USER_ERRORS = (ValueError, FileNotFoundError, loop.TrainingDivergedError)


def _export_fn(config: Config) -> Callable:
  """Exports a hub-style SavedModel (after each evaluation and at the end of training)."""
  from tf_simclr import export

  def fn(model, step):
    export.export_step(model, config.train.model_dir, step, config.train.keep_hub_module_max)
  return fn


def _teacher(ctx: Context) -> Callable:
  from tf_simclr import teacher as teacher_lib
  distill = ctx.config.distill
  return teacher_lib.load_teacher(distill.teacher, distill.teacher_checkpoint, ctx.num_classes,
                                  ctx.config.data.image_size, ctx.strategy)


def run(config: Config, flags_dict: Optional[Dict] = None) -> Optional[Dict[str, float]]:
  """Runs `config.train.mode`; returns the last eval result when there is one."""
  ctx = prepare(config, flags_dict)
  export_fn = _export_fn(config)
  mode = config.train.mode
  if mode == 'eval':
    return follow_and_evaluate(ctx, export_fn)
  if mode == 'export':
    model = build_model(ctx)
    latest = tf.train.latest_checkpoint(config.train.model_dir)
    if latest is None:
      raise FileNotFoundError(f'--mode=export: no checkpoint in --model_dir='
                              f'{config.train.model_dir}.')
    checkpoints.restore_model_variables(model, latest)
    export_fn(model, checkpoints.read_global_step(latest))
    return None
  teacher = _teacher(ctx) if config.train.train_mode == 'distill' else None
  model, result = train(ctx, teacher=teacher)
  if mode == 'train_then_eval':
    return evaluate(ctx, model, result.final_step, export_fn=export_fn)
  if distribute.is_chief(ctx.strategy):
    export_fn(model, result.final_step)
  return None
