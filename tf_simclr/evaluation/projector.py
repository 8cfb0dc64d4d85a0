"""TensorBoard's embedding projector for --mode=embed: `tensorboard --logdir MODEL_DIR`, then the
Projector tab, shows the embedded images as points (PCA, t-SNE, UMAP) with their thumbnails.

Beside features.npy, model_dir/embeddings/<split>/ receives the rows as a TensorFlow checkpoint
(projector-1.* and its `checkpoint` index), metadata.tsv (row, file path, label where known),
sprite.png (one thumbnail per row: the eval view the model embedded) and projector_config.pbtxt
written by `tensorboard.plugins.projector.visualize_embeddings`, plus one small event file so
that TensorBoard lists the folder as a run (the plugin only looks in runs). model_dir itself gets
a projector_config.pbtxt naming that checkpoint (by absolute path: TensorBoard reads it as
given), so the run TensorBoard opens first (".", model_dir) shows the embedding too instead of
every 2-D variable of the training checkpoint (optimizer slots, kernels). The last split
embedded wins there; each split's own run keeps its own.

Large splits are sampled: at most `MAX_POINTS` rows, evenly spaced over the split (the cap is
logged). TensorBoard's sprite may be at most 8192 x 8192 px; 10 000 thumbnails of 64 px make a
6400 x 6400 px sprite (~120 MB of RGB while it is built), and the browser stays responsive.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf
from tensorboard.plugins import projector as tb_projector
from tensorboard.plugins.projector import metadata as tb_projector_metadata

from tf_simclr import run_dir
from tf_simclr.evaluation import pictures

log = logging.getLogger(__name__)

MAX_POINTS = 10000
SPRITE_MAX_PX = 8192  # TensorBoard's limit on the sprite's width and height.
THUMBNAIL_PX = 64
EMBEDDING_NAME = 'embedding'
TENSOR_NAME = f'{EMBEDDING_NAME}/.ATTRIBUTES/VARIABLE_VALUE'  # its key in the checkpoint


def sample_rows(num_rows: int, cap: int = MAX_POINTS) -> np.ndarray:
  """Row indices shown: all rows, or `cap` rows evenly spaced over the split (sorted)."""
  if num_rows <= cap:
    return np.arange(num_rows)
  return np.unique(np.linspace(0, num_rows - 1, cap).round().astype(np.int64))


def thumbnail_px(num_rows: int) -> int:
  """Thumbnail size so that a square sprite of `num_rows` fits in SPRITE_MAX_PX."""
  return max(1, min(THUMBNAIL_PX, SPRITE_MAX_PX // math.ceil(math.sqrt(max(num_rows, 1)))))


def _cell(value) -> str:
  return str(value).replace('\t', ' ').replace('\n', ' ')


def metadata_lines(rows: Sequence[int], paths: Optional[Sequence[str]], labels,
                   class_names: Optional[Sequence[str]]) -> list:
  """metadata.tsv: a header, then one line per shown row (row, path, label where known)."""
  columns = ['row'] + (['path'] if paths is not None else []) + (
      ['label'] if labels is not None else [])
  lines = ['\t'.join(columns)]
  for row in rows:
    cells = [str(int(row))]
    if paths is not None:
      cells.append(_cell(paths[row]))
    if labels is not None:
      label = int(labels[row])
      cells.append(_cell(class_names[label]) if class_names else str(label))
    lines.append('\t'.join(cells))
  return lines


def _config(px: int, folder: str = '', checkpoint: str = ''):
  """The projector config of our embedding; `folder`: where its files are, relative to the
  config's own folder (TensorBoard refuses paths outside it)."""
  config = tb_projector.ProjectorConfig()
  if checkpoint:
    config.model_checkpoint_path = checkpoint  # TensorBoard reads it as given: absolute
  embedding = config.embeddings.add()
  embedding.tensor_name = TENSOR_NAME
  embedding.metadata_path = os.path.join(folder, run_dir.PROJECTOR_METADATA_FILE)
  embedding.sprite.image_path = os.path.join(folder, run_dir.PROJECTOR_SPRITE_FILE)
  embedding.sprite.single_image_dim.extend([px, px])
  return config


def write(directory: str, features: np.ndarray, thumbnails: np.ndarray, rows: np.ndarray,
          paths=None, labels=None, class_names=None, root: Optional[str] = None) -> str:
  """Writes the projector files for rows `rows` of `features` into `directory`, and when `root`
  (model_dir) is given, a projector config there too (see the module docstring).

  thumbnails: uint8 (len(rows), H, W, 3), the images of those rows. Returns the config's path.
  """
  px = thumbnail_px(len(rows))
  with tf.io.gfile.GFile(os.path.join(directory, run_dir.PROJECTOR_METADATA_FILE), 'w') as f:
    f.write('\n'.join(metadata_lines(rows, paths, labels, class_names)) + '\n')
  pictures.save_png(pictures.sprite(thumbnails, px),
                    os.path.join(directory, run_dir.PROJECTOR_SPRITE_FILE))
  checkpoint = tf.train.Checkpoint(**{EMBEDDING_NAME: tf.Variable(features[rows])})
  prefix = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=1,
                                      checkpoint_name=run_dir.PROJECTOR_CHECKPOINT_NAME).save()
  tb_projector.visualize_embeddings(directory, _config(px))  # finds the checkpoint beside it
  if root is not None:  # The root run ("."): this checkpoint, not the training run's variables.
    rel = os.path.relpath(directory, root)
    tb_projector.visualize_embeddings(root, _config(
        px, folder=rel, checkpoint=prefix if '://' in prefix else os.path.abspath(prefix)))
  writer = tf.summary.create_file_writer(directory)  # Makes the folder a TensorBoard run.
  with writer.as_default():
    tf.summary.text('projector', f'{len(rows)} of {len(features)} rows: see the Projector tab.',
                    step=0)
  writer.close()
  return os.path.join(directory, tb_projector_metadata.PROJECTOR_FILENAME)


def write_for_split(directory: str, features: np.ndarray, source, data_config, split: str,
                    labels=None, paths=None, batch_size: int = 64,
                    root: Optional[str] = None) -> str:
  """The projector files of an embedded split (its eval views as thumbnails); logs the cap."""
  rows = sample_rows(len(features))
  if len(rows) < len(features):
    log.warning('Projector: showing %d of %d rows (every ~%.1fth, evenly spaced; the cap is %d '
                'points, thumbnails of %d px in a sprite of at most %d px); features.npy keeps '
                'them all.', len(rows), len(features), len(features) / len(rows), MAX_POINTS,
                thumbnail_px(len(rows)), SPRITE_MAX_PX)
  thumbnails = pictures.eval_views(source, data_config, split, rows, batch_size)
  path = write(directory, features, thumbnails, rows, paths=paths, labels=labels,
               class_names=source.class_names, root=root)
  log.info('Projector files for %d rows in %s: tensorboard --logdir <model_dir>, Projector tab.',
           len(rows), directory)
  return path
