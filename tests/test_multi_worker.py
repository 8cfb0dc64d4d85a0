"""MultiWorkerMirroredStrategy chosen from TF_CONFIG: two worker processes on 127.0.0.1.

Each worker runs `run.py` through a small wrapper that, after training, dumps the worker's own
in-memory model variables to a file: the non-chief's checkpoints are throw-away (deleted), so this
is how the test sees that both workers hold the same weights at the last step.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import helpers
from tf_simclr import weights

ROOT = __import__('conftest').PROJECT_ROOT


def _worker_tmp_left(tmp_path, tag):
  """Files left in the workers' TMPDIRs (the non-chief's temporary checkpoints must be gone)."""
  return [os.path.join(d, f) for i in range(2) for d, _, files in
          os.walk(tmp_path / f'{tag}_tmp{i}') for f in files]


@pytest.mark.slow
def test_two_workers_train_several_loops_in_lockstep_with_identical_weights(tmp_path):
  """3 training loops with a kNN readout after the 1st and 2nd, then eval: every collective
  (SIGTERM agreement, metrics, eval sums, readout gathers, restored-step agreement) runs
  more than once, and both workers end at step 6 with the same weights as ckpt-6."""
  model_dir = tmp_path / 'run'
  flags = ['--mode=train_then_eval', '--train_split=train[:16]', '--eval_split=test[:16]',
           '--eval_batch_size=8', '--train_steps=6', '--checkpoint_steps=2',
           '--knn_every_epochs=1', '--knn_monitor=True', '--linear_probe=False']
  started = helpers.start_workers(tmp_path, flags, [model_dir, model_dir], 'loops')
  results = helpers.finish_workers(started)
  for rc, log in results:
    assert rc == 0, log[-4000:]
  logs = [log for _, log in results]
  assert 'MultiWorkerMirroredStrategy, 2 replicas' in logs[0]
  for log in logs:
    assert len(re.findall(r'step [246]/6 ', log)) == 3, log[-4000:]
    assert 'Training complete at step 6' in log
  dumps = [np.load(dump) for _, _, dump in started]
  assert int(dumps[0]['step']) == int(dumps[1]['step']) == 6
  names = [k for k in dumps[0].files if k != 'step']
  assert names == [k for k in dumps[1].files if k != 'step'] and len(names) > 50
  for name in names:
    np.testing.assert_array_equal(dumps[1][name], dumps[0][name], err_msg=name)
  # The chief's ckpt-6 holds those weights (the dumps are the last step's).
  reader = tf_reader(model_dir / 'ckpt-6')
  paths = weights.source.variable_paths(reader, root_child='model')
  saved = sorted(np.asarray(reader.get_tensor(k)).tobytes() for k in paths.values())
  dumped = sorted(dumps[0][n].tobytes() for n in names)
  assert saved == dumped
  assert any(n.endswith('moving_mean') and np.any(dumps[0][n] != 0) for n in names)  # trained
  # Only the chief writes the shared outputs; nothing of the other worker stays behind.
  result = json.load(open(model_dir / 'result.json'))
  assert result['global_step'] == 6 and 'eval/knn_top_1_accuracy' in result, result
  assert sorted(os.listdir(model_dir)).count('.workers') == 0
  assert not _worker_tmp_left(tmp_path, 'loops')


def tf_reader(path):
  import tensorflow as tf
  return tf.train.load_checkpoint(str(path))


@pytest.mark.slow
def test_sigterm_to_one_worker_stops_both_at_the_same_saved_step(tmp_path):
  model_dir = tmp_path / 'run'
  flags = ['--mode=train', '--train_steps=100000', '--checkpoint_steps=2', '--eval_split=test']
  started = helpers.start_workers(tmp_path, flags, [model_dir, model_dir], 'term')
  end = time.time() + 600
  while not weights.source.find_checkpoints(str(model_dir)):
    assert all(p.poll() is None for p, _, _ in started), helpers.finish_workers(started)
    assert time.time() < end, 'no checkpoint after 600 s'
    time.sleep(0.1)
  started[1][0].send_signal(signal.SIGTERM)  # The non-chief only: the chief must follow.
  results = helpers.finish_workers(started)
  steps = []
  for rc, log in results:
    assert rc == 3, log[-4000:]
    m = re.search(r'PREEMPTED: stopped on SIGTERM at step (\d+) of 100000', log)
    assert m, log[-4000:]
    steps.append(int(m.group(1)))
  assert steps[0] == steps[1] and steps[0] % 2 == 0 and steps[0] >= 2, steps
  newest = weights.source.find_checkpoints(str(model_dir))[0]
  assert weights.source.checkpoint_step(newest) == steps[0]
  assert not _worker_tmp_left(tmp_path, 'term')


@pytest.mark.slow
def test_restart_with_a_folder_per_worker_at_different_steps_is_refused(tmp_path):
  """Worker 0's --model_dir holds ckpt-4, worker 1's ckpt-2 (a folder per machine): both stop
  with exit 2 before training a step, at the start-up check that every worker sees the chief's
  lock (before that check: at the restored-step agreement, naming both steps)."""
  first, second = tmp_path / 'worker0_dir', tmp_path / 'worker1_dir'
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='')
  env.pop('TF_CONFIG', None)
  single = subprocess.run(  # One process (default strategy) writes ckpt-2 and ckpt-4.
      [sys.executable, 'run.py', *helpers.MULTI_WORKER_TINY, '--mode=train', '--train_steps=4',
       '--checkpoint_steps=2', f'--model_dir={first}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
  shutil.copytree(first, second)
  for path in second.glob('ckpt-4.*'):
    path.unlink()
  started = helpers.start_workers(tmp_path, ['--mode=train', '--train_steps=6', '--checkpoint_steps=2'],
                           [first, second], 'restart')
  results = helpers.finish_workers(started)
  assert 'does not see the chief\'s run in' in results[1][1], results[1][1][-4000:]
  assert 'Another worker of this multi-worker run does not see' in results[0][1]
  for rc, log in results:
    assert rc == 2, log[-4000:]
    assert 'one shared --model_dir' in log
    assert 'Traceback' not in log and 'Training from step' not in log
  assert [weights.source.checkpoint_step(p)
          for p in weights.source.find_checkpoints(str(first))] == [4, 2]
  assert not (first / 'LOCK').exists()
  assert not _worker_tmp_left(tmp_path, 'restart')


@pytest.mark.slow
def test_a_chief_that_cannot_take_the_lock_stops_every_worker(tmp_path):
  """A live run holds model_dir's LOCK: the chief refuses (exit 2, names the holder) and the
  other worker stops too with exit 2 and says why (before: a traceback from its first
  collective once the chief's coordination service was gone, exit 1)."""
  model_dir = tmp_path / 'run'
  model_dir.mkdir()
  holder = {'host': 'another-host', 'pid': 4242, 'started': '2026-12-01T00:00:00+00:00',
            'token': 'x', 'refreshed': time.time() + 3600, 'lease_s': 300}
  (model_dir / 'LOCK').write_text(json.dumps(holder))
  started = helpers.start_workers(tmp_path, ['--mode=train', '--train_steps=2'],
                           [model_dir, model_dir], 'locked')
  (chief_rc, chief_log), (other_rc, other_log) = helpers.finish_workers(started, timeout=300)
  assert chief_rc == 2 and 'is in use by another training run (host another-host' in chief_log, \
      chief_log[-3000:]
  assert other_rc == 2 and 'The chief of this multi-worker run could not start' in other_log, \
      other_log[-3000:]
  assert 'Traceback' not in chief_log + other_log
  assert json.loads((model_dir / 'LOCK').read_text()) == holder  # The live run's lock stays.
  assert sorted(os.listdir(model_dir)) == ['LOCK']
