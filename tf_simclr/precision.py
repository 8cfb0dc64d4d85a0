"""Mixed precision: which Keras dtype policy a model is built with, and dynamic loss scaling.

`--precision` is `float32` (the original), `mixed_bfloat16` (TPUs, CPUs with avx512_bf16) or
`mixed_float16` (GPUs, with dynamic loss scaling). Variables are always float32, so checkpoints,
exports and the original's weights are the same files whatever the precision; only the compute
dtype of convolutions, dense layers and activations changes. The policy is applied per model
(`policy_scope` around its construction), never left as a global setting, so a distillation
teacher may compute in another precision than its student.

Kept in float32 whatever the policy: batch-norm statistics, scale and offset (under a 16-bit
policy BN runs TensorFlow's fused kernel, which reads and writes 16-bit activations and computes
in float32 inside: models/batch_norm.py), the projection head and the supervised head (float32
layers: they read the float32 `final_avg_pool` features and feed NT-Xent and softmaxes), NT-Xent
(`losses.nt_xent` casts), weight decay and LARS (float32 variables and gradients). So the 16-bit
step's only casts are one per convolution kernel (both views are one batch) and its gradient's,
the images in and the pooled features out (tests/test_precision.py pins this).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import keras
import tensorflow as tf

from tf_simclr import cpu_kernels
from tf_simclr import distribute
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


def loss_scale(optimizer):
  """The dynamic loss-scale variable of an optimizer `wrap_optimizer` wrapped, else None (the one
  test of "is this run loss-scaled", for the loop and the checkpoint)."""
  return optimizer.dynamic_scale if inner_optimizer(optimizer) is not optimizer else None


def cpu_advice(precision: str, bfloat16_units, onednn) -> str:
  """Why `precision` is slow on this CPU ('' where it is the fast choice), from whether the CPU
  has bfloat16 units (avx512_bf16/amx_bf16; None: unknown) and whether oneDNN is on.

  Measured (benchmarks/README.md): with bfloat16 units and oneDNN, mixed_bfloat16 without XLA
  took 0.70-0.74x the float32 step time, and XLA made every arm slower. Without bfloat16 units,
  bfloat16 was ~8x slower than float32 without XLA and no faster with it; float32 with oneDNN was
  the fast choice. TensorFlow's own (non-oneDNN) 16-bit convolution gradients are ~10x slower.
  """
  if precision == 'float32':
    return ''
  if precision == 'mixed_float16':
    return ('float16 is for GPUs: CPUs have no fast float16 arithmetic, so '
            '--precision=float32 (or mixed_bfloat16 on a CPU with avx512_bf16/amx_bf16) is faster')
  if bfloat16_units and onednn:
    return ''
  if bfloat16_units:
    return ('this CPU has bfloat16 units, but TensorFlow\'s oneDNN kernels are off '
            '(TF_ENABLE_ONEDNN_OPTS=0), and its own 16-bit convolution gradients are ~10x slower '
            'than float32: unset TF_ENABLE_ONEDNN_OPTS')
  reason = ('this CPU has no bfloat16 units (no avx512_bf16 or amx_bf16 flag)'
            if bfloat16_units is False else 'this CPU\'s flags cannot be read')
  return (f'{reason}, so bfloat16 only saves memory traffic; float32 with oneDNN kernels (run.py\'s '
          'default) is the fast choice on such a CPU (bfloat16 was ~8x slower without XLA and no '
          'faster with it)')


def warn_if_slow_on_cpu(precision: str, strategy) -> None:
  """Warns when training on a CPU in a precision that is slow there (see `cpu_advice`)."""
  on_cpu = not tf.config.list_physical_devices('GPU') and not distribute.is_tpu(strategy)
  if not on_cpu:
    return
  advice = cpu_advice(precision, cpu_kernels.has_bfloat16_units(), cpu_kernels.onednn_enabled())
  if advice:
    log.warning('--precision=%s: %s.', precision, advice)
