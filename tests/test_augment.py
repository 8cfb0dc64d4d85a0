"""Tests for tf_simclr.data.augment: checked against numpy and against sampling frequencies.

Each property runs eagerly and inside tf.data (graph mode) where the function is random.
"""

import colorsys

import numpy as np
import pytest
import tensorflow as tf

from tf_simclr.data import augment

MODES = ('eager', 'graph')


def _samples(fn, n, mode):
  """n independent draws of fn() stacked: eagerly in a loop, or inside a tf.data map."""
  if mode == 'eager':
    return np.stack([fn().numpy() for _ in range(n)])
  ds = tf.data.Dataset.range(n).map(lambda _: fn(), num_parallel_calls=2).batch(n)
  return next(iter(ds)).numpy()


def _rand_image(h, w, c=3, seed=0, lo=0.0, hi=1.0):
  return np.random.default_rng(seed).uniform(lo, hi, (h, w, c)).astype(np.float32)


def test_random_apply_frequency():
  x = tf.zeros([2])
  got = _samples(lambda: augment.random_apply(lambda t: t + 1.0, 0.3, x), 4000, 'graph')
  assert abs(got[:, 0].mean() - 0.3) < 0.03
  eager = _samples(lambda: augment.random_apply(lambda t: t + 1.0, 0.0, x), 20, 'eager')
  assert eager.max() == 0.0


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('delta', [0.8, 1.5])
def test_brightness_v2_is_multiplicative(mode, delta):
  image = tf.constant(_rand_image(4, 4, lo=0.1, hi=0.9))
  n = 60 if mode == 'eager' else 1000
  out = _samples(lambda: augment.random_brightness(image, delta, impl='simclrv2'), n, mode)
  factors = out / image.numpy()[None]
  per_sample = factors.reshape(n, -1)
  np.testing.assert_allclose(per_sample, per_sample[:, :1].repeat(per_sample.shape[1], 1),
                             rtol=1e-5)  # One factor for the whole image.
  f = per_sample[:, 0]
  lo, hi = max(1.0 - delta, 0.0), 1.0 + delta
  assert f.min() >= lo - 1e-6 and f.max() <= hi + 1e-6
  if mode == 'graph':  # Uniform on [lo, hi]: mean, and both ends reached.
    assert abs(f.mean() - (lo + hi) / 2) < 0.06 * (hi - lo)
    assert f.min() < lo + 0.05 * (hi - lo) and f.max() > hi - 0.05 * (hi - lo)


@pytest.mark.parametrize('mode', MODES)
def test_brightness_v1_is_additive(mode):
  image = tf.constant(_rand_image(4, 4, lo=0.1, hi=0.9))
  n = 60 if mode == 'eager' else 1000
  out = _samples(lambda: augment.random_brightness(image, 0.8, impl='simclrv1'), n, mode)
  deltas = (out - image.numpy()[None]).reshape(n, -1)
  np.testing.assert_allclose(deltas, deltas[:, :1].repeat(deltas.shape[1], 1), atol=1e-5)
  d = deltas[:, 0]
  assert d.min() >= -0.8 - 1e-5 and d.max() <= 0.8 + 1e-5
  if mode == 'graph':
    assert abs(d.mean()) < 0.06 and d.min() < -0.7 and d.max() > 0.7


def test_brightness_unknown_impl():
  with pytest.raises(ValueError, match='color_jitter_impl'):
    augment.random_brightness(tf.zeros([2, 2, 3]), 0.5, impl='v3')


def test_to_grayscale_matches_luma():
  image = _rand_image(5, 6, seed=1)
  out = augment.to_grayscale(tf.constant(image)).numpy()
  luma = image @ np.array([0.2989, 0.587, 0.114], dtype=np.float32)
  for c in range(3):
    np.testing.assert_allclose(out[..., c], luma, atol=1e-4)
  assert augment.to_grayscale(tf.constant(image), keep_channels=False).shape == (5, 6, 1)


@pytest.mark.parametrize('random_order', [True, False])
def test_color_jitter_zero_strength_is_identity(random_order):
  image = _rand_image(6, 6, seed=2)
  out = augment.color_jitter(tf.constant(image), 0.0, random_order=random_order)
  np.testing.assert_array_equal(out.numpy(), image)


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('impl', ['simclrv1', 'simclrv2'])
def test_color_jitter_range_and_change(mode, impl):
  image = tf.constant(_rand_image(6, 6, seed=3))
  n = 10 if mode == 'eager' else 200
  out = _samples(lambda: augment.color_jitter(image, 1.0, impl=impl), n, mode)
  assert out.shape == (n, 6, 6, 3) and out.min() >= 0.0 and out.max() <= 1.0
  changed = np.abs(out - image.numpy()[None]).reshape(n, -1).max(axis=1) > 1e-3
  assert changed.mean() > 0.9


def test_color_jitter_order_is_a_uniform_permutation(monkeypatch):
  """Replace the four transforms by tagging ops and decode the order each sample used."""
  seen_strengths = []

  def tagging_ops(*args):
    seen_strengths.append(args[:4])  # (brightness, contrast, saturation, hue, impl)
    # op k maps [0, 1] into [k/4, (k + 0.5)/4], so the leading base-4 digit names the last op.
    return tuple((lambda x, k=k: (0.5 * x + k) / 4.0) for k in range(4))
  monkeypatch.setattr(augment, '_jitter_ops', tagging_ops)

  def decode(v):
    order = []
    for _ in range(4):
      k = int(np.floor(4 * v + 1e-6))
      order.append(k)
      v = (4 * v - k) / 0.5
    return tuple(order[::-1])

  zero = tf.zeros([1, 1, 1])
  fixed = _samples(lambda: augment.color_jitter(zero, 0.5, random_order=False), 5, 'eager')
  assert {decode(float(v)) for v in fixed.ravel()} == {(0, 1, 2, 3)}
  assert seen_strengths[0] == pytest.approx((0.4, 0.4, 0.4, 0.1))
  out = _samples(lambda: augment.color_jitter(zero, 1.0, random_order=True), 2400, 'graph')
  orders = [decode(float(v)) for v in out.ravel()]
  assert all(sorted(o) == [0, 1, 2, 3] for o in orders)  # Each op exactly once.
  counts = np.unique(np.array(orders), axis=0, return_counts=True)[1]
  assert len(counts) == 24 and counts.min() > 50 and counts.max() < 150


def test_color_jitter_hsv_ranges():
  """On a flat colour (contrast has no effect), strength 0.25 without clipping gives:
  V scaled by U[0.8, 1.2] (brightness), S by U[0.8, 1.2] (saturation), H shifted by
  U[-0.05, 0.05] (hue = 0.2 * strength); checked with colorsys, independent of TF."""
  rgb = (0.5, 0.3, 0.2)
  image = tf.constant(np.full([2, 2, 3], rgb, np.float32))
  out = _samples(lambda: augment.color_jitter(image, 0.25), 1500, 'graph')[:, 0, 0]
  h0, s0, v0 = colorsys.rgb_to_hsv(*rgb)
  hsv = np.array([colorsys.rgb_to_hsv(*p) for p in out.astype(np.float64)])
  dh = (hsv[:, 0] - h0 + 0.5) % 1.0 - 0.5
  for values, lo, hi in [(hsv[:, 2] / v0, 0.8, 1.2), (hsv[:, 1] / s0, 0.8, 1.2),
                         (dh, -0.05, 0.05)]:
    assert values.min() > lo - 0.01 and values.max() < hi + 0.01
    assert values.min() < lo + 0.1 * (hi - lo) and values.max() > hi - 0.1 * (hi - lo)


def test_color_jitter_contrast_range():
  """A grey image half 0.4, half 0.6: brightness scales both halves, contrast c moves them
  about their mean, so 5 * (hi - lo) / (hi + lo) recovers c ~ U[0.8, 1.2] at strength 0.25."""
  image = np.full([2, 2, 3], 0.4, np.float32)
  image[1] = 0.6
  out = _samples(lambda: augment.color_jitter(tf.constant(image), 0.25), 1500, 'graph')
  lo, hi = out[:, 0, 0, 0].astype(np.float64), out[:, 1, 0, 0].astype(np.float64)
  c = 5 * (hi - lo) / (hi + lo)
  assert c.min() > 0.8 - 1e-3 and c.max() < 1.2 + 1e-3
  assert c.min() < 0.84 and c.max() > 1.16


@pytest.mark.parametrize('mode,n,tol', [('eager', 300, 0.1), ('graph', 3000, 0.035)])
def test_random_color_jitter_frequencies(mode, n, tol):
  image = tf.constant(_rand_image(4, 4, seed=5, lo=0.2, hi=0.8))
  out = _samples(lambda: augment.random_color_jitter(image, strength=1.0), n, mode)
  gray = np.abs(out - out[..., :1]).reshape(n, -1).max(axis=1) < 1e-6
  unchanged = np.abs(out - image.numpy()[None]).reshape(n, -1).max(axis=1) == 0.0
  assert abs(gray.mean() - 0.2) < tol  # Colour drop with p = 0.2.
  jittered = ~unchanged[~gray]  # Among non-dropped images, jitter applied with p = 0.8.
  assert abs(jittered.mean() - 0.8) < tol


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('out_h,out_w', [(24, 24), (16, 32)])
def test_sampled_crop_boxes(mode, out_h, out_w):
  h, w = 60, 80
  target = out_w / out_h
  n = 40 if mode == 'eager' else 1000

  def box():
    begin, size = augment.sample_crop_box(tf.constant([h, w, 3]), out_h, out_w)
    return tf.concat([begin[:2], size[:2]], 0)
  boxes = _samples(box, n, mode)
  y, x, bh, bw = boxes.T
  assert (y >= 0).all() and (x >= 0).all() and (y + bh <= h).all() and (x + bw <= w).all()
  area = bh * bw / (h * w)
  full = (bh == h) & (bw == w)
  assert area.min() >= 0.08 - 0.005 and area.max() <= 1.0
  ratio = bw[~full] / bh[~full] / target
  assert ratio.min() > 0.75 * 0.93 and ratio.max() < 4 / 3 * 1.07  # Integer rounding slack.
  if mode == 'graph':  # Area ~ U(0.08, 1) thinned by boxes that do not fit: mostly mid-sized.
    assert 0.2 < area.mean() < 0.6 and full.mean() < 0.1
    assert (area < 0.15).mean() > 0.05 and (area > 0.6).mean() > 0.05
    assert ratio.min() < 0.8 and ratio.max() > 1.25  # The whole aspect range is used.


def test_crop_is_the_sampled_box_and_fallback_is_whole_image():
  h, w = 20, 30
  coords = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing='ij'), -1).astype(np.float32)
  image = tf.constant(np.concatenate([coords, np.zeros([h, w, 1], np.float32)], -1))
  for _ in range(10):
    crop = augment.distorted_bounding_box_crop(image, (0.75, 4 / 3)).numpy()
    rows, cols = crop[:, 0, 0], crop[0, :, 1]
    np.testing.assert_array_equal(rows, np.arange(rows[0], rows[0] + len(rows)))
    np.testing.assert_array_equal(cols, np.arange(cols[0], cols[0] + len(cols)))
  # An impossible request (area near 1 with a very wide aspect) falls back to the whole image.
  whole = augment.distorted_bounding_box_crop(image, (5.0, 6.0), area_range=(0.95, 1.0))
  np.testing.assert_array_equal(whole.numpy(), image.numpy())


@pytest.mark.parametrize('mode', MODES)
def test_crop_and_resize_shape_and_range(mode):
  image = tf.constant(_rand_image(37, 23, seed=6))
  out = _samples(lambda: augment.random_crop_with_resize(image, 16, 12), 8, mode)
  assert out.shape == (8, 16, 12, 3)
  assert out.min() > -0.2 and out.max() < 1.2  # Bicubic may overshoot slightly.


def _numpy_blur(image, kernel_size, sigma):
  """Independent separable Gaussian with zero padding (NHWC or HWC)."""
  r = int(kernel_size / 2)
  x = np.arange(-r, r + 1, dtype=np.float64)
  k = np.exp(-x ** 2 / (2 * sigma ** 2))
  k /= k.sum()
  img = image.astype(np.float64)
  pad = [(0, 0)] * (img.ndim - 3) + [(r, r), (r, r), (0, 0)]
  p = np.pad(img, pad)
  hh, ww = img.shape[-3], img.shape[-2]
  tmp = sum(k[i] * p[..., :, i:i + ww, :] for i in range(2 * r + 1))
  return sum(k[i] * tmp[..., i:i + hh, :, :] for i in range(2 * r + 1))


@pytest.mark.parametrize('kernel_size,sigma', [(5, 1.3), (4, 0.7), (3, 2.0), (1, 1.0)])
def test_gaussian_blur_matches_numpy(kernel_size, sigma):
  image = _rand_image(12, 10, seed=7)
  got = augment.gaussian_blur(tf.constant(image), kernel_size, sigma).numpy()
  np.testing.assert_allclose(got, _numpy_blur(image, kernel_size, sigma), atol=1e-5)
  batch = np.stack([image, image[::-1]])
  got = augment.gaussian_blur(tf.constant(batch), kernel_size, sigma).numpy()
  np.testing.assert_allclose(got, _numpy_blur(batch, kernel_size, sigma), atol=1e-5)


@pytest.mark.parametrize('mode', MODES)
def test_batch_random_blur_shares_one_sigma(mode):
  """p=1: every image is blurred with the same kernel (one sigma per call, as the original)."""
  images = np.stack([_rand_image(32, 32, seed=s) for s in range(4)])
  delta = np.zeros([32, 32, 3], np.float32)
  delta[16, 16] = 1.0
  images[0] = delta
  fn = lambda: augment.batch_random_blur(tf.constant(images), 32, 32, blur_probability=1.0)
  for out in _samples(fn, 3, mode):
    # Kernel size 32 // 10 = 3 (radius 1): the delta reveals the 1-D weights [a, 1 - 2a, a].
    centre, side = out[0, 16, 16, 0], out[0, 15, 16, 0]
    w_mid = np.sqrt(centre)
    w_side = side / w_mid
    assert abs(2 * w_side + w_mid - 1) < 1e-4
    sigma = np.sqrt(-1 / (2 * np.log(w_side / w_mid)))
    assert 0.1 - 1e-3 <= sigma <= 2.0 + 1e-3
    expected = np.clip(_numpy_blur(images, 3, sigma), 0, 1)
    np.testing.assert_allclose(out, expected, atol=2e-4)


def test_batch_random_blur_selector():
  images = tf.constant(np.stack([_rand_image(32, 32, seed=s) for s in range(300)]))
  out = augment.batch_random_blur(images, 32, 32, blur_probability=0.5).numpy()
  changed = np.abs(out - images.numpy()).reshape(300, -1).max(axis=1) > 1e-6
  assert abs(changed.mean() - 0.5) < 0.1
  none = augment.batch_random_blur(images, 32, 32, blur_probability=0.0).numpy()
  np.testing.assert_array_equal(none, images.numpy())


def _numpy_center_crop(image, height, width, proportion=0.875):
  """Keep `proportion` of the side that is cropped less, with the target aspect (w / h)."""
  h, w = image.shape[:2]
  aspect = width / height
  if aspect > w / h:
    ch, cw = int(np.rint(proportion * w / aspect)), int(np.rint(proportion * w))
  else:
    ch, cw = int(np.rint(proportion * h)), int(np.rint(proportion * h * aspect))
  top, left = (h - ch + 1) // 2, (w - cw + 1) // 2
  return image[top:top + ch, left:left + cw]


@pytest.mark.parametrize('shape,size', [((16, 16), 14), ((16, 32), 14), ((32, 16), 14),
                                        ((15, 20), 13), ((20, 15), 13)])
def test_center_crop_matches_numpy(shape, size):
  image = _rand_image(*shape, seed=8)
  got = augment.center_crop(tf.constant(image), size, size).numpy()
  expected = _numpy_center_crop(image, size, size)
  assert expected.shape == (size, size, 3)  # So the bicubic resize is the identity.
  np.testing.assert_allclose(got, expected, atol=1e-5)
  assert augment.center_crop(tf.constant(image), 10, 20).shape == (10, 20, 3)


@pytest.mark.parametrize('mode', MODES)
def test_preprocess_image_train_and_eval(mode):
  image = tf.constant(np.random.default_rng(9).integers(0, 256, (40, 30, 3), dtype=np.uint8))
  train = _samples(lambda: augment.preprocess_image(image, 24, 24, is_training=True,
                                                    color_jitter_strength=1.0), 6, mode)
  assert train.shape == (6, 24, 24, 3) and train.dtype == np.float32
  assert train.min() >= 0.0 and train.max() <= 1.0
  ev = _samples(lambda: augment.preprocess_image(image, 24, 24, is_training=False), 2, mode)
  expected = _numpy_center_crop(image.numpy().astype(np.float32) / 255.0, 24, 24)
  assert expected.shape == (26, 26, 3)
  np.testing.assert_allclose(ev[0], ev[1])  # Evaluation is deterministic.
  assert ev.shape == (2, 24, 24, 3) and abs(ev[0].mean() - expected.mean()) < 0.01
  # Where the crop sits: on ramps (red = 6 x row, green = 8 x column) the output's first and last
  # rows and columns are the centre crop's (an off-centre crop of the same size fails here).
  rows, cols = np.meshgrid(np.arange(40), np.arange(30), indexing='ij')
  ramps = np.stack([6 * rows, 8 * cols, np.full_like(rows, 128)], -1).astype(np.uint8)
  out = augment.preprocess_image(tf.constant(ramps), 24, 24, is_training=False).numpy()
  crop = _numpy_center_crop(ramps.astype(np.float32) / 255.0, 24, 24)  # rows 7..32, cols 2..27
  for got, want in ((out[0, :, 0], crop[0, :, 0]), (out[-1, :, 0], crop[-1, :, 0]),
                    (out[:, 0, 1], crop[:, 0, 1]), (out[:, -1, 1], crop[:, -1, 1])):
    assert abs(got.mean() - want.mean()) < 0.5 * 8 / 255, (got.mean(), want.mean())


@pytest.mark.parametrize('mode', MODES)
def test_flip_only_mirrors(mode):
  image = tf.constant(_rand_image(8, 8, seed=10))
  out = _samples(lambda: augment.preprocess_for_train(image, 8, 8, crop=False), 200, mode)
  same = np.all(out == image.numpy()[None], axis=(1, 2, 3))
  mirrored = np.all(out == image.numpy()[None, :, ::-1], axis=(1, 2, 3))
  assert np.all(same | mirrored)
  assert 0.3 < mirrored.mean() < 0.7


def test_eval_without_crop_resizes_other_sizes():
  image = tf.constant(_rand_image(16, 16, seed=11))
  np.testing.assert_array_equal(augment.preprocess_for_eval(image, 16, 16, crop=False), image)
  assert augment.preprocess_for_eval(image, 12, 12, crop=False).shape == (12, 12, 3)
