"""--mode=eval following a training run: what it says when training stopped short of its last
step (docs/restarts.md) and when it reaches it. The evaluation itself is recorded, not run: these
tests are about which checkpoints are evaluated and what is logged."""

import functools
import logging
import time
import types

import keras
import numpy as np

import helpers
from tf_simclr.evaluation import evaluate as evaluate_lib
from tf_simclr.models import simclr
from tf_simclr.weights import state as weights_state

MODEL = helpers.tiny_config('unused', data__image_size=8,
                            model__width_multiplier=0.0625).model


@functools.lru_cache(maxsize=None)
def _model(role):
  """One tiny model per role ('saver', 'loader'), built once for the module."""
  del role
  return simclr.build_model(MODEL, 10).build_for_size(8)


def _marker(model):
  """One weight of the model, set to the step of the checkpoint it was saved in."""
  return model.supervised_head.trainable_variables[0]


def _model_dir_with_steps(model_dir, steps):
  """A model_dir holding checkpoints at `steps` of a tiny model, as TrainState saves them."""
  model = _model('saver')
  optimizer = keras.optimizers.SGD(0.1)
  optimizer.build(model.trainable_variables)
  state = weights_state.TrainState(model, optimizer, str(model_dir), max_to_keep=10)
  for step in steps:
    optimizer.iterations.assign(step)
    _marker(model).assign(np.full(_marker(model).shape, float(step), np.float32))
    state.save()


def _follow(monkeypatch, model_dir, train_steps, timeout):
  evaluated = []

  def record(ctx, model, step, export_fn=None):
    del ctx, export_fn
    evaluated.append((step, float(_marker(model).numpy().ravel()[0])))
    return {'eval/step': step}

  monkeypatch.setattr(evaluate_lib, 'evaluate', record)
  ctx = types.SimpleNamespace(
      config=types.SimpleNamespace(train=types.SimpleNamespace(model_dir=str(model_dir))),
      steps=types.SimpleNamespace(train_steps=train_steps))

  loader = _model('loader')
  _marker(loader).assign(np.full(_marker(loader).shape, -1.0, np.float32))  # not a saved value
  start = time.monotonic()
  result = evaluate_lib.follow_and_evaluate(ctx, lambda: loader, timeout=timeout)
  return result, evaluated, time.monotonic() - start


def test_training_that_stopped_short_ends_with_a_warning(tmp_path, monkeypatch, caplog):
  _model_dir_with_steps(tmp_path, [2])  # training was to run 4 steps
  with caplog.at_level(logging.INFO):
    result, evaluated, seconds = _follow(monkeypatch, tmp_path, train_steps=4, timeout=0.5)
  assert evaluated == [(2, 2.0)]  # the checkpoint's own weights were loaded
  assert result == {'eval/step': 2}
  assert seconds >= 0.5  # it waited out the timeout for a newer checkpoint
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert warnings == [f'No new checkpoint in {tmp_path} within --eval_timeout=0.5 s after step 2 '
                      '(training ends at 4); stopping.']
  assert 'Eval complete.' not in caplog.text


def test_the_last_step_ends_the_eval_without_waiting(tmp_path, monkeypatch, caplog):
  _model_dir_with_steps(tmp_path, [2, 4])
  with caplog.at_level(logging.INFO):
    result, evaluated, _ = _follow(monkeypatch, tmp_path, train_steps=4, timeout=3600)
  assert evaluated == [(4, 4.0)]  # the newest first; it is the last step, so nothing older
  assert result == {'eval/step': 4}
  assert 'Eval complete.' in caplog.text
  assert not [r for r in caplog.records if r.levelno == logging.WARNING]
