"""Mixed precision (--precision) and dynamic loss scaling, on tiny models.

Reference numbers come from the same weights run in float32 (or on one device), never from the
code under test run the same way.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_simclr import weights
from tf_simclr import config as cfg
from tf_simclr import export
from tf_simclr import losses
from tf_simclr import precision as precision_lib
from tf_simclr.models import simclr
from tf_simclr.optim import decay, lars
from tf_simclr.train import loop, tasks

from helpers import one_lars_step


@pytest.fixture(autouse=True)
def _seeded():
  """Fixed initial weights whatever ran before: these tests compare two numerical paths from one
  initialisation, and their tolerances were chosen for it."""
  keras.utils.set_random_seed(0)


SIZE = 8
TINY = dict(resnet_depth=18, width_multiplier=0.125, cifar_stem=True, proj_out_dim=16,
            num_proj_layers=2, supervised_head=True, supervised_head_stop_gradient=True)


def _config(tmp_path, precision='float32', batch=8):
  return cfg.Config(
      model=cfg.ModelConfig(**TINY, precision=precision),
      data=cfg.DataConfig(dataset='shapes10', image_size=SIZE, use_blur=False),
      optim=cfg.OptimConfig(learning_rate=0.5, weight_decay=1e-4, warmup_epochs=0),
      train=cfg.TrainConfig(model_dir=str(tmp_path), train_batch_size=batch, train_steps=1,
                            temperature=0.5))


def _batch(n, seed=0):
  rng = np.random.RandomState(seed)
  images = rng.uniform(size=(n, SIZE, SIZE, 6)).astype(np.float32)
  labels = np.eye(10, dtype=np.float32)[rng.randint(10, size=n)]
  return images, labels


def _model(config, strategy=None, initial=None):
  """A built model under `strategy`, set to `initial` ({path: value}) when given."""
  strategy = strategy or tf.distribute.get_strategy()
  with strategy.scope():
    model = simclr.build_model(config.model, 10).build_for_size(SIZE)
  variables = weights.match.object_variable_paths(model, 'model')
  if initial is not None:
    for path, v in variables.items():
      v.assign(initial[path])
  return model, {p: v.numpy() for p, v in variables.items()}


def _loss_and_grads(config, model):
  task = tasks.PretrainTask(config, model, tf.distribute.get_strategy())
  images, labels = _batch(8)
  with tf.GradientTape() as tape:
    loss, _ = task.train_loss((tf.constant(images), tf.constant(labels)))
  variables = task.trainable_variables
  return loss, dict(zip([v.path for v in variables], tape.gradient(loss, variables)))


def _numpy_nt_xent(hidden, temperature):
  """NT-Xent in float64: rows i and i + N are positives, every other row a negative; the sum of
  the two views' mean cross-entropies, as the original."""
  h = hidden.astype(np.float64)
  h /= np.linalg.norm(h, axis=1, keepdims=True)
  n = len(h) // 2
  logits = h @ h.T / temperature
  np.fill_diagonal(logits, -np.inf)
  positive = logits[np.arange(2 * n), (np.arange(2 * n) + n) % (2 * n)]
  top = logits.max(axis=1)
  lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
  return float(np.sum(lse - positive) / n)


def test_bfloat16_step_matches_float32_and_keeps_float32_where_it_matters(tmp_path):
  f32, initial = _model(_config(tmp_path))
  bf16, _ = _model(_config(tmp_path, 'mixed_bfloat16'), initial=initial)
  assert keras.config.dtype_policy().name == 'float32'  # no global side effect
  assert {v.dtype for v in bf16.variables} == {'float32'}
  out = bf16(tf.constant(_batch(8)[0][..., :3]), training=True)
  assert out[simclr.BLOCK_GROUP4].dtype == tf.bfloat16  # it really computes in bfloat16
  for name in (simclr.FINAL_AVG_POOL, simclr.PROJ_HEAD_OUTPUT, simclr.LOGITS_SUP):
    assert out[name].dtype == tf.float32, name
  _, logits_ab, _ = losses.nt_xent(out[simclr.PROJ_HEAD_OUTPUT], 0.5)
  assert logits_ab.dtype == tf.float32

  loss32, grads32 = _loss_and_grads(_config(tmp_path), f32)
  loss16, grads16 = _loss_and_grads(_config(tmp_path, 'mixed_bfloat16'), bf16)
  assert loss16.dtype == tf.float32
  assert float(loss16) == pytest.approx(float(loss32), rel=0.02)
  # NT-Xent itself runs in float32: on the bfloat16 model's projections it matches a float64
  # numpy NT-Xent to float32 precision (in bfloat16 it would be off by ~1e-2 relative).
  views = _batch(8)[0]
  both = tf.constant(np.concatenate([views[..., :3], views[..., 3:]], 0))
  hidden = bf16(both, training=True)[simclr.PROJ_HEAD_OUTPUT]
  got, _, _ = losses.nt_xent(hidden, 0.5)
  assert got.dtype == tf.float32
  assert float(got) == pytest.approx(_numpy_nt_xent(hidden.numpy(), 0.5), rel=2e-5)
  assert grads16.keys() == grads32.keys()
  for path, g in grads16.items():
    assert g is not None and g.dtype == tf.float32, path
    assert np.all(np.isfinite(g.numpy())), path
  # The encoder's gradient points the same way as in float32.
  flat = lambda grads: np.concatenate([grads[p].numpy().ravel() for p in grads if 'resnet' in p])
  a, b = flat(grads32), flat(grads16)
  assert np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) > 0.9


def _one_step(config, strategy, initial, images, labels, tmp_path):
  model, _ = _model(config, strategy, initial)
  return one_lars_step(config, model, strategy, images, labels,
                       tmp_path / type(strategy).__name__)


@pytest.mark.slow
def test_two_replica_bfloat16_step_equals_one_device(tmp_path, two_replica_strategy):
  config = _config(tmp_path, 'mixed_bfloat16')
  _, initial = _model(config)
  images, labels = _batch(8, seed=1)
  single, m1 = _one_step(config, tf.distribute.get_strategy(), initial, images, labels, tmp_path)
  double, m2 = _one_step(config, two_replica_strategy, initial, images, labels, tmp_path)
  for name in ('contrast_loss', 'supervised_loss'):
    assert m2[name] == pytest.approx(m1[name], rel=1e-2), name
  # Each variable's update, relative to its size. On one device, bfloat16 and float32 updates
  # of a tiny model like this one differ by a median 0.24% and up to 35% (stem conv): the
  # replicas must agree within that bfloat16 noise. Not dividing the loss by the replicas
  # (2x updates for un-adapted variables) or local negatives would give errors near 100%.
  rel = {}
  for path, start in initial.items():
    d1, d2 = single[path] - start, double[path] - start
    if np.linalg.norm(d1) > 0:
      rel[path] = np.linalg.norm(d2 - d1) / np.linalg.norm(d1)
  assert len(rel) > 50
  assert np.median(list(rel.values())) < 0.01
  assert max(rel.values()) < 0.2, max(rel.items(), key=lambda kv: kv[1])


class _Amplified(tasks.PretrainTask):
  """Pretraining whose loss is multiplied so that float16 gradients overflow (or turn NaN)."""
  factor = 1e3

  def train_loss(self, batch):
    loss, logs = super().train_loss(batch)
    return loss * self.factor, logs


def _float16_trainer(tmp_path, task_cls, train_steps):
  config = _config(tmp_path, 'mixed_float16')
  model, initial = _model(config)
  optimizer = precision_lib.wrap_optimizer(keras_sgd(), 'mixed_float16')
  optimizer.build(model.trainable_variables)
  task = task_cls(config, model, tf.distribute.get_strategy())
  steps = cfg.Steps(train_steps=train_steps, epoch_steps=1, warmup_steps=0,
                    checkpoint_steps=100, steps_per_loop=1, eval_steps=1)
  state = weights.state.TrainState(model, optimizer, str(tmp_path), 1)
  trainer = loop.Trainer(task, optimizer, state, tf.distribute.get_strategy(), steps, 8,
                         str(tmp_path / 'summaries'))
  images, labels = _batch(8)
  dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
  return trainer, optimizer, model, initial, iter(dataset)


def keras_sgd():
  return keras.optimizers.SGD(0.01)


@pytest.mark.slow
def test_float16_overflow_skips_steps_and_lowers_the_loss_scale(tmp_path):
  trainer, optimizer, model, initial, data = _float16_trainer(tmp_path, _Amplified, 1)
  # The first step alone: gradients x 1e3 x 2**15 overflow float16 and must be skipped.
  trainer.steps = cfg.Steps(train_steps=1, epoch_steps=1, warmup_steps=0, checkpoint_steps=100,
                            steps_per_loop=1, eval_steps=1)
  trainer._build_state()  # device-side metric sums (with skipped_steps) and image buffer
  train_fn = trainer._build_train_fn()
  train_fn(data, tf.constant(1))
  assert float(optimizer.dynamic_scale.numpy()) == 2.0 ** 14
  assert int(optimizer.iterations.numpy()) == 0  # the step was not applied ...
  for path, v in weights.match.object_variable_paths(model, 'model').items():
    if 'moving' not in path:  # (BN statistics move in the forward pass, as in Keras)
      np.testing.assert_array_equal(v.numpy(), initial[path], err_msg=path)
  # ... and the loop goes on halving the scale until a step fits, counting every skip, with
  # metrics averaged over the applied steps only (finite), and no divergence error.
  trainer._accumulator = None
  result = trainer.train(data)
  assert result.final_step == 1
  skips = int(round(np.log2(2.0 ** 14 / float(optimizer.dynamic_scale.numpy()))))
  assert skips >= 1 and trainer.skipped_steps == skips
  assert result.metrics['skipped_steps'] == 0 and np.isfinite(result.metrics['contrast_loss'])
  assert result.metrics['loss_scale'] == float(optimizer.dynamic_scale.numpy())


class _NaNLoss(tasks.PretrainTask):
  def train_loss(self, batch):
    loss, logs = super().train_loss(batch)
    return loss * np.float32(np.nan), logs


@pytest.mark.slow
def test_float16_persistent_non_finite_loss_stops(tmp_path):
  trainer, optimizer, _, _, data = _float16_trainer(tmp_path, _NaNLoss, 2)
  trainer.max_consecutive_skips = 3
  with pytest.raises(loop.TrainingDivergedError, match='3 consecutive steps'):
    trainer.train(data)
  assert int(optimizer.iterations.numpy()) == 0
  assert float(optimizer.dynamic_scale.numpy()) == 2.0 ** 12


def test_checkpoints_and_exports_do_not_depend_on_precision(tmp_path):
  """float32 -> mixed_float16 (loss-scale optimizer) -> mixed_bfloat16 resumes, then a float32
  export of the bfloat16 model."""
  values = None
  for i, precision in enumerate(('float32', 'mixed_float16', 'mixed_bfloat16')):
    config = _config(tmp_path, precision)
    model, _ = _model(config)
    optimizer = precision_lib.wrap_optimizer(
        lars.LARS(0.1, exclude_from_weight_decay=decay.lars_exclusions(model)), precision)
    optimizer.build(model.trainable_variables)
    state = weights.state.TrainState(model, optimizer, str(tmp_path / 'run'), 3)
    inner = precision_lib.inner_optimizer(optimizer)
    if i == 0:
      assert state.restore_or_initialize(None) == 'scratch'
      for v in list(model.variables) + list(inner.variables):
        floating = 'float' in str(v.dtype)
        v.assign(tf.random.uniform(v.shape, seed=1) + 1 if floating else v + 7)
    else:
      assert state.restore_or_initialize(None) == 'resumed'
      got = {**weights.match.object_variable_paths(model, 'model'),
             **weights.match.object_variable_paths(inner, 'optimizer')}
      assert got.keys() == values.keys()
      for path, v in got.items():
        np.testing.assert_array_equal(v.numpy(), values[path], err_msg=path)
    inner.iterations.assign_add(1)
    state.save()
    values = {p: v.numpy() for p, v in {**weights.match.object_variable_paths(model, 'model'),
                                         **weights.match.object_variable_paths(inner,
                                                                             'optimizer')}.items()}

  # The bfloat16 model's export takes and returns float32; its values are the model's.
  path = export.save(model, str(tmp_path / 'export'))
  module = export.load(path)
  serving = module.signatures[export.SERVING_SIGNATURE]
  assert serving.structured_input_signature[1]['images'].dtype == tf.float32
  assert {t.dtype for t in serving.structured_outputs.values()} == {tf.float32}
  images = tf.constant(_batch(4, seed=3)[0][..., :3])
  got = module(images, trainable=False)
  want = model(images, training=False)
  assert {v.dtype for v in got.values()} == {tf.float32}
  for name in (simclr.FINAL_AVG_POOL, simclr.LOGITS_SUP):
    np.testing.assert_allclose(got[name].numpy(), want[name].numpy(), rtol=1e-5, atol=1e-5)
  # The same weights in float32 agree to bfloat16 precision.
  f32, _ = _model(_config(tmp_path), initial={p: v for p, v in values.items()
                                              if p.startswith('model/')})
  ref = f32(images, training=False)[simclr.FINAL_AVG_POOL].numpy()
  np.testing.assert_allclose(got[simclr.FINAL_AVG_POOL].numpy(), ref,
                             rtol=0.05, atol=0.05 * np.abs(ref).max())


def test_original_weights_import_into_a_bfloat16_model(original_fixture_dir):
  """The original's SavedModel (float32) loads into a mixed_bfloat16 model, whose float32
  endpoints reproduce the original's outputs to bfloat16 precision."""
  import json
  flags = json.loads((original_fixture_dir / 'flags.json').read_text())
  expected = np.load(original_fixture_dir / 'expected_outputs.npz')
  config = cfg.ModelConfig(
      resnet_depth=flags['resnet_depth'], width_multiplier=flags['width_multiplier'],
      cifar_stem=flags['image_size'] <= 32, proj_head_mode=flags['proj_head_mode'],
      num_proj_layers=flags['num_proj_layers'], proj_out_dim=flags['proj_out_dim'],
      supervised_head=True, supervised_head_stop_gradient=True, precision='mixed_bfloat16')
  model = simclr.build_model(config, expected['logits_sup'].shape[-1])
  model.build_for_size(flags['image_size'])
  report = weights.match.load(model, str(original_fixture_dir / 'saved_model'))
  assert report.restored == len(model.variables) and not report.fresh
  outputs = model(tf.constant(expected['images']), training=False)
  for name in (simclr.FINAL_AVG_POOL, simclr.PROJ_HEAD_OUTPUT, simclr.LOGITS_SUP):
    got, want = outputs[name].numpy(), expected[name]
    assert got.dtype == np.float32
    # bfloat16 keeps 8 bits of mantissa: a few percent of the endpoint's scale after 18 layers.
    assert np.max(np.abs(got - want)) <= 0.05 * np.max(np.abs(want)), name


def test_teacher_precision_is_independent_of_the_student(tmp_path):
  """A bfloat16 teacher for a float32 student, from a float32 checkpoint."""
  from tf_simclr import teacher as teacher_lib
  student = cfg.ModelConfig(**TINY)
  teacher_config = teacher_lib.teacher_model_config(student, None,
                                                    {'precision': 'mixed_bfloat16'})
  assert teacher_config.precision == 'mixed_bfloat16' and student.precision == 'float32'
  f32, initial = _model(_config(tmp_path))
  ckpt = tf.train.Checkpoint(model=f32).save(str(tmp_path / 'ckpt'))
  strategy = tf.distribute.get_strategy()
  images = tf.constant(_batch(4, seed=5)[0][..., :3])
  want = f32(images, training=False)[simclr.LOGITS_SUP].numpy()
  teacher = teacher_lib.load_teacher(teacher_config, ckpt, 10, SIZE, strategy)
  logits = teacher(images)
  assert logits.dtype == tf.float32
  assert {v.dtype for v in teacher.model.variables} == {'float32'}
  assert teacher.model.encoder.dtype_policy.name == 'mixed_bfloat16'
  np.testing.assert_allclose(logits.numpy(), want, atol=0.05 * np.abs(want).max())
  assert keras.config.dtype_policy().name == 'float32'


def test_flags_map_to_config():
  from absl import flags as absl_flags
  from tf_simclr import cli as run
  fv = absl_flags.FLAGS
  fv.unparse_flags()
  fv(['run.py', '--model_dir=/tmp/x', '--precision=mixed_bfloat16', '--jit_compile',
      '--train_mode=distill', '--teacher_checkpoint=/nonexistent', '--teacher_precision=float32'])
  config = run.config_from_flags(fv)
  assert config.model.precision == 'mixed_bfloat16' and config.train.jit_compile
  assert config.distill.teacher.precision == 'float32'
  fv.unparse_flags()
  fv(['run.py', '--model_dir=/tmp/x'])
  config = run.config_from_flags(fv)
  assert config.model.precision == 'float32' and not config.train.jit_compile
  fv.unparse_flags()
  with pytest.raises(cfg.ConfigError, match='--precision'):
    cfg.ModelConfig(precision='float16')


def test_cpu_advice_follows_the_cpu(monkeypatch, caplog):
  """bfloat16 on a CPU with bfloat16 units and oneDNN: no warning and no XLA advice; without
  the units (or with oneDNN off) a warning naming the fast choice; float32 never warns."""
  strategy = tf.distribute.get_strategy()
  cases = [  # (bfloat16 units, oneDNN on, precision, what the warning says or None)
      (True, True, 'mixed_bfloat16', None),
      (False, True, 'mixed_bfloat16', 'no bfloat16 units'),
      (None, True, 'mixed_bfloat16', 'cannot be read'),
      (True, False, 'mixed_bfloat16', 'unset TF_ENABLE_ONEDNN_OPTS'),
      (True, True, 'mixed_float16', 'float16 is for GPUs'),
      (False, False, 'float32', None),
  ]
  for units, onednn, precision, expected in cases:
    monkeypatch.setattr(precision_lib.cpu_kernels, 'has_bfloat16_units', lambda u=units: u)
    monkeypatch.setattr(precision_lib.cpu_kernels, 'onednn_enabled', lambda o=onednn: o)
    caplog.clear()
    with caplog.at_level('WARNING'):
      precision_lib.warn_if_slow_on_cpu(precision, strategy)
    case = (units, onednn, precision, caplog.text)
    if expected is None:
      assert caplog.text == '', case
    else:
      assert expected in caplog.text and f'--precision={precision}' in caplog.text, case
      assert 'jit_compile' not in caplog.text, case
    if expected == 'no bfloat16 units':
      assert 'float32 with oneDNN' in caplog.text, case


def _step_graph_counts(tmp_path, precision):
  """Op counts (benchmarks/op_breakdown.py) of the traced LARS train step of the tiny model, and
  the model."""
  import sys
  from conftest import PROJECT_ROOT
  sys.path.insert(0, str(PROJECT_ROOT / 'benchmarks'))
  import op_breakdown
  from tf_simclr.train import assemble
  config = _config(tmp_path / precision, precision, batch=4)
  steps = cfg.Steps(train_steps=1, epoch_steps=1, warmup_steps=0, checkpoint_steps=1,
                    steps_per_loop=1, eval_steps=1)
  built = assemble.assemble_trainer(config, tf.distribute.get_strategy(), steps, 10)
  built.trainer._build_state()
  graph = op_breakdown.replica_step_graph(built.trainer, [(4, SIZE, SIZE, 6), (4, 10)])
  types = [n.op for n in graph.node]
  bn_casts = [n.name for n in graph.node
              if n.op == 'Cast' and op_breakdown.category(n.name, 'Other') == 'batch_norm']
  return op_breakdown.graph_counts(graph), types, bn_casts, built.model


def test_bfloat16_step_casts_each_weight_once_and_nothing_around_batch_norm(tmp_path):
  """The mixed_bfloat16 step adds to the float32 step only one cast per 16-bit weight (the
  encoder's conv kernels: one read per step, both views being one batch) and its gradient's
  cast back, plus the images into bfloat16 and the pooled features out of it (and that one's
  gradient). Batch norm runs fused on bfloat16 activations (no casts, no float32 elementwise
  copies), the projection head in float32. Before: 4 casts around each batch norm (forward and
  gradient), 2 per projection-head weight, ...: 146 extra casts here, and more ops than float32."""
  f32, _, _, _ = _step_graph_counts(tmp_path, 'float32')
  bf16, types, bn_casts, model = _step_graph_counts(tmp_path, 'mixed_bfloat16')
  kernels = [layer for layer in model._flatten_layers(include_self=False)
             if isinstance(layer, keras.layers.Conv2D) and layer.compute_dtype == 'bfloat16']
  batch_norms = [layer for layer in model.encoder._flatten_layers(include_self=False)
                 if isinstance(layer, keras.layers.BatchNormalization)]
  assert len(kernels) == len(batch_norms) == 21  # ResNet-18: stem, 16, 4 shortcuts
  assert bf16['cast'] - f32['cast'] == 2 * len(kernels) + 3, (bf16, f32)
  assert not bn_casts, bn_casts
  assert types.count('FusedBatchNormV3') == len(batch_norms)
  assert types.count('FusedBatchNormGradV3') == len(batch_norms)
  assert bf16['total'] < f32['total'], (bf16, f32)


def test_fused_bfloat16_batch_norm_matches_numpy():
  """The fused path (bfloat16 in and out, float32 statistics): outputs, gradient and moving
  statistics against numpy on the bfloat16-rounded input, 4-D and 2-D, training and inference."""
  from tf_simclr.models.batch_norm import BatchNormalization
  rng = np.random.RandomState(0)
  for shape in ((6, 3, 3, 5), (10, 5)):
    with precision_lib.policy_scope('mixed_bfloat16'):
      bn = BatchNormalization(momentum=0.9, epsilon=1e-5, synchronized=True)
    x = tf.cast(tf.constant(rng.normal(1.0, 2.0, size=shape).astype(np.float32)), tf.bfloat16)
    bn.build(shape)
    bn.gamma.assign(rng.uniform(0.5, 1.5, size=shape[-1]))
    bn.beta.assign(rng.normal(size=shape[-1]))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=shape[-1]))
    assert bn.uses_fused_kernel(x)
    start_var = bn.moving_variance.numpy().astype(np.float64)
    weights_out = rng.normal(size=shape).astype(np.float32)
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = bn(x, training=True)
      loss = tf.reduce_sum(tf.cast(y, tf.float32) * weights_out)
    dx = tape.gradient(loss, x)
    assert y.dtype == tf.bfloat16 and dx.dtype == tf.bfloat16 and y.shape == shape
    xn = x.numpy().astype(np.float64).reshape(-1, shape[-1])
    mean, var = xn.mean(0), xn.var(0)
    g, b = bn.gamma.numpy(), bn.beta.numpy()
    xhat = (xn - mean) / np.sqrt(var + 1e-5)
    want = xhat * g + b
    # One bfloat16 rounding of the output: relative 2**-8.
    got = y.numpy().astype(np.float64).reshape(-1, shape[-1])
    np.testing.assert_allclose(got, want, rtol=2 ** -8, atol=2 ** -8 * np.abs(want).max())
    # Batch-norm gradient: g / sigma * (w - mean(w) - xhat * mean(w * xhat)).
    w = weights_out.reshape(-1, shape[-1])
    want_dx = g / np.sqrt(var + 1e-5) * (w - w.mean(0) - xhat * (w * xhat).mean(0))
    np.testing.assert_allclose(dx.numpy().astype(np.float64).reshape(-1, shape[-1]), want_dx,
                               atol=2 ** -7 * np.abs(want_dx).max())
    # Moving statistics from the float32 batch statistics (biased variance, as Keras).
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.1 * mean, rtol=1e-5, atol=1e-6)
    moving_var = bn.moving_variance.numpy()
    np.testing.assert_allclose(moving_var, 0.9 * start_var + 0.1 * var, rtol=1e-5)
    y_inf = bn(x, training=False).numpy().astype(np.float64).reshape(-1, shape[-1])
    want_inf = (xn - 0.1 * mean) / np.sqrt(moving_var + 1e-5) * g + b
    np.testing.assert_allclose(y_inf, want_inf, rtol=2 ** -8,
                               atol=2 ** -8 * np.abs(want_inf).max())


class _MarkedOverflow(tasks.PretrainTask):
  """Pretraining whose loss is multiplied by 1e30 on a replica whose batch holds a negative pixel
  (a marker: augmented images lie in [0, 1]), so that replica's float16 gradients overflow while
  its forward pass (and so the BN statistics) stays finite."""

  def train_loss(self, batch):
    loss, logs = super().train_loss(batch)
    marked = tf.reduce_any(batch[0] < 0)
    return loss * tf.where(marked, tf.constant(1e30), tf.constant(1.0)), logs


@pytest.mark.slow
def test_float16_two_replicas_skip_an_overflow_everywhere_and_stay_in_sync(tmp_path,
                                                                           two_replica_strategy):
  """mixed_float16 on 2 logical devices, 6 loops of one step from loss scale 2**8; in the third
  loop only replica 1's gradients overflow. That step is skipped on both replicas (weights and
  step counter unchanged), the loss scale halves once, training goes on, and every replica holds
  the same weights after every loop."""
  strategy = two_replica_strategy
  config = _config(tmp_path, 'mixed_float16')
  model, initial = _model(config, strategy)
  with strategy.scope():
    optimizer = precision_lib.wrap_optimizer(keras_sgd(), 'mixed_float16')
    optimizer.build(model.trainable_variables)
  # Keras starts at 2**15, where this tiny model's first steps overflow by themselves (a few
  # skips, then a lower scale); start where they fit, so the one overflow is the injected one.
  optimizer.dynamic_scale.assign(2.0 ** 8)
  task = _MarkedOverflow(config, model, strategy)
  variables = weights.match.object_variable_paths(model, 'model')
  trace = []

  def record(step):
    per_replica = {p: [x.numpy() for x in strategy.experimental_local_results(v._value)]
                   for p, v in variables.items()}  # each replica's copy (Keras 3: ._value)
    trace.append((step, float(optimizer.dynamic_scale.numpy()),
                  int(optimizer.iterations.numpy()), per_replica))

  steps = cfg.Steps(train_steps=5, epoch_steps=1, warmup_steps=0, checkpoint_steps=100,
                    steps_per_loop=1, eval_steps=1)
  state = weights.state.TrainState(model, optimizer, str(tmp_path), 1)
  trainer = loop.Trainer(task, optimizer, state, strategy, steps, 8,
                         str(tmp_path / 'summaries'), hooks=((1, record),))
  batches = [_batch(8, seed=s) for s in range(6)]
  images = np.stack([b[0] for b in batches])
  images[2, 5, 0, 0, 0] = -1.0  # in replica 1's half (rows 4-7) of the third global batch
  labels = np.stack([b[1] for b in batches])
  data = iter(strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensor_slices((images, labels))))
  record(0)
  result = trainer.train(data)
  print('loss-scale trace (loop, step, scale, applied steps):',
        [(i, st, s, it) for i, (st, s, it, _) in enumerate(trace)])
  assert [s for _, s, _, _ in trace] == [2.0 ** 8] * 3 + [2.0 ** 7] * 4
  assert [it for _, _, it, _ in trace] == [0, 1, 2, 2, 3, 4, 5]
  assert result.final_step == 5 and trainer.skipped_steps == 1
  before, after = trace[2][3], trace[3][3]
  changed = []
  for path, start in initial.items():
    for replica in range(2):
      if 'moving' not in path:  # BN statistics move in the forward pass, as in Keras
        np.testing.assert_array_equal(after[path][replica], before[path][replica], err_msg=path)
    for _, _, _, values in trace:  # the replicas agree after every loop
      np.testing.assert_array_equal(values[path][1], values[path][0], err_msg=path)
    changed.append(not np.array_equal(trace[-1][3][path][0], start))
  assert sum(changed) > 0.9 * len(changed)  # the applied steps did train
