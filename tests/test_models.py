"""Tests of the heads and SimCLRModel (tf_simclr.models.heads / simclr)."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_simclr.config import ModelConfig
from tf_simclr.models import heads
from tf_simclr.models import resnet as resnet_lib
from tf_simclr.models import simclr

EPS = 1e-5
NUM_CLASSES = 5


def _model(num_classes=NUM_CLASSES, **overrides):
  """A tiny SimCLRModel: ResNet-18, CIFAR stem, built for 8x8 images."""
  config = dict(resnet_depth=18, cifar_stem=True, proj_out_dim=16)
  config.update(overrides)
  return simclr.build_model(ModelConfig(**config), num_classes).build_for_size(8)


@functools.lru_cache(maxsize=None)
def _shared_model(**overrides):
  """A tiny model shared by tests that do not depend on its weights or BN statistics."""
  return _model(**overrides)


def _images(n=4, size=8, seed=0):
  return tf.constant(np.random.RandomState(seed).uniform(size=(n, size, size, 3)), tf.float32)


def _features(n=6, width=12, seed=0):
  return tf.constant(np.random.RandomState(seed).normal(size=(n, width)), tf.float32)


def _np_bn_train(x, gamma, beta):
  mean, var = x.mean(0), x.var(0)
  return (x - mean) / np.sqrt(var + EPS) * gamma + beta


def test_endpoint_names():
  assert (simclr.INITIAL_CONV, simclr.INITIAL_MAX_POOL, simclr.BLOCK_GROUPS,
          simclr.FINAL_AVG_POOL, simclr.PROJ_HEAD_INPUT, simclr.PROJ_HEAD_OUTPUT,
          simclr.LOGITS_SUP) == (
              'initial_conv', 'initial_max_pool',
              ('block_group1', 'block_group2', 'block_group3', 'block_group4'),
              'final_avg_pool', 'proj_head_input', 'proj_head_output', 'logits_sup')
  assert simclr.ENCODER_ENDPOINTS == resnet_lib.ENDPOINT_NAMES


# ---------------------------------------------------------------------------- heads alone


def test_linear_layer_bias_bn_and_width():
  x = _features(width=12)
  for use_bias, use_bn in [(True, False), (False, False), (True, True), (False, True)]:
    layer = heads.LinearLayer(None, use_bias=use_bias, use_bn=use_bn, global_bn=False)
    assert tuple(layer(x).shape) == (6, 12)  # units=None: as wide as the input
    assert (layer.dense.bias is not None) == (use_bias and not use_bn)
    assert (layer.bn is not None) == use_bn
    if use_bn:
      assert (layer.bn.beta is not None) == use_bias and layer.bn.gamma is not None
      assert (layer.bn.epsilon, layer.bn.momentum) == (EPS, 0.9)
  assert tuple(heads.LinearLayer(7)(x).shape) == (6, 7)
  big = heads.LinearLayer(512)
  big(tf.zeros((1, 512)))
  assert abs(big.dense.kernel.numpy().std() - 0.01) < 5e-4  # RandomNormal(stddev=0.01)


@pytest.mark.parametrize('mode,num_layers,widths', [
    ('none', 3, (12,)),
    ('linear', 3, (12, 4)),
    ('nonlinear', 1, (12, 4)),
    ('nonlinear', 3, (12, 12, 12, 4)),
])
def test_projection_head_shapes_and_every_selector(mode, num_layers, widths):
  x = _features(width=12)
  for selector in range(-len(widths), len(widths)):
    head = heads.ProjectionHead(mode, out_dim=4, num_layers=num_layers,
                                ft_proj_selector=selector, global_bn=False)
    output, hiddens = head(x, training=True)
    assert isinstance(hiddens, tuple)
    assert [h.shape[-1] for h in hiddens] == list(widths)
    np.testing.assert_array_equal(hiddens[0].numpy(), x.numpy())
    np.testing.assert_array_equal(output.numpy(), hiddens[-1].numpy())
    chosen = head.select(hiddens)
    assert chosen is hiddens[selector]
    logits = heads.SupervisedHead(3)(chosen)
    assert tuple(logits.shape) == (6, 3)
  with pytest.raises(ValueError, match='ft_proj_selector'):
    heads.ProjectionHead(mode, out_dim=4, num_layers=num_layers, ft_proj_selector=len(widths))


def test_nonlinear_head_matches_numpy():
  """Middle layers: Dense -> BN(beta) -> ReLU at input width; last: Dense -> BN(no beta)."""
  x = _features(width=12)
  head = heads.ProjectionHead('nonlinear', out_dim=4, num_layers=3, global_bn=False)
  head(x)
  rng = np.random.RandomState(5)
  for layer in head.linear_layers:  # non-trivial gamma/beta so their roles are checked
    layer.bn.gamma.assign(rng.uniform(0.5, 1.5, layer.bn.gamma.shape))
    if layer.bn.beta is not None:
      layer.bn.beta.assign(rng.normal(size=layer.bn.beta.shape))
  output, hiddens = head(x, training=True)
  h = x.numpy()
  for j, layer in enumerate(head.linear_layers):
    beta = layer.bn.beta.numpy() if j < 2 else 0.0
    h = _np_bn_train(h @ layer.dense.kernel.numpy(), layer.bn.gamma.numpy(), beta)
    if j < 2:
      h = np.maximum(h, 0)
    np.testing.assert_allclose(hiddens[j + 1].numpy(), h, rtol=1e-4, atol=1e-4)
  assert head.linear_layers[2].bn.beta is None
  assert all(layer.dense.bias is None for layer in head.linear_layers)


def test_linear_and_none_heads_match_numpy():
  x = _features(width=12)
  linear = heads.ProjectionHead('linear', out_dim=4, global_bn=False)
  inference, _ = linear(x, training=False)  # fresh moving statistics: mean 0, variance 1
  output, hiddens = linear(x, training=True)
  (layer,) = linear.linear_layers
  kernel = layer.dense.kernel.numpy()
  assert layer.dense.bias is None and layer.bn.beta is None
  np.testing.assert_allclose(inference.numpy(), x.numpy() @ kernel / np.sqrt(1 + EPS),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(output.numpy(), _np_bn_train(x.numpy() @ kernel, 1.0, 0.0),
                             rtol=1e-4, atol=1e-4)
  assert len(hiddens) == 2
  none = heads.ProjectionHead('none')
  output, hiddens = none(x)
  np.testing.assert_array_equal(output.numpy(), x.numpy())
  assert len(hiddens) == 1 and not none.variables


def test_supervised_head_is_dense_with_bias():
  head = heads.SupervisedHead(3)
  x = _features(width=12)
  logits = head(x)
  kernel, bias = head.linear_layer.dense.kernel.numpy(), head.linear_layer.dense.bias.numpy()
  assert head.name == 'head_supervised' and len(head.variables) == 2
  np.testing.assert_allclose(logits.numpy(), x.numpy() @ kernel + bias, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- full model


@pytest.mark.slow
@pytest.mark.parametrize('mode,num_layers,selector,sup_width', [
    ('none', 2, 0, 512),
    ('linear', 2, -1, 16),
    ('nonlinear', 2, 1, 512),
])
def test_model_endpoints(mode, num_layers, selector, sup_width):
  model = _model(proj_head_mode=mode, num_proj_layers=num_layers, ft_proj_selector=selector)
  x = _images()
  out = model(x, training=True)
  proj_width = 512 if mode == 'none' else 16
  assert {k: tuple(v.shape) for k, v in out.items()} == {
      'initial_conv': (4, 8, 8, 64), 'initial_max_pool': (4, 8, 8, 64),
      'block_group1': (4, 8, 8, 64), 'block_group2': (4, 4, 4, 128),
      'block_group3': (4, 2, 2, 256), 'block_group4': (4, 1, 1, 512),
      'final_avg_pool': (4, 512), 'proj_head_input': (4, 512),
      'proj_head_output': (4, proj_width), 'logits_sup': (4, NUM_CLASSES)}
  assert tuple(model.supervised_head.linear_layer.dense.kernel.shape) == (sup_width, NUM_CLASSES)
  np.testing.assert_array_equal(out['proj_head_input'].numpy(), out['final_avg_pool'].numpy())
  # logits_sup is the supervised head applied to hiddens[ft_proj_selector] (inference, to compare).
  out = model(x, training=False)
  _, hiddens = model.projection_head(out['final_avg_pool'], training=False)
  expected = model.supervised_head(hiddens[selector], training=False)
  np.testing.assert_allclose(out['logits_sup'].numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
  assert [l.name for l in (model.encoder, model.projection_head, model.supervised_head)] == [
      'resnet', 'projection_head', 'head_supervised']


@pytest.mark.slow
@pytest.mark.parametrize('stop_gradient', [True, False])
def test_supervised_head_stop_gradient(stop_gradient):
  model = _shared_model(se_ratio=0.25, supervised_head_stop_gradient=stop_gradient)
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(model(_images(), training=True)['logits_sup'] ** 2)
  encoder_vars = model.encoder.trainable_variables
  grads = tape.gradient(loss, encoder_vars + model.supervised_head.trainable_variables)
  encoder_grads, head_grads = grads[:len(encoder_vars)], grads[len(encoder_vars):]
  assert all(g is not None for g in head_grads)
  if stop_gradient:
    assert all(g is None for g in encoder_grads)
  else:
    assert any(g is not None and np.any(g.numpy() != 0) for g in encoder_grads)


def test_build_model_maps_config():
  model = _model(supervised_head=False, batch_norm_decay=0.8, global_bn=False,
                 proj_head_mode='linear', fine_tune_after_block=4)
  out = model(_images(), training=True)
  assert model.supervised_head is None and 'logits_sup' not in out
  bns = [l for l in model._flatten_layers() if isinstance(l, keras.layers.BatchNormalization)]
  assert len(bns) == 21 + 1  # encoder (1 stem + 8 blocks x 2 + 4 shortcuts) + linear head
  assert all((bn.momentum, bn.synchronized) == (0.8, False) for bn in bns)
  assert not model.encoder.trainable_variables  # fine_tune_after_block=4: linear eval
  assert model.projection_head.trainable_variables
  with pytest.raises(ValueError, match='num_classes'):
    simclr.build_model(ModelConfig(resnet_depth=18), num_classes=0)
  with pytest.raises(ValueError, match='height, width, 3'):
    model(tf.zeros((2, 8, 8, 6)))


@pytest.mark.slow
def test_checkpoint_round_trips_every_variable(tmp_path):
  """DESIGN trap: every variable, BN moving statistics of encoder and heads included."""
  model = _shared_model(se_ratio=0.25, supervised_head_stop_gradient=False)
  model(_images(), training=True)  # move the BN statistics away from their initial values
  saved = {v.path: v.numpy() for v in model.variables}
  assert len(saved) == len(model.variables)
  moving = [p for p in saved if p.endswith(('moving_mean', 'moving_variance'))]
  assert any(p.startswith('model/projection_head/') for p in moving)
  assert len(moving) == 2 * (21 + 3)
  prefix = tf.train.Checkpoint(model=model).write(str(tmp_path / 'ckpt'))
  stored = [k for k, _ in tf.train.list_variables(prefix) if k.startswith('model/')]
  assert len(stored) == len(model.variables)

  for v in model.variables:
    v.assign(v + 1.0)
  tf.train.Checkpoint(model=model).read(prefix).assert_consumed()
  for v in model.variables:
    np.testing.assert_array_equal(v.numpy(), saved[v.path], err_msg=v.path)

  fresh = _model(se_ratio=0.25)  # a separately built model receives the same values
  tf.train.Checkpoint(model=fresh).read(prefix).assert_consumed()
  assert sorted(v.path for v in fresh.variables) == sorted(saved)
  for v in fresh.variables:
    np.testing.assert_array_equal(v.numpy(), saved[v.path], err_msg=v.path)


@pytest.mark.slow
@pytest.mark.parametrize('fine_tune_after_block,encoder_bns,se_biases', [
    (-1, 21, 16),
    # stem (1 BN) + block groups 1-2 (2 x (2 blocks x 2 + 1 shortcut)) frozen; SE in 4 blocks left.
    (2, 21 - 11, 8),
])
def test_variable_groups(fine_tune_after_block, encoder_bns, se_biases):
  """ResNet-18 with SE (bias in 2 convs per block) and a 3-layer head (BN beta on 2 of 3)."""
  frozen = {} if fine_tune_after_block == -1 else dict(fine_tune_after_block=fine_tune_after_block)
  model = _shared_model(se_ratio=0.25, supervised_head_stop_gradient=False, **frozen)
  groups = model.variable_groups()
  assert len(groups.batch_norm) == 2 * encoder_bns + (2 + 2 + 1)
  assert len(groups.bias) == se_biases + 1  # + the supervised head's bias
  assert {v.name for v in groups.batch_norm} == {'gamma', 'beta'}
  assert {v.name for v in groups.bias} == {'bias'}
  assert [v.path for v in groups.supervised_head] == [
      'model/head_supervised/linear_layer/dense/kernel',
      'model/head_supervised/linear_layer/dense/bias']
  trainable = {id(v) for v in model.trainable_variables}
  everything = groups.batch_norm + groups.bias + groups.supervised_head
  assert all(id(v) in trainable for v in everything)
  assert len({id(v) for v in groups.batch_norm + groups.bias}) == len(groups.batch_norm) + len(
      groups.bias)
  covered = {id(v) for v in groups.batch_norm + groups.bias}
  assert {v.name for v in model.trainable_variables if id(v) not in covered} == {'kernel'}
