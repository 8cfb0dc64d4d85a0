"""Guards of a model_dir: one training run at a time (a lock file), its flags.json, its checks.

A model_dir belongs to one training run. Training takes `model_dir/LOCK` before
it writes anything; the file names the holder (host, pid, start time) and is a lease: the holder
rewrites its `refreshed` time at every loop boundary and from a background thread every quarter of
`lease_s`. A second run on the same folder fails at once naming that holder; a lock whose process
is dead on this host, or whose lease has expired (no refresh for `lease_s` seconds, by both the
recorded time and the file's modification time), is taken over with a warning, whatever host wrote
it. On a local disk the lock is created atomically (a hard link that fails if the name exists); on
gs:// and other remote file systems it is best effort: written, then read back, so two runs started
within the same second may both proceed.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Dict, List, Optional, Tuple

import tensorflow as tf

from tf_simclr.config import ConfigError, same_value

log = logging.getLogger(__name__)

LOCK_FILE = 'LOCK'
DEFAULT_LEASE_S = 300.0
FLAGS_FILE = 'flags.json'


class ModelDirError(ConfigError):
  """model_dir cannot be used (a file, not writable, held by another run)."""


def _is_local(path: str) -> bool:
  return '://' not in path


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
                        f'{_first_line(e)}): choose a folder you can write to.') from e
  if _is_local(model_dir) and not os.access(model_dir, os.W_OK | os.X_OK):
    raise ModelDirError(f'--model_dir={model_dir} is not writable: fix its permissions or '
                        'choose another folder.')


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else ''


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

  def __init__(self, model_dir: str, lease_s: float = DEFAULT_LEASE_S):
    self.model_dir = model_dir
    self.path = os.path.join(model_dir, LOCK_FILE)
    self.lease_s = float(lease_s)
    self.me = Holder(host=socket.gethostname(), pid=os.getpid(),
                     started=datetime.datetime.now(datetime.timezone.utc).isoformat(
                         timespec='seconds'),
                     token=uuid.uuid4().hex, refreshed=time.time(), lease_s=self.lease_s)
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
                          f'{self.path} ({type(e).__name__}: {_first_line(e)}).') from e
    raise ModelDirError(f'Could not take the lock {self.path}; try again.')

  def refresh(self) -> None:
    """Renews the lease (rewrites `refreshed`); raises LockLostError if another run holds it."""
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
        if _is_local(self.path):
          tmp = f'{self.path}.{self.me.token}'
          with open(tmp, 'w') as f:
            f.write(self._payload())
          os.replace(tmp, self.path)  # Atomic: the lock never disappears meanwhile.
        else:
          with tf.io.gfile.GFile(self.path, 'w') as f:
            f.write(self._payload())
      except (tf.errors.OpError, OSError) as e:
        log.warning('Could not renew the lease of %s (%s: %s).', self.path, type(e).__name__,
                    _first_line(e))

  def _keep_renewing(self) -> None:
    while not self._stop.wait(self.lease_s / 4):
      try:
        self.refresh()
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


def read_flags(model_dir: str) -> Optional[Dict]:
  """The flags.json of model_dir, or None."""
  path = os.path.join(model_dir, FLAGS_FILE)
  if not tf.io.gfile.exists(path):
    return None
  try:
    with tf.io.gfile.GFile(path) as f:
      return json.load(f)
  except ValueError:
    log.warning('%s is not valid JSON; ignoring it.', path)
    return None


def write_flags(model_dir: str, flags: Dict) -> str:
  path = os.path.join(model_dir, FLAGS_FILE)
  with tf.io.gfile.GFile(path, 'w') as f:
    json.dump(flags, f, indent=2, sort_keys=True)
  return path


# ---- The run's record for --mode=eval|export|probe|embed (README, "What lands in --model_dir").
# Architecture and head flags: filled from the record when not given; a given value must agree.
RECORD_MUST_AGREE = ('resnet_depth', 'width_multiplier', 'sk_ratio', 'se_ratio', 'proj_head_mode',
                     'proj_out_dim', 'num_proj_layers', 'ft_proj_selector')
# The rest of the model and the data: filled from the record when not given; a given value wins
# (e.g. --dataset=images:OTHER to embed another folder, --eval_split=test).
RECORD_FILLS = ('train_mode', 'lineareval_while_pretraining', 'image_size', 'batch_norm_decay',
                'global_bn', 'precision', 'dataset', 'data_dir', 'train_split', 'eval_split',
                'skip_bad_images', 'color_jitter_impl')
EMBEDDINGS_DIR = 'embeddings'
FEATURES_FILE = 'features.npy'
LABELS_FILE = 'labels.npy'
PATHS_FILE = 'paths.txt'


def read_record(model_dir: Optional[str], checkpoint: Optional[str] = None
                ) -> Tuple[Optional[Dict], str]:
  """(flag values the run recorded, where from) for a mode that reads a run (not training).

  In order: model_dir's flags.json; the flags.json of the run that wrote --checkpoint; the
  architecture read off --checkpoint's variables (`weights.original.describe`, works for ours and
  the original's weights). (None, '') when there is nothing to read.
  """
  if model_dir:
    stored = read_flags(model_dir)
    if stored is not None:
      return stored, os.path.join(model_dir, FLAGS_FILE)
  if not checkpoint:
    return None, ''
  from tf_simclr import teacher  # pylint: disable=g-import-not-at-top (imports config, models)
  from tf_simclr.weights import original  # pylint: disable=g-import-not-at-top
  path = teacher.find_flags_json(checkpoint)
  if path:
    with tf.io.gfile.GFile(path) as f:
      return json.load(f), path
  return original.describe_flags(original.describe(checkpoint)), f'the variables of {checkpoint}'


def fill_from_record(record: Dict, values: Dict, given, where: str) -> Dict:
  """The flag values to use: `values` with every record flag not in `given` taken from `record`.

  `values`: current values of the flags (defaults included); `given`: names set explicitly on
  the command line or a flagfile. Raises ConfigError naming both values when a given
  architecture/head flag contradicts the record.
  """
  out = dict(values)
  wrong = []
  for name in RECORD_MUST_AGREE + RECORD_FILLS:
    if name not in record or record[name] is None:
      continue
    if name not in given:
      # A distilled student is read as a fine-tuned model (same heads), without its teacher.
      out[name] = 'finetune' if (name, record[name]) == ('train_mode', 'distill') else record[name]
    elif name in RECORD_MUST_AGREE and not same_value(record[name], values[name]):
      wrong.append(f'--{name}={values[name]!r} here but {record[name]!r} in the run')
  if wrong:
    raise ConfigError(
        f'The flags contradict the run recorded in {where}: ' + '; '.join(wrong) +
        '. Drop these flags (they are read from the record), or use another --model_dir.')
  return out


def embeddings_dir(model_dir: str, split: str) -> str:
  """model_dir/embeddings/<split> (a split spec such as train[:90%] is kept as the name)."""
  return os.path.join(model_dir, EMBEDDINGS_DIR, split.replace('/', '_'))


# Flags a resumed training run must keep (the weights, optimizer state and step were made with
# them): changing one is an error unless --allow_flag_changes. Any other flag (--train_steps /
# --train_epochs, eval, logging, export and checkpoint intervals, paths) may change and is logged.
RESUME_FIXED_FLAGS = (
    'train_mode', 'dataset', 'train_split', 'train_label_fraction', 'label_fraction_seed',
    'train_batch_size', 'optimizer', 'momentum', 'learning_rate', 'learning_rate_scaling',
    'warmup_epochs', 'weight_decay', 'temperature', 'hidden_norm', 'distill_temperature',
    'distill_label_weight',
    # Architecture.
    'image_size', 'resnet_depth', 'width_multiplier', 'sk_ratio', 'se_ratio', 'proj_head_mode',
    'proj_out_dim', 'num_proj_layers', 'ft_proj_selector', 'fine_tune_after_block',
    'lineareval_while_pretraining', 'batch_norm_decay', 'global_bn')
HISTORY_KEY = 'history'
# Not compared: the record's own history and the override itself.
_NOT_COMPARED = (HISTORY_KEY, 'allow_flag_changes')


class FlagChangeError(ConfigError):
  """A resumed training run was given other values of flags its checkpoints depend on."""


def check_resume_flags(model_dir: str, stored: Dict, given: Dict, allow_changes: bool,
                       step: int) -> Tuple[Dict, List[str]]:
  """Compares a resumed run's flags with its flags.json (`stored`); the one place that does.

  Logs every differing flag (old -> new). Raises FlagChangeError naming each changed
  RESUME_FIXED_FLAGS entry unless `allow_changes`. Returns (the record to write: `given` plus
  the history of earlier values, each entry {'checkpoint_step': step, 'flags': {name: old}}, the
  names of the changed fixed flags). Flags absent from `stored` (an older record) are skipped.
  """
  changed = {name: (stored[name], value) for name, value in given.items()
             if name not in _NOT_COMPARED and name in stored
             and not same_value(stored[name], value)}
  for name, (old, new) in sorted(changed.items()):
    log.info('Resuming with a changed flag: --%s %r -> %r', name, old, new)
  fixed = [name for name in RESUME_FIXED_FLAGS if name in changed]
  if fixed and not allow_changes:
    listed = ', '.join(f'--{n} {changed[n][0]!r} -> {changed[n][1]!r}' for n in fixed)
    raise FlagChangeError(
        f'--model_dir={model_dir} holds checkpoints (up to step {step}) of a run made with other '
        f'values of flags it cannot change on a resume: {listed} (its {FLAGS_FILE} vs this '
        f'command). To start from these weights use --checkpoint={model_dir} with a new '
        '--model_dir; to continue anyway pass --allow_flag_changes; to resume the run, drop '
        'the changed flags.')
  if fixed:
    log.warning('Continuing with changed flags (--allow_flag_changes): %s; %s keeps the earlier '
                'values under "%s".', ', '.join(f'--{n}' for n in fixed), FLAGS_FILE, HISTORY_KEY)
  record = dict(given)
  history = list(stored.get(HISTORY_KEY) or [])
  if changed:
    history.append({'checkpoint_step': step,
                    'flags': {name: old for name, (old, _) in sorted(changed.items())}})
  if history:
    record[HISTORY_KEY] = history
  return record, fixed
