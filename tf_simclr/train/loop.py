"""The one custom training loop.

`steps_per_loop` steps run inside one tf.function (a tf.while_loop over `strategy.run`), metrics
are averaged over replicas and steps into plain accumulators, and between loops the host logs
progress, writes summaries, checks the loss is finite and saves checkpoints. Training runs exactly
`steps.train_steps` steps: the last loop is shortened rather than padded.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Dict, List, Optional

import tensorflow as tf

from tf_simclr.checkpoints import TrainState
from tf_simclr.config import Steps

log = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


class MetricAccumulator:
  """Host-side running means of named scalars, fed from inside tf.functions."""

  def __init__(self, names: List[str]):
    self.names = list(names)
    self._sums = {n: tf.Variable(0.0, trainable=False, dtype=tf.float32) for n in self.names}
    self._count = tf.Variable(0.0, trainable=False, dtype=tf.float32)

  def add(self, values: Dict[str, tf.Tensor]) -> None:
    for name in self.names:
      self._sums[name].assign_add(tf.cast(values[name], tf.float32))
    self._count.assign_add(1.0)

  def result(self) -> Dict[str, float]:
    count = max(float(self._count.numpy()), 1.0)
    return {n: float(self._sums[n].numpy()) / count for n in self.names}

  def reset(self) -> None:
    for v in self._sums.values():
      v.assign(0.0)
    self._count.assign(0.0)


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


@dataclasses.dataclass
class LoopResult:
  final_step: int
  metrics: Dict[str, float]
  steps_per_second: float


class Trainer:
  """Runs a task's train step with a strategy, checkpointing and summaries."""

  def __init__(self, task, optimizer, state: TrainState, strategy: tf.distribute.Strategy,
               steps: Steps, global_batch_size: int, summary_dir: str,
               learning_rate_fn=None, hooks=()):
    self.task = task
    # (every_steps, fn(step)) pairs: fn runs between loops when a multiple of every_steps passes.
    self.hooks = tuple(hooks)
    self.optimizer = optimizer
    self.state = state
    self.strategy = strategy
    self.steps = steps
    self.global_batch_size = global_batch_size
    self.learning_rate_fn = learning_rate_fn
    self.writer = tf.summary.create_file_writer(summary_dir)
    self._accumulator: Optional[MetricAccumulator] = None
    self._train_fn = None

  def _replica_step(self, batch):
    """One optimisation step on one replica's batch (replica context)."""
    task, optimizer = self.task, self.optimizer
    should_record = tf.equal((optimizer.iterations + 1) % self.steps.steps_per_loop, 0)
    with tf.summary.record_if(should_record):
      tf.summary.image('image', task.image_summary(batch), step=optimizer.iterations + 1,
                       max_outputs=3)
    variables = task.trainable_variables
    with tf.GradientTape() as tape:
      loss, logs = task.train_loss(batch)
      # apply_gradients sums over replicas: divide so N replicas apply the mean gradient.
      scaled_loss = loss / self.strategy.num_replicas_in_sync
    grads = tape.gradient(scaled_loss, variables)
    optimizer.apply_gradients(zip(grads, variables))
    return logs

  def _build_train_fn(self):
    """The multi-step tf.function; `num_steps` is a tensor so loop lengths never retrace."""
    strategy = self.strategy

    @tf.function
    def train_steps(iterator, num_steps):
      for _ in tf.range(num_steps):
        logs = strategy.run(self._replica_step, args=(next(iterator),))
        self._accumulator.add({k: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None)
                               for k, v in logs.items()})

    return train_steps

  def train(self, iterator) -> LoopResult:
    """Trains from the current step up to `steps.train_steps`, checkpointing on the way."""
    steps = self.steps
    state = self.state
    if self._accumulator is None:
      self._accumulator = MetricAccumulator(self.task.metric_names())
    if self._train_fn is None:
      self._train_fn = self._build_train_fn()
    train_steps = self._train_fn
    step = state.step
    start_step, start_time = step, time.time()
    last_metrics: Dict[str, float] = {}
    if step >= steps.train_steps:
      log.info('Training already complete at step %d / %d.', step, steps.train_steps)
      return LoopResult(step, {}, 0.0)
    log.info('Training from step %d to %d (%d steps per loop, checkpoint every %d).',
             step, steps.train_steps, steps.steps_per_loop, steps.checkpoint_steps)
    try:
      while step < steps.train_steps:
        next_ckpt = (step // steps.checkpoint_steps + 1) * steps.checkpoint_steps
        n = min(steps.steps_per_loop, next_ckpt - step, steps.train_steps - step)
        t0 = time.time()
        with self.writer.as_default():
          train_steps(iterator, tf.constant(n, tf.int32))
        step = state.step
        elapsed = time.time() - t0
        last_metrics = self._accumulator.result()
        self._accumulator.reset()
        bad = [k for k, v in last_metrics.items() if not math.isfinite(v)]
        if bad:
          raise TrainingDivergedError(
              f'Non-finite {", ".join(bad)} at step {step}; stopped without saving, so the last '
              f'good checkpoint in {state.manager.directory} is kept. Lower --learning_rate, '
              'check the data, or raise --temperature.')
        self._log_progress(step, n, elapsed, start_step, start_time, last_metrics)
        self._write_scalars(step, last_metrics)
        if step % steps.checkpoint_steps == 0 or step >= steps.train_steps:
          path = state.save()
          log.info('Saved checkpoint %s', path)
        for every, hook in self.hooks:
          if step // every > (step - n) // every:
            hook(step)
    except KeyboardInterrupt:
      log.warning('Interrupted at step %d: saving a checkpoint before exiting.', state.step)
      state.save()
      raise
    total = time.time() - start_time
    rate = (step - start_step) / total if total > 0 else 0.0
    log.info('Training complete at step %d (%.2f steps/s overall).', step, rate)
    return LoopResult(step, last_metrics, rate)

  def _log_progress(self, step, n, elapsed, start_step, start_time, metrics):
    total = self.steps.train_steps
    rate = n / elapsed if elapsed > 0 else float('nan')
    overall = (step - start_step) / max(time.time() - start_time, 1e-9)
    eta = (total - step) / overall if overall > 0 else float('nan')
    shown = ' '.join(f'{k}={v:.4g}' for k, v in metrics.items())
    log.info('step %d/%d (%.1f%%) | %.2f steps/s | %.1f images/s | ETA %s | %s', step, total,
             100.0 * step / total, rate, rate * self.global_batch_size,
             _format_duration(eta) if math.isfinite(eta) else '?', shown)

  def _write_scalars(self, step, metrics):
    with self.writer.as_default():
      for name, value in metrics.items():
        tf.summary.scalar(f'train/{name}', value, step=step)
      if self.learning_rate_fn is not None:
        lr = self.learning_rate_fn(tf.constant(max(step - 1, 0), tf.float32))
        tf.summary.scalar('learning_rate', lr, step=step)
      self.writer.flush()

