"""The two Keras callbacks Keras lacks for SimCLR: a kNN monitor and a linear probe.

Both read the encoder's frozen `final_avg_pool` features in inference mode and score them with
the command line's readout math (`evaluation/probe.py`: the weighted kNN of Wu et al. 2018 and the
L-BFGS logistic-regression probe with its held-out choice of L2). Their results go into the epoch's
`logs` (so History, TensorBoard, EarlyStopping and ModelCheckpoint see them); list them before
those callbacks. `random_init_baseline` also scores an encoder of the same architecture at its
random initialisation once, logged under `random_init/...`.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

from tf_simclr.evaluation import probe


def _name(key: str) -> str:
  """'eval/knn_top_1_accuracy' -> 'knn_top_1_accuracy'; random-init keys keep their prefix."""
  return key[len('eval/'):]


def features(model, dataset) -> Tuple[np.ndarray, np.ndarray]:
  """(final_avg_pool features, integer labels) of a labelled dataset as numpy arrays, in order.

  `dataset` yields (images, labels) already preprocessed for evaluation (`model.eval_data`).
  """
  encoder = model.encoder
  embed = getattr(encoder, '_readout_embed_fn', None)
  if embed is None:  # One traced function per encoder, reused by every epoch's readout; set
    # past Keras' attribute tracking (it is no layer state, and must not be saved).
    embed = tf.function(lambda images: encoder(images, training=False), reduce_retracing=True)
    object.__setattr__(encoder, '_readout_embed_fn', embed)
  xs, ys = [], []
  for images, labels in dataset:
    xs.append(embed(images).numpy())
    ys.append(np.asarray(labels).reshape([-1]))
  return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int64)


class _Readout(keras.callbacks.Callback):
  """Shared: the two datasets, the schedule and the random-init baseline."""

  def __init__(self, train_data, eval_data, every_epochs: int, random_init_baseline: bool,
               batch_size: Optional[int], value_range):
    super().__init__()
    self._raw = (train_data, eval_data)
    self._prepared = None
    self.every_epochs = every_epochs
    self.random_init_baseline = random_init_baseline
    self.batch_size = batch_size
    self.value_range = value_range
    self.baseline: Dict[str, float] = {}
    self.last: Dict[str, float] = {}

  def _data(self, model):
    if self._prepared is None:
      self._prepared = tuple(model.eval_data(d, self.batch_size, self.value_range)
                             for d in self._raw)
    return self._prepared

  def readout(self, model) -> Dict[str, float]:
    """This readout's {key: value} (probe.py keys) of `model`'s encoder now."""
    train, evaluation = self._data(model)
    train_x, train_y = features(model, train)
    eval_x, eval_y = features(model, evaluation)
    num_classes = model.num_classes or int(max(train_y.max(), eval_y.max())) + 1
    return self._score(train_x, train_y, eval_x, eval_y, num_classes)

  def _score(self, train_x, train_y, eval_x, eval_y, num_classes) -> Dict[str, float]:
    raise NotImplementedError

  def on_train_begin(self, logs=None):
    if self.random_init_baseline and not self.baseline:
      fresh = type(self.model).from_config(self.model.get_config())
      self.baseline = {probe.random_init_key(k): v for k, v in self.readout(fresh).items()}

  def _due(self, epoch: int) -> bool:
    return self.every_epochs > 0 and (epoch + 1) % self.every_epochs == 0

  def on_epoch_end(self, epoch, logs=None):
    if not self._due(epoch):
      return
    self.last = self.readout(self.model)
    if logs is not None:
      logs.update({_name(k): v for k, v in {**self.last, **self.baseline}.items()})


class KNNMonitor(_Readout):
  """Weighted kNN top-1/top-5 of the frozen features every `every_epochs` epochs.

  train_data: the labelled bank (e.g. the train split); eval_data: the queries. Datasets of
  (images, labels) or TFDS dicts, raw (they get the model's evaluation preprocessing), batched
  or with `batch_size`. Logs `knn_top_1_accuracy`, `knn_top_5_accuracy` (and with
  random_init_baseline, `random_init/knn_top_1_accuracy`, ...).
  """

  def __init__(self, train_data, eval_data, every_epochs: int = 1, k: int = 200,
               temperature: float = 0.1, random_init_baseline: bool = False,
               batch_size: Optional[int] = None, value_range='auto'):
    super().__init__(train_data, eval_data, every_epochs, random_init_baseline, batch_size,
                     value_range)
    self.k = k
    self.temperature = temperature

  def _score(self, train_x, train_y, eval_x, eval_y, num_classes):
    return probe.knn_accuracy(train_x, train_y, eval_x, eval_y, num_classes, self.k,
                              self.temperature)


class LinearProbe(_Readout):
  """Linear-probe top-1/top-5 of the frozen features (standardised, L-BFGS logistic regression,
  L2 chosen on a held-out part of train_data), at the end of training, or every `every_epochs`.

  Logs `linear_probe_top_1_accuracy`, `linear_probe_top_5_accuracy`, `linear_probe_l2` into the
  last epoch's logs (History sees them) and keeps them in `.last`; random_init_baseline (on by
  default) adds `random_init/linear_probe_top_1_accuracy`, ...
  """

  def __init__(self, train_data, eval_data, every_epochs: int = 0,
               random_init_baseline: bool = True, seed: int = 0,
               batch_size: Optional[int] = None, value_range='auto'):
    super().__init__(train_data, eval_data, every_epochs, random_init_baseline, batch_size,
                     value_range)
    self.seed = seed
    self._epochs = None

  def _score(self, train_x, train_y, eval_x, eval_y, num_classes):
    return probe.linear_probe(train_x, train_y, eval_x, eval_y, num_classes, seed=self.seed)

  def set_params(self, params):
    super().set_params(params)
    self._epochs = params.get('epochs')

  def _due(self, epoch):
    return super()._due(epoch) or (self._epochs is not None and epoch + 1 == self._epochs)
