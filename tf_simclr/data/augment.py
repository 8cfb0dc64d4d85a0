"""SimCLR image augmentations as pure TensorFlow functions.

Behaviour follows google-research/simclr `tf2/data_util.py`: random resized crop, horizontal flip,
colour jitter (brightness, contrast, saturation, hue in random order) with probability 0.8, colour
drop with probability 0.2, and a Gaussian blur applied to whole batches. Every function takes and
returns tensors, has no logging or metrics, and works eagerly and inside `tf.data` / `tf.function`.
Images are float32 in [0, 1] unless stated otherwise.
"""

from __future__ import annotations

import functools

import tensorflow as tf

CROP_PROPORTION = 0.875  # Centre crop kept for evaluation, standard for ImageNet.
COLOR_JITTER_IMPLS = ('simclrv1', 'simclrv2')


def random_apply(func, p, x):
  """Returns func(x) with probability p, else x."""
  draw = tf.random.uniform([], minval=0.0, maxval=1.0, dtype=tf.float32)
  return tf.cond(draw < tf.cast(p, tf.float32), lambda: func(x), lambda: x)


def random_brightness(image, max_delta, impl='simclrv2'):
  """Brightness change: multiplicative (SimCLR v2) or additive (v1, tf.image.random_brightness).

  simclrv2 scales the image by a factor drawn from U[max(1 - max_delta, 0), 1 + max_delta];
  simclrv1 adds a delta drawn from U[-max_delta, max_delta].
  """
  if impl == 'simclrv2':
    factor = tf.random.uniform([], tf.maximum(1.0 - max_delta, 0.0), 1.0 + max_delta)
    return image * factor
  if impl == 'simclrv1':
    return tf.image.random_brightness(image, max_delta=max_delta)
  raise ValueError(f'color_jitter_impl={impl!r} is not one of {list(COLOR_JITTER_IMPLS)}.')


def to_grayscale(image, keep_channels=True):
  """Converts RGB to luma; with keep_channels the result is tiled back to 3 equal channels."""
  image = tf.image.rgb_to_grayscale(image)
  if keep_channels:
    image = tf.tile(image, [1, 1, 3])
  return image


def _jitter_ops(brightness, contrast, saturation, hue, impl):
  """The four colour transforms in canonical order; a zero strength gives the identity."""
  def brightness_fn(x):
    return random_brightness(x, max_delta=brightness, impl=impl) if brightness else x

  def contrast_fn(x):
    return tf.image.random_contrast(x, lower=1 - contrast, upper=1 + contrast) if contrast else x

  def saturation_fn(x):
    if not saturation:
      return x
    return tf.image.random_saturation(x, lower=1 - saturation, upper=1 + saturation)

  def hue_fn(x):
    return tf.image.random_hue(x, max_delta=hue) if hue else x

  return (brightness_fn, contrast_fn, saturation_fn, hue_fn)


def color_jitter(image, strength, random_order=True, impl='simclrv2'):
  """Distorts colour: brightness, contrast, saturation 0.8*strength and hue 0.2*strength.

  With random_order the four transforms run in a freshly shuffled order; the image is clipped to
  [0, 1] after each one (as the original).
  """
  if impl not in COLOR_JITTER_IMPLS:
    raise ValueError(f'color_jitter_impl={impl!r} is not one of {list(COLOR_JITTER_IMPLS)}.')
  ops = _jitter_ops(0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength, impl)
  with tf.name_scope('distort_color'):
    if random_order:
      perm = tf.random.shuffle(tf.range(4))
      for i in range(4):
        image = tf.switch_case(perm[i], [functools.partial(op, image) for op in ops])
        image = tf.clip_by_value(image, 0.0, 1.0)
    else:
      for op in ops:
        image = tf.clip_by_value(op(image), 0.0, 1.0)
  return image


def random_color_jitter(image, p=1.0, strength=1.0, impl='simclrv2'):
  """With probability p: colour jitter with probability 0.8, then colour drop with 0.2."""
  def transform(x):
    jitter = functools.partial(color_jitter, strength=strength, impl=impl)
    x = random_apply(jitter, p=0.8, x=x)
    return random_apply(to_grayscale, p=0.2, x=x)
  return random_apply(transform, p=p, x=image)


def sample_distorted_box(image_shape, aspect_ratio_range, area_range=(0.08, 1.0),
                         min_object_covered=0.1, max_attempts=100):
  """Samples a crop box of the whole image; returns (offset [y, x, 0], size [h, w, -1]).

  The box covers a fraction of the image area in area_range and has width/height in
  aspect_ratio_range; after max_attempts failures it is the whole image.
  """
  whole_image = tf.constant([0.0, 0.0, 1.0, 1.0], dtype=tf.float32, shape=[1, 1, 4])
  begin, size, _ = tf.image.sample_distorted_bounding_box(
      image_shape, bounding_boxes=whole_image, min_object_covered=min_object_covered,
      aspect_ratio_range=aspect_ratio_range, area_range=area_range, max_attempts=max_attempts,
      use_image_if_no_bounding_boxes=True)
  return begin, size


def distorted_bounding_box_crop(image, aspect_ratio_range, area_range=(0.08, 1.0),
                                min_object_covered=0.1, max_attempts=100):
  """Crops image (H, W, C) to a box drawn by `sample_distorted_box`."""
  begin, size = sample_distorted_box(tf.shape(image), aspect_ratio_range, area_range,
                                     min_object_covered, max_attempts)
  return tf.image.crop_to_bounding_box(image, begin[0], begin[1], size[0], size[1])


def sample_crop_box(image_shape, height, width):
  """SimCLR's crop box for a (height, width) output: area 8%-100% (and covering >= 10% of the
  image), aspect 3/4-4/3 times width/height, 100 attempts, else the whole image."""
  aspect_ratio = width / height
  return sample_distorted_box(
      image_shape, aspect_ratio_range=(3.0 / 4 * aspect_ratio, 4.0 / 3 * aspect_ratio),
      area_range=(0.08, 1.0), min_object_covered=0.1, max_attempts=100)


def crop_and_resize(image, height, width):
  """Crops image (H, W, C) to a `sample_crop_box` box and resizes it bicubically."""
  begin, size = sample_crop_box(tf.shape(image), height, width)
  image = tf.image.crop_to_bounding_box(image, begin[0], begin[1], size[0], size[1])
  return tf.image.resize([image], [height, width], method=tf.image.ResizeMethod.BICUBIC)[0]


def random_crop_with_resize(image, height, width, p=1.0):
  """Applies `crop_and_resize` with probability p."""
  return random_apply(lambda x: crop_and_resize(x, height, width), p=p, x=image)


def _center_crop_shape(image_height, image_width, aspect_ratio, crop_proportion):
  """Aspect-preserving crop: crop_proportion on the less-cropped side, <= on the other."""
  h = tf.cast(image_height, tf.float32)
  w = tf.cast(image_width, tf.float32)

  def requested_wider_than_image():
    return (tf.cast(tf.math.rint(crop_proportion / aspect_ratio * w), tf.int32),
            tf.cast(tf.math.rint(crop_proportion * w), tf.int32))

  def image_wider_than_requested():
    return (tf.cast(tf.math.rint(crop_proportion * h), tf.int32),
            tf.cast(tf.math.rint(crop_proportion * aspect_ratio * h), tf.int32))

  return tf.cond(aspect_ratio > w / h, requested_wider_than_image, image_wider_than_requested)


def center_crop(image, height, width, crop_proportion=CROP_PROPORTION):
  """Central crop keeping crop_proportion of the shorter side, resized bicubically."""
  shape = tf.shape(image)
  crop_height, crop_width = _center_crop_shape(shape[0], shape[1], width / height,
                                               crop_proportion)
  offset_height = (shape[0] - crop_height + 1) // 2
  offset_width = (shape[1] - crop_width + 1) // 2
  image = tf.image.crop_to_bounding_box(image, offset_height, offset_width, crop_height,
                                        crop_width)
  return tf.image.resize([image], [height, width], method=tf.image.ResizeMethod.BICUBIC)[0]


def gaussian_blur(image, kernel_size, sigma, padding='SAME'):
  """Separable Gaussian blur of (H, W, C) or (N, H, W, C) images (depthwise convolutions).

  The kernel radius is int(kernel_size / 2), so an even kernel_size acts as kernel_size + 1 and
  kernel_size < 2 is the identity; the 'SAME' padding is zeros, as in the original.
  """
  radius = tf.cast(kernel_size / 2, dtype=tf.int32)
  size = 2 * radius + 1
  x = tf.cast(tf.range(-radius, radius + 1), tf.float32)
  sigma = tf.cast(sigma, tf.float32)
  kernel = tf.exp(-tf.square(x) / (2.0 * tf.square(sigma)))
  kernel /= tf.reduce_sum(kernel)
  channels = tf.shape(image)[-1]
  kernel_h = tf.tile(tf.reshape(kernel, [1, size, 1, 1]), [1, 1, channels, 1])
  kernel_v = tf.tile(tf.reshape(kernel, [size, 1, 1, 1]), [1, 1, channels, 1])
  single = image.shape.rank == 3
  if single:
    image = image[tf.newaxis]
  blurred = tf.nn.depthwise_conv2d(image, kernel_h, strides=[1, 1, 1, 1], padding=padding)
  blurred = tf.nn.depthwise_conv2d(blurred, kernel_v, strides=[1, 1, 1, 1], padding=padding)
  return blurred[0] if single else blurred


def random_blur(image, height, width, p=1.0):
  """With probability p, blurs with sigma ~ U(0.1, 2.0) and kernel size height // 10."""
  del width  # The original sizes the kernel from the height only.

  def transform(x):
    sigma = tf.random.uniform([], 0.1, 2.0, dtype=tf.float32)
    return gaussian_blur(x, kernel_size=height // 10, sigma=sigma, padding='SAME')
  return random_apply(transform, p=p, x=image)


def batch_random_blur(images, height, width, blur_probability=0.5):
  """Blurs each image of one batch (N, H, W, C) with probability blur_probability.

  As in the original, ONE sigma ~ U(0.1, 2.0) is drawn per call and shared by the whole batch;
  a per-image Bernoulli selector picks blurred or original, and the result is clipped to [0, 1].
  Unlike the original (a list of batches), this takes one tensor: call it once per view so each
  view gets its own sigma, as the original's loop over the view list did.
  """
  with tf.name_scope('batch_random_blur'):  # Named so a profile can tell its ops' share.
    blurred = random_blur(images, height, width, p=1.0)
    selector = tf.cast(
        tf.random.uniform([tf.shape(images)[0], 1, 1, 1], 0.0, 1.0) < blur_probability,
        images.dtype)
    images = blurred * selector + images * (1.0 - selector)
    return tf.clip_by_value(images, 0.0, 1.0)


def blur_train_views(images, num_views: int, image_size: int, use_blur: bool):
  """The train step's start: a batch of views concatenated on channels (the train pipeline's
  output) -> the list of `num_views` view batches, each batch-blurred when `use_blur`."""
  views = tf.split(images, num_views, axis=-1)
  if use_blur:
    views = [batch_random_blur(v, image_size, image_size) for v in views]
  return views


def _resize_if_needed(image, height, width):
  """Bicubic resize to (height, width) unless the image already has that size."""
  shape = tf.shape(image)
  same = tf.logical_and(tf.equal(shape[0], height), tf.equal(shape[1], width))
  return tf.cond(
      same, lambda: tf.identity(image),
      lambda: tf.image.resize([image], [height, width], method=tf.image.ResizeMethod.BICUBIC)[0])


def preprocess_for_train(image, height, width, color_jitter_strength=0.0, crop=True, flip=True,
                         impl='simclrv2'):
  """One training view of a float RGB image: crop-resize, flip, colour distortion, clip.

  Colour distortion is skipped when color_jitter_strength <= 0. Without crop, an image of a
  different size is resized (the original would fail in its final reshape).
  """
  if crop:
    image = random_crop_with_resize(image, height, width)
  else:
    image = _resize_if_needed(image, height, width)
  if flip:
    image = tf.image.random_flip_left_right(image)
  if color_jitter_strength > 0:
    image = random_color_jitter(image, strength=color_jitter_strength, impl=impl)
  image = tf.reshape(image, [height, width, 3])
  return tf.clip_by_value(image, 0.0, 1.0)


def preprocess_for_eval(image, height, width, crop=True):
  """Evaluation view: centre crop (0.875) and resize, or just resize to size without crop."""
  if crop:
    image = center_crop(image, height, width, crop_proportion=CROP_PROPORTION)
  else:
    image = _resize_if_needed(image, height, width)
  image = tf.reshape(image, [height, width, 3])
  return tf.clip_by_value(image, 0.0, 1.0)


def preprocess_image(image, height, width, is_training=False, color_jitter_strength=0.0,
                     test_crop=True, impl='simclrv2'):
  """Converts an RGB image (uint8 or float) to float32 in [0, 1] and preprocesses it."""
  image = tf.image.convert_image_dtype(image, dtype=tf.float32)
  if is_training:
    return preprocess_for_train(image, height, width, color_jitter_strength, impl=impl)
  return preprocess_for_eval(image, height, width, test_crop)
