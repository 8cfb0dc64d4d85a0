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


# Under float16 loss scaling, a step with non-finite gradients is skipped and the scale halved.
# Gradient overflow alone cannot survive this many halvings (2**15 -> 2**-35), so this many
# consecutive skips mean the loss itself stays non-finite: training stops.
MAX_CONSECUTIVE_SKIPS = 50
SKIPPED = 'skipped_steps'


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
               learning_rate_fn=None, jit_compile: bool = False):
    self.task = task
    self.optimizer = optimizer
    self.state = state
    self.strategy = strategy
    self.steps = steps
    self.global_batch_size = global_batch_size
    self.learning_rate_fn = learning_rate_fn
    self.jit_compile = jit_compile
    # Dynamic loss scaling (mixed_float16): the optimizer wraps the one doing the updates.
    self.loss_scaling = hasattr(optimizer, 'inner_optimizer')
    self.max_consecutive_skips = MAX_CONSECUTIVE_SKIPS
    self.skipped_steps = 0  # total over this Trainer's life
    self._consecutive_skips = 0
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
    return self._compiled_step(batch)

  def _optimizer_step(self, batch):
    """Loss, gradients and update on one replica's batch: the part XLA compiles."""
    task, optimizer = self.task, self.optimizer
    variables = task.trainable_variables
    with tf.GradientTape() as tape:
      loss, logs = task.train_loss(batch)
      # apply_gradients sums over replicas: divide so N replicas apply the mean gradient.
      # scale_loss multiplies by the dynamic loss scale under float16 (identity otherwise);
      # the optimizer divides the gradients by it again.
      scaled_loss = optimizer.scale_loss(loss / self.strategy.num_replicas_in_sync)
    grads = tape.gradient(scaled_loss, variables)
    if self.loss_scaling:
      # The optimizer skips this step if any replica's gradients are non-finite (same verdict
      # everywhere); its metrics are zeroed so the host averages over the applied steps only.
      finite = optimizer.check_finite(grads)
      logs = {k: tf.where(finite, tf.cast(v, tf.float32), 0.0) for k, v in logs.items()}
      logs[SKIPPED] = 1.0 - tf.cast(finite, tf.float32)
    optimizer.apply_gradients(zip(grads, variables))
    return logs

  def _build_train_fn(self):
    """The multi-step tf.function; `num_steps` is a tensor so loop lengths never retrace."""
    strategy = self.strategy
    # XLA cannot compile the input iterator or summary writes: with --jit_compile the per-step
    # computation is the compiled cluster, inside the multi-step loop.
    self._compiled_step = (tf.function(self._optimizer_step, jit_compile=True)
                           if self.jit_compile else self._optimizer_step)

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
      self._accumulator = MetricAccumulator(
          self.task.metric_names() + ([SKIPPED] if self.loss_scaling else []))
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
        if self.loss_scaling:
          last_metrics = self._count_skipped(step, n, last_metrics)
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
    except KeyboardInterrupt:
      log.warning('Interrupted at step %d: saving a checkpoint before exiting.', state.step)
      state.save()
      raise
    total = time.time() - start_time
    rate = (step - start_step) / total if total > 0 else 0.0
    log.info('Training complete at step %d (%.2f steps/s overall).', step, rate)
    return LoopResult(step, last_metrics, rate)

  def _count_skipped(self, step, n, metrics):
    """Logs the loop's skipped steps, stops on a persistent non-finite loss, and returns the
    metrics averaged over the applied steps, with `skipped_steps` a count and the loss scale."""
    skipped = int(round(metrics.pop(SKIPPED) * n))
    scale = float(self.optimizer.dynamic_scale.numpy())
    self.skipped_steps += skipped
    self._consecutive_skips = self._consecutive_skips + skipped if skipped == n else 0
    if self._consecutive_skips >= self.max_consecutive_skips:
      raise TrainingDivergedError(
          f'Non-finite loss or gradients for {self._consecutive_skips} consecutive steps at step '
          f'{step} (loss scale now {scale:g}); stopped without saving, so the last good '
          f'checkpoint in {self.state.manager.directory} is kept. Lower --learning_rate, check '
          'the data, or train with --precision=mixed_bfloat16 or float32.')
    if skipped:
      log.warning('%d of %d steps skipped (non-finite gradients under float16 loss scaling); '
                  'loss scale now %g.', skipped, n, scale)
    applied = n - skipped
    out = {k: v * n / applied for k, v in metrics.items()} if applied else {}
    out.update({SKIPPED: float(skipped), 'loss_scale': scale})
    return out

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

