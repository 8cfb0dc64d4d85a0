"""Mixed precision: which Keras dtype policy a model is built with, and dynamic loss scaling.

`--precision` is `float32` (the original), `mixed_bfloat16` (TPUs, CPUs with avx512_bf16) or
`mixed_float16` (GPUs, with dynamic loss scaling). Variables are always float32, so checkpoints,
exports and the original's weights are the same files whatever the precision; only the compute
dtype of convolutions, dense layers and activations changes. The policy is applied per model
(`policy_scope` around its construction), never left as a global setting, so a distillation
teacher may compute in another precision than its student.

Kept in float32 whatever the policy: batch-norm statistics and normalisation (Keras computes BN
in float32), the supervised head (its logits feed softmaxes), the `final_avg_pool` features and
the projections (cast in `SimCLRModel.call`), NT-Xent (`losses.nt_xent` casts), weight decay and
LARS (they read float32 variables and float32 gradients).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import keras
import tensorflow as tf

from tf_simclr import cpu_kernels
from tf_simclr.config import PRECISIONS

log = logging.getLogger(__name__)


@contextlib.contextmanager
def policy_scope(precision: str) -> Iterator[None]:
  """Layers created inside take the `precision` dtype policy; the global policy is restored."""
  if precision not in PRECISIONS:
    raise ValueError(f'precision={precision!r} is not one of {list(PRECISIONS)}.')
  previous = keras.config.dtype_policy()
  keras.config.set_dtype_policy(precision)
  try:
    yield
  finally:
    keras.config.set_dtype_policy(previous)


def needs_loss_scaling(precision: str) -> bool:
  """float16 gradients underflow without loss scaling; bfloat16 has float32's range."""
  return precision == 'mixed_float16'


class LossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
  """Keras' dynamic loss scaling with one skip decision shared by every replica.

  Keras checks each replica's local (not yet all-reduced) gradients, so replicas could disagree
  on skipping a step (one applies, all-reducing with peers that do not). Here the local verdicts
  are all-reduced first: a step is skipped everywhere as soon as one replica overflows, which is
  also what the summed gradient would show.
  """

  def check_finite(self, grads):
    finite = super().check_finite(grads)
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
      bad = context.all_reduce(tf.distribute.ReduceOp.SUM,
                               tf.cast(tf.logical_not(finite), tf.float32))
      finite = tf.equal(bad, 0.0)
    return finite


def wrap_optimizer(optimizer, precision: str):
  """`optimizer` with dynamic loss scaling when `precision` needs it, else unchanged."""
  if needs_loss_scaling(precision):
    return LossScaleOptimizer(optimizer)
  return optimizer


def inner_optimizer(optimizer):
  """The optimizer doing the updates (the wrapped one under loss scaling): what checkpoints hold,
  so a checkpoint's optimizer slots are the same whatever the precision."""
  return getattr(optimizer, 'inner_optimizer', optimizer)


def warn_if_slow_on_cpu(precision: str, jit_compile: bool, strategy) -> None:
  """Warns where 16-bit precision makes a CPU run slower (benchmarks/README.md): without XLA,
  TensorFlow's bfloat16/float16 convolution gradients are an order of magnitude slower than
  float32; with XLA, a CPU without bfloat16 units is no faster than float32 with oneDNN."""
  on_cpu = (not tf.config.list_physical_devices('GPU')
            and not isinstance(strategy, tf.distribute.TPUStrategy))
  if not on_cpu or precision == 'float32':
    return
  if not jit_compile:
    log.warning('--precision=%s on a CPU without --jit_compile: TensorFlow\'s 16-bit convolution '
                'gradients are about 10x slower than float32 here; add --jit_compile=True (or '
                'use --precision=float32).', precision)
  if cpu_kernels.has_bfloat16_units() is False:
    log.warning('--precision=%s: this CPU has no bfloat16 units (no avx512_bf16 or amx_bf16), '
                'so 16 bits only saves memory traffic; float32 with oneDNN kernels (run.py\'s '
                'default) was as fast or faster on such a CPU (benchmarks/README.md).', precision)
