"""tf_simclr.weights against weights written by google-research/simclr (shared fixture).

The fixture's expected outputs were computed by the original code itself; the layouts are index
files of the original's checkpoints for four architectures (keys and shapes only).
"""

import functools
import json
from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_simclr import weights
from tf_simclr.errors import CheckpointMismatchError
from tf_simclr.config import ModelConfig
from tf_simclr.models import simclr

ENDPOINT_TOLERANCE = 1e-4

LAYOUTS = {
    'r50_1x_sk0': dict(resnet_depth=50),
    'r50_1x_sk1': dict(resnet_depth=50, sk_ratio=0.0625),
    'r50_1x_se': dict(resnet_depth=50, se_ratio=0.25),
    'r18_1x_sk1_cifar': dict(resnet_depth=18, sk_ratio=0.0625, cifar_stem=True),
}


def _zeros(self, shape, dtype=None):
  del self
  return tf.zeros(shape, dtype)


def _build(num_classes, image_size, zero_init=False, **arch):
  """Our model (nonlinear 3-layer head, out 128, global BN, linear eval head) for `arch`.

  zero_init skips the CPU's random init of big kernels when only shapes matter.
  """
  config = ModelConfig(supervised_head=True, supervised_head_stop_gradient=True, **arch)
  model = simclr.build_model(config, num_classes)
  if not zero_init:
    return model.build_for_size(image_size)
  with mock.patch.object(keras.initializers.VarianceScaling, '__call__', _zeros), \
      mock.patch.object(keras.initializers.RandomNormal, '__call__', _zeros):
    return model.build_for_size(image_size)


@functools.lru_cache(maxsize=None)
def _fixture_model(fixture_dir, num_classes):
  """Our model of the fixture's architecture; shared, as tests load all of it or read shapes."""
  arch, image_size = _fixture_arch(fixture_dir)
  return _build(num_classes, image_size, zero_init=True, **arch)


def _fixture_arch(fixture_dir):
  """Our architecture arguments from the original run's flags.json."""
  with open(fixture_dir / 'flags.json') as f:
    flags = json.load(f)
  return dict(resnet_depth=flags['resnet_depth'], width_multiplier=flags['width_multiplier'],
              cifar_stem=flags['image_size'] <= 32, sk_ratio=flags['sk_ratio'],
              se_ratio=flags['se_ratio'], proj_head_mode=flags['proj_head_mode'],
              num_proj_layers=flags['num_proj_layers'], proj_out_dim=flags['proj_out_dim'],
              global_bn=flags['global_bn']), flags['image_size']


# Hand-written from the original's resnet.py / model.py (list positions of each layer).
@pytest.mark.parametrize('theirs,ours', [
    ('model/resnet_model/initial_conv_relu_max_pool/0/conv2d/kernel',
     'encoder/stem/convs/0/_kernel'),
    ('model/resnet_model/initial_conv_relu_max_pool/2/bn/gamma', 'encoder/stem/bns/0/gamma'),
    ('model/resnet_model/initial_conv_relu_max_pool/2/conv2d/kernel',
     'encoder/stem/convs/1/_kernel'),
    ('model/resnet_model/initial_conv_relu_max_pool/6/bn/moving_mean',
     'encoder/stem/bns/2/moving_mean'),
    ('model/resnet_model/block_groups/3/layers/1/conv2d_bn_layers/3/bn/beta',
     'encoder/block_groups/3/blocks/1/bn2/beta'),
    ('model/resnet_model/block_groups/0/layers/0/shortcut_layers/1/conv2d/kernel',
     'encoder/block_groups/0/blocks/0/shortcut_conv/_kernel'),
    ('model/resnet_model/block_groups/1/layers/0/shortcut_layers/3/bn/moving_variance',
     'encoder/block_groups/1/blocks/0/shortcut_bn/moving_variance'),
    ('model/resnet_model/block_groups/1/layers/1/se_layer/se_expand/bias',
     'encoder/block_groups/1/blocks/1/se/se_expand/bias'),
    ('model/resnet_model/block_groups/2/layers/0/projection_layers/0/conv2d/kernel',
     'encoder/block_groups/2/blocks/0/shortcut_conv/_kernel'),
    ('model/resnet_model/block_groups/2/layers/4/conv_relu_dropblock_layers/6/conv2d/kernel',
     'encoder/block_groups/2/blocks/4/conv3/_kernel'),
    ('model/resnet_model/block_groups/2/layers/4/conv_relu_dropblock_layers/6/bn/gamma',
     'encoder/block_groups/2/blocks/4/bn3/gamma'),
    ('model/resnet_model/block_groups/0/layers/2/conv_relu_dropblock_layers/9/se_reduce/kernel',
     'encoder/block_groups/0/blocks/2/se/se_reduce/_kernel'),
    ('model/resnet_model/block_groups/1/layers/3/conv_relu_dropblock_layers/3/'
     'conv2d_fixed_padding/conv2d/kernel', 'encoder/block_groups/1/blocks/3/sk_conv/conv/_kernel'),
    ('model/resnet_model/block_groups/1/layers/3/conv_relu_dropblock_layers/3/'
     'batch_norm_relu_1/bn/beta', 'encoder/block_groups/1/blocks/3/sk_conv/mix_bn/beta'),
    ('model/resnet_model/block_groups/1/layers/3/conv_relu_dropblock_layers/3/conv2d_1/kernel',
     'encoder/block_groups/1/blocks/3/sk_conv/mix_conv1/_kernel'),
    ('model/_projection_head/linear_layers/2/bn_relu/bn/moving_variance/.ATTRIBUTES/'
     'VARIABLE_VALUE', 'projection_head/linear_layers/2/bn/moving_variance'),
    ('model/_projection_head/linear_layers/0/dense/kernel',
     'projection_head/linear_layers/0/dense/_kernel'),
    ('model/supervised_head/linear_layer/dense/bias', 'supervised_head/linear_layer/dense/bias'),
])
def test_original_to_ours_translates_known_paths(theirs, ours):
  assert weights.original.original_to_ours(theirs) == f'model/{ours}'


@pytest.mark.parametrize('path', [
    'model/resnet_model/variables/63',  # an alias, not a structural path
    'model/resnet_model/block_groups/0/layers/0/conv2d_bn_layers/1/conv2d/kernel',  # 1 is a BN
    'model/resnet_model/block_groups/0/layers/0/conv_relu_dropblock_layers/2/bn/gamma',  # dropblock
    'model/_projection_head/linear_layers/0/dense/kernel/.OPTIMIZER_SLOT/optimizer/Momentum',
    'global_step',
])
def test_original_to_ours_rejects_other_paths(path):
  assert weights.original.original_to_ours(path) is None


@pytest.mark.slow
def test_original_saved_model_reproduces_expected_outputs(original_fixture_dir):
  expected = np.load(original_fixture_dir / 'expected_outputs.npz')
  model = _fixture_model(original_fixture_dir, expected['logits_sup'].shape[-1])
  report = weights.match.load(model, str(original_fixture_dir / 'saved_model'))
  assert report.restored == len(model.variables) == 121
  assert report.fresh == [] and report.ignored == []
  outputs = model(tf.constant(expected['images']), training=False)
  diffs = {k: float(np.max(np.abs(outputs[k].numpy() - expected[k]))) for k in outputs}
  print('max abs diff per endpoint vs the original:', diffs)
  assert set(diffs) == set(expected.files) - {'images'}
  assert max(diffs.values()) <= ENDPOINT_TOLERANCE, diffs
  # The BN moving statistics arrived too (zero mean / unit variance would change the outputs).
  bn = model.encoder.stem.bns[0]
  assert not np.allclose(bn.moving_variance.numpy(), 1.0)


def test_training_checkpoint_keys_are_all_covered(original_fixture_dir):
  prefix = str(original_fixture_dir / 'training_checkpoint' / 'ckpt-286')
  model_keys = {k for k, _ in tf.train.list_variables(prefix)
                if k.startswith('model/') and '.OPTIMIZER_SLOT' not in k}
  source = weights.source.resolve(prefix)
  assert not source.has_values  # index only: the key strings are used
  model = _fixture_model(original_fixture_dir, 10)
  plan, fresh, ignored = weights.match.match(model, source)
  ours = weights.match.object_variable_paths(model, 'model')
  assert {key for _, key in plan} == model_keys
  assert len(plan) == len(ours) == len(model_keys) == 121 and not fresh and not ignored
  for var, key in plan:
    assert list(var.shape) == list(source.shapes[key]), key
  with pytest.raises(FileNotFoundError, match='data'):
    weights.match.load(model, prefix)


@functools.lru_cache(maxsize=None)
def _layout_model(name):
  return _build(1000, 32 if LAYOUTS[name].get('cifar_stem') else 64, zero_init=True,
                **LAYOUTS[name])


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(LAYOUTS))
def test_layout_keys_map_onto_our_variables(name, original_fixture_dir):
  prefix = str(original_fixture_dir / 'layouts' / name / 'ckpt-1')
  keys = {k: s for k, s in tf.train.list_variables(prefix) if k.startswith('model/')}
  model = _layout_model(name)
  plan, fresh, ignored = weights.match.match(model, weights.source.resolve(prefix))
  assert not fresh and not ignored
  assert sorted(key for _, key in plan) == sorted(keys)  # every key of theirs placed once
  assert len({id(var) for var, _ in plan}) == len(model.variables)  # every variable of ours
  for var, key in plan:
    assert list(var.shape) == keys[key], key
  arch = weights.describe(prefix)
  for field, value in LAYOUTS[name].items():
    assert arch[field] == value, (field, arch)
  assert arch['num_classes'] == 1000 and arch['num_proj_layers'] == 3


def test_describe_original_saved_model(original_fixture_dir):
  assert weights.describe(str(original_fixture_dir / 'saved_model')) == dict(
      resnet_depth=18, width_multiplier=1, cifar_stem=True, sk_ratio=0.0, se_ratio=0.0,
      proj_head_mode='nonlinear', num_proj_layers=3, proj_out_dim=128, num_classes=10)


def test_wrong_depth_names_variables_and_flags(original_fixture_dir):
  arch, image_size = _fixture_arch(original_fixture_dir)
  arch['resnet_depth'] = 34
  model = _build(10, image_size, zero_init=True, **arch)
  with pytest.raises(CheckpointMismatchError) as err:
    weights.match.load(model, str(original_fixture_dir / 'saved_model'))
  message = str(err.value)
  assert 'model/encoder/block_groups/0/blocks/2/' in message  # R34's third block: no value
  assert '--resnet_depth=18' in message


def test_resnet_d_checkpoint_into_plain_model_is_refused(original_fixture_dir):
  """R18 with and without sk_ratio have the same shapes; the import must still refuse."""
  model = _build(1000, 32, zero_init=True, resnet_depth=18, cifar_stem=True)
  source = weights.source.resolve(
      str(original_fixture_dir / 'layouts' / 'r18_1x_sk1_cifar' / 'ckpt-1'))
  with pytest.raises(CheckpointMismatchError, match='sk_ratio'):
    weights.match.match(model, source)


def test_new_head_is_left_fresh_with_fresh_ok(original_fixture_dir):
  model = _fixture_model(original_fixture_dir, 3)
  with pytest.raises(CheckpointMismatchError, match='supervised_head'):
    weights.match.load(model, str(original_fixture_dir / 'saved_model'))
  report = weights.match.load(model, str(original_fixture_dir / 'saved_model'),
                              fresh_ok=('supervised_head',))
  assert report.fresh == ['model/supervised_head/linear_layer/dense/_kernel',
                          'model/supervised_head/linear_layer/dense/bias']
  assert report.restored == 119 and report.ignored == []  # as restore_model_variables
