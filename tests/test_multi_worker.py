"""MultiWorkerMirroredStrategy chosen from TF_CONFIG: two worker processes on 127.0.0.1.

Each worker runs `run.py` through a small wrapper that, after training, dumps the worker's own
in-memory model variables to a file: the non-chief's checkpoints are throw-away (deleted), so this
is how the test sees that both workers hold the same weights at the last step.

The workers are small (helpers.MULTI_WORKER_SMALL): a cluster's cost is its processes' start-up
and tracing. The several-loops run is made once (a module fixture); the folder-per-machine test
restarts the chief in a copy of its model_dir instead of training checkpoints of its own first.
"""

import json
import os
import re
import shutil
import signal
import time

import numpy as np
import pytest

import helpers
from tf_simclr import weights


def _worker_tmp_left(tmp_path, tag):
  """Files left in the workers' TMPDIRs (the non-chief's temporary checkpoints must be gone)."""
  return [os.path.join(d, f) for i in range(2) for d, _, files in
          os.walk(tmp_path / f'{tag}_tmp{i}') for f in files]


@pytest.fixture(scope='module')
def shapes10(tmp_path_factory):
  """shapes10's splits written once for the workers (helpers.shapes10_cache)."""
  return helpers.shapes10_cache(tmp_path_factory)


@pytest.fixture(scope='module')
def loops_run(tmp_path_factory, shapes10):
  """Two workers, 3 training loops of 2 steps with a kNN readout after the 1st and 2nd, then the
  final eval and export: (tmp_path, model_dir, started, results of finish_workers)."""
  tmp_path = tmp_path_factory.mktemp('loops')
  model_dir = tmp_path / 'run'
  flags = ['--mode=train_then_eval', '--eval_split=test[:16]', '--eval_batch_size=8',
           '--train_steps=6', '--checkpoint_steps=2', '--knn_every_epochs=1',
           '--knn_monitor=True', '--linear_probe=False']
  started = helpers.start_small_workers(tmp_path, flags, [model_dir, model_dir], 'loops',
                                       shapes10)
  return tmp_path, model_dir, started, helpers.finish_workers(started)


@pytest.mark.slow
def test_two_workers_train_several_loops_in_lockstep_with_identical_weights(loops_run):
  """3 training loops with a kNN readout after the 1st and 2nd, then eval: every collective
  (SIGTERM agreement, metrics, eval sums, readout gathers, restored-step agreement) runs
  more than once, and both workers end at step 6 with the same weights as ckpt-6."""
  tmp_path, model_dir, started, results = loops_run
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
def test_sigterm_to_one_worker_stops_both_at_the_same_saved_step(tmp_path, shapes10):
  model_dir = tmp_path / 'run'
  flags = ['--mode=train', '--train_steps=100000', '--checkpoint_steps=2', '--eval_split=test',
           '--knn_monitor=False', '--linear_probe=False']
  started = helpers.start_small_workers(tmp_path, flags, [model_dir, model_dir], 'term', shapes10)
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
def test_a_folder_per_worker_is_refused_at_start_naming_the_host(tmp_path, loops_run):
  """A folder per machine: worker 0 (the chief) restarts in a copy of the several-loops run
  (ckpt-6), worker 1 in a fresh folder of its own. Both stop with exit 2 before training a step,
  at the start-up check that every worker sees the chief's lock; before that check, fresh folders
  were found only at a resume, and folders at different steps (6 and 0 here) only at the
  restored-step agreement.

  One cluster covers both former cases (both folders fresh; both holding checkpoints of different
  steps): the check is a collective that every worker must reach at the same point, so a check
  that ran only for a fresh folder, or only for one holding checkpoints, would miss one of these
  two workers and neither message below would be logged."""
  import socket
  _, source, _, source_results = loops_run
  assert [rc for rc, _ in source_results] == [0, 0], 'the several-loops run failed'
  first, second = tmp_path / 'machine0', tmp_path / 'machine1'
  shutil.copytree(source, first)
  steps = lambda d: [weights.source.checkpoint_step(p)
                     for p in weights.source.find_checkpoints(str(d))]
  assert steps(first) == [6, 4, 2]
  t0 = time.time()
  started = helpers.start_small_workers(
      tmp_path, ['--mode=train', '--train_steps=8', '--checkpoint_steps=2'], [first, second],
      'restart')
  (chief_rc, chief_log), (other_rc, other_log) = helpers.finish_workers(started, timeout=300)
  print(f'per-machine model_dir refused after {time.time() - t0:.1f} s (two process starts)')
  assert other_rc == 2, other_log[-4000:]
  assert f'This worker (host {socket.gethostname()}) does not see the chief\'s run in' in other_log
  assert f'--model_dir={second}' in other_log and 'not a folder per machine' in other_log
  assert chief_rc == 2, chief_log[-4000:]
  assert 'Another worker of this multi-worker run does not see' in chief_log
  for log in (chief_log, other_log):
    assert 'one shared --model_dir' in log
    assert 'Traceback' not in log and 'Training from step' not in log
  assert steps(first) == [6, 4, 2] and steps(second) == []  # Nothing trained or saved.
  assert not (first / 'LOCK').exists()  # The chief released its lock.
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
  started = helpers.start_small_workers(tmp_path, ['--mode=train', '--train_steps=2'],
                                       [model_dir, model_dir], 'locked')
  (chief_rc, chief_log), (other_rc, other_log) = helpers.finish_workers(started, timeout=300)
  assert chief_rc == 2 and 'is in use by another training run (host another-host' in chief_log, \
      chief_log[-3000:]
  assert other_rc == 2 and 'The chief of this multi-worker run could not start' in other_log, \
      other_log[-3000:]
  assert 'Traceback' not in chief_log + other_log
  assert json.loads((model_dir / 'LOCK').read_text()) == holder  # The live run's lock stays.
  assert sorted(os.listdir(model_dir)) == ['LOCK']
