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
import os
import signal
import threading
import time
from typing import Dict, List, Optional

import keras
import tensorflow as tf

from tf_simclr import distribute
from tf_simclr import precision as precision_lib
from tf_simclr import run_dir
from tf_simclr.config import Steps
from tf_simclr.errors import UserError
from tf_simclr.weights.source import checkpoint_step, find_checkpoints
from tf_simclr.weights.state import TrainState

log = logging.getLogger(__name__)


# A loss (any metric named *loss) above this is divergence, as is a NaN/inf loss or weight. The
# contrastive loss is at most about 2 / temperature + log(2 x batch), a cross-entropy about
# log(classes) at initialisation: a healthy run is orders of magnitude below.
LOSS_BOUND = 1e6
MAX_SUMMARY_IMAGES = 3


class TrainingDivergedError(UserError, RuntimeError):
  """The loss or the weights diverged; checkpoints saved before are kept, nothing is exported."""


class TrainingInterruptedError(RuntimeError):
  """SIGINT (Ctrl-C) during training: a checkpoint was saved; rerun the same command to resume."""


class _SignalsDeferred:
  """SIGINT and SIGTERM wait while a checkpoint is written (main thread only; else a no-op).

  `final` (the save before stopping): both are absorbed and logged. Otherwise a SIGINT raises
  KeyboardInterrupt once the save is done and a SIGTERM goes to the earlier handler then (the
  stop request), so a checkpoint is never left half-written by a signal.
  """

  def __init__(self, final: bool):
    self.final = final
    self.received: List[int] = []
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    self.received.append(signum)
    log.warning('%s during the checkpoint save: %s.', signal.Signals(signum).name,
                'ignored, the save finishes first' if self.final else 'handled after the save')

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGINT, signal.SIGTERM):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    if self.final or exc[0] is not None:
      return False
    if signal.SIGTERM in self.received and callable(self._previous.get(signal.SIGTERM)):
      self._previous[signal.SIGTERM](signal.SIGTERM, None)
    if signal.SIGINT in self.received:
      raise KeyboardInterrupt
    return False


class TrainingPreemptedError(RuntimeError):
  """SIGTERM arrived: a checkpoint was saved at the step boundary; rerun to resume."""


class _StopRequest:
  """Turns SIGTERM into a flag read at loop boundaries (installed in the main thread only).

  The signal cannot interrupt a running tf.function: the loop in progress ends first, so a loop
  of --steps_per_loop steps must fit in the scheduler's grace period. Under multi-worker
  strategies the workers agree (a SUM of the 0/1 flags over all replicas, > 0: ReduceOp has no
  MAX) so they all save and stop at the same step.
  """

  def __init__(self, strategy):
    self.strategy = strategy
    self.signalled = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    if not self.signalled:
      log.warning('SIGTERM received: will save a checkpoint and stop at the end of this loop.')
    self.signalled = True

  def requested(self) -> bool:
    return distribute.any_worker(self.strategy, self.signalled)

  def uninstall(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


_ON_DEVICE = dict(trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
                  aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


# Under float16 loss scaling, a step with non-finite gradients is skipped and the scale halved.
# Gradient overflow alone cannot survive this many halvings (2**15 -> 2**-35), so this many
# consecutive skips mean the loss itself stays non-finite: training stops.
MAX_CONSECUTIVE_SKIPS = 50
SKIPPED = 'skipped_steps'


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


def bn_statistics_averager(model, strategy):
  """A function that sets every replica's copy of the moving statistics of the model's
  unsynchronized BatchNormalization layers to their mean over all replicas (all workers), or
  None when there is nothing to average.

  Keras 3 keeps one copy per replica (aggregation NONE) and checkpoints replica 0's; the
  original's (Keras 2, aggregation MEAN) were averaged at every update. Both are linear moving
  averages from the same start, so averaging the copies gives the original's values.
  """
  if strategy.num_replicas_in_sync < 2:
    return None
  variables = [v for layer in model._flatten_layers()  # pylint: disable=protected-access
               if isinstance(layer, keras.layers.BatchNormalization) and not layer.synchronized
               for v in (layer.moving_mean, layer.moving_variance)]
  if not variables:
    return None

  def replica_fn():
    context = tf.distribute.get_replica_context()
    means = context.all_reduce(tf.distribute.ReduceOp.MEAN, [v.value for v in variables])
    for v, mean in zip(variables, means):
      v.assign(mean)

  @tf.function
  def average():
    strategy.run(replica_fn)
  return average


def _xla(fn):
  """`fn` as an XLA-compiled tf.function (nested in the multi-step function)."""
  return tf.function(fn, jit_compile=True)


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


def task_gradients(task, optimizer, batch):
  """(gradients of `task.trainable_variables`, metrics) of one replica's batch (replica context).

  The one gradient computation of a training step, for the command line's Trainer and for
  `tf_simclr.SimCLR.train_step` (keras_model.py) alike.
  """
  variables = task.trainable_variables
  with tf.GradientTape() as tape:
    loss, logs = task.train_loss(batch)
    # apply_gradients sums over replicas: divide so N replicas apply the mean gradient.
    # scale_loss multiplies by the dynamic loss scale under float16 (identity otherwise);
    # the optimizer divides the gradients by it again.
    scaled_loss = optimizer.scale_loss(loss / task.strategy.num_replicas_in_sync)
  return tape.gradient(scaled_loss, variables), logs


def replica_update(task, optimizer, batch, loss_scaling: bool,
                   gradients=None) -> Dict[str, tf.Tensor]:
  """One optimisation step of `task` on one replica's batch (replica context, device work only);
  returns the step's metrics averaged over the replicas (the same values on every replica).

  `gradients`: the function computing (gradients, metrics), `task_gradients` by default (the
  Trainer passes an XLA-compiled one). `loss_scaling`: the optimizer is a float16 loss-scale
  optimizer. Shared by the Trainer and `tf_simclr.SimCLR.train_step`.
  """
  variables = task.trainable_variables
  if gradients is None:
    gradients = lambda b: task_gradients(task, optimizer, b)
  grads, logs = gradients(batch)
  if loss_scaling:
    # The optimizer skips this step if any replica's gradients are non-finite (same verdict
    # everywhere); its metrics are zeroed so the host averages over the applied steps only.
    finite = optimizer.check_finite(grads)
    logs = {k: tf.where(finite, tf.cast(v, tf.float32), 0.0) for k, v in logs.items()}
    logs[SKIPPED] = 1.0 - tf.cast(finite, tf.float32)
  optimizer.apply_gradients(zip(grads, variables))
  # One batched all-reduce in replica context.
  context = tf.distribute.get_replica_context()
  return context.all_reduce(tf.distribute.ReduceOp.MEAN, logs)


class Trainer:
  """Runs a task's train step with a strategy, checkpointing and summaries."""

  def __init__(self, task, optimizer, state: TrainState, strategy: tf.distribute.Strategy,
               steps: Steps, global_batch_size: int, summary_dir: str,
               learning_rate_fn=None, jit_compile: bool = False, hooks=()):
    self.task = task
    # (every_steps, fn(step)) pairs: fn runs between loops when a multiple of every_steps passes.
    self.hooks = tuple(hooks)
    self.optimizer = optimizer
    self.state = state
    self.strategy = strategy
    self.steps = steps
    self.global_batch_size = global_batch_size
    self.learning_rate_fn = learning_rate_fn
    # Dynamic loss scaling (mixed_float16): the optimizer wraps the one doing the updates.
    self.loss_scaling = precision_lib.loss_scale(optimizer) is not None
    self.max_consecutive_skips = MAX_CONSECUTIVE_SKIPS
    self.skipped_steps = 0  # total over this Trainer's life
    self._consecutive_skips = 0
    # Remote folders (gs://): flushed on a timer, not each loop (each flush is an upload).
    self.writer = run_dir.summary_writer(summary_dir)
    self._flush_each_loop = run_dir.flushes_each_loop(summary_dir)
    # XLA-compile the replica step (TPUStrategy compiles it whatever this says).
    self.jit_compile = jit_compile
    self._accumulator: Optional[MetricAccumulator] = None
    self._images: Optional[tf.Variable] = None
    self._train_fn = None
    self._weights_finite = None
    # --global_bn=False on several replicas: one average of the BN moving statistics per loop,
    # so every save, readout and evaluation sees the same (mean) statistics on every replica.
    self._average_bn = bn_statistics_averager(state.model, strategy)

  def _gradients(self, batch):
    """(gradients, metrics) of one replica's batch, cross-replica gather and BN included."""
    return task_gradients(self.task, self.optimizer, batch)

  def _replica_step(self, batch, gradients=None):
    """One optimisation step on one replica's batch (replica context, device work only)."""
    logs = replica_update(self.task, self.optimizer, batch, self.loss_scaling,
                          gradients or self._gradients)
    self._accumulator.add(logs)
    # The host writes the augmented-image summary from this variable between loops.
    images = self.task.image_summary(batch)
    self._images.assign(tf.cast(images[:self._images.shape[0]], tf.float32))

  def _build_state(self):
    """Device-side metric sums and the image buffer (the pipelines' image_size squares)."""
    with self.strategy.scope():
      self._accumulator = MetricAccumulator(
          self.task.metric_names() + ([SKIPPED] if self.loss_scaling else []))
      local_batch = self.global_batch_size // self.strategy.num_replicas_in_sync
      size = self.task.config.data.image_size
      shape = [min(MAX_SUMMARY_IMAGES, local_batch), size, size, 3]
      self._images = tf.Variable(tf.zeros(shape), name='summary_images', **_ON_DEVICE)

  def _build_train_fn(self):
    """The multi-step tf.function; `num_steps` is a tensor so loop lengths never retrace."""
    strategy = self.strategy
    # The iterator's get-next runs on the host: only the replica step can be XLA-compiled.
    step = self._replica_step
    if self.jit_compile and strategy.num_replicas_in_sync == 1:
      step = _xla(self._replica_step)
    elif self.jit_compile:
      # Keras 3's optimizer step counter is an ONLY_FIRST_REPLICA variable: its update in
      # replica context is a merge_call, which a nested (compiled) function cannot make under
      # MirroredStrategy ("merge_call called while defining a new graph"). So XLA compiles
      # the loss and gradients (the all-reduces of the NT-Xent gather and synchronized BN have
      # a path without merge_call there on GPUs); the update runs outside it.
      gradients = _xla(self._gradients)
      step = lambda batch: self._replica_step(batch, gradients)

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
    stop = _StopRequest(self.strategy)
    # One summary context for the whole run: leaving `as_default` flushes the writer, which
    # must not happen at each loop on a remote model_dir (run_dir.summary_writer).
    summaries = self.writer.as_default()
    summaries.__enter__()  # pylint: disable=unnecessary-dunder-call
    try:
      while step < steps.train_steps:
        next_ckpt = (step // steps.checkpoint_steps + 1) * steps.checkpoint_steps
        n = min(steps.steps_per_loop, next_ckpt - step, steps.train_steps - step)
        t0 = time.time()
        train_steps(iterator, tf.constant(n, tf.int32))
        step = state.step
        elapsed = time.time() - t0
        if self._average_bn is not None:
          self._average_bn()
        last_metrics = self._accumulator.result()
        self._accumulator.reset()
        if self.loss_scaling:
          last_metrics = self._count_skipped(step, n, last_metrics)
        self._check_divergence(step, last_metrics)
        self._log_progress(step, n, elapsed, start_step, start_time, last_metrics)
        self._write_scalars(step, last_metrics)
        path = None
        if step % steps.checkpoint_steps == 0 or step >= steps.train_steps:
          with _SignalsDeferred(final=False):
            path = state.save()
          log.info('Saved checkpoint %s', path)
        for every, hook in self.hooks:
          if step // every > (step - n) // every:
            hook(step)
        if step < steps.train_steps and stop.requested():
          with _SignalsDeferred(final=True):
            path = path or state.save()
          raise TrainingPreemptedError(
              f'PREEMPTED: stopped on SIGTERM at step {step} of {steps.train_steps} after saving '
              f'{path}; rerun the same command to resume from step {step}.')
    except KeyboardInterrupt:
      log.warning('Interrupted at step %d: saving a checkpoint before exiting.', state.step)
      with _SignalsDeferred(final=True):
        saved = state.manager.latest_checkpoint
        if not saved or checkpoint_step(saved) != state.step:  # not saved at this step yet
          saved = state.save()
      raise TrainingInterruptedError(
          f'Interrupted (SIGINT) at step {state.step} of {steps.train_steps}: saved '
          f'{os.path.basename(saved)}, rerun the same command to resume.') from None
    finally:
      stop.uninstall()
      summaries.__exit__(None, None, None)  # Flushes what a remote writer still holds.
    total = time.time() - start_time
    rate = (step - start_step) / total if total > 0 else 0.0
    log.info('Training complete at step %d (%.2f steps/s overall).', step, rate)
    return LoopResult(step, last_metrics, rate)

  def _check_divergence(self, step: int, metrics: Dict[str, float]) -> None:
    """Raises TrainingDivergedError (before anything is saved) on a diverged loss or weights."""
    bad = [f'{k}={v}' for k, v in metrics.items() if not math.isfinite(v)]
    bad += [f'{k}={v:.3g}' for k, v in metrics.items()
            if k.endswith('loss') and math.isfinite(v) and abs(v) > LOSS_BOUND]
    if not bad:
      if self._weights_finite is None:
        variables = list(self.state.model.variables)
        self._weights_finite = tf.function(lambda: tf.reduce_all(
            [tf.reduce_all(tf.math.is_finite(v)) for v in variables]))
      if not bool(self._weights_finite()):
        bad = ['non-finite model weights']
    if bad:
      raise TrainingDivergedError(
          f'Training diverged at step {step}: {", ".join(bad)} (a loss above {LOSS_BOUND:g}, or '
          f'NaN/inf, counts as divergence). Stopped without saving or exporting; '
          f'{self._kept()}. Lower --learning_rate, check the data, or raise --temperature.')

  def _kept(self) -> str:
    """What a diverged run leaves: its last good checkpoint, or none."""
    found = find_checkpoints(self.state.save_dir)
    if found:
      return f'the last good checkpoint {found[0]} is kept'
    return (f'no checkpoint was saved before (none in {self.state.save_dir}), so a rerun '
            'starts from the beginning')

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
          f'{step} (loss scale now {scale:g}); stopped without saving; {self._kept()}. Lower '
          '--learning_rate, check the data, or train with --precision=mixed_bfloat16 or '
          'float32.')
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
    """The loop's summaries, into the writer `train` made the default (flushed here on a local
    disk; a remote writer flushes on its own timer)."""
    for name, value in metrics.items():
      tf.summary.scalar(f'train/{name}', value, step=step)
    if self.learning_rate_fn is not None:
      lr = self.learning_rate_fn(tf.constant(max(step - 1, 0), tf.float32))
      tf.summary.scalar('learning_rate', lr, step=step)
    if self._images is not None:  # The last step's augmented views.
      tf.summary.image('image', self._images.value(), step=step,
                       max_outputs=MAX_SUMMARY_IMAGES)
    if self._flush_each_loop:
      self.writer.flush()

