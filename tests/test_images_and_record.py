"""images:PATH datasets, --mode=embed's rows under any strategy, modes reading the run's record,
and validation that leaves no debris. In-process, no training."""

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tf_simclr import config as cfg
from tf_simclr import config_record
from tf_simclr import run_dir
from tf_simclr.data import datasets, image_files
from tf_simclr.errors import ConfigError, DatasetError, UserError
from tf_simclr.models import simclr
from tf_simclr.evaluation import embed
from tf_simclr.run import modes

from helpers import parse_flags, tiny_config


def _image(path, rgb, size=(19, 23), fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.tile(np.array(rgb, np.uint8), size + (1,))).save(path, format=fmt)


@pytest.fixture
def photos(tmp_path):
  """11 images of distinct colours at several depths (png/PNG/jpg/JPEG/bmp/gif), a hidden image, a
  hidden folder, a text file and a corrupt .png."""
  root = tmp_path / 'photos'
  rng = np.random.RandomState(1)
  files = ['a.png', 'b.PNG', 'd1/c.bmp', 'd1/d.GIF', 'd1/d2/e.png', 'd1/d2/f.png', 'd1/d2/d3/g.png',
           'z/h.png', 'z/i.png', 'z/j.JPEG', 'z/k.jpg']
  colours = {}
  for name in files:
    colour = tuple(int(v) for v in rng.randint(0, 256, 3))
    fmt = {'.bmp': 'BMP', '.gif': 'GIF', '.jpeg': 'JPEG', '.jpg': 'JPEG'}.get(
        os.path.splitext(name)[1].lower(), 'PNG')
    _image(str(root / name), colour, fmt=fmt)
    colours[str(root / name)] = colour
  _image(str(root / '.hidden.png'), (1, 2, 3))
  _image(str(root / '.cache' / 'x.png'), (1, 2, 3))
  (root / 'README.txt').write_text('no image')
  return root, colours


def test_images_folder_lists_recursively_and_skips(photos):
  root, colours = photos
  paths, hidden, others = image_files.list_images(str(root))
  # Walk order: a folder's files (sorted), then its subfolders (sorted), as the fixture lists them.
  assert paths == list(colours) and (hidden, others) == (2, 1)
  source = datasets.resolve_dataset(f'images:{root}')
  assert (source.kind, source.num_classes, source.labelled) == ('images', 0, False)
  assert source.splits == ['train'] and source.num_examples('train') == 11
  assert source.paths('train') == paths
  # A TFDS-style slice, decoded in order, every image its own colour, labels -1.
  half = source.paths('train[:50%]')
  assert half == paths[:len(half)] and source.num_examples('train[:50%]') == len(half)
  got = list(source.as_dataset('train[:50%]'))
  assert len(got) == len(half)
  for (image, label), path in zip(got, half):
    assert int(label) == datasets.UNLABELLED and image.shape[-1] == 3
    if not path.lower().endswith(('.jpg', '.jpeg', '.gif')):  # Lossless: exact colours.
      np.testing.assert_array_equal(image.numpy()[0, 0], colours[path])
  np.testing.assert_array_equal(source.labels('train'), np.full([11], -1))
  with pytest.raises(DatasetError, match='--eval_split'):
    source.validate_split('validation', '--eval_split')


def test_bad_images_named_or_skipped(photos):
  root, _ = photos
  (root / 'z' / 'broken.png').write_bytes(b'\x89PNG not really')
  source = datasets.resolve_dataset(f'images:{root}')
  assert source.num_examples('train') == 12
  error = datasets.bad_images_error(source, 'train')
  assert error is not None and 'broken.png' in str(error) and '--skip_bad_images' in str(error)
  skipped = datasets.resolve_dataset(f'images:{root}', skip_bad_images=True)
  assert skipped.num_examples('train') == 11
  assert not any('broken' in p for p in skipped.paths('train'))


def test_images_errors(tmp_path, photos):
  root, _ = photos
  with pytest.raises(DatasetError, match='does not exist'):
    datasets.resolve_dataset(f'images:{tmp_path / "nope"}')
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'a.txt').write_text('x')
  with pytest.raises(DatasetError, match=r'no images .* \(1 other'):
    datasets.resolve_dataset(f'images:{tmp_path / "empty"}')
  # A flat folder is no folder: layout; the error points at images:.
  flat = tmp_path / 'flat'
  _image(str(flat / 'a.png'), (1, 2, 3))
  with pytest.raises(DatasetError, match=f'images:{flat}'):
    datasets.resolve_dataset(f'folder:{flat}')


# ---- Validation before model_dir exists (item 5) and unlabelled-data rules (item 1).

@pytest.mark.parametrize('overrides, match', [
    ({'data__train_split': 'tran'}, '--train_split'),
    ({'data__eval_split': 'validation'}, '--eval_split'),
    ({'data__dataset': 'images:/no/such/folder'}, 'does not exist'),
    ({'data__dataset': 'shapes1O'}, 'unknown'),
    ({'train__train_batch_size': 64, 'data__train_split': 'train[:10]'}, 'fewer than one'),
    ({'train__checkpoint': '/no/such/ckpt-5'}, 'not found'),
    ({'train__checkpoint': '/no/such/ckpt-5', 'train__mode': 'probe'}, 'not found'),
])
def test_refused_training_leaves_no_model_dir(tmp_path, overrides, match):
  model_dir = tmp_path / 'new' / 'run'
  with pytest.raises(UserError, match=match):
    modes.prepare(tiny_config(model_dir, **overrides))
  assert not (tmp_path / 'new').exists()


@pytest.mark.parametrize('mode, train_mode, match', [
    ('train', 'finetune', 'needs labels'), ('eval', 'pretrain', 'evaluates against labels'),
    ('train_then_eval', 'pretrain', 'evaluates'), ('probe', 'pretrain', 'evaluates')])
def test_unlabelled_data_refuses_what_needs_labels(tmp_path, photos, mode, train_mode, match):
  root, _ = photos
  model_dir = tmp_path / 'run'
  config = tiny_config(model_dir, data__dataset=f'images:{root}', train__mode=mode,
                       train__train_mode=train_mode)
  with pytest.raises(DatasetError, match=match):
    modes.prepare(config)
  assert not model_dir.exists()


def test_unlabelled_pretraining_turns_labels_off(tmp_path, photos):
  root, _ = photos
  config = tiny_config(tmp_path / 'run', data__dataset=f'images:{root}', data__eval_split='nope',
                       probe__knn=None, probe__linear_probe=True)
  assert config.model.supervised_head
  ctx = modes.prepare(config)
  try:
    assert not ctx.config.model.supervised_head
    assert ctx.config.probe.knn is False and ctx.config.probe.linear_probe is False
    assert ctx.num_classes == 0 and ctx.steps.train_steps == 3
  finally:
    ctx.lock.release()


# ---- --mode=embed rows under one device and two replicas (item 2).

def test_embed_rows_in_order_under_any_strategy(photos, two_replica_strategy):
  root, colours = photos
  source = datasets.resolve_dataset(f'images:{root}')
  data = cfg.DataConfig(dataset=f'images:{root}', image_size=16)
  model_config = cfg.model_config('pretrain', 16, resnet_depth=18, width_multiplier=0.125,
                                  proj_out_dim=8, num_proj_layers=2)
  tf.keras.utils.set_random_seed(0)
  model = simclr.build_model(model_config, 0).build_for_size(16)
  # Independent reference: each image's eval view is its decoded colour (constant images).
  views = []
  for path in source.paths('train'):
    image = tf.io.decode_image(tf.io.read_file(path), channels=3,
                               expand_animations=False).numpy()
    views.append(np.broadcast_to(image[0, 0] / np.float32(255), (16, 16, 3)))
  expected = {k: model(tf.constant(np.stack(views)), training=False)[k].numpy()
              for k in ('final_avg_pool', 'proj_head_output')}
  with two_replica_strategy.scope():
    model2 = simclr.build_model(model_config, 0).build_for_size(16)
  model2.set_weights(model.get_weights())
  for strategy, m, endpoint in ((tf.distribute.get_strategy(), model, 'proj_head_output'),
                                (two_replica_strategy, model2, 'final_avg_pool')):
    # Batch 4 over 11 images: the last global batch is partial (one replica gets 1, one 2).
    features, labels = embed.compute(m, source, data, 'train', endpoint, 4, strategy)
    assert features.shape == expected[endpoint].shape and features.dtype == np.float32
    # float32 inference of the same inputs in other batches: rounding ~1e-6 relative.
    np.testing.assert_allclose(features, expected[endpoint], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(labels, np.full([11], -1))


def test_embed_files(tmp_path):
  folder = run_dir.embeddings_dir(str(tmp_path), 'train[:90%]')
  assert folder == str(tmp_path / 'embeddings' / 'train[:90%]')
  features = np.arange(6, dtype=np.float32).reshape(3, 2)
  embed.write(folder, features, np.array([0, 2, 1]), ['a.png', 'b/c.jpg', 'd.png'])
  np.testing.assert_array_equal(np.load(os.path.join(folder, 'features.npy')), features)
  np.testing.assert_array_equal(np.load(os.path.join(folder, 'labels.npy')), [0, 2, 1])
  assert open(os.path.join(folder, 'paths.txt')).read() == 'a.png\nb/c.jpg\nd.png\n'


# ---- Every reading mode fills flags from the run's record (item 3).

_parse = parse_flags


RECORD = {'resnet_depth': 18, 'width_multiplier': 0.25, 'sk_ratio': 0.0, 'se_ratio': 0.0,
          'proj_head_mode': 'nonlinear', 'proj_out_dim': 32, 'num_proj_layers': 2,
          'ft_proj_selector': 0, 'image_size': 32, 'dataset': 'cifar10', 'eval_split': 'test',
          'train_split': 'train', 'train_mode': 'pretrain', 'lineareval_while_pretraining': False,
          'learning_rate': 9.0}


@pytest.mark.parametrize('mode', ['eval', 'export', 'probe', 'embed'])
def test_reading_modes_fill_unset_flags_from_flags_json(tmp_path, run_module, mode):
  (tmp_path / 'flags.json').write_text(json.dumps(RECORD))
  fv = _parse([f'--mode={mode}', f'--model_dir={tmp_path}', '--eval_split=validation',
               '--resnet_depth=18'])
  run_module.fill_flags_from_record(fv)
  for name in ('width_multiplier', 'proj_out_dim', 'num_proj_layers', 'image_size', 'dataset',
               'train_split', 'lineareval_while_pretraining'):
    assert fv[name].value == RECORD[name], name
  assert fv.eval_split == 'validation'  # Given: a data flag may differ from the record.
  assert fv.learning_rate == 0.3  # Not a model or data flag: untouched.
  config = run_module.config_from_flags(fv)
  assert config.model.cifar_stem and not config.model.supervised_head
  fv.unparse_flags()


def test_given_architecture_flag_contradicting_the_record_is_an_error(tmp_path, run_module):
  (tmp_path / 'flags.json').write_text(json.dumps(RECORD))
  fv = _parse(['--mode=export', f'--model_dir={tmp_path}', '--resnet_depth=50',
               '--width_multiplier=0.25', '--proj_out_dim=16'])
  with pytest.raises(ConfigError) as e:
    run_module.fill_flags_from_record(fv)
  message = str(e.value)
  assert "--resnet_depth=50 here but 18 in the run" in message
  assert "--proj_out_dim=16 here but 32 in the run" in message
  assert 'width_multiplier' not in message and str(tmp_path / 'flags.json') in message
  fv.unparse_flags()
  # Training never reads the record this way (resume checks are the training run's own).
  fv = _parse(['--mode=train', f'--model_dir={tmp_path}', '--resnet_depth=50'])
  run_module.fill_flags_from_record(fv)
  assert fv.resnet_depth == 50 and fv.dataset == 'imagenet2012'
  fv.unparse_flags()


def test_fill_from_record_rules():
  values = {n: None for n in config_record.RECORD_MUST_AGREE + config_record.RECORD_FILLS}
  values.update(width_multiplier=1.0, dataset='imagenet2012', train_mode='pretrain')
  out = config_record.fill_from_record({'width_multiplier': 1, 'train_mode': 'distill',
                                  'dataset': 'cifar10', 'sk_ratio': None},
                                 values, {'width_multiplier'}, 'here')
  assert out['width_multiplier'] == 1.0  # 1 == 1.0: no contradiction.
  assert out['train_mode'] == 'finetune'  # A distilled student reads as a fine-tuned model.
  assert out['dataset'] == 'cifar10' and out['sk_ratio'] is None


@pytest.mark.slow
def test_distillation_trains_on_unlabelled_images(tmp_path, photos, original_fixture_dir):
  """SimCLR v2's distillation needs no labels: the student learns the teacher's 10 classes."""
  root, _ = photos
  base = tiny_config(tmp_path / 'run', data__dataset=f'images:{root}', data__image_size=32,
                     train__train_steps=2)
  student = cfg.model_config('distill', 32, resnet_depth=18, width_multiplier=0.125,
                             proj_out_dim=16, num_proj_layers=2)
  teacher = cfg.teacher_model_config(student, resnet_depth=18, width_multiplier=1,
                                     proj_out_dim=128, num_proj_layers=3)
  config = dataclasses.replace(
      base, model=student, train=dataclasses.replace(base.train, train_mode='distill'),
      distill=cfg.DistillConfig(teacher=teacher,
                                teacher_checkpoint=str(original_fixture_dir / 'saved_model')))
  modes.run(config, export_fn=modes.no_export)
  from tf_simclr import weights
  assert (tmp_path / 'run' / 'ckpt-2.index').exists()
  assert weights.describe(str(tmp_path / 'run' / 'ckpt-2'))['num_classes'] == 10


def test_embed_reads_the_originals_weights_from_checkpoint(tmp_path, original_fixture_dir):
  """--mode=embed --checkpoint=<the original's SavedModel>: the model of those weights (its
  10-class head found in the variables) computes the original's own features."""
  from tf_simclr.evaluation import reading
  base = tiny_config(tmp_path / 'run', data__image_size=32, train__mode='embed',
                     train__checkpoint=str(original_fixture_dir / 'saved_model'))
  model_config = cfg.model_config('pretrain', 32, resnet_depth=18, width_multiplier=1,
                                  proj_out_dim=128, num_proj_layers=3)
  config, num_classes = reading.model_from_weights(dataclasses.replace(base, model=model_config),
                                                   'embed')
  assert num_classes == 10 and config.model.supervised_head
  model = simclr.build_model(config.model, num_classes).build_for_size(32)
  reading.load_weights(config, model)
  expected = np.load(original_fixture_dir / 'expected_outputs.npz')
  out = model(tf.constant(expected['images']), training=False)
  # The fixture's bar for an importer of these weights (its README): max abs diff <= 1e-4.
  for key in ('final_avg_pool', 'proj_head_output', 'logits_sup'):
    assert np.max(np.abs(out[key].numpy() - expected[key])) <= 1e-4, key
