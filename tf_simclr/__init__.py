"""tf-simclr: SimCLR v1/v2 pretraining, fine-tuning and distillation on TensorFlow 2 / Keras 3.

From Python (imported on first use, so `import tf_simclr` and the command line's --help stay
fast): `SimCLR` (a keras.Model whose fit() runs the command line's step), `LARS` (its
optimizer), `KNNMonitor` and `LinearProbe` (readout callbacks), and the modules `data`
(`training_views`, `eval_images`, `shapes10`), `recipes` and `export`. See docs/python.md.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    'SimCLR': ('tf_simclr.keras_model', 'SimCLR'),
    'LARS': ('tf_simclr.optim.lars', 'LARS'),
    'KNNMonitor': ('tf_simclr.callbacks', 'KNNMonitor'),
    'LinearProbe': ('tf_simclr.callbacks', 'LinearProbe'),
}
_MODULES = ('data', 'recipes', 'export', 'callbacks')

__all__ = sorted(_LAZY) + list(_MODULES)


def __getattr__(name):
  if name in _LAZY:
    module, attribute = _LAZY[name]
    return getattr(importlib.import_module(module), attribute)
  if name in _MODULES:
    return importlib.import_module(f'tf_simclr.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(list(globals()) + __all__)
