"""Tests of tf_simclr.models.resnet against the original's sizes, layouts and conventions."""

import collections
import functools
from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_simclr import precision as precision_lib
from tf_simclr.models import heads
from tf_simclr.models import resnet as resnet_lib
from tf_simclr.models.batch_norm import BatchNormalization

# Architectures of shared/fixtures/original_tf2/layouts (resnet() arguments), with the encoder
# trainable-parameter counts measured from the original code.
LAYOUTS = {
    'r50_1x_sk0': (dict(depth=50), 23_508_032),
    'r50_1x_sk1': (dict(depth=50, sk_ratio=0.0625), 35_215_584),
    'r50_1x_se': (dict(depth=50, se_ratio=0.25), 26_039_024),
    'r18_1x_sk1_cifar': (dict(depth=18, sk_ratio=0.0625, cifar_stem=True), 11_173_056),
}


# Behaviour tests (freezing, synchronized BN) at a quarter width (channels 16-16-32-64-128): what
# they check does not depend on the width; full width only made initialisation and every pass
# slower.
SMALL = 0.25


def _num_params(variables):
  return sum(int(np.prod(v.shape)) for v in variables)


def _zeros(self, shape, dtype=None):
  del self
  return tf.zeros(shape, dtype)


@functools.lru_cache(maxsize=None)
def _encoder(**kwargs):
  """A built encoder, shared between tests that only read shapes, counts or BN settings.

  Conv kernels start at zero here: the CPU's random init of ~10^8 weights is the slowest part of
  these tests and no test reading these encoders depends on kernel values.
  """
  enc = resnet_lib.resnet(**kwargs)
  with mock.patch.object(keras.initializers.VarianceScaling, '__call__', _zeros):
    enc(tf.zeros((1, 32, 32, 3)))
  return enc


def _layout_encoder(name):
  return _encoder(**LAYOUTS[name][0])


def _images(n, size, seed=0):
  return tf.constant(np.random.RandomState(seed).uniform(size=(n, size, size, 3)), tf.float32)


@pytest.mark.parametrize('name', sorted(LAYOUTS))
def test_encoder_parameter_count_matches_original(name):
  assert _num_params(_layout_encoder(name).trainable_variables) == LAYOUTS[name][1]


@pytest.mark.slow
def test_parameter_counts_match_simclrv2_table1():
  """SimCLRv2 paper, Table 1 (millions, rounded as printed)."""
  counts = {'R50 1x': _layout_encoder('r50_1x_sk0'), 'R50 1x SK': _layout_encoder('r50_1x_sk1'),
            'R50 2x': _encoder(depth=50, width_multiplier=2), 'R101 1x': _encoder(depth=101)}
  millions = {k: int(round(_num_params(v.trainable_variables) / 1e6)) for k, v in counts.items()}
  assert millions == {'R50 1x': 24, 'R50 1x SK': 35, 'R50 2x': 94, 'R101 1x': 43}


def _sections_of_layout(prefix):
  """{section: sorted [(leaf name, shape)]} of the original's model keys."""
  sections = {'model/resnet_model/': 'encoder', 'model/_projection_head/': 'projection_head',
              'model/supervised_head/': 'supervised_head'}
  out = collections.defaultdict(list)
  for key, shape in tf.train.list_variables(prefix):
    if not key.startswith('model/'):
      continue
    section = [s for p, s in sections.items() if key.startswith(p)]
    assert len(section) == 1, f'unexpected original key {key}'
    leaf = key.split('/.ATTRIBUTES')[0].rsplit('/', 1)[1]
    out[section[0]].append((leaf, tuple(shape)))
  return {k: sorted(v) for k, v in out.items()}


def _ours(layer):
  return sorted((v.name, tuple(v.shape)) for v in layer.variables)


@pytest.mark.parametrize('name', sorted(LAYOUTS))
def test_encoder_variables_match_original_layout(name, original_fixture_dir):
  """Same variables (kind and shape, BN moving statistics included) as the original's encoder."""
  expected = _sections_of_layout(str(original_fixture_dir / 'layouts' / name / 'ckpt-1'))
  assert _ours(_layout_encoder(name)) == expected['encoder']


@pytest.mark.parametrize('name,width', [('r50_1x_sk0', 2048), ('r18_1x_sk1_cifar', 512)])
def test_head_variables_match_original_layout(name, width, original_fixture_dir):
  """The layouts' heads: nonlinear 3-layer projection head (out 128), 1000-class logits."""
  expected = _sections_of_layout(str(original_fixture_dir / 'layouts' / name / 'ckpt-1'))
  proj = heads.ProjectionHead('nonlinear', out_dim=128, num_layers=3)
  sup = heads.SupervisedHead(1000)
  sup(proj(tf.zeros((2, width)))[1][0])
  assert _ours(proj) == expected['projection_head']
  assert _ours(sup) == expected['supervised_head']


def _delta_conv(kernel_size, strides, x):
  """A Conv2dFixedPadding whose kernel copies the top-left tap, applied to x (N, H, W, 1)."""
  conv = resnet_lib.Conv2dFixedPadding(1, kernel_size, strides)
  conv.build(x.shape)
  kernel = np.zeros(conv.kernel.shape, np.float32)
  kernel[0, 0, 0, 0] = 1.0
  conv.kernel.assign(kernel)
  return conv(tf.constant(x)).numpy()


@pytest.mark.parametrize('size', [8, 9])
def test_fixed_padding_matches_original_convention(size):
  x = np.random.RandomState(1).normal(size=(1, size, size, 1)).astype(np.float32)
  # Strided: pad (k-1)//2 before and the rest after, independent of the input size, then VALID.
  for k in (3, 7):
    beg = (k - 1) // 2
    padded = np.pad(x, [(0, 0), (beg, k - 1 - beg), (beg, k - 1 - beg), (0, 0)])
    n = (size + k - 1 - k) // 2 + 1
    np.testing.assert_array_equal(_delta_conv(k, 2, x), padded[:, 0:2 * n:2, 0:2 * n:2])
  np.testing.assert_array_equal(_delta_conv(1, 2, x), x[:, ::2, ::2])
  # Stride 1: SAME (pads 1 on each side for 3x3).
  padded = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
  np.testing.assert_array_equal(_delta_conv(3, 1, x), padded[:, :size, :size])


def test_resnet_d_shortcut_pools_like_the_original():
  """SK blocks: zero-pad one row/column at the end, 2x2/2 VALID average-pool, then 1x1 conv."""
  block = resnet_lib.BasicBlock(4, 2, use_projection=True, sk_ratio=0.0625, se_ratio=0.0,
                                bn_decay=0.9, global_bn=False)
  x = np.random.RandomState(2).normal(size=(1, 7, 7, 4)).astype(np.float32)
  block(tf.constant(x))
  block.shortcut_conv.kernel.assign(np.eye(4, dtype=np.float32)[None, None])
  got = block._shortcut(tf.constant(x), training=False).numpy()
  padded = np.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])
  pooled = padded.reshape(1, 4, 2, 4, 2, 4).mean(axis=(2, 4))
  np.testing.assert_allclose(got, pooled / np.sqrt(1 + 1e-5), rtol=1e-5, atol=1e-6)


def _expected_shapes(n, size, cifar_stem, channels):
  """Hand-derived: ImageNet stem halves twice (conv, max-pool), groups 2..4 halve once each."""
  conv = size if cifar_stem else size // 2
  s = size if cifar_stem else size // 4
  shapes = {'initial_conv': (n, conv, conv, channels[0]),
            'initial_max_pool': (n, s, s, channels[0])}
  for i, c in enumerate(channels[1:]):
    shapes[f'block_group{i + 1}'] = (n, s // 2**i, s // 2**i, c)
  shapes['final_avg_pool'] = (n, channels[-1])
  return shapes


@pytest.mark.parametrize('kwargs,size,channels', [
    (dict(depth=18, cifar_stem=True), 16, (64, 64, 128, 256, 512)),
    (dict(depth=18), 32, (64, 64, 128, 256, 512)),
    (dict(depth=50, width_multiplier=2), 32, (128, 512, 1024, 2048, 4096)),
])
def test_endpoint_shapes(kwargs, size, channels):
  enc = _encoder(**kwargs)
  endpoints = enc(_images(2, size), training=False, return_endpoints=True)
  assert {k: tuple(v.shape) for k, v in endpoints.items()} == _expected_shapes(
      2, size, kwargs.get('cifar_stem', False), channels)
  pooled = enc(_images(2, size), training=False)
  np.testing.assert_allclose(pooled.numpy(), endpoints['final_avg_pool'].numpy(), rtol=1e-6)


def test_resnet_d_stem_endpoint_shapes():
  enc = _layout_encoder('r50_1x_sk1')
  endpoints = enc(_images(1, 32), training=False, return_endpoints=True)
  assert {k: tuple(v.shape) for k, v in endpoints.items()} == _expected_shapes(
      1, 32, False, (64, 256, 512, 1024, 2048))
  assert [tuple(c.kernel.shape) for c in enc.stem.convs] == [(3, 3, 3, 32), (3, 3, 32, 32),
                                                             (3, 3, 32, 64)]


def _with_random_stem(enc):
  rng = np.random.RandomState(4)
  for conv in enc.stem.convs:
    conv.kernel.assign(rng.normal(scale=0.2, size=conv.kernel.shape))
  return enc


def test_stem_endpoints_are_before_and_after_bn_relu_pool():
  """initial_conv is the raw conv; initial_max_pool = maxpool3x3/2(relu(BN(conv))) (fresh BN)."""
  scale = 1 / np.sqrt(1 + 1e-5)
  cifar = _with_random_stem(_encoder(depth=18, cifar_stem=True))(_images(2, 8),
                                                                 return_endpoints=True)
  assert np.abs(cifar['initial_conv'].numpy()).max() > 0.1
  np.testing.assert_allclose(cifar['initial_max_pool'].numpy(),
                             np.maximum(cifar['initial_conv'].numpy() * scale, 0), rtol=1e-5,
                             atol=1e-6)
  imnet = _with_random_stem(_encoder(depth=18))(_images(2, 16), return_endpoints=True)
  act = np.maximum(imnet['initial_conv'].numpy() * scale, 0)  # (2, 8, 8, 64)
  assert act.max() > 0.1
  padded = np.pad(act, [(0, 0), (0, 1), (0, 1), (0, 0)], constant_values=-np.inf)  # SAME
  pooled = np.stack([np.stack([padded[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(1, 2))
                               for j in range(4)], 1) for i in range(4)], 1)
  np.testing.assert_allclose(imnet['initial_max_pool'].numpy(), pooled, rtol=1e-5, atol=1e-6)


def _batch_norms(layer):
  return [l for l in layer._flatten_layers() if isinstance(l, keras.layers.BatchNormalization)]


@pytest.mark.parametrize('name,last_bn', [('r18_1x_sk1_cifar', 'bn2'), ('r50_1x_se', 'bn3')])
def test_batch_norm_settings_and_zero_init_gamma(name, last_bn):
  encoder = _layout_encoder(name)
  bns = _batch_norms(encoder)
  zero = {id(getattr(block, last_bn)) for g in encoder.block_groups for block in g.blocks}
  assert len(zero) == sum(len(g.blocks) for g in encoder.block_groups)
  for bn in bns:
    assert (bn.epsilon, bn.momentum, bn.synchronized, bn.center, bn.scale) == (
        1e-5, 0.9, True, True, True)
    expected = 0.0 if id(bn) in zero else 1.0
    np.testing.assert_array_equal(bn.gamma.numpy(), expected)


def test_variance_scaling_kernel_init():
  enc = resnet_lib.resnet(18, cifar_stem=True)
  enc(tf.zeros((1, 8, 8, 3)))
  for conv in (enc.stem.convs[0], enc.block_groups[3].blocks[1].conv2):
    kernel = conv.kernel.numpy()
    fan_in = np.prod(kernel.shape[:3])
    tolerance = 0.1 if kernel.size < 10_000 else 0.02
    assert abs(kernel.std() * np.sqrt(fan_in) - 1.0) < tolerance


def test_se_and_sk_widths_follow_the_original():
  se_block = _layout_encoder('r50_1x_se').block_groups[0].blocks[0]
  # Bottleneck SE: reduce width from `filters` (64 * 0.25), expand back to 4 * filters.
  assert tuple(se_block.se.se_reduce.kernel.shape) == (1, 1, 256, 16)
  assert tuple(se_block.se.se_expand.kernel.shape) == (1, 1, 16, 256)
  assert se_block.se.se_reduce.bias is not None and se_block.se.se_expand.bias is not None
  sk = _layout_encoder('r50_1x_sk1').block_groups[3].blocks[0].sk_conv
  assert tuple(sk.conv.kernel.shape) == (3, 3, 512, 1024)
  assert tuple(sk.mix_conv0.kernel.shape) == (1, 1, 512, 32)  # max(int(512 * 0.0625), 32)
  assert tuple(sk.mix_conv1.kernel.shape) == (1, 1, 32, 1024)


def test_invalid_arguments_raise():
  with pytest.raises(ValueError, match='resnet_depth'):
    resnet_lib.resnet(42)
  with pytest.raises(ValueError, match='fine_tune_after_block'):
    resnet_lib.resnet(18, fine_tune_after_block=5)
  with pytest.raises(ValueError, match='width_multiplier'):
    resnet_lib.resnet(18, width_multiplier=0)


@pytest.mark.parametrize('k,frozen_bn', [(-1, 'batch_stats'), (0, 'batch_stats'),
                                         (2, 'moving_stats'), (4, 'moving_stats'),
                                         (4, 'batch_stats')])
def test_fine_tune_after_block_freezes(k, frozen_bn):
  """Frozen parts train nothing and pass no gradient; their BN statistics stay fixed and their
  endpoints ignore training=True with moving_stats; with batch_stats (the original) they move,
  and the endpoints equal an all-trainable copy's training-mode ones."""
  enc = resnet_lib.resnet(18, width_multiplier=SMALL, cifar_stem=True, fine_tune_after_block=k,
                          frozen_batch_norm=frozen_bn)
  x = _images(4, 8)
  enc(x)
  parts = (enc.stem,) + enc.block_groups
  frozen, free = parts[:k + 1], parts[k + 1:]
  trainable = {id(v) for v in enc.trainable_variables}
  for part in frozen:
    assert not any(id(v) in trainable for v in part.variables)
  for part in free:
    assert {id(v) for v in part.trainable_variables} <= trainable
    assert part.trainable_variables
  unfrozen = resnet_lib.resnet(18, width_multiplier=SMALL, cifar_stem=True)
  unfrozen(x)
  for a, b in zip(unfrozen.variables, enc.variables):
    a.assign(b)
  before = {id(bn): bn.moving_mean.numpy() for bn in _batch_norms(enc)}
  reference = enc(x, training=False, return_endpoints=True)
  trained = unfrozen(x, training=True, return_endpoints=True)
  frozen_kernels = [v.value for part in frozen for v in part.variables if v.name == 'kernel']
  with tf.GradientTape() as tape:
    tape.watch([x] + frozen_kernels)
    endpoints = enc(x, training=True, return_endpoints=True)
    loss = tf.reduce_sum(endpoints['final_avg_pool'] ** 2)
  for part in frozen:
    for bn in _batch_norms(part):
      moved = np.any(bn.moving_mean.numpy() != before[id(bn)])
      assert moved == (frozen_bn == 'batch_stats'), bn.path
  for part in free:
    for bn in _batch_norms(part):
      assert np.any(bn.moving_mean.numpy() != before[id(bn)])
  if frozen_bn == 'batch_stats':  # Every statistic moved as in the all-trainable copy.
    for a, b in zip(unfrozen.variables, enc.variables):
      np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6, err_msg=b.path)
  last_frozen = ('initial_max_pool', 'block_group1', 'block_group2', 'block_group3',
                 'block_group4')[k] if k >= 0 else None
  if last_frozen:
    want = (trained if frozen_bn == 'batch_stats' else reference)[last_frozen]
    np.testing.assert_allclose(endpoints[last_frozen].numpy(), want.numpy(), rtol=1e-5,
                               atol=1e-5)
  # stop_gradient at the end of the frozen part: no gradient reaches it or the images.
  grads = tape.gradient(loss, [x] + frozen_kernels)
  assert (grads[0] is None) == (k >= 0)
  assert all(g is None for g in grads[1:])


@pytest.mark.parametrize('policy', ['float32', 'mixed_bfloat16'])
@pytest.mark.parametrize('batch_stats', [True, False])
def test_frozen_batch_norm_layer_matches_numpy(policy, batch_stats):
  """A frozen (trainable=False) BN layer in training: batch statistics and the moving-average
  update against numpy when batch_stats_when_frozen (Keras' and the fused path), the moving
  statistics untouched otherwise; gamma and beta never train."""
  rng = np.random.RandomState(0)
  with precision_lib.policy_scope(policy):
    bn = BatchNormalization(momentum=0.9, epsilon=1e-5, synchronized=True)
  x = tf.cast(tf.constant(rng.normal(1.0, 2.0, size=(6, 3, 3, 5)).astype(np.float32)),
              bn.compute_dtype)
  bn.build(x.shape)
  bn.gamma.assign(rng.uniform(0.5, 1.5, size=5))
  bn.beta.assign(rng.normal(size=5))
  bn.moving_mean.assign(rng.normal(size=5))
  bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=5))
  bn.trainable = False
  bn.batch_stats_when_frozen = batch_stats
  assert not bn.trainable_variables
  start_mean, start_var = bn.moving_mean.numpy(), bn.moving_variance.numpy()
  y = bn(x, training=True).numpy().astype(np.float64).reshape(-1, 5)
  xn = x.numpy().astype(np.float64).reshape(-1, 5)
  mean, var = (xn.mean(0), xn.var(0)) if batch_stats else (start_mean, start_var)
  want = (xn - mean) / np.sqrt(var + 1e-5) * bn.gamma.numpy() + bn.beta.numpy()
  tol = 1e-5 if policy == 'float32' else 2 ** -8
  np.testing.assert_allclose(y, want, rtol=tol, atol=tol * np.abs(want).max())
  want_mean = 0.9 * start_mean + 0.1 * mean if batch_stats else start_mean
  want_var = 0.9 * start_var + 0.1 * var if batch_stats else start_var
  np.testing.assert_allclose(bn.moving_mean.numpy(), want_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(bn.moving_variance.numpy(), want_var, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize('k', [-1, 4])
def test_global_bn_matches_single_device_statistics(two_replica_strategy, k):
  """Synchronized BN over 2 replicas == one device on the concatenated batch; also in frozen
  layers (k=4, linear eval) with batch_stats, against an all-trainable single-device copy."""
  strategy = two_replica_strategy
  x = _images(8, 8, seed=3)
  single = resnet_lib.resnet(18, width_multiplier=SMALL, cifar_stem=True, global_bn=True)
  single(x[:2])
  with strategy.scope():
    mirrored = resnet_lib.resnet(18, width_multiplier=SMALL, cifar_stem=True, global_bn=True,
                                 fine_tune_after_block=k,
                                 frozen_batch_norm='batch_stats')
    mirrored(x[:2])
  for a, b in zip(mirrored.variables, single.variables):
    a.assign(b)
  initial = [v.numpy() for v in single.variables]
  single(x[:4], training=True)  # what replica 0 alone would compute without synchronization
  half = [v.numpy() for v in single.variables]
  for v, value in zip(single.variables, initial):
    v.assign(value)
  single(x, training=True)

  dist_x = strategy.experimental_distribute_values_from_function(
      lambda ctx: x[4 * ctx.replica_id_in_sync_group:4 * (ctx.replica_id_in_sync_group + 1)])

  @tf.function
  def step(images):
    return strategy.run(lambda im: mirrored(im, training=True), args=(images,))

  step(dist_x)
  moving = [(a, b, c) for a, b, c in zip(mirrored.variables, single.variables, half)
            if a.name in ('moving_mean', 'moving_variance')]
  assert len(moving) == 2 * len(_batch_norms(single))
  for ours, whole, part in moving:
    replicas = strategy.experimental_local_results(ours.value)
    assert len(replicas) == 2
    for value in replicas:
      np.testing.assert_allclose(value.numpy(), whole.numpy(), rtol=1e-4, atol=1e-5)
  assert max(np.abs(whole.numpy() - part).max() for _, whole, part in moving) > 1e-3


@pytest.mark.slow
def test_fractional_width_scales_every_layer_and_keeps_integer_widths_exact():
  """--width_multiplier=0.25 gives a 16-32-64-128 ResNet-18 (small CPU models); 2 doubles."""
  images = tf.zeros([1, 16, 16, 3])
  for width, expected in ((0.25, (16, 16, 32, 64, 128)), (2, (128, 128, 256, 512, 1024))):
    # Only shapes are read: the zero-initialised shared encoder (no random init of 44M weights).
    out = _encoder(depth=18, width_multiplier=width, cifar_stem=True)(images,
                                                                      return_endpoints=True)
    got = tuple(int(out[k].shape[-1]) for k in
                ('initial_max_pool', 'block_group1', 'block_group2', 'block_group3',
                 'block_group4'))
    assert got == expected, (width, got)
    assert int(out['final_avg_pool'].shape[-1]) == expected[-1]
