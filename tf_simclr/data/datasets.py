"""Resolves `--dataset` to a `DatasetSource` and picks label subsets for semi-supervised runs.

Three forms of `--dataset` are accepted:
  * a TFDS image-classification name (`cifar10`, `imagenet2012`, `name/config:version`), built
    and prepared in `--data_dir` with `tfds.builder(...).download_and_prepare()` as the original;
  * `folder:PATH` with images in PATH/<split>/<class>/*.{jpg,jpeg,png}, read through TFDS's
    `ImageFolder` (class ids are the sorted class-folder names over all splits);
  * `images:PATH`, every image under PATH whatever the nesting (jpg, jpeg, png, bmp, gif first
    frame; hidden files skipped), unlabelled (label -1, `num_classes` 0), one split `train`;
  * `shapes10`, the built-in generated dataset (splits 'train' 10,000 and 'test' 2,000; see
    synthetic.py), which needs no download.
Every form yields (image uint8 HxWxC, label int64) and accepts TFDS split slicing such as
`train[:10%]` or `train[:500]+test`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import logging
import os
from typing import Any, Callable, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tf_simclr import native_stderr, run_dir
from tf_simclr.data import image_files, subsets, synthetic, tfds_prepare
from tf_simclr.errors import BadImagesError, DatasetError

log = logging.getLogger(__name__)

FOLDER_PREFIX = 'folder:'
IMAGES_PREFIX = 'images:'
UNLABELLED = -1  # The label of every example of an unlabelled dataset.
_FORMS = ('a TFDS image-classification name (e.g. cifar10, imagenet2012; catalog: '
          'https://www.tensorflow.org/datasets/catalog), folder:PATH (images in '
          'PATH/<split>/<class>/*.jpg|png), images:PATH (unlabelled: every image under PATH), or the '
          'built-in shapes10 (no download)')


def _read_config(input_context=None, seed: Optional[int] = None) -> tfds.ReadConfig:
  # Different workers read different files; interleave settings as the original. `seed` fixes
  # the order in which shuffled files are read (--seed).
  return tfds.ReadConfig(interleave_cycle_length=32, interleave_block_length=1,
                         input_context=input_context, shuffle_seed=seed)


def host_range(num_examples: int, num_pipelines: int, pipeline_id: int) -> tuple:
  """[start, stop) of input pipeline `pipeline_id`'s contiguous, near-equal share of examples."""
  return (num_examples * pipeline_id // num_pipelines,
          num_examples * (pipeline_id + 1) // num_pipelines)


def input_pipelines(input_context) -> tuple:
  """(number of input pipelines, this one's id); (1, 0) without an InputContext."""
  if input_context is None:
    return 1, 0
  return input_context.num_input_pipelines, input_context.input_pipeline_id


@dataclasses.dataclass(frozen=True)
class DatasetSource:
  """One resolved dataset: metadata plus `as_dataset` yielding (uint8 image, int64 label)."""
  name: str
  kind: str  # 'tfds', 'folder', 'images' (unlabelled) or 'builtin'.
  num_classes: int  # 0: unlabelled.
  image_shape: tuple  # (height, width, channels); None where images vary.
  split_sizes: dict
  class_names: Optional[tuple] = None
  builder: Any = dataclasses.field(default=None, repr=False, compare=False)
  files: Optional[tuple] = dataclasses.field(default=None, repr=False, compare=False)  # images:

  @property
  def channels(self) -> Optional[int]:
    return self.image_shape[-1]

  @property
  def labelled(self) -> bool:
    return self.num_classes > 0

  def paths(self, split: str) -> Optional[list]:
    """The source file of every example of `split` in `as_dataset` order (None unless the
    dataset is a folder: or images: folder)."""
    ranges = self._ranges(split)
    if self.kind == 'images':
      return [p for n, a, b in ranges for p in self.files[a:b]]
    examples = getattr(self.builder, '_split_examples', None)
    if self.kind == 'folder' and examples is not None:
      return [e.image_path for n, a, b in ranges for e in examples[n][a:b]]
    return None

  @property
  def splits(self) -> list:
    return sorted(self.split_sizes)

  def _ranges(self, split: str, flag: str = '--train_split/--eval_split'):
    """[(base split, start, stop)] for a split spec such as 'train[:10%]+test'."""
    try:
      infos = tfds.core.SplitDict([tfds.core.SplitInfo(name=k, shard_lengths=[v], num_bytes=0)
                                   for k, v in self.split_sizes.items()])
      instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(infos)
    except (ValueError, KeyError, AssertionError) as e:
      raise DatasetError(
          f'{flag}={split!r} is not a split of --dataset={self.name}: available splits are '
          f'{self.splits} (TFDS slicing such as "train[:10%]" or "train[:1000]" also works). '
          f'Detail: {e}') from None
    return [(i.splitname, i.from_ or 0, self.split_sizes[i.splitname] if i.to is None else i.to)
            for i in instructions]

  def validate_split(self, split: str, flag: str = '--train_split') -> None:
    """Raises DatasetError naming `flag` unless `split` exists and is non-empty."""
    if self.num_examples(split, flag) == 0:
      raise DatasetError(f'{flag}={split!r} of --dataset={self.name} has no examples.')

  def num_examples(self, split: str, flag: str = '--train_split/--eval_split') -> int:
    return sum(stop - start for _, start, stop in self._ranges(split, flag))

  def sub_split(self, split: str, start: int, stop: int) -> Optional[str]:
    """A split spec for examples [start, stop) of `split` (in as_dataset order); None if empty."""
    parts, offset = [], 0
    for name, a, b in self._ranges(split):
      lo, hi = max(start, offset), min(stop, offset + b - a)
      if lo < hi:
        parts.append(f'{name}[{a + lo - offset}:{a + hi - offset}]')
      offset += b - a
    return '+'.join(parts) or None

  def num_files(self, split: str) -> Optional[int]:
    """How many files TFDS reads for `split` (None for folder and built-in data)."""
    if self.kind != 'tfds':
      return None
    splits = self.builder.info.splits
    return sum(len(splits[f'{name}[{a}:{b}]'].file_instructions)
               for name, a, b in self._ranges(split))

  def as_dataset(self, split: str, shuffle_files: bool = False, input_context=None,
                 decode: bool = True, seed: Optional[int] = None) -> tf.data.Dataset:
    """(image uint8 HxWxC, label int64) examples; fixed order unless shuffle_files.

    With an input_context each input pipeline reads only its own part of the split: whole
    files when the TFDS split has at least one file per pipeline (as the original), else a
    contiguous range of examples (`host_range`). With decode=False TFDS images stay encoded
    (filter first, then `decode_image`). `seed` fixes the shuffled file order of TFDS datasets
    and images: datasets (folder: datasets shuffle their file list with TF's global seed).
    """
    num_pipelines, pipeline_id = input_pipelines(input_context)
    if num_pipelines > 1:
      files = self.num_files(split)
      if files is not None and files >= num_pipelines:
        return self._read(split, shuffle_files, decode, input_context, seed)
      start, stop = host_range(self.num_examples(split), num_pipelines, pipeline_id)
      if files is not None:
        log.info('%s split %r has %d file(s) for %d input pipelines: sharding by example '
                 '(pipeline %d reads examples [%d, %d)).', self.name, split, files,
                 num_pipelines, pipeline_id, start, stop)
      return self.read_range(split, start, stop, shuffle_files, decode, seed)
    return self._read(split, shuffle_files, decode, seed=seed)

  def read_range(self, split, start, stop, shuffle_files=False, decode=True, seed=None):
    """Examples [start, stop) of `split`, read without touching the rest."""
    spec = self.sub_split(split, start, stop)
    if spec is None:
      return self._read(split, False, decode).take(0)
    return self._read(spec, shuffle_files, decode, seed=seed)

  def _read(self, split, shuffle_files, decode, input_context=None,
            seed=None) -> tf.data.Dataset:
    ranges = self._ranges(split)
    if self.kind == 'tfds':
      decoders = None if decode else {self.builder.info.supervised_keys[0]:
                                      tfds.decode.SkipDecoding()}
      return self.builder.as_dataset(split=split, shuffle_files=shuffle_files, as_supervised=True,
                                     decoders=decoders,
                                     read_config=_read_config(input_context, seed))
    if self.kind == 'images':
      paths = [p for _, a, b in ranges for p in self.files[a:b]]
      ds = tf.data.Dataset.from_tensor_slices(tf.constant(paths, tf.string))
      if shuffle_files:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
      ds = ds.map(lambda path: (tf.io.read_file(path), tf.constant(UNLABELLED, tf.int64)))
      if decode:
        ds = ds.map(lambda image, label: (self.decode_image(image), label),
                    num_parallel_calls=tf.data.AUTOTUNE)
      return ds
    if self.kind == 'builtin':
      parts = [synthetic.load_split(name) for name, _, _ in ranges]
      images = np.concatenate([p[0][a:b] for p, (_, a, b) in zip(parts, ranges)])
      labels = np.concatenate([p[1][a:b] for p, (_, a, b) in zip(parts, ranges)])
      return tf.data.Dataset.from_tensor_slices((images, labels))
    # Folder: ImageFolder's file list (its order and labels), cut to the slice before anything
    # is read, so that a host decodes only its own share of the files; decoded as ImageFolder.
    whole = len(ranges) == 1 and ranges[0][1:] == (0, self.split_sizes[ranges[0][0]])
    ds = tf.data.Dataset.from_tensor_slices((tf.constant(self.paths(split), tf.string),
                                             tf.constant(self.labels(split), tf.int64)))
    if shuffle_files and whole:
      ds = ds.shuffle(len(ds))  # As ImageFolder: TF's global seed.
    feature = self.builder.info.features['image']
    return ds.map(lambda path, label: (feature.decode_example(tf.io.read_file(path)), label),
                  num_parallel_calls=tf.data.AUTOTUNE)

  def decode_image(self, image: tf.Tensor) -> tf.Tensor:
    """Decodes an image read with as_dataset(decode=False) (identity unless TFDS/images:)."""
    if self.kind == 'images':  # The first frame of a GIF.
      return tf.io.decode_image(image, channels=3, expand_animations=False)
    if self.kind != 'tfds':
      return image
    return self.builder.info.features[self.builder.info.supervised_keys[0]].decode_example(image)

  def labels(self, split: str) -> np.ndarray:
    """All labels of `split` (int64) in the order of `as_dataset(split, shuffle_files=False)`.

    TFDS images are not decoded (SkipDecoding), so this reads only the records.
    """
    ranges = self._ranges(split)
    if self.kind == 'images':
      return np.full([self.num_examples(split)], UNLABELLED, np.int64)
    if self.kind == 'builtin':
      return np.concatenate([synthetic.load_split(n)[1][a:b] for n, a, b in ranges])
    examples = getattr(self.builder, '_split_examples', None)  # ImageFolder's file list.
    if self.kind == 'folder' and examples is not None:
      to_id = self.builder.info.features['label'].str2int
      return np.concatenate([np.array([to_id(e.label) for e in examples[n][a:b]], np.int64)
                             for n, a, b in ranges])
    cached = self._cached_labels(split)
    if cached is not None:
      return cached
    image_key = self.builder.info.supervised_keys[0]
    ds = self.builder.as_dataset(split=split, shuffle_files=False, as_supervised=True,
                                 decoders={image_key: tfds.decode.SkipDecoding()},
                                 read_config=_read_config())
    ds = ds.map(lambda image, label: label).batch(8192)
    labels = np.concatenate([b.numpy() for b in ds] or [np.zeros([0])]).astype(np.int64)
    self._cache_labels(split, labels)
    return labels

  def _labels_cache_path(self, split: str) -> str:
    """Beside the prepared TFDS files (one immutable version folder): labels-<split>.npy."""
    return run_dir.labels_cache_path(os.fspath(self.builder.data_dir), split)

  def _cached_labels(self, split: str) -> Optional[np.ndarray]:
    """The labels `_cache_labels` stored, if they are there and of the split's size."""
    path = self._labels_cache_path(split)
    try:
      with tf.io.gfile.GFile(path, 'rb') as f:
        labels = np.load(f)
    except (tf.errors.OpError, OSError, ValueError):
      return None
    if labels.shape != (self.num_examples(split),):
      return None
    return labels.astype(np.int64)

  def _cache_labels(self, split: str, labels: np.ndarray) -> None:
    """TFDS records hold image and label together, so reading labels reads every image's bytes
    (ImageNet: the whole split): store them once beside the data (best effort: a read-only
    data_dir only logs)."""
    path = self._labels_cache_path(split)
    try:
      with tf.io.gfile.GFile(path + '.tmp', 'wb') as f:
        np.save(f, labels)
      tf.io.gfile.rename(path + '.tmp', path, overwrite=True)
    except (tf.errors.OpError, OSError) as e:
      log.info('Could not cache the labels of %s in %s (%s); they are read again next time.',
               split, path, type(e).__name__)


def _resolve_builtin(name: str) -> DatasetSource:
  return DatasetSource(
      name=name, kind='builtin', num_classes=synthetic.NUM_CLASSES,
      image_shape=(synthetic.IMAGE_SIZE, synthetic.IMAGE_SIZE, 3),
      split_sizes={k: v[0] for k, v in synthetic.SPLITS.items()},
      class_names=synthetic.CLASS_NAMES)


def bad_images_error(source: 'DatasetSource', split: str,
                     decoder_lines: Sequence[str] = ()) -> Optional[BadImagesError]:
  """For a folder: dataset whose reading failed: a DatasetError naming the bad files, or None.

  `decoder_lines`: what the JPEG decoder printed meanwhile, summed up in the message instead.
  """
  if source.kind == 'images':
    bad = image_files.find_bad_images(source.files)
  else:
    examples = getattr(source.builder, '_split_examples', None)
    if source.kind != 'folder' or examples is None:
      return None
    names = sorted({n for n, _, _ in source._ranges(split)})
    bad = image_files.find_bad_images(e.image_path for n in names for e in examples[n])
  if not bad:
    return None
  return BadImagesError(
      f'--dataset={source.name}: {len(bad)} image file(s) cannot be decoded, first: '
      + ', '.join(bad[:5]) + '. Remove or fix them, or pass --skip_bad_images to leave them out.'
      + _decoder_note(decoder_lines))


def _decoder_note(lines: Sequence[str]) -> str:
  """' (The JPEG decoder's N message(s) ... first: ...)' for a message that folds them in."""
  if not lines:
    return ''
  return (f' (The JPEG decoder printed {len(lines)} line(s) meanwhile, folded into this message; '
          f'first: {lines[0].strip()!r}.)')


@contextlib.contextmanager
def naming_bad_images(source: 'DatasetSource', split: str):
  """Turns a decode failure inside a folder: pipeline into an error naming the bad files.

  What the JPEG decoder prints to stderr meanwhile (C++ lines, one or more per damaged file, every
  epoch) is held back: folded into that error, or into one warning when the damaged files still
  decode.
  """
  if source.kind not in ('folder', 'images'):
    yield
    return
  with native_stderr.streamed_stderr(native_stderr.JPEG_NOISE) as decoder_lines:
    try:
      yield
    except tf.errors.InvalidArgumentError as e:
      error = bad_images_error(source, split, decoder_lines)
      if error is None:
        raise
      raise error from e
  if decoder_lines:
    log.warning('--dataset=%s: the JPEG decoder complained %d time(s) about images that still '
                'decode, and they were used as decoded; first: %r.', source.name,
                len(decoder_lines), decoder_lines[0].strip())


def _resolve_folder(name: str, skip_bad_images: bool = False,
                    skip_empty_classes: bool = False) -> DatasetSource:
  path = os.path.expanduser(name[len(FOLDER_PREFIX):])
  if not path or not tf.io.gfile.isdir(path):
    raise DatasetError(f'--dataset={name}: folder {path!r} does not exist. Expected images in '
                       f'{path or "PATH"}/<split>/<class>/*.jpg|png.')
  builder = tfds.folder_dataset.ImageFolder(path)
  image_files.drop_empty_classes(builder, name, path, skip_empty_classes)
  if skip_bad_images:
    image_files.drop_bad_images(builder, name)
  split_sizes = {k: len(v) for k, v in builder._split_examples.items()}  # pylint: disable=protected-access
  if not split_sizes:
    raise DatasetError(f'--dataset={name}: no split folders with images found in {path!r}. '
                       'Expected PATH/<split>/<class>/*.jpg|png, e.g. PATH/train/cat/1.jpg. For '
                       f'unlabelled images in any layout use --dataset={IMAGES_PREFIX}{path}.')
  names = tuple(builder.info.features['label'].names)
  return DatasetSource(name=name, kind='folder', num_classes=len(names),
                       image_shape=tuple(builder.info.features['image'].shape),
                       split_sizes=split_sizes, class_names=names, builder=builder)


def _resolve_images(name: str, skip_bad_images: bool = False) -> DatasetSource:
  """images:PATH, unlabelled: every image under PATH, one split 'train'."""
  path = os.path.expanduser(name[len(IMAGES_PREFIX):])
  if not path or not tf.io.gfile.isdir(path):
    raise DatasetError(f'--dataset={name}: folder {path!r} does not exist. Expected a folder '
                       'with images (jpg, jpeg, png, bmp, gif) at any depth.')
  paths, hidden, others = image_files.list_images(path)
  log.info('--dataset=%s: %d images; skipped %d hidden file(s)/folder(s) and %d non-image '
           'file(s).', name, len(paths), hidden, others)
  if skip_bad_images and paths:
    bad = set(image_files.find_bad_images(paths))
    if bad:
      log.warning('--skip_bad_images: left out %d of %d images of --dataset=%s that cannot be '
                  'decoded (first: %s).', len(bad), len(paths), name, ', '.join(sorted(bad)[:3]))
      paths = [p for p in paths if p not in bad]
  if not paths:
    raise DatasetError(f'--dataset={name}: no images (jpg, jpeg, png, bmp, gif) found under '
                       f'{path!r} ({others} other file(s), {hidden} hidden).')
  return DatasetSource(name=name, kind='images', num_classes=0, image_shape=(None, None, 3),
                       split_sizes={'train': len(paths)}, files=tuple(paths))


def _prepare_here(builder, name: str):
  tfds_prepare.prepare(builder, name)
  return builder


def _resolve_tfds(name: str, data_dir: Optional[str], prepare=_prepare_here) -> DatasetSource:
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    close = difflib.get_close_matches(name, tfds.list_builders() + [synthetic.NAME], n=3)
    hint = f' Did you mean {" or ".join(close)}?' if close else ''
    raise DatasetError(f'--dataset={name!r} is unknown.{hint} Use {_FORMS}.') from None
  builder = prepare(builder, name)
  info = builder.info
  keys = info.supervised_keys
  label = info.features[keys[1]] if keys and len(keys) == 2 else None
  if label is None or not hasattr(label, 'num_classes'):
    raise DatasetError(f'--dataset={name} is not an image-classification dataset (it needs '
                       f'supervised (image, label) keys with a class label; has {keys}).')
  return DatasetSource(
      name=name, kind='tfds', num_classes=label.num_classes,
      image_shape=tuple(info.features[keys[0]].shape),
      split_sizes={k: v.num_examples for k, v in info.splits.items()},
      class_names=tuple(label.names), builder=builder)


def resolve_dataset(dataset: str, data_dir: Optional[str] = None,
                    skip_bad_images: bool = False,
                    skip_empty_classes: bool = False,
                    prepare_tfds: Callable = _prepare_here) -> DatasetSource:
  """Maps a --dataset value to a DatasetSource (preparing TFDS data if needed).

  prepare_tfds(builder, name) -> builder: prepares a TFDS dataset (multi-worker runs:
  tfds_prepare.chief_prepares, so that only the chief writes data_dir).
  skip_bad_images: for folder: datasets, decode every image once and leave out those that fail.
  skip_empty_classes: for folder: datasets, leave out class folders without images (else an
  error names them).
  """
  if not dataset:
    raise DatasetError(f'--dataset is empty. Use {_FORMS}.')
  if dataset == synthetic.NAME:
    return _resolve_builtin(dataset)
  if dataset.startswith(FOLDER_PREFIX):
    return _resolve_folder(dataset, skip_bad_images, skip_empty_classes)
  if dataset.startswith(IMAGES_PREFIX):
    return _resolve_images(dataset, skip_bad_images)
  if data_dir and not tf.io.gfile.isdir(data_dir):
    raise DatasetError(
        f'--data_dir={data_dir} does not exist (--dataset={dataset}): point it at the folder '
        f'holding the prepared dataset ({data_dir}/{dataset.split(":")[0]}/<version>), or create '
        'it to have TFDS download and prepare the dataset there.')
  return _resolve_tfds(dataset, data_dir, prepare_tfds)


def resolve_from_config(data_config, eval_split: bool = True,
                        prepare_tfds: Callable = _prepare_here) -> DatasetSource:
  """Resolves data_config.dataset and validates --train_split and (if `eval_split`, and the
  dataset is labelled) --eval_split. `prepare_tfds`: as resolve_dataset's."""
  source = resolve_dataset(data_config.dataset, data_config.data_dir,
                           data_config.skip_bad_images, data_config.skip_empty_classes,
                           prepare_tfds)
  source.validate_split(data_config.train_split, '--train_split')
  if eval_split and source.labelled:
    source.validate_split(data_config.eval_split, '--eval_split')
  return source


def label_subset_for(source: DatasetSource, split: str, fraction: float, seed: int) -> np.ndarray:
  """Indices (in `as_dataset(split)` order) of the class-balanced labelled subset of `split`."""
  return subsets.select_label_subset(source.labels(split), fraction, seed)


def write_label_subset(directory: str, *, dataset: str, split: str, fraction: float, seed: int,
                       indices: np.ndarray) -> str:
  """Writes the chosen ids to <directory>/label_subset.json so a run can be reproduced."""
  tf.io.gfile.makedirs(directory)
  path = run_dir.label_subset_path(directory)
  record = {'dataset': dataset, 'split': split, 'fraction': fraction, 'seed': seed,
            'num_examples': int(len(indices)), 'indices': [int(i) for i in indices]}
  with tf.io.gfile.GFile(path, 'w') as f:
    json.dump(record, f)
  return path


def read_label_subset(path: str) -> dict:
  """Reads a label_subset.json; 'indices' becomes an int64 array."""
  with tf.io.gfile.GFile(path) as f:
    record = json.load(f)
  record['indices'] = np.asarray(record['indices'], dtype=np.int64)
  return record
