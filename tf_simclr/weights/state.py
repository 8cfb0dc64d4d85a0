"""A training run's checkpoints: precedence, intact fallback, saving.

One place decides where weights come from: resume from `--model_dir` if it holds a checkpoint
(weights, optimizer slots, step, BN statistics), else initialise the model from `--checkpoint`
(through `match.load`), else start from scratch. The resume is checked by the same matcher first,
so a model_dir of another architecture is the one mismatch error, not a silent partial restore.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Iterable, List, Optional, Sequence, Tuple

import tensorflow as tf
from google.protobuf import text_format

from tf_simclr import precision as precision_lib
from tf_simclr import run_dir
from tf_simclr.errors import CheckpointMismatchError, UserError, first_line
from tf_simclr.weights import match as match_lib
from tf_simclr.weights import source as source_lib
from tf_simclr.weights.source import checkpoint_step, find_checkpoints

log = logging.getLogger(__name__)

_RESTORE_ERRORS = (tf.errors.OpError, IndexError, ValueError, OSError, RuntimeError,
                   tf.errors.DataLossError)


class NoIntactCheckpointError(UserError, RuntimeError):
  """model_dir holds checkpoints of a run, but none can be read."""


class OptimizerMismatchError(UserError, ValueError):
  """A checkpoint's optimizer slots do not fit this run's optimizer (--optimizer changed)."""


class CheckpointSaveError(UserError, RuntimeError):
  """A checkpoint could not be written (disk full, permissions); the message names model_dir."""


def clean_temp_folders(model_dir: str) -> List[str]:
  """Removes `ckpt-N_temp*` folders left by a save that was killed or ran out of disk."""
  removed = []
  if not tf.io.gfile.isdir(model_dir):
    return removed
  for name in tf.io.gfile.listdir(model_dir):
    name = name.rstrip('/')
    if run_dir.is_unfinished_save(name):
      path = os.path.join(model_dir, name)
      if tf.io.gfile.isdir(path):
        tf.io.gfile.rmtree(path)
      else:
        tf.io.gfile.remove(path)
      removed.append(path)
  if removed:
    log.warning('Removed %d unfinished checkpoint folder(s) of an interrupted save: %s',
                len(removed), ', '.join(removed))
  return removed


def _damaged_name(path: str) -> str:
  """A free name for a damaged file or checkpoint prefix beside it: `damaged-<name>`, else
  `damaged-<name>.2`, `.3`, ... (the same step can be damaged again after a retrain); nothing
  existing is named `<result>` or `<result>.*`, so each copy stays whole and restorable."""
  copy = 1
  target = run_dir.damaged_name(path)
  while tf.io.gfile.exists(target) or tf.io.gfile.glob(target + '.*'):
    copy += 1
    target = run_dir.damaged_name(path, copy)
  return target


def _set_aside(prefix: str) -> List[str]:
  """Renames the files of a damaged checkpoint to a damaged-ckpt-N prefix no other file has, so
  nothing overwrites them, an earlier damaged copy of the same step included."""
  target = _damaged_name(prefix)
  moved = []
  for path in tf.io.gfile.glob(prefix + '.*'):
    moved.append(target + path[len(prefix):])
    tf.io.gfile.rename(path, moved[-1], overwrite=False)
  return moved


class TrainState:
  """Model + optimizer + step under one CheckpointManager in `model_dir`.

  `save_dir` differs from `model_dir` only on non-chief multi-worker processes, which must take
  part in saving but whose files are throw-away; every process resumes from `model_dir`.
  """

  def __init__(self, model, optimizer, model_dir: str, max_to_keep: int,
               save_dir: Optional[str] = None, allow_optimizer_change: bool = False,
               optimizer_changed: bool = False):
    self.model = model
    self.optimizer = optimizer
    self.model_dir = model_dir
    self.save_dir = save_dir or model_dir
    self.max_to_keep = max_to_keep
    # A resume whose optimizer slots differ (another --optimizer) restores the weights and the
    # step only when allowed (--allow_flag_changes), else it is an OptimizerMismatchError.
    # `optimizer_changed` (flags.json records another --optimizer) also drops slots that happen to
    # have the same paths.
    self.allow_optimizer_change = allow_optimizer_change
    self.optimizer_changed = optimizer_changed
    # The wrapped optimizer under loss scaling, so the optimizer slots sit at the same paths
    # whatever the precision; the loss scale is an extra, optional entry (see precision.py).
    inner = precision_lib.inner_optimizer(optimizer)
    self._objects = dict(model=model, optimizer=inner, global_step=optimizer.iterations)
    self._loss_scale = precision_lib.loss_scale(optimizer)
    extra = {'loss_scale': self._loss_scale} if self._loss_scale is not None else {}
    self.checkpoint = tf.train.Checkpoint(**self._objects, **extra)
    self.manager = self._make_manager()

  def _optimizer_mismatch(self, found: source_lib.Source) -> Optional[str]:
    """Why the checkpoint's optimizer slots do not fit ours (None when they do)."""
    if self.optimizer_changed:
      return 'flags.json records another --optimizer'
    saved = set(source_lib.variable_paths(found.reader, 'optimizer', skip_aliases=False))
    ours = set(match_lib.object_variable_paths(self._objects['optimizer'], 'optimizer'))
    if saved == ours:
      return None
    extra, missing = sorted(saved - ours), sorted(ours - saved)
    return (f'its optimizer state has {len(saved)} variables, this run\'s optimizer {len(ours)}'
            + (f' (e.g. {missing[0]} is not in the checkpoint)' if missing else '')
            + (f' (e.g. {extra[0]} is not in this optimizer)' if extra and not missing else ''))

  def _make_manager(self) -> tf.train.CheckpointManager:
    make = lambda: tf.train.CheckpointManager(self.checkpoint, directory=self.save_dir,
                                              max_to_keep=self.max_to_keep,
                                              checkpoint_name=run_dir.CHECKPOINT_NAME)
    try:
      return make()
    except (UnicodeDecodeError, text_format.ParseError, tf.errors.OpError) as e:
      # An unreadable `checkpoint` index file: checkpoints are found by listing the folder.
      index = run_dir.checkpoint_index_file(self.save_dir)
      if not tf.io.gfile.exists(index):
        raise
      aside = _damaged_name(index)  # Never overwrites an earlier damaged copy.
      tf.io.gfile.rename(index, aside, overwrite=False)
      log.warning('The checkpoint index file %s cannot be read (%s); renamed it to %s, the '
                  'checkpoints are found by listing the folder.', index, type(e).__name__, aside)
      return make()

  @property
  def step(self) -> int:
    return int(self.optimizer.iterations.numpy())

  def save(self) -> str:
    """Saves ckpt-<step>; a failed write raises CheckpointSaveError naming the folder."""
    try:
      return self.manager.save(checkpoint_number=self.step)
    except (tf.errors.OpError, OSError) as e:
      kept = find_checkpoints(self.model_dir)
      raise CheckpointSaveError(
          f'Could not write checkpoint {run_dir.CHECKPOINT_NAME}-{self.step} to {self.save_dir} '
          f'({type(e).__name__}: {first_line(e)}). '
          'Is the disk full or the folder not writable? Free space and rerun the same command: '
          + (f'it resumes from {os.path.basename(kept[0])}' if kept else 'it starts again')
          + f' and removes the unfinished {run_dir.TEMP_GLOB} folder.') from e

  def _restore_intact(self) -> Optional[str]:
    """Restores the newest readable checkpoint of model_dir; None when there is none at all.

    A checkpoint that fails to read (truncated, half-written) is logged, renamed to
    damaged-ckpt-N.* and the next older one is tried. A checkpoint of another architecture is
    an error, not something to skip.
    """
    candidates = find_checkpoints(self.model_dir)
    indexed = source_lib.latest_indexed(self.model_dir)
    if candidates and indexed != candidates[0]:
      log.warning('The checkpoint index file of %s %s; found %s by listing the folder.',
                  self.model_dir, f'names {indexed}' if indexed else 'is missing or unusable',
                  ', '.join(os.path.basename(c) for c in candidates))
    damaged = []
    for path in candidates:
      try:
        found = source_lib.resolve(path)
      except CheckpointMismatchError:
        raise
      except _RESTORE_ERRORS as e:
        damaged.append((path, e))
        continue
      if not found.has_values:
        damaged.append((path, ValueError('its object graph or values cannot be read')))
        continue
      match_lib.match(
          self.model, found,
          lead=f'--model_dir={self.model_dir} holds a run of another architecture ({path})',
          advice='Resume it with its own flags (its flags.json), or use a new --model_dir.')
      checkpoint = self.checkpoint
      mismatch = self._optimizer_mismatch(found)
      if mismatch and not self.allow_optimizer_change:
        raise OptimizerMismatchError(
            f'--model_dir={self.model_dir}: {path} was written with another optimizer '
            f'({mismatch}); the checkpoint is intact. Resume with the run\'s own --optimizer (its '
            'flags.json), start from these weights with --checkpoint=' + self.model_dir +
            ' and a new --model_dir, or pass --allow_flag_changes to continue from its weights '
            'and step with fresh optimizer state.')
      if mismatch:
        log.warning('Restoring %s without its optimizer state (%s; --allow_flag_changes): '
                    'weights and step restored, optimizer slots start fresh.', path, mismatch)
        objects = {k: v for k, v in self._objects.items() if k != 'optimizer'}
        checkpoint = tf.train.Checkpoint(**objects)
      elif self._loss_scale is not None and not source_lib.variable_paths(found.reader,
                                                                         'loss_scale'):
        # A float32/bfloat16 run resumed in float16: the loss scale starts at its initial value.
        checkpoint = tf.train.Checkpoint(**self._objects)
      try:
        checkpoint.restore(path).assert_existing_objects_matched()
      except _RESTORE_ERRORS as e:
        damaged.append((path, e))
        continue
      break
    else:
      path = None
    for bad, error in damaged:
      log.warning('Checkpoint %s is damaged (%s: %s); %s', bad, type(error).__name__,
                  first_line(error),
                  f'falling back to {path}.' if path else 'no older intact one.')
    if candidates and path is None:
      raise NoIntactCheckpointError(
          f'--model_dir={self.model_dir} holds checkpoints of a run '
          f'({", ".join(os.path.basename(c) for c in candidates)}) but none can be read, so the '
          'run cannot resume and is not restarted from step 0 over them. Move them away (or use '
          'a new --model_dir) to start again.')
    if path is None:
      return None
    if self.save_dir == self.model_dir:
      for bad, _ in damaged:
        if checkpoint_step(bad) > checkpoint_step(path):
          log.warning('Renamed the damaged checkpoint files to %s so that nothing overwrites '
                      'them.', ', '.join(_set_aside(bad)))
      if damaged or indexed != path:
        # Rewrite the index from what is on disk so the manager keeps rotating old checkpoints.
        intact = [c for c in reversed(find_checkpoints(self.model_dir))
                  if checkpoint_step(c) <= checkpoint_step(path)]
        now = time.time()
        tf.compat.v1.train.update_checkpoint_state(
            self.model_dir, path, intact,
            all_model_checkpoint_timestamps=[now - len(intact) + i for i in range(len(intact))],
            last_preserved_timestamp=now - len(intact) - 1)
        self.manager = self._make_manager()
    return path

  def restore_or_initialize(self, init_checkpoint: Optional[str],
                            fresh_ok: Sequence[str] = ()) -> str:
    """Applies the precedence rule; returns 'resumed', 'initialized' or 'scratch'.

    The model and the optimizer must already be built (Keras 3 has no deferred restore).
    `init_checkpoint` is loaded strictly (`match.load`: ours, an export of ours, or the
    original's weights); heads under `fresh_ok` may stay as built.
    """
    latest = self._restore_intact()
    if latest:
      log.info('Resuming from %s at step %d (weights, optimizer state and step).', latest,
               self.step)
      return 'resumed'
    if init_checkpoint:
      log.info('Initialising the model from --checkpoint=%s', init_checkpoint)
      report = match_lib.load(self.model, init_checkpoint, fresh_ok=fresh_ok)
      log.info('Restored %d variables.', report.restored)
      if report.fresh:
        log.info('Left freshly initialised (new for this task): %s', ', '.join(report.fresh))
      if report.ignored:
        log.info('Not used from the checkpoint: %d variables (e.g. %s)', len(report.ignored),
                 report.ignored[0])
      return 'initialized'
    return 'scratch'


def load_newest_intact(model, model_dir: str, fresh_ok: Sequence[str] = (),
                       lead: str = '', newest: Optional[str] = None) -> Optional[Tuple[str, int]]:
  """Loads the newest readable checkpoint of model_dir (`newest` or older) into `model`, for the
  read-only modes (eval, export, probe); returns (its path, its global step), or None when
  model_dir holds none.

  A checkpoint that cannot be read (truncated, half-copied) is logged and the next older one is
  loaded instead; nothing is renamed, since a training run may own the folder. A checkpoint of
  another architecture raises CheckpointMismatchError (`lead` opens its message, `{}` -> path).
  """
  candidates = find_checkpoints(model_dir)
  if newest is not None:
    candidates = [c for c in candidates if checkpoint_step(c) <= checkpoint_step(newest)]
  for i, path in enumerate(candidates):
    try:
      found = source_lib.resolve(path)
      match_lib.load(model, found, fresh_ok=fresh_ok, lead=lead.format(path) or None)
      return path, source_lib.read_global_step(found)
    except CheckpointMismatchError:
      raise
    except _RESTORE_ERRORS + (UserError,) as e:
      older = candidates[i + 1] if i + 1 < len(candidates) else None
      log.warning('Checkpoint %s is damaged (%s: %s); %s', path, type(e).__name__, first_line(e),
                  f'trying {os.path.basename(older)}.' if older else 'no older one.')
  if candidates:
    raise NoIntactCheckpointError(
        f'--model_dir={model_dir}: none of its checkpoints '
        f'({", ".join(os.path.basename(c) for c in candidates)}) can be read.')
  return None


def wait_for_checkpoints(model_dir: str, timeout: float = 0,
                         poll_secs: float = 15) -> Iterable[str]:
  """Yields the newest checkpoint of `model_dir` each time a new one appears (eval follows training).

  Logs when it starts waiting and every minute while it waits; stops after `timeout` seconds
  (0: never) without a new checkpoint. Never creates model_dir.
  """
  last = None
  while True:
    limit = f'timeout {timeout:g} s' if timeout else 'no timeout'
    log.info('Waiting for a checkpoint in %s (%s).', model_dir, limit)
    start = time.time()
    next_note = start + 60
    while True:
      found = find_checkpoints(model_dir)
      if found and found[0] != last:
        break
      now = time.time()
      if timeout and now - start >= timeout:
        return
      if now >= next_note:
        log.info('Still waiting for a checkpoint in %s (%d s so far, %s).', model_dir,
                 now - start, limit)
        next_note += 60
      remaining = (start + timeout - now) if timeout else poll_secs
      time.sleep(max(0.1, min(poll_secs, remaining)))
    last = found[0]
    yield last
