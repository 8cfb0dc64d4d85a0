"""Losses and metrics against independent numpy computations and a single-device run."""

import contextlib
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.distribute import distribute_lib
from tensorflow.python.distribute import mirrored_strategy

from tf_simclr import losses
from tf_simclr import metrics


def _logsumexp(x):
  m = np.max(x)
  return m + np.log(np.sum(np.exp(x - m)))


def _paper_nt_xent(hidden, temperature, hidden_norm):
  """The paper's L: mean over all 2N anchors of -log softmax over the 2N-1 other rows."""
  z = np.asarray(hidden, np.float64)
  if hidden_norm:
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
  two_n = z.shape[0]
  n = two_n // 2
  total = 0.0
  for i in range(two_n):
    positive = (i + n) % two_n
    others = [j for j in range(two_n) if j != i]  # 2N-2 negatives and the positive
    sims = np.array([z[i] @ z[j] / temperature for j in others])
    total += -(z[i] @ z[positive] / temperature) + _logsumexp(sims)
  return total / two_n


@pytest.mark.parametrize('hidden_norm', [True, False])
@pytest.mark.parametrize('temperature', [0.1, 0.5])
def test_nt_xent_is_twice_the_paper_loss(hidden_norm, temperature):
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(12, 5)).astype(np.float32)
  if not hidden_norm:
    hidden *= 0.3  # keep unnormalised logits in a numerically comfortable range
  loss, logits_ab, labels = losses.nt_xent(tf.constant(hidden), temperature, hidden_norm)
  expected = 2.0 * _paper_nt_xent(hidden, temperature, hidden_norm)
  np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)
  assert logits_ab.shape == (6, 6)
  np.testing.assert_array_equal(labels.numpy(), np.eye(6, 12))


def test_nt_xent_logits_ab_are_cross_view_similarities():
  rng = np.random.default_rng(1)
  hidden = rng.normal(size=(8, 3)).astype(np.float32)
  _, logits_ab, _ = losses.nt_xent(tf.constant(hidden), 0.2, hidden_norm=True)
  z = hidden / np.linalg.norm(hidden, axis=1, keepdims=True)
  np.testing.assert_allclose(logits_ab.numpy(), z[:4] @ z[4:].T / 0.2, rtol=1e-5, atol=1e-5)


def _replica_batches(views1, views2, replicas):
  """Each replica's local batch: [its slice of view 1; its slice of view 2]."""
  n = views1.shape[0] // replicas
  return [np.concatenate([views1[r * n:(r + 1) * n], views2[r * n:(r + 1) * n]])
          for r in range(replicas)]


def test_nt_xent_two_replicas_match_one_device(two_replica_strategy):
  strategy = two_replica_strategy
  replicas = strategy.num_replicas_in_sync
  rng = np.random.default_rng(2)
  views1 = rng.normal(size=(8, 6)).astype(np.float32)
  views2 = (views1 + 0.5 * rng.normal(size=(8, 6))).astype(np.float32)
  temperature = 0.2

  single = tf.keras.layers.Dense(4)
  x_global = tf.constant(np.concatenate([views1, views2]))
  single(x_global)
  with tf.GradientTape() as tape:
    expected_loss, _, _ = losses.nt_xent(single(x_global), temperature)
  expected_grads = tape.gradient(expected_loss, single.trainable_variables)

  with strategy.scope():
    dense = tf.keras.layers.Dense(4)
    dense(x_global)
    for v, w in zip(dense.weights, single.get_weights()):
      v.assign(w)

  batches = _replica_batches(views1, views2, replicas)
  inputs = strategy.experimental_distribute_values_from_function(
      lambda ctx: tf.constant(batches[ctx.replica_id_in_sync_group]))

  @tf.function
  def step(x):
    def replica_fn(local):
      with tf.GradientTape() as tape:
        loss, logits_ab, labels = losses.nt_xent(dense(local), temperature, strategy=strategy)
        scaled = loss / strategy.num_replicas_in_sync
      return loss, tape.gradient(scaled, dense.trainable_variables), logits_ab, labels
    loss, grads, logits_ab, labels = strategy.run(replica_fn, args=(x,))
    total = strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None) / replicas
    grads = [strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None) for g in grads]
    return total, grads, logits_ab, labels

  total, grads, logits_ab, labels = step(inputs)
  np.testing.assert_allclose(total.numpy(), expected_loss.numpy(), rtol=1e-5)
  for got, want in zip(grads, expected_grads):
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-6)
  # Replica r's anchors are global rows r*n..r*n+n-1: its labels are offset accordingly.
  local_labels = strategy.experimental_local_results(labels)
  for r, lab in enumerate(local_labels):
    np.testing.assert_array_equal(lab.numpy(), np.eye(16)[r * 4:(r + 1) * 4])
  assert strategy.experimental_local_results(logits_ab)[0].shape == (4, 8)


def _np_softmax(x):
  e = np.exp(x - x.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def test_supervised_loss_and_weight_decay():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(5, 4)).astype(np.float32)
  classes = rng.integers(0, 4, size=5)
  labels = np.eye(4, dtype=np.float32)[classes]
  expected = -np.mean(np.log(_np_softmax(logits.astype(np.float64))[np.arange(5), classes]))
  np.testing.assert_allclose(losses.supervised_loss(labels, logits).numpy(), expected, rtol=1e-5)

  a = tf.Variable(rng.normal(size=(3, 2)).astype(np.float32))
  b = tf.Variable(rng.normal(size=(4,)).astype(np.float32))
  expected = 1e-3 * 0.5 * (np.sum(a.numpy() ** 2) + np.sum(b.numpy() ** 2))
  np.testing.assert_allclose(losses.l2_weight_decay([a, b], 1e-3).numpy(), expected, rtol=1e-5)
  assert float(losses.l2_weight_decay([], 1e-3)) == 0.0


@pytest.mark.parametrize('temperature', [1.0, 2.5])
def test_distillation_loss_matches_numpy_and_stops_teacher_gradient(temperature):
  rng = np.random.default_rng(4)
  teacher = tf.constant(rng.normal(size=(6, 5)).astype(np.float32))
  student = tf.constant(rng.normal(size=(6, 5)).astype(np.float32))
  p_t = _np_softmax(teacher.numpy().astype(np.float64) / temperature)
  log_p_s = np.log(_np_softmax(student.numpy().astype(np.float64) / temperature))
  expected = np.mean(-np.sum(p_t * log_p_s, axis=1))
  with tf.GradientTape(persistent=True) as tape:
    tape.watch([teacher, student])
    loss = losses.distillation_loss(teacher, student, temperature)
  np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)
  assert tape.gradient(loss, teacher) is None
  # d loss / d student = (softmax(s/T) - softmax(t/T)) / (T * batch)
  want = (np.exp(log_p_s) - p_t) / (temperature * 6)
  np.testing.assert_allclose(tape.gradient(loss, student).numpy(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('temperature', [1.0, 0.1, 2.5])
def test_distillation_loss_against_the_original_colab_formula(temperature):
  """The authors' v2 recipe (tf2/colabs/distillation_self_training.ipynb, `add_kd_loss`):
  mean over the batch of T^2 * H(softmax(teacher/T), softmax(student/T)), written here in numpy
  from that formula, loss and gradient. --distill_loss_scale=t_squared is that formula at every T;
  the default (SimCLRv2 Eq. 2) is it divided by T^2: equal at T = 1, 100x larger at T = 0.1
  (docs/differences.md)."""
  rng = np.random.default_rng(7)
  teacher = rng.normal(scale=3.0, size=(8, 10)).astype(np.float32)
  student = tf.constant(rng.normal(scale=3.0, size=(8, 10)).astype(np.float32))
  t = teacher.astype(np.float64) / temperature
  s = student.numpy().astype(np.float64) / temperature
  p_t = np.exp(t - t.max(1, keepdims=True))
  p_t /= p_t.sum(1, keepdims=True)
  log_p_s = s - s.max(1, keepdims=True)
  log_p_s -= np.log(np.exp(log_p_s).sum(1, keepdims=True))
  colab = np.mean(temperature ** 2 * -np.sum(p_t * log_p_s, axis=1))
  # d colab / d student = T^2 (softmax(s/T) - softmax(t/T)) / (T * batch)
  colab_grad = temperature * (np.exp(log_p_s) - p_t) / 8
  got = {}
  for scale in ('none', 't_squared'):
    with tf.GradientTape() as tape:
      tape.watch(student)
      loss = losses.distillation_loss(teacher, student, temperature, scale=scale)
    got[scale] = (float(loss), tape.gradient(loss, student).numpy())
  np.testing.assert_allclose(got['t_squared'][0], colab, rtol=1e-5)
  np.testing.assert_allclose(got['t_squared'][1], colab_grad, rtol=1e-4,
                             atol=1e-6 * np.abs(colab_grad).max())
  np.testing.assert_allclose(got['none'][0] * temperature ** 2, colab, rtol=1e-5)
  np.testing.assert_allclose(got['none'][1] * temperature ** 2, colab_grad, rtol=1e-4,
                             atol=1e-6 * np.abs(colab_grad).max())
  if temperature != 1.0:
    assert not np.isclose(got['none'][0], colab, rtol=1e-2)
  with pytest.raises(ValueError, match='scale'):
    losses.distillation_loss(teacher, student, temperature, scale='t2')


def test_mixed_distillation_loss_uses_only_labeled_examples():
  rng = np.random.default_rng(5)
  teacher = rng.normal(size=(4, 3)).astype(np.float32)
  student = rng.normal(size=(4, 3)).astype(np.float32)
  classes = np.array([0, 2, 1, 1])
  labels = np.eye(3, dtype=np.float32)[classes]
  mask = np.array([1, 0, 1, 0], np.float32)
  temperature, weight = 2.0, 0.3
  p_t = _np_softmax(teacher.astype(np.float64) / temperature)
  distill = np.mean(-np.sum(p_t * np.log(_np_softmax(student.astype(np.float64) / temperature)),
                            axis=1))
  nll = -np.log(_np_softmax(student.astype(np.float64))[np.arange(4), classes])
  label_term = (nll[0] + nll[2]) / 2
  got = losses.mixed_distillation_loss(teacher, student, labels, mask, temperature, weight)
  np.testing.assert_allclose(got.numpy(), (1 - weight) * distill + weight * label_term, rtol=1e-5)
  none = losses.mixed_distillation_loss(teacher, student, labels, np.zeros(4, np.float32),
                                        temperature, weight)
  np.testing.assert_allclose(none.numpy(), (1 - weight) * distill, rtol=1e-5)
  # t_squared scales the distillation term only, not the label term.
  scaled = losses.mixed_distillation_loss(teacher, student, labels, mask, temperature, weight,
                                          scale='t_squared')
  np.testing.assert_allclose(scaled.numpy(),
                             (1 - weight) * temperature ** 2 * distill + weight * label_term,
                             rtol=1e-5)


def test_metrics():
  logits_ab = np.array([[3.0, 1.0, 0.0], [0.0, 1.0, 2.0], [0.5, 0.1, 4.0]], np.float32)
  labels = np.eye(3, 6, dtype=np.float32)  # positives at 0, 1, 2: the 1st and 3rd are right
  np.testing.assert_allclose(metrics.contrastive_accuracy(logits_ab, labels).numpy(), 2 / 3)
  p = _np_softmax(logits_ab.astype(np.float64))
  entropy = np.mean(-np.sum(p * np.log(p + 1e-8), axis=1))
  np.testing.assert_allclose(metrics.contrastive_entropy(logits_ab).numpy(), entropy, rtol=1e-5)
  onehot = np.eye(3, dtype=np.float32)[[1, 1, 1]]
  # Class 1 ranks 2nd, 2nd and 3rd in the three rows.
  np.testing.assert_array_equal(metrics.top_k_correct(onehot, logits_ab, 1).numpy(), [0, 0, 0])
  np.testing.assert_array_equal(metrics.top_k_correct(onehot, logits_ab, 2).numpy(), [1, 1, 0])
  np.testing.assert_allclose(metrics.top_k_accuracy(onehot, logits_ab, 3).numpy(), 1.0)


@contextlib.contextmanager
def _no_merge_call():
  """MirroredStrategy as in an XLA-compiled step on GPUs (its replica-context all-reduce launches
  collectives directly), with any merge_call an error."""
  def forbidden(*args, **kwargs):
    raise AssertionError('merge_call')
  with mock.patch.object(mirrored_strategy.MirroredExtended, '_use_merge_call',
                         lambda self: False), \
       mock.patch.object(distribute_lib.ReplicaContext, 'merge_call', forbidden):
    yield


def test_cross_replica_concat_is_an_exact_gather(two_replica_strategy):
  strategy = two_replica_strategy
  rng = np.random.default_rng(3)
  parts = [rng.normal(size=(3, 2, 5)).astype(np.float32) for _ in range(2)]
  parts[1][0, 0, 0] = -0.0
  values = strategy.experimental_distribute_values_from_function(
      lambda ctx: tf.constant(parts[ctx.replica_id_in_sync_group]))

  @tf.function
  def gather(x):
    return strategy.run(lambda v: losses.cross_replica_concat(
        v, tf.distribute.get_replica_context()), args=(x,))

  for local in strategy.experimental_local_results(gather(values)):
    assert local.shape == (6, 2, 5)
    np.testing.assert_array_equal(local.numpy(), np.concatenate(parts))  # bit for bit


def test_nt_xent_gather_runs_without_merge_call(two_replica_strategy):
  """The loss and gradients on 2 replicas with merge_call forbidden equal the single-device ones;
  the all_gather it replaced cannot run that way."""
  strategy = two_replica_strategy
  rng = np.random.default_rng(4)
  views1 = rng.normal(size=(8, 6)).astype(np.float32)
  views2 = (views1 + 0.5 * rng.normal(size=(8, 6))).astype(np.float32)
  weights = rng.normal(size=(6, 4)).astype(np.float32)
  x_global = tf.constant(np.concatenate([views1, views2]))
  w = tf.Variable(weights)
  with tf.GradientTape() as tape:
    expected_loss, _, _ = losses.nt_xent(x_global @ w, 0.2)
  expected_grad = tape.gradient(expected_loss, w).numpy()

  batches = _replica_batches(views1, views2, 2)
  inputs = strategy.experimental_distribute_values_from_function(
      lambda ctx: tf.constant(batches[ctx.replica_id_in_sync_group]))
  w_local = tf.constant(weights)

  @tf.function
  def step(x):
    def replica_fn(local):
      with tf.GradientTape() as tape:
        tape.watch(w_local)
        loss, _, _ = losses.nt_xent(local @ w_local, 0.2, strategy=strategy)
        scaled = loss / 2
      return loss, tape.gradient(scaled, w_local)
    return strategy.run(replica_fn, args=(x,))

  with _no_merge_call():
    loss, grad = step(inputs)
  total = sum(v.numpy() for v in strategy.experimental_local_results(loss)) / 2
  np.testing.assert_allclose(total, expected_loss.numpy(), rtol=1e-5)
  summed = sum(g.numpy() for g in strategy.experimental_local_results(grad))
  np.testing.assert_allclose(summed, expected_grad, rtol=1e-4, atol=1e-6)

  @tf.function
  def all_gather(x):
    return strategy.run(lambda v: tf.distribute.get_replica_context().all_gather(v, 0),
                        args=(x,))
  with _no_merge_call(), pytest.raises(AssertionError, match='merge_call'):
    all_gather(inputs)
