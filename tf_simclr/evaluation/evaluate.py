"""Evaluation: the supervised head's top-1/top-5 on a split plus the readouts, the result files
(one writer), and the read-only modes --mode=eval (follow a training run) and --mode=probe.

Results use the original's keys (`eval/label_top_1_accuracy`, `eval/label_top_5_accuracy`,
`eval/regularization_loss`, `global_step`) and go to `result.json` and `result_<step>.json`.
"""

from __future__ import annotations

import json
import logging
from typing import Callable, Dict, Optional, Sequence

import tensorflow as tf

from tf_simclr import distribute
from tf_simclr import losses
from tf_simclr import run_dir
from tf_simclr.data import datasets, pipeline
from tf_simclr.errors import CheckpointNotFoundError, UserError, first_line
from tf_simclr.evaluation import probe, reading
from tf_simclr.evaluation import readouts as readouts_lib
from tf_simclr.models import simclr
from tf_simclr.optim import decay
from tf_simclr.weights import match as weights_match
from tf_simclr.weights import source as weights_source
from tf_simclr.weights import state as weights_state

log = logging.getLogger(__name__)


class ResultsNotWrittenError(UserError, OSError):
  """Evaluation ran but model_dir is not writable: the results are logged, not stored."""

TOP1 = 'eval/label_top_1_accuracy'
TOP5 = 'eval/label_top_5_accuracy'
REGULARIZATION = 'eval/regularization_loss'
# --mode=probe reads the encoder only: heads of another shape (or none) may stay as built.
READOUT_FRESH_OK = (simclr.SUPERVISED_HEAD, 'projection_head')


def eval_outputs(model, images, labels, valid) -> Dict[str, tf.Tensor]:
  """Per-replica sums for top-1/top-5 evaluation of the supervised head over the rows whose
  `valid` is 1 (integer `labels`; padding rows count nowhere)."""
  logits = model(images, training=False)[simclr.LOGITS_SUP]
  valid = tf.cast(valid, tf.float32)
  labels = tf.cast(labels, tf.int32)
  top1 = tf.cast(tf.equal(labels, tf.argmax(logits, 1, output_type=tf.int32)), tf.float32)
  top5 = tf.cast(tf.math.in_top_k(labels, tf.cast(logits, tf.float32),
                                  min(5, int(logits.shape[-1]))), tf.float32)
  return {'top1_correct': tf.reduce_sum(top1 * valid),
          'top5_correct': tf.reduce_sum(top5 * valid),
          'count': tf.reduce_sum(valid)}


class Evaluator:
  """Evaluates `model` on a distributed `pipeline.build_feature_dataset` (index, image, label,
  valid): static shapes, whole padding rounds, so every example counts exactly once on any
  number of replicas and hosts. The step function is traced once."""

  def __init__(self, model, strategy: tf.distribute.Strategy, decayed: Sequence[tf.Variable],
               weight_decay: float, jit_compile: bool = False):
    self.model = model
    self.strategy = strategy
    self.decayed = list(decayed)
    self.weight_decay = weight_decay

    def replica_step(images, labels, valid):
      return eval_outputs(model, images, labels, valid)

    if jit_compile:  # XLA-compile the replica step (TPUStrategy compiles it anyway).
      replica_step = tf.function(replica_step, jit_compile=True)

    @tf.function
    def step(batch):
      _, images, labels, valid = batch
      per_replica = strategy.run(replica_step, args=(images, labels, valid))
      return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
              for k, v in per_replica.items()}

    self._step = step

  def evaluate(self, dataset, eval_steps: int) -> Dict[str, float]:
    """Runs at most `eval_steps` batches, or (0) until every host's data is exhausted, so every
    example is scored exactly once even when the hosts' shares of the split are uneven (a fixed
    ceil(examples / global batch) would stop the host with the larger share early)."""
    totals = {'top1_correct': 0.0, 'top5_correct': 0.0, 'count': 0.0}
    done = 0
    for batch in dataset:
      if eval_steps and done >= eval_steps:
        break
      out = self._step(batch)
      for k in totals:
        totals[k] += float(out[k].numpy())
      done += 1
      if done % 50 == 0:
        log.info('Eval: %d / %s steps', done, eval_steps or 'all')
    if totals['count'] == 0:
      # datasets.resolve_from_config already refuses an empty --eval_split (the user error).
      raise ValueError('Evaluator: the dataset produced no examples.')
    reg = float(losses.l2_weight_decay(self.decayed, self.weight_decay))
    return {REGULARIZATION: reg,
            TOP1: totals['top1_correct'] / totals['count'],
            TOP5: totals['top5_correct'] / totals['count'],
            'num_examples': totals['count']}


def write_results(model_dir: str, result: Dict[str, float], global_step: int,
                  summary_dir: Optional[str] = None, merge: bool = False) -> Dict[str, float]:
  """Writes result.json, result_<step>.json and eval summaries; returns the stored dict. The one
  writer of result files. `merge`: keep the other metrics result_<step>.json already holds (the
  head's, when --mode=probe adds readouts to a step)."""
  stored = {}
  previous = run_dir.result_path(model_dir, global_step)
  if merge and tf.io.gfile.exists(previous):
    with tf.io.gfile.GFile(previous) as f:
      stored = {k: v for k, v in json.load(f).items() if k != 'global_step'}
  stored.update({k: float(v) for k, v in result.items()})
  stored['global_step'] = float(global_step)
  for path in (run_dir.result_path(model_dir), previous):
    try:
      with tf.io.gfile.GFile(path, 'w') as f:
        json.dump(stored, f, indent=2, sort_keys=True)
    except (tf.errors.OpError, OSError) as e:
      log.warning('Eval results at step %d: %s', global_step,
                  ', '.join(f'{k}={v:.6g}' for k, v in sorted(stored.items())))
      raise ResultsNotWrittenError(
          f'Evaluated step {global_step} (results in the line above) but cannot write '
          f'{path} ({type(e).__name__}: {first_line(e)}): '
          f'--model_dir={model_dir} is not writable. Make it writable, or evaluate a copy of '
          'the run.') from e
  writer = tf.summary.create_file_writer(summary_dir or model_dir)
  with writer.as_default():
    for key, value in stored.items():
      if key.startswith('eval/'):  # The head's metrics and the readouts (probe.py).
        tf.summary.scalar(key, value, step=global_step)
    writer.flush()
  if TOP1 in stored:
    log.info('Eval at step %d: top-1 %.4f, top-5 %.4f on %d examples', global_step, stored[TOP1],
             stored[TOP5], int(stored.get('num_examples', 0)))
  return stored


def evaluate(ctx, model, global_step: int, export_fn: Optional[Callable] = None,
             linear_probe: bool = False) -> Optional[Dict[str, float]]:
  """Evaluates the supervised head and the readouts on --eval_split; writes the result files.

  `ctx`: the run's `run.prepare.Context`."""
  config = ctx.config
  result = {}
  if model.supervised_head is not None:
    split = config.data.eval_split
    dataset = pipeline.build_feature_dataset(ctx.source, config.data, split,
                                             config.train.eval_batch_size, ctx.strategy)
    evaluator = Evaluator(model, ctx.strategy,
                          decay.weight_decay_variables(model, config.optim.optimizer),
                          config.optim.weight_decay, jit_compile=config.train.jit_compile)
    with datasets.naming_bad_images(ctx.source, config.data.eval_split):
      # --eval_steps=0: until each host's share is exhausted (hosts' shares may be uneven).
      result = evaluator.evaluate(dataset, config.train.eval_steps)
    expected = ctx.source.num_examples(split)
    if not config.train.eval_steps and result['num_examples'] != expected:
      raise probe.FeatureCountError(
          f'Eval scored {result["num_examples"]:g} examples of --eval_split={split} instead of '
          f'its {expected}: a bug in the input pipeline\'s padding, please report it with the '
          'strategy and split size.')
  with datasets.naming_bad_images(ctx.source, config.data.eval_split):
    result.update(readouts_lib.readouts(ctx, model, knn=readouts_lib.knn_enabled(ctx),
                                        linear=linear_probe))
  if not result:
    log.info('Skipping eval: pretraining without --lineareval_while_pretraining has no '
             'supervised head, and the kNN monitor is off.')
    return None
  result.update(ctx.readouts.baseline)
  if not distribute.is_chief(ctx.strategy):
    return result
  summary_dir = run_dir.eval_summary_dir(config.train.model_dir, config.train.eval_name)
  stored = write_results(config.train.model_dir, result, global_step, summary_dir)
  if export_fn is not None:
    export_fn(model, global_step)
  return stored


def follow_and_evaluate(ctx, build_model: Callable, export_fn: Optional[Callable] = None,
                        timeout: float = 0) -> Optional[Dict[str, float]]:
  """--mode=eval: evaluates each new checkpoint in model_dir until the last training step.

  `build_model()` builds the run's model. Waits at most `timeout` seconds (0: forever) for each
  new checkpoint; raises CheckpointNotFoundError when none comes at all.
  """
  model_dir = ctx.config.train.model_dir
  model = None
  result, step = None, None
  evaluated = set()
  for newest in weights_state.wait_for_checkpoints(model_dir, timeout=timeout):
    if model is None:
      model = build_model()
    loaded = weights_state.load_newest_intact(model, model_dir, lead=reading.MODEL_DIR_LEAD,
                                              newest=newest)
    if loaded is None or loaded[0] in evaluated:
      continue  # Rotated away, or damaged with the intact one before it already evaluated.
    path, step = loaded
    evaluated.add(path)
    log.info('Evaluating %s (step %d).', path, step)
    result = evaluate(ctx, model, step, export_fn=export_fn)
    if result is None or step >= ctx.steps.train_steps:
      log.info('Eval complete.')
      return result
  if step is None:
    raise CheckpointNotFoundError(
        f'--mode=eval: no checkpoint appeared in --model_dir={model_dir} within '
        f'--eval_timeout={timeout:g} s. Check the path (training writes '
        f'{run_dir.CHECKPOINT_NAME}-N there), or raise --eval_timeout (0 waits forever).')
  log.warning('No new checkpoint in %s within --eval_timeout=%g s after step %d (training ends at '
              '%d); stopping.', model_dir, timeout, step, ctx.steps.train_steps)
  return result


def probe_checkpoint(ctx, model) -> Dict[str, float]:
  """--mode=probe: kNN and linear probe of --checkpoint, else of model_dir's newest checkpoint,
  else of the random-init encoder (`model`, freshly built); merged into result.json /
  result_<step>.json."""
  config = ctx.config
  model_dir = config.train.model_dir
  readouts_lib.random_init_baseline(ctx, model)
  step = 0
  if config.train.checkpoint:
    source = weights_source.resolve(config.train.checkpoint)
    weights_match.load(model, source, fresh_ok=READOUT_FRESH_OK)
    log.info('Probing --checkpoint=%s.', config.train.checkpoint)
    step = weights_source.read_step_or_zero(source)
  elif (loaded := weights_state.load_newest_intact(model, model_dir, fresh_ok=READOUT_FRESH_OK,
                                                     lead=reading.MODEL_DIR_LEAD)):
    latest, step = loaded
    log.info('Probing %s (step %d).', latest, step)
  else:
    log.warning('--mode=probe: no --checkpoint and no checkpoint in --model_dir=%s; probing the '
                'random-init encoder.', model_dir)
  result = readouts_lib.readouts(ctx, model, knn=readouts_lib.knn_enabled(ctx),
                                 linear=readouts_lib.linear_probe_enabled(ctx))
  result.update(ctx.readouts.baseline)
  if not distribute.is_chief(ctx.strategy):
    return result
  stored = write_results(model_dir, result, step, model_dir, merge=True)  # Keeps the head's.
  log.info('%s', probe.format_table(stored))
  return stored
