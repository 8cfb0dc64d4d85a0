"""Warmup + cosine schedule against its closed form, and as an optimizer sees it."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_simclr.optim.schedule import WarmupCosineSchedule, scaled_learning_rate


def closed_form(step, peak, warmup, total):
  if step < warmup:
    return step / warmup * peak
  progress = min(step - warmup, total - warmup) / (total - warmup)
  return peak * 0.5 * (1 + math.cos(math.pi * progress))


def test_scaled_learning_rate():
  assert scaled_learning_rate(0.3, 4096, 'linear') == pytest.approx(4.8)  # paper: 0.3 x B/256
  assert scaled_learning_rate(0.075, 4096, 'sqrt') == pytest.approx(4.8)  # paper: 0.075 x sqrt(B)
  with pytest.raises(ValueError, match='learning_rate_scaling'):
    scaled_learning_rate(0.1, 256, 'cubic')


@pytest.mark.parametrize('scaling,batch,peak', [('linear', 512, 0.6), ('sqrt', 64, 2.4)])
def test_schedule_matches_closed_form(scaling, batch, peak):
  warmup, total = 10, 50
  schedule = WarmupCosineSchedule(0.3, batch, scaling, warmup, total)
  for step in (0, 1, 5, 9, 10, 11, 30, 48, 49, 50, 60):
    got = float(schedule(tf.constant(step, tf.int64)))
    assert got == pytest.approx(closed_form(step, peak, warmup, total), rel=1e-5, abs=1e-7), step
  assert float(schedule(0)) == 0.0
  assert float(schedule(warmup)) == pytest.approx(peak)
  last = float(schedule(total - 1))
  assert 0 < last < 1e-2 * peak
  # The decay phase agrees with Keras' own cosine decay, which the original used.
  keras_cosine = keras.optimizers.schedules.CosineDecay(peak, total - warmup)
  for step in (10, 23, 49):
    assert float(schedule(step)) == pytest.approx(float(keras_cosine(step - warmup)), rel=1e-5)


def test_no_warmup_starts_at_peak():
  schedule = WarmupCosineSchedule(0.1, 256, 'linear', 0, 4)
  got = [float(schedule(s)) for s in range(5)]
  want = [0.1 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(5)]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


def test_optimizer_uses_iteration_before_update():
  schedule = WarmupCosineSchedule(1.0, 256, 'linear', 2, 6)
  var = keras.Variable(np.zeros(1, np.float32))
  opt = keras.optimizers.SGD(schedule)
  for _ in range(6):
    opt.apply_gradients([(tf.ones(1), var)])
  expected = -sum(closed_form(s, 1.0, 2, 6) for s in range(6))  # steps 0..5 with gradient 1
  np.testing.assert_allclose(var.numpy(), [expected], rtol=1e-6)


def test_get_config_round_trip_and_validation():
  schedule = WarmupCosineSchedule(0.2, 128, 'sqrt', 3, 9)
  clone = WarmupCosineSchedule.from_config(schedule.get_config())
  for step in range(10):
    assert float(clone(step)) == float(schedule(step))
  with pytest.raises(ValueError, match='warmup_steps'):
    WarmupCosineSchedule(0.2, 128, 'linear', -1, 9)


def test_run_shorter_than_its_warmup_never_leaves_warmup():
  """--train_steps=44 with 10 warmup epochs of 112 steps stays in warmup, as the original.

  Hand computation: warmup = floor(10 * 1440 / 128) = 112 steps; peak = 1.0 * 128 / 256 = 0.5;
  the optimizer's update k (0-based) uses lr = k / 112 * 0.5, so the rate at step 44 is 0.19643
  (a warmup clamped to 44 steps would give 0.5 at step 44 and 0.489 at step 43).
  """
  from tf_simclr import config as cfg
  train = cfg.TrainConfig(model_dir='/tmp/x', train_batch_size=128, train_steps=44)
  optim = cfg.OptimConfig(learning_rate=1.0, warmup_epochs=10)
  steps = cfg.resolve_steps(train, optim, num_train_examples=1440, num_eval_examples=100)
  assert (steps.train_steps, steps.warmup_steps) == (44, 112)
  schedule = WarmupCosineSchedule(1.0, 128, 'linear', steps.warmup_steps, steps.train_steps)
  assert float(schedule(44)) == pytest.approx(44 / 112 * 0.5, rel=1e-6)  # 0.19643
  assert float(schedule(43)) == pytest.approx(43 / 112 * 0.5, rel=1e-6)
  rates = [float(schedule(s)) for s in range(45)]
  assert all(b > a for a, b in zip(rates, rates[1:]))  # still rising at the last step
