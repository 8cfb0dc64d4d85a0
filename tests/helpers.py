"""Helpers shared by test modules (fixtures live in conftest.py): tiny configs and builders."""

import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

from absl import flags as absl_flags
import numpy as np
import tensorflow as tf

from tf_simclr import config as cfg
from tf_simclr import weights
from tf_simclr.optim import decay, lars
from tf_simclr.run import modes
from tf_simclr.train import assemble, loop, tasks

TINY_MODEL = dict(resnet_depth=18, width_multiplier=1, cifar_stem=True, proj_out_dim=16,
                  num_proj_layers=2)


def tiny_config(model_dir, **overrides):
  """A Config for 16 px shapes10 runs of a few steps (readouts off: tests/test_probe.py)."""
  sections = {'model': {}, 'data': {}, 'optim': {}, 'train': {}, 'probe': {}}
  for key, value in overrides.items():
    section, name = key.split('__')
    sections[section][name] = value
  train_mode = sections['train'].get('train_mode', 'pretrain')
  # The run's model as run.py builds it (linear eval while pretraining), then any overrides.
  image_size = sections['data'].get('image_size', 16)
  architecture = {k: v for k, v in TINY_MODEL.items() if k != 'cifar_stem'}  # from image_size
  model = cfg.model_config(train_mode, image_size, lineareval_while_pretraining=True,
                           **architecture)
  model = dataclasses.replace(model, **sections['model'])
  data = cfg.DataConfig(**{'dataset': 'shapes10', 'eval_split': 'test', 'image_size': 16,
                           'use_blur': True, 'color_jitter_strength': 0.5, **sections['data']})
  optim = cfg.OptimConfig(**{'learning_rate': 0.1, 'weight_decay': 1e-4, 'warmup_epochs': 0,
                             **sections['optim']})
  train = cfg.TrainConfig(**{'model_dir': str(model_dir), 'train_batch_size': 8,
                             'train_steps': 3, 'checkpoint_steps': 2, 'eval_batch_size': 50,
                             'eval_steps': 2, 'temperature': 0.5, 'seed': 1,
                             **sections['train']})
  probe = cfg.ProbeConfig(**{'knn': False, 'linear_probe': False, **sections['probe']})
  return cfg.Config(model=model, data=data, optim=optim, train=train, probe=probe)


def build_state(config, model_dir):
  """(model, optimizer, TrainState) of `config`'s run, built as training builds them."""
  ctx = modes.prepare(config)
  built = assemble.assemble_trainer(config, ctx.strategy, ctx.steps, ctx.num_classes)
  assert built.state.model_dir == str(model_dir)
  return built.model, built.optimizer, built.state


def checkpoint_values(path):
  """{structural path below model/: value} of a checkpoint, read without any model object."""
  reader = tf.train.load_checkpoint(path)
  keys = weights.source.variable_paths(reader, root_child='model')
  return {p: reader.get_tensor(k) for p, k in keys.items()}


def one_lars_step(config, model, strategy, images, labels, model_dir):
  """Runs one PretrainTask step with LARS(0.5, momentum 0.9, wd 1e-4) through loop.Trainer under
  `strategy` on (images, labels); returns ({variable path: value after}, the step's metrics)."""
  with strategy.scope():
    optimizer = lars.LARS(0.5, momentum=0.9, weight_decay=1e-4,
                          exclude_from_weight_decay=decay.lars_exclusions(model))
    optimizer.build(model.trainable_variables)
  task = tasks.PretrainTask(config, model, strategy)
  steps = cfg.Steps(train_steps=1, epoch_steps=1, warmup_steps=0, checkpoint_steps=1,
                    steps_per_loop=1, eval_steps=1)
  state = weights.state.TrainState(model, optimizer, str(model_dir), 1)
  trainer = loop.Trainer(task, optimizer, state, strategy, steps, images.shape[0],
                         str(model_dir) + '_summaries')
  dataset = strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensors((images, labels)).repeat())
  metrics = trainer.train(iter(dataset)).metrics
  values = {p: v.numpy() for p, v in weights.match.object_variable_paths(model, 'model').items()}
  return values, metrics


# Float32 training steps compared across kernels (XLA vs TensorFlow's, oneDNN vs Eigen) or replica
# counts differ only by where float32 rounding happens. Compared element by element, a weight that
# starts at 0 (BN beta, zero-init gamma) or barely moves has no scale to be relative to, and after
# a LARS step the trust ratio ||w|| / ||g|| carries the rounding of ||g|| into the whole update:
# a 1e-4 absolute bound on one element was met on one CPU and missed on another (AVX-512 with
# oneDNN). What is stable is each variable's *update* w - w0 relative to its own norm: over
# every pair of Eigen / oneDNN / XLA / 1 vs 2 replicas on the tests' two-step LARS runs it stayed
# at or below 1.6e-4 (AVX2, 2026-11-30; the AVX-512 failure was 1.3e-4 by this measure). The bugs
# these tests exist for move updates by 10-100% (no division by replicas doubles every un-adapted
# update; local negatives or per-replica BN change the loss itself), so 2e-3 sits 12x above the
# rounding spread and 50x below the smallest bug.
UPDATE_RTOL = 2e-3


def assert_same_updates(got, want, initial, rtol=UPDATE_RTOL):
  """Each variable's update from `initial` in `got` equals that in `want`, relative to its norm.

  `got`, `want`, `initial`: {variable path: array}. A variable that does not move in `want` must
  not move in `got` beyond the float32 rounding of w - w0 (4 ulps of the weights' norm).
  """
  assert got.keys() == want.keys() == initial.keys()
  worst = []
  for path, start in initial.items():
    d_got, d_want = got[path] - start, want[path] - start
    error = np.linalg.norm(d_got - d_want)
    bound = rtol * np.linalg.norm(d_want) + 4 * np.finfo(np.float32).eps * np.linalg.norm(
        want[path])
    if error > bound:
      worst.append(f'{path}: |update difference| {error:.3g} > {bound:.3g} '
                   f'(|update| {np.linalg.norm(d_want):.3g})')
  assert not worst, 'updates differ:\n' + '\n'.join(worst)


def run_cli():
  """The command line's module, tf_simclr.cli (importing it defines the absl flags)."""
  from tf_simclr import cli  # pylint: disable=g-import-not-at-top
  return cli


def parse_flags(argv):
  """Parses a run.py command line into absl's global flags (reset first, so tests do not leak)."""
  run_cli()
  fv = absl_flags.FLAGS
  fv.unparse_flags()
  fv(['run.py'] + list(argv))
  return fv


def config_from_argv(argv):
  """A run.py command line -> the Config run.py's main() would run (flags parsed, a reading mode's
  flags filled from the run's record, then validated into a Config)."""
  cli = run_cli()
  fv = parse_flags(argv)
  cli.fill_flags_from_record(fv)
  return cli.config_from_flags(fv)


_TINY_BUILDERS = {}


def tiny_tfds_builder(class_name, splits, shape, num_classes, example):
  """A TFDS GeneratorBasedBuilder class, generated offline and registered as the snake_case of
  `class_name` (e.g. TinyGrayDataset -> --dataset=tiny_gray_dataset); made once per name.

  splits: {split: number of examples}; example(split, i) -> (uint8 image of `shape`, label).
  """
  if class_name in _TINY_BUILDERS:
    return _TINY_BUILDERS[class_name]
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=shape),
            'label': tfds.features.ClassLabel(num_classes=num_classes)}),
        supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, n) for split, n in splits.items()}

  def _generate_examples(self, split, n):
    for i in range(n):
      image, label = example(split, i)
      yield i, {'image': image, 'label': int(label)}

  builder = type(class_name, (tfds.core.GeneratorBasedBuilder,), dict(
      VERSION=tfds.core.Version('1.0.0'), _info=_info, _split_generators=_split_generators,
      _generate_examples=_generate_examples, __module__=__name__))
  _TINY_BUILDERS[class_name] = builder
  return builder


def write_png(path, array):
  """Writes a uint8 (H, W, C) array as a PNG at `path`, making its folder."""
  path = str(path)
  tf.io.gfile.makedirs(os.path.dirname(path))
  tf.io.write_file(path, tf.io.encode_png(np.asarray(array, np.uint8)))


def save_planted_copies(folder, images, planted, resize_to: int, quality: int) -> None:
  """Near-duplicates of `images` in `folder`: (file name, image index, how) with how = 'flip'
  (mirror image), 'resize' (to resize_to px, bicubic) or anything else (re-encoded as the name's
  format, JPEG at `quality`)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for name, index, how in planted:
    image = Image.fromarray(images[index])
    if how == 'flip':
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
    elif how == 'resize':
      image = image.resize((resize_to, resize_to), Image.BICUBIC)
    image.save(os.path.join(folder, name), quality=quality)


def png_folder(root, per_class, classes=('a', 'b'), size=6, seed=0):
  """A folder: dataset root/<split>/<class>/<i>.png of seeded noise; per_class: {split: n}."""
  rng = np.random.default_rng(seed)
  for split, n in per_class.items():
    for label in classes:
      for i in range(n):
        write_png(os.path.join(str(root), split, label, f'{i}.png'),
                  rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Multi-worker tests (tests/test_multi_worker*.py): two run.py workers on 127.0.0.1.
MULTI_WORKER_TINY = ['--dataset=shapes10', '--image_size=16', '--resnet_depth=18', '--width_multiplier=0.125',
        '--num_proj_layers=2', '--proj_out_dim=16', '--train_batch_size=8',
        '--learning_rate=0.5', '--temperature=0.5', '--use_blur=True', '--seed=1',
                     '--eval_split=test']

# Runs run.py as __main__; after Trainer.train returns, saves this worker's model variables.
MULTI_WORKER_WRAPPER = '''
import os, runpy, sys
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.getcwd())
from tf_simclr import cpu_kernels
cpu_kernels.default_onednn_on()
import numpy as np
from tf_simclr.train import loop
_train = loop.Trainer.train
def train(self, iterator):
  result = _train(self, iterator)
  values = {f'{i:04d} {v.path}': v.numpy() for i, v in enumerate(self.state.model.variables)}
  np.savez(os.environ['DUMP_WEIGHTS'], step=result.final_step, **values)
  return result
loop.Trainer.train = train
sys.argv[0] = 'run.py'
runpy.run_path('run.py', run_name='__main__')
'''


def free_ports(n):
  sockets = [socket.socket() for _ in range(n)]
  for s in sockets:
    s.bind(('127.0.0.1', 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def start_workers(tmp_path, flags, model_dirs, tag):
  """Starts 2 workers (worker i on model_dirs[i]); returns [(Popen, log path, dump path)]."""
  wrapper = tmp_path / 'wrapper.py'
  wrapper.write_text(MULTI_WORKER_WRAPPER)
  workers = [f'127.0.0.1:{p}' for p in free_ports(2)]
  started = []
  for index in range(2):
    dump = tmp_path / f'{tag}_weights{index}.npz'
    worker_tmp = tmp_path / f'{tag}_tmp{index}'
    worker_tmp.mkdir()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='',
               DUMP_WEIGHTS=str(dump), TMPDIR=str(worker_tmp), TF_CONFIG=json.dumps(
                   {'cluster': {'worker': workers}, 'task': {'type': 'worker', 'index': index}}))
    log_path = tmp_path / f'{tag}_worker{index}.log'
    with open(log_path, 'w') as log:
      proc = subprocess.Popen([sys.executable, str(wrapper), *MULTI_WORKER_TINY, *flags,
                               f'--model_dir={model_dirs[index]}'],
                              cwd=str(PROJECT_ROOT), env=env, stdout=log, stderr=subprocess.STDOUT)
    started.append((proc, log_path, dump))
  return started


def finish_workers(started, timeout=900):
  """(exit code, log) of each worker; kills every worker still running after `timeout` s."""
  end, out = time.time() + timeout, []
  try:
    for proc, _, _ in started:
      proc.wait(timeout=max(1.0, end - time.time()))
  finally:
    for proc, _, _ in started:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for proc, log_path, _ in started:
    out.append((proc.returncode, open(log_path).read()))
  return out


# tests/test_own_images.py, tests/test_feature_counts.py (its 8-device child): run.py command
# lines in this process, with what they log and print.
def run_argv(argv, export_fn=None):
  """Runs a run.py command line here as run.py's main() does (flags -> Config, a reading mode's
  flags filled from the run's record, training writes flags.json); returns (result, text): the
  result of modes.run and everything logged at INFO or above (Python logging and absl) and
  printed to stdout meanwhile. `export_fn`: as modes.run's (None: the command line's export)."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  text = io.StringIO()
  handler = logging.StreamHandler(text)
  root = logging.getLogger()
  level, verbosity = root.level, absl_logging.get_verbosity()
  root.addHandler(handler)
  root.setLevel(logging.INFO)
  try:
    config = config_from_argv(argv)
    flags = run_cli().serializable_flags(absl_flags.FLAGS)
    absl_logging.set_verbosity(absl_logging.INFO)  # after the parse, which resets it
    with contextlib.redirect_stdout(text):
      result = modes.run(config, flags, export_fn=export_fn)
  finally:
    root.removeHandler(handler)
    root.setLevel(level)
    absl_logging.set_verbosity(verbosity)
  return result, text.getvalue()


# ---- Smaller multi-worker runs: tests/test_multi_worker.py, tests/test_multi_worker_failures.py.
# A worker's cost is its start-up (TensorFlow's import) and its tracing (model build, input
# pipeline, train/eval/feature steps, export), which image size and width barely change: these
# flags shrink the traced graphs too (no colour jitter or blur ops, one projection layer), keep
# 16 training examples (2 steps per epoch at batch 8) and put every worker on the same split, so
# each run of these tests resumes the others' checkpoints without a fixed flag changing.
MULTI_WORKER_SMALL = ['--image_size=8', '--width_multiplier=0.0625', '--num_proj_layers=1',
                      '--proj_out_dim=8', '--color_jitter_strength=0', '--use_blur=False',
                      '--train_split=train[:16]']

# scikit-learn and matplotlib are test-only requirements (requirements-dev.txt); Keras imports them
# when present (and skips them when absent: keras/src/wrappers, keras/src/visualization). The
# workers run without them, as an install from requirements.txt does: 1.5 s less start-up each.
# With SHAPES10_CACHE set (shapes10_cache below), shapes10's splits are read from the .npy files
# this test process wrote with tf_simclr's own generator (the same bytes, memory-mapped and
# read-only as load_split's) instead of being generated again in every worker (3 s each).
MULTI_WORKER_RUNTIME_ONLY = "import sys\nsys.modules['sklearn'] = sys.modules['matplotlib'] = None\n"
MULTI_WORKER_SHAPES10_CACHE = """if os.environ.get('SHAPES10_CACHE'):
  from tf_simclr.data import synthetic
  def _cached_split(split):
    import numpy as np
    return tuple(np.load(os.path.join(os.environ['SHAPES10_CACHE'], f'{split}_{part}.npy'),
                         mmap_mode='r') for part in ('images', 'labels'))
  synthetic.load_split = _cached_split
"""
# After the wrapper's own start (oneDNN's default is set before TensorFlow loads).
_ONEDNN_LINE = 'cpu_kernels.default_onednn_on()\n'
MULTI_WORKER_SMALL_WRAPPER = MULTI_WORKER_RUNTIME_ONLY + MULTI_WORKER_WRAPPER.replace(
    _ONEDNN_LINE, _ONEDNN_LINE + MULTI_WORKER_SHAPES10_CACHE, 1)
assert MULTI_WORKER_SHAPES10_CACHE in MULTI_WORKER_SMALL_WRAPPER


def shapes10_cache(tmp_path_factory):
  """A folder holding shapes10's train and test splits (synthetic.load_split's arrays) as .npy
  files, for start_small_workers; written once per session (under pytest-xdist: once for all of
  its workers, which share the session's temporary root; a file lock makes the others wait)."""
  import fcntl  # pylint: disable=g-import-not-at-top
  from tf_simclr.data import synthetic  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent
  folder = root / 'shapes10_cache'
  folder.mkdir(parents=True, exist_ok=True)
  with open(folder / 'lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    for split in ('train', 'test'):
      if not (folder / f'{split}_labels.npy').exists():
        images, labels = synthetic.load_split(split)
        np.save(folder / f'{split}_images.npy', images)
        np.save(folder / f'{split}_labels.npy', labels)  # Written last: the split is complete.
  return folder


def start_small_workers(tmp_path, flags, model_dirs, tag, shapes10=None):
  """start_workers with MULTI_WORKER_SMALL after MULTI_WORKER_TINY (a later flag wins) and the
  runtime requirements only; shapes10: a shapes10_cache folder. Same return value
  (finish_workers ends them)."""
  wrapper = tmp_path / f'{tag}_wrapper.py'
  wrapper.write_text(MULTI_WORKER_SMALL_WRAPPER)
  workers = [f'127.0.0.1:{p}' for p in free_ports(2)]
  started = []
  for index in range(2):
    dump = tmp_path / f'{tag}_weights{index}.npz'
    worker_tmp = tmp_path / f'{tag}_tmp{index}'
    worker_tmp.mkdir()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='',
               DUMP_WEIGHTS=str(dump), TMPDIR=str(worker_tmp), TF_CONFIG=json.dumps(
                   {'cluster': {'worker': workers}, 'task': {'type': 'worker', 'index': index}}))
    env.pop('SHAPES10_CACHE', None)
    if shapes10 is not None:
      env['SHAPES10_CACHE'] = str(shapes10)
    log_path = tmp_path / f'{tag}_worker{index}.log'
    with open(log_path, 'w') as log:
      proc = subprocess.Popen(
          [sys.executable, str(wrapper), *MULTI_WORKER_TINY, *MULTI_WORKER_SMALL, *flags,
           f'--model_dir={model_dirs[index]}'],
          cwd=str(PROJECT_ROOT), env=env, stdout=log, stderr=subprocess.STDOUT)
    started.append((proc, log_path, dump))
  return started
