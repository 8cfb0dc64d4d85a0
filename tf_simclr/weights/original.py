"""google-research/simclr's variable paths -> ours (the translation table), and `describe`.

google-research/simclr's tf_keras code (its `tf2/` folder) names a variable by its structural path
in the object graph (`model/resnet_model/block_groups/0/layers/0/conv2d_bn_layers/0/conv2d/kernel`);
the explicit tables below translate it into ours (`model/encoder/block_groups/0/blocks/0/conv1/_kernel`).
Nothing of the original graph is executed. `describe` recovers the architecture a checkpoint
(ours or the original's) implies, for the mismatch error's hint.
"""

from __future__ import annotations

import collections
from typing import Dict, List, Optional, Sequence, Tuple

from tf_simclr.models import resnet as resnet_lib

OURS = 'tf-simclr'
ORIGINAL = 'google-research/simclr'
VALUE_SUFFIX = '/.ATTRIBUTES/VARIABLE_VALUE'

BN_LEAVES = ('gamma', 'beta', 'moving_mean', 'moving_variance')

# The original's layers -> ours. Each table maps (index in the original's layer list, kind of
# element) to our attribute; kinds come from the element's variables (see `_element`).
# Stem `initial_conv_relu_max_pool`: CIFAR   [conv, id, bn, id];  ImageNet [conv, id, bn, pool, id];
#   ResNet-D (sk_ratio > 0) [conv, bn, conv, bn, conv, id, bn, pool, id].
_STEM = {(0, 'conv'): 'convs/0', (2, 'bn'): 'bns/0',
         (2, 'conv'): 'convs/1', (4, 'conv'): 'convs/2',
         (1, 'bn'): 'bns/0', (3, 'bn'): 'bns/1', (6, 'bn'): 'bns/2'}
# `shortcut_layers` (basic) / `projection_layers` (bottleneck): [conv, bn]; ResNet-D strided
#   [pad, pool, conv, bn]; ResNet-D stride 1 [pool, conv, bn].
_SHORTCUT = {(0, 'conv'): 'shortcut_conv', (1, 'conv'): 'shortcut_conv',
             (2, 'conv'): 'shortcut_conv', (1, 'bn'): 'shortcut_bn', (2, 'bn'): 'shortcut_bn',
             (3, 'bn'): 'shortcut_bn'}
# ResidualBlock `conv2d_bn_layers`: [conv, bn, conv, bn]; its SE is the attribute `se_layer`.
_BASIC = {(0, 'conv'): 'conv1', (1, 'bn'): 'bn1', (2, 'conv'): 'conv2', (3, 'bn'): 'bn2'}
# BottleneckBlock `conv_relu_dropblock_layers`: [conv, bn, drop, conv, bn, drop, conv, bn, drop,
#   (se)]; with SK [conv, bn, drop, sk, drop, conv, bn, drop, (se)].
_BOTTLENECK = {(0, 'conv'): 'conv1', (1, 'bn'): 'bn1',
               (3, 'conv'): 'conv2', (4, 'bn'): 'bn2', (6, 'conv'): 'conv3', (7, 'bn'): 'bn3',
               (9, 'se'): 'se',
               (3, 'sk'): 'sk_conv', (5, 'conv'): 'conv3', (6, 'bn'): 'bn3', (8, 'se'): 'se'}
# SK_Conv2D's attributes -> our SelectiveKernel's.
_SK_PARTS = {('conv2d_fixed_padding', 'conv2d'): 'conv', ('batch_norm_relu', 'bn'): 'bn',
             ('conv2d_0',): 'mix_conv0', ('batch_norm_relu_1', 'bn'): 'mix_bn',
             ('conv2d_1',): 'mix_conv1'}


def _leaf(name: str) -> Optional[str]:
  """tf_keras Dense/Conv `kernel` is `_kernel` in Keras 3; bias and BN variables keep names."""
  if name == 'kernel':
    return '_kernel'
  return name if name == 'bias' or name in BN_LEAVES else None


def _element(rest: Sequence[str]) -> Optional[Tuple[str, str]]:
  """(kind, our suffix) of a variable below one element of an original layer list."""
  rest = tuple(rest)
  if len(rest) == 2 and rest[0] == 'conv2d' and rest[1] == 'kernel':  # Conv2dFixedPadding
    return 'conv', '_kernel'
  if len(rest) == 2 and rest[0] == 'bn' and rest[1] in BN_LEAVES:  # BatchNormRelu
    return 'bn', rest[1]
  if len(rest) == 2 and rest[0] in ('se_reduce', 'se_expand') and rest[1] in ('kernel', 'bias'):
    return 'se', f'{rest[0]}/{_leaf(rest[1])}'
  for parts, ours in _SK_PARTS.items():
    if rest[:-1] == parts and _leaf(rest[-1]):
      return 'sk', f'{ours}/{_leaf(rest[-1])}'
  return None


def _indexed(table, index: str, rest) -> Optional[str]:
  element = _element(rest)
  if element is None or not index.isdigit():
    return None
  target = table.get((int(index), element[0]))
  return f'{target}/{element[1]}' if target else None


def _linear_layer(rest: Sequence[str]) -> Optional[str]:
  """The original's LinearLayer (`dense`, `bn_relu/bn`) -> ours (`dense`, `bn`)."""
  if len(rest) == 2 and rest[0] == 'dense' and rest[1] in ('kernel', 'bias'):
    return f'dense/{_leaf(rest[1])}'
  if len(rest) == 3 and rest[:2] == ['bn_relu', 'bn'] and rest[2] in BN_LEAVES:
    return f'bn/{rest[2]}'
  return None


def _block(rest: Sequence[str]) -> Optional[str]:
  if not rest:
    return None
  container, rest = rest[0], rest[1:]
  if container == 'se_layer':
    element = _element(rest)
    return f'se/{element[1]}' if element and element[0] == 'se' else None
  if len(rest) < 2:
    return None
  tables = {'shortcut_layers': _SHORTCUT, 'projection_layers': _SHORTCUT,
            'conv2d_bn_layers': _BASIC, 'conv_relu_dropblock_layers': _BOTTLENECK}
  table = tables.get(container)
  return _indexed(table, rest[0], rest[1:]) if table else None


def original_to_ours(path: str) -> Optional[str]:
  """Our structural path for one variable path of the original's model, or None if unknown.

  Works on object-graph paths and on key strings alike (`/.ATTRIBUTES/...` is stripped).
  """
  if path.endswith(VALUE_SUFFIX):
    path = path[:-len(VALUE_SUFFIX)]
  p = path.split('/')
  if len(p) < 4 or p[0] != 'model':
    return None
  ours = None
  if p[1] == 'resnet_model' and p[2] == 'initial_conv_relu_max_pool':
    tail = _indexed(_STEM, p[3], p[4:])
    ours = tail and f'encoder/stem/{tail}'
  elif (p[1] == 'resnet_model' and p[2] == 'block_groups' and len(p) > 6 and p[4] == 'layers'
        and p[3].isdigit() and p[5].isdigit()):
    tail = _block(p[6:])
    ours = tail and f'encoder/block_groups/{p[3]}/blocks/{p[5]}/{tail}'
  elif p[1] == '_projection_head' and p[2] == 'linear_layers' and p[3].isdigit():
    tail = _linear_layer(p[4:])
    ours = tail and f'projection_head/linear_layers/{p[3]}/{tail}'
  elif p[1] == 'supervised_head' and p[2] == 'linear_layer':
    tail = _linear_layer(p[3:])
    ours = tail and f'supervised_head/linear_layer/{tail}'
  return f'model/{ours}' if ours else None


def original_uses_resnet_d(paths) -> bool:
  """Whether the original's model used sk_ratio > 0 (ResNet-D stem/shortcuts or SK convs)."""
  for path in paths:
    p = path.split('/')
    if len(p) > 7 and p[6] in ('shortcut_layers', 'projection_layers') and p[7] in ('1', '2') \
        and p[8:9] == ['conv2d']:
      return True
    if 'conv2d_fixed_padding' in p or (len(p) > 4 and p[2] == 'initial_conv_relu_max_pool'
                                       and p[3] == '4'):
      return True
  return False


def ours_by_source(source) -> Tuple[Dict[str, str], Dict[str, str], List[str]]:
  """({our path: key}, {our path: the checkpoint's name}, checkpoint paths without a home)."""
  if source.origin == OURS:
    return dict(source.variables), {p: p for p in source.variables}, []
  keys, names, homeless = {}, {}, []
  for path, key in sorted(source.variables.items()):
    ours = original_to_ours(path)
    if ours is None or ours in keys:
      homeless.append(path)
    else:
      keys[ours], names[ours] = key, path
  return keys, names, homeless


def describe(source) -> Dict[str, object]:
  """The architecture a checkpoint implies (ModelConfig field names, plus `num_classes`).

  `source` is a `source.Source` (`source.resolve(path)`). Ratios are recovered from widths where they are
  identifiable; an SK model whose SK widths all sit at the 32-channel minimum reports the SimCLRv2
  value 0.0625.
  """
  keys, _, _ = ours_by_source(source)
  shape = {p: list(source.shapes[k]) for p, k in keys.items()}
  enc = 'model/encoder/'
  blocks = collections.defaultdict(set)
  for p in shape:
    q = p[len(enc):].split('/')
    if p.startswith(enc + 'block_groups/') and len(q) > 3:
      blocks[int(q[1])].add(int(q[3]))
  bottleneck = any('/conv3/' in p for p in shape)
  sizes = tuple(len(blocks[g]) for g in range(4))
  depths = resnet_lib._DEPTHS  # pylint: disable=protected-access
  depth = next((d for d, v in depths.items() if v == (bottleneck, sizes)), None)
  first = shape.get(enc + 'block_groups/0/blocks/0/conv1/_kernel')
  width = (first[-1] // 64) if first else None
  stem = sorted(p for p in shape if p.startswith(enc + 'stem/convs/'))
  sk = original_uses_resnet_d(source.variables) if source.origin == ORIGINAL else (
      len(stem) == 3 or any('/sk_conv/' in p for p in shape))

  def ratios(suffix, floor=0):  # reduced width / the block's `filters` (64 * width * 2^group)
    return [shape[p][-1] / (64 * width * 2 ** int(p.split('/')[3])) for p in shape
            if p.endswith(suffix) and shape[p][-1] > floor] if width else []

  sk_ratios = ratios('sk_conv/mix_conv0/_kernel', resnet_lib.SK_MIN_DIM)
  se_ratios = ratios('se/se_reduce/_kernel')
  head = sorted({int(p.split('/')[3]) for p in shape
                 if p.startswith('model/projection_head/linear_layers/')})
  last = head and shape.get(f'model/projection_head/linear_layers/{head[-1]}/dense/_kernel')
  logits = shape.get('model/supervised_head/linear_layer/dense/_kernel')
  return dict(
      resnet_depth=depth, width_multiplier=width,
      cifar_stem=bool(stem) and len(stem) == 1 and shape[stem[0]][0] == 3,
      sk_ratio=(max(sk_ratios) if sk_ratios else 0.0625) if sk else 0.0,
      se_ratio=round(max(se_ratios), 4) if se_ratios else 0.0,
      proj_head_mode='nonlinear' if len(head) > 1 else ('linear' if head else 'none'),
      num_proj_layers=len(head), proj_out_dim=last[-1] if last else None,
      num_classes=logits[-1] if logits else None)


def flags_hint(arch: Dict[str, object]) -> str:
  """The flags that build the architecture `describe` found."""
  stem = '--image_size<=32 (CIFAR stem)' if arch['cifar_stem'] else '--image_size>32'
  parts = [f'--resnet_depth={arch["resnet_depth"]}',
           f'--width_multiplier={arch["width_multiplier"]}', f'--sk_ratio={arch["sk_ratio"]:g}',
           f'--se_ratio={arch["se_ratio"]:g}', stem, f'--proj_head_mode={arch["proj_head_mode"]}',
           f'--num_proj_layers={arch["num_proj_layers"]}']
  if arch['proj_out_dim']:
    parts.append(f'--proj_out_dim={arch["proj_out_dim"]}')
  if arch['num_classes']:
    parts.append(f'({arch["num_classes"]} classes in its supervised head)')
  return ' '.join(parts)
