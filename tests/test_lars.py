"""LARS against a numpy transcription of the update rule, under one device and two replicas."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_simclr.config import OptimConfig
from tf_simclr.optim import lars as lars_lib
from tf_simclr.optim.lars import LARS

LR, MOMENTUM, WD, EETA = 0.5, 0.9, 0.1, 0.01


def np_lars(w, v, g, *, lr=LR, m=MOMENTUM, wd=WD, eeta=EETA, decay=True, adapt=True,
            classic=True, nesterov=False):
  """One LARS step in float64 numpy; returns (new_w, new_v)."""
  w, v, g = (np.asarray(a, np.float64) for a in (w, v, g))
  if decay:
    g = g + wd * w
  def trust(d):
    wn, dn = np.linalg.norm(w), np.linalg.norm(d)
    return eeta * wn / dn if (adapt and wn > 0 and dn > 0) else 1.0
  if classic:
    s = lr * trust(g)
    new_v = m * v + s * g
    update = m * new_v + s * g if nesterov else new_v
    return w - update, new_v
  new_v = m * v + g
  update = m * new_v + g if nesterov else new_v
  return w - lr * trust(update) * update, new_v


def _variables(rng):
  adapted = keras.Variable(rng.normal(size=(3, 4)).astype(np.float32), name='adapted')
  excluded = keras.Variable(rng.normal(size=(4,)).astype(np.float32), name='excluded')
  zero = keras.Variable(np.zeros((2, 2), np.float32), name='zero')
  return [adapted, excluded, zero]


@pytest.mark.parametrize('classic,nesterov', [(True, False), (True, True), (False, False),
                                              (False, True)])
def test_two_steps_match_numpy(classic, nesterov):
  rng = np.random.default_rng(0)
  variables = _variables(rng)
  opt = LARS(LR, momentum=MOMENTUM, weight_decay=WD, eeta=EETA, classic_momentum=classic,
             use_nesterov=nesterov, exclude_from_weight_decay=[variables[1]])
  ws = [v.numpy() for v in variables]
  vs = [np.zeros_like(w) for w in ws]
  decay = [True, False, True]
  for _ in range(2):
    grads = [rng.normal(size=w.shape).astype(np.float32) for w in ws]
    opt.apply_gradients(zip([tf.constant(g) for g in grads], variables))
    for i in range(3):
      ws[i], vs[i] = np_lars(ws[i], vs[i], grads[i], decay=decay[i], adapt=decay[i],
                             classic=classic, nesterov=nesterov)
    for i, var in enumerate(variables):
      np.testing.assert_allclose(var.numpy(), ws[i], rtol=1e-5, atol=1e-6)
  # The momentum slots hold the numpy velocities too.
  for i, var in enumerate(variables):
    slot = opt._momentums[opt._get_variable_index(var)]
    np.testing.assert_allclose(slot.numpy(), vs[i], rtol=1e-5, atol=1e-6)
  # Adaptation actually bit: without it the adapted variable would be elsewhere.
  assert not np.allclose(ws[0], np_lars(ws[0], vs[0], grads[0], adapt=False)[0])


def test_weight_decay_applied_exactly_once():
  rng = np.random.default_rng(1)
  decayed = keras.Variable(rng.normal(size=(5,)).astype(np.float32))
  not_decayed = keras.Variable(rng.normal(size=(5,)).astype(np.float32))
  # No layer adaptation on either, so the step is plain momentum SGD on g + wd * w.
  opt = LARS(LR, weight_decay=WD, exclude_from_weight_decay=[not_decayed],
             exclude_from_layer_adaptation=[decayed, not_decayed])
  assert opt.weight_decay is None  # the Keras base class must not decay on its own
  assert opt.uses_weight_decay(decayed) and not opt.uses_weight_decay(not_decayed)
  assert not opt.uses_layer_adaptation(decayed)
  w0, u0 = decayed.numpy(), not_decayed.numpy()
  g = rng.normal(size=(5,)).astype(np.float32)
  opt.apply_gradients([(tf.constant(g), decayed), (tf.constant(g), not_decayed)])
  once = w0 - LR * (g + WD * w0)
  twice = once - LR * WD * w0
  np.testing.assert_allclose(decayed.numpy(), once, rtol=1e-6)
  assert not np.allclose(decayed.numpy(), twice, rtol=1e-3)
  np.testing.assert_allclose(not_decayed.numpy(), u0 - LR * g, rtol=1e-6)


def test_adaptation_defaults_to_decay_exclusions_and_rejects_names():
  a, b = keras.Variable(np.ones(2, np.float32)), keras.Variable(np.ones(2, np.float32))
  opt = LARS(0.1, weight_decay=1e-6, exclude_from_weight_decay=[b])
  assert opt.uses_layer_adaptation(a) and not opt.uses_layer_adaptation(b)
  assert LARS(0.1, weight_decay=0.0).uses_weight_decay(a) is False
  with pytest.raises(TypeError, match='not name patterns'):
    LARS(0.1, exclude_from_weight_decay=['batch_normalization'])


def test_momentum_slots_checkpoint_round_trip(tmp_path):
  rng = np.random.default_rng(2)
  variables = _variables(rng)
  opt = LARS(LR, weight_decay=WD, exclude_from_weight_decay=[variables[1]])
  for _ in range(2):
    opt.apply_gradients([(tf.constant(rng.normal(size=v.shape), tf.float32), v)
                         for v in variables])
  saved = [s.numpy() for s in opt._momentums]
  assert all(np.any(s != 0) for s in saved[:2])
  path = tf.train.Checkpoint(optimizer=opt).save(str(tmp_path / 'ckpt'))

  restored = LARS(LR, weight_decay=WD, exclude_from_weight_decay=[variables[1]])
  restored.build(variables)
  tf.train.Checkpoint(optimizer=restored).restore(path).assert_consumed()
  for got, want in zip(restored._momentums, saved):
    np.testing.assert_array_equal(got.numpy(), want)
  assert int(restored.iterations.numpy()) == 2


def test_step_under_two_replicas_equals_single_device_summed_gradient(two_replica_strategy):
  strategy = two_replica_strategy
  rng = np.random.default_rng(3)
  w_init = rng.normal(size=(3, 2)).astype(np.float32)
  b_init = rng.normal(size=(2,)).astype(np.float32)
  x = rng.normal(size=(2, 4, 3)).astype(np.float32)  # a different local batch per replica

  with strategy.scope():
    w = keras.Variable(w_init, name='w')
    b = keras.Variable(b_init, name='b')
    opt = LARS(LR, weight_decay=WD, eeta=EETA, exclude_from_weight_decay=[b])
    opt.build([w, b])

  inputs = strategy.experimental_distribute_values_from_function(
      lambda ctx: tf.constant(x[ctx.replica_id_in_sync_group]))

  @tf.function
  def train_step(data):
    def replica_fn(local):
      with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(local @ w + b))
      grads = tape.gradient(loss, [w, b])
      opt.apply_gradients(zip(grads, [w, b]))
    strategy.run(replica_fn, args=(data,))

  for _ in range(2):
    train_step(inputs)

  # Single-device numpy: the gradient is the sum of the two replicas' gradients.
  ws, bs = w_init.astype(np.float64), b_init.astype(np.float64)
  vw, vb = np.zeros_like(ws), np.zeros_like(bs)
  for _ in range(2):
    gw = sum(2 * x[r].T @ (x[r] @ ws + bs) for r in range(2))
    gb = sum(2 * np.sum(x[r] @ ws + bs, axis=0) for r in range(2))
    ws, vw = np_lars(ws, vw, gw)
    bs, vb = np_lars(bs, vb, gb, decay=False, adapt=False)
  for var, want in ((w, ws), (b, bs)):
    components = var.value.values
    assert len(components) == 2
    np.testing.assert_array_equal(components[0].numpy(), components[1].numpy())
    np.testing.assert_allclose(components[0].numpy(), want, rtol=1e-5, atol=1e-6)


def test_get_config_round_trip_keeps_decay_out_of_the_base_class():
  opt = LARS(0.2, momentum=0.8, weight_decay=1e-4, eeta=0.002, classic_momentum=False,
             use_nesterov=True)
  config = opt.get_config()
  assert config['weight_decay'] == 1e-4 and config['eeta'] == 0.002
  clone = LARS.from_config(config)
  assert clone.lars_weight_decay == 1e-4 and clone.weight_decay is None
  assert (clone.momentum, clone.classic_momentum, clone.use_nesterov) == (0.8, False, True)


def test_build_optimizer_per_config():
  v = keras.Variable(np.ones(2, np.float32))
  opt = lars_lib.build_optimizer(OptimConfig(optimizer='lars', weight_decay=1e-5,
                                             momentum=0.8), 0.1, [v])
  assert isinstance(opt, LARS) and opt.lars_weight_decay == 1e-5 and opt.momentum == 0.8
  assert not opt.uses_weight_decay(v)
  sgd = lars_lib.build_optimizer(OptimConfig(optimizer='momentum', momentum=0.8), 0.1)
  assert isinstance(sgd, keras.optimizers.SGD) and sgd.nesterov and sgd.momentum == 0.8
  adam = lars_lib.build_optimizer(OptimConfig(optimizer='adam'), 0.1)
  assert isinstance(adam, keras.optimizers.Adam)
