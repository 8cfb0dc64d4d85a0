"""--mode=embed: the representation of every image of a split, written to files.

`MODEL_DIR/embeddings/<split>/` receives `features.npy` (float32, one row per example, the chosen
endpoint flattened), `labels.npy` for labelled data and `paths.txt` (one source file per row) for
folder:/images: data, all in split order. Images are preprocessed as eval does (resize and centre
crop). Features are computed by the readouts' feature extraction (`probe.feature_step`), which
gathers the replicas' rows and puts them back in split order under any strategy.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import tensorflow as tf

from tf_simclr import distribute
from tf_simclr import run_dir
from tf_simclr.data import pipeline
from tf_simclr.errors import ConfigError
from tf_simclr.evaluation import probe

log = logging.getLogger(__name__)


def endpoint_fn(model, endpoint: str):
  """images, training -> the model's `endpoint` as float32 (batch, features)."""

  def fn(images, training=False):
    value = model(images, training=training)[endpoint]
    return tf.reshape(tf.cast(value, tf.float32), [tf.shape(value)[0], -1])
  return fn


def compute(model, source, data_config, split: str, endpoint: str, batch_size: int, strategy):
  """(features float32 (N, D), labels int64 (N,)) of every example of `split`, in split order."""
  dataset = pipeline.build_feature_dataset(source, data_config, split, batch_size, strategy)
  step = probe.feature_step(endpoint_fn(model, endpoint), strategy)
  return probe.extract_features(step, dataset, pipeline.feature_indices(source, split))


def write(directory: str, features: np.ndarray, labels=None, paths=None) -> None:
  """Writes features.npy (+ labels.npy, paths.txt) into `directory` (created)."""
  tf.io.gfile.makedirs(directory)
  files = [(run_dir.FEATURES_FILE, features)] + (
      [(run_dir.LABELS_FILE, labels)] if labels is not None else [])
  for name, array in files:
    with tf.io.gfile.GFile(os.path.join(directory, name), 'wb') as f:
      np.save(f, array)
  if paths is not None:
    with tf.io.gfile.GFile(os.path.join(directory, run_dir.PATHS_FILE), 'w') as f:
      f.write(''.join(f'{p}\n' for p in paths))


def embed_split(ctx, model) -> str:
  """Embeds ctx.config's --embed_split (else --train_split); returns the folder written."""
  config = ctx.config
  split = config.train.embed_split or config.data.train_split
  endpoint = config.train.embed_endpoint
  if endpoint == 'logits_sup' and model.supervised_head is None:
    raise ConfigError('--embed_endpoint=logits_sup: these weights have no supervised head; use '
                      'final_avg_pool or proj_head_output.')
  features, labels = compute(model, ctx.source, config.data, split, endpoint,
                             config.train.eval_batch_size, ctx.strategy)
  directory = run_dir.embeddings_dir(config.train.model_dir, split)
  if distribute.is_chief(ctx.strategy):
    write(directory, features, labels if ctx.source.labelled else None, ctx.source.paths(split))
  log.info('Embedded %d images of %s (%s, %d features each) into %s', len(features), split,
           endpoint, features.shape[1], directory)
  print(f'Wrote {len(features)} rows of {endpoint} to {directory}')
  return directory
