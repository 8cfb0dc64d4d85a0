"""Everything about "what does this path hold and how does it map to our model".

source.py  resolve(path): our checkpoint or model_dir, our export, the original's SavedModel or
           training checkpoint; the one object-graph walker.
match.py   the strict variable matcher, its one mismatch error (with the architecture the
           checkpoint implies) and `load`, the one loader behind --checkpoint,
           --teacher_checkpoint, eval/export reloads and the probe.
original.py  google-research/simclr's variable paths -> ours, and `describe`.
state.py   a training run's checkpoints: resume beats --checkpoint, intact fallback, saving;
           `load_newest_intact` for the read-only modes (eval, export, probe).
"""

from tf_simclr.weights import match, original, source, state  # noqa: F401  (weights.match.load...)
