"""Picks the tf.distribute strategy from `--distribution_strategy` and the hardware.

`auto` tries, in order: a TPU unless `allow_tpu` is False (named by --tpu_name/--master, the
TPU_NAME environment, or one attached to this VM), MultiWorkerMirroredStrategy when TF_CONFIG
lists more than one worker, MirroredStrategy over the local GPUs when there is at least one,
else the default strategy.
Probing is cheap and quiet on a machine without TPUs: no network call is made unless a TPU is
named somewhere. Create the strategy at program start, before other TensorFlow work (multi-
worker and TPU initialisation require it).
"""

from __future__ import annotations

import atexit
import glob
import importlib.util
import json
import os
import shutil
import tempfile
from typing import Dict, Mapping, Optional

from absl import logging
import tensorflow as tf

from tf_simclr import cpu_kernels
from tf_simclr.config import ConfigError, DistributeConfig
from tf_simclr.errors import UserError

# Environment variables through which Cloud TPU tooling names a TPU.
_TPU_ENV_VARS = ('TPU_NAME', 'KUBE_GOOGLE_CLOUD_TPU_ENDPOINTS', 'TPU_CONFIG')

_NO_TPU_HELP = ('pass --tpu_name (or --master=grpc://IP:8470), set TPU_NAME, run on a TPU VM, or '
                'use --distribution_strategy=auto to fall back to GPUs/CPU.')


def num_workers_from_tf_config(env: Mapping[str, str]) -> int:
  """Number of worker-like tasks (chief + worker) in env['TF_CONFIG']; 0 when it is unset."""
  raw = env.get('TF_CONFIG')
  if not raw:
    return 0
  try:
    cluster = json.loads(raw).get('cluster', {})
  except (ValueError, AttributeError) as e:
    raise ConfigError(f'The TF_CONFIG environment variable is not a JSON object ({e}); fix or '
                      'unset it (it should look like {"cluster": {"worker": [...]}, '
                      '"task": {"type": "worker", "index": 0}}).') from e
  if not isinstance(cluster, dict):
    raise ConfigError('TF_CONFIG["cluster"] must map job names to address lists; fix or unset '
                      'the TF_CONFIG environment variable.')
  return sum(len(cluster.get(job) or ()) for job in ('chief', 'worker'))


def _local_tpu_present() -> bool:
  """True on a Cloud TPU VM: chips appear as /dev/accel*, or as vfio devices with libtpu."""
  if glob.glob('/dev/accel*'):
    return True
  vfio = [p for p in glob.glob('/dev/vfio/*') if os.path.basename(p) != 'vfio']
  return bool(vfio) and importlib.util.find_spec('libtpu') is not None


def _tpu_target(config: DistributeConfig, env: Mapping[str, str]) -> Optional[str]:
  """What to hand TPUClusterResolver: a name/address, '' (resolve from env), 'local' or None."""
  if config.tpu_name:
    return config.tpu_name
  if config.master:
    return config.master
  if any(env.get(var) for var in _TPU_ENV_VARS):
    return ''
  if _local_tpu_present():
    return 'local'
  return None


def _tpu_strategy(config: DistributeConfig, target: str) -> tf.distribute.Strategy:
  """Connects to the TPU and initialises it, as the original run.py."""
  try:
    if config.tpu_name:
      resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
          config.tpu_name, zone=config.tpu_zone, project=config.gcp_project)
    else:
      resolver = tf.distribute.cluster_resolver.TPUClusterResolver(target or None)
    tf.config.experimental_connect_to_cluster(resolver)
    topology = tf.tpu.experimental.initialize_tpu_system(resolver)
  except (ValueError, RuntimeError, tf.errors.OpError) as e:
    raise ConfigError(f'Could not connect to the TPU {target or "named by the environment"!r} '
                      f'({e}); check --tpu_name/--tpu_zone/--gcp_project or --master, or '
                      'use --distribution_strategy=auto.') from e
  logging.info('TPU topology: %d task(s), %d TPU(s) per task.', topology.num_tasks,
               topology.num_tpus_per_task)
  return tf.distribute.TPUStrategy(resolver)


def warn_if_gpu_unused() -> bool:
  """Warns (and returns True) when this machine has an NVIDIA GPU that TensorFlow does not see.

  Plain `pip install tensorflow` brings no CUDA libraries; TensorFlow's own "skipping GPU"
  message is hidden by the log level run.py sets, so without this the run silently uses the CPU.
  """
  sign = cpu_kernels.nvidia_sign()
  if sign is None or tf.config.list_physical_devices('GPU'):
    return False
  logging.warning('This machine has an NVIDIA GPU (%s) but TensorFlow sees no GPU, so this run '
                  'uses the CPU. Install TensorFlow with its CUDA libraries: '
                  'pip install "tensorflow[and-cuda]==%s" (docs/multi_device.md); check with '
                  'python -c "import tensorflow as tf; '
                  'print(tf.config.list_physical_devices(\'GPU\'))".', sign, tf.__version__)
  return True


def split_cpu(num_devices: int) -> list:
  """Splits the host CPU into `num_devices` logical devices; returns their names.

  A testing and teaching aid (`--cpu_devices`): MirroredStrategy over them runs every multi-
  replica code path (per-replica batches, all-reduce, gathers, synchronized BN) on one CPU.
  Logical devices are fixed once TensorFlow has initialised its devices (its first op), so call
  this first; a process that already has at least `num_devices` CPU devices (e.g. a test
  session) uses its first `num_devices`.
  """
  cpu = tf.config.list_physical_devices('CPU')[0]
  try:
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(num_devices)])
  except RuntimeError as e:  # Devices already initialised.
    have = len(tf.config.list_logical_devices('CPU'))
    if have < num_devices:
      raise ConfigError(
          f'--cpu_devices={num_devices}: TensorFlow already initialised {have} CPU device(s) '
          'in this process. The split must happen before any other TensorFlow work: create the '
          'strategy first (from Python: tf_simclr.distribute.split_cpu before any op).') from e
  return [f'/cpu:{i}' for i in range(num_devices)]


def _mirrored(config: DistributeConfig) -> tf.distribute.Strategy:
  """MirroredStrategy over the local GPUs, else over `config.cpu_devices` logical CPUs."""
  if config.cpu_devices > 1 and not tf.config.list_physical_devices('GPU'):
    return tf.distribute.MirroredStrategy(split_cpu(config.cpu_devices))
  if config.cpu_devices > 1:
    logging.warning('--cpu_devices=%d is ignored: this machine has GPUs, and mirrored uses them.',
                    config.cpu_devices)
  return tf.distribute.MirroredStrategy()


def make_strategy(config: DistributeConfig,
                  env: Optional[Mapping[str, str]] = None) -> tf.distribute.Strategy:
  """Creates the strategy for `config.strategy` (`auto`, `tpu`, `mirrored`, ...) and logs it.

  With `config.cpu_devices` > 1 (and no GPU) `mirrored`, and `auto` when it finds no TPU and no
  cluster, mirror over that many logical CPU devices (`split_cpu`).
  """
  env = os.environ if env is None else env
  choice = config.strategy
  if choice == 'auto':
    target = _tpu_target(config, env) if config.allow_tpu else None
    if target is not None:
      strategy = _tpu_strategy(config, target)
    elif num_workers_from_tf_config(env) > 1:
      strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif tf.config.list_physical_devices('GPU') or config.cpu_devices > 1:
      strategy = _mirrored(config)
    else:
      strategy = tf.distribute.get_strategy()
  elif choice == 'tpu':  # DistributeConfig refuses strategy=tpu with allow_tpu=False.
    target = _tpu_target(config, env)
    if target is None:
      raise ConfigError(f'--distribution_strategy=tpu but no TPU was found: {_NO_TPU_HELP}')
    strategy = _tpu_strategy(config, target)
  elif choice == 'multi_worker':
    if num_workers_from_tf_config(env) < 1:
      logging.warning('--distribution_strategy=multi_worker without a TF_CONFIG cluster: '
                      'running as a single worker.')
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
  elif choice == 'mirrored':
    strategy = _mirrored(config)
  elif choice == 'default':
    strategy = tf.distribute.get_strategy()
  else:  # DistributeConfig checks the choice.
    raise ValueError(f'unknown strategy {choice!r}')
  if not is_tpu(strategy):
    warn_if_gpu_unused()
  logging.info('Distribution strategy: %s', describe(strategy))
  return strategy


def describe(strategy: tf.distribute.Strategy) -> str:
  """A short description, e.g. 'MirroredStrategy, 2 replicas (/cpu:0, /cpu:1)'."""
  n = strategy.num_replicas_in_sync
  name = type(strategy).__name__
  if is_multi_worker(strategy):
    name = 'MultiWorkerMirroredStrategy'  # its class is CollectiveAllReduceStrategy
  text = f'{name}, {n} replica{"s" if n != 1 else ""}'
  try:
    devices = tuple(strategy.extended.worker_devices)
  except (RuntimeError, NotImplementedError, AttributeError):  # the default strategy has none
    devices = ()
  if devices and len(devices) <= 8:
    text += ' (' + ', '.join(devices) + ')'
  return text


def is_tpu(strategy: tf.distribute.Strategy) -> bool:
  """TPUStrategy (or its experimental predecessor), by class name so no TPU import is needed."""
  return any(c.__name__ in ('TPUStrategy', 'TPUStrategyV2') for c in type(strategy).__mro__)


def is_multi_worker(strategy) -> bool:
  """MultiWorkerMirroredStrategy (class CollectiveAllReduceStrategy), by class name."""
  return any(c.__name__ in ('CollectiveAllReduceStrategy', 'MultiWorkerMirroredStrategy')
             for c in type(strategy).__mro__)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Whether this process writes shared outputs (checkpoints, summaries, results, exports).

  Only multi-worker strategies have non-chief processes: the chief is task `chief`, or worker 0
  when the cluster has no chief task.
  """
  resolver = getattr(strategy, 'cluster_resolver', None)
  if resolver is None or not is_multi_worker(strategy):
    return True
  task_type, task_id = resolver.task_type, resolver.task_id
  if task_type is None or task_type == 'chief':
    return True
  has_chief = 'chief' in resolver.cluster_spec().as_dict()
  return task_type == 'worker' and task_id == 0 and not has_chief


class WorkersDisagreeError(ConfigError):
  """The workers of one multi-worker run restored different training steps."""


def restored_steps(strategy: tf.distribute.Strategy, step: int) -> tuple:
  """(MIN, MAX) over all replicas of every worker of the step each restored.

  ReduceOp has only SUM and MEAN: each replica places its step at its own index of a vector
  (one-hot) and the vectors are summed across replicas, so every worker sees all steps. float32
  holds steps exactly up to 2**24.
  """
  n = strategy.num_replicas_in_sync
  if n < 2:
    return step, step
  value = float(step)

  @tf.function
  def place():
    index = tf.distribute.get_replica_context().replica_id_in_sync_group
    return tf.one_hot(index, n, dtype=tf.float32) * value

  steps = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(place), axis=None).numpy()
  return int(steps.min()), int(steps.max())


def check_same_step(strategy: tf.distribute.Strategy, step: int, model_dir: str) -> None:
  """Raises WorkersDisagreeError on every worker unless all restored the same step.

  Each worker restores from its own --model_dir path; with a folder per machine a restarted run
  would train the chief's step-N model against the others' step-0 models (and then hang).
  """
  low, high = restored_steps(strategy, step)
  if low != high:
    raise WorkersDisagreeError(
        f'The workers of this run restored different training steps: {low} and {high} (this '
        f'worker: step {step} from --model_dir={model_dir}). For multi-worker runs --model_dir '
        'must be one shared location that every worker reads and writes (gs:// or a shared '
        'filesystem), not a folder per machine.')


class AnotherWorkerFailedError(UserError):
  """Another worker of this multi-worker run stopped before training (its log says why)."""


def any_worker(strategy: tf.distribute.Strategy, flag: bool) -> bool:
  """Whether `flag` is set on any worker of a multi-worker run (a SUM of 0/1 across replicas;
  ReduceOp has no MAX). Every worker must call it at the same point. Single-process runs:
  `flag` as given.

  Used where one worker alone may have a reason to stop (a SIGTERM; a chief that could not take
  model_dir's lock): without this agreement the others would wait at the next collective.
  """
  if not is_multi_worker(strategy) or strategy.num_replicas_in_sync < 2:
    return flag
  value = float(flag)

  @tf.function
  def place():
    return tf.constant(value)

  return float(strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(place), axis=None)) > 0


class WorkerLostError(RuntimeError):
  """Another worker of this multi-worker run died or stopped: this one stops too (exit 1)."""


# What TensorFlow raises in a collective (or a coordination-service call) once a peer is gone:
# its heartbeat stopped (killed, crashed, interrupted) or its address refuses connections.
PEER_FAILURES = (tf.errors.UnavailableError, tf.errors.AbortedError,
                  tf.errors.DeadlineExceededError, tf.errors.CancelledError)


def peer_failure(error: BaseException, env: Optional[Mapping[str, str]] = None,
                 doing: str = '') -> Optional[WorkerLostError]:
  """A WorkerLostError explaining `error` when it is TensorFlow's report of a lost peer in a
  multi-worker run (TF_CONFIG lists several workers); None for anything else.

  TensorFlow's coordination service (which MultiWorkerMirroredStrategy starts) notices a worker
  whose heartbeats stop (kill -9, a crash, a SIGTERM's default exit) within its heartbeat
  timeout and aborts every collective in flight or to come with UnavailableError: this turns that
  traceback into a message saying what to do.
  """
  if not isinstance(error, PEER_FAILURES):
    return None
  if num_workers_from_tf_config(os.environ if env is None else env) < 2:
    return None
  detail = ' '.join(str(error).split())
  return WorkerLostError(
      'Another worker of this multi-worker run stopped (killed, crashed or interrupted)'
      + (f' {doing}' if doing else '') + ': stopping this worker too. Restart every worker '
      'with the same command: training resumes from the newest checkpoint in --model_dir. '
      f'(TensorFlow: {type(error).__name__}: {detail[:300]})')


class ChiefExchange:
  """Values the chief publishes and the other workers wait for (TensorFlow's coordination
  service key-value store, which MultiWorkerMirroredStrategy starts on the chief).

  A wait is bounded (`timeout_s`) and ends early with an error when the chief dies: the
  coordination service is the chief's. Single-process runs: this process is the chief and
  publishing does nothing.
  """

  PREFIX = 'tf_simclr/'

  def __init__(self, strategy: tf.distribute.Strategy):
    self.chief = is_chief(strategy)
    self.multi_worker = is_multi_worker(strategy) and strategy.num_replicas_in_sync > 1

  def publish(self, key: str, value: str) -> None:
    if self.multi_worker and self.chief:
      from tensorflow.python.eager import context  # pylint: disable=g-import-not-at-top
      context.context().set_config_key_value(self.PREFIX + key, value)

  def wait(self, key: str, timeout_s: float, what: str) -> str:
    """The chief's value of `key` (non-chief workers only); a UserError after `timeout_s` or
    when the chief is gone, naming `what` was waited for."""
    from tensorflow.python.eager import context  # pylint: disable=g-import-not-at-top
    try:
      return context.context().get_config_key_value(self.PREFIX + key,
                                                     max(1, int(timeout_s * 1000)))
    except tf.errors.DeadlineExceededError:
      raise AnotherWorkerFailedError(
          f'Waited {timeout_s:g} s for the chief of this multi-worker run ({what}); stopping '
          'this worker. Check the chief\'s log.') from None
    except tf.errors.OpError as e:
      raise AnotherWorkerFailedError(
          f'The chief of this multi-worker run stopped while this worker waited for it ({what}; '
          f'{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ""}). '
          'Its log says why.') from None


# model_dir -> this non-chief process's temporary folder (removed by remove_worker_dirs).
_WORKER_DIRS: Dict[str, str] = {}


def write_dir(model_dir: str, strategy: tf.distribute.Strategy) -> str:
  """Where this process saves checkpoints and summaries: model_dir for the chief, else a
  temporary folder of its own.

  Every multi-worker process must take part in saving (it runs collectives), but only the
  chief's files are kept: the others write to a local temporary folder (one per model_dir and
  process) that `remove_worker_dirs` deletes when the run ends, as TensorFlow's multi-worker
  guide does, so nothing of theirs is left in model_dir.
  """
  if is_chief(strategy):
    return model_dir
  path = _WORKER_DIRS.get(model_dir)
  if path is None or not os.path.isdir(path):
    resolver = strategy.cluster_resolver
    path = tempfile.mkdtemp(prefix=f'tf_simclr_{resolver.task_type}{resolver.task_id}_')
    _WORKER_DIRS[model_dir] = path
  return path


def remove_worker_dirs() -> None:
  """Deletes the temporary folders `write_dir` made for this (non-chief) process."""
  while _WORKER_DIRS:
    shutil.rmtree(_WORKER_DIRS.popitem()[1], ignore_errors=True)


atexit.register(remove_worker_dirs)
