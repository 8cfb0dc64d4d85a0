"""The layout of a model_dir (every file and folder name in it, and the functions that build
those paths), and its guards: one training run at a time (a lock file), its flags.json.

A model_dir belongs to one training run. Training takes `model_dir/LOCK` before
it writes anything; the file names the holder (host, pid, start time) and is a lease: the holder
rewrites its `refreshed` time at every loop boundary and from a background thread every quarter of
`lease_s`. A second run on the same folder fails at once naming that holder; a lock whose process
is dead on this host, or whose lease has expired (no refresh for `lease_s` seconds, by both the
recorded time and the file's modification time), is taken over with a warning, whatever host wrote
it (on gs:// and other remote file systems the loop boundary renews it at most every
REMOTE_WRITE_INTERVAL_S). On a local disk the lock is created atomically (a hard link that fails if the name exists); on
gs:// and other remote file systems it is best effort: written, then read back, so two runs started
within the same second may both proceed.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from typing import Dict, Optional

import tensorflow as tf

from tf_simclr.config import LOCK_LEASE_S, ConfigError
from tf_simclr.errors import first_line

log = logging.getLogger(__name__)

LOCK_FILE = 'LOCK'
FLAGS_FILE = 'flags.json'


class ModelDirError(ConfigError):
  """model_dir cannot be used (a file, not writable, held by another run)."""


def _is_local(path: str) -> bool:
  return '://' not in path


# On a remote model_dir (gs:// or any other non-local file system) each write of an object is a
# whole upload, and GCS allows about one write per second per object: the training loop's
# summary flushes and lease renewals happen at most this often there (every loop on a local disk).
REMOTE_WRITE_INTERVAL_S = 30.0
# Summary events held between two flushes of a remote event file (beyond this many it flushes
# early; a loop writes about a dozen).
REMOTE_SUMMARY_QUEUE = 10000


def summary_writer(folder: str):
  """A tf.summary file writer for `folder`; on a remote file system it flushes at most every
  REMOTE_WRITE_INTERVAL_S (and when closed or flushed explicitly), not at each write."""
  if _is_local(folder):
    return tf.summary.create_file_writer(folder)
  return tf.summary.create_file_writer(folder, max_queue=REMOTE_SUMMARY_QUEUE,
                                       flush_millis=int(REMOTE_WRITE_INTERVAL_S * 1000))


def flushes_each_loop(folder: str) -> bool:
  """Whether the training loop flushes its summaries in `folder` after every loop (local
  disks); remote writers flush on their own timer (summary_writer)."""
  return _is_local(folder)


def check_usable(model_dir: str, create: bool) -> None:
  """Raises ModelDirError unless model_dir is a folder (created when `create`) we can write."""
  if tf.io.gfile.exists(model_dir) and not tf.io.gfile.isdir(model_dir):
    raise ModelDirError(f'--model_dir={model_dir} is a file, not a folder: pass a folder path '
                        '(it is created if missing).')
  if not create:
    return
  try:
    tf.io.gfile.makedirs(model_dir)
  except (tf.errors.OpError, OSError) as e:
    raise ModelDirError(f'--model_dir={model_dir} cannot be created ({type(e).__name__}: '
                        f'{first_line(e)}): choose a folder you can write to.') from e
  if _is_local(model_dir) and not os.access(model_dir, os.W_OK | os.X_OK):
    raise ModelDirError(f'--model_dir={model_dir} is not writable: fix its permissions or '
                        'choose another folder.')


def entries(model_dir: str) -> Optional[frozenset]:
  """The names in model_dir now (None: it does not exist): what `restore_entries` goes back to."""
  if not tf.io.gfile.isdir(model_dir):
    return None
  return frozenset(tf.io.gfile.listdir(model_dir))


def restore_entries(model_dir: str, before: Optional[frozenset]) -> bool:
  """Removes what a refused run added to model_dir (and model_dir, if it made it), unless the run
  saved a checkpoint, which is progress to keep. Returns whether it removed anything."""
  added = set(entries(model_dir) or ()) - set(before or ())
  if any(checkpoint_index_step(name.rstrip('/')) is not None for name in added):
    return False
  for name in added:
    path = os.path.join(model_dir, name.rstrip('/'))
    if tf.io.gfile.isdir(path):
      tf.io.gfile.rmtree(path)
    else:
      tf.io.gfile.remove(path)
  if before is None and tf.io.gfile.isdir(model_dir) and not tf.io.gfile.listdir(model_dir):
    tf.io.gfile.rmtree(model_dir)
    return True
  return bool(added)


@dataclasses.dataclass(frozen=True)
class Holder:
  """Who holds a lock."""
  host: str
  pid: int
  started: str
  token: str = ''
  # Lease: the holder's last refresh (unix time) and its lease length; 0 in old lock files.
  refreshed: float = 0.0
  lease_s: float = 0.0

  def describe(self) -> str:
    return f'host {self.host}, pid {self.pid}, started {self.started}'

  def lease_expired(self, mtime: Optional[float], now: float) -> bool:
    """True when neither the recorded refresh nor the file's mtime is within the lease."""
    if self.lease_s <= 0:
      return False  # A lock without a lease (older version): only the same-host pid rule.
    last = max(self.refreshed, mtime or 0.0)
    return now - last > self.lease_s


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Alive, owned by someone else.
  return True


def _read_holder(path: str) -> Optional[Holder]:
  try:
    with tf.io.gfile.GFile(path) as f:
      record = json.load(f)
    return Holder(host=str(record['host']), pid=int(record['pid']),
                  started=str(record['started']), token=str(record.get('token', '')),
                  refreshed=float(record.get('refreshed', 0.0)),
                  lease_s=float(record.get('lease_s', 0.0)))
  except (tf.errors.NotFoundError, FileNotFoundError):
    return None
  except (ValueError, KeyError, TypeError):
    return Holder(host='?', pid=-1, started='? (unreadable lock file)')


def _mtime(path: str) -> Optional[float]:
  try:
    return tf.io.gfile.stat(path).mtime_nsec / 1e9
  except (tf.errors.OpError, OSError):
    return None


class LockLostError(ModelDirError):
  """Another run took over this run's lock (its lease expired while this run was alive)."""


class RunLock:
  """model_dir/LOCK held by this process for one training run (a context manager): a lease of
  `lease_s` seconds, refreshed by `refresh()` (each loop) and by a background thread."""

  def __init__(self, model_dir: str, lease_s: float = LOCK_LEASE_S):
    self.model_dir = model_dir
    self.path = os.path.join(model_dir, LOCK_FILE)
    self.lease_s = float(lease_s)
    self.me = Holder(host=socket.gethostname(), pid=os.getpid(),
                     started=datetime.datetime.now(datetime.timezone.utc).isoformat(
                         timespec='seconds'),
                     token=uuid.uuid4().hex, refreshed=time.time(), lease_s=self.lease_s)
    # Remote: no more than one renewal per REMOTE_WRITE_INTERVAL_S (and 4 per lease).
    self.write_interval_s = 0.0 if _is_local(self.path) else min(REMOTE_WRITE_INTERVAL_S,
                                                                 self.lease_s / 4)
    self.held = False
    self.lost_to: Optional[Holder] = None
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    self._write_lock = threading.Lock()

  def _payload(self) -> str:
    return json.dumps(dataclasses.asdict(self.me))

  def _create(self) -> bool:
    """Creates the lock file if absent; False when someone else's exists."""
    if _is_local(self.path):
      tmp = f'{self.path}.{self.me.token}'
      with open(tmp, 'w') as f:
        f.write(self._payload())
      try:
        os.link(tmp, self.path)  # Atomic: fails if the lock exists.
        return True
      except FileExistsError:
        return False
      finally:
        os.remove(tmp)
    if tf.io.gfile.exists(self.path):
      return False
    with tf.io.gfile.GFile(self.path, 'w') as f:
      f.write(self._payload())
    holder = _read_holder(self.path)  # Best effort: the last writer wins, the other sees it.
    return holder is not None and holder.token == self.me.token

  def acquire(self) -> 'RunLock':
    try:
      for _ in range(2):
        if self._create():
          self.held = True
          self._start_renewing()
          return self
        holder = _read_holder(self.path)
        if holder is None:
          continue  # Released meanwhile: try again.
        if holder.host == self.me.host and holder.pid == self.me.pid:
          log.info('Reusing the lock %s left by an earlier run in this process.', self.path)
          tf.io.gfile.remove(self.path)
          continue
        if holder.host == self.me.host and holder.pid > 0 and not _pid_alive(holder.pid):
          log.warning('Taking over the stale lock %s of a run that is gone (%s).', self.path,
                      holder.describe())
          tf.io.gfile.remove(self.path)
          continue
        mtime = _mtime(self.path)
        if holder.lease_expired(mtime, time.time()):
          last = max(holder.refreshed, mtime or 0.0)
          log.warning('Taking over the lock %s: its lease expired (%s; last refreshed %.0f s '
                      'ago, lease %g s), so that run is gone.', self.path, holder.describe(),
                      time.time() - last, holder.lease_s)
          if _read_holder(self.path) == holder:  # Not renewed or taken meanwhile.
            tf.io.gfile.remove(self.path)
          continue
        raise ModelDirError(
            f'--model_dir={self.model_dir} is in use by another training run ({holder.describe()}'
            f'; lock file {self.path}). Wait for it to finish or use another --model_dir. If that '
            'run is dead, its lock is taken over once its lease has expired'
            + (f' ({holder.lease_s:g} s after its last refresh)' if holder.lease_s > 0 else
               ' (this lock has no lease: delete the lock file)') + '.')
    except (tf.errors.PermissionDeniedError, PermissionError, OSError,
            tf.errors.OpError) as e:
      raise ModelDirError(f'--model_dir={self.model_dir} is not writable: cannot create '
                          f'{self.path} ({type(e).__name__}: {first_line(e)}).') from e
    raise ModelDirError(f'Could not take the lock {self.path}; try again.')

  def refresh(self, force: bool = False) -> None:
    """Renews the lease (rewrites `refreshed`); raises LockLostError if another run holds it.

    On a remote model_dir a call within `write_interval_s` of the last renewal does nothing
    (the training loop calls this at every loop boundary) unless `force`.
    """
    if (self.held and not force and
        time.time() - self.me.refreshed < self.write_interval_s):
      return
    if not self.held:
      if self.lost_to is not None:
        raise LockLostError(
            f'--model_dir={self.model_dir}: another run took over the lock {self.path} '
            f'({self.lost_to.describe()}) after this run failed to renew its lease of '
            f'{self.lease_s:g} s; stopping so that two runs do not write one model_dir. Raise '
            '--lock_lease_s if the file system stalls that long.')
      return
    with self._write_lock:
      holder = _read_holder(self.path)
      if holder is not None and holder.token != self.me.token:
        self.held, self.lost_to = False, holder
        return self.refresh()
      self.me = dataclasses.replace(self.me, refreshed=time.time())
      try:
        self._rewrite()
      except (tf.errors.OpError, OSError) as e:
        log.warning('Could not renew the lease of %s (%s: %s).', self.path, type(e).__name__,
                    first_line(e))

  def _rewrite(self) -> None:
    """Writes this holder's record over the lock file (a renewal)."""
    if _is_local(self.path):
      tmp = f'{self.path}.{self.me.token}'
      with open(tmp, 'w') as f:
        f.write(self._payload())
      os.replace(tmp, self.path)  # Atomic: the lock never disappears meanwhile.
    else:
      with tf.io.gfile.GFile(self.path, 'w') as f:
        f.write(self._payload())

  def _keep_renewing(self) -> None:
    while not self._stop.wait(self.lease_s / 4):
      try:
        self.refresh(force=True)
      except LockLostError as e:
        log.error('%s', e)  # The next loop boundary's refresh() raises it in the main thread.
        return

  def _start_renewing(self) -> None:
    self._stop.clear()
    self._thread = threading.Thread(target=self._keep_renewing, name='lock-lease', daemon=True)
    self._thread.start()

  def release(self) -> None:
    self._stop.set()
    if not self.held:
      return
    self.held = False
    holder = _read_holder(self.path)
    if holder is not None and holder.token == self.me.token:
      try:
        tf.io.gfile.remove(self.path)
      except (tf.errors.OpError, OSError):
        log.warning('Could not remove the lock file %s.', self.path)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def lock_token(model_dir: str) -> Optional[str]:
  """The unique id (token) of the run holding model_dir/LOCK, or None without a lock file.

  A multi-worker run's workers read it to prove they all see the chief's model_dir (one shared
  folder, not a folder per machine).
  """
  holder = _read_holder(os.path.join(model_dir, LOCK_FILE))
  return holder.token if holder is not None else None


def flags_path(model_dir: str) -> str:
  return os.path.join(model_dir, FLAGS_FILE)


def read_flags(model_dir: str) -> Optional[Dict]:
  """The flags.json of model_dir, or None."""
  path = flags_path(model_dir)
  if not tf.io.gfile.exists(path):
    return None
  try:
    with tf.io.gfile.GFile(path) as f:
      return json.load(f)
  except ValueError:
    log.warning('%s is not valid JSON; ignoring it.', path)
    return None


def write_flags(model_dir: str, flags: Dict) -> str:
  path = flags_path(model_dir)
  with tf.io.gfile.GFile(path, 'w') as f:
    json.dump(flags, f, indent=2, sort_keys=True)
  return path


def find_flags_json(path: Optional[str]) -> Optional[str]:
  """flags.json of the run that wrote `path` (a checkpoint prefix, a model_dir or an export)."""
  if not path:
    return None
  candidates = []
  path = path.rstrip('/')
  for _ in range(4):  # prefix -> model_dir; model_dir/saved_model/<step> -> model_dir
    candidates.append(path if tf.io.gfile.isdir(path) else os.path.dirname(path))
    path = os.path.dirname(path)
  for folder in candidates:
    flags_path = os.path.join(folder, FLAGS_FILE)
    if folder and tf.io.gfile.exists(flags_path):
      return flags_path
  return None


# ---- Checkpoints: model_dir/ckpt-N.{index,data-*}; a save in progress writes ckpt-N_temp*; a
# damaged checkpoint is set aside as damaged-ckpt-N.* (then damaged-ckpt-N.2.*, ...).
CHECKPOINT_NAME = 'ckpt'
_CHECKPOINT_INDEX_RE = re.compile(rf'^{CHECKPOINT_NAME}-(\d+)\.index$')
_TEMP_RE = re.compile(rf'^{CHECKPOINT_NAME}-\d+_temp')
TEMP_GLOB = f'{CHECKPOINT_NAME}-*_temp'
DAMAGED_PREFIX = 'damaged-'
CHECKPOINT_INDEX_FILE = 'checkpoint'  # tf.train.CheckpointManager's index of the newest


def checkpoint_index_file(model_dir: str) -> str:
  return os.path.join(model_dir, CHECKPOINT_INDEX_FILE)


def checkpoint_index_step(name: str) -> Optional[int]:
  """N of a file named `ckpt-N.index`, else None."""
  m = _CHECKPOINT_INDEX_RE.match(name)
  return int(m.group(1)) if m else None


def is_unfinished_save(name: str) -> bool:
  """Whether a model_dir entry is the `ckpt-N_temp*` folder of a save that did not finish."""
  return bool(_TEMP_RE.match(name))


def damaged_name(path: str, copy: int = 1) -> str:
  """`damaged-<name>` beside `path` (copy 1), else `damaged-<name>.<copy>`."""
  folder, base = os.path.split(path)
  return os.path.join(folder, DAMAGED_PREFIX + base + (f'.{copy}' if copy > 1 else ''))


# ---- Exports: model_dir/saved_model/<step>/saved_model.pb.
EXPORT_SUBDIR = 'saved_model'
SAVED_MODEL_FILE = 'saved_model.pb'


def export_root(model_dir: str) -> str:
  return os.path.join(model_dir, EXPORT_SUBDIR)


def export_dir(model_dir: str, step: int) -> str:
  """model_dir/saved_model/<step>."""
  return os.path.join(export_root(model_dir), str(int(step)))


# ---- Evaluation: result.json (the latest) and result_<step>.json; summaries of a named eval
# (--eval_name) in eval_<name>/.
RESULT_FILE = 'result.json'


def result_path(model_dir: str, step: Optional[int] = None) -> str:
  """model_dir/result.json, or model_dir/result_<step>.json."""
  return os.path.join(model_dir, RESULT_FILE if step is None else f'result_{step}.json')


def eval_summary_dir(model_dir: str, eval_name: str = '') -> str:
  """Where eval summaries go: model_dir, or model_dir/eval_<name> for a named eval."""
  return os.path.join(model_dir, f'eval_{eval_name}') if eval_name else model_dir


# ---- The labelled subset a --train_label_fraction run chose (label_subset.json), and the labels
# cache a TFDS split keeps in its dataset folder (outside model_dir).
LABEL_SUBSET_FILE = 'label_subset.json'


def label_subset_path(model_dir: str) -> str:
  return os.path.join(model_dir, LABEL_SUBSET_FILE)


def labels_cache_path(dataset_dir: str, split: str) -> str:
  """<TFDS dataset folder>/tf_simclr_labels-<split>.npy (the split's labels, read once)."""
  safe = ''.join(c if c.isalnum() or c in '-_.' else '_' for c in split)
  return os.path.join(dataset_dir, f'tf_simclr_labels-{safe}.npy')


# ---- --mode=embed: model_dir/embeddings/<split>/{features.npy, labels.npy, paths.txt}.
EMBEDDINGS_DIR = 'embeddings'
FEATURES_FILE = 'features.npy'
LABELS_FILE = 'labels.npy'
PATHS_FILE = 'paths.txt'


def embeddings_dir(model_dir: str, split: str) -> str:
  """model_dir/embeddings/<split> (a split spec such as train[:90%] is kept as the name)."""
  return os.path.join(model_dir, EMBEDDINGS_DIR, split.replace('/', '_'))


# Beside them, what --mode=embed writes for TensorBoard's projector (`tensorboard --logdir
# MODEL_DIR`, Projector tab) and what --mode=neighbors / --mode=duplicates write.
PROJECTOR_CHECKPOINT_NAME = 'projector'  # projector-1.{index,data-*} + `checkpoint`
PROJECTOR_METADATA_FILE = 'metadata.tsv'
PROJECTOR_SPRITE_FILE = 'sprite.png'
NEIGHBORS_CSV = 'neighbors.csv'
NEIGHBORS_PNG = 'neighbors.png'
DUPLICATES_CSV = 'duplicates.csv'
DUPLICATES_PNG = 'duplicates.png'
# --mode=preview_augment: model_dir/augment_preview.png.
AUGMENT_PREVIEW_FILE = 'augment_preview.png'


def augment_preview_path(model_dir: str) -> str:
  return os.path.join(model_dir, AUGMENT_PREVIEW_FILE)
