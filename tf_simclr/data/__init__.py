"""Input data: dataset resolution, SimCLR augmentations and tf.data pipelines.

For your own datasets (the Python API): `training_views` (the two augmented views of the command
line's pretraining batches, or the one view of fine-tuning), `eval_images` (its evaluation
preprocessing), `to_unit_range` and `shapes10` (the built-in dataset); see data/views.py. They are
imported on first use, so `import tf_simclr.data` stays light for the command line.
"""

_VIEWS = ('training_views', 'eval_images', 'to_unit_range', 'shapes10')


def __getattr__(name):
  if name in _VIEWS:
    from tf_simclr.data import views  # pylint: disable=g-import-not-at-top
    return getattr(views, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(list(globals()) + list(_VIEWS))
