"""Helpers shared by test modules (fixtures live in conftest.py): tiny configs and builders."""

import dataclasses

import tensorflow as tf

from tf_simclr import config as cfg
from tf_simclr import weights
from tf_simclr.train import experiment

TINY_MODEL = dict(resnet_depth=18, width_multiplier=1, cifar_stem=True, proj_out_dim=16,
                  num_proj_layers=2)


def tiny_config(model_dir, **overrides):
  """A Config for 16 px shapes10 runs of a few steps (readouts off: tests/test_probe.py)."""
  sections = {'model': {}, 'data': {}, 'optim': {}, 'train': {}, 'probe': {}}
  for key, value in overrides.items():
    section, name = key.split('__')
    sections[section][name] = value
  train_mode = sections['train'].get('train_mode', 'pretrain')
  # The run's model as run.py builds it (linear eval while pretraining), then any overrides.
  image_size = sections['data'].get('image_size', 16)
  architecture = {k: v for k, v in TINY_MODEL.items() if k != 'cifar_stem'}  # from image_size
  model = cfg.model_config(train_mode, image_size, lineareval_while_pretraining=True,
                           **architecture)
  model = dataclasses.replace(model, **sections['model'])
  data = cfg.DataConfig(**{'dataset': 'shapes10', 'eval_split': 'test', 'image_size': 16,
                           'use_blur': True, 'color_jitter_strength': 0.5, **sections['data']})
  optim = cfg.OptimConfig(**{'learning_rate': 0.1, 'weight_decay': 1e-4, 'warmup_epochs': 0,
                             **sections['optim']})
  train = cfg.TrainConfig(**{'model_dir': str(model_dir), 'train_batch_size': 8,
                             'train_steps': 3, 'checkpoint_steps': 2, 'eval_batch_size': 50,
                             'eval_steps': 2, 'temperature': 0.5, 'seed': 1,
                             **sections['train']})
  probe = cfg.ProbeConfig(**{'knn': False, 'linear_probe': False, **sections['probe']})
  return cfg.Config(model=model, data=data, optim=optim, train=train, probe=probe)


def build_state(config, model_dir):
  """(model, optimizer, TrainState) of `config`'s run, built as training builds them."""
  ctx = experiment.prepare(config)
  built = experiment.assemble_trainer(config, ctx.strategy, ctx.steps, ctx.num_classes)
  assert built.state.model_dir == str(model_dir)
  return built.model, built.optimizer, built.state


def checkpoint_values(path):
  """{structural path below model/: value} of a checkpoint, read without any model object."""
  reader = tf.train.load_checkpoint(path)
  keys = weights.source.variable_paths(reader, root_child='model')
  return {p: reader.get_tensor(k) for p, k in keys.items()}
