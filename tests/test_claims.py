"""What the README and docs promise, pinned: the readout table, a finite loss above the divergence
bound, --keep_checkpoint_max pruning, and the legacy flags that are accepted and ignored."""

import logging
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_simclr.evaluation import probe
from tf_simclr.train import loop
from tf_simclr.weights import source as weights_source
from tf_simclr.weights import state as weights_state

from helpers import parse_flags, run_cli

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')


def test_readout_table_is_the_readmes():
  """The quickstart's table in the README is what format_table prints for those numbers."""
  result = {'global_step': 625, 'eval/label_top_1_accuracy': 0.337,
            'eval/knn_top_1_accuracy': 0.678, 'eval/linear_probe_top_1_accuracy': 0.8195,
            'eval/random_init/knn_top_1_accuracy': 0.2985,
            'eval/random_init/linear_probe_top_1_accuracy': 0.312}
  table = probe.format_table(result)
  assert table.splitlines() == [
      'Top-1 accuracy on the eval split (step 625):',
      '  encoder      online head      kNN linear probe',
      '  pretrained        0.3370   0.6780       0.8195',
      '  random init            -   0.2985       0.3120']
  assert table in open(README).read()
  # Without a random-init measurement there is no second row.
  assert len(probe.format_table({'eval/knn_top_1_accuracy': 0.5}).splitlines()) == 3


class _Trainer:
  """The part of loop.Trainer its divergence check reads: finite weights, no checkpoint kept."""
  _weights_finite = staticmethod(lambda: True)
  _kept = staticmethod(lambda: 'no checkpoint was saved yet')


@pytest.mark.parametrize('loss,diverged', [(2.0, False), (0.9 * loop.LOSS_BOUND, False),
                                           (1.1 * loop.LOSS_BOUND, True),
                                           (-1.1 * loop.LOSS_BOUND, True),
                                           (float('nan'), True), (float('inf'), True)])
def test_a_finite_loss_above_the_bound_is_divergence(loss, diverged):
  assert loop.LOSS_BOUND == 1e6  # The docs' number.
  metrics = {'train/contrastive_loss': loss, 'train/contrast_acc': 0.5}
  if diverged:
    with pytest.raises(loop.TrainingDivergedError, match='diverged at step 7'):
      loop.Trainer._check_divergence(_Trainer(), 7, metrics)
  else:
    loop.Trainer._check_divergence(_Trainer(), 7, metrics)
  # A large value of a metric that is not a loss is not divergence.
  loop.Trainer._check_divergence(_Trainer(), 7, {'train/images_per_second': 1e9})


def test_keep_checkpoint_max_keeps_the_newest(tmp_path):
  model = keras.Sequential([keras.layers.Dense(2)])
  model.build((None, 3))
  optimizer = keras.optimizers.SGD(0.1)
  optimizer.build(model.trainable_variables)
  state = weights_state.TrainState(model, optimizer, str(tmp_path), max_to_keep=2)
  for _ in range(4):
    optimizer.iterations.assign_add(1)
    state.save()
  found = weights_source.find_checkpoints(str(tmp_path))
  assert [weights_source.checkpoint_step(p) for p in found] == [4, 3]
  assert sorted(n for n in os.listdir(tmp_path) if n.endswith('.index')) == [
      'ckpt-3.index', 'ckpt-4.index']
  assert np.all(np.isfinite(tf.train.load_checkpoint(found[0]).get_tensor(
      'global_step/.ATTRIBUTES/VARIABLE_VALUE')))


def test_legacy_flags_are_accepted_and_ignored_with_a_warning(caplog):
  """--train_summary_steps and --variable_schema (the original's) parse, change no setting and
  are named in one warning each."""
  cli = run_cli()
  plain = cli.config_from_flags(parse_flags(['--model_dir=/tmp/x']))
  flags = parse_flags(['--model_dir=/tmp/x', '--train_summary_steps=7', '--variable_schema=abc'])
  assert cli.config_from_flags(flags) == plain
  flags = parse_flags(['--train_summary_steps=7', '--variable_schema=abc'])  # No --model_dir:
  with caplog.at_level(logging.WARNING), pytest.raises(SystemExit) as exit_info:
    cli.main(['run.py'])  # refused after the warnings, before anything runs.
  assert exit_info.value.code == 2
  for name in ('train_summary_steps', 'variable_schema'):
    assert any(f'--{name} is accepted' in r.getMessage() and 'no effect' in r.getMessage()
               for r in caplog.records), name


@pytest.mark.slow
def test_sigint_outside_the_training_loop_exits_130_saying_nothing_was_saved(tmp_path):
  """Ctrl-C while --mode=eval waits for a checkpoint: exit 130 and the one line, no traceback."""
  import signal
  import subprocess
  import sys
  import time
  root = os.path.dirname(README)
  log_path = tmp_path / 'log.txt'
  with open(log_path, 'w') as log:
    proc = subprocess.Popen(
        [sys.executable, os.path.join(root, 'run.py'), '--mode=eval', '--dataset=shapes10',
         '--eval_split=test', '--image_size=8', '--resnet_depth=18', '--width_multiplier=0.0625',
         f'--model_dir={tmp_path / "run"}', '--eval_timeout=600'],
        cwd=root, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'), stdout=log,
        stderr=subprocess.STDOUT)
  deadline = time.time() + 240
  while 'Waiting for a checkpoint' not in log_path.read_text():
    assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-2000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  assert proc.wait(timeout=60) == 130
  text = log_path.read_text()
  assert 'Interrupted (SIGINT) outside the training loop' in text and 'saved nothing' in text
  assert 'Traceback' not in text
