"""Fine-tuning from our pretrain checkpoints: freezing, the head's initialisation, precedence, strict restore,
label fractions. Tiny models (ResNet-18 CIFAR stem, 16 px shapes10, batch 8, a few steps)."""

import json
import logging
import shutil

import numpy as np
import pytest
import tensorflow as tf

from tf_simclr import run_dir
from tf_simclr import weights
from tf_simclr.errors import CheckpointMismatchError
from tf_simclr import config as cfg
from tf_simclr.data import synthetic
from tf_simclr.models import simclr
from tf_simclr.run import modes
from tf_simclr.train import assemble, tasks

from helpers import (TINY_MODEL, build_state, checkpoint_values, parse_flags, run_cli,
                     tiny_config as _tiny_config)

# Training runs here need no SavedModel export (tests/test_export.py covers it): no_export.
# ResNet-18 at 1/16 width (channels 4-8-16-32): which variables freeze, restore or move does not
# depend on the width; full width only made every step and restore slower.
NARROW = 0.0625
TINY = dict(TINY_MODEL, width_multiplier=NARROW)


def tiny_config(model_dir, **overrides):
  return _tiny_config(model_dir, **{'model__width_multiplier': NARROW, **overrides})


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A 2-step pretrain run of the tiny model (linear-eval head on); returns its ckpt prefix."""
  model_dir = tmp_path_factory.mktemp('pretrain')
  modes.run(tiny_config(model_dir, train__train_steps=2),
                 flags_dict=dict(TINY), export_fn=modes.no_export)
  return tf.train.latest_checkpoint(str(model_dir))


def _finetune_config(model_dir, checkpoint, **overrides):
  settings = dict(train__train_mode='finetune', train__checkpoint=checkpoint,
                  train__train_steps=1, train__checkpoint_steps=1)
  return tiny_config(model_dir, **{**settings, **overrides})


@pytest.fixture(scope='module')
def finetuned(tmp_path_factory, pretrained):
  """A 1-step fine-tune from `pretrained` with the defaults (nothing frozen, batch_stats): the
  [-1-batch_stats] run of the freezing test and the first run of the resume test."""
  model_dir = tmp_path_factory.mktemp('finetune') / 'run'
  modes.run(_finetune_config(model_dir, pretrained), export_fn=modes.no_export)
  return model_dir


def _part(path):
  """Encoder part of a variable path: 0 = stem, k = block group k, None = not encoder."""
  parts = path.split('/')
  if parts[1] != 'encoder':
    return None
  return 0 if parts[2] == 'stem' else int(parts[3]) + 1


@pytest.mark.slow
@pytest.mark.parametrize('after_block,frozen_bn', [(-1, 'batch_stats'), (2, 'moving_stats'),
                                                   (4, 'moving_stats'), (2, 'batch_stats')])
def test_fine_tune_after_block_freezes_weights(tmp_path, pretrained, finetuned, after_block,
                                               frozen_bn):
  """Frozen parts keep their weights; their BN statistics move only with batch_stats."""
  config = _finetune_config(tmp_path, pretrained, model__fine_tune_after_block=after_block,
                            model__frozen_batch_norm=frozen_bn)
  if config.model == _finetune_config(tmp_path, pretrained).model:  # the defaults: run already
    model_dir = finetuned
  else:
    model_dir = tmp_path
    modes.run(config, export_fn=modes.no_export)
  before = checkpoint_values(pretrained)
  after = checkpoint_values(tf.train.latest_checkpoint(str(model_dir)))
  assert set(before) == set(after)
  changed = {p: not np.array_equal(before[p], after[p]) for p in before}
  encoder = [p for p in before if _part(p) is not None]
  frozen = [p for p in encoder if _part(p) <= after_block]
  trained = [p for p in encoder if _part(p) > after_block]
  assert len(frozen) + len(trained) == len(encoder) == 105
  moving = [p for p in frozen if p.endswith(('moving_mean', 'moving_variance'))]
  assert bool(moving) == (after_block >= 0)
  assert not [p for p in frozen if changed[p] and p not in moving], 'frozen weights moved'
  if frozen_bn == 'batch_stats':
    assert all(changed[p] for p in moving if p.endswith('moving_mean'))
  else:
    assert not [p for p in moving if changed[p]], 'frozen BN statistics moved'
  # Every trained part updates kernels and BN statistics; the supervised head always trains.
  for part in range(after_block + 1, 5):
    in_part = [p for p in trained if _part(p) == part]
    assert any(changed[p] for p in in_part if p.endswith('_kernel')), part
    assert any(changed[p] for p in in_part if p.endswith('moving_mean')), part
  assert all(changed[p] for p in before if p.startswith('model/supervised_head'))
  # ft_proj_selector=0: the projection head's weights are kept as pretrained.
  head = [p for p in before if p.startswith('model/projection_head')
          and not p.endswith(('moving_mean', 'moving_variance'))]
  assert head and not [p for p in head if changed[p]]


@pytest.mark.slow
@pytest.mark.parametrize('init', ['checkpoint', 'zeros', 'random'])
def test_logits_layer_init_sets_the_head_after_the_restore(tmp_path, pretrained, init):
  """checkpoint (default, the original's behaviour even with --zero_init_logits_layer=True, whose
  zeroing the original ran before the head existed): the checkpoint's head; zeros; random: the
  head's own N(0, 0.01) init (bias 0), not the checkpoint's."""
  restored = checkpoint_values(pretrained)
  head_before = {p: v for p, v in restored.items() if p.startswith('model/supervised_head')}
  assert any(np.any(v != 0) for v in head_before.values())
  config = _finetune_config(tmp_path, pretrained, train__zero_init_logits_layer=True,
                            train__logits_layer_init=init)
  model, _, state = build_state(config, tmp_path)
  assert assemble.initialize_weights(config, model, state, tasks.FinetuneTask) == 'initialized'
  ours = weights.match.object_variable_paths(model)
  for path, value in head_before.items():
    got = ours[path].numpy()
    if init == 'checkpoint':
      np.testing.assert_array_equal(got, value, err_msg=path)
    elif init == 'zeros':
      np.testing.assert_array_equal(got, np.zeros_like(value), err_msg=path)
    elif path.endswith('kernel'):
      assert not np.allclose(got, value) and 0.005 < got.std() < 0.02, path
    else:
      np.testing.assert_array_equal(got, np.zeros_like(value), err_msg=path)
  stem = [p for p in ours if p.startswith('model/encoder/stem')]
  for p in stem:
    np.testing.assert_array_equal(ours[p].numpy(), restored[p], err_msg=p)


@pytest.mark.slow
def test_resume_from_model_dir_wins_over_checkpoint(tmp_path, finetuned, caplog):
  model_dir = tmp_path / 'run'  # a copy of the 1-step fine-tune from the pretrained checkpoint
  shutil.copytree(finetuned, model_dir)
  first = checkpoint_values(str(model_dir / 'ckpt-1'))
  caplog.set_level(logging.INFO)
  # A --checkpoint that does not exist: resuming must not even look at it.
  modes.run(_finetune_config(model_dir, str(tmp_path / 'missing' / 'ckpt-9'),
                             train__train_steps=2), export_fn=modes.no_export)
  assert weights.source.read_global_step(str(model_dir)) == 2
  assert any('Resuming from' in r.getMessage() and 'ckpt-1' in r.getMessage()
             for r in caplog.records)
  assert not any('Initialising the model from --checkpoint' in r.getMessage()
                 for r in caplog.records)
  # The first run's own checkpoint is kept as it was.
  np.testing.assert_array_equal(first['model/supervised_head/linear_layer/dense/bias'],
                                checkpoint_values(str(model_dir / 'ckpt-1'))[
                                    'model/supervised_head/linear_layer/dense/bias'])


def _parse_run_flags(argv):
  return run_cli().config_from_flags(parse_flags(argv))


@pytest.mark.slow
def test_finetune_without_checkpoint_on_label_fraction_from_run_flags(tmp_path, caplog):
  """run.py flags -> a from-scratch fine-tune on a 10% class-balanced, seeded subset."""
  argv = ['--train_mode=finetune', '--dataset=shapes10', '--image_size=16', '--resnet_depth=18',
          f'--width_multiplier={NARROW}', '--num_proj_layers=2', '--proj_out_dim=16', '--train_batch_size=8',
          '--train_epochs=2', '--train_label_fraction=0.1', '--label_fraction_seed=3',
          '--eval_split=test', '--use_blur=False', f'--model_dir={tmp_path}']
  config = _parse_run_flags(argv)
  ctx = modes.prepare(config)
  subset = json.load(open(tmp_path / run_dir.LABEL_SUBSET_FILE))
  labels = synthetic.load_split('train')[1]
  indices = np.asarray(subset['indices'])
  # 10000 examples, 1000 per class -> exactly 100 per class, no duplicates, seeded.
  assert subset['fraction'] == 0.1 and subset['seed'] == 3 and subset['split'] == 'train'
  assert len(indices) == len(set(indices.tolist())) == 1000
  np.testing.assert_array_equal(np.bincount(labels[indices], minlength=10), [100] * 10)
  # Steps come from the subset's 1000 examples: 2 epochs of batch 8 -> 250 steps.
  assert ctx.steps.train_steps == 250 and ctx.steps.epoch_steps == 125
  again = _parse_run_flags(argv[:-1] + [f'--model_dir={tmp_path / "again"}'])
  modes.prepare(again)
  same = json.load(open(tmp_path / 'again' / run_dir.LABEL_SUBSET_FILE))['indices']
  assert same == subset['indices']
  other = _parse_run_flags(argv[:-2] + ['--label_fraction_seed=4', f'--model_dir={tmp_path}/o'])
  modes.prepare(other)
  assert json.load(open(tmp_path / 'o' / run_dir.LABEL_SUBSET_FILE))['indices'] != same
  # The from-scratch baseline says so in the log (2 steps only).
  caplog.set_level(logging.INFO)
  short = tiny_config(tmp_path / 'scratch', train__train_mode='finetune',
                      data__train_label_fraction=0.1, train__train_steps=1)
  modes.run(short, export_fn=modes.no_export)
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert any('without --checkpoint' in r.getMessage() and 'random initialisation'
             in r.getMessage() for r in warnings)


def test_train_split_slicing_counts_steps_on_the_slice(tmp_path):
  config = tiny_config(tmp_path, train__train_mode='finetune', data__train_split='train[:10%]',
                       train__train_steps=0, train__train_epochs=1)
  ctx = modes.prepare(config)
  assert ctx.steps.train_steps == 1000 // 8


@pytest.mark.slow
def test_restore_of_another_architecture_is_an_error(pretrained):
  for change, needle in ((dict(num_proj_layers=3), 'projection_head/linear_layers/2'),
                         (dict(proj_out_dim=8),  # the head's input: 512 * NARROW features
                          'linear_layers/1/dense/_kernel: checkpoint [32, 16] vs model [32, 8]')):
    model = simclr.build_model(cfg.ModelConfig(**{**TINY, **change}), 10)
    model.build_for_size(16)
    with pytest.raises(CheckpointMismatchError) as error:
      weights.match.load(model, pretrained, fresh_ok=('supervised_head',))
    message = str(error.value)
    assert needle in message and '--num_proj_layers' in message and '--width_multiplier' in message
    assert pretrained in message


@pytest.mark.slow
def test_new_supervised_head_with_another_class_count_may_be_fresh(pretrained):
  model = simclr.build_model(cfg.ModelConfig(**TINY), 7)
  model.build_for_size(16)
  with pytest.raises(CheckpointMismatchError, match='supervised_head'):
    weights.match.load(model, pretrained)
  report = weights.match.load(model, pretrained, fresh_ok=('supervised_head',))
  assert report.fresh == ['model/supervised_head/linear_layer/dense/_kernel',
                          'model/supervised_head/linear_layer/dense/bias']
  values = checkpoint_values(pretrained)
  ours = weights.match.object_variable_paths(model)
  assert report.restored == len(ours) - 2
  for path, var in ours.items():
    if 'supervised_head' not in path:
      np.testing.assert_array_equal(var.numpy(), values[path], err_msg=path)
