"""Everything about "what does this path hold and how does it map to our model".

source.py  resolve(path): our checkpoint or model_dir, our export, the original's SavedModel or
           training checkpoint; the one object-graph walker.
match.py   the strict variable matcher, its one mismatch error (with the architecture the
           checkpoint implies) and `load`, the one loader behind --checkpoint,
           --teacher_checkpoint, eval/export reloads and the probe.
original.py  google-research/simclr's variable paths -> ours, and `describe` (of a Source).
state.py   a training run's checkpoints: resume beats --checkpoint, intact fallback, saving;
           `load_newest_intact` for the read-only modes (eval, export, probe).
"""

from tf_simclr.weights import match, original, source, state  # noqa: F401  (weights.match.load...)


def describe(path_or_source):
  """The architecture a checkpoint implies (`original.describe`) from a path or a `source.Source`:
  resolving a path here keeps original.py from importing source.py (which imports it)."""
  if isinstance(path_or_source, str):
    path_or_source = source.resolve(path_or_source)
  return original.describe(path_or_source)
