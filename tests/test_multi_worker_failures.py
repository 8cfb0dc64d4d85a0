"""Multi-worker runs on 127.0.0.1 where one worker dies or is interrupted, or where the workers
do not share model_dir: the others must stop within a bounded time with a message, not hang.

Slow (two TensorFlow processes each); the helpers that start the workers are in tests/helpers.py.
"""

import signal
import time

import pytest

import helpers

# A peer's death must stop the others within this many seconds (the coordination service's
# heartbeat timeout plus the time to log and exit).
BOUND_S = 60
FLAGS = ['--train_split=train[:16]', '--eval_batch_size=8', '--checkpoint_steps=2',
         '--linear_probe=False', '--knn_monitor=False']


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


@pytest.mark.slow
def test_a_folder_per_worker_is_refused_at_start_naming_the_host(tmp_path):
  """Fresh per-machine model_dirs: both workers exit 2 before building anything (before: found
  only when a resume restored different steps)."""
  import socket
  dirs = [tmp_path / 'machine0', tmp_path / 'machine1']
  t0 = time.time()
  started = helpers.start_workers(tmp_path, ['--mode=train', '--train_steps=2', '--eval_split=test'],
                           dirs, 'own')
  (chief_rc, chief_log), (other_rc, other_log) = helpers.finish_workers(started, timeout=300)
  print(f'per-machine model_dir refused after {time.time() - t0:.1f} s (two process starts)')
  assert other_rc == 2, other_log[-3000:]
  assert f'This worker (host {socket.gethostname()}) does not see the chief' in other_log
  assert f'--model_dir={dirs[1]}' in other_log and 'not a folder per machine' in other_log
  assert chief_rc == 2, chief_log[-3000:]
  assert 'Another worker of this multi-worker run does not see' in chief_log
  assert 'Traceback' not in chief_log + other_log
  assert 'Training from step' not in chief_log + other_log
  assert not (dirs[0] / 'LOCK').exists()  # The chief released its lock.


def _start_and_stop_one(tmp_path, victim, signum, during):
  """Starts 2 workers on one shared model_dir, sends `signum` to worker `victim` `during`
  'training' (after its first checkpoint) or the final 'eval' (after training ended); returns
  (seconds from the signal to the other's exit, the other's exit code and log)."""
  model_dir = tmp_path / 'run'
  if during == 'training':
    flags = ['--train_steps=100000', '--eval_split=test[:16]']
    mark = 'Saved checkpoint'
  else:  # 2,000 eval images in batches of 8 outlast the signal.
    flags = ['--train_steps=2', '--eval_split=test']
    mark = 'Training complete at step 2'
  started = helpers.start_workers(tmp_path, ['--mode=train_then_eval', *FLAGS, *flags],
                           [model_dir, model_dir], during)
  _wait_for(started, victim, mark)
  if during == 'eval':
    time.sleep(1.0)  # Into the evaluation.
  elapsed, rc, log = _stop_one_and_time_the_other(started, victim, signum)
  print(f'{signal.Signals(signum).name} to worker {victim} during {during}: the other exited '
        f'{elapsed:.1f} s later (rc {rc})')
  return elapsed, rc, log


@pytest.mark.slow
@pytest.mark.parametrize('victim, signum, during', [
    (1, signal.SIGKILL, 'training'),  # kill -9 of a worker: the chief must stop.
    (0, signal.SIGKILL, 'eval'),  # kill -9 of the chief in the final eval: the other must stop.
    (1, signal.SIGINT, 'eval'),  # Ctrl-C of a worker in the final eval: the chief must stop.
])
def test_a_worker_that_dies_or_is_interrupted_stops_the_other_with_a_message(
    tmp_path, victim, signum, during):
  elapsed, rc, log = _start_and_stop_one(tmp_path, victim, signum, during)
  assert elapsed < BOUND_S and rc == 1, (elapsed, rc, log[-3000:])
  assert 'Another worker of this multi-worker run stopped (killed, crashed or interrupted)' in log
  assert 'Traceback' not in log
