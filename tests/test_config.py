"""Flag compatibility with google-research/simclr tf2/run.py, and config validation."""

import math
import subprocess
import sys

import pytest
from absl import flags as absl_flags

from tf_simclr import config as cfg

from helpers import parse_flags

# Every flag of the original tf2/run.py with its default, transcribed from the reference
# (commit 383d414). `use_tpu` is the one deliberate change: unset means automatic.
ORIGINAL_FLAGS = {
    'learning_rate': 0.3, 'learning_rate_scaling': 'linear', 'warmup_epochs': 10,
    'weight_decay': 1e-6, 'batch_norm_decay': 0.9, 'train_batch_size': 512,
    'train_split': 'train', 'train_epochs': 100, 'train_steps': 0, 'eval_steps': 0,
    'eval_batch_size': 256, 'checkpoint_epochs': 1, 'checkpoint_steps': 0,
    'eval_split': 'validation', 'dataset': 'imagenet2012', 'cache_dataset': False,
    'mode': 'train', 'train_mode': 'pretrain', 'lineareval_while_pretraining': True,
    'checkpoint': None, 'zero_init_logits_layer': False, 'fine_tune_after_block': -1,
    'master': None, 'model_dir': None, 'data_dir': None, 'tpu_name': None, 'tpu_zone': None,
    'gcp_project': None, 'optimizer': 'lars', 'momentum': 0.9, 'eval_name': None,
    'keep_checkpoint_max': 5, 'keep_hub_module_max': 1, 'temperature': 0.1,
    'hidden_norm': True, 'proj_head_mode': 'nonlinear', 'proj_out_dim': 128,
    'num_proj_layers': 3, 'ft_proj_selector': 0, 'global_bn': True, 'width_multiplier': 1,
    'resnet_depth': 50, 'sk_ratio': 0.0, 'se_ratio': 0.0, 'image_size': 224,
    'color_jitter_strength': 1.0, 'use_blur': True,
}

ORIGINAL_CIFAR_COMMAND = [
    '--train_mode=pretrain', '--train_batch_size=512', '--train_epochs=1000',
    '--learning_rate=1.0', '--weight_decay=1e-4', '--temperature=0.5', '--dataset=cifar10',
    '--image_size=32', '--eval_split=test', '--resnet_depth=18', '--use_blur=False',
    '--color_jitter_strength=0.5', '--model_dir=/tmp/simclr_test', '--use_tpu=False']


_parse = parse_flags


def test_every_original_flag_exists_with_its_default(run_module):
  flag_values = absl_flags.FLAGS
  for name, default in ORIGINAL_FLAGS.items():
    assert name in flag_values, f'--{name} of the original is missing'
    assert flag_values[name].default == default, name
  assert flag_values['use_tpu'].default is None  # automatic, documented in the README


def test_original_cifar_command_line_parses_to_the_right_config(run_module):
  fv = _parse(ORIGINAL_CIFAR_COMMAND)
  config = run_module.config_from_flags(fv)
  assert config.model.resnet_depth == 18 and config.model.cifar_stem
  assert config.model.supervised_head and config.model.supervised_head_stop_gradient
  assert config.data.dataset == 'cifar10' and not config.data.use_blur
  assert config.optim.learning_rate == 1.0 and config.optim.weight_decay == 1e-4
  assert config.train.temperature == 0.5 and config.train.train_epochs == 1000
  assert config.distribute.strategy == 'auto' and not config.distribute.allow_tpu


def test_use_tpu_true_forces_tpu(run_module):
  fv = _parse(['--use_tpu=True', '--model_dir=gs://b/x', '--data_dir=gs://b/tfds'])
  assert run_module.config_from_flags(fv).distribute.strategy == 'tpu'


@pytest.mark.parametrize('argv, flag', [
    (['--use_tpu=True', '--model_dir=/tmp/x', '--data_dir=gs://b/d'], '--model_dir'),
    (['--tpu_name=pod', '--model_dir=gs://b/x', '--data_dir=/data'], '--data_dir'),
    (['--distribution_strategy=tpu', '--model_dir=gs://b/x'], '--data_dir'),  # TFDS default dir
    (['--use_tpu=True', '--model_dir=gs://b/x', '--dataset=folder:/imgs'], '--dataset'),
    (['--use_tpu=True', '--model_dir=gs://b/x', '--data_dir=gs://b/d', '--checkpoint=/ck'],
     '--checkpoint'),
    (['--use_tpu=True', '--model_dir=gs://b/x', '--data_dir=gs://b/d', '--train_mode=distill',
      '--teacher_checkpoint=/t'], '--teacher_checkpoint'),
])
def test_local_paths_on_a_tpu_are_an_error_naming_the_flag(run_module, argv, flag):
  with pytest.raises(cfg.ConfigError, match=f'{flag}=.*local.*gs://.*--allow_local_paths_on_tpu'):
    run_module.config_from_flags(_parse(argv))


@pytest.mark.parametrize('argv', [
    ['--use_tpu=True', '--model_dir=/tmp/x', '--allow_local_paths_on_tpu'],  # single-host VM
    ['--use_tpu=True', '--model_dir=gs://b/x', '--dataset=shapes10'],  # generated on each host
    ['--use_tpu=True', '--model_dir=gs://b/x', '--dataset=folder:gs://b/imgs'],
    ['--use_tpu=True', '--model_dir=gs://b/x', '--dataset=shapes10', '--checkpoint=gs://b/c'],
    ['--use_tpu=False', '--model_dir=/tmp/x', '--tpu_name=ignored'],  # no TPU: no rule
    ['--model_dir=/tmp/x'],  # auto without a named TPU: checked once a TPU is found
])
def test_tpu_path_rule_allows(run_module, argv):
  run_module.config_from_flags(_parse(argv))


def test_check_tpu_paths_without_a_tpu():
  """The check modes.prepare runs when `auto` finds a TPU on the VM."""
  config = cfg.Config(model=cfg.ModelConfig(), data=cfg.DataConfig(data_dir='gs://b/d'),
                      optim=cfg.OptimConfig(), train=cfg.TrainConfig(model_dir='/home/me/run'))
  with pytest.raises(cfg.ConfigError, match="--model_dir='/home/me/run' is local"):
    cfg.check_tpu_paths(config)
  cfg.check_tpu_paths(cfg.Config(model=config.model, data=config.data, optim=config.optim,
                                 train=cfg.TrainConfig(model_dir='gs://b/run')))


def test_finetune_flags_map_to_model_config(run_module):
  fv = _parse(['--train_mode=finetune', '--fine_tune_after_block=4', '--ft_proj_selector=1',
               '--model_dir=/tmp/x'])
  model = run_module.config_from_flags(fv).model
  assert model.fine_tune_after_block == 4 and model.ft_proj_selector == 1
  assert model.supervised_head and not model.supervised_head_stop_gradient
  assert model.frozen_batch_norm == 'batch_stats'  # the original's frozen BN
  fv = _parse(['--train_mode=finetune', '--fine_tune_after_block=4', '--model_dir=/tmp/x',
               '--frozen_batch_norm=moving_stats'])
  assert run_module.config_from_flags(fv).model.frozen_batch_norm == 'moving_stats'


@pytest.mark.parametrize('argv, flag', [
    (['--fine_tune_after_block=2'], 'fine_tune_after_block'),
    (['--ft_proj_selector=4'], 'ft_proj_selector'),
    (['--proj_head_mode=linear', '--ft_proj_selector=2'], 'ft_proj_selector'),
    (['--resnet_depth=42'], 'resnet_depth'),
    (['--temperature=0'], 'temperature'),
    (['--frozen_batch_norm=moving_stats'], 'frozen_batch_norm'),
    (['--train_mode=finetune', '--frozen_batch_norm=moving_stats'], 'frozen_batch_norm'),
    (['--model_dir='], 'model_dir'),
    (['--cpu_devices=2', '--distribution_strategy=default'], 'cpu_devices'),
])
def test_bad_flags_raise_config_error_naming_the_flag(run_module, argv, flag):
  argv = ['--model_dir=/tmp/x'] + argv
  with pytest.raises(cfg.ConfigError, match=f'--{flag}'):
    run_module.config_from_flags(_parse(argv))


def test_distill_loss_scale_is_checked_and_recorded(run_module):
  with pytest.raises(cfg.ConfigError, match='--distill_loss_scale'):
    cfg.DistillConfig(loss_scale='t2')
  assert cfg.DistillConfig().loss_scale == 'none'  # SimCLRv2 Eq. 2
  from tf_simclr import config_record
  assert {'distill_loss_scale', 'frozen_batch_norm'} <= set(config_record.RESUME_FIXED_FLAGS)


def test_resolve_steps_runs_exactly_the_epochs_steps():
  train = cfg.TrainConfig(model_dir='/tmp/x', train_batch_size=512, train_epochs=1000,
                          checkpoint_epochs=1)
  optim = cfg.OptimConfig(warmup_epochs=10)
  steps = cfg.resolve_steps(train, optim, num_train_examples=50000, num_eval_examples=10000)
  assert steps.train_steps == math.ceil(50000 * 1000 / 512)  # 97657, not rounded to loops
  assert steps.epoch_steps == 98 and steps.checkpoint_steps == 98
  assert steps.warmup_steps == 976  # floor(10 * 50000 / 512)
  assert steps.eval_steps == 40  # ceil(10000 / 256)
  explicit = cfg.resolve_steps(cfg.TrainConfig(model_dir='/x', train_steps=7, checkpoint_steps=3,
                                               steps_per_loop=10), optim, 100, 10)
  assert (explicit.train_steps, explicit.checkpoint_steps, explicit.steps_per_loop) == (7, 3, 7)


def test_help_groups_every_flag_once_basics_first(capsys):
  """--help prints the flags by topic (each defined flag in exactly one group), basics first,
  and exits 0; a flag typo is one line and exit 2 (a user error, as the README says)."""
  from absl import flags as absl_flags
  from tf_simclr.cli import definitions, usage
  defined = {f.name for f in absl_flags.FLAGS.get_flags_for_module(definitions)}
  grouped = [name for _, _, names in definitions.GROUPS for name in names]
  assert len(grouped) == len(set(grouped)) and set(grouped) == defined
  assert set(ORIGINAL_FLAGS) <= defined
  with pytest.raises(SystemExit) as exit_:
    usage.parse_flags(['tf-simclr', '--help'])
  assert exit_.value.code == 0
  out = capsys.readouterr().out
  titles = [title for _, title, _ in definitions.GROUPS]
  positions = [out.index(f'\n{title}:\n') for title in titles]
  assert positions == sorted(positions) and out.index('--train_mode') < out.index('--knn_k')
  assert out.index('--dataset') < positions[1] < out.index('--teacher_checkpoint')
  with pytest.raises(SystemExit) as exit_:
    usage.parse_flags(['tf-simclr', '--resnet_dept=18'])
  assert exit_.value.code == 2
  assert "Unknown command line flag 'resnet_dept'" in capsys.readouterr().err


def test_a_tpu_found_by_auto_checks_paths_before_any_work(monkeypatch, tmp_path):
  from tf_simclr import distribute
  from tf_simclr.run import modes

  class TPUStrategy:  # Stands in for the strategy `auto` builds on a TPU VM.
    num_replicas_in_sync = 8

  monkeypatch.setattr(distribute, 'make_strategy', lambda config: TPUStrategy())
  model_dir = tmp_path / 'run'
  config = cfg.Config(model=cfg.ModelConfig(), data=cfg.DataConfig(dataset='shapes10'),
                      optim=cfg.OptimConfig(), train=cfg.TrainConfig(model_dir=str(model_dir)))
  with pytest.raises(cfg.ConfigError, match='--model_dir=.* is local'):
    modes.prepare(config)
  assert not model_dir.exists()
