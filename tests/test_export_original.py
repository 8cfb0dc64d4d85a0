"""`run.py --mode=export --checkpoint=<the original's SavedModel>` with no training run writes our
SavedModel of those weights, the architecture read off the variables (weights.original.describe);
reloaded in a fresh process without tf_simclr it reproduces the original's outputs and fine-tunes
(google-research/simclr#116, #108: the published exports could not be fine-tuned)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from tf_simclr.errors import ConfigError

from helpers import config_from_argv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = textwrap.dedent('''
    import importlib.util, json, sys
    # As on a machine without tf_simclr, also where `pip install -e .` put it on every path:
    # an import of it fails, and find_spec reports it missing.
    sys.modules['tf_simclr'] = None
    import numpy as np
    import tensorflow as tf

    module = tf.saved_model.load(sys.argv[1])
    ref = np.load(sys.argv[2])
    images = tf.constant(ref['images'])
    out = module(images, trainable=False)
    diffs = {k: float(np.max(np.abs(out[k].numpy() - ref[k]))) for k in ref.files if k != 'images'}
    variables = module.trainable_variables_list
    with tf.GradientTape() as tape:
      train = module(images, trainable=True)
      labels = tf.constant(np.arange(6) % 10)
      loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
          labels=labels, logits=train['logits_sup'])) + tf.reduce_mean(
              tf.square(train['proj_head_output']))
    grads = tape.gradient(loss, variables)
    print('RESULT ' + json.dumps({
        'tf_simclr_importable': importlib.util.find_spec('tf_simclr') is not None,
        'diffs': diffs, 'num_variables': len(variables),
        'no_gradient': [v.name for v, g in zip(variables, grads)
                        if g is None or not np.any(g.numpy())]}))
''')


@pytest.mark.slow
def test_original_saved_model_exports_to_a_fine_tunable_module(original_fixture_dir, tmp_path):
  # Only the variables, without the flags.json beside them: the architecture must be inferred.
  weights = tmp_path / 'original'
  shutil.copytree(original_fixture_dir / 'saved_model', weights / 'saved_model')
  model_dir = tmp_path / 'converted'
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='')
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'run.py'), '--mode=export',
                         f'--checkpoint={weights / "saved_model"}', f'--model_dir={model_dir}'],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Read from the variables of' in proc.stderr and '--resnet_depth=18' in proc.stderr
  assert '--image_size=32' in proc.stderr
  assert sorted(os.listdir(model_dir)) == ['saved_model']  # No flags.json: nothing was trained.
  (export_dir,) = [model_dir / 'saved_model' / s for s in os.listdir(model_dir / 'saved_model')]
  script = tmp_path / 'child.py'
  script.write_text(CHILD)
  child_env = {k: v for k, v in env.items() if k != 'PYTHONPATH'}
  child = subprocess.run([sys.executable, str(script), str(export_dir),
                          str(original_fixture_dir / 'expected_outputs.npz')],
                         cwd=str(tmp_path), env=child_env, capture_output=True, text=True,
                         timeout=300)
  assert child.returncode == 0, child.stderr[-3000:]
  result = json.loads([l for l in child.stdout.splitlines() if l.startswith('RESULT ')][-1][7:])
  assert not result['tf_simclr_importable']
  assert set(result['diffs']) >= {'initial_conv', 'block_group4', 'final_avg_pool',
                                  'proj_head_output', 'logits_sup'}
  # The fixture's bar for an importer of these weights (its README): max abs diff <= 1e-4.
  assert max(result['diffs'].values()) <= 1e-4, result['diffs']
  assert result['num_variables'] > 60 and result['no_gradient'] == []


def test_contradicting_architecture_flag_names_both_values(original_fixture_dir, tmp_path):
  """In-process: the flags are checked against the variables before anything is written."""
  weights = tmp_path / 'original'
  shutil.copytree(original_fixture_dir / 'saved_model', weights / 'saved_model')
  with pytest.raises(ConfigError, match='--resnet_depth=50 here but 18 in the run'):
    config_from_argv(['--mode=export', f'--checkpoint={weights / "saved_model"}',
                      '--resnet_depth=50', f'--model_dir={tmp_path / "out"}'])
  assert not (tmp_path / 'out').exists()
