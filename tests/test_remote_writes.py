"""A remote model_dir (gs://, here TensorFlow's in-memory ram:// file system) is written at most
every run_dir.REMOTE_WRITE_INTERVAL_S by the training loop: summary flushes and lease renewals
(each is a whole-object upload on GCS, which allows about one write per second per object). A
local model_dir keeps its write per loop."""

import dataclasses
import json
import uuid

import pytest
import tensorflow as tf

from tf_simclr import run_dir
from tf_simclr.train import loop

LOOPS = 6


def _folder(kind, tmp_path):
  return f'ram://remote_writes_{uuid.uuid4().hex}' if kind == 'remote' else str(tmp_path)


def _event_bytes(folder):
  return sum(tf.io.gfile.stat(p).length for p in tf.io.gfile.glob(f'{folder}/events.out.*'))


def _scalars(folder):
  values = []
  for path in tf.io.gfile.glob(f'{folder}/events.out.*'):
    for event in tf.compat.v1.train.summary_iterator(path):
      values += [(event.step, v.tag) for v in event.summary.value]
  return sorted(values)


def _trainer_writing_to(folder):
  """A Trainer holding only what `_write_scalars` (the per-loop summary write) uses."""
  trainer = loop.Trainer.__new__(loop.Trainer)
  trainer.writer = run_dir.summary_writer(folder)
  trainer._flush_each_loop = run_dir.flushes_each_loop(folder)  # pylint: disable=protected-access
  trainer.learning_rate_fn, trainer._images = None, None  # pylint: disable=protected-access
  return trainer


@pytest.mark.parametrize('kind', ['local', 'remote'])
def test_summary_event_file_is_written_each_loop_only_on_a_local_disk(tmp_path, kind):
  folder = _folder(kind, tmp_path)
  tf.io.gfile.makedirs(folder)
  trainer = _trainer_writing_to(folder)
  sizes = []
  with trainer.writer.as_default():  # As Trainer.train: one summary context for all loops.
    for step in range(1, LOOPS + 1):  # Well within 30 s; 12 events, beyond TF's queue of 10.
      trainer._write_scalars(step, {'loss': float(step), 'acc': 0.5})  # pylint: disable=protected-access
      sizes.append(_event_bytes(folder))
  if kind == 'local':
    assert all(b > a for a, b in zip(sizes, sizes[1:])) and sizes[0] > 0, sizes
  else:
    assert len(set(sizes)) == 1, sizes  # Nothing uploaded while the loops ran.
  # Leaving the context flushes (Trainer.train's end): nothing is lost.
  assert _scalars(folder) == sorted((s, t) for s in range(1, LOOPS + 1)
                                    for t in ('train/acc', 'train/loss'))


def _refreshed(path):
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)['refreshed']


@pytest.mark.parametrize('kind', ['local', 'remote'])
def test_lease_renewals_per_loop(tmp_path, kind, monkeypatch):
  folder = _folder(kind, tmp_path)
  lock = run_dir.RunLock(folder, lease_s=300).acquire()
  writes = []
  rewrite = run_dir.RunLock._rewrite  # pylint: disable=protected-access
  # Counts the renewals; on ram:// (which does not truncate a rewritten file) only counts.
  monkeypatch.setattr(run_dir.RunLock, '_rewrite', lambda self: (
      writes.append(self.me.refreshed), kind == 'local' and rewrite(self)))
  try:
    for _ in range(LOOPS):  # The loop-boundary renewals, well within 30 s.
      lock.refresh()
    assert len(writes) == (LOOPS if kind == 'local' else 0), writes
    if kind == 'local':
      assert _refreshed(lock.path) == writes[-1]
    if kind == 'remote':
      # 30 s after the last renewal the next loop renews it (once), as does the lease thread.
      lock.me = dataclasses.replace(lock.me, refreshed=lock.me.refreshed - 30.5)
      lock.refresh()
      lock.refresh()
      assert len(writes) == 1
      lock.refresh(force=True)
      assert len(writes) == 2
  finally:
    lock.release()
  assert not tf.io.gfile.exists(lock.path)


def test_a_short_lease_on_a_remote_dir_is_still_renewed_four_times_per_lease():
  lock = run_dir.RunLock(_folder('remote', None), lease_s=20)
  assert lock.write_interval_s == 5.0
