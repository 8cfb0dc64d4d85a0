"""Readouts of the representation during and after a run: which are on, and when they run.

The kNN monitor between training loops (to TensorBoard), the kNN and linear probe at evaluation
time, and the random-init baseline, all on the run's `run.prepare.Context` (`ctx`); whether a
readout is on by default is the run's task's (`ctx.task_class.readouts_by_default`). The readout
math itself is in `probe.py`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Dict, Optional

import tensorflow as tf

from tf_simclr import distribute
from tf_simclr.evaluation import probe

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ReadoutState:
  """What the readouts of one run keep between calls (`Context.readouts`): the Readout (its
  datasets and labels, made on first use) and the random-init baseline's results."""
  readout: Optional[probe.Readout] = None
  baseline: Dict[str, float] = dataclasses.field(default_factory=dict)


def knn_enabled(ctx) -> bool:
  """--knn_monitor, unset: on in --mode=probe and when the task reads out by default
  (pretraining), on a labelled dataset. The one kNN default."""
  knn = ctx.config.probe.knn
  if knn is None:
    return ((ctx.config.train.mode == 'probe' or ctx.task_class.readouts_by_default)
            and ctx.num_classes > 1)
  return knn


def linear_probe_enabled(ctx) -> bool:
  """--linear_probe, unset: at the end of pretraining with train_then_eval, and in --mode=probe."""
  linear = ctx.config.probe.linear_probe
  if linear is None:
    mode = ctx.config.train.mode
    return mode == 'probe' or (mode == 'train_then_eval' and ctx.task_class.readouts_by_default)
  return linear


def readouts(ctx, model, knn: bool, linear: bool) -> Dict[str, float]:
  """kNN and/or linear-probe metrics of the model's encoder (probe.py)."""
  if not (knn or linear):
    return {}
  state = ctx.readouts
  if state.readout is None:
    p = ctx.config.probe
    state.readout = probe.Readout(
        ctx.source, ctx.config.data, ctx.strategy, ctx.config.train.eval_batch_size,
        ctx.num_classes, k=p.knn_k, temperature=p.knn_temperature,
        max_train_examples=p.knn_max_bank_size, seed=p.seed)
  return state.readout.run(model.encoder, knn=knn, linear=linear)


def random_init_baseline(ctx, model) -> None:
  """--random_init_baseline: readouts of the freshly built (seeded, untrained) encoder."""
  if not ctx.config.probe.random_init_baseline:
    return
  log.info('Random-init baseline: readouts of the encoder at its initialisation.')
  result = readouts(ctx, model, knn=knn_enabled(ctx), linear=linear_probe_enabled(ctx))
  ctx.readouts.baseline = {probe.random_init_key(k): v for k, v in result.items()}


def knn_hook(ctx, model):
  """(every_steps, fn) for the Trainer: kNN every --knn_every_epochs, to TensorBoard."""
  every = ctx.config.probe.knn_every_epochs * ctx.steps.epoch_steps
  if not knn_enabled(ctx) or every <= 0:
    return []
  writer = tf.summary.create_file_writer(
      distribute.write_dir(ctx.config.train.model_dir, ctx.strategy))

  def hook(step):
    if (ctx.config.train.mode == 'train_then_eval' and
        ctx.steps.train_steps - step < ctx.steps.epoch_steps):
      return  # The final eval, less than an epoch away, runs it.
    result = readouts(ctx, model, knn=True, linear=False)
    with writer.as_default():
      tf.summary.scalar(probe.KNN_TOP1, result[probe.KNN_TOP1], step=step)
      tf.summary.scalar(probe.KNN_TOP5, result[probe.KNN_TOP5], step=step)
      writer.flush()
  return [(every, hook)]
