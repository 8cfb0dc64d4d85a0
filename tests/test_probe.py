"""kNN and linear probe on frozen features, against independent numpy computations."""

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tf_simclr import config as cfg
from tf_simclr.data import datasets, subsets
from tf_simclr.data import pipeline as pipeline_lib
from tf_simclr.models import resnet
from tf_simclr.evaluation import probe
from tf_simclr import weights
from tf_simclr.models import simclr

from helpers import tiny_config


def numpy_knn_predictions(bank, bank_labels, queries, num_classes, k, temperature):
  """Per query: the set of classes with the largest vote (several when votes tie exactly)."""
  bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
  queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  out = []
  for q in queries.astype(np.float64):
    sim = bank.astype(np.float64) @ q
    order = sorted(range(len(sim)), key=lambda i: (-sim[i], i))[:k]  # Ties: lower bank index.
    votes = np.zeros(num_classes)
    for i in order:
      votes[bank_labels[i]] += np.exp(sim[i] / temperature)
    out.append(set(np.flatnonzero(votes >= votes.max() * (1 - 1e-9))))
  return out


def test_knn_matches_numpy_with_ties():
  rng = np.random.default_rng(0)
  # One entry of +-1 in 16 coordinates: every similarity is one product (or an exact 0), so
  # equal vectors give bitwise-equal similarities whatever the kernel's rounding, summation order
  # or FMA use (several nonzero terms tie only up to an ulp, which oneDNN and Eigen round
  # differently), and many neighbours tie; duplicated bank rows with different labels tie too.
  def vectors(n):
    v = np.zeros([n, 16], np.float32)
    v[np.arange(n), rng.integers(0, 16, n)] = rng.choice([-1.0, 1.0], n)
    return v
  bank = vectors(60)
  bank = np.concatenate([bank, bank[:20]])
  bank_labels = rng.integers(0, 4, len(bank))
  queries = np.concatenate([vectors(40), 3.0 * bank[:10]])  # Scaled copies: sim exactly 1.
  for k in (1, 7, 200):
    votes = probe.knn_votes(bank, bank_labels, queries, 4, k=k, temperature=0.1,
                            chunk_elements=3 * len(bank))  # 3 queries per chunk.
    want = numpy_knn_predictions(bank, bank_labels, queries, 4, k, 0.1)
    got = np.argmax(votes, axis=1)
    assert all(g in w for g, w in zip(got, want)), k
    assert sum(len(w) > 1 for w in want) < len(want)  # Mostly unambiguous, so the check bites.


def test_select_bank_is_class_balanced_and_seeded():
  labels = np.repeat(np.arange(5), [50, 40, 30, 20, 3])
  idx = subsets.select_bank(labels, 40, seed=1)
  counts = np.bincount(labels[idx], minlength=5)
  assert len(idx) == 40 and len(np.unique(idx)) == 40
  assert counts[4] == 3 and counts[:4].max() - counts[:4].min() <= 1
  np.testing.assert_array_equal(idx, subsets.select_bank(labels, 40, seed=1))
  assert not np.array_equal(idx, subsets.select_bank(labels, 40, seed=2))


def numpy_newton_logistic(x, y, num_classes, l2, iterations=30):
  """Independent fit: Newton's method with the exact Hessian, float64."""
  n, d = x.shape
  x1 = np.hstack([x, np.ones([n, 1])])
  reg = np.kron(np.r_[np.full(d, l2), 0.0], np.ones(num_classes))  # (d+1)*C, row-major W.
  w = np.zeros((d + 1) * num_classes)
  onehot = np.eye(num_classes)[y]
  for _ in range(iterations):
    logits = x1 @ w.reshape(d + 1, num_classes)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = (x1.T @ (p - onehot) / n).reshape(-1) + reg * w
    curv = (np.einsum('nc,ce->nce', p, np.eye(num_classes)) - np.einsum('nc,ne->nce', p, p))
    hess = np.einsum('ni,nj,nce->icje', x1, x1, curv).reshape(grad.size, grad.size) / n
    w = w - np.linalg.solve(hess + np.diag(reg) + 1e-12 * np.eye(grad.size), grad)
  return w.reshape(d + 1, num_classes)


def _blobs(n, d, num_classes, spread, seed):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=[num_classes, d])
  y = rng.integers(0, num_classes, n)
  return (centres[y] + spread * rng.normal(size=[n, d])).astype(np.float32), y


def test_logistic_fit_agrees_with_newton():
  x, y = _blobs(400, 6, 4, 1.2, seed=0)
  fit = probe.fit_logistic_regression(x, y, 4, l2=1e-2)
  want = numpy_newton_logistic(x.astype(np.float64), y, 4, 1e-2)
  assert fit.converged
  # The softmax is invariant to a per-feature shift of W across classes; the penalty pins W, and
  # the bias up to a constant.
  np.testing.assert_allclose(fit.weights, want[:-1], atol=2e-4)
  np.testing.assert_allclose(fit.bias - fit.bias.mean(), want[-1] - want[-1].mean(), atol=2e-4)


def test_linear_probe_agrees_with_independent_fit_within_a_point():
  x, y = _blobs(1200, 8, 5, 1.5, seed=1)
  train_x, train_y, test_x, test_y = x[:800], y[:800], x[800:], y[800:]
  got = probe.linear_probe(train_x, train_y, test_x, test_y, 5, l2_grid=(1e-3, 1e-2, 1e-1))
  mean, std = train_x.mean(0), train_x.std(0)
  w = numpy_newton_logistic((train_x - mean) / std, train_y, 5, got[probe.PROBE_L2])
  scores = np.hstack([(test_x - mean) / std, np.ones([len(test_x), 1])]) @ w
  want = np.mean(np.argmax(scores, 1) == test_y)
  assert 0.5 < want < 0.99  # Not trivially separable: agreement means something.
  assert abs(got[probe.PROBE_TOP1] - want) <= 0.01
  assert got[probe.PROBE_TOP5] == 1.0  # 5 classes.


def test_linear_probe_separates_separable_features():
  rng = np.random.default_rng(2)
  # Labels are the argmax of a random linear map: separable, with no margin to spare.
  x = rng.normal(size=[600, 10]).astype(np.float32)
  y = np.argmax(x @ rng.normal(size=[10, 6]), axis=1)
  got = probe.linear_probe(x[:500], y[:500], x[:500], y[:500], 6, l2_grid=(1e-6,),
                           max_iterations=3000)
  assert got[probe.PROBE_TOP1] == 1.0


def _readout_features(strategy, batch_size):
  source = datasets.resolve_dataset('shapes10')
  data = cfg.DataConfig(dataset='shapes10', train_split='train[:37]', eval_split='test[:29]',
                        image_size=16)
  tf.keras.utils.set_random_seed(3)
  with strategy.scope():
    encoder = resnet.resnet(18, width_multiplier=0.125, cifar_stem=True)
    encoder(tf.zeros([2, 16, 16, 3]), training=False)
  weights = encoder.get_weights()
  readout = probe.Readout(source, data, strategy, batch_size, 10, k=5, max_train_examples=30)
  return readout, encoder, weights


@pytest.mark.slow
def test_two_replicas_equal_one_device(two_replica_strategy):
  one, enc1, w = _readout_features(tf.distribute.get_strategy(), 8)
  two, enc2, _ = _readout_features(two_replica_strategy, 8)
  enc2.set_weights(w)
  x1, y1 = one.features(enc1, 'test[:29]')
  x2, y2 = two.features(enc2, 'test[:29]')
  assert x1.shape[0] == 29 and x2.shape[0] == 29  # Exact counts: no padding or duplicates.
  np.testing.assert_array_equal(y1, y2)
  np.testing.assert_array_equal(y1, datasets.resolve_dataset('shapes10').labels('test[:29]'))
  np.testing.assert_allclose(x1, x2, rtol=1e-4, atol=1e-5)
  assert len(one.train_indices) == 30
  r1 = one.run(enc1, knn=True, linear=True)
  r2 = two.run(enc2, knn=True, linear=True)
  assert r1[probe.KNN_TOP1] == r2[probe.KNN_TOP1]
  assert abs(r1[probe.PROBE_TOP1] - r2[probe.PROBE_TOP1]) <= 1 / 29


@pytest.mark.slow
def test_pretrain_then_eval_and_probe_mode_write_the_readouts(tmp_path):
  from tf_simclr.run import modes
  config = tiny_config(
      tmp_path, train__mode='train_then_eval', train__train_steps=2, train__eval_batch_size=16,
      model__width_multiplier=0.125, data__train_split='train[:48]', data__eval_split='test[:24]',
      probe__knn=None, probe__linear_probe=None, probe__random_init_baseline=True,
      probe__knn_k=10)
  stored = modes.run(config, flags_dict={'resnet_depth': 18},
                          export_fn=modes.no_export)
  for key in ('eval/knn_top_1_accuracy', 'eval/linear_probe_top_1_accuracy',
              'eval/linear_probe_top_5_accuracy', 'eval/random_init/knn_top_1_accuracy',
              'eval/random_init/linear_probe_top_1_accuracy', 'eval/label_top_1_accuracy'):
    assert 0 <= stored[key] <= 1, key
  assert json.load(open(tmp_path / 'result.json')) == stored
  # The kNN number against numpy: the checkpoint's encoder called on the eval-preprocessed images
  # (not through the readout's feature step), then a weighted vote of 10 neighbours in numpy.
  model = simclr.build_model(config.model, 10)
  model.build_for_size(16)
  weights.match.load(model, str(tmp_path / 'ckpt-2'))
  source = datasets.resolve_from_config(config.data)

  def features(split):
    data = dataclasses.replace(config.data, eval_split=split)
    rows = [(model(x, training=False)[simclr.FINAL_AVG_POOL].numpy(), y.numpy())
            for x, y in pipeline_lib.make_eval_dataset(source, data, 16)]
    x, y = (np.concatenate(part) for part in zip(*rows))
    return x / np.linalg.norm(x, axis=1, keepdims=True), (y.argmax(1) if y.ndim == 2 else y)

  bank, bank_y = features('train[:48]')
  query, query_y = features('test[:24]')
  sims = query @ bank.T
  top = np.argsort(-sims, axis=1, kind='stable')[:, :10]
  votes = np.zeros((len(query), 10))
  for i, row in enumerate(top):
    np.add.at(votes[i], bank_y[row], np.exp(sims[i, row] / 0.1))
  assert stored['eval/knn_top_1_accuracy'] == pytest.approx(
      np.mean(votes.argmax(1) == query_y), abs=1 / 24 + 1e-9)  # one near-tie may flip
  # --mode=probe of the same model_dir: same features, same kNN; no flags.json of its own.
  os.remove(tmp_path / 'flags.json')
  probed = modes.run(dataclasses.replace(
      config, train=dataclasses.replace(config.train, mode='probe'),
      probe=dataclasses.replace(config.probe, random_init_baseline=False)),
      export_fn=modes.no_export)
  assert probed['eval/knn_top_1_accuracy'] == stored['eval/knn_top_1_accuracy']
  assert probed['eval/label_top_1_accuracy'] == stored['eval/label_top_1_accuracy']  # kept
  assert not (tmp_path / 'flags.json').exists()


def test_feature_batches_are_padded_and_only_images_reach_the_replicas(two_replica_strategy):
  """21 examples, global batch 8 on 2 replicas: every replica computation sees a full static
  [4, 32, 32, 3] float image batch and nothing else; padded rows (last batch: 1 real + 3) never
  come out; features equal per-channel means computed from the raw images in numpy."""
  strategy = two_replica_strategy
  source = datasets.resolve_dataset('shapes10')
  data = cfg.DataConfig(dataset='shapes10', eval_split='test', image_size=32)
  seen = []

  def encoder(images, training):
    assert not training
    seen.append((tuple(images.shape), images.dtype))
    return tf.reduce_mean(images, axis=[1, 2])

  readout = probe.Readout(source, data, strategy, 8, 10)
  features, labels = readout.features(encoder, 'test[:21]')
  assert set(seen) == {((4, 32, 32, 3), tf.float32)}  # traced once per replica
  raw = np.stack([image for image, _ in source.as_dataset('test[:21]').as_numpy_iterator()])
  np.testing.assert_allclose(features, raw.astype(np.float64).mean(axis=(1, 2)) / 255,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(labels, source.labels('test[:21]'))
  dataset = pipeline_lib.build_feature_dataset(source, data, 'test[:21]', 8, strategy)
  batches = list(dataset)
  valid = [v.numpy() for b in batches for v in strategy.experimental_local_results(b[3])]
  assert [int(v.sum()) for v in valid] == [4, 4, 4, 4, 4, 1] and all(len(v) == 4 for v in valid)
  index = [i.numpy() for b in batches for i in strategy.experimental_local_results(b[0])]
  assert index[0].dtype == np.int32 and list(index[-1]) == [20, -1, -1, -1]
