"""folder: and images: datasets on several hosts: each input pipeline lists and decodes only its
own share of the files (before: every host decoded the whole split and dropped the rest)."""

import os

import numpy as np
import pytest
import tensorflow as tf

from tf_simclr.data import datasets

NUM_FILES = 7  # 2 pipelines: shares of 3 and 4 files.


def _write_images(root):
  """NUM_FILES 8x8 PNGs under root/train/<class>/, image k filled with the value 30 * k + 5."""
  paths = []
  for k in range(NUM_FILES):
    folder = os.path.join(root, 'train', f'class{k % 2}')
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f'img{k}.png')
    image = tf.fill([8, 8, 3], tf.constant(30 * k + 5, tf.uint8))
    tf.io.write_file(path, tf.io.encode_png(image))
    paths.append(path)
  return paths


@pytest.mark.parametrize('prefix', [datasets.FOLDER_PREFIX, datasets.IMAGES_PREFIX])
def test_each_host_decodes_only_its_disjoint_share_and_the_shares_cover_the_split(tmp_path,
                                                                                   prefix):
  paths = _write_images(str(tmp_path))
  source = datasets.resolve_dataset(prefix + str(tmp_path))
  order = source.paths('train')
  assert sorted(order) == sorted(paths)
  seen = []
  for pipeline_id in range(2):
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline_id)
    start, stop = datasets.host_range(NUM_FILES, 2, pipeline_id)
    share = order[start:stop]
    # Every other file is unreadable while this host reads: decoding one would fail.
    saved = {p: open(p, 'rb').read() for p in order if p not in share}
    for p in saved:
      with open(p, 'wb') as f:
        f.write(b'not an image')
    try:
      ds = source.as_dataset('train', shuffle_files=True, input_context=context, seed=1)
      values = [int(image.numpy()[0, 0, 0]) for image, _ in ds]
    finally:
      for p, data in saved.items():
        with open(p, 'wb') as f:
          f.write(data)
    files = [paths[(v - 5) // 30] for v in values]
    assert sorted(files) == sorted(share), (pipeline_id, files, share)
    seen.append(files)
  assert [len(s) for s in seen] == [3, 4]  # Unequal shares.
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == sorted(paths)


def test_folder_labels_follow_the_files_of_each_share(tmp_path):
  """A share's labels are its own files' classes (the file list and labels are cut together)."""
  paths = _write_images(str(tmp_path))
  source = datasets.resolve_dataset(datasets.FOLDER_PREFIX + str(tmp_path))
  for pipeline_id in range(2):
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline_id)
    for image, label in source.as_dataset('train', input_context=context):
      k = (int(image.numpy()[0, 0, 0]) - 5) // 30
      assert source.class_names[int(label)] == os.path.basename(os.path.dirname(paths[k]))
      assert image.shape == (8, 8, 3) and image.dtype == tf.uint8
