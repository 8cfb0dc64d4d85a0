"""--mode=embed: the representation of every image of a split, written to files.

`MODEL_DIR/embeddings/<split>/` receives `features.npy` (float32, one row per example, the chosen
endpoint flattened), `labels.npy` for labelled data and `paths.txt` (one source file per row) for
folder:/images: data, all in split order, and TensorBoard's projector files (projector.py).
Images are preprocessed as eval does (resize and centre crop). Features are computed by the
readouts' feature extraction (`probe.feature_step`), which gathers the replicas' rows and puts
them back in split order under any strategy. `load_or_embed` serves --mode=neighbors/duplicates.
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
from tf_simclr.evaluation import probe, projector

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
  split = split_of(config)
  endpoint = config.train.embed_endpoint
  if endpoint == 'logits_sup' and model.supervised_head is None:
    raise ConfigError('--embed_endpoint=logits_sup: these weights have no supervised head; use '
                      'final_avg_pool or proj_head_output.')
  features, labels = compute(model, ctx.source, config.data, split, endpoint,
                             config.train.eval_batch_size, ctx.strategy)
  directory = run_dir.embeddings_dir(config.train.model_dir, split)
  if distribute.is_chief(ctx.strategy):
    labels = labels if ctx.source.labelled else None
    paths = ctx.source.paths(split)
    write(directory, features, labels, paths)
    projector.write_for_split(directory, features, ctx.source, config.data, split, labels=labels,
                              paths=paths, batch_size=config.train.eval_batch_size,
                              root=config.train.model_dir)
  log.info('Embedded %d images of %s (%s, %d features each) into %s', len(features), split,
           endpoint, features.shape[1], directory)
  print(f'Wrote {len(features)} rows of {endpoint} to {directory}')
  return directory


def split_of(config) -> str:
  """The split --mode=embed/neighbors/duplicates read: --embed_split, else --train_split."""
  return config.train.embed_split or config.data.train_split


def has_embeddings(config) -> bool:
  """Whether model_dir holds features.npy for the split (--mode=embed ran)."""
  directory = run_dir.embeddings_dir(config.train.model_dir, split_of(config))
  return tf.io.gfile.exists(os.path.join(directory, run_dir.FEATURES_FILE))


def read(directory: str):
  """(features, labels or None, paths or None) written by `write`."""
  def load(name):
    path = os.path.join(directory, name)
    if not tf.io.gfile.exists(path):
      return None
    if '://' not in path:  # Local: memory-mapped, so a large bank is read chunk by chunk.
      return np.load(path, mmap_mode='r')
    with tf.io.gfile.GFile(path, 'rb') as f:
      return np.load(f)
  paths = None
  if tf.io.gfile.exists(os.path.join(directory, run_dir.PATHS_FILE)):
    with tf.io.gfile.GFile(os.path.join(directory, run_dir.PATHS_FILE)) as f:
      paths = f.read().splitlines()
  return load(run_dir.FEATURES_FILE), load(run_dir.LABELS_FILE), paths


def load_or_embed(ctx, model_fn):
  """(features, labels, paths, folder) of the split's embeddings: read from model_dir when
  --mode=embed wrote them (and they still match the split), else computed and written now with
  `model_fn()` (the model with its weights loaded)."""
  config = ctx.config
  split = split_of(config)
  directory = run_dir.embeddings_dir(config.train.model_dir, split)
  if has_embeddings(config):
    features, labels, paths = read(directory)
    expected = ctx.source.num_examples(split)
    if len(features) != expected:
      raise ConfigError(f'{directory} holds {len(features)} rows but --embed_split={split} of '
                        f'--dataset={config.data.dataset} has {expected} images now: rerun '
                        '--mode=embed to refresh the embeddings.')
    log.info('Read %d embedded rows from %s.', len(features), directory)
    return features, labels, paths, directory
  embed_split(ctx, model_fn())
  return read(directory) + (directory,)
