"""tf_simclr.SimCLR as an ordinary Keras model: inputs fit() takes, Keras callbacks and ours,
.keras saving, the hub export and the command line's checkpoints (the step itself:
test_keras_parity.py)."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import tf_simclr
from tf_simclr import keras_model
from tf_simclr import export, recipes
from tf_simclr.data import augment
from tf_simclr.evaluation import probe

from helpers import config_from_argv

TINY = dict(image_size=16, resnet_depth=18, width_multiplier=0.125, proj_out_dim=8,
            num_proj_layers=2, temperature=0.5)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(**overrides):
  return tf_simclr.SimCLR(**{**TINY, **overrides})


def _shapes(split, n):
  return tf_simclr.data.shapes10(split).take(n)


def test_import_stays_light():
  """`import tf_simclr` loads neither TensorFlow nor Keras (the CLI's --help stays fast)."""
  code = 'import sys, tf_simclr; print("tensorflow" in sys.modules, "keras" in sys.modules)'
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       check=True).stdout.split()
  assert out == ['False', 'False']
  assert {'SimCLR', 'LARS', 'KNNMonitor', 'LinearProbe', 'data'} <= set(dir(tf_simclr))


def test_arguments_follow_the_command_line(tmp_path):
  """Defaults are the flags' defaults; a recipe gives the model its flagfile gives the CLI."""
  cli = config_from_argv([f'--model_dir={tmp_path}', '--dataset=shapes10'])
  model_config = keras_model.build_config(num_classes=10).model
  assert model_config == cli.model
  assert keras_model.build_config(image_size=32).model.cifar_stem
  cli = config_from_argv([f'--flagfile={recipes.path("quickstart")}', f'--model_dir={tmp_path}'])
  model = tf_simclr.SimCLR.from_recipe('quickstart', num_classes=10)
  assert model.config.model == cli.model
  assert model.config.data.color_jitter_strength == cli.data.color_jitter_strength
  assert model.config.train.temperature == cli.train.temperature
  assert 'quickstart' in recipes.names()
  with pytest.raises(keras_model.cfg.ConfigError, match='resnet_depth'):
    tf_simclr.SimCLR(resnet_depth=19)


def test_recipes_are_package_data():
  """tf_simclr/flags is the clone's flags/ (one source), listed as package data."""
  assert os.path.realpath(recipes.RECIPES_DIR) == os.path.join(ROOT, 'flags')
  assert 'flags/*.cfg' in open(os.path.join(ROOT, 'pyproject.toml')).read()


def test_training_views_are_the_command_lines_augmentation():
  """Same seed, same ops: a view made by training_views equals preprocess_image's."""
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
  ds = tf.data.Dataset.from_tensor_slices(images)
  tf.random.set_seed(5)
  got = next(iter(tf_simclr.data.training_views(ds, 16, num_views=2, batch_size=2)))
  assert got.shape == (2, 16, 16, 6) and got.dtype == tf.float32
  # float32 0-255 (image_dataset_from_directory) is detected and scaled like uint8.
  as_float = tf.data.Dataset.from_tensor_slices(images.astype(np.float32)).batch(2)
  evaluated = next(iter(tf_simclr.data.eval_images(as_float, 32)))
  np.testing.assert_allclose(evaluated.numpy(), images / 255.0, atol=1e-6)
  want = augment.preprocess_image(tf.constant(images[0]), 32, 32, is_training=False,
                                  test_crop=False)
  np.testing.assert_allclose(evaluated[0].numpy(), want.numpy(), atol=1e-6)


def _write_folder(root, with_classes=True):
  rng = np.random.default_rng(0)
  for c in range(2):
    folder = root / (f'class{c}' if with_classes else '')
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(6):
      Image.fromarray(rng.integers(0, 256, (20, 20, 3)).astype(np.uint8)).save(
          folder / f'{c}_{i}.png')
  return str(root)


@pytest.mark.slow
def test_fit_takes_keras_folders_tfds_and_arrays(tmp_path):
  """image_dataset_from_directory (labels and labels=None), a TFDS split and a plain dataset of
  images all train; Keras callbacks work unchanged, our readouts land in History."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from test_data import TinyGrayDataset  # noqa: F401  (registers the builder)

  folder = _write_folder(tmp_path / 'folder')
  labelled = keras.utils.image_dataset_from_directory(folder, image_size=(20, 20), batch_size=4)
  unlabelled = keras.utils.image_dataset_from_directory(folder, labels=None, image_size=(20, 20),
                                                        batch_size=4)
  model = _model(num_classes=2)
  model.compile(optimizer=tf_simclr.LARS(0.1), steps_per_execution=2)
  knn = tf_simclr.KNNMonitor(labelled, labelled, k=3, random_init_baseline=True)
  history = model.fit(labelled, epochs=2, verbose=0, callbacks=[
      knn, keras.callbacks.BackupAndRestore(str(tmp_path / 'backup')),
      keras.callbacks.ModelCheckpoint(str(tmp_path / 'best.keras'), monitor='loss'),
      keras.callbacks.TensorBoard(str(tmp_path / 'tb')),
      keras.callbacks.EarlyStopping(monitor='knn_top_1_accuracy', patience=5, mode='max')])
  assert len(history.history['loss']) == 2
  for key in ('knn_top_1_accuracy', 'random_init/knn_top_1_accuracy', 'contrast_loss',
              'supervised_acc'):
    assert len(history.history[key]) == 2, key
  assert os.path.exists(tmp_path / 'best.keras') and os.listdir(tmp_path / 'tb')

  no_head = _model(num_classes=None)
  no_head.compile(optimizer='adam')
  no_head.fit(unlabelled, epochs=1, verbose=0)
  with pytest.raises(ValueError, match='no labels'):
    model.fit(unlabelled, epochs=1, verbose=0)

  builder = tfds.builder('tiny_gray_dataset', data_dir=str(tmp_path / 'tfds'))
  builder.download_and_prepare()
  split = builder.as_dataset('train')  # unbatched dicts, grayscale 8x8
  finetune = _model(train_mode='finetune', num_classes=3)
  finetune.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
  history = finetune.fit(split, batch_size=8, epochs=1, verbose=0,
                         validation_data=builder.as_dataset('test'))
  assert len(history.history['supervised_acc']) == 1 and 'val_supervised_acc' in history.history
  assert int(finetune.optimizer.iterations.numpy()) == 40 // 8


@pytest.mark.slow
def test_linear_probe_callback_matches_probe_py(tmp_path):
  """The probe callback's numbers are probe.linear_probe's on the encoder's features."""
  train, test = _shapes('train', 96), _shapes('test', 48)
  model = _model(num_classes=10)
  model.compile(optimizer='adam')
  callback = tf_simclr.LinearProbe(train.batch(48), test.batch(48), random_init_baseline=False)
  history = model.fit(train, batch_size=16, epochs=1, verbose=0, callbacks=[callback])
  features = lambda ds: tf_simclr.callbacks.features(model, model.eval_data(ds.batch(48)))
  want = probe.linear_probe(*features(train), *features(test), 10)
  assert history.history['linear_probe_top_1_accuracy'] == [want[probe.PROBE_TOP1]]


@pytest.mark.slow
def test_keras_file_export_and_command_line_checkpoints(tmp_path):
  """.keras round-trip (outputs, and training continues), export_hub as --mode=export, and a
  command-line checkpoint into the Python model and back."""
  model = _model(num_classes=10)
  model.compile(optimizer=tf_simclr.LARS(0.2, weight_decay=1e-4))
  model.fit(_shapes('train', 32), batch_size=16, epochs=1, verbose=0)
  images = next(iter(model.eval_data(_shapes('test', 4).batch(4))))[0]
  want = model(images)
  path = str(tmp_path / 'model.keras')
  model.save(path)
  loaded = keras.models.load_model(path)
  assert isinstance(loaded, tf_simclr.SimCLR) and loaded.get_config() == model.get_config()
  for key, value in loaded(images).items():
    np.testing.assert_array_equal(value.numpy(), want[key].numpy(), err_msg=key)
  assert int(loaded.optimizer.iterations.numpy()) == 2
  assert loaded.optimizer.lars_weight_decay == 1e-4

  hub = export.load(model.export_hub(str(tmp_path / 'hub')))
  for key, value in hub(images, trainable=False).items():
    np.testing.assert_allclose(value.numpy(), want[key].numpy(), atol=1e-5, err_msg=key)

  # Python -> a command-line checkpoint -> a fine-tuning model (encoder and heads as trained).
  prefix = model.save_checkpoint(str(tmp_path / 'run'))
  assert os.path.basename(prefix) == 'ckpt-2'
  finetune = _model(train_mode='finetune', num_classes=10)
  finetune.load_checkpoint(str(tmp_path / 'run'))
  got = finetune(images)
  for key in ('final_avg_pool', 'proj_head_output'):
    np.testing.assert_array_equal(got[key].numpy(), want[key].numpy(), err_msg=key)
  with pytest.raises(Exception, match='resnet|shape|architecture'):
    _model(width_multiplier=0.25).load_checkpoint(str(tmp_path / 'run'))
