"""Fault injection: what survives kill -9, SIGTERM, SIGINT, damage and mistakes.

One tiny pretraining run (a folder of tiny PNGs at 8 px, ResNet-18 at width 1/16, batch 8, a
checkpoint every step) goes through, in order: SIGTERM to a real `run.py` process (saves, exit 3)
-> a rerun (a real process) resumes -> a concurrent second run is refused -> kill -9 of the rerun
mid-loop -> index file deleted, newest checkpoint truncated, an unfinished `ckpt-N_temp` folder
(what a kill during a save leaves) -> rerun falls back to the newest intact checkpoint and ends at
exactly --train_steps. Then a mistaken export, eval on a missing folder and a diverging run;
resumes with changed flags, SIGINT (a real process) and an unwritable result.json on copies of one
2-step model_dir (a module fixture); bad inputs that must give one line and exit 2.

Where no signal, kill or process boundary is what is checked, the run is run.py's program in this
process (`run_here`: main() on the parsed flags, its exit status from SystemExit), which saves a
TensorFlow start-up per run. The in-process tests below cover the pieces that need no training.
"""

import hashlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

from absl import flags as absl_flags
import numpy as np
import pytest
import tensorflow as tf

import helpers
from tf_simclr import weights
from tf_simclr import config as cfg
from tf_simclr import config_record
from tf_simclr import run_dir
from tf_simclr.data import datasets, tfds_prepare
from tf_simclr.run import modes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The runs' data is a folder of 24 + 16 tiny PNGs (written by the autouse fixture below, which
# puts its --dataset first in TINY): a process reads it at once, where shapes10 draws its 10000
# training images first (seconds per process). No colour jitter: it is most of what tracing the
# input pipeline costs. kNN only at evals (the folder's epochs are 3 steps long). Momentum, not
# LARS: its per-variable update traces in a fifth less time; the optimizer-change checks below
# use adam and lars as the other optimizers.
TINY = ['--dataset=(set by _tiny_images)', '--eval_split=test', '--eval_steps=1',
        '--eval_batch_size=16', '--image_size=8', '--resnet_depth=18', '--width_multiplier=0.0625',
        '--proj_out_dim=8', '--num_proj_layers=1', '--use_blur=False', '--train_batch_size=8',
        '--checkpoint_steps=1', '--steps_per_loop=1', '--keep_checkpoint_max=1000', '--seed=1',
        '--learning_rate=0.1', '--color_jitter_strength=0', '--knn_every_epochs=0',
        '--optimizer=momentum']
LONG = 100000  # --train_steps of the run that gets interrupted.


@pytest.fixture(scope='module', autouse=True)
def _tiny_images(tmp_path_factory):
  root = tmp_path_factory.mktemp('images')
  helpers.png_folder(root, {'train': 12, 'test': 8}, size=8)  # classes a, b
  TINY[0] = f'--dataset=folder:{root}'
  yield
  TINY[0] = '--dataset=(set by _tiny_images)'


def start(model_dir, log_path, *flags):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='')
  log = open(log_path, 'w')
  return subprocess.Popen([sys.executable, os.path.join(ROOT, 'run.py'), *TINY,
                           f'--model_dir={model_dir}', *flags],
                          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(proc, log_path, timeout=300):
  rc = proc.wait(timeout=timeout)
  return rc, open(log_path).read()


def steps_saved(model_dir):
  found = weights.source.find_checkpoints(str(model_dir))
  return [weights.source.checkpoint_step(p) for p in found]


def wait_for(condition, proc, what, timeout=240):
  end = time.time() + timeout
  while not condition():
    assert proc.poll() is None, f'the run exited ({proc.returncode}) before {what}'
    assert time.time() < end, f'timed out waiting for {what}'
    time.sleep(0.05)


def digests(model_dir):
  return {name: hashlib.sha256(open(os.path.join(model_dir, name), 'rb').read()).hexdigest()
          for name in os.listdir(model_dir) if os.path.isfile(os.path.join(model_dir, name))}


class _Records(logging.Handler):

  def __init__(self):
    super().__init__(logging.INFO)
    self.setFormatter(logging.Formatter('%(levelname)s %(name)s] %(message)s'))
    self.lines = []

  def emit(self, record):
    self.lines.append(self.format(record))  # with any logged exception's traceback


def run_here(model_dir, *flags, export=True):
  """run.py's program in this process: (exit status, log text) of main() on TINY + flags.

  The same code as `python run.py` after its process start: absl parses the flags into the same
  FLAGS, main() fills them from the run's record, validates, runs and turns errors into exit
  statuses (SystemExit here; a normal return is 0). An exception main() does not handle escapes
  and fails the test, as a traceback would have. export=False replaces the end-of-training hub
  export by modes.no_export, for runs where no assertion reads model_dir/saved_model.
  """
  cli = helpers.run_cli()
  handler = _Records()
  root, absl_logger = logging.getLogger(), logging.getLogger('absl')
  levels = root.level, absl_logger.level
  handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  filters = {name: list(logging.getLogger(name).filters) for name in ('absl', 'tensorflow')}
  hook = modes.export_hook
  root.addHandler(handler)
  root.setLevel(logging.INFO)
  absl_logger.setLevel(logging.INFO)  # as run.py logs (INFO lines of absl and the library)
  if not export:
    modes.export_hook = lambda config: modes.no_export
  try:
    helpers.parse_flags([*TINY, f'--model_dir={model_dir}', *flags])
    try:
      cli.main(['run.py'])
      rc = 0
    except SystemExit as e:
      rc = e.code
  finally:
    modes.export_hook = hook
    root.removeHandler(handler)
    root.setLevel(levels[0])
    absl_logger.setLevel(levels[1])
    for signum, previous in handlers.items():
      signal.signal(signum, previous)
    for name, kept in filters.items():  # main() adds its log filter at every call
      logging.getLogger(name).filters[:] = kept
    absl_flags.FLAGS.unparse_flags()  # no test's flags left behind
  return rc, '\n'.join(handler.lines)


@pytest.mark.slow
def test_run_survives_sigterm_kill_damage_and_concurrency(tmp_path):
  model_dir = tmp_path / 'run'
  # 1. SIGTERM mid-loop: a checkpoint at the next step boundary, a distinct message, exit 3.
  p1 = start(model_dir, tmp_path / 'p1.log', f'--train_steps={LONG}')
  wait_for(lambda: len(steps_saved(model_dir)) >= 3, p1, 'three checkpoints')
  p1.send_signal(signal.SIGTERM)
  rc, out = finish(p1, tmp_path / 'p1.log')
  assert rc == 3, out[-3000:]
  m = re.search(r'PREEMPTED: stopped on SIGTERM at step (\d+) of 100000 after saving (\S+);', out)
  assert m, out[-3000:]
  if 'TF_ENABLE_ONEDNN_OPTS' not in os.environ and platform.machine().lower() == 'x86_64':
    assert 'TensorFlow CPU kernels: oneDNN (TF_ENABLE_ONEDNN_OPTS=1;' in out, out[:3000]
  stopped = int(m.group(1))
  assert m.group(2) == str(model_dir / f'ckpt-{stopped}')
  assert max(steps_saved(model_dir)) == stopped
  assert weights.source.read_global_step(str(model_dir / f'ckpt-{stopped}')) == stopped
  assert not (model_dir / 'LOCK').exists()

  # 2. The same command resumes from that step; a second run meanwhile is refused at once.
  p2 = start(model_dir, tmp_path / 'p2.log', f'--train_steps={LONG}')
  wait_for(lambda: max(steps_saved(model_dir)) > stopped, p2, 'a checkpoint after the resume')
  before = digests(model_dir)
  # The second run, in this process (its refusal needs no process of its own; p2 does): it passes
  # the flags check, then meets the lock.
  rc3, out3 = run_here(model_dir, f'--train_steps={LONG}', '--temperature=0.3',
                       '--allow_flag_changes')
  assert p2.poll() is None, 'the first run ended before the second was refused'
  assert rc3 == 2, out3[-3000:]
  assert f'is in use by another training run (host {socket.gethostname()}, pid {p2.pid}' in out3
  assert json.load(open(model_dir / 'flags.json'))['temperature'] == 0.1  # not the second's
  # 3. kill -9 mid-loop: the lock stays behind (stale), the checkpoints are what was saved.
  p2.send_signal(signal.SIGKILL)
  p2.wait()
  out2 = open(tmp_path / 'p2.log').read()
  assert f'Resuming from {model_dir}/ckpt-{stopped} at step {stopped}' in out2
  assert 'Training from step 0' not in out2
  assert json.load(open(model_dir / 'LOCK'))['pid'] == p2.pid
  saved = steps_saved(model_dir)
  newest = max(saved)
  assert newest > stopped and newest - 1 in saved
  for name, digest in before.items():  # nothing of the earlier runs was rewritten
    if name.startswith('ckpt-'):
      assert digests(model_dir)[name] == digest, name

  # 4. Damage: no index file, a truncated newest checkpoint, a half-written save's temp folder.
  os.remove(model_dir / 'checkpoint')
  data = model_dir / f'ckpt-{newest}.data-00000-of-00001'
  with open(data, 'r+b') as f:
    f.truncate(os.path.getsize(data) // 3)
  temp = model_dir / f'ckpt-{newest + 1}_temp'
  temp.mkdir(exist_ok=True)  # the kill may already have left it
  (temp / 'part-00000-of-00001.data-00000-of-00001').write_bytes(b'\0' * 100)
  kept = digests(model_dir)
  final = newest + 3
  # The recovery, in this process: what it reads was left by real processes (p2's kill -9 above).
  rc, out = run_here(model_dir, f'--train_steps={final}')
  assert rc == 0, out[-3000:]
  assert 'Taking over the stale lock' in out and f'pid {p2.pid}' in out
  assert f'Removed 1 unfinished checkpoint folder(s) of an interrupted save: {temp}' in out
  assert f'Checkpoint {model_dir}/ckpt-{newest} is damaged' in out
  assert f'Resuming from {model_dir}/ckpt-{newest - 1} at step {newest - 1}' in out
  assert f'Training from step {newest - 1} to {final}' in out
  assert not temp.exists() and not (model_dir / 'LOCK').exists()
  after = digests(model_dir)
  # The damaged checkpoint is kept aside, byte for byte; the older ones are untouched.
  assert after[f'damaged-ckpt-{newest}.data-00000-of-00001'] == kept[data.name]
  assert after[f'damaged-ckpt-{newest}.index'] == kept[f'ckpt-{newest}.index']
  for name, digest in kept.items():
    step = re.match(r'ckpt-(\d+)\.', name)
    if step and int(step.group(1)) < newest:
      assert after[name] == digest, name
  assert max(steps_saved(model_dir)) == final
  assert weights.source.read_global_step(str(model_dir)) == final
  assert (model_dir / 'saved_model' / str(final) / 'saved_model.pb').exists()

  # 5. A mistaken export with another width: an error naming both values before any work;
  # flags.json and the exports are untouched. Then --mode=eval on a misspelled folder waits
  # visibly, then fails, without creating it. (Both in this process: no signal involved.)
  flags_bytes = (model_dir / 'flags.json').read_bytes()
  missing = tmp_path / 'misspelled'
  rc, out = run_here(model_dir, '--mode=export', '--width_multiplier=0.125')
  assert rc == 2, out[-3000:]
  assert '--width_multiplier=0.125 here but 0.0625 in the run' in out
  assert (model_dir / 'flags.json').read_bytes() == flags_bytes
  assert os.listdir(model_dir / 'saved_model') == [str(final)]
  rc, out = run_here(missing, '--mode=eval', '--eval_timeout=2')
  assert rc == 2, out[-3000:]
  assert f'Waiting for a checkpoint in {missing} (timeout 2 s)' in out
  assert f'no checkpoint appeared in --model_dir={missing} within --eval_timeout=2 s' in out
  assert not missing.exists()


def test_divergence_stops_without_saving_or_exporting(tmp_path):
  model_dir = tmp_path / 'diverged'
  # In this process (the exit status is main()'s); the real export hook, so that "no export" is
  # checked.
  rc, out = run_here(model_dir, '--train_steps=6', '--checkpoint_steps=2', '--steps_per_loop=2',
                     '--optimizer=momentum', '--learning_rate=1e6',
                     '--warmup_epochs=0')  # no warm-up: the original's schedule would ramp lr slowly
  assert rc == 2, out[-3000:]
  m = re.search(r'Training diverged at step (\d+): ', out)
  assert m, out[-3000:]
  assert max(steps_saved(model_dir), default=0) < int(m.group(1))
  if steps_saved(model_dir):  # the message promises only what exists
    assert f'the last good checkpoint {model_dir}/ckpt-{max(steps_saved(model_dir))} is kept' in out
  else:
    assert f'no checkpoint was saved before (none in {model_dir})' in out
    assert 'last good checkpoint' not in out
  assert not (model_dir / 'saved_model').exists()
  assert not (model_dir / 'LOCK').exists()
  assert 'Traceback' not in out


# ---- In-process pieces (no training). ----

@pytest.mark.slow
def test_lock_names_a_live_holder_and_takes_over_a_dead_one(tmp_path):
  lock_path = tmp_path / run_dir.LOCK_FILE
  sleeper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  try:
    record = {'host': socket.gethostname(), 'pid': sleeper.pid, 'started': 'then'}
    lock_path.write_text(json.dumps(record))
    with pytest.raises(run_dir.ModelDirError, match=f'pid {sleeper.pid}, started then'):
      run_dir.RunLock(str(tmp_path)).acquire()
    lock_path.write_text(json.dumps({**record, 'host': 'elsewhere'}))  # can't tell: refuse
    with pytest.raises(run_dir.ModelDirError, match='host elsewhere'):
      run_dir.RunLock(str(tmp_path)).acquire()
  finally:
    sleeper.kill()
    sleeper.wait()
  lock_path.write_text(json.dumps({**record, 'pid': sleeper.pid}))  # now dead
  lock = run_dir.RunLock(str(tmp_path)).acquire()
  assert json.loads(lock_path.read_text())['pid'] == os.getpid()
  lock.release()
  assert not lock_path.exists()


def test_model_dir_that_is_a_file_is_named(tmp_path):
  path = tmp_path / 'file'
  path.write_text('x')
  with pytest.raises(run_dir.ModelDirError, match=f'--model_dir={path} is a file'):
    run_dir.check_usable(str(path), create=True)


def test_architecture_check_names_both_values():
  model = cfg.ModelConfig(resnet_depth=18, width_multiplier=0.5, cifar_stem=True)
  stored = {'resnet_depth': 18, 'width_multiplier': 0.25, 'image_size': 224,
            'proj_head_mode': 'nonlinear', 'num_proj_layers': 3, 'proj_out_dim': 128}
  with pytest.raises(cfg.ConfigError) as e:
    cfg.check_same_architecture(model, stored, 'DIR')
  assert '--width_multiplier=0.5 here but 0.25 in the run' in str(e.value)
  assert 'the CIFAR stem here' in str(e.value) and '--image_size=224' in str(e.value)
  cfg.check_same_architecture(model, {**stored, 'width_multiplier': 0.5, 'image_size': 32}, 'D')


def test_no_network_fails_in_seconds(tmp_path, monkeypatch):
  def unreachable(*args, **kwargs):
    raise OSError('no route to host')

  def must_not_download(*args, **kwargs):
    raise AssertionError('download_and_prepare was called')

  for var in tfds_prepare._PROXY_VARS:
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(socket, 'create_connection', unreachable)
  monkeypatch.setattr('tensorflow_datasets.core.dataset_builder.DatasetBuilder.'
                      'download_and_prepare', must_not_download)
  start_time = time.time()
  with pytest.raises(datasets.DatasetError, match='cs.toronto.edu cannot be reached'):
    datasets.resolve_dataset('cifar10', data_dir=str(tmp_path))
  # TFDS's own retries take minutes; 60 s leaves room for a loaded 2-core machine.
  assert time.time() - start_time < 60


def test_failed_save_names_model_dir(tmp_path):
  model = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(1)])
  optimizer = tf.keras.optimizers.SGD()
  optimizer.build(model.trainable_variables)
  state = weights.state.TrainState(model, optimizer, str(tmp_path), max_to_keep=2)

  def full(**kwargs):
    raise tf.errors.ResourceExhaustedError(None, None, 'No space left on device')

  state.manager.save = full
  with pytest.raises(weights.state.CheckpointSaveError) as e:
    state.save()
  assert str(tmp_path) in str(e.value) and 'No space left on device' in str(e.value)
  assert 'disk full' in str(e.value)


def test_corrupt_image_is_named_or_skipped(tmp_path):
  helpers.png_folder(tmp_path, {'train': 3, 'test': 3})
  bad = tmp_path / 'train' / 'b' / 'broken.jpg'
  bad.write_bytes(b'\xff\xd8 not really a jpeg')
  source = datasets.resolve_dataset(f'folder:{tmp_path}')
  error = datasets.bad_images_error(source, 'train')
  assert error is not None and str(bad) in str(error) and '--skip_bad_images' in str(error)
  assert datasets.bad_images_error(source, 'test') is None
  skipped = datasets.resolve_dataset(f'folder:{tmp_path}', skip_bad_images=True)
  assert skipped.num_examples('train') == 6 and source.num_examples('train') == 7
  assert sum(1 for _ in skipped.as_dataset('train')) == 6


def test_model_dir_that_is_not_writable_is_named(tmp_path, monkeypatch):
  monkeypatch.setattr(os, 'access', lambda path, mode: False)  # tests may run as root
  with pytest.raises(run_dir.ModelDirError, match=f'--model_dir={tmp_path} is not writable'):
    run_dir.check_usable(str(tmp_path), create=True)


def test_train_split_smaller_than_one_batch_is_an_error(tmp_path):
  from tf_simclr.run import modes
  config = cfg.Config(
      model=cfg.ModelConfig(resnet_depth=18), data=cfg.DataConfig(
          dataset='shapes10', train_split='train[:5]', eval_split='test', image_size=8),
      optim=cfg.OptimConfig(), train=cfg.TrainConfig(model_dir=str(tmp_path / 'run'),
                                                     train_batch_size=8, train_steps=2))
  with pytest.raises(ValueError, match=r"train\[:5\].*has 5 training examples, fewer than one "
                                       r"global batch \(--train_batch_size=8\)"):
    modes.prepare(config)
  assert not (tmp_path / 'run' / run_dir.LOCK_FILE).exists()
  assert not (tmp_path / 'run' / run_dir.FLAGS_FILE).exists()


# ---- Changed flags on resume, SIGINT, clear one-line errors. ----

@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A model_dir trained for 2 steps in this process (ckpt-1, ckpt-2, flags.json; no export:
  the tests below read checkpoints and flags.json only), copied per use."""
  root = tmp_path_factory.mktemp('trained')
  rc, out = run_here(root / 'run', '--train_steps=2', export=False)
  assert rc == 0, out[-3000:]
  assert max(steps_saved(root / 'run')) == 2
  return root / 'run'


def copy_of(trained, tmp_path):
  return shutil.copytree(trained, tmp_path / 'run')


@pytest.mark.slow
def test_resume_with_changed_flags(trained, tmp_path):
  # Every run here is run.py's main() in this process (run_here): the exit statuses and messages
  # are main()'s; no signal or process boundary is involved.
  model_dir = copy_of(trained, tmp_path)
  before = digests(model_dir)
  listing = sorted(os.listdir(model_dir))
  record = json.load(open(model_dir / 'flags.json'))
  # The slip of --model_dir=PRETRAIN_DIR for --checkpoint=PRETRAIN_DIR, with another batch size:
  # refused before anything is locked or written, naming each change and the likely intent.
  rc, out = run_here(model_dir, '--train_steps=2', '--train_mode=finetune',
                     '--train_batch_size=4')
  assert rc == 2, out[-3000:]
  assert "--train_mode 'pretrain' -> 'finetune'" in out and '--train_batch_size 8 -> 4' in out
  assert f'use --checkpoint={model_dir}' in out and 'pass --allow_flag_changes' in out
  assert 'Traceback' not in out
  # Nothing written: no file changed, no file or folder (a LOCK, a saved_model export) added.
  assert digests(model_dir) == before and sorted(os.listdir(model_dir)) == listing
  assert not (model_dir / 'LOCK').exists()
  # Extending --train_steps (and another --eval_steps) continues; the log lists both changes and
  # flags.json keeps the earlier values. (No export: no assertion reads it.)
  rc, out = run_here(model_dir, '--train_steps=3', '--eval_steps=2', export=False)
  assert rc == 0, out[-3000:]
  assert 'Resuming with a changed flag: --train_steps 2 -> 3' in out
  assert 'Resuming with a changed flag: --eval_steps 1 -> 2' in out
  assert f'Resuming from {model_dir}/ckpt-2 at step 2' in out
  stored = json.load(open(model_dir / 'flags.json'))
  assert stored['train_steps'] == 3 and stored['learning_rate'] == record['learning_rate']
  history = stored['history']  # the copy moved the run: --model_dir differs too
  assert history[0]['flags'].pop('model_dir') == str(trained)
  assert history == [{'checkpoint_step': 2, 'flags': {'eval_steps': 1, 'train_steps': 2}}]
  # Another optimizer: refused (the checkpoints are intact, not "damaged") ...
  rc, out = run_here(model_dir, '--train_steps=4', '--optimizer=adam')
  assert rc == 2, out[-3000:]
  assert "--optimizer 'momentum' -> 'adam'" in out and 'damaged' not in out
  # ... unless overridden: weights and step restored, fresh optimizer slots, history kept.
  rc, out = run_here(model_dir, '--train_steps=4', '--optimizer=adam', '--allow_flag_changes',
                     export=False)
  assert rc == 0, out[-3000:]
  assert f'Restoring {model_dir}/ckpt-3 without its optimizer state' in out
  assert 'damaged' not in out and max(steps_saved(model_dir)) == 4
  stored = json.load(open(model_dir / 'flags.json'))
  assert stored['optimizer'] == 'adam' and stored['allow_flag_changes'] is True
  assert stored['history'][0]['flags'] == {'eval_steps': 1, 'model_dir': str(trained),
                                           'train_steps': 2}
  assert stored['history'][1] == {'checkpoint_step': 3,
                                  'flags': {'eval_steps': 2, 'optimizer': 'momentum',
                                            'train_steps': 3}}
  assert not any(n.startswith('damaged-') for n in os.listdir(model_dir))
  # Without flags.json the checkpoint's optimizer slots tell: still an error, not damage.
  os.remove(model_dir / 'flags.json')
  rc, out = run_here(model_dir, '--train_steps=5', '--optimizer=lars')
  assert rc == 2, out[-3000:]
  assert f'{model_dir}/ckpt-4 was written with another optimizer' in out
  assert 'the checkpoint is intact' in out and 'is damaged' not in out and 'Traceback' not in out
  assert max(steps_saved(model_dir)) == 4
  assert not any(n.startswith('damaged-') for n in os.listdir(model_dir))


@pytest.mark.slow
def test_sigint_saves_and_says_so(trained, tmp_path):
  model_dir = copy_of(trained, tmp_path)
  p = start(model_dir, tmp_path / 'p.log', f'--train_steps={LONG}')
  wait_for(lambda: max(steps_saved(model_dir)) >= 4, p, 'two checkpoints after the resume')
  p.send_signal(signal.SIGINT)
  time.sleep(0.05)
  p.send_signal(signal.SIGTERM)  # a second signal while it saves and exits is absorbed
  p.send_signal(signal.SIGINT)
  rc, out = finish(p, tmp_path / 'p.log')
  assert rc == 130, out[-3000:]
  m = re.search(r'Interrupted \(SIGINT\) at step (\d+) of 100000: saved ckpt-(\d+), rerun the '
                r'same command to resume\.', out)
  assert m and m.group(1) == m.group(2), out[-3000:]
  assert 'Traceback' not in out and 'KeyboardInterrupt' not in out
  assert max(steps_saved(model_dir)) == int(m.group(1))
  assert not (model_dir / 'LOCK').exists()


@pytest.mark.slow  # with its fixture's 2-step training
def test_eval_that_cannot_write_result_json_reports_it(trained, tmp_path):
  model_dir = copy_of(trained, tmp_path)
  (model_dir / 'result.json').mkdir()  # unwritable even for root (tests may run as root)
  # In this process: main()'s exit status and log.
  rc, out = run_here(model_dir, '--mode=eval', '--train_steps=2', '--eval_timeout=1')
  assert rc == 2, out[-3000:]
  assert re.search(r'Eval results at step 2: .*eval/label_top_1_accuracy=', out), out[-3000:]
  assert f'cannot write {model_dir}/result.json' in out and 'Traceback' not in out


def test_bad_inputs_give_one_clear_line(tmp_path):
  garbage = tmp_path / 'garbage'
  garbage.mkdir()
  rng = np.random.default_rng(0)
  for name in ('ckpt-5.index', 'ckpt-5.data-00000-of-00001', 'checkpoint'):
    (garbage / name).write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
  folder = tmp_path / 'images'
  for split in ('train', 'test'):
    for label in ('a', 'b'):
      (folder / split / label).mkdir(parents=True)
      if label == 'a':
        for i in range(8):
          helpers.write_png(folder / split / label / f'{i}.png', np.zeros((8, 8, 3)))
  cases = {
      'garbage': (['--checkpoint=' + str(garbage / 'ckpt-5')],
                  f'--checkpoint={garbage}/ckpt-5: {garbage}/ckpt-5.index cannot be read as a '
                  'checkpoint'),
      'garbage_dir': (['--checkpoint=' + str(garbage)],
                       f'--checkpoint={garbage}: {garbage}/ckpt-5.index cannot be read'),
      'teacher': (['--train_mode=distill', '--teacher_checkpoint=/missing/ckpt-1'],
                  '--teacher_checkpoint=/missing/ckpt-1 not found'),
      'data_dir': (['--dataset=cifar10', '--data_dir=/missing'],
                   '--data_dir=/missing does not exist (--dataset=cifar10)'),
      'empty_class': ([f'--dataset=folder:{folder}'],
                      f'2 class folder(s) hold no images (.jpg/.jpeg/.png): {folder}/test/b, '
                      f'{folder}/train/b. Add images, remove the folder(s), or pass '
                      '--skip_empty_classes'),
      'image_size': (['--image_size=100000'],
                     '--image_size=100000 is too large for this machine: one training batch '
                     '(--train_batch_size=8 x 2 view(s), ResNet-18 0.0625x, float32) needs at '
                     'least'),
  }
  # Each in this process (run_here: main()'s exit status and log); every refusal comes before
  # anything is built, so no case needs a process of its own.
  logs = {}
  for name, (flags, expected) in cases.items():
    rc, out = run_here(tmp_path / 'runs' / name, '--train_steps=1', *flags)
    assert rc == 2, (name, out[-3000:])
    assert expected in out, (name, out[-3000:])
    assert 'Traceback' not in out, (name, out[-3000:])
    logs[name] = out
  assert '--checkpoint=/missing' not in logs['teacher']
  assert "is unknown" not in logs['data_dir']


def _tiny_state(model_dir, optimizer, model=None):
  """(TrainState, kernel) of a ResNet-18 at width 1/8 on 8 px images with `optimizer`, built as
  training builds them. `model`: an earlier state's model to reuse (a new optimizer and TrainState
  around it; building the model is most of the cost); callers that check a restore through it
  first overwrite the weights they check."""
  from tf_simclr.train import assemble
  config = helpers.tiny_config(model_dir, data__image_size=8, model__width_multiplier=0.125,
                               optim__optimizer=optimizer)
  ctx = modes.prepare(config)
  state = assemble.assemble_trainer(config, ctx.strategy, ctx.steps, ctx.num_classes,
                                    model=model).state
  assert state.model_dir == str(model_dir)
  return state, state.model.encoder.stem.convs[0].kernel


@pytest.fixture(scope='module')
def tiny_model(tmp_path_factory):
  """The model of _tiny_state, built once for the TrainState tests below: each wraps its own
  optimizers and TrainStates around it and sets every value it checks itself."""
  return _tiny_state(tmp_path_factory.mktemp('model'), 'momentum')[0].model


def test_a_second_damaged_copy_of_a_step_never_overwrites_the_first(tmp_path, tiny_model):
  """Damage ckpt-2, resume (set aside; step 2 is saved again), damage it again, resume: both
  damaged copies are kept byte for byte under names of their own."""
  state, _ = _tiny_state(tmp_path, 'momentum', tiny_model)
  for step in (1, 2):
    state.optimizer.iterations.assign(step)
    state.save()
  digest = lambda path: hashlib.sha256(path.read_bytes()).hexdigest()
  copies = []
  for fraction in (3, 2):  # two different damages, so the two copies differ
    data = tmp_path / 'ckpt-2.data-00000-of-00001'
    with open(data, 'r+b') as f:
      f.truncate(os.path.getsize(data) // fraction)
    copies.append({suffix: digest(tmp_path / f'ckpt-2{suffix}')
                   for suffix in ('.index', '.data-00000-of-00001')})
    fresh, _ = _tiny_state(tmp_path, 'momentum', state.model)  # its optimizer at step 0
    assert fresh.restore_or_initialize(None) == 'resumed' and fresh.step == 1
    fresh.optimizer.iterations.assign(2)
    fresh.save()  # the retrained step 2
  for prefix, expected in zip(('damaged-ckpt-2', 'damaged-ckpt-2.2'), copies):
    for suffix, want in expected.items():
      assert digest(tmp_path / f'{prefix}{suffix}') == want, prefix + suffix
  assert copies[0] != copies[1]


def test_unreadable_index_file_is_set_aside(tmp_path, caplog, tiny_model):
  state, kernel = _tiny_state(tmp_path, 'momentum', tiny_model)
  kernel.assign(tf.fill(kernel.shape, 0.5))
  state.save()
  garbage = np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8).tobytes()
  for _ in range(2):  # the second copy does not overwrite the first
    (tmp_path / 'checkpoint').write_bytes(garbage)
    fresh, kernel = _tiny_state(tmp_path, 'momentum', state.model)
    kernel.assign(tf.zeros_like(kernel))  # so that 0.5 below can only come from the restore
    assert fresh.restore_or_initialize(None) == 'resumed'
    assert np.all(kernel.numpy() == 0.5)
  assert (tmp_path / 'damaged-checkpoint').read_bytes() == garbage
  assert (tmp_path / 'damaged-checkpoint.2').read_bytes() == garbage
  assert 'cannot be read' in caplog.text


def test_optimizer_slot_mismatch_is_an_error_or_skipped(tmp_path, caplog, tiny_model):
  state, kernel = _tiny_state(tmp_path, 'momentum', tiny_model)
  kernel.assign(tf.fill(kernel.shape, 0.5))
  for v in state.optimizer.variables:  # non-zero slots, to see they are not restored below
    if v is not state.optimizer.iterations and 'learning_rate' not in v.path:
      v.assign(tf.ones_like(v))
  state.optimizer.iterations.assign(7)
  state.save()
  with pytest.raises(weights.state.OptimizerMismatchError, match='written with another optimizer'):
    _tiny_state(tmp_path, 'adam', state.model)[0].restore_or_initialize(None)
  adam, kernel = _tiny_state(tmp_path, 'adam', state.model)
  kernel.assign(tf.zeros_like(kernel))  # so that 0.5 below can only come from the restore
  adam.allow_optimizer_change = True
  assert adam.restore_or_initialize(None) == 'resumed'
  assert np.all(kernel.numpy() == 0.5) and adam.step == 7
  assert 'without its optimizer state' in caplog.text
  assert all(not np.any(v.numpy()) for v in adam.optimizer.variables
             if v is not adam.optimizer.iterations and 'learning_rate' not in v.path)
  assert not any(n.startswith('damaged-') for n in os.listdir(tmp_path))
  # The same optimizer resumes with its slots.
  same, _ = _tiny_state(tmp_path, 'momentum', state.model)  # a new optimizer: zero slots
  assert not any(np.any(v.numpy()) for v in same.optimizer.variables
                 if v is not same.optimizer.iterations and 'learning_rate' not in v.path)
  assert same.restore_or_initialize(None) == 'resumed'
  assert all(np.all(v.numpy() == 1) for v in same.optimizer.variables
             if v is not same.optimizer.iterations and 'learning_rate' not in v.path)


def test_check_resume_flags_names_changes_and_keeps_history():
  stored = {'train_mode': 'pretrain', 'train_steps': 10, 'learning_rate': 0.3,
            'width_multiplier': 1, 'eval_steps': 0, 'new_in_this_version': None}
  stored.pop('new_in_this_version')  # an older record: flags it lacks are not compared
  given = {'train_mode': 'pretrain', 'train_steps': 20, 'learning_rate': 0.30000000000000004,
           'width_multiplier': 1.0, 'eval_steps': 5, 'new_in_this_version': 3}
  record, fixed = config_record.check_resume_flags('D', stored, given, False, 10)
  assert fixed == [] and record['history'] == [
      {'checkpoint_step': 10, 'flags': {'eval_steps': 0, 'train_steps': 10}}]
  changed = dict(given, train_mode='finetune', learning_rate=0.1, width_multiplier=2)
  with pytest.raises(config_record.FlagChangeError) as e:
    config_record.check_resume_flags('D', record, changed, False, 20)
  message = str(e.value)
  assert ("--train_mode 'pretrain' -> 'finetune', --learning_rate 0.30000000000000004 -> 0.1, "
          '--width_multiplier 1.0 -> 2') in message
  assert 'use --checkpoint=D' in message and '--allow_flag_changes' in message
  again, fixed = config_record.check_resume_flags('D', record, changed, True, 20)
  assert fixed == ['train_mode', 'learning_rate', 'width_multiplier']
  assert again['history'][0] == record['history'][0] and again['train_mode'] == 'finetune'
  assert again['history'][1] == {'checkpoint_step': 20, 'flags': {
      'learning_rate': 0.30000000000000004, 'train_mode': 'pretrain', 'width_multiplier': 1.0}}


def test_empty_class_folder_is_named_or_skipped(tmp_path):
  for split, counts in (('train', {'a': 3, 'b': 0, 'c': 2}), ('test', {'a': 1, 'b': 0, 'c': 1})):
    for label, n in counts.items():
      (tmp_path / split / label).mkdir(parents=True)
      for i in range(n):
        helpers.write_png(tmp_path / split / label / f'{i}.png', np.full((4, 4, 3), ord(label)))
  with pytest.raises(datasets.DatasetError) as e:
    datasets.resolve_dataset(f'folder:{tmp_path}')
  assert f'{tmp_path}/test/b, {tmp_path}/train/b' in str(e.value)
  assert '--skip_empty_classes' in str(e.value)
  source = datasets.resolve_dataset(f'folder:{tmp_path}', skip_empty_classes=True)
  assert source.num_classes == 2 and source.class_names == ('a', 'c')
  # Each image's label is its folder's index among the classes that have images.
  pairs = [(int(image[0, 0, 0]), int(label)) for image, label in
           source.as_dataset('train').as_numpy_iterator()]
  assert sorted(pairs) == [(ord('a'), 0)] * 3 + [(ord('c'), 1)] * 2


@pytest.mark.slow
def test_activation_estimate_counts_every_conv_output():
  from tf_simclr import memory
  from tf_simclr.models import resnet
  import keras
  counted = []
  call = keras.layers.Conv2D.call

  def counting(self, inputs):
    out = call(self, inputs)
    if tf.executing_eagerly():  # not the symbolic calls that build the layers
      counted.append(int(np.prod(out.shape[1:])))
    return out
  # Odd sizes: strided layers round up. The SK/SE-free encoder's convolutions, one image.
  for depth, width, cifar_stem, size in ((18, 0.25, True, 15), (50, 0.125, False, 37)):
    counted.clear()
    keras.layers.Conv2D.call = counting
    try:
      resnet.resnet(depth, width, cifar_stem=cifar_stem)(tf.zeros([1, size, size, 3]))
    finally:
      keras.layers.Conv2D.call = call
    assert resnet.conv_output_elements(depth, width, cifar_stem, size) == sum(counted)
  config = cfg.Config(model=cfg.ModelConfig(resnet_depth=18, width_multiplier=0.25,
                                            cifar_stem=True),
                      data=cfg.DataConfig(dataset='shapes10', image_size=15),
                      optim=cfg.OptimConfig(), train=cfg.TrainConfig(model_dir='D',
                                                                     train_batch_size=4))
  need = resnet.conv_output_elements(18, 0.25, True, 15) * 4 * 2 * 4  # images x views x bytes
  assert memory.batch_activation_bytes(config, num_views=2) == need
  memory.check_batch_fits(config, 2, memory=need)
  with pytest.raises(cfg.ConfigError, match=r'--image_size=15 is too large .* needs at least '
                                            r'.* GiB of activations'):
    memory.check_batch_fits(config, 2, memory=need - 1)
