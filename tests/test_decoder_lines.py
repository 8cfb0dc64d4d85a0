"""The JPEG decoder's own stderr lines (C code, file descriptor 2) are folded into the one
bad-image message, or into one warning when the damaged files still decode."""

import io
import logging
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import helpers
from tf_simclr import native_stderr
from tf_simclr.data import datasets
from tf_simclr.errors import BadImagesError


def _jpeg_bytes():
  image = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, 'JPEG')
  return buffer.getvalue()


def test_streamed_stderr_passes_other_lines_on_in_order_and_keeps_the_dropped(capfd):
  with native_stderr.streamed_stderr(native_stderr.JPEG_NOISE) as dropped:
    os.write(2, b'before\n')
    os.write(2, b'Corrupt JPEG data: 3 extraneous bytes before marker 0xc4\n')
    os.write(2, b'middle\n')
    os.write(2, b'W0000 local_rendezvous.cc:412] Local rendezvous is aborting with status: '
                b'INVALID_ARGUMENT: jpeg::Uncompress failed. Invalid JPEG data\n')
    os.write(2, b'after\n')
  assert capfd.readouterr().err == 'before\nmiddle\nafter\n'
  assert dropped == ['Corrupt JPEG data: 3 extraneous bytes before marker 0xc4',
                     'W0000 local_rendezvous.cc:412] Local rendezvous is aborting with status: '
                     'INVALID_ARGUMENT: jpeg::Uncompress failed. Invalid JPEG data']
  os.write(2, b'restored\n')  # descriptor 2 is the real stderr again
  assert capfd.readouterr().err == 'restored\n'


def _folder(root, extra_name, extra_bytes):
  helpers.png_folder(root, {'train': 4, 'test': 2}, size=8)
  (root / 'train' / 'a' / extra_name).write_bytes(extra_bytes)
  return datasets.resolve_dataset(f'folder:{root}')


def test_a_truncated_jpeg_gives_one_message_and_no_decoder_lines(tmp_path, capfd):
  data = _jpeg_bytes()
  source = _folder(tmp_path, 'cut.jpg', data[:len(data) // 2])
  with pytest.raises(BadImagesError) as raised:
    with datasets.naming_bad_images(source, 'train'):
      tf.io.decode_image(tf.io.read_file(str(tmp_path / 'train' / 'a' / 'cut.jpg')))
  message = str(raised.value)
  assert f'1 image file(s) cannot be decoded, first: {tmp_path}/train/a/cut.jpg.' in message
  assert 'The JPEG decoder printed' in message and 'folded into this message' in message
  err = capfd.readouterr().err
  assert 'JPEG' not in err and 'jpeg' not in err, err


def test_a_jpeg_that_decodes_with_complaints_gives_one_warning(tmp_path, capfd, caplog):
  data = _jpeg_bytes()
  damaged = data[:200] + b'\x00\x00\x00' + data[200:]  # extraneous bytes: decodes, complains
  source = _folder(tmp_path, 'extra.jpg', damaged)
  path = str(tmp_path / 'train' / 'a' / 'extra.jpg')
  with caplog.at_level(logging.WARNING):
    with datasets.naming_bad_images(source, 'train'):
      for _ in range(3):  # three epochs
        decoded = tf.io.decode_image(tf.io.read_file(path))
  assert decoded.shape == (32, 32, 3)
  assert 'Corrupt JPEG data' not in capfd.readouterr().err
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1, warnings
  assert warnings[0].startswith(f'--dataset=folder:{tmp_path}: the JPEG decoder complained 3 '
                                'time(s) about images that still decode')
  assert "first: 'Corrupt JPEG data: 3 extraneous bytes before marker" in warnings[0]
