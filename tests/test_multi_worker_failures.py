"""Multi-worker runs on 127.0.0.1 where one worker dies or is interrupted: the others must stop
within a bounded time with a message, not hang. (Workers that do not share model_dir, a folder
per machine: tests/test_multi_worker.py, which restarts its several-loops run.)

Slow (two TensorFlow processes each); the helpers that start the workers are in tests/helpers.py.
The workers are small (helpers.MULTI_WORKER_SMALL). The kill in training is made once (a module
fixture); the kills in the final eval resume copies of the model_dir it leaves (its checkpoint is
past their --train_steps), so they trace no training step and go straight to the final eval.
"""

import shutil
import signal
import time

import pytest

import helpers
from tf_simclr import weights

# A peer's death must stop the others within this many seconds (the coordination service's
# heartbeat timeout plus the time to log and exit).
BOUND_S = 60
FLAGS = ['--eval_batch_size=8', '--checkpoint_steps=2', '--linear_probe=False',
         '--knn_monitor=False']


def _wait_for(started, index, text, timeout=600):
  """Waits until worker `index`'s log holds `text` (fails if a worker ends first)."""
  end = time.time() + timeout
  while text not in open(started[index][1]).read():
    assert all(p.poll() is None for p, _, _ in started), helpers.finish_workers(started, timeout=5)
    assert time.time() < end, f'{text!r} not logged after {timeout} s'
    time.sleep(0.05)


def _stop_one_and_time_the_other(started, victim, signum):
  """Sends `signum` to worker `victim`; returns (seconds until the other exited, its rc, log)."""
  other = started[1 - victim][0]
  t0 = time.time()
  started[victim][0].send_signal(signum)
  try:
    other.wait(timeout=BOUND_S + 120)
  except Exception:  # pylint: disable=broad-except
    pass
  elapsed = time.time() - t0
  results = helpers.finish_workers(started, timeout=30)
  return elapsed, results[1 - victim][0], results[1 - victim][1]


def _signal_and_report(started, victim, signum, during):
  """Sends `signum` to worker `victim`; returns (seconds from the signal to the other's exit, the
  other's exit code and log)."""
  elapsed, rc, log = _stop_one_and_time_the_other(started, victim, signum)
  print(f'{signal.Signals(signum).name} to worker {victim} during {during}: the other exited '
        f'{elapsed:.1f} s later (rc {rc})')
  return elapsed, rc, log


@pytest.fixture(scope='module')
def shapes10(tmp_path_factory):
  """shapes10's splits written once for the workers (helpers.shapes10_cache)."""
  return helpers.shapes10_cache(tmp_path_factory)


@pytest.fixture(scope='module')
def killed_in_training(tmp_path_factory, shapes10):
  """kill -9 of worker 1 (not the chief) in training, once the chief has saved a checkpoint:
  (model_dir, the shapes10 cache, (seconds from the signal to the chief's exit, its exit code and
  log))."""
  tmp_path = tmp_path_factory.mktemp('training')
  model_dir = tmp_path / 'run'
  started = helpers.start_small_workers(
      tmp_path, ['--mode=train_then_eval', *FLAGS, '--train_steps=100000',
                 '--eval_split=test[:16]'], [model_dir, model_dir], 'training', shapes10)
  _wait_for(started, 1, 'Saved checkpoint')
  end = time.time() + 600
  while not weights.source.find_checkpoints(str(model_dir)):  # The chief's, for the eval cases.
    assert all(p.poll() is None for p, _, _ in started), helpers.finish_workers(started, timeout=5)
    assert time.time() < end, 'the chief saved no checkpoint after 600 s'
    time.sleep(0.05)
  return model_dir, shapes10, _signal_and_report(started, 1, signal.SIGKILL, 'training')


def _stop_one_in_the_final_eval(tmp_path, source_dir, shapes10, victim, signum):
  """2 workers resume a copy of `source_dir` (its checkpoint is past --train_steps=2, so training
  is complete) and run the final eval of train_then_eval over the 2,000 test images in batches of
  2; `signum` goes to worker `victim` once it has run 50 eval steps (950 remain)."""
  model_dir = tmp_path / 'run'
  shutil.copytree(source_dir, model_dir)
  started = helpers.start_small_workers(
      tmp_path, ['--mode=train_then_eval', *FLAGS, '--train_steps=2', '--eval_split=test',
                 '--eval_batch_size=2'], [model_dir, model_dir], 'eval', shapes10)
  _wait_for(started, victim, 'Training already complete at step ')
  _wait_for(started, victim, 'Eval: 50 / all steps')  # Into the evaluation.
  return _signal_and_report(started, victim, signum, 'eval')


# Each case has its own path: the chief stops when a non-chief dies in a training step's
# collectives (and in the final eval's), and a non-chief stops when the chief (which runs the
# coordination service) dies; SIGINT is Ctrl-C, handled by the victim before it exits.
@pytest.mark.slow
@pytest.mark.parametrize('victim, signum, during', [
    (1, signal.SIGKILL, 'training'),  # kill -9 of a worker: the chief must stop.
    (0, signal.SIGKILL, 'eval'),  # kill -9 of the chief in the final eval: the other must stop.
    (1, signal.SIGINT, 'eval'),  # Ctrl-C of a worker in the final eval: the chief must stop.
])
def test_a_worker_that_dies_or_is_interrupted_stops_the_other_with_a_message(
    tmp_path, killed_in_training, victim, signum, during):
  source_dir, shapes10, training_result = killed_in_training
  if during == 'training':
    elapsed, rc, log = training_result
  else:
    elapsed, rc, log = _stop_one_in_the_final_eval(tmp_path, source_dir, shapes10, victim,
                                                   signum)
  assert elapsed < BOUND_S and rc == 1, (elapsed, rc, log[-3000:])
  assert 'Another worker of this multi-worker run stopped (killed, crashed or interrupted)' in log
  assert 'Traceback' not in log
