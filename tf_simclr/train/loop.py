"""The one custom training loop.

`steps_per_loop` steps run inside one tf.function (a tf.while_loop over `strategy.run`). The
replica step is all device work (an accelerator program on TPU): it all-reduces its metrics over
the replicas in replica context and adds them to on-device accumulators, and keeps the first
augmented images of its batch in a device variable. Between loops the host reads both once, logs
progress, writes summaries (scalars and images), checks the loss is finite and saves checkpoints.
Training runs exactly `steps.train_steps` steps: the last loop is shortened rather than padded.
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


MAX_SUMMARY_IMAGES = 3


class TrainingDivergedError(RuntimeError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


_ON_DEVICE = dict(trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
                  aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


class MetricAccumulator:
  """Running means of named scalars, summed on the device and read by the host once per loop.

  Create it under the strategy's scope. The variables are sync-on-read (one copy per replica, as
  Keras metrics): `add` runs in the replica step on values already all-reduced over replicas, so
  every copy holds the same sums and reading the first replica's is exact.
  """

  def __init__(self, names: List[str]):
    self.names = list(names)
    self._sums = {n: tf.Variable(0.0, dtype=tf.float32, name=f'sum_{n}', **_ON_DEVICE)
                  for n in self.names}
    self._count = tf.Variable(0.0, dtype=tf.float32, name='count', **_ON_DEVICE)

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
    self.writer = tf.summary.create_file_writer(summary_dir)
    # XLA-compile the replica step (TPUStrategy compiles it whatever this says).
    self.jit_compile = jit_compile
    self._accumulator: Optional[MetricAccumulator] = None
    self._images: Optional[tf.Variable] = None
    self._train_fn = None

  def _replica_step(self, batch):
    """One optimisation step on one replica's batch (replica context, device work only)."""
    task, optimizer = self.task, self.optimizer
    variables = task.trainable_variables
    with tf.GradientTape() as tape:
      loss, logs = task.train_loss(batch)
      # apply_gradients sums over replicas: divide so N replicas apply the mean gradient.
      scaled_loss = loss / self.strategy.num_replicas_in_sync
    grads = tape.gradient(scaled_loss, variables)
    optimizer.apply_gradients(zip(grads, variables))
    # One batched all-reduce in replica context; the sums stay on the device.
    context = tf.distribute.get_replica_context()
    self._accumulator.add(context.all_reduce(tf.distribute.ReduceOp.MEAN, logs))
    # The host writes the augmented-image summary from this variable between loops.
    images = task.image_summary(batch)
    self._images.assign(tf.cast(images[:self._images.shape[0]], tf.float32))

  def _build_state(self):
    """Device-side metric sums and the image buffer (the pipelines' image_size squares)."""
    with self.strategy.scope():
      self._accumulator = MetricAccumulator(self.task.metric_names())
      local_batch = self.global_batch_size // self.strategy.num_replicas_in_sync
      size = self.task.config.data.image_size
      shape = [min(MAX_SUMMARY_IMAGES, local_batch), size, size, 3]
      self._images = tf.Variable(tf.zeros(shape), name='summary_images', **_ON_DEVICE)

  def _build_train_fn(self):
    """The multi-step tf.function; `num_steps` is a tensor so loop lengths never retrace."""
    strategy = self.strategy
    # The iterator's get-next runs on the host: only the replica step can be XLA-compiled.
    step = tf.function(self._replica_step, jit_compile=True) if self.jit_compile else (
        self._replica_step)

    @tf.function
    def train_steps(iterator, num_steps):
      for _ in tf.range(num_steps):
        strategy.run(step, args=(next(iterator),))

    return train_steps

  def train(self, iterator) -> LoopResult:
    """Trains from the current step up to `steps.train_steps`, checkpointing on the way."""
    steps = self.steps
    state = self.state
    if self._accumulator is None:
      self._build_state()
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
      if self._images is not None:  # The last step's augmented views.
        tf.summary.image('image', self._images.value(), step=step,
                         max_outputs=MAX_SUMMARY_IMAGES)
      self.writer.flush()

