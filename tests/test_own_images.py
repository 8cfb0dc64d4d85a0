"""Your own images end to end: an unlabelled nested folder (`images:PATH`) is pretrained
on, embedded (`--mode=embed`), exported with `--mode=export --model_dir` alone, all as run.py
command lines (flags -> Config -> modes.run, in this process), and the export is reloaded in a
fresh process without tf_simclr.

Every image is one constant colour (sizes differ), so its eval view is that colour at 16 x 16 px
whatever the resize; the fresh process feeds those views to the export itself, which checks the
rows of features.npy, their order and paths.txt without using the embed pipeline.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from helpers import run_argv
from tf_simclr.run import modes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--image_size=16', '--resnet_depth=18', '--width_multiplier=0.125', '--proj_out_dim=8',
        '--num_proj_layers=2', '--train_batch_size=8', '--train_steps=2', '--checkpoint_steps=2',
        '--use_blur=False', '--seed=1', '--learning_rate=0.1']
NUM_IMAGES = 64


def make_folder(root):
  """64 constant-colour images nested two levels deep (PNG and JPEG, upper- and lower-case
  extensions, sizes 17-30 px), plus a corrupt .jpg, a text file and a hidden image.
  Returns the sorted relative paths of the good images."""
  rng = np.random.RandomState(0)
  colours = rng.choice(256 ** 3, NUM_IMAGES, replace=False)
  names = []
  for i, c in enumerate(colours):
    rgb = np.array([c // 65536, c // 256 % 256, c % 256], np.uint8)
    folder = os.path.join(root, f'2024-0{i % 3 + 1}', f'cam{i % 2}') if i % 4 else root
    os.makedirs(folder, exist_ok=True)
    ext = ('png', 'PNG', 'jpg', 'JPEG')[i % 4]
    path = os.path.join(folder, f'img{i:03d}.{ext}')
    Image.fromarray(np.tile(rgb, (17 + i % 7, 30 - i % 5, 1))).save(
        path, format='PNG' if ext.lower() == 'png' else 'JPEG')
    names.append(os.path.relpath(path, root))
  with open(os.path.join(root, '2024-01', 'broken.jpg'), 'wb') as f:
    f.write(b'\xff\xd8 not really a jpeg')
  with open(os.path.join(root, 'notes.txt'), 'w') as f:
    f.write('not an image\n')
  shutil.copy(os.path.join(root, names[1]), os.path.join(root, '.hidden.png'))
  return sorted(names)


# Runs in a fresh interpreter outside the project: only TensorFlow, numpy and the export.
CHILD = textwrap.dedent('''
    import importlib.util, json, sys
    # As on a machine without tf_simclr, also where `pip install -e .` put it on every path:
    # an import of it fails, and find_spec reports it missing.
    sys.modules['tf_simclr'] = None
    import numpy as np
    import tensorflow as tf

    export_dir, embed_dir = sys.argv[1], sys.argv[2]
    module = tf.saved_model.load(export_dir)
    paths = open(embed_dir + '/paths.txt').read().splitlines()
    features = np.load(embed_dir + '/features.npy')
    views, constant = [], True
    for path in paths:
      image = tf.io.decode_image(tf.io.read_file(path), channels=3).numpy()
      constant &= bool(np.all(image == image[:1, :1]))
      views.append(np.broadcast_to(image[0, 0] / np.float32(255), (16, 16, 3)))
    out = module(tf.constant(np.stack(views), tf.float32), trainable=False)
    expected = out['final_avg_pool'].numpy()
    print('RESULT ' + json.dumps({
        'tf_simclr_importable': importlib.util.find_spec('tf_simclr') is not None,
        'constant': constant, 'shape': list(features.shape), 'dtype': str(features.dtype),
        'max_diff': float(np.max(np.abs(features - expected))),
        'scale': float(np.max(np.abs(expected))),
        'distinct_rows': len({r.tobytes() for r in np.round(expected, 4)})}))
''')


@pytest.fixture(scope='module')
def journey(tmp_path_factory):
  """pretrain (images:) -> embed -> export --model_dir alone -> reload in a fresh process."""
  work = tmp_path_factory.mktemp('own_images')
  images = work / 'photos'
  names = make_folder(str(images))
  model_dir = work / 'run'
  out = {'names': names, 'images': images, 'model_dir': model_dir, 'logs': {}}
  # Training exports nothing here, so the export checked below is --mode=export's own.
  _, out['logs']['train'] = run_argv(
      [f'--dataset=images:{images}', f'--model_dir={model_dir}', '--skip_bad_images', *TINY],
      export_fn=modes.no_export)
  _, out['logs']['embed'] = run_argv(['--mode=embed', f'--model_dir={model_dir}',
                                      '--eval_batch_size=24'])
  # The export reads no dataset: the photos may be gone by now.
  moved = work / 'photos_moved'
  images.rename(moved)
  try:
    _, out['logs']['export'] = run_argv(['--mode=export', f'--model_dir={model_dir}'])
  finally:
    moved.rename(images)
  script = work / 'child.py'
  script.write_text(CHILD)
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  export_dir = model_dir / 'saved_model' / '2'
  child = subprocess.run([sys.executable, str(script), str(export_dir),
                          str(model_dir / 'embeddings' / 'train')],
                         cwd=str(work), env=env, capture_output=True, text=True, timeout=300)
  assert child.returncode == 0, child.stderr[-3000:]
  line = [l for l in child.stdout.splitlines() if l.startswith('RESULT ')][-1]
  out['child'] = json.loads(line[len('RESULT '):])
  return out


@pytest.mark.slow
def test_pretraining_on_unlabelled_folder_trains_contrastive_only(journey):
  log = journey['logs']['train']
  assert '65 images; skipped 1 hidden file(s)/folder(s) and 1 non-image file(s)' in log
  assert 'left out 1 of 65 images' in log and 'broken.jpg' in log
  assert 'is unlabelled: training the contrastive objective alone' in log
  record = json.loads((journey['model_dir'] / 'flags.json').read_text())
  assert record['dataset'] == f'images:{journey["images"]}'
  assert 'supervised_loss' not in log and 'contrast_loss' in log


@pytest.mark.slow
def test_embed_writes_one_row_per_image_with_its_path(journey):
  embed_dir = journey['model_dir'] / 'embeddings' / 'train'
  # No labels: unlabelled (the rest are the TensorBoard projector's files, tests/test_inspect.py).
  assert {'features.npy', 'paths.txt'} <= set(os.listdir(embed_dir))
  assert 'labels.npy' not in os.listdir(embed_dir)
  paths = (embed_dir / 'paths.txt').read_text().splitlines()
  assert sorted(os.path.relpath(p, journey['images']) for p in paths) == journey['names']
  assert len(set(paths)) == NUM_IMAGES
  assert f'Wrote {NUM_IMAGES} rows of final_avg_pool to {embed_dir}' in journey['logs']['embed']
  child = journey['child']
  assert child['shape'] == [NUM_IMAGES, 64] and child['dtype'] == 'float32'


@pytest.mark.slow
def test_embedded_rows_match_the_reloaded_export_row_by_row(journey):
  child = journey['child']
  assert not child['tf_simclr_importable']
  assert child['constant']  # The eval view of every image is its colour (premise of the check).
  assert child['distinct_rows'] == NUM_IMAGES  # A row swap would show.
  # float32 ResNet-18 inference on the same inputs, batched differently: rounding ~1e-6 relative.
  assert child['max_diff'] <= 1e-4 * max(1.0, child['scale']), child


@pytest.mark.slow
def test_export_needs_only_model_dir(journey):
  log = journey['logs']['export']
  assert 'Exported the hub module to' not in journey['logs']['train']  # training exported nothing
  assert 'Exported the hub module to' in log
  assert 'images; skipped' not in log and 'Dataset ' not in log  # No dataset was resolved.
  assert (journey['model_dir'] / 'saved_model' / '2' / 'saved_model.pb').exists()
