"""One invocation from a `Config`: the dispatch of every --mode.

train / train_then_eval train (tf_simclr/train/) and then evaluate and export; eval, probe, embed,
neighbors, duplicates, preview_augment and export only read a model (or its data) out
(tf_simclr/evaluation/, export.py). The command line calls
`run()` after turning flags into a Config; notebooks can call it too.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Optional


from tf_simclr import distribute
from tf_simclr import run_dir
from tf_simclr import precision as precision_lib
from tf_simclr.config import Config
from tf_simclr.errors import BadImagesError, UserError
from tf_simclr.data import datasets, pipeline
from tf_simclr.evaluation import evaluate as evaluate_lib
from tf_simclr.evaluation import probe, reading
from tf_simclr.evaluation import readouts as readouts_lib
from tf_simclr.run import prepare as prepare_lib
from tf_simclr.train import assemble, loop

log = logging.getLogger(__name__)

# What every mode starts from (validated before anything is written): see prepare.py.
Context, prepare = prepare_lib.Context, prepare_lib.prepare


def build_model(ctx: Context):
  """Builds the model under the strategy's scope with all variables created."""
  return assemble.build_model(ctx.config, ctx.strategy, ctx.num_classes)


def _loaded_model(ctx: Context):
  """The model with the weights a reading mode reads (reading.weights_path), strictly restored."""
  model = build_model(ctx)
  reading.load_weights(ctx.config, model)
  return model


def train(ctx: Context, teacher: Optional[Callable] = None):
  """Trains to the last step; returns (model, final step, metrics of the last loop)."""
  config = ctx.config
  precision_lib.warn_if_slow_on_cpu(config.model.precision, ctx.strategy)
  model = build_model(ctx)
  readouts_lib.random_init_baseline(ctx, model)  # Before any restore: the seeded initialisation.
  hooks = readouts_lib.knn_hook(ctx, model)
  if ctx.lock is not None:  # Renew the lock's lease at every loop boundary.
    hooks = hooks + [(1, lambda step: ctx.lock.refresh())]
  built = assemble.assemble_trainer(config, ctx.strategy, ctx.steps, ctx.num_classes, model=model,
                                    teacher=teacher, hooks=hooks, task_class=ctx.task_class,
                                    optimizer_changed=ctx.optimizer_changed)
  task = built.task
  assemble.initialize_weights(config, model, built.state, ctx.task_class)
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
WORKER_LOST = distribute.WorkerLostError  # another worker of the run died: exit status 1
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
  try:
    ctx = prepare(config, flags_dict)
  except distribute.PEER_FAILURES as e:
    raise distribute.peer_failure(e, doing='at start-up') or e
  refused = False
  try:
    return _run_mode(ctx, export_fn or export_hook(config))
  except BadImagesError:
    refused = True
    raise
  except distribute.PEER_FAILURES as e:
    raise distribute.peer_failure(e) or e
  finally:
    distribute.remove_worker_dirs()  # A non-chief's throw-away checkpoints and summaries.
    if ctx.lock is not None:
      ctx.lock.release()
    # Images that do not decode are found while reading: the refused run leaves model_dir as it
    # was (its flags.json, summaries and lock gone) unless it saved a checkpoint.
    if refused and ctx.lock is not None:
      run_dir.restore_entries(config.train.model_dir, ctx.model_dir_before)


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
    embed.embed_split(ctx, _loaded_model(ctx))
    return None
  if mode == 'neighbors':
    from tf_simclr.evaluation import neighbors  # pylint: disable=g-import-not-at-top
    neighbors.run(ctx, _loaded_model(ctx))
    return None
  if mode == 'duplicates':
    from tf_simclr.evaluation import duplicates  # pylint: disable=g-import-not-at-top
    duplicates.run(ctx, lambda: _loaded_model(ctx))
    return None
  if mode == 'preview_augment':
    from tf_simclr.evaluation import preview  # pylint: disable=g-import-not-at-top
    preview.run(ctx)
    return None
  teacher = load_teacher(ctx) if ctx.task_class.needs_teacher else None
  model, result = train(ctx, teacher=teacher)
  stored = None
  if mode == 'train_then_eval':
    stored = evaluate_lib.evaluate(ctx, model, result.final_step,
                                   linear_probe=readouts_lib.linear_probe_enabled(ctx))
    if stored and probe.has_readouts(stored):
      log.info('%s', probe.format_table(stored))
  if distribute.is_chief(ctx.strategy):  # The one export of a training run, after its eval.
    export_fn(model, result.final_step)
  return stored
