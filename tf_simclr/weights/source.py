"""What a weights path holds: `resolve(path)` -> a `Source`, read once, values not yet loaded.

A path may be a checkpoint prefix of ours (`model_dir/ckpt-1000`), a model_dir, an export of ours
(`model_dir/saved_model/<step>`, its parent, or the model_dir holding it), or weights written by
google-research/simclr's TF2 code (a SavedModel folder or an object-based training checkpoint).
Variables are named by their *structural path* in the checkpoint's object graph
(`model/encoder/block_group1/...`), never by tensor key: a checkpoint that also holds a Keras 3
optimizer stores model variables under the optimizer's shorter path, and weights written by other
code have other keys entirely.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Dict, List, Optional, Tuple

import tensorflow as tf
from google.protobuf import message
from google.protobuf import text_format
from tensorflow.core.protobuf import trackable_object_graph_pb2

from tf_simclr.errors import (CheckpointMismatchError, CheckpointNotFoundError,
                              CheckpointUnreadableError, first_line)
from tf_simclr import run_dir
from tf_simclr.weights import original

OURS = 'tf-simclr'
ORIGINAL = 'google-research/simclr'
OBJECT_GRAPH_KEY = '_CHECKPOINTABLE_OBJECT_GRAPH'
VALUE_SUFFIX = original.VALUE_SUFFIX
# Object-graph children that alias variables held elsewhere (tf_keras `keras_api`, variable lists,
# the hub module's `trainable_variables_list`); structural paths never pass through them.
ALIAS_CHILDREN = frozenset({
    'keras_api', 'variables', 'trainable_variables', 'non_trainable_variables', 'weights',
    'trainable_weights', 'non_trainable_weights', 'trainable_variables_list', 'signatures',
    '_trainable_variables', '_non_trainable_variables'})


def is_saved_model(path: str) -> bool:
  return tf.io.gfile.exists(os.path.join(path, run_dir.SAVED_MODEL_FILE))


def exported_steps(export_root: str) -> List[int]:
  """Steps of the exports under `model_dir/saved_model`, oldest first (other names skipped)."""
  if not tf.io.gfile.isdir(export_root):
    return []
  names = (name.rstrip('/') for name in tf.io.gfile.listdir(export_root))
  return sorted(int(name) for name in names if name.isdigit())


def resolve_export_path(path: str) -> str:
  """A SavedModel folder from itself, `model_dir/saved_model` or `model_dir` (newest export)."""
  if is_saved_model(path):
    return path
  for root in (path, run_dir.export_root(path)):
    steps = exported_steps(root)
    if steps and is_saved_model(os.path.join(root, str(steps[-1]))):
      return os.path.join(root, str(steps[-1]))
  raise CheckpointNotFoundError(
      f'{path} is not a SavedModel (no {run_dir.SAVED_MODEL_FILE}) and holds no exports under '
      f'{run_dir.EXPORT_SUBDIR}/<step>: point it at model_dir/{run_dir.EXPORT_SUBDIR}/<step>, or '
      'export one with '
      '--mode=export --model_dir=...')


def find_checkpoints(model_dir: str) -> List[str]:
  """Every `ckpt-N` prefix in `model_dir` with its .index, newest (highest N) first.

  Found by listing the folder, not from the `checkpoint` index file, which may be missing or
  name a checkpoint that is gone.
  """
  if not tf.io.gfile.isdir(model_dir):
    return []
  found = []
  for name in tf.io.gfile.listdir(model_dir):
    step = run_dir.checkpoint_index_step(name)
    if step is not None:
      found.append((step, os.path.join(model_dir, name[:-len('.index')])))
  return [path for _, path in sorted(found, reverse=True)]


def checkpoint_step(prefix: str) -> int:
  """N of a `.../ckpt-N` prefix."""
  return int(prefix.rsplit('-', 1)[1])


def latest_indexed(path: str) -> Optional[str]:
  """The checkpoint the folder's `checkpoint` index file names (None if absent or unreadable)."""
  try:
    return tf.train.latest_checkpoint(path)
  except (tf.errors.OpError, ValueError, UnicodeDecodeError, text_format.ParseError):
    return None


def checkpoint_prefix(path: str, flag: str = 'checkpoint') -> Tuple[str, bool]:
  """(checkpoint prefix, is a SavedModel) for a prefix, model_dir, SavedModel or export folder.

  `flag` names the flag that gave `path` in error messages (checkpoint, teacher_checkpoint).
  """
  if tf.io.gfile.isdir(path):
    variables = os.path.join(path, 'variables', 'variables')
    if tf.io.gfile.exists(variables + '.index'):
      return variables, True  # A SavedModel directory: its variables form a checkpoint.
    found = find_checkpoints(path)
    latest = latest_indexed(path) or (found[0] if found else None)
    if latest is None:
      try:  # A folder of exports (model_dir/saved_model), or a model_dir holding one?
        return checkpoint_prefix(resolve_export_path(path), flag)
      except CheckpointNotFoundError:
        pass
      raise CheckpointNotFoundError(
          f'--{flag}={path} is a directory without a checkpoint or SavedModel: point it at '
          f'a checkpoint prefix (e.g. model_dir/{run_dir.CHECKPOINT_NAME}-1000), a model_dir, or a '
          'SavedModel folder.')
    return latest, False
  if not tf.io.gfile.exists(path + '.index'):
    raise CheckpointNotFoundError(
        f'--{flag}={path} not found: expected {path}.index (a checkpoint prefix such as '
        f'model_dir/{run_dir.CHECKPOINT_NAME}-1000), a model_dir, or a SavedModel folder.')
  return path, False


def variable_paths(reader: tf.train.CheckpointReader, root_child: Optional[str] = None,
                   skip_aliases: bool = True) -> Dict[str, str]:
  """{structural path: tensor key} of a checkpoint, from its object graph (the one walker).

  Paths are `/`-joined child names from the root (or from its child `root_child`, which is then
  the first path element), found breadth-first with children in sorted order, shortest first,
  never through alias children (`ALIAS_CHILDREN`) unless `skip_aliases` is False (a Keras 3
  optimizer holds its variables only under `_trainable_variables`). Raises if the checkpoint has
  no object graph.
  """
  graph = trackable_object_graph_pb2.TrackableObjectGraph()
  graph.ParseFromString(reader.get_tensor(OBJECT_GRAPH_KEY))
  start, prefix = 0, ''
  if root_child is not None:
    start = {c.local_name: c.node_id for c in graph.nodes[0].children}.get(root_child)
    if start is None:
      return {}
    prefix = root_child
  skip = ALIAS_CHILDREN if skip_aliases else frozenset()
  paths: Dict[str, str] = {}
  seen = {start}
  queue = collections.deque([(start, prefix)])
  while queue:
    node_id, path = queue.popleft()
    for attr in graph.nodes[node_id].attributes:
      if attr.name == 'VARIABLE_VALUE':
        paths[path] = attr.checkpoint_key
    for child in sorted(graph.nodes[node_id].children, key=lambda c: c.local_name):
      if child.local_name not in skip and child.node_id not in seen:
        seen.add(child.node_id)
        queue.append((child.node_id, f'{path}/{child.local_name}' if path else child.local_name))
  return paths


@dataclasses.dataclass
class Source:
  """What a weights path holds: model variables by structural path, their keys and shapes."""
  path: str
  prefix: str
  saved_model: bool
  origin: str  # OURS or ORIGINAL
  variables: Dict[str, str]  # structural path below the root ('model/...') -> checkpoint key
  shapes: Dict[str, List[int]]  # checkpoint key -> shape
  has_values: bool  # False for an index file without its data shards
  reader: tf.train.CheckpointReader  # opened once; `match.load` reads the values through it
  flag: str = 'checkpoint'  # the flag that named `path`, for messages

  @property
  def kind(self) -> str:
    return 'SavedModel' if self.saved_model else 'checkpoint'


def resolve(path: str, flag: str = 'checkpoint') -> Source:
  """Reads what `path` holds (keys, shapes, structural paths); no values are loaded.

  A file that is not a checkpoint (random bytes, a truncated index) raises
  CheckpointUnreadableError naming `--<flag>=path`.
  """
  prefix, saved_model = checkpoint_prefix(path, flag)
  try:
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
  except (tf.errors.OpError, ValueError, UnicodeDecodeError) as e:
    raise CheckpointUnreadableError(
        f'--{flag}={path}: {prefix}.index cannot be read as a checkpoint ({type(e).__name__}: '
        f'{first_line(e)}). Point --{flag} at a checkpoint prefix '
        f'(model_dir/{run_dir.CHECKPOINT_NAME}-N), '
        'a model_dir or a SavedModel folder; copy a damaged checkpoint again.') from e
  try:
    variables = variable_paths(reader, root_child='model')
    has_values = True
  except (tf.errors.OpError, KeyError, message.DecodeError, UnicodeDecodeError):
    # index without data, or no (readable) object graph
    # Keys of model variables are their structural paths; optimizer slots sit below
    # `<variable>/.OPTIMIZER_SLOT/...`.
    variables = {key[:-len(VALUE_SUFFIX)]: key for key in shapes
                 if key.startswith('model/') and key.endswith(VALUE_SUFFIX)
                 and '/.' not in key[:-len(VALUE_SUFFIX)]}
    has_values = False
  if any(p.startswith('model/encoder/') for p in variables):
    origin = OURS
  elif any(original.original_to_ours(p) for p in variables):
    origin = ORIGINAL
  else:
    raise CheckpointMismatchError(
        f'--{flag}={path}: {prefix} holds no model variables of tf-simclr or of '
        'google-research/simclr\'s TF2 code (expected model/encoder/... or model/resnet_model/...; '
        'TF1 checkpoints of the original are not supported).')
  return Source(path=path, prefix=prefix, saved_model=saved_model, origin=origin,
                variables=variables, shapes=shapes, has_values=has_values, reader=reader,
                flag=flag)


def read_step_or_zero(found: 'Source') -> int:
  """`read_global_step`, 0 for weights without a readable step (the original's, an export)."""
  try:
    return read_global_step(found)
  except (ValueError, KeyError, tf.errors.OpError):
    return 0


def read_global_step(path) -> int:
  """The `global_step` a checkpoint of ours (a path or a `Source`) was written at (0 if absent)."""
  reader = (path.reader if isinstance(path, Source)
            else tf.train.load_checkpoint(checkpoint_prefix(path)[0]))
  key = variable_paths(reader).get('global_step')
  return int(reader.get_tensor(key)) if key else 0
