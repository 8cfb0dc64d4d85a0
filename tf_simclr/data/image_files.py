"""Image files of `folder:` and `images:` datasets: listing, decoding checks, empty classes.

Works on paths and on TFDS `ImageFolder` builders, before any `DatasetSource` exists, so that bad
or missing images are named (or, with --skip_bad_images / --skip_empty_classes, left out) before
training starts.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import tensorflow as tf

from tf_simclr import native_stderr
from tf_simclr.errors import DatasetError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')


def list_images(root: str) -> tuple:
  """(image paths under `root` in a stable sorted walk order, hidden entries, other files).

  Streams the folder tree (os.walk; tf.io.gfile.walk for gs:// and other remote paths) without
  opening any file. Hidden files and folders (a leading '.') are skipped.
  """
  walk = os.walk(root) if '://' not in root else tf.io.gfile.walk(root)
  paths, hidden, others = [], 0, 0
  for folder, subfolders, files in walk:
    hidden += sum(name.startswith('.') for name in subfolders)
    subfolders[:] = sorted(name.rstrip('/') for name in subfolders if not name.startswith('.'))
    for name in sorted(files):
      if name.startswith('.'):
        hidden += 1
      elif os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
        paths.append(os.path.join(folder, name))
      else:
        others += 1
  return paths, hidden, others


def find_bad_images(paths) -> list:
  """The paths among `paths` that cannot be read and decoded as images (a parallel tf.data pass).

  The JPEG decoder's own stderr lines about them are dropped: the caller names the files.
  """
  paths = list(paths)
  if not paths:
    return []
  ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), paths))
  ds = ds.map(lambda i, p: (i, tf.shape(tf.io.decode_image(tf.io.read_file(p), channels=3,
                                                          expand_animations=False))),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=False).ignore_errors()
  good = np.zeros(len(paths), bool)
  with native_stderr.streamed_stderr(native_stderr.JPEG_NOISE):
    for batch, _ in ds.batch(4096):
      good[batch.numpy()] = True
  return [p for p, ok in zip(paths, good) if not ok]


def drop_bad_images(builder, name: str) -> None:
  """--skip_bad_images: removes undecodable files from every split of an ImageFolder."""
  examples = builder._split_examples  # pylint: disable=protected-access
  paths = [e.image_path for split in examples.values() for e in split]
  bad = set(find_bad_images(paths))
  if not bad:
    log.info('--skip_bad_images: all %d images of --dataset=%s decode.', len(paths), name)
    return
  for split in examples:
    examples[split][:] = [e for e in examples[split] if e.image_path not in bad]
  log.warning('--skip_bad_images: left out %d of %d images of --dataset=%s that cannot be decoded '
              '(first: %s).', len(bad), len(paths), name, ', '.join(sorted(bad)[:3]))


def empty_class_folders(path: str, builder) -> list:
  """PATH/<split>/<class> folders that hold no image ImageFolder reads (sorted)."""
  examples = builder._split_examples  # pylint: disable=protected-access
  empty = []
  for split in sorted(n.rstrip('/') for n in tf.io.gfile.listdir(path)):
    if not tf.io.gfile.isdir(os.path.join(path, split)):
      continue
    used = {e.label for e in examples.get(split, ())}
    for label in sorted(n.rstrip('/') for n in tf.io.gfile.listdir(os.path.join(path, split))):
      if label not in used and tf.io.gfile.isdir(os.path.join(path, split, label)):
        empty.append(os.path.join(path, split, label))
  return empty


def drop_empty_classes(builder, name: str, path: str, skip: bool) -> None:
  """An error naming class folders without images, or (`skip`) leaves them out of the classes."""
  empty = empty_class_folders(path, builder)
  if not empty:
    return
  if not skip:
    raise DatasetError(
        f'--dataset={name}: {len(empty)} class folder(s) hold no images (.jpg/.jpeg/.png): '
        + ', '.join(empty[:5]) + '. Add images, remove the folder(s), or pass '
        '--skip_empty_classes to leave them out.')
  label = builder.info.features['label']
  kept = sorted({e.label for split in builder._split_examples.values() for e in split})  # pylint: disable=protected-access
  if kept != list(label.names):
    label._int2str, label._num_classes = None, None  # pylint: disable=protected-access
    label.names = kept  # Class ids: the sorted names of the classes that have images.
  log.warning('--skip_empty_classes: left out %d class folder(s) without images (first: %s); '
              '%d classes.', len(empty), empty[0], len(kept))
