"""Distillation end to end on tiny models: a frozen inference-mode teacher, a training student,
the label mask of Eq. 3, and the student's eval. (The loss itself is checked against numpy in
tests/test_losses.py.)"""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from tf_simclr import weights
from tf_simclr import config as cfg
from tf_simclr import teacher as teacher_lib
from tf_simclr.data import pipeline
from tf_simclr.models import simclr
from tf_simclr.evaluation import evaluate
from tf_simclr.run import modes
from tf_simclr.train import tasks

from helpers import TINY_MODEL, checkpoint_values, tiny_config as _tiny_config

STUDENT = dict(num_proj_layers=1, proj_out_dim=8)  # Another head than the teacher's.

# Training runs here need no SavedModel export (tests/test_export.py covers it): no_export.
# Teacher and student are ResNet-18s at 1/16 width (channels 4-8-16-32): nothing checked here
# depends on the width; full width only made every step and restore slower.
NARROW = 0.0625
TINY = dict(TINY_MODEL, width_multiplier=NARROW)


def tiny_config(model_dir, **overrides):
  return _tiny_config(model_dir, **{'model__width_multiplier': NARROW, **overrides})


@pytest.fixture(scope='module')
def teacher_checkpoint(tmp_path_factory):
  """A tiny fine-tuned (from scratch, 1 step) teacher whose flags.json holds its architecture."""
  model_dir = tmp_path_factory.mktemp('teacher')
  config = tiny_config(model_dir, train__train_mode='finetune', train__train_steps=1)
  modes.run(config, flags_dict=dict(TINY, train_mode='finetune'),
                 export_fn=modes.no_export)
  return tf.train.latest_checkpoint(str(model_dir))


def _distill_config(model_dir, teacher_ckpt, label_weight, **overrides):
  base = tiny_config(model_dir, train__train_mode='finetune', **{
      **{f'model__{k}': v for k, v in STUDENT.items()}, **overrides})
  teacher_model = teacher_lib.teacher_model_config(base.model, teacher_ckpt, {})
  return dataclasses.replace(
      base, train=dataclasses.replace(base.train, train_mode='distill'),
      distill=cfg.DistillConfig(teacher=teacher_model, teacher_checkpoint=teacher_ckpt,
                                temperature=1.0, label_weight=label_weight))


@pytest.mark.slow
def test_teacher_architecture_comes_from_its_flags_json(teacher_checkpoint):
  student = cfg.ModelConfig(**{**TINY, **STUDENT})
  teacher = teacher_lib.teacher_model_config(student, teacher_checkpoint, {})
  assert (teacher.num_proj_layers, teacher.proj_out_dim) == (2, 16)
  override = teacher_lib.teacher_model_config(student, teacher_checkpoint, {'proj_out_dim': 4})
  assert override.proj_out_dim == 4 and override.fine_tune_after_block == -1


@pytest.mark.slow
def test_distill_trains_student_only_and_evaluates_the_student(tmp_path, teacher_checkpoint):
  config = _distill_config(tmp_path, teacher_checkpoint, label_weight=0.5,
                           data__train_label_fraction=0.1, train__mode='train_then_eval',
                           train__train_steps=2, train__checkpoint_steps=1, train__eval_steps=1)
  ctx = modes.prepare(config)
  assert ctx.steps.train_steps == 2 and len(ctx.label_subset) == 1000
  teacher = modes.load_teacher(ctx)
  model, result = modes.train(ctx, teacher=teacher)
  assert result.final_step == 2
  # Teacher: inference mode, no gradients -> every variable, BN moving statistics included, is
  # exactly as in its checkpoint after the student's steps.
  saved = checkpoint_values(teacher_checkpoint)
  teacher_vars = weights.match.object_variable_paths(teacher.model)
  assert set(teacher_vars) == set(saved) and not teacher.model.trainable_variables
  assert any(p.endswith('moving_mean') for p in saved)
  for path, var in teacher_vars.items():
    np.testing.assert_array_equal(var.numpy(), saved[path], err_msg=path)
  # Student: its weights and BN statistics move between steps 1 and 2.
  one = checkpoint_values(str(tmp_path / 'ckpt-1'))
  two = checkpoint_values(str(tmp_path / 'ckpt-2'))
  for suffix in ('_kernel', 'moving_mean'):
    moved = [p for p in one if p.startswith('model/encoder') and p.endswith(suffix)
             and not np.array_equal(one[p], two[p])]
    assert moved, suffix
  assert 'labeled_fraction' in result.metrics and 0 <= result.metrics['labeled_fraction'] <= 1
  # Eval reports the student's top-1/top-5, checked with numpy on the same 50 test images.
  stored = evaluate.evaluate(ctx, model, result.final_step)
  images, labels = next(iter(pipeline.build_eval_dataset(ctx.source, config.data, 50,
                                                         ctx.strategy)))
  student = simclr.build_model(config.model, 10)
  student.build_for_size(16)
  weights.match.load(student, str(tmp_path / 'ckpt-2'))
  logits = student(images, training=False)[simclr.LOGITS_SUP].numpy()
  truth = labels.numpy().argmax(1)
  top1 = np.mean(logits.argmax(1) == truth)
  top5 = np.mean([t in np.argsort(-row)[:5] for row, t in zip(logits, truth)])
  assert stored['eval/label_top_1_accuracy'] == pytest.approx(top1, abs=1e-6)
  assert stored['eval/label_top_5_accuracy'] == pytest.approx(top5, abs=1e-6)


def test_label_mask_marks_the_labelled_subset(tmp_path):
  config = tiny_config(tmp_path, train__train_mode='finetune', data__train_label_fraction=0.1)
  ctx = modes.prepare(config)
  dataset = pipeline.build_train_dataset(ctx.source, config.data, 40, ctx.strategy,
                                         num_views=1, label_subset=ctx.label_subset,
                                         with_label_mask=True, seed=0)
  masks = np.concatenate([batch[2].numpy() for _, batch in zip(range(25), dataset)])
  assert set(np.unique(masks)) <= {0.0, 1.0}
  # 1000 of 10000 examples are labelled: over 1000 draws the share is near 10%.
  assert 0.05 < masks.mean() < 0.15


@pytest.mark.parametrize('scale', ['none', 't_squared'])
def test_distill_task_loss_at_the_recipe_temperature(tmp_path, scale):
  """DistillTask's loss at T=0.1 (flags/distill_self.cfg) against the authors' colab formula
  (`add_kd_loss`: mean of T^2 * H(softmax(t/T), softmax(s/T))) in numpy: equal with t_squared,
  1/T^2 of it with none (the paper's Eq. 2)."""
  temperature = 0.1
  base = tiny_config(tmp_path, train__train_mode='finetune')
  config = dataclasses.replace(
      base, train=dataclasses.replace(base.train, train_mode='distill'),
      distill=cfg.DistillConfig(teacher=base.model, teacher_checkpoint=str(tmp_path),
                                temperature=temperature, loss_scale=scale))
  model = simclr.build_model(config.model, 10).build_for_size(16)
  rng = np.random.default_rng(3)
  images = tf.constant(rng.uniform(size=(8, 16, 16, 3)).astype(np.float32))
  labels = tf.one_hot(rng.integers(0, 10, size=8), 10)
  teacher_logits = rng.normal(scale=0.5, size=(8, 10)).astype(np.float32)
  task = tasks.make_task(config, model, tf.distribute.get_strategy(),
                         teacher=lambda x: tf.constant(teacher_logits))
  student = model(images, training=True)[simclr.LOGITS_SUP].numpy().astype(np.float64)
  _, logs = task.train_loss((images, labels))
  t, s = teacher_logits.astype(np.float64) / temperature, student / temperature
  p_t = np.exp(t - t.max(1, keepdims=True))
  p_t /= p_t.sum(1, keepdims=True)
  log_p_s = s - s.max(1, keepdims=True) - np.log(np.exp(s - s.max(1, keepdims=True)).sum(
      1, keepdims=True))
  colab = np.mean(temperature ** 2 * -np.sum(p_t * log_p_s, axis=1))
  want = colab if scale == 't_squared' else colab / temperature ** 2
  np.testing.assert_allclose(float(logs['distill_loss']), want, rtol=1e-4)
