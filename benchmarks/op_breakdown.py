"""Where a train step's ops go, per op type: from the traced graph (counts) and the TF profiler
(time). Used by `throughput.py --profile` and tests/test_precision.py.

The graph count is the replica step as traced (loss, gradient, LARS update, metrics), before
Grappler: it shows what the model code asks for (casts, batch-norm ops, ...). The profile is what
ran (after Grappler and oneDNN rewrites), summed per category over the profiled steps; its shares
are of the summed op time, so they compare within one run whatever the machine's load.
"""

from __future__ import annotations

import collections
import glob
import os
import re
from typing import Dict, Iterable, Tuple

CATEGORIES = ('cast', 'layout', 'batch_norm', 'conv_matmul', 'optimizer', 'nt_xent', 'other')
CATEGORY_TITLES = {
    'cast': 'Cast', 'layout': 'layout (Transpose/reorder)', 'batch_norm': 'batch norm (+grad)',
    'conv_matmul': 'conv/matmul (+grad)', 'optimizer': 'optimizer (LARS)',
    'nt_xent': 'NT-Xent (+grad)', 'other': 'other'}
# Not kernels that run each step (graph inputs, constants Grappler folds, markers).
_NOT_OPS = frozenset({'Const', 'Placeholder', 'NoOp'})
# Ops that contain other ops (their trace events span their bodies): never counted.
_CONTAINERS = frozenset({'While', 'StatelessWhile', 'If', 'StatelessIf', 'Case', 'StatelessCase',
                         'PartitionedCall', 'StatefulPartitionedCall', 'RemoteCall'})
_LAYOUT = re.compile(r'Transpose|DataFormat|ToTf|ToMkl|Reorder|Relayout')
_CONV = re.compile(r'Conv2D|Conv3D|MatMul|Einsum|Depthwise')
# A BatchNormalization layer's name scope: resnet.py's bn1.., shortcut_bn, mix_bn; heads' bn.
_BN_SCOPE = re.compile(r'(^|/)(bn\d*|shortcut_bn|mix_bn)(_\d+)?/')


def category(name: str, op_type: str) -> str:
  """The category (one of CATEGORIES) of the op `name` of type `op_type`: by type first (casts,
  layout changes, convolutions/matmuls, fused batch norms), then by name scope (batch-norm layers
  and their gradients, the optimizer, NT-Xent)."""
  if op_type == 'Cast':
    return 'cast'
  if _LAYOUT.search(op_type):
    return 'layout'
  if _CONV.search(op_type):
    return 'conv_matmul'
  if 'BatchNorm' in op_type or _BN_SCOPE.search(name):
    return 'batch_norm'
  if name.startswith('LARS/') or '/LARS/' in name or name.startswith('SGD/'):
    return 'optimizer'
  if 'softmax_cross_entropy_with_logits' in name or 'l2_normalize' in name or 'nt_xent' in name:
    return 'nt_xent'
  return 'other'


def replica_step_graph(trainer, batch_shapes):
  """The GraphDef of one replica step of `trainer` (a loop.Trainer with its state built) on a
  batch of `batch_shapes` (float32 tensors): the loss, its gradient and the optimizer update."""
  import tensorflow as tf
  specs = tuple(tf.TensorSpec(s, tf.float32) for s in batch_shapes)
  fn = tf.function(lambda batch: trainer.strategy.run(trainer._replica_step, args=(batch,)))
  return fn.get_concrete_function(specs).graph.as_graph_def()


def _nodes(graph_def) -> Iterable[Tuple[str, str]]:
  for node in graph_def.node:
    yield node.name, node.op
  for function in graph_def.library.function:
    for node in function.node_def:
      yield node.name, node.op


def graph_counts(graph_def) -> Dict[str, int]:
  """{category: number of ops} of a GraphDef (its functions included), plus 'total'; constants
  and placeholders are not ops here."""
  counts = collections.Counter()
  for name, op_type in _nodes(graph_def):
    if op_type not in _NOT_OPS and op_type not in _CONTAINERS:
      counts[category(name, op_type)] += 1
  out = {c: counts[c] for c in CATEGORIES}
  out['total'] = sum(counts.values())
  return out


def newest_profile(logdir: str) -> str:
  """The newest .xplane.pb the TF profiler wrote under `logdir`."""
  files = sorted(glob.glob(os.path.join(logdir, 'plugins', 'profile', '*', '*.xplane.pb')))
  if not files:
    raise RuntimeError(f'The TF profiler wrote no trace under {logdir}.')
  return files[-1]


def host_events(profile: str) -> Iterable[Tuple[str, str, object]]:
  """(thread line name, event name, event) of every host-plane event in the profile (XSpace)."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2
  space = xplane_pb2.XSpace()
  with open(profile, 'rb') as f:
    space.ParseFromString(f.read())
  for plane in space.planes:
    if not plane.name.startswith('/host:'):
      continue
    names = {i: m.name for i, m in plane.event_metadata.items()}
    for line in plane.lines:
      for event in line.events:
        yield line.name, names.get(event.metadata_id, ''), event


def trace_times(logdir: str) -> Dict[str, float]:
  """{category: seconds} of the TF op events in the newest profile under `logdir` (TF ops are
  traced as "name:Type" on the host plane), plus 'total' and 'events'."""
  seconds = collections.Counter()
  events = 0
  for _, name, event in host_events(newest_profile(logdir)):
    if ':' not in name or '::' in name:
      continue
    op_name, op_type = name.rsplit(':', 1)
    op_type = op_type.strip()  # (the whole function shows as "name: __inference_...")
    if op_type in _CONTAINERS or op_type.startswith('__') or op_type in _NOT_OPS:
      continue
    seconds[category(op_name, op_type)] += event.duration_ps * 1e-12
    events += 1
  if not events:
    raise RuntimeError(f'The profile under {logdir} has no TF op events: has the format changed?')
  out = {c: seconds[c] for c in CATEGORIES}
  out['total'] = sum(seconds.values())
  out['events'] = events
  return out


def format_table(columns: Dict[str, Dict[str, float]]) -> str:
  """A text table: one row per category, per column (e.g. a precision) the graph's op count and,
  when profiled, the category's share of the summed op time."""
  head = f'{"op type":<28}' + ''.join(f' {label:>24}' for label in columns)
  sub = f'{"":<28}' + ''.join(f' {"ops":>8} {"time share":>15}' for _ in columns)
  lines = [head, sub, '-' * len(head)]
  for c in CATEGORIES + ('total',):
    row = f'{CATEGORY_TITLES.get(c, c):<28}'
    for col in columns.values():
      share = (f'{100 * col["time"][c] / col["time"]["total"]:>14.1f}%'
               if col.get('time') else f'{"-":>15}')
      row += f' {col["ops"][c]:>8d} {share}'
    lines.append(row)
  return '\n'.join(lines)
