"""The strict matcher: every variable of a model paired with a checkpoint value, or one error.

A restore is strict: a variable of ours with no value or with a value of another
shape, or a variable of the checkpoint with no home, is a `CheckpointMismatchError` naming the
first such variables and the architecture the checkpoint implies (`original.describe`). `load` is
the one loader: --checkpoint, --teacher_checkpoint, eval/export reloads and the probe go through
it, and the resume in `state.py` uses `match` before restoring the whole run state.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Callable, Dict, List, Optional, Sequence, Union

import tensorflow as tf

from tf_simclr.errors import CheckpointMismatchError, CheckpointNotFoundError
from tf_simclr.weights import original
from tf_simclr.weights import source as source_lib

log = logging.getLogger(__name__)

ARCHITECTURE_FLAGS = ('--resnet_depth, --width_multiplier, --sk_ratio, --se_ratio, '
                      '--proj_head_mode, --num_proj_layers, --proj_out_dim')


def object_variable_paths(root, prefix: str = 'model') -> Dict[str, tf.Variable]:
  """Maps structural paths to the variables of a live trackable, walked like a checkpoint's."""
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


def _model_uses_resnet_d(model) -> Optional[bool]:
  encoder = getattr(model, 'encoder', None)
  if encoder is None or not hasattr(encoder, 'block_groups'):
    return None
  return len(encoder.stem.convs) == 3 or any(
      block.shortcut_pool is not None or getattr(block, 'sk_conv', None) is not None
      for group in encoder.block_groups for block in group.blocks)


def match(model, source: source_lib.Source, fresh_ok: Sequence[str] = (),
          allow_extra_prefixes: Sequence[str] = (), lead: Optional[str] = None,
          advice: str = ''):
  """Pairs every variable of `model` with a key of `source`, strictly (no values are read).

  Returns (plan [(variable, key)], fresh [our paths], ignored [checkpoint names]).
  fresh_ok: path prefixes below `model/` (e.g. 'supervised_head') that may stay as initialised
    when the checkpoint lacks them or holds them with another shape (a new head for a new task).
  allow_extra_prefixes: path prefixes below `model/` of the checkpoint that may go unused.
  Raises the one CheckpointMismatchError: `lead` (default: --checkpoint=... does not match the
  model built from the flags), the first problems, `advice`, and the flags the checkpoint implies.
  """
  keys, names, homeless = original.ours_by_source(source)
  ours = object_variable_paths(model, 'model')

  def name(path):
    return path if names.get(path, path) == path else f'{names[path]} (ours: {path})'

  found = match_variables(ours, keys, source.shapes, fresh_ok, allow_extra_prefixes, name=name)
  problems = list(found.problems)
  if homeless:
    problems.insert(0, f'{len(homeless)} variable(s) of the checkpoint with no counterpart in '
                    'tf-simclr, first: ' + ', '.join(homeless[:5]))
  theirs_d = (original.original_uses_resnet_d(source.variables)
              if source.origin == original.ORIGINAL else None)
  ours_d = _model_uses_resnet_d(model)
  if not problems and theirs_d is not None and ours_d is not None and theirs_d != ours_d:
    problems.append('the checkpoint was trained with '
                    + ('sk_ratio > 0 (ResNet-D stem/shortcuts)' if theirs_d else 'sk_ratio=0')
                    + ' but the model was built with '
                    + ('--sk_ratio > 0' if ours_d else '--sk_ratio=0')
                    + '; the variables fit but would compute something else')
  if problems:
    try:
      hint = 'The checkpoint implies: ' + original.flags_hint(original.describe(source)) + '.'
    except Exception:  # pylint: disable=broad-except  # the hint must not hide the error
      hint = f'Set the architecture flags ({ARCHITECTURE_FLAGS}) to its own.'
    if lead is None:
      lead = (f'--{source.flag}={source.path} ({source.origin} {source.kind} {source.prefix}) does '
              'not match the model built from the flags')
    raise CheckpointMismatchError(
        f'{lead}: ' + ' | '.join(problems) + '. ' + (f'{advice} ' if advice else '') + hint)
  ignored = [names.get(p, p) for p in found.unused]
  return found.plan, found.fresh, ignored


def load(model, path: Union[str, source_lib.Source], fresh_ok: Sequence[str] = (),
         allow_extra_prefixes: Sequence[str] = (), lead: Optional[str] = None) -> RestoreReport:
  """Restores the built `model` strictly from what `path` holds (see `source.resolve`).

  `fresh_ok`, `allow_extra_prefixes` and `lead` as in `match`. Returns what it did.
  """
  source = path if isinstance(path, source_lib.Source) else source_lib.resolve(path)
  plan, fresh, ignored = match(model, source, fresh_ok, allow_extra_prefixes, lead=lead)
  if not source.has_values:
    raise CheckpointNotFoundError(
        f'--{source.flag}={source.path}: {source.prefix}.index has no readable values (its '
        f'{source.prefix}.data-* files are missing); copy the whole checkpoint.')
  for var, key in plan:
    var.assign(source.reader.get_tensor(key))
  log.info('Loaded %d variables from %s %s %s.', len(plan), source.origin, source.kind,
           source.prefix)
  return RestoreReport(restored=len(plan), fresh=fresh, ignored=ignored)
