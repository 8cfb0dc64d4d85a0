"""Everything a run checks before it writes anything: strategy, model_dir, record, data, steps.

`prepare(config)` validates the flags against the run's record and the data, before model_dir is
created or locked (a refused command leaves nothing behind); training then takes the lock. Its
`Context` is what every mode of `run.modes.run` works from.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from typing import Dict, Optional

import keras
import tensorflow as tf

from tf_simclr import config as config_lib
from tf_simclr import config_record
from tf_simclr import distribute
from tf_simclr import memory
from tf_simclr import run_dir
from tf_simclr.config import TRAINING_MODES, Config, Steps, resolve_steps
from tf_simclr.data import datasets, tfds_prepare
from tf_simclr.errors import CheckpointNotFoundError
from tf_simclr.evaluation import reading
from tf_simclr.evaluation import readouts as readouts_lib
from tf_simclr.train import tasks
from tf_simclr.weights import source as weights_source
from tf_simclr.weights import state as weights_state

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Context:
  """What every mode needs: the strategy, the data source, the step counts, the model. Read-only;
  the readouts' state (their feature cache, the random-init baseline) lives in `readouts`."""
  config: Config
  strategy: tf.distribute.Strategy
  source: 'datasets.DatasetSource'
  steps: Steps
  num_classes: int
  task_class: type  # tasks.task_class(config), the one lookup: what differs by training mode
  label_subset: Optional[object] = None
  lock: Optional[run_dir.RunLock] = None  # held by a training run's chief
  flags_dict: Optional[Dict] = None  # written to flags.json once training has its weights
  optimizer_changed: bool = False  # resumed with another --optimizer (--allow_flag_changes)
  # model_dir's names before this run wrote anything (None: it did not exist; run_dir.entries).
  model_dir_before: Optional[frozenset] = None
  readouts: readouts_lib.ReadoutState = dataclasses.field(default_factory=readouts_lib.ReadoutState)


def prepare(config: Config, flags_dict: Optional[Dict] = None) -> Context:
  """Validates model_dir, data and settings before any expensive work or any write.

  Everything a user can get wrong (flags, dataset, splits, the model_dir's record) is checked
  before model_dir is created or locked, so a refused command leaves nothing behind. Training
  (and only training) then takes the model_dir lock and removes unfinished checkpoint folders;
  `train()` writes flags.json once the weights are restored. Eval and export read model_dir and
  never create or rewrite it; --mode=export reads no dataset at all.
  """
  train = config.train
  task_class = tasks.task_class(config)
  # First: MultiWorkerMirroredStrategy must exist before any other TensorFlow op runs.
  strategy = distribute.make_strategy(config.distribute)
  if distribute.is_tpu(strategy):  # Before anything is written or read.
    config_lib.check_tpu_paths(config)
  chief = distribute.is_chief(strategy)
  needs_train = train.mode in TRAINING_MODES
  run_dir.check_usable(train.model_dir, create=False)  # Only refuses a file; creates nothing.
  stored = run_dir.read_flags(train.model_dir)
  checkpoints = weights_source.find_checkpoints(train.model_dir)
  optimizer_changed = False
  if stored is not None and checkpoints:
    if needs_train and flags_dict is not None:  # A resume: flags.json gets the history.
      flags_dict, fixed = config_record.check_resume_flags(
          train.model_dir, stored, flags_dict, train.allow_flag_changes,
          weights_source.checkpoint_step(checkpoints[0]))
      optimizer_changed = 'optimizer' in fixed
    config_lib.check_same_architecture(config.model, stored, train.model_dir)
  # --checkpoint (when model_dir has none to resume from) and the teacher: a path that is missing
  # or not a checkpoint is named before anything is built, written or locked. Export reads its
  # weights first thing (reading.model_from_weights).
  if train.checkpoint and not checkpoints and train.mode != 'export':
    weights_source.resolve(train.checkpoint)
  if needs_train:
    teacher = config.distill.teacher_checkpoint
    if task_class.needs_teacher and not weights_source.is_saved_model(teacher):
      weights_source.resolve(teacher, flag='teacher_checkpoint')
  if needs_train and not distribute.is_tpu(strategy) and not tf.config.list_logical_devices('GPU'):
    # On CPUs, before the data is read, anything is built or the lock is taken.
    memory.check_batch_fits(config, num_views=task_class.num_views)
  if train.seed is not None:
    keras.utils.set_random_seed(train.seed)
  if train.mode == 'export':
    config, num_classes = reading.model_from_weights(config, 'export')
    return Context(config=config, strategy=strategy, source=None, steps=None,
                   num_classes=num_classes, task_class=task_class)
  embed_classes = None
  if train.mode == 'neighbors':  # Before the weights: a missing --query is the simpler fix.
    from tf_simclr.evaluation import neighbors  # pylint: disable=g-import-not-at-top
    neighbors.query_paths(train.query)
  if _needs_weights(config):  # No weights to read is the first thing to say.
    config, embed_classes = reading.model_from_weights(config, train.mode)
  config, source, steps, label_subset = _validate_data(config, strategy, task_class)
  num_classes = source.num_classes if embed_classes is None else embed_classes
  if not source.labelled and task_class.needs_teacher:  # The teacher's classes.
    from tf_simclr import weights  # pylint: disable=g-import-not-at-top
    num_classes = weights.describe(config.distill.teacher_checkpoint)['num_classes'] or 0
  # Training, probe and embed write into model_dir (probe/embed: result files only).
  model_dir_before = run_dir.entries(train.model_dir)
  run_dir.check_usable(train.model_dir, create=needs_train or train.mode in (
      ('probe',) + config_lib.EMBEDDING_MODES + config_lib.INSPECT_MODES))
  # Only a training run's chief holds the lock, taken before anything is written.
  lock, failure = None, None
  try:
    if needs_train and chief:
      lock = run_dir.RunLock(train.model_dir, lease_s=train.lock_lease_s).acquire()
      weights_state.clean_temp_folders(train.model_dir)  # Of a save that did not finish.
      if label_subset is not None:
        data = config.data
        path = datasets.write_label_subset(
            train.model_dir, dataset=data.dataset, split=data.train_split,
            fraction=data.train_label_fraction, seed=data.label_fraction_seed,
            indices=label_subset)
        log.info('Label fraction %.4g of %s: %d labelled examples (ids in %s).',
                 data.train_label_fraction, data.train_split, len(label_subset), path)
  except Exception as e:  # pylint: disable=broad-except
    failure = e
  except BaseException:
    if lock is not None:
      lock.release()
    raise
  # The other workers learn that the chief failed here, instead of waiting for it forever.
  if distribute.any_worker(strategy, failure is not None) and failure is None:
    failure = distribute.AnotherWorkerFailedError(
        f'The chief of this multi-worker run could not start training in '
        f'--model_dir={train.model_dir} (for example, another run holds its lock); its log '
        'says why. Stopping this worker too.')
  if failure is None and needs_train:
    failure = _check_shared_model_dir(strategy, train.model_dir, lock)
  if failure is not None:
    if lock is not None:
      lock.release()
    raise failure
  return Context(config=config, strategy=strategy, source=source, steps=steps,
                 num_classes=num_classes, label_subset=label_subset, lock=lock,
                 flags_dict=flags_dict, optimizer_changed=optimizer_changed,
                 task_class=task_class, model_dir_before=model_dir_before)


# How long a worker waits for the chief's model_dir lock token (the chief has passed the same
# checks by then: only the lock file's write is left).
TOKEN_WAIT_S = 300.0


def _check_shared_model_dir(strategy, model_dir: str,
                            lock: Optional[run_dir.RunLock]) -> Optional[Exception]:
  """The error to stop with (on every worker) unless every worker of a multi-worker run sees
  the chief's lock token in its --model_dir; None when they all do or the run has one worker.

  Without this, a folder per machine only shows at the first resume (hours in), when the
  workers restore different steps.
  """
  exchange = distribute.ChiefExchange(strategy)
  if not exchange.multi_worker:
    return None
  failure = None
  if exchange.chief:
    exchange.publish('run_token', lock.me.token)
  else:
    token = exchange.wait('run_token', TOKEN_WAIT_S, 'the id of its run in --model_dir')
    if run_dir.lock_token(model_dir) != token:
      failure = run_dir.ModelDirError(
          f'This worker (host {socket.gethostname()}) does not see the chief\'s run in '
          f'--model_dir={model_dir} (no lock file with the chief\'s id there): every worker of a '
          'multi-worker run must use one shared --model_dir (gs:// or a shared filesystem '
          'mounted on every machine), not a folder per machine. Pass the same shared path to '
          'every worker.')
  if distribute.any_worker(strategy, failure is not None) and failure is None:
    failure = distribute.AnotherWorkerFailedError(
        f'Another worker of this multi-worker run does not see --model_dir={model_dir} (a '
        'folder per machine?); its log names its host. Every worker must use one shared '
        '--model_dir (gs:// or a shared filesystem). Stopping this worker too.')
  return failure


def _needs_weights(config: Config) -> bool:
  """embed and neighbors read weights; duplicates only when the split is not embedded yet."""
  from tf_simclr.evaluation import embed  # pylint: disable=g-import-not-at-top
  mode = config.train.mode
  if mode == 'duplicates' and not embed.has_embeddings(config):
    if reading.weights_path(config) is None:
      raise CheckpointNotFoundError(
          f'--mode=duplicates: no embeddings of {embed.split_of(config)} in '
          f'--model_dir={config.train.model_dir} (--mode=embed writes them) and no checkpoint to '
          'compute them (in --model_dir or --checkpoint).')
    return True
  return mode in ('embed', 'neighbors')


def _unlabelled_config(config: Config, task_class) -> Config:
  """Checks a run on an unlabelled dataset (images:PATH); the task turns off what needs labels."""
  mode = config.train.mode
  name = config.data.dataset
  task_class.check_unlabelled(name)
  if mode in ('eval', 'train_then_eval', 'probe'):
    raise datasets.DatasetError(
        f'--mode={mode} evaluates against labels, but --dataset={name} is unlabelled: use '
        '--mode=train (pretraining), --mode=embed (features to files) or a labelled dataset.')
  return task_class.unlabelled_config(config, training=mode in TRAINING_MODES)


def _validate_data(config: Config, strategy, task_class):
  """(config, source, steps, label subset): resolves and checks the data; writes nothing."""
  train, data = config.train, config.data
  needs_train = train.mode in TRAINING_MODES
  source = datasets.resolve_from_config(  # Multi-worker: the chief alone prepares TFDS data.
      data, eval_split=train.mode not in config_lib.EMBEDDING_MODES + config_lib.INSPECT_MODES,
      prepare_tfds=tfds_prepare.chief_prepares(distribute.ChiefExchange(strategy)))
  if train.mode in config_lib.EMBEDDING_MODES:
    source.validate_split(train.embed_split or data.train_split,
                          '--embed_split' if train.embed_split else '--train_split')
  if not source.labelled:
    config = _unlabelled_config(config, task_class)
  num_train = source.num_examples(data.train_split)
  label_subset = None
  if data.train_label_fraction < 1.0 and needs_train:
    label_subset = datasets.label_subset_for(source, data.train_split,
                                             data.train_label_fraction, data.label_fraction_seed)
    if task_class.trains_on_label_subset:
      num_train = len(label_subset)
  num_eval = source.num_examples(data.eval_split) if source.labelled else 0
  steps = resolve_steps(train, config.optim, num_train, num_eval)
  replicas = strategy.num_replicas_in_sync
  # Only training splits --train_batch_size over the replicas; every mode here reads eval batches.
  batches = (('train_batch_size', train.train_batch_size),) if needs_train else ()
  for flag, batch in batches + (('eval_batch_size', train.eval_batch_size),):
    config_lib.check_global_batch(flag, batch, replicas)
  if needs_train and num_train < train.train_batch_size:
    raise datasets.DatasetError(
        f'--train_split={data.train_split} of --dataset={data.dataset} has {num_train} '
        f'training examples{" (after --train_label_fraction)" if label_subset is not None else ""}'
        f', fewer than one global batch (--train_batch_size={train.train_batch_size}): every '
        'batch would repeat images (an image would be its own negative). Lower '
        '--train_batch_size or use more data.')
  if source.labelled:
    log.info('Dataset %s: %d train examples (%s), %d eval examples (%s), %d classes.',
             data.dataset, num_train, data.train_split, num_eval, data.eval_split,
             source.num_classes)
  else:
    log.info('Dataset %s: %d unlabelled train examples (%s).', data.dataset, num_train,
             data.train_split)
  if needs_train:
    log.info('Steps: %d train (%d per epoch, %d warmup), checkpoint every %d, %d per loop; '
             '%s eval steps.', steps.train_steps, steps.epoch_steps, steps.warmup_steps,
             steps.checkpoint_steps, steps.steps_per_loop,
             train.eval_steps or f'all (about {steps.eval_steps})')
  return config, source, steps, label_subset
