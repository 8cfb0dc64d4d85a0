"""Evaluation of the supervised head: top-1/top-5 on a split, summaries and result JSON files.

Results use the original's keys (`eval/label_top_1_accuracy`, `eval/label_top_5_accuracy`,
`eval/regularization_loss`, `global_step`) and go to `result.json` and `result_<step>.json`.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, Optional, Sequence

import tensorflow as tf

from tf_simclr import losses
from tf_simclr.errors import UserError
from tf_simclr.train import tasks

log = logging.getLogger(__name__)


class ResultsNotWrittenError(UserError, OSError):
  """Evaluation ran but model_dir is not writable: the results are logged, not stored."""

TOP1 = 'eval/label_top_1_accuracy'
TOP5 = 'eval/label_top_5_accuracy'
REGULARIZATION = 'eval/regularization_loss'


class Evaluator:
  """Evaluates `model` on a distributed eval dataset; the step function is traced once."""

  def __init__(self, model, strategy: tf.distribute.Strategy, decayed: Sequence[tf.Variable],
               weight_decay: float, jit_compile: bool = False):
    self.model = model
    self.strategy = strategy
    self.decayed = list(decayed)
    self.weight_decay = weight_decay

    def replica_step(batch):
      return tasks.eval_outputs(model, batch[0], batch[1])

    if jit_compile:  # XLA-compile the replica step (TPUStrategy compiles it anyway).
      replica_step = tf.function(replica_step, jit_compile=True)

    @tf.function
    def step(batch):
      per_replica = strategy.run(replica_step, args=(batch,))
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
                  summary_dir: Optional[str] = None) -> Dict[str, float]:
  """Writes result.json, result_<step>.json and eval summaries; returns the stored dict."""
  stored = {k: float(v) for k, v in result.items()}
  stored['global_step'] = float(global_step)
  for name in ('result.json', f'result_{global_step}.json'):
    try:
      with tf.io.gfile.GFile(os.path.join(model_dir, name), 'w') as f:
        json.dump(stored, f, indent=2, sort_keys=True)
    except (tf.errors.OpError, OSError) as e:
      log.warning('Eval results at step %d: %s', global_step,
                  ', '.join(f'{k}={v:.6g}' for k, v in sorted(stored.items())))
      text = str(e).strip().splitlines()
      raise ResultsNotWrittenError(
          f'Evaluated step {global_step} (results in the line above) but cannot write '
          f'{os.path.join(model_dir, name)} ({type(e).__name__}: {text[0] if text else ""}): '
          f'--model_dir={model_dir} is not writable. Make it writable, or evaluate a copy of '
          'the run.') from e
  writer = tf.summary.create_file_writer(summary_dir or model_dir)
  with writer.as_default():
    for key, value in stored.items():
      if key.startswith('eval/'):  # The head's metrics and the readouts (train/probe.py).
        tf.summary.scalar(key, value, step=global_step)
    writer.flush()
  if TOP1 in stored:
    log.info('Eval at step %d: top-1 %.4f, top-5 %.4f on %d examples', global_step, stored[TOP1],
             stored[TOP5], int(stored.get('num_examples', 0)))
  return stored
