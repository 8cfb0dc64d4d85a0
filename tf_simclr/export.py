"""SavedModel ("hub module") export of a SimCLRModel, and the documented way to load it.

The export keeps the hub interface of the original (google-research/simclr `build_saved_model`):
a `tf.Module` whose `__call__(images, trainable)` returns the endpoint dict, traced for images of
any batch, height and width, with `trainable` True (batch statistics, BN moving averages updated,
for fine-tuning) and False (inference), plus `trainable_variables_list`, because a reloaded object
has no `trainable_variables`. It adds a `serving_default` signature (images -> inference
endpoints) for `keras.layers.TFSMLayer` and serving tools.

Synchronized batch norm is traced with local statistics. Under a synchronized BN the traced graph
holds an all-reduce whose gradient is a custom gradient that a SavedModel does not keep (TF warns
"Importing a function ... with ops with unsaved custom gradients. Will likely fail if a gradient
is requested"; google-research/simclr#116, tensorflow/tensorflow#50005). A reloaded module runs
on one replica, where global and local statistics are the same, so nothing is lost: the export
computes the same values and fine-tunes with ordinary gradients.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Dict, Iterator, List

import keras
import tensorflow as tf

from tf_simclr import run_dir
from tf_simclr.weights.source import exported_steps, resolve_export_path

log = logging.getLogger(__name__)

SERVING_SIGNATURE = 'serving_default'
IMAGES_SPEC = tf.TensorSpec(shape=[None, None, None, 3], dtype=tf.float32, name='images')


@contextlib.contextmanager
def _local_batch_norm(model) -> Iterator[None]:
  """Switches every synchronized BatchNormalization of `model` to local statistics for a trace.

  The variables stay shared: only the all-reduce of the batch moments is left out of the graph.
  """
  layers = model._flatten_layers(include_self=False)  # pylint: disable=protected-access
  synced = [layer for layer in layers
            if isinstance(layer, keras.layers.BatchNormalization) and layer.synchronized]
  for layer in synced:
    layer.synchronized = False
  try:
    yield
  finally:
    for layer in synced:
      layer.synchronized = True


class HubModule(tf.Module):
  """The exported object: `module(images, trainable)` -> {endpoint name: float32 tensor}."""

  def __init__(self, model):
    super().__init__(name='simclr_hub_module')
    if not model.variables:
      raise ValueError('export: the model has no variables yet; build it first '
                       '(model.build_for_size(image_size)) and restore its weights.')
    self.model = model
    # Not `trainable_variables`: tf.Module defines that as a property; a loaded object has none.
    self.trainable_variables_list = list(model.trainable_variables)

  @tf.function
  def __call__(self, images, trainable):
    with _local_batch_norm(self.model):
      outputs = self.model(images, training=trainable)
    return {name: tf.cast(value, tf.float32) for name, value in outputs.items()}


def build_module(model) -> HubModule:
  """The hub module of a built model, traced for images [None, None, None, 3] float32 and both
  values of `trainable`, with its `serving_default` function (see the module docstring)."""
  module = HubModule(model)
  module.__call__.get_concrete_function(IMAGES_SPEC, trainable=True)
  module.__call__.get_concrete_function(IMAGES_SPEC, trainable=False)

  @tf.function(input_signature=[IMAGES_SPEC])
  def serve(images):
    return module(images, trainable=False)

  module.serve = serve
  return module


def save(model, export_dir: str) -> str:
  """Writes the hub SavedModel of `model` to `export_dir` (which must not exist yet)."""
  module = build_module(model)
  tf.saved_model.save(module, export_dir,
                      signatures={SERVING_SIGNATURE: module.serve.get_concrete_function()})
  return export_dir


def prune_exports(export_root: str, keep: int, written: int) -> List[int]:
  """Deletes the oldest numbered exports beyond the newest `keep` (keep <= 0 keeps all), but never
  the export of step `written` (just written) nor one of a later step: re-exporting an older
  checkpoint (its newer one damaged) must not delete itself or the newer export. Returns deleted.
  """
  steps = exported_steps(export_root)
  if keep <= 0:
    return []
  deleted = [step for step in steps if step < written][:max(len(steps) - keep, 0)]
  for step in deleted:
    tf.io.gfile.rmtree(os.path.join(export_root, str(step)))
  return deleted


def export_step(model, model_dir: str, step: int, keep_hub_module_max: int) -> str:
  """Exports to `model_dir/saved_model/<step>` (replacing it) and keeps the newest
  `keep_hub_module_max` exports (0 keeps all), as the original's `save`, never deleting the one
  just written or a newer one. Returns the folder, which exists when this returns."""
  export_root = run_dir.export_root(model_dir)
  export_dir = run_dir.export_dir(model_dir, step)
  if tf.io.gfile.exists(export_dir):
    tf.io.gfile.rmtree(export_dir)
  tf.io.gfile.makedirs(export_root)
  save(model, export_dir)
  deleted = prune_exports(export_root, keep_hub_module_max, int(step))
  newer = [s for s in exported_steps(export_root) if s > step]
  notes = ([f'deleted older exports {deleted}'] if deleted else []) + (
      [f'the newer exports {newer} are kept'] if newer else [])
  log.info('Exported the hub module to %s%s', export_dir,
           f' ({"; ".join(notes)})' if notes else '')
  return export_dir


def load(path: str):
  """Loads an exported hub module (also the original's; see `source.resolve_export_path`).

  The result is callable as `module(images, trainable=False)` with float32 images
  (batch, height, width, 3) in [0, 1], and returns the endpoint dict (`final_avg_pool`,
  `proj_head_output`, `logits_sup` if the model had a supervised head, ...). `trainable=True`
  uses batch statistics and updates the BN moving averages, for fine-tuning the variables in
  `module.trainable_variables_list`.
  """
  return tf.saved_model.load(resolve_export_path(path))


def endpoints(module, images, trainable: bool = False) -> Dict[str, tf.Tensor]:
  """Calls a loaded module on images of any float dtype (e.g. float64 numpy arrays) in [0, 1]."""
  return module(tf.cast(images, tf.float32), trainable=trainable)
