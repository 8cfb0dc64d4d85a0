"""Seeing what a model learned: TensorBoard projector files from --mode=embed, nearest
neighbours, near-duplicate groups and the augmentation preview, on a tiny model trained for two
steps on a folder of distinct images with planted copies (a flip, a JPEG re-encode, a resize).

The distinct images are two random colours split at a random column: their embeddings differ
clearly, while a copy keeps the colours and (up to resampling) the layout. Numbers are checked
against numpy on features.npy and against the images themselves, not against the code's output.
"""

import csv
import os

from absl import flags as absl_flags
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests import helpers
from tf_simclr.run import modes

NUM_DISTINCT = 20
TINY = ['--image_size=32', '--resnet_depth=18', '--width_multiplier=0.125', '--proj_out_dim=8',
        '--num_proj_layers=2', '--train_batch_size=8', '--train_steps=2', '--checkpoint_steps=2',
        '--use_blur=False', '--seed=1', '--learning_rate=0.1', '--eval_batch_size=16']
# Planted copies: (file name, original index, how it was made).
PLANTED = (('copy_flip.png', 0, 'flip'), ('copy_jpeg.jpg', 1, 'jpeg'),
           ('copy_resized.png', 2, 'resize'))


def distinct_image(rng, size=40):
  """Two random colours split at a random column (so a flip changes the image)."""
  left, right = rng.randint(0, 256, (2, 3))
  cut = rng.randint(size // 5, size // 2)
  image = np.empty([size, size, 3], np.uint8)
  image[:, :cut], image[:, cut:] = left, right
  return image


def make_folder(root):
  """NUM_DISTINCT distinct images img00.png.. plus the PLANTED copies; returns their paths."""
  os.makedirs(root)
  rng = np.random.RandomState(3)
  images = [distinct_image(rng) for _ in range(NUM_DISTINCT)]
  for i, image in enumerate(images):
    Image.fromarray(image).save(os.path.join(root, f'img{i:02d}.png'))
  helpers.save_planted_copies(root, images, PLANTED, resize_to=56, quality=90)
  return images


def run(argv):
  """A run.py command line in this process (training writes flags.json as run.py does)."""
  config = helpers.config_from_argv(argv)
  flags = helpers.run_cli().serializable_flags(absl_flags.FLAGS)
  return modes.run(config, flags, export_fn=modes.no_export)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  work = tmp_path_factory.mktemp('inspect')
  folder, model_dir = str(work / 'photos'), str(work / 'run')
  images = make_folder(folder)
  run([f'--dataset=images:{folder}', f'--model_dir={model_dir}'] + TINY)
  run(['--mode=embed', f'--model_dir={model_dir}'])
  embed_dir = os.path.join(model_dir, 'embeddings', 'train')
  paths = open(os.path.join(embed_dir, 'paths.txt')).read().splitlines()
  return {'folder': folder, 'model_dir': model_dir, 'embed_dir': embed_dir, 'images': images,
          'paths': paths, 'features': np.load(os.path.join(embed_dir, 'features.npy'))}


def cosine(a, b):
  a, b = np.float64(a), np.float64(b)
  return a @ b / np.linalg.norm(a) / np.linalg.norm(b)


@pytest.mark.slow  # the module's training run (~25 s) starts here
def test_projector_files_load_in_tensorboards_projector_plugin(trained):
  from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
  from tensorboard.plugins import base_plugin
  from tensorboard.plugins.projector import projector_plugin
  from werkzeug import test as wtest, wrappers
  logdir = trained['model_dir']
  multiplexer = plugin_event_multiplexer.EventMultiplexer()
  multiplexer.AddRunsFromDirectory(logdir)
  multiplexer.Reload()
  plugin = projector_plugin.ProjectorPlugin(base_plugin.TBContext(
      logdir=logdir, data_provider=data_provider.MultiplexerDataProvider(multiplexer, logdir)))
  apps = plugin.get_plugin_apps()

  def get(route, **args):
    response = wtest.Client(apps[route], wrappers.Response).get(route, query_string=args)
    assert response.status_code == 200, (route, response.get_data(as_text=True))
    return response

  assert set(get('/runs').json) == {'.', os.path.join('embeddings', 'train')}
  # The embedding's own run, and model_dir's (".", the one TensorBoard opens first): there, only
  # the embedding, none of the training checkpoint's 2-D variables.
  for run_name in get('/runs').json:
    check_projector_run(get, run_name, trained)


def check_projector_run(get, run_name, trained):
  config = get('/info', run=run_name).json
  (embedding,) = config['embeddings']
  features, paths = trained['features'], trained['paths']
  assert embedding['tensorShape'] == list(features.shape)
  name = embedding['tensorName']
  tensor = np.frombuffer(get('/tensor', run=run_name, name=name).get_data(), np.float32)
  np.testing.assert_array_equal(tensor.reshape(features.shape), features)
  metadata = get('/metadata', run=run_name, name=name).get_data(as_text=True).splitlines()
  assert metadata[0] == 'row\tpath'
  assert [line.split('\t')[1] for line in metadata[1:]] == paths
  sprite = Image.open(__import__('io').BytesIO(get('/sprite_image', run=run_name,
                                                   name=name).get_data()))
  px = embedding['sprite']['singleImageDim']
  per_row = int(np.ceil(np.sqrt(len(paths))))
  assert sprite.size == (per_row * px[0], per_row * px[1])
  # Thumbnail 5 is image 5's colours (its eval view, enlarged): left and right colour at mid-row.
  index = paths.index(os.path.join(trained['folder'], 'img05.png'))
  thumb = np.asarray(sprite)[(index // per_row) * px[1]:(index // per_row + 1) * px[1],
                             (index % per_row) * px[0]:(index % per_row + 1) * px[0]]
  original = trained['images'][5]
  np.testing.assert_allclose(thumb[px[1] // 2, 0], original[20, 0], atol=2)
  np.testing.assert_allclose(thumb[px[1] // 2, -1], original[20, -1], atol=2)


def test_sample_rows_caps_and_sprite_fits():
  from tf_simclr.evaluation import projector
  rows = projector.sample_rows(1_000_000)
  assert len(rows) == projector.MAX_POINTS and rows[0] == 0 and rows[-1] == 999_999
  assert np.all(np.diff(rows) > 0)
  px = projector.thumbnail_px(len(rows))
  assert int(np.ceil(np.sqrt(len(rows)))) * px <= 8192
  np.testing.assert_array_equal(projector.sample_rows(7), np.arange(7))


@pytest.mark.slow  # the module's trained model
def test_neighbors_of_an_image_are_itself_then_its_flipped_copy(trained):
  folder, features, paths = trained['folder'], trained['features'], trained['paths']
  query = os.path.join(folder, 'img00.png')
  run(['--mode=neighbors', f'--model_dir={trained["model_dir"]}', f'--query={query}',
       '--num_neighbors=4'])
  with open(os.path.join(trained['embed_dir'], 'neighbors.csv')) as f:
    rows = list(csv.DictReader(f))
  assert [r['rank'] for r in rows] == ['1', '2', '3', '4']
  assert rows[0]['path'] == query and rows[1]['path'] == os.path.join(folder, 'copy_flip.png')
  # The similarities are numpy's cosines of features.npy rows (the query is embedded anew with
  # the same preprocessing: float32 rounding of a batched-differently forward pass).
  own = features[paths.index(query)]
  for r in rows:
    want = cosine(own, features[paths.index(r['path'])])
    assert abs(float(r['cosine_similarity']) - want) < 1e-4, (r, want)
  assert abs(float(rows[0]['cosine_similarity']) - 1.0) < 1e-4
  # Ranks are numpy's order over the whole split.
  sims = [cosine(own, row) for row in features]
  assert [r['path'] for r in rows] == [paths[i] for i in np.argsort(sims)[::-1][:4]]
  picture = Image.open(os.path.join(trained['embed_dir'], 'neighbors.png'))
  assert picture.size[0] > 5 * 96  # query + 4 neighbours


def test_top_k_matches_numpy_across_chunks():
  from tf_simclr.evaluation import neighbors
  rng = np.random.RandomState(0)
  bank, queries = rng.randn(1000, 16), rng.randn(5, 16)
  sims, rows = neighbors.top_k(queries, bank, 7, chunk_rows=64)
  full = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
      bank / np.linalg.norm(bank, axis=1, keepdims=True)).T
  np.testing.assert_array_equal(rows, np.argsort(-full, axis=1)[:, :7])
  np.testing.assert_allclose(sims, np.take_along_axis(full, rows, axis=1), atol=1e-5)


@pytest.mark.slow  # the module's trained model
def test_duplicates_finds_the_planted_copies_and_nothing_else(trained):
  folder, features, paths = trained['folder'], trained['features'], trained['paths']
  # A two-step model is nearly its random init: ReLU features of all images point alike
  # (distinct pairs: median 0.97, max 0.9991), the copies >= 0.99985; the premise is checked below.
  threshold = 0.9995
  run(['--mode=duplicates', f'--model_dir={trained["model_dir"]}',
       f'--threshold={threshold}'])
  with open(os.path.join(trained['embed_dir'], 'duplicates.csv')) as f:
    rows = list(csv.DictReader(f))
  groups = {}
  for r in rows:
    groups.setdefault(r['group'], set()).add(os.path.basename(r['path']))
  want = {frozenset({f'img{index:02d}.png', name}) for name, index, _ in PLANTED}
  assert {frozenset(g) for g in groups.values()} == want
  # The premise, from numpy: every planted pair is above the threshold, every other pair below.
  planted = {frozenset({os.path.join(folder, f'img{i:02d}.png'), os.path.join(folder, n)})
             for n, i, _ in PLANTED}
  for i in range(len(paths)):
    for j in range(i + 1, len(paths)):
      sim = cosine(features[i], features[j])
      assert (sim >= threshold) == (frozenset({paths[i], paths[j]}) in planted), (
          paths[i], paths[j], sim)
  assert os.path.exists(os.path.join(trained['embed_dir'], 'duplicates.png'))


def test_components_link_chains():
  from tf_simclr.evaluation import duplicates
  features = np.array([[1, 0], [0.999, 0.045], [0.996, 0.09], [0, 1], [-1, 0]], np.float32)
  pairs = duplicates.similar_pairs(features, 0.998, block_elements=3)
  assert sorted(map(tuple, pairs.tolist())) == [(0, 1), (1, 2)]  # 0~2 is 0.996 only
  assert duplicates.components(5, pairs) == [[0, 1, 2]]


def preview_tiles(path, count, pairs, px=96, gap=4):
  """The tiles of augment_preview.png: (count, 1 + 2 * pairs, px, px, 3), from the grid layout."""
  from tf_simclr.evaluation import pictures
  picture = np.asarray(Image.open(path).convert('RGB'))
  row_px = 2 * (pictures.CAPTION_PX + 2) + px + gap
  tiles = np.zeros([count, 1 + 2 * pairs, px, px, 3], np.uint8)
  for r in range(count):
    top = gap + r * row_px + pictures.CAPTION_PX + 2
    for c in range(1 + 2 * pairs):
      left = gap + c * (px + gap)
      tiles[r, c] = picture[top:top + px, left:left + px]
  return tiles


@pytest.mark.slow  # the module's trained model
@pytest.mark.parametrize('strength', [0.0, 1.0])
def test_preview_views_are_crops_and_flips_only_without_colour_jitter(trained, strength):
  """Without jitter or blur a view is a crop (resized) of the image, maybe flipped: most of its
  pixels are the image's two colours exactly (mixtures only along the cut); with jitter, not."""
  model_dir = trained['model_dir']
  run(['--mode=preview_augment', f'--model_dir={model_dir}', '--num_preview_images=3',
       '--num_preview_pairs=4', f'--color_jitter_strength={strength}', '--use_blur=False'])
  tiles = preview_tiles(os.path.join(model_dir, 'augment_preview.png'), 3, 4)
  first = [tf.io.decode_image(tf.io.read_file(p), channels=3).numpy()
           for p in trained['paths'][:3]]
  off_colour = []
  for image, row in zip(first, tiles):
    left, right = np.float64(image[0, 0]), np.float64(image[0, -1])
    for view in row[1:]:
      pixels = view.reshape(-1, 3).astype(np.float64)
      # Distance of each pixel to the segment between the two colours (mixtures at the cut).
      t = np.clip((pixels - left) @ (right - left) / max((right - left) @ (right - left), 1),
                  0, 1)
      off_colour.append(np.median(np.linalg.norm(
          pixels - (left + t[:, None] * (right - left)), axis=1)))
  if strength == 0.0:
    # Most pixels of a view lie away from the cut: exact colours up to one unit of rounding per
    # channel (sqrt(3)), or a few units more where a small crop enlarged ~3x spreads the bicubic
    # ringing of the cut over half the view (2.4 seen); jitter moves medians past 10.
    assert max(off_colour) <= 5.0, off_colour
  else:
    assert np.median(off_colour) > 10, off_colour


REFUSALS = [
    (['--mode=neighbors', '--query=/no/such/image.png'], '--query='),
    (['--mode=duplicates', '--threshold=1.5'], '--threshold=1.5'),
    (['--mode=neighbors'], '--query'),
]

# One process runs each refused command line in turn through the command line's own entry point
# (tf_simclr.cli.run: absl's app.run, main, sys.exit), flags reset in between, and reports each
# exit status; a marker line on stderr separates their messages.
REFUSAL_CHILD = """
import json, sys
from tf_simclr import cli
codes = []
for index, argv in enumerate(json.loads(sys.argv[1])):
  cli.FLAGS.unparse_flags()
  sys.argv = ['run.py', *argv]
  sys.stderr.write(f'=== command {index}\\n')
  sys.stderr.flush()
  try:
    cli.run()
    codes.append(0)
  except SystemExit as e:
    codes.append(e.code if isinstance(e.code, int) else (0 if e.code is None else 1))
  sys.stderr.flush()
print('CODES ' + json.dumps(codes))
"""


@pytest.fixture(scope='module')
def refusals(tmp_path_factory):
  """{argv: (exit status, stderr, model_dir)} of REFUSALS, each on a model_dir of its own."""
  import json
  import subprocess
  import sys
  work = tmp_path_factory.mktemp('refusals')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  model_dirs = [work / f'new_run{i}' for i in range(len(REFUSALS))]
  commands = [[*argv, f'--model_dir={model_dir}', '--dataset=shapes10', '--image_size=16']
              for (argv, _), model_dir in zip(REFUSALS, model_dirs)]
  result = subprocess.run(
      [sys.executable, '-c', REFUSAL_CHILD, json.dumps(commands)],
      cwd=root, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2',
               PYTHONPATH=root + os.pathsep + os.environ.get('PYTHONPATH', '')))
  assert result.returncode == 0, result.stderr[-3000:]
  codes = json.loads([l for l in result.stdout.splitlines() if l.startswith('CODES ')][-1][6:])
  stderr = result.stderr.split('=== command ')[1:]
  assert len(codes) == len(stderr) == len(REFUSALS), result.stderr[-3000:]
  return {tuple(argv): (code, err, model_dir) for (argv, _), code, err, model_dir
          in zip(REFUSALS, codes, stderr, model_dirs)}


@pytest.mark.parametrize('argv, message', REFUSALS)
def test_refusals_exit_2_and_leave_nothing(refusals, argv, message):
  code, stderr, model_dir = refusals[tuple(argv)]
  assert code == 2, stderr[-2000:]
  assert message in stderr
  assert not model_dir.exists()


def test_no_embeddings_and_no_checkpoint_is_refused(tmp_path):
  from tf_simclr.errors import CheckpointNotFoundError
  model_dir = tmp_path / 'empty'
  with pytest.raises(CheckpointNotFoundError, match='no embeddings .* and no checkpoint'):
    run(['--mode=duplicates', f'--model_dir={model_dir}', '--dataset=shapes10',
         '--image_size=16'])
  assert not model_dir.exists()
