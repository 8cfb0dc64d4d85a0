"""model_dir/LOCK as a lease (run_dir.RunLock): expired leases are taken over from any host, a
live run (renewing from its background thread) never is, and a run that lost its lock stops."""

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from tf_simclr import run_dir

ROOT = __import__('conftest').PROJECT_ROOT


def _write_lock(folder, age_s, lease_s, host='other-host', pid=12345):
  """A lock of another host last renewed `age_s` seconds ago (record and mtime agree)."""
  path = folder / run_dir.LOCK_FILE
  then = time.time() - age_s
  path.write_text(json.dumps({'host': host, 'pid': pid, 'started': 'then', 'token': 'theirs',
                              'refreshed': then, 'lease_s': lease_s}))
  os.utime(path, (then, then))
  return path


def test_expired_lease_of_another_host_is_taken_over_with_a_warning(tmp_path, caplog):
  path = _write_lock(tmp_path, age_s=120, lease_s=60)
  with caplog.at_level(logging.WARNING):
    lock = run_dir.RunLock(str(tmp_path), lease_s=60).acquire()
  try:
    record = json.loads(path.read_text())
    assert record['pid'] == os.getpid() and record['lease_s'] == 60
    assert 'lease expired (host other-host, pid 12345' in caplog.text
  finally:
    lock.release()
  assert not path.exists()


@pytest.mark.parametrize('record_age, file_age', [(30, 30), (120, 30), (30, 120)])
def test_lease_within_its_time_by_record_or_file_time_is_not_taken_over(tmp_path, record_age,
                                                                         file_age):
  path = _write_lock(tmp_path, age_s=record_age, lease_s=60)
  then = time.time() - file_age
  os.utime(path, (then, then))
  with pytest.raises(run_dir.ModelDirError, match=r'host other-host, pid 12345.*lease has expired '
                     r'\(60 s after its last refresh\)'):
    run_dir.RunLock(str(tmp_path)).acquire()
  assert json.loads(path.read_text())['token'] == 'theirs'


@pytest.mark.slow
def test_live_run_on_another_host_keeps_its_lock_past_many_leases(tmp_path):
  """A process on 'another host' holds a 2 s lease; 6 s later it is still refused."""
  code = ('import socket, sys, time\n'
          'socket.gethostname = lambda: "other-host"\n'
          'from tf_simclr import run_dir\n'
          f'lock = run_dir.RunLock({str(tmp_path)!r}, lease_s=2).acquire()\n'
          'print("held", flush=True)\n'
          'time.sleep(60)\n')
  holder = subprocess.Popen([sys.executable, '-c', code], cwd=ROOT, stdout=subprocess.PIPE,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'), text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    time.sleep(6)
    with pytest.raises(run_dir.ModelDirError, match=f'host other-host, pid {holder.pid}'):
      run_dir.RunLock(str(tmp_path), lease_s=2).acquire()
    record = json.loads((tmp_path / run_dir.LOCK_FILE).read_text())
    assert record['pid'] == holder.pid and time.time() - record['refreshed'] < 6
  finally:
    holder.kill()
    holder.wait()
  # Killed (no release): the lease expires and another host's run takes over.
  time.sleep(2.5)
  lock = run_dir.RunLock(str(tmp_path), lease_s=2).acquire()
  lock.release()


def test_refresh_renews_the_lease_and_a_lost_lock_stops_the_run(tmp_path):
  lock = run_dir.RunLock(str(tmp_path), lease_s=600).acquire()
  path = tmp_path / run_dir.LOCK_FILE
  first = json.loads(path.read_text())['refreshed']
  time.sleep(0.05)
  lock.refresh()
  record = json.loads(path.read_text())
  assert record['refreshed'] > first and record['token'] == lock.me.token
  # Another run took it over (this one stalled past its lease): the next refresh raises.
  _write_lock(tmp_path, age_s=0, lease_s=600, host=socket.gethostname() + '-b', pid=999)
  with pytest.raises(run_dir.LockLostError, match='pid 999'):
    lock.refresh()
  lock.release()
  assert json.loads(path.read_text())['pid'] == 999  # not removed: it is not ours
