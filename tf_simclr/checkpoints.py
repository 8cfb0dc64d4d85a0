"""Checkpoint precedence and strict, structure-matched restores.

One place decides where weights come from (DESIGN rule 6): resume from `--model_dir` if it holds a
checkpoint (weights, optimizer slots, step, BN statistics), else initialise the model from
`--checkpoint`, else start from scratch.

Variables are matched by their *structural path* in the checkpoint's object graph
(`model/encoder/block_group1/...`), never by tensor key: a checkpoint that also holds a Keras 3
optimizer stores model variables under the optimizer's shorter path
(`optimizer/_trainable_variables/7`), and weights written by other code have other keys entirely.
A restore is strict: a variable of ours with no value, or a mismatched shape, is an error naming it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import tensorflow as tf

from tensorflow.core.protobuf import trackable_object_graph_pb2

log = logging.getLogger(__name__)

OBJECT_GRAPH_KEY = '_CHECKPOINTABLE_OBJECT_GRAPH'
ARCHITECTURE_FLAGS = ('--resnet_depth, --width_multiplier, --sk_ratio, --se_ratio, '
                      '--proj_head_mode, --num_proj_layers, --proj_out_dim')


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model; the message names the variables and the flags."""


def resolve_checkpoint_path(path: str) -> str:
  """Turns a checkpoint prefix or a directory into a checkpoint prefix, or raises."""
  if tf.io.gfile.isdir(path):
    variables_prefix = os.path.join(path, 'variables', 'variables')
    if tf.io.gfile.exists(variables_prefix + '.index'):
      return variables_prefix  # A SavedModel directory: its variables form a checkpoint.
    found = find_checkpoints(path)
    latest = tf.train.latest_checkpoint(path) or (found[0] if found else None)
    if latest is None:
      raise FileNotFoundError(
          f'--checkpoint={path} is a directory without a checkpoint or SavedModel: point it at '
          'a checkpoint prefix (e.g. model_dir/ckpt-1000), a model_dir, or a SavedModel folder.')
    return latest
  if not tf.io.gfile.exists(path + '.index'):
    raise FileNotFoundError(
        f'--checkpoint={path} not found: expected {path}.index (a checkpoint prefix such as '
        'model_dir/ckpt-1000), a model_dir, or a SavedModel folder.')
  return path


def checkpoint_variable_paths(reader: tf.train.CheckpointReader,
                              root_child: Optional[str] = None) -> Dict[str, str]:
  """Maps structural variable paths to tensor keys using the checkpoint's object graph.

  Paths are `/`-joined child names from the root (or from its child `root_child`, which is then
  the first path element), found breadth-first with children in sorted order, shortest first.
  """
  graph = trackable_object_graph_pb2.TrackableObjectGraph()
  graph.ParseFromString(reader.get_tensor(OBJECT_GRAPH_KEY))
  start = 0
  prefix = ''
  if root_child is not None:
    children = {c.local_name: c.node_id for c in graph.nodes[0].children}
    if root_child not in children:
      return {}
    start, prefix = children[root_child], root_child
  paths: Dict[str, str] = {}
  seen = {start}
  queue = collections.deque([(start, prefix)])
  while queue:
    node_id, path = queue.popleft()
    node = graph.nodes[node_id]
    for attr in node.attributes:
      if attr.name == 'VARIABLE_VALUE':
        paths[path] = attr.checkpoint_key
    for child in sorted(node.children, key=lambda c: c.local_name):
      if child.node_id not in seen:
        seen.add(child.node_id)
        queue.append((child.node_id, f'{path}/{child.local_name}' if path else child.local_name))
  return paths


def object_variable_paths(root, prefix: str) -> Dict[str, tf.Variable]:
  """Maps structural paths to the variables of a live trackable, walked like the checkpoint's."""
  view = tf.train.TrackableView(root)
  paths: Dict[str, tf.Variable] = {}
  seen = {id(root)}
  queue = collections.deque([(root, prefix)])
  while queue:
    obj, path = queue.popleft()
    if isinstance(obj, tf.Variable) or _is_keras_variable(obj):
      paths[path] = obj
      continue
    for name, child in sorted(view.children(obj).items()):
      if id(child) not in seen:
        seen.add(id(child))
        queue.append((child, f'{path}/{name}'))
  return paths


def _is_keras_variable(obj) -> bool:
  return hasattr(obj, 'assign') and hasattr(obj, 'path') and hasattr(obj, 'shape')


@dataclasses.dataclass
class RestoreReport:
  """What a restore did: counts and the variables left fresh on purpose."""
  restored: int
  fresh: List[str]
  ignored: List[str]


@dataclasses.dataclass
class Match:
  """How a checkpoint's variables line up with a model's (see `match_variables`)."""
  plan: List  # (variable, checkpoint key) pairs to assign
  fresh: List[str]  # our paths left as initialised on purpose (fresh_ok)
  unused: List[str]  # checkpoint paths with no variable of ours
  problems: List[str]  # what makes the restore impossible, for the error message


def _under(path: str, prefixes: Sequence[str]) -> bool:
  return any(path.startswith(f'model/{p}') for p in prefixes)


def match_variables(ours: Dict[str, tf.Variable], theirs: Dict[str, str],
                    shapes: Dict[str, List[int]], fresh_ok: Sequence[str] = (),
                    allow_extra_prefixes: Sequence[str] = (),
                    name: Callable[[str], str] = lambda path: path) -> Match:
  """Strictly pairs our variables (by structural path) with checkpoint keys, reading no values.

  `theirs` maps structural paths (in our naming) to tensor keys; `name` renders a path for
  messages. Variables under `fresh_ok` may be absent or of another shape; checkpoint paths under
  `fresh_ok` or `allow_extra_prefixes` may go unused.
  """
  missing, mismatched, fresh, plan = [], [], [], []
  for path, var in ours.items():
    key = theirs.get(path)
    if key is None:
      (fresh if _under(path, fresh_ok) else missing).append(path)
      continue
    have, want = list(shapes[key]), list(var.shape)
    if have != want:
      if _under(path, fresh_ok):
        fresh.append(path)
      else:
        mismatched.append(f'{name(path)}: checkpoint {have} vs model {want}')
      continue
    plan.append((var, key))
  unused = [p for p in theirs if p not in ours]
  extra = [name(p) for p in unused
           if not _under(p, tuple(fresh_ok) + tuple(allow_extra_prefixes))]
  problems = []
  for count, what, first in ((mismatched, 'with another shape', '; '),
                             (missing, 'of the model not in the checkpoint', ', '),
                             (extra, 'of the checkpoint the model lacks', ', ')):
    if count:
      problems.append(f'{len(count)} variable(s) {what}, first: ' + first.join(count[:5]))
  return Match(plan=plan, fresh=sorted(set(fresh)), unused=unused, problems=problems)


def restore_model_variables(model, path: str, fresh_ok: Sequence[str] = (),
                            allow_extra_prefixes: Sequence[str] = ()) -> RestoreReport:
  """Strictly restores `model` (tracked as `model` in the checkpoint) from a checkpoint of ours.

  fresh_ok: path prefixes below `model/` (e.g. 'supervised_head') that may stay as initialised
    when the checkpoint lacks them or holds them with another shape (a new head for a new task).
  allow_extra_prefixes: path prefixes below `model/` of the checkpoint that may go unused.
  Raises CheckpointMismatchError naming the first mismatched variables and the flags to fix.
  """
  prefix = resolve_checkpoint_path(path)
  reader = tf.train.load_checkpoint(prefix)
  theirs = checkpoint_variable_paths(reader, root_child='model')
  if not theirs:
    raise CheckpointMismatchError(
        f'{prefix} holds no `model` object: it was not written by tf-simclr. Weights written by '
        'google-research/simclr are read by tf_simclr.original_weights.')
  ours = object_variable_paths(model, 'model')
  match = match_variables(ours, theirs, reader.get_variable_to_shape_map(), fresh_ok,
                          allow_extra_prefixes)
  if match.problems:
    raise CheckpointMismatchError(
        f'Checkpoint {prefix} does not match the model built from the flags: '
        + ' | '.join(match.problems) + f'. Set the architecture flags ({ARCHITECTURE_FLAGS}) to '
        'those the checkpoint was trained with (its flags.json has them).')
  for var, key in match.plan:
    var.assign(reader.get_tensor(key))
  return RestoreReport(restored=len(match.plan), fresh=match.fresh, ignored=match.unused)


def read_global_step(path: str) -> int:
  """The `global_step` a checkpoint of ours was written at (0 when absent)."""
  reader = tf.train.load_checkpoint(resolve_checkpoint_path(path))
  key = checkpoint_variable_paths(reader).get('global_step')
  return int(reader.get_tensor(key)) if key else 0


CHECKPOINT_NAME = 'ckpt'
_CKPT_RE = re.compile(r'^ckpt-(\d+)\.index$')
_RESTORE_ERRORS = (tf.errors.OpError, IndexError, ValueError, OSError, RuntimeError,
                   tf.errors.DataLossError)


class NoIntactCheckpointError(RuntimeError):
  """model_dir holds checkpoints of a run, but none can be read."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (disk full, permissions); the message names model_dir."""


def find_checkpoints(model_dir: str) -> List[str]:
  """Every `ckpt-N` prefix in `model_dir` with its .index, newest (highest N) first.

  Found by listing the folder, not from the `checkpoint` index file, which may be missing or
  name a checkpoint that is gone.
  """
  if not tf.io.gfile.isdir(model_dir):
    return []
  found = []
  for name in tf.io.gfile.listdir(model_dir):
    m = _CKPT_RE.match(name)
    if m:
      found.append((int(m.group(1)), os.path.join(model_dir, name[:-len('.index')])))
  return [path for _, path in sorted(found, reverse=True)]


def checkpoint_step(prefix: str) -> int:
  """N of a `.../ckpt-N` prefix."""
  return int(prefix.rsplit('-', 1)[1])


def clean_temp_folders(model_dir: str) -> List[str]:
  """Removes `ckpt-N_temp*` folders left by a save that was killed or ran out of disk."""
  removed = []
  if not tf.io.gfile.isdir(model_dir):
    return removed
  for name in tf.io.gfile.listdir(model_dir):
    name = name.rstrip('/')
    if re.match(r'^ckpt-\d+_temp', name):
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


def _set_aside(prefix: str) -> List[str]:
  """Renames the files of a damaged checkpoint to damaged-ckpt-N.* so nothing overwrites them."""
  folder, base = os.path.split(prefix)
  moved = []
  for path in tf.io.gfile.glob(prefix + '.*'):
    target = os.path.join(folder, 'damaged-' + base + os.path.basename(path)[len(base):])
    tf.io.gfile.rename(path, target, overwrite=True)
    moved.append(target)
  return moved


class TrainState:
  """Model + optimizer + step under one CheckpointManager in `model_dir`.

  `save_dir` differs from `model_dir` only on non-chief multi-worker processes, which must take
  part in saving but whose files are throw-away; every process resumes from `model_dir`.
  """

  def __init__(self, model, optimizer, model_dir: str, max_to_keep: int,
               save_dir: Optional[str] = None):
    self.model = model
    self.optimizer = optimizer
    self.model_dir = model_dir
    self.save_dir = save_dir or model_dir
    self.max_to_keep = max_to_keep
    # The wrapped optimizer under loss scaling, so the optimizer slots sit at the same paths
    # whatever the precision; the loss scale is an extra, optional entry (see precision.py).
    inner = getattr(optimizer, 'inner_optimizer', optimizer)
    self._objects = dict(model=model, optimizer=inner, global_step=optimizer.iterations)
    self._loss_scale = optimizer.dynamic_scale if inner is not optimizer else None
    extra = {'loss_scale': self._loss_scale} if self._loss_scale is not None else {}
    self.checkpoint = tf.train.Checkpoint(**self._objects, **extra)
    self.manager = self._make_manager()

  def _make_manager(self) -> tf.train.CheckpointManager:
    return tf.train.CheckpointManager(self.checkpoint, directory=self.save_dir,
                                      max_to_keep=self.max_to_keep,
                                      checkpoint_name=CHECKPOINT_NAME)

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
          f'Could not write checkpoint {CHECKPOINT_NAME}-{self.step} to {self.save_dir} '
          f'({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else e}). '
          'Is the disk full or the folder not writable? Free space and rerun the same command: '
          + (f'it resumes from {os.path.basename(kept[0])}' if kept else 'it starts again')
          + ' and removes the unfinished ckpt-*_temp folder.') from e

  def _restore_intact(self) -> Optional[str]:
    """Restores the newest readable checkpoint of model_dir; None when there is none at all.

    A checkpoint that fails to read (truncated, half-written) is logged, renamed to
    damaged-ckpt-N.* and the next older one is tried. A checkpoint of another architecture is
    an error, not something to skip.
    """
    candidates = find_checkpoints(self.model_dir)
    indexed = tf.train.latest_checkpoint(self.model_dir)
    if candidates and indexed != candidates[0]:
      log.warning('The checkpoint index file of %s %s; found %s by listing the folder.',
                  self.model_dir, f'names {indexed}' if indexed else 'is missing or unusable',
                  ', '.join(os.path.basename(c) for c in candidates))
    damaged = []
    for path in candidates:
      reader = None
      try:
        reader = tf.train.load_checkpoint(path)
        theirs = checkpoint_variable_paths(reader, root_child='model')
        shapes = reader.get_variable_to_shape_map()
      except _RESTORE_ERRORS as e:
        damaged.append((path, e))
        continue
      match = match_variables(object_variable_paths(self.model, 'model'), theirs, shapes)
      if match.problems:
        raise CheckpointMismatchError(
            f'--model_dir={self.model_dir} holds a run of another architecture ({path}): '
            + ' | '.join(match.problems) + '. Resume it with its own flags (its flags.json), or '
            'use a new --model_dir.')
      checkpoint = self.checkpoint
      if self._loss_scale is not None and not checkpoint_variable_paths(reader, 'loss_scale'):
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
                  str(error).strip().splitlines()[0] if str(error).strip() else '',
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

  def restore_or_initialize(self, init_checkpoint: Optional[str], fresh_ok: Sequence[str] = (),
                            init_fn: Optional[Callable[[str], RestoreReport]] = None) -> str:
    """Applies the precedence rule; returns 'resumed', 'initialized' or 'scratch'.

    The model and the optimizer must already be built (DESIGN: Keras 3 has no deferred restore).
    `init_fn(path)` replaces the default strict loader for `init_checkpoint` (e.g. for weights
    written by the original code or an exported SavedModel).
    """
    latest = self._restore_intact()
    if latest:
      log.info('Resuming from %s at step %d (weights, optimizer state and step).', latest,
               self.step)
      return 'resumed'
    if init_checkpoint:
      log.info('Initialising the model from --checkpoint=%s', init_checkpoint)
      if init_fn is not None:
        report = init_fn(init_checkpoint)
      else:
        report = restore_model_variables(self.model, init_checkpoint, fresh_ok=fresh_ok)
      log.info('Restored %d variables.', report.restored)
      if report.fresh:
        log.info('Left freshly initialised (new for this task): %s', ', '.join(report.fresh))
      if report.ignored:
        log.info('Not used from the checkpoint: %d variables (e.g. %s)', len(report.ignored),
                 report.ignored[0])
      return 'initialized'
    return 'scratch'


def variables_by_path(model) -> Dict[str, tf.Variable]:
  """Every variable of `model` keyed by its structural path (for tests and importers)."""
  return object_variable_paths(model, 'model')


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
