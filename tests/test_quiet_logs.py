"""Quiet logs: no CUDA start-up lines on a machine without an NVIDIA driver (a real process),
no per-save/per-export TensorFlow lines, and a run refused for bad images leaves model_dir as it
was."""

import logging
import os
import subprocess
import sys

import pytest

from tf_simclr import cpu_kernels
from tf_simclr import errors
from tf_simclr.cli import quiet
from tf_simclr.run import modes

import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_LINES = ('cuInit', 'Could not find cuda drivers', 'absl::InitializeLog')


@pytest.mark.slow
@pytest.mark.skipif(cpu_kernels.nvidia_sign() is not None, reason='this machine has an NVIDIA '
                    'driver: its CUDA lines are real and must stay')
def test_cli_prints_no_cuda_lines_without_a_driver(tmp_path):
  """The same TensorFlow start-up prints them without the filter (checked first, so the test can
  fail), and not through the command line, which still prints its own error."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  bare = subprocess.run([sys.executable, '-c', 'import tensorflow as tf; '
                         'tf.config.list_physical_devices()'], env=env, capture_output=True,
                        text=True, timeout=300)
  if not any(line in bare.stderr for line in CUDA_LINES):
    pytest.skip('this TensorFlow build prints no CUDA lines here')
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'run.py'), '--mode=export',
                         f'--model_dir={tmp_path / "empty"}'], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'empty' in proc.stderr  # The refusal itself still gets through.
  for line in CUDA_LINES:
    assert line not in proc.stderr, proc.stderr[-2000:]


def test_filtered_stderr_drops_only_matching_lines(capfd):
  with quiet.filtered_stderr(quiet.CUDA_NOISE):
    os.write(2, b'I0000 cudart_stub.cc:31] Could not find cuda drivers on your machine\n')
    os.write(2, b'E0000 cuda_platform.cc:52] failed call to cuInit: INTERNAL\n')
    os.write(2, b'E0000 something else went wrong\n')
  err = capfd.readouterr().err
  assert err == 'E0000 something else went wrong\n'


def test_a_driver_present_filters_nothing(monkeypatch):
  monkeypatch.setattr(cpu_kernels, 'nvidia_sign', lambda: '/dev/nvidia0')
  calls = []
  monkeypatch.setattr(quiet, 'filtered_stderr', lambda noise: calls.append(noise))
  quiet.start_tensorflow()
  assert not calls
  monkeypatch.setattr(cpu_kernels, 'nvidia_sign', lambda: None)
  with pytest.raises((TypeError, AttributeError)):  # The recorded call returns no context.
    quiet.start_tensorflow()
  assert calls == [quiet.CUDA_NOISE]


def test_routine_tensorflow_lines_are_dropped(caplog):
  quiet.install_log_filter()
  absl_logger = logging.getLogger('absl')
  with caplog.at_level(logging.INFO, logger='absl'):
    absl_logger.info('Sharding callback duration: %d microseconds', 163)
    absl_logger.info('Function `serve` contains input name(s) 15697, 15699 with unsupported '
                     'characters which will be renamed to ...')
    absl_logger.info('Writing fingerprint to /tmp/x/saved_model/2/fingerprint.pb')
    absl_logger.info('Exported the hub module to /tmp/x/saved_model/2')
  assert [r.getMessage() for r in caplog.records] == [
      'Exported the hub module to /tmp/x/saved_model/2']


def _folder_with_a_bad_image(root):
  helpers.png_folder(root, {'train': 8, 'test': 2}, size=12)
  (root / 'train' / 'a' / 'bad.jpg').write_bytes(b'\xff\xd8\xff\xe0 not a jpeg' * 8)


@pytest.mark.slow
@pytest.mark.parametrize('existing', [False, True])
def test_bad_images_refusal_leaves_model_dir_as_it_was(tmp_path, existing):
  _folder_with_a_bad_image(tmp_path / 'data')
  model_dir = tmp_path / 'run'
  if existing:
    model_dir.mkdir()
    (model_dir / 'notes.txt').write_text('mine')
  config = helpers.tiny_config(
      str(model_dir), data__dataset=f'folder:{tmp_path / "data"}', data__eval_split='test',
      data__image_size=8, train__train_batch_size=8, train__train_steps=2,
      train__mode='train', model__width_multiplier=0.125,
      # No colour jitter or blur (the refusal is about decoding; they are most of what tracing
      # the input pipeline costs), momentum rather than LARS (a fifth less tracing of the step).
      data__color_jitter_strength=0.0, data__use_blur=False, optim__optimizer='momentum')
  with pytest.raises(errors.BadImagesError, match='bad.jpg'):
    modes.run(config, flags_dict={'mode': 'train'}, export_fn=modes.no_export)
  if existing:
    assert sorted(os.listdir(model_dir)) == ['notes.txt']
  else:
    assert not model_dir.exists()
