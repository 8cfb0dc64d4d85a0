"""SimCLR objectives as pure functions: tensors in, tensors out (no metrics, no logging).

`nt_xent` is the original's `add_contrastive_loss`, including its scale: the returned loss is the
mean over local anchors of loss_a + loss_b, i.e. twice the paper's L, so the original recipes'
learning rates carry over unchanged. Across replicas, each replica scores its own anchors
against the negatives of every replica, gathered as the original's `cross_replica_concat`: each
replica places its rows in its own slot of a zero tensor (one-hot) and the slots are summed with
`ReplicaContext.all_reduce`, whose gradient sums the upstream gradients of all replicas. So
dividing each replica's loss by the number of replicas and summing gradients reproduces the
single-device gradient exactly. Unlike `all_gather` (always a `merge_call`), `all_reduce` has a
path without `merge_call`, the one MirroredStrategy takes in an XLA-compiled step on GPUs.
"""

from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf

from tf_simclr.config import DISTILL_LOSS_SCALES

# Subtracted from an anchor's similarity with itself, so it never counts as a negative.
LARGE_NUM = 1e9


def _static_or_dynamic_rows(x: tf.Tensor):
  """x's number of rows: a Python int when the shape is static, else a scalar tensor."""
  return x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]


def cross_replica_concat(tensor: tf.Tensor, context: tf.distribute.ReplicaContext) -> tf.Tensor:
  """All replicas' `tensor` concatenated on axis 0, in replica order (replica context only).

  A one-hot placement plus an all-reduce SUM (the original's objective.py): adding zeros is
  exact, so the result equals an all-gather bit for bit.
  """
  replicas = context.num_replicas_in_sync
  replica_id = tf.cast(context.replica_id_in_sync_group, tf.int32)
  placed = tf.scatter_nd(indices=[[replica_id]], updates=[tensor],
                         shape=tf.concat([[replicas], tf.shape(tensor)], 0))
  placed = context.all_reduce(tf.distribute.ReduceOp.SUM, placed)
  return tf.reshape(placed, [-1] + placed.shape.as_list()[2:])  # static where known (XLA)


def _cross_replica_views(hidden1: tf.Tensor, hidden2: tf.Tensor,
                         strategy: Optional[tf.distribute.Strategy]):
  """Returns (hidden1_all, hidden2_all, offset): global views and this replica's first row."""
  if strategy is None or strategy.num_replicas_in_sync <= 1:
    return hidden1, hidden2, tf.constant(0, tf.int32)
  context = tf.distribute.get_replica_context()
  if context is None or context.num_replicas_in_sync <= 1:
    raise ValueError(
        'nt_xent(strategy=...) with more than one replica must run inside strategy.run() (a '
        'replica context), where the other replicas\' projections can be gathered; call it from '
        'the per-replica step function, or pass strategy=None for a single-device loss.')
  both = cross_replica_concat(tf.stack([hidden1, hidden2], axis=1), context)  # one all-reduce
  hidden1_all, hidden2_all = both[:, 0], both[:, 1]
  # Every replica has the same local batch (the pipelines drop remainders), as the original's
  # replica_id * batch_size: a static-shape offset, which XLA/TPU compilation needs.
  replica_id = tf.cast(context.replica_id_in_sync_group, tf.int32)
  offset = replica_id * _static_or_dynamic_rows(hidden1)
  return hidden1_all, hidden2_all, offset


def nt_xent(hidden: tf.Tensor, temperature: float, hidden_norm: bool = True,
            strategy: Optional[tf.distribute.Strategy] = None):
  """Normalised temperature-scaled cross-entropy (the SimCLR contrastive loss).

  Args:
    hidden: (2N, d) projections, the first view's N rows then the second view's N rows.
    temperature: softmax temperature tau.
    hidden_norm: L2-normalise the projections first (cosine similarity).
    strategy: with more than one replica, negatives come from every replica's batch.

  Returns:
    (loss, logits_ab, labels), all float32: the scalar loss over the local anchors (mean of loss_a + loss_b,
    twice the paper's L), the (N, global_N) view1-vs-view2 logits, and one-hot (N, 2*global_N)
    labels whose positive is the matching row of the other view.
  """
  # float32 even under mixed precision: -LARGE_NUM and the softmax need the range.
  hidden = tf.cast(hidden, tf.float32)
  if hidden_norm:
    hidden = tf.math.l2_normalize(hidden, -1)
  hidden1, hidden2 = tf.split(hidden, 2, 0)
  batch_size = _static_or_dynamic_rows(hidden1)
  hidden1_all, hidden2_all, offset = _cross_replica_views(hidden1, hidden2, strategy)
  global_batch = _static_or_dynamic_rows(hidden1_all)

  positives = tf.range(batch_size) + offset
  labels = tf.one_hot(positives, global_batch * 2, dtype=hidden.dtype)
  self_mask = tf.one_hot(positives, global_batch, dtype=hidden.dtype)

  logits_aa = tf.matmul(hidden1, hidden1_all, transpose_b=True) / temperature
  logits_aa -= self_mask * LARGE_NUM
  logits_bb = tf.matmul(hidden2, hidden2_all, transpose_b=True) / temperature
  logits_bb -= self_mask * LARGE_NUM
  logits_ab = tf.matmul(hidden1, hidden2_all, transpose_b=True) / temperature
  logits_ba = tf.matmul(hidden2, hidden1_all, transpose_b=True) / temperature

  loss_a = tf.nn.softmax_cross_entropy_with_logits(labels, tf.concat([logits_ab, logits_aa], 1))
  loss_b = tf.nn.softmax_cross_entropy_with_logits(labels, tf.concat([logits_ba, logits_bb], 1))
  loss = tf.reduce_mean(loss_a + loss_b)
  return loss, logits_ab, labels


def supervised_loss(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
  """Mean softmax cross-entropy over the local batch; `labels` are one-hot (or soft)."""
  labels = tf.cast(labels, logits.dtype)
  return tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels, logits))


def distillation_loss(teacher_logits: tf.Tensor, student_logits: tf.Tensor,
                      temperature: float = 1.0, scale: str = 'none') -> tf.Tensor:
  """SimCLRv2 Eq. 2: mean over the batch of H(softmax(teacher/T), softmax(student/T)).

  `scale='t_squared'` multiplies it by T^2, as the authors' colab `add_kd_loss` and Hinton et al.
  (2015) do (same at T = 1; at T = 0.1 the loss and its gradients are 100x smaller). The
  teacher's distribution is a constant (no gradient flows into the teacher).
  """
  if scale not in DISTILL_LOSS_SCALES:
    raise ValueError(f'distillation_loss: scale={scale!r} is not one of '
                     f'{list(DISTILL_LOSS_SCALES)}.')
  student_logits = tf.convert_to_tensor(student_logits)
  teacher_probs = tf.stop_gradient(
      tf.nn.softmax(tf.cast(teacher_logits, student_logits.dtype) / temperature))
  loss = tf.reduce_mean(
      tf.nn.softmax_cross_entropy_with_logits(teacher_probs, student_logits / temperature))
  return loss * temperature ** 2 if scale == 't_squared' else loss


def mixed_distillation_loss(teacher_logits: tf.Tensor, student_logits: tf.Tensor,
                            labels: tf.Tensor, label_mask: tf.Tensor, temperature: float,
                            label_weight: float, scale: str = 'none') -> tf.Tensor:
  """SimCLRv2 Eq. 3: (1 - label_weight) * distillation + label_weight * label loss.

  `label_weight` is the paper's 1 - alpha. The label term is the cross-entropy of the student's
  untempered logits with the one-hot `labels`, averaged over the examples whose `label_mask` is
  1 (0 when the batch has none); the distillation term covers every example.
  """
  student_logits = tf.convert_to_tensor(student_logits)
  distill = distillation_loss(teacher_logits, student_logits, temperature, scale)
  mask = tf.cast(tf.reshape(label_mask, [-1]), student_logits.dtype)
  per_example = tf.nn.softmax_cross_entropy_with_logits(
      tf.cast(labels, student_logits.dtype), student_logits)
  label_loss = tf.math.divide_no_nan(tf.reduce_sum(per_example * mask), tf.reduce_sum(mask))
  return (1.0 - label_weight) * distill + label_weight * label_loss


def l2_weight_decay(variables: Sequence[tf.Variable], weight_decay: float) -> tf.Tensor:
  """weight_decay * sum of ||v||^2 / 2 over `variables` (0.0 for none), as added to the loss."""
  if not variables:
    return tf.constant(0.0)
  return weight_decay * tf.add_n([tf.nn.l2_loss(v) for v in variables])
