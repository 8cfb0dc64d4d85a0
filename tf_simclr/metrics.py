"""The original's training metrics as pure functions of tensors (each a mean over the batch).

Keras metric objects that accumulate these over steps and replicas belong to the training task.
"""

from __future__ import annotations

import tensorflow as tf


def contrastive_accuracy(logits_ab: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
  """Fraction of anchors whose most similar other-view row is their own positive.

  `labels` is nt_xent's (N, 2*global_N) one-hot; the positive always lies in the first global_N
  columns, which `logits_ab` covers.
  """
  correct = tf.equal(tf.argmax(labels, 1), tf.argmax(logits_ab, 1))
  return tf.reduce_mean(tf.cast(correct, tf.float32))


def contrastive_entropy(logits_ab: tf.Tensor) -> tf.Tensor:
  """Mean entropy of softmax(logits_ab), with the original's +1e-8 inside the log."""
  probs = tf.nn.softmax(tf.cast(logits_ab, tf.float32))
  return -tf.reduce_mean(tf.reduce_sum(probs * tf.math.log(probs + 1e-8), -1))


def top_k_correct(labels_onehot: tf.Tensor, logits: tf.Tensor, k: int) -> tf.Tensor:
  """Per-example 1.0 when the true class is among the k largest logits, else 0.0."""
  targets = tf.cast(tf.argmax(labels_onehot, 1), tf.int32)
  hits = tf.math.in_top_k(targets, tf.cast(logits, tf.float32), k)
  return tf.cast(hits, tf.float32)


def top_k_accuracy(labels_onehot: tf.Tensor, logits: tf.Tensor, k: int = 1) -> tf.Tensor:
  """Mean of `top_k_correct` over the batch."""
  return tf.reduce_mean(top_k_correct(labels_onehot, logits, k))
