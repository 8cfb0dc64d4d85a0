"""Representation readouts on frozen features: a weighted kNN and a linear probe.

Both read the encoder's `final_avg_pool` features, computed once per split in inference mode
(`extract_features`), so they measure the representation itself, unlike the online head trained
while pretraining. They work on any weights the model holds (ours, an export, the original's).

- kNN (Wu et al. 2018, as solo-learn's monitor): L2-normalised features, the k most cosine-similar
  bank examples vote for their class with weight exp(similarity / temperature). The bank is the
  train split with eval preprocessing (optionally a class-balanced, seeded subset); queries are the
  eval split. Similarities are computed in chunks of queries: memory is O(chunk x bank).
- Linear probe (the CLIP paper's protocol): features standardised with train statistics,
  multinomial logistic regression with an L2 penalty fit to convergence by full-batch L-BFGS; the
  penalty is chosen on a held-out, seeded part of the train split, then refit on all of it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from tf_simclr.data import subsets

log = logging.getLogger(__name__)

KNN_TOP1 = 'eval/knn_top_1_accuracy'
KNN_TOP5 = 'eval/knn_top_5_accuracy'
PROBE_TOP1 = 'eval/linear_probe_top_1_accuracy'
PROBE_TOP5 = 'eval/linear_probe_top_5_accuracy'
PROBE_L2 = 'eval/linear_probe_l2'
RANDOM_INIT = 'eval/random_init/'

DEFAULT_L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


def random_init_key(key: str) -> str:
  """'eval/knn_top_1_accuracy' -> 'eval/random_init/knn_top_1_accuracy'."""
  return RANDOM_INIT + key[len('eval/'):]


# ---------------------------------------------------------------------------------------------
# Features.


def feature_step(encoder, strategy: tf.distribute.Strategy):
  """A tf.function: distributed `(index, image, label, valid)` batch -> (index, features, label,
  valid), each gathered across replicas.

  Only the images enter the replica computation: `encoder(images, training=False)` maps them to
  features (inference mode: BN moving statistics). Index, label and the padding mask (int32)
  are gathered straight from the dataset's per-replica values (`strategy.gather`, so it also
  works across workers). Reuse the function across calls: tracing under a strategy is slow.
  """

  def replica_fn(images):
    return encoder(images, training=False)

  @tf.function(reduce_retracing=True)
  def step(batch):
    index, images, label, valid = batch
    features = strategy.run(replica_fn, args=(images,))
    return tuple(strategy.gather(v, axis=0) for v in (index, features, label, valid))

  return step


class FeatureCountError(RuntimeError):
  """Feature extraction returned other examples than the split holds (lost or repeated rows)."""


def extract_features(step, dataset, expected_indices) -> Tuple[np.ndarray, np.ndarray]:
  """Features and labels of a distributed `(index, image, label, valid)` dataset, in index order.

  `step` is a `feature_step`. Padding rows (valid False) are dropped here, so they never reach a
  kNN bank or a probe; the example indices put the gathered rows back in dataset order, so the
  result is the same under any strategy. The indices seen must be exactly `expected_indices`
  (sorted; `pipeline.feature_indices`): a lost or repeated example raises FeatureCountError
  instead of returning (and writing) a short or skewed result.
  """
  indices, features, labels = [], [], []
  for batch in dataset:
    i, f, y, valid = (v.numpy() for v in step(batch))
    valid = valid.astype(bool)
    indices.append(i[valid])
    features.append(f[valid])
    labels.append(y[valid])
  expected = np.asarray(expected_indices, np.int64).reshape([-1])
  if not indices or not expected.size:
    raise ValueError('Feature extraction read no examples: the split is empty.')
  index = np.concatenate(indices).astype(np.int64)
  order = np.argsort(index, kind='stable')
  if not np.array_equal(index[order], expected):
    seen = np.unique(index)
    missing = np.setdiff1d(expected, seen)
    raise FeatureCountError(
        f'Feature extraction returned {len(index)} rows for {len(expected)} examples '
        f'({len(missing)} missing, e.g. {missing[:5].tolist()}; '
        f'{len(index) - len(seen)} repeated): a bug in the input pipeline\'s padding, please '
        'report it with the strategy and split size.')
  features = np.concatenate(features)[order].astype(np.float32)
  return features.reshape([len(order), -1]), np.concatenate(labels)[order].astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Weighted kNN.


def knn_votes(bank_features, bank_labels, query_features, num_classes: int, k: int = 200,
              temperature: float = 0.1, chunk_elements: int = 1 << 24) -> np.ndarray:
  """(queries, classes) vote sums of the weighted kNN (see module docstring).

  Neighbours with equal similarity are taken in bank order (tf.math.top_k keeps the lower index
  first). Each chunk of queries holds at most `chunk_elements` similarities.
  """
  bank = tf.math.l2_normalize(tf.convert_to_tensor(bank_features, tf.float32), axis=1)
  bank_labels = tf.convert_to_tensor(np.asarray(bank_labels, np.int64).reshape([-1]), tf.int64)
  queries = tf.convert_to_tensor(query_features, tf.float32)
  n_bank = int(bank.shape[0])
  if n_bank == 0:
    raise ValueError('The kNN bank is empty.')
  k = min(int(k), n_bank)
  chunk = max(1, chunk_elements // n_bank)

  @tf.function(reduce_retracing=True)
  def votes_for(q):
    sim = tf.matmul(tf.math.l2_normalize(q, axis=1), bank, transpose_b=True)
    top_sim, top_idx = tf.math.top_k(sim, k=k)
    weights = tf.exp(top_sim / temperature)
    rows = tf.range(tf.shape(q)[0], dtype=tf.int64)[:, None]
    segments = rows * num_classes + tf.gather(bank_labels, top_idx)
    sums = tf.math.unsorted_segment_sum(tf.reshape(weights, [-1]), tf.reshape(segments, [-1]),
                                        tf.shape(q, out_type=tf.int64)[0] * num_classes)
    return tf.reshape(sums, [-1, num_classes])

  n = int(queries.shape[0])
  out = [votes_for(queries[s:s + chunk]).numpy() for s in range(0, n, chunk)]
  return np.concatenate(out) if out else np.zeros([0, num_classes], np.float32)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Fraction of rows whose label is among the k highest scores (ties: lower class first)."""
  labels = np.asarray(labels).reshape([-1])
  k = min(k, scores.shape[1])
  _, top = tf.math.top_k(tf.convert_to_tensor(scores), k=k)
  return float(np.mean(np.any(top.numpy() == labels[:, None], axis=1)))


def knn_accuracy(bank_features, bank_labels, query_features, query_labels, num_classes: int,
                 k: int = 200, temperature: float = 0.1) -> Dict[str, float]:
  votes = knn_votes(bank_features, bank_labels, query_features, num_classes, k, temperature)
  return {KNN_TOP1: topk_accuracy(votes, query_labels, 1),
          KNN_TOP5: topk_accuracy(votes, query_labels, 5)}


# ---------------------------------------------------------------------------------------------
# Linear probe.


@dataclasses.dataclass
class LogisticFit:
  weights: np.ndarray  # (dim, classes)
  bias: np.ndarray  # (classes,)
  loss: float
  iterations: int
  converged: bool


def _dot(a, b):
  return tf.reduce_sum(a * b)


def _softmax_loss_and_grad(w, x1, onehot, penalty):
  """Mean cross-entropy + penalised squared weights, and its gradient (all (dim+1, C)).

  The two large products run in float32 (x1 is float32: twice as fast on CPU); the sums and the
  optimiser's state are float64, so the loss still resolves the small steps near convergence.
  """
  n = tf.cast(tf.shape(x1)[0], tf.float64)
  logits = tf.cast(tf.matmul(x1, tf.cast(w, tf.float32)), tf.float64)
  log_p = tf.nn.log_softmax(logits)
  loss = -tf.reduce_sum(onehot * log_p) / n + 0.5 * tf.reduce_sum(penalty * w * w)
  residual = tf.cast((tf.exp(log_p) - onehot) / n, tf.float32)
  grad = tf.cast(tf.matmul(x1, residual, transpose_a=True), tf.float64) + penalty * w
  return loss, grad


_MATRIX = tf.TensorSpec([None, None], tf.float64)


@tf.function(input_signature=[_MATRIX, tf.TensorSpec([None, None], tf.float32), _MATRIX, _MATRIX,
                              tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.float64),
                              tf.TensorSpec([], tf.int32)])
def _lbfgs(w, x1, onehot, penalty, max_iterations, tolerance, history):
  """L-BFGS with Armijo backtracking on `_softmax_loss_and_grad`; traced once per process."""
  f64 = tf.float64
  one = tf.constant(1.0, f64)
  shape = tf.shape(w)
  size = tf.size(w)

  def value_and_grad(flat):
    loss, grad = _softmax_loss_and_grad(tf.reshape(flat, shape), x1, onehot, penalty)
    return loss, tf.reshape(grad, [-1])

  w = tf.reshape(w, [-1])
  s_hist = tf.zeros([history, size], f64)
  y_hist = tf.zeros([history, size], f64)
  rho = tf.zeros([history], f64)
  stored = tf.constant(0)  # Pairs appended since the last reset; slot = count % history.
  f, g = value_and_grad(w)
  it = tf.constant(0)
  converged = tf.reduce_max(tf.abs(g)) <= tolerance
  while it < max_iterations and not converged:
    # Two-loop recursion: d = -H g from the stored curvature pairs, newest first.
    pairs = tf.minimum(stored, history)
    q = g
    alpha = tf.zeros([history], f64)
    for j in tf.range(pairs):
      i = (stored - 1 - j) % history
      a = rho[i] * _dot(s_hist[i], q)
      alpha = tf.tensor_scatter_nd_update(alpha, [[i]], [a])
      q = q - a * y_hist[i]
    if pairs > 0:
      last = (stored - 1) % history
      q = q * (_dot(s_hist[last], y_hist[last]) / _dot(y_hist[last], y_hist[last]))
    else:
      q = q / tf.maximum(tf.reduce_max(tf.abs(g)), one)
    for j in tf.range(pairs):
      i = (stored - pairs + j) % history
      q = q + s_hist[i] * (alpha[i] - rho[i] * _dot(y_hist[i], q))
    d = -q
    slope = _dot(g, d)
    if slope >= 0:  # Not a descent direction: forget the history, take steepest descent.
      d = -g / tf.maximum(tf.reduce_max(tf.abs(g)), one)
      slope = _dot(g, d)
      stored = tf.constant(0)
    t = one
    w_new, f_new, g_new = w, f, g
    searching = tf.constant(True)
    while searching:
      w_new = w + t * d
      f_new, g_new = value_and_grad(w_new)
      searching = f_new > f + 1e-4 * t * slope and t > 1e-12
      if searching:
        t = t * 0.5
    s, yv = w_new - w, g_new - g
    sy = _dot(s, yv)
    if sy > 1e-12:
      i = stored % history
      s_hist = tf.tensor_scatter_nd_update(s_hist, [[i]], [s])
      y_hist = tf.tensor_scatter_nd_update(y_hist, [[i]], [yv])
      rho = tf.tensor_scatter_nd_update(rho, [[i]], [1.0 / sy])
      stored = stored + 1
    converged = (tf.reduce_max(tf.abs(g_new)) <= tolerance
                 or f - f_new <= 1e-12 * tf.maximum(one, tf.abs(f)))
    w, f, g = w_new, f_new, g_new
    it = it + 1
  return tf.reshape(w, shape), f, it, converged


def fit_logistic_regression(features, labels, num_classes: int, l2: float,
                            max_iterations: int = 1000, tolerance: float = 1e-5,
                            history: int = 10, init: Optional[LogisticFit] = None) -> LogisticFit:
  """Minimises mean softmax cross-entropy + l2 / 2 * ||W||^2 (bias unpenalised) by L-BFGS.

  Full batch, backtracking (Armijo) line search, the whole fit in one tf.function.
  Converged when the largest gradient entry is below `tolerance` or a step no longer lowers the
  loss measurably.
  """
  x = np.asarray(features, np.float64)
  n, dim = x.shape
  x1 = tf.constant(np.hstack([x, np.ones([n, 1])]), tf.float32)  # Bias: a last input column.
  onehot = tf.one_hot(np.asarray(labels, np.int64).reshape([-1]), num_classes, dtype=tf.float64)
  penalty = tf.constant(np.r_[np.full(dim, l2), 0.0][:, None] * np.ones([1, num_classes]))
  if init is not None:
    w0 = np.concatenate([init.weights, init.bias[None]])
  else:
    w0 = np.zeros([dim + 1, num_classes])
  w, f, it, converged = _lbfgs(tf.constant(w0, tf.float64), x1, onehot, penalty,
                               tf.constant(max_iterations), tf.constant(tolerance, tf.float64),
                               tf.constant(history))
  w = w.numpy()
  return LogisticFit(weights=w[:-1], bias=w[-1], loss=float(f), iterations=int(it),
                     converged=bool(converged))


def linear_probe(train_features, train_labels, eval_features, eval_labels, num_classes: int,
                 l2_grid: Sequence[float] = DEFAULT_L2_GRID, holdout_fraction: float = 0.2,
                 seed: int = 0, max_iterations: int = 1000,
                 selection_iterations: int = 300) -> Dict[str, float]:
  """Standardise, choose the L2 strength on a held-out part of train, refit on all, score eval.

  The selection fits stop after `selection_iterations` (ranking strengths needs no more); the
  final fit on all of train runs to convergence (or `max_iterations`).
  """
  train_x = np.asarray(train_features, np.float64)
  mean = train_x.mean(axis=0)
  std = train_x.std(axis=0)
  std = np.where(std > 1e-8, std, 1.0)  # Constant features stay 0 rather than blowing up.
  train_x = (train_x - mean) / std
  eval_x = (np.asarray(eval_features, np.float64) - mean) / std
  train_y = np.asarray(train_labels).reshape([-1])
  l2_grid = sorted(l2_grid, reverse=True)  # Strong to weak: each fit warm-starts the next.
  chosen, chosen_fit = l2_grid[0], None
  if len(l2_grid) > 1:
    fit_idx, held_idx = subsets.holdout_split(train_y, holdout_fraction, seed)
    best, previous = -1.0, None
    for l2 in l2_grid:
      fit = fit_logistic_regression(train_x[fit_idx], train_y[fit_idx], num_classes, l2,
                                    max_iterations=selection_iterations, init=previous)
      previous = fit
      acc = topk_accuracy(train_x[held_idx] @ fit.weights + fit.bias, train_y[held_idx], 1)
      log.info('Linear probe: l2 %.0e, held-out top-1 %.4f (%d iterations).', l2, acc,
               fit.iterations)
      if acc > best:
        best, chosen, chosen_fit = acc, l2, fit
      elif acc < best - 0.02:
        break  # Past the best: weaker penalties only overfit more.
  # Refit on all of train, from the held-out fit of the chosen strength (close to the optimum).
  fit = fit_logistic_regression(train_x, train_y, num_classes, chosen,
                                max_iterations=max_iterations, init=chosen_fit)
  if not fit.converged:
    log.warning('Linear probe: L-BFGS stopped after %d iterations before converging.',
                fit.iterations)
  scores = eval_x @ fit.weights + fit.bias
  return {PROBE_TOP1: topk_accuracy(scores, eval_labels, 1),
          PROBE_TOP5: topk_accuracy(scores, eval_labels, 5), PROBE_L2: float(chosen)}


# ---------------------------------------------------------------------------------------------
# Both readouts of one encoder on one dataset.


class Readout:
  """kNN and/or linear probe of an encoder on a dataset's train (bank) and eval splits.

  The train examples (capped by `max_train_examples`, class-balanced and seeded) are chosen once;
  features are recomputed on each call, since the encoder's weights change during training.
  """

  def __init__(self, source, data_config, strategy: tf.distribute.Strategy, batch_size: int,
               num_classes: int, k: int = 200, temperature: float = 0.1,
               max_train_examples: int = 0, seed: int = 0):
    from tf_simclr.data import pipeline  # The readout math above needs no data pipeline.
    self._pipeline = pipeline
    self.source = source
    self.data_config = data_config
    self.strategy = strategy
    self.batch_size = batch_size
    self.num_classes = num_classes
    self.k = k
    self.temperature = temperature
    self.seed = seed
    self.train_indices = None
    self._steps = {}
    labels = source.labels(data_config.train_split)
    if 0 < max_train_examples < len(labels):
      self.train_indices = subsets.select_bank(labels, max_train_examples, seed)
      log.info('Readouts use %d of %d train examples (class-balanced, seed %d).',
               len(self.train_indices), len(labels), seed)

  def features(self, encoder, split: str, indices=None) -> Tuple[np.ndarray, np.ndarray]:
    dataset = self._pipeline.build_feature_dataset(self.source, self.data_config, split,
                                                   self.batch_size, self.strategy, indices)
    if id(encoder) not in self._steps:
      self._steps[id(encoder)] = (encoder, feature_step(encoder, self.strategy))
    expected = self._pipeline.feature_indices(self.source, split, indices)
    return extract_features(self._steps[id(encoder)][1], dataset, expected)

  def run(self, encoder, knn: bool = True, linear: bool = False) -> Dict[str, float]:
    """Readout metrics (KNN_* and/or PROBE_* keys) of `encoder` in inference mode."""
    if not (knn or linear):
      return {}
    t0 = time.time()
    train_x, train_y = self.features(encoder, self.data_config.train_split, self.train_indices)
    eval_x, eval_y = self.features(encoder, self.data_config.eval_split)
    t1 = time.time()
    out = {}
    if knn:
      out.update(knn_accuracy(train_x, train_y, eval_x, eval_y, self.num_classes, self.k,
                              self.temperature))
    t2 = time.time()
    if linear:
      out.update(linear_probe(train_x, train_y, eval_x, eval_y, self.num_classes, seed=self.seed))
    t3 = time.time()
    log.info('Readouts (%d train, %d eval features): %s | features %.1fs, kNN %.1fs, probe %.1fs',
             len(train_y), len(eval_y),
             ', '.join(f'{k.split("/")[-1]} {v:.4f}' for k, v in out.items()), t1 - t0, t2 - t1,
             t3 - t2)
    return out


ONLINE_HEAD_TOP1 = 'eval/label_top_1_accuracy'  # evaluate.TOP1, the head trained while pretraining.


def has_readouts(result: Dict[str, float]) -> bool:
  return any(k in result for k in (KNN_TOP1, PROBE_TOP1, random_init_key(KNN_TOP1),
                                   random_init_key(PROBE_TOP1)))


def format_table(result: Dict[str, float]) -> str:
  """Top-1 of the online head, kNN and linear probe; a random-init row when it was measured."""
  def cell(key):
    return f'{result[key]:.4f}' if key in result else '-'
  columns = (ONLINE_HEAD_TOP1, KNN_TOP1, PROBE_TOP1)
  rows = [('pretrained', columns)]
  if any(random_init_key(k) in result for k in columns):
    rows.append(('random init', tuple(random_init_key(k) for k in columns)))
  lines = ['Top-1 accuracy on the eval split (step %d):' % int(result.get('global_step', 0)),
           f'  {"encoder":<12} {"online head":>11} {"kNN":>8} {"linear probe":>12}']
  for name, keys in rows:
    lines.append(f'  {name:<12} {cell(keys[0]):>11} {cell(keys[1]):>8} {cell(keys[2]):>12}')
  return '\n'.join(lines)
