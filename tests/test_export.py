"""tf_simclr.export: the hub SavedModel reloads in a fresh process, computes what the model
computes, and fine-tunes (gradients through synchronized BN survive the export)."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from tf_simclr import weights
from tf_simclr import export
from tf_simclr import run_dir
from tf_simclr.config import ModelConfig
from tf_simclr.models import simclr

NUM_CLASSES = 5
STEP = 30
BN_VARIABLES = ('gamma', 'beta', 'moving_mean', 'moving_variance')

# Runs in a fresh interpreter, outside the project, without tf_simclr: only TF and the export.
CHILD = textwrap.dedent('''
    import importlib.util, json, sys
    # As on a machine without tf_simclr, also where `pip install -e .` put it on every path:
    # an import of it fails, and find_spec reports it missing.
    sys.modules['tf_simclr'] = None
    import numpy as np
    import tensorflow as tf
    import keras

    export_dir, ref_path = sys.argv[1], sys.argv[2]
    ref = np.load(ref_path)
    result = {'tf_simclr_importable': importlib.util.find_spec('tf_simclr') is not None}
    module = tf.saved_model.load(export_dir)

    def diffs(outputs, prefix):
      return {k: float(np.max(np.abs(np.asarray(v) - ref[f'{prefix}/{k}'])))
              for k, v in outputs.items()}

    result['inference'] = {}
    for size in (16, 24):
      images = tf.constant(ref[f'images{size}'])
      result['inference'][size] = diffs(module(images, trainable=False), f'eval{size}')
    images = tf.constant(ref['images16'])
    result['serving'] = diffs(module.signatures['serving_default'](images=images), 'eval16')
    layer = keras.layers.TFSMLayer(export_dir, call_endpoint='serving_default')
    result['tfsm_layer'] = diffs(layer(images), 'eval16')

    variables = module.trainable_variables_list
    labels = tf.constant(ref['labels'])

    def loss_of(outputs):
      return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
          labels=labels, logits=outputs['logits_sup']))

    with tf.GradientTape() as tape:
      outputs = module(images, trainable=True)
      loss = loss_of(outputs)
    grads = tape.gradient(loss, variables)
    result['train'] = diffs(outputs, 'train16')
    result['num_variables'] = len(variables)
    result['gradients'] = ['none' if g is None else 'zero' if not np.any(g.numpy()) else 'ok'
                           for g in grads]
    pairs = [(g.numpy(), ref[f'grad/{i}']) for i, g in enumerate(grads) if f'grad/{i}' in ref]
    result['gradient_rel_err'] = float(np.sqrt(
        sum(np.sum((g - r) ** 2) for g, r in pairs) / sum(np.sum(r ** 2) for _, r in pairs)))
    losses = [float(loss)]
    for _ in range(4):
      for v, g in zip(variables, grads):
        if g is not None:
          v.assign_sub(0.02 * g)
      with tf.GradientTape() as tape:
        loss = loss_of(module(images, trainable=True))
      grads = tape.gradient(loss, variables)
      losses.append(float(loss))
    result['losses'] = losses
    print('RESULT ' + json.dumps(result))
''')


def _randomize_batch_norm(model, seed=0):
  """BN statistics/affine away from their initial values, so inference != training and every
  block's zero-initialised gamma passes gradients."""
  rng = np.random.RandomState(seed)
  for v in model.variables:
    if v.name in ('gamma', 'moving_variance'):
      v.assign(rng.uniform(0.5, 1.5, v.shape).astype(np.float32))
    elif v.name in ('beta', 'moving_mean'):
      v.assign(rng.normal(0, 0.1, v.shape).astype(np.float32))


def _images(n, size, seed):
  return np.random.RandomState(seed).uniform(size=(n, size, size, 3)).astype(np.float32)


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """A global-BN ResNet-18 built under a 2-replica MirroredStrategy (as in training), exported by
  export_step into a model_dir that already holds exports; references computed in memory."""
  keras.utils.set_random_seed(0)
  strategy = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])
  config = ModelConfig(resnet_depth=18, cifar_stem=True, global_bn=True, proj_out_dim=16,
                       num_proj_layers=2)
  with strategy.scope():
    model = simclr.build_model(config, NUM_CLASSES).build_for_size(16)
  _randomize_batch_norm(model)
  model_dir = tmp_path_factory.mktemp('model_dir')
  root = model_dir / run_dir.EXPORT_SUBDIR
  for name in ('10', '20', 'notes', str(STEP)):
    (root / name).mkdir(parents=True)
  (root / str(STEP) / 'stale.txt').write_text('from an earlier run')
  export_dir = export.export_step(model, str(model_dir), STEP, keep_hub_module_max=2)
  ckpt = tf.train.Checkpoint(model=model).save(str(model_dir / 'ckpt'))
  snapshot = {p: v.numpy() for p, v in weights.match.object_variable_paths(model, 'model').items()}

  ref = {'labels': np.arange(6) % NUM_CLASSES}
  for size, n in ((16, 6), (24, 3)):
    ref[f'images{size}'] = _images(n, size, seed=size)
    for k, v in model(tf.constant(ref[f'images{size}']), training=False).items():
      ref[f'eval{size}/{k}'] = v.numpy()
  # Training-mode reference last: it moves the in-memory BN statistics (not the export's).
  with tf.GradientTape() as tape:
    outputs = model(tf.constant(ref['images16']), training=True)
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.constant(ref['labels']), logits=outputs['logits_sup']))
  grads = tape.gradient(loss, model.trainable_variables)
  ref.update({f'train16/{k}': v.numpy() for k, v in outputs.items()})
  ref.update({f'grad/{i}': g.numpy() for i, g in enumerate(grads) if g is not None})
  return dict(model=model, config=config, model_dir=model_dir, export_dir=export_dir, ckpt=ckpt,
              snapshot=snapshot, ref=ref, grads=grads,
              encoder_indices=[i for i, v in enumerate(model.trainable_variables)
                               if any(v is w for w in model.encoder.trainable_variables)])


@pytest.fixture(scope='module')
def child_result(exported, tmp_path_factory):
  work = tmp_path_factory.mktemp('fresh_process')
  ref_path = work / 'ref.npz'
  np.savez(ref_path, **exported['ref'])
  script = work / 'child.py'
  script.write_text(CHILD)
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'
  proc = subprocess.run([sys.executable, str(script), exported['export_dir'], str(ref_path)],
                        cwd=str(work), env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')][-1]
  return json.loads(line[len('RESULT '):]), proc.stderr


def test_export_step_replaces_and_prunes(exported):
  root = exported['model_dir'] / run_dir.EXPORT_SUBDIR
  assert exported['export_dir'] == str(root / str(STEP))
  assert sorted(os.listdir(root)) == ['20', str(STEP), 'notes']  # 10 pruned, 'notes' kept
  assert (root / str(STEP) / 'saved_model.pb').exists()
  assert not (root / str(STEP) / 'stale.txt').exists()
  assert export.exported_steps(str(root)) == [20, STEP]
  with pytest.raises(FileNotFoundError, match='saved_model'):
    export.load(str(exported['model_dir'] / 'nothing_here'))


@pytest.mark.slow
def test_fresh_process_is_independent_of_the_project(child_result):
  result, stderr = child_result
  assert not result['tf_simclr_importable']
  # A synchronized BN traced as such leaves custom-gradient all-reduces that a SavedModel drops.
  assert 'unsaved custom gradients' not in stderr


@pytest.mark.slow
@pytest.mark.parametrize('size', ['16', '24'])
def test_reloaded_endpoints_match_the_model(child_result, exported, size):
  diffs = child_result[0]['inference'][size]
  expected = {k.split('/', 1)[1] for k in exported['ref'] if k.startswith(f'eval{size}/')}
  assert set(diffs) == expected == set(simclr.ENCODER_ENDPOINTS) | {
      simclr.PROJ_HEAD_INPUT, simclr.PROJ_HEAD_OUTPUT, simclr.LOGITS_SUP}
  assert max(diffs.values()) <= 1e-5, diffs


@pytest.mark.slow
def test_serving_signature_and_tfsm_layer(child_result):
  for name in ('serving', 'tfsm_layer'):
    diffs = child_result[0][name]
    assert len(diffs) == 10 and max(diffs.values()) <= 1e-5, (name, diffs)


@pytest.mark.slow
def test_reloaded_module_fine_tunes_through_global_bn(child_result, exported):
  result = child_result[0]
  assert result['num_variables'] == len(exported['model'].trainable_variables)
  # Same training-mode outputs as the model with synchronized BN (values up to ~10; BN over
  # 6 images amplifies float noise to ~7e-5, using moving statistics instead would be off by ~1).
  assert max(result['train'].values()) <= 5e-4, result['train']
  # The projection head does not feed the loss: no gradient in memory, zeros after reloading.
  ref_none = [i for i, g in enumerate(exported['grads']) if g is None]
  assert [i for i, s in enumerate(result['gradients']) if s != 'ok'] == ref_none, result
  encoder = exported['encoder_indices']
  assert len(encoder) == len(exported['model'].encoder.trainable_variables) == 63
  assert all(result['gradients'][i] == 'ok' for i in encoder)
  # The in-memory model's gradients (relative L2 error over all variables). Typically ~5e-6; a
  # ReLU input within float noise of 0 can flip in one of the two computations (seen up to 3e-3),
  # while a gradient that ignored the batch statistics would be off by O(1).
  assert result['gradient_rel_err'] <= 1e-2, result['gradient_rel_err']
  losses = result['losses']
  assert losses[-1] < losses[0] - 0.05, losses


def test_export_has_no_custom_gradient_all_reduce(exported):
  """The reason for the local-BN trace: a plain trace of a global-BN model holds all-reduces with
  custom gradients (IdentityN) that a SavedModel cannot keep; the exported graph has none, and the
  model's BN layers stay synchronized after the export."""
  model = exported['model']
  plain = tf.function(lambda x: model(x, training=True)).get_concrete_function(
      export.IMAGES_SPEC)
  assert [op for op in plain.graph.get_operations() if '_gradient_op_type' in op.node_def.attr]
  saved = saved_model_pb2.SavedModel()
  saved.ParseFromString((exported['model_dir'] / run_dir.EXPORT_SUBDIR / str(STEP) /
                         'saved_model.pb').read_bytes())
  functions = saved.meta_graphs[0].graph_def.library.function
  assert any(node.op == 'FusedBatchNormV3' or node.op == 'Mean'
             for f in functions for node in f.node_def)  # the graphs are there
  assert not [node.name for f in functions for node in f.node_def
              if '_gradient_op_type' in node.attr]
  bns = [l for l in model._flatten_layers() if isinstance(l, keras.layers.BatchNormalization)]
  assert bns and all(l.synchronized for l in bns)


def test_load_pretrained_restores_own_export_and_checkpoint_exactly(exported):
  """--checkpoint accepts our export (SavedModel folder or model_dir/saved_model), our checkpoint
  prefix and our model_dir; every variable, BN statistics included, comes back bit for bit."""
  model = simclr.build_model(exported['config'], NUM_CLASSES).build_for_size(16)
  root = str(exported['model_dir'] / run_dir.EXPORT_SUBDIR)
  for path in (exported['export_dir'], root, exported['ckpt'], str(exported['model_dir'])):
    for v in model.variables:
      v.assign(tf.zeros_like(v))
    report = weights.match.load(model, path)
    assert report.restored == len(exported['snapshot']) == len(model.variables)
    assert not report.fresh and not report.ignored
    got = weights.match.object_variable_paths(model, 'model')
    assert set(got) == set(exported['snapshot'])
    for p, value in exported['snapshot'].items():
      np.testing.assert_array_equal(got[p].numpy(), value, err_msg=f'{path}: {p}')
  source = weights.source.resolve(root)
  assert source.origin == weights.source.OURS and source.saved_model
  assert weights.original.describe(source) == dict(
      resnet_depth=18, width_multiplier=1, cifar_stem=True, sk_ratio=0.0, se_ratio=0.0,
      proj_head_mode='nonlinear', num_proj_layers=2, proj_out_dim=16, num_classes=NUM_CLASSES)


def test_pruning_never_deletes_the_export_just_written_or_a_newer_one(tmp_path):
  """--keep_hub_module_max counts exports, oldest first; re-exporting an older step (its newer
  checkpoint damaged) keeps itself and the newer exports."""
  root = tmp_path / 'saved_model'
  for step in (2, 4, 8):
    (root / str(step)).mkdir(parents=True)
  assert export.prune_exports(str(root), 1, written=4) == [2]
  assert sorted(os.listdir(root)) == ['4', '8']
  (root / '9').mkdir()
  assert export.prune_exports(str(root), 2, written=9) == [4]
  assert sorted(os.listdir(root)) == ['8', '9']
  assert export.prune_exports(str(root), 0, written=9) == []
