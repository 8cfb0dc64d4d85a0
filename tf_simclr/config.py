"""Frozen, validated configuration objects.

`run.py` turns absl flags into one `Config`; library code receives only the slice it needs. Every
check a user can trip raises `ConfigError` naming the flag and the fix, before any expensive work.
Steps-versus-epochs arithmetic lives in `resolve_steps` and nowhere else.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from tf_simclr.errors import ConfigError, DatasetError

RESNET_DEPTHS = (18, 34, 50, 101, 152, 200)
PROJ_HEAD_MODES = ('none', 'linear', 'nonlinear')
TRAIN_MODES = ('pretrain', 'finetune', 'distill')
# --mode: those that train, and those that read a run (its record and checkpoints) and never train.
TRAINING_MODES = ('train', 'train_then_eval')
# Inspecting a run (evaluation/): nearest neighbours of query images, near-duplicate groups,
# the pretraining augmentation's views; all write pictures into model_dir.
INSPECT_MODES = ('neighbors', 'duplicates', 'preview_augment')
READING_MODES = ('eval', 'export', 'probe', 'embed') + INSPECT_MODES
MODES = TRAINING_MODES + READING_MODES
# Modes that read (or compute) the embeddings of --embed_split.
EMBEDDING_MODES = ('embed', 'neighbors', 'duplicates')
# The flags that fix the encoder and projection head: a reading mode takes them from the run's
# record and a given value must agree (config_record), a resume may not change them, and the
# distillation teacher has a --teacher_* flag for each.
ARCHITECTURE_FLAGS = ('resnet_depth', 'width_multiplier', 'sk_ratio', 'se_ratio', 'proj_head_mode',
                      'proj_out_dim', 'num_proj_layers', 'ft_proj_selector')
# The model_dir LOCK's lease in seconds (--lock_lease_s; run_dir.RunLock).
LOCK_LEASE_S = 300.0
OPTIMIZERS = ('momentum', 'adam', 'lars')
LR_SCALINGS = ('linear', 'sqrt')
COLOR_JITTER_IMPLS = ('simclrv1', 'simclrv2')
STRATEGIES = ('auto', 'tpu', 'mirrored', 'multi_worker', 'default')
MAX_CPU_DEVICES = 64  # --cpu_devices: a testing aid; more logical devices only cost memory.
PRECISIONS = ('float32', 'mixed_bfloat16', 'mixed_float16')
# The model's endpoints (models/simclr.py), the names of the original's SavedModel outputs.
ENDPOINTS = ('initial_conv', 'initial_max_pool', 'block_group1', 'block_group2', 'block_group3',
             'block_group4', 'final_avg_pool', 'proj_head_input', 'proj_head_output',
             'logits_sup')
# How a fine-tune/distill run starts its supervised head (see TrainConfig.logits_layer_init).
LOGITS_LAYER_INITS = ('checkpoint', 'zeros', 'random')
# BN layers of frozen encoder parts in training: batch statistics + moving-average updates (the
# original), or inference mode with fixed moving statistics.
FROZEN_BATCH_NORMS = ('batch_stats', 'moving_stats')
# The distillation loss: SimCLRv2 Eq. 2 as printed, or times T^2 (the authors' colab, Hinton et al.).
DISTILL_LOSS_SCALES = ('none', 't_squared')
# The built-in dataset (data/synthetic.py): generated in memory, no download.
BUILTIN_DATASET = 'shapes10'


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def _check_choice(flag: str, value, choices) -> None:
  _check(value in choices, f'--{flag}={value!r} is not one of {list(choices)}.')


SMALL_IMAGE_SIZE = 32


def small_images(image_size: int) -> bool:
  """The one "<= 32 px" rule: CIFAR-sized images get the CIFAR stem (3x3 conv, no max pool), no
  eval centre crop and a larger shuffle buffer, as in the original."""
  return image_size <= SMALL_IMAGE_SIZE


def check_label_fraction(fraction: float) -> None:
  """--train_label_fraction must be in (0, 1] (DataConfig and the label-subset selector)."""
  if not 0.0 < fraction <= 1.0:
    raise DatasetError(f'--train_label_fraction={fraction} must be in (0, 1].')


def check_global_batch(flag: str, global_batch_size: int, replicas: int) -> None:
  """A global batch must split evenly over the replicas (checked before the run and by the
  pipelines, which libraries may call directly)."""
  if global_batch_size < 1 or global_batch_size % replicas:
    raise DatasetError(f'--{flag}={global_batch_size} must be a positive multiple of the number '
                       f'of replicas ({replicas}) so every replica gets the same batch.')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Encoder and heads (see models/)."""
  resnet_depth: int = 50
  width_multiplier: float = 1
  cifar_stem: bool = False
  sk_ratio: float = 0.0
  se_ratio: float = 0.0
  batch_norm_decay: float = 0.9
  global_bn: bool = True
  proj_head_mode: str = 'nonlinear'
  proj_out_dim: int = 128
  num_proj_layers: int = 3
  # Which projection-head layer feeds the supervised head: 0 = encoder output, -1 = last layer.
  ft_proj_selector: int = 0
  # Build the supervised (logits) head at all.
  supervised_head: bool = True
  # Linear eval while pretraining: the supervised head sees stop_gradient(features).
  supervised_head_stop_gradient: bool = False
  # -1 trains everything; k in 0..4 freezes the stem and block groups 1..k (4 = linear eval).
  fine_tune_after_block: int = -1
  # How the frozen parts' BN layers train (FROZEN_BATCH_NORMS); no effect when nothing is frozen.
  frozen_batch_norm: str = 'batch_stats'
  # Keras dtype policy of the layers (variables stay float32); see tf_simclr/precision.py.
  precision: str = 'float32'

  def __post_init__(self):
    _check(self.resnet_depth in RESNET_DEPTHS,
           f'--resnet_depth={self.resnet_depth} is not supported; use one of {list(RESNET_DEPTHS)}.')
    _check(self.width_multiplier > 0,
           f'--width_multiplier={self.width_multiplier} must be positive (1, 2, 3, 4 as in the '
           'papers; fractions such as 0.25 give small models for CPUs).')
    _check(self.sk_ratio >= 0, f'--sk_ratio={self.sk_ratio} must be >= 0 (0 disables SK).')
    _check(self.se_ratio >= 0, f'--se_ratio={self.se_ratio} must be >= 0 (0 disables SE).')
    _check(0.0 < self.batch_norm_decay < 1.0,
           f'--batch_norm_decay={self.batch_norm_decay} must be in (0, 1), e.g. 0.9.')
    _check_choice('proj_head_mode', self.proj_head_mode, PROJ_HEAD_MODES)
    _check(self.proj_out_dim >= 1, f'--proj_out_dim={self.proj_out_dim} must be >= 1.')
    _check(self.proj_head_mode != 'nonlinear' or self.num_proj_layers >= 1,
           f'--num_proj_layers={self.num_proj_layers} must be >= 1 with '
           '--proj_head_mode=nonlinear (use --proj_head_mode=none for no head).')
    n = self.num_head_outputs
    _check(-n <= self.ft_proj_selector < n,
           f'--ft_proj_selector={self.ft_proj_selector} is out of range for a '
           f'{self.proj_head_mode} projection head with {n - 1} layer(s): use a value in '
           f'[{-n}, {n - 1}] (0 = encoder output, -1 = last head layer).')
    _check(-1 <= self.fine_tune_after_block <= 4,
           f'--fine_tune_after_block={self.fine_tune_after_block} must be in -1..4.')
    _check_choice('frozen_batch_norm', self.frozen_batch_norm, FROZEN_BATCH_NORMS)
    _check_choice('precision', self.precision, PRECISIONS)

  @property
  def num_head_layers(self) -> int:
    """Number of projection-head layers for the configured mode."""
    return {'none': 0, 'linear': 1, 'nonlinear': self.num_proj_layers}[self.proj_head_mode]

  @property
  def num_head_outputs(self) -> int:
    """Length of the list [head input, layer 1 output, ...] that ft_proj_selector indexes."""
    return self.num_head_layers + 1


def model_config(train_mode: str, image_size: int, lineareval_while_pretraining: bool = False,
                 fine_tune_after_block: int = -1, **architecture) -> ModelConfig:
  """The ModelConfig of a run: the one place for the mode-to-model and "<= 32 px" rules.

  `architecture`: the other ModelConfig fields (resnet_depth, width_multiplier, ...). Pretraining
  builds a supervised head only with linear eval, and that head sees stop_gradient(features);
  fine-tuning and distillation train a supervised head end to end; only fine-tuning freezes.
  """
  _check_choice('train_mode', train_mode, TRAIN_MODES)
  if train_mode == 'pretrain' and fine_tune_after_block != -1:
    raise ConfigError('--fine_tune_after_block freezes layers and only applies to '
                      '--train_mode=finetune; leave it at -1 for pretraining.')
  frozen_bn = architecture.get('frozen_batch_norm', ModelConfig.frozen_batch_norm)
  if frozen_bn != ModelConfig.frozen_batch_norm and (
      train_mode != 'finetune' or fine_tune_after_block == -1):
    raise ConfigError(f'--frozen_batch_norm={frozen_bn} only applies to frozen layers: use it '
                      'with --train_mode=finetune --fine_tune_after_block=0..4, or drop it.')
  return ModelConfig(
      cifar_stem=small_images(image_size),
      supervised_head=train_mode != 'pretrain' or lineareval_while_pretraining,
      supervised_head_stop_gradient=train_mode == 'pretrain',
      fine_tune_after_block=fine_tune_after_block if train_mode == 'finetune' else -1,
      **architecture)


def teacher_model_config(student: ModelConfig, **architecture) -> ModelConfig:
  """A distillation teacher: the student's settings with `architecture` (its own fields) and a
  supervised head trained end to end, nothing frozen (a fine-tuned classifier)."""
  return dataclasses.replace(student, supervised_head=True, supervised_head_stop_gradient=False,
                             fine_tune_after_block=-1, **architecture)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which data, and how it is augmented (see data/)."""
  dataset: str = 'imagenet2012'
  data_dir: Optional[str] = None
  train_split: str = 'train'
  eval_split: str = 'validation'
  image_size: int = 224
  color_jitter_strength: float = 1.0
  color_jitter_impl: str = 'simclrv2'
  use_blur: bool = True
  cache_dataset: bool = False
  # Fraction of the train split kept, class-balanced and seeded (1.0 keeps everything).
  train_label_fraction: float = 1.0
  label_fraction_seed: int = 0
  # folder: datasets: decode every image once up front and leave out those that fail.
  skip_bad_images: bool = False
  # folder: datasets: leave out class folders without images (else they are an error).
  skip_empty_classes: bool = False

  def __post_init__(self):
    _check(bool(self.dataset),
           '--dataset is empty: give a TFDS name, folder:PATH, images:PATH or shapes10 (built in).')
    _check(self.image_size >= 8, f'--image_size={self.image_size} must be >= 8.')
    _check(self.color_jitter_strength >= 0,
           f'--color_jitter_strength={self.color_jitter_strength} must be >= 0.')
    _check_choice('color_jitter_impl', self.color_jitter_impl, COLOR_JITTER_IMPLS)
    check_label_fraction(self.train_label_fraction)

  @property
  def test_crop(self) -> bool:
    """Eval images are centre-cropped (0.875) unless they are small (`small_images`)."""
    return not small_images(self.image_size)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimizer and learning-rate schedule (see optim/)."""
  optimizer: str = 'lars'
  learning_rate: float = 0.3
  learning_rate_scaling: str = 'linear'
  warmup_epochs: float = 10.0
  weight_decay: float = 1e-6
  momentum: float = 0.9

  def __post_init__(self):
    _check_choice('optimizer', self.optimizer, OPTIMIZERS)
    _check_choice('learning_rate_scaling', self.learning_rate_scaling, LR_SCALINGS)
    _check(self.learning_rate >= 0, f'--learning_rate={self.learning_rate} must be >= 0.')
    _check(self.warmup_epochs >= 0, f'--warmup_epochs={self.warmup_epochs} must be >= 0.')
    _check(self.weight_decay >= 0, f'--weight_decay={self.weight_decay} must be >= 0.')
    _check(0 <= self.momentum < 1, f'--momentum={self.momentum} must be in [0, 1).')


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Teacher-to-student distillation (train_mode=distill)."""
  teacher: Optional[ModelConfig] = None
  teacher_checkpoint: Optional[str] = None
  temperature: float = 1.0
  # Weight of the label loss on the labeled subset (paper Eq. 3); 0 = pure distillation.
  label_weight: float = 0.0
  # none: the paper's Eq. 2; t_squared: times T^2, the authors' colab (DISTILL_LOSS_SCALES).
  loss_scale: str = 'none'

  def __post_init__(self):
    _check(self.temperature > 0, f'--distill_temperature={self.temperature} must be > 0.')
    _check(0 <= self.label_weight <= 1,
           f'--distill_label_weight={self.label_weight} must be in [0, 1].')
    _check_choice('distill_loss_scale', self.loss_scale, DISTILL_LOSS_SCALES)


def distill_config(train_mode: str, resolve_teacher, **fields) -> DistillConfig:
  """The DistillConfig of a run: the default unless distilling; then `resolve_teacher()` (the
  teacher's ModelConfig, which may read its flags.json) and `fields` (DistillConfig's others)."""
  if train_mode != 'distill':
    return DistillConfig()
  return DistillConfig(teacher=resolve_teacher(), **fields)


@dataclasses.dataclass(frozen=True)
class DistributeConfig:
  """How to pick the tf.distribute strategy (see distribute.py)."""
  strategy: str = 'auto'
  tpu_name: Optional[str] = None
  tpu_zone: Optional[str] = None
  gcp_project: Optional[str] = None
  master: Optional[str] = None
  # False when the user ruled TPUs out (--use_tpu=False): `auto` then never probes for one.
  allow_tpu: bool = True
  # --allow_local_paths_on_tpu: a single-host TPU VM may keep model_dir/data on its own disk.
  allow_local_paths_on_tpu: bool = False
  # --cpu_devices: split the host CPU into this many logical devices (0: leave it whole), so
  # `mirrored` (or `auto` without accelerators) runs that many replicas on a CPU-only machine.
  cpu_devices: int = 0

  @property
  def tpu_requested(self) -> bool:
    """The flags ask for a TPU (one found on the VM by `auto` is only known once probed)."""
    return self.strategy == 'tpu' or (self.strategy == 'auto' and self.allow_tpu and
                                      bool(self.tpu_name or self.master))

  def __post_init__(self):
    _check_choice('distribution_strategy', self.strategy, STRATEGIES)
    _check(self.allow_tpu or self.strategy != 'tpu',
           '--use_tpu=False contradicts --distribution_strategy=tpu; drop one.')
    _check(0 <= self.cpu_devices <= MAX_CPU_DEVICES,
           f'--cpu_devices={self.cpu_devices} must lie in [0, {MAX_CPU_DEVICES}] (0: one CPU '
           'device, the default).')
    _check(self.cpu_devices <= 1 or self.strategy in ('auto', 'mirrored'),
           f'--cpu_devices={self.cpu_devices} simulates replicas for MirroredStrategy only; use '
           f'--distribution_strategy=mirrored (or auto) instead of {self.strategy!r}, or drop '
           '--cpu_devices.')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training loop, objectives and bookkeeping (see train/)."""
  model_dir: str = ''
  train_mode: str = 'pretrain'
  mode: str = 'train'
  train_batch_size: int = 512
  train_epochs: int = 100
  train_steps: int = 0
  eval_steps: int = 0
  eval_batch_size: int = 256
  checkpoint_epochs: int = 1
  checkpoint_steps: int = 0
  steps_per_loop: int = 0
  checkpoint: Optional[str] = None
  keep_checkpoint_max: int = 5
  keep_hub_module_max: int = 1
  temperature: float = 0.1
  hidden_norm: bool = True
  zero_init_logits_layer: bool = False
  # checkpoint (the original): the head --checkpoint holds when its shape fits, else N(0, 0.01);
  # --zero_init_logits_layer does nothing (the original zeroes before the variables exist).
  # zeros: zeroed after the restore. random: the head's own seeded N(0, 0.01) init.
  logits_layer_init: str = 'checkpoint'
  eval_name: Optional[str] = None
  seed: Optional[int] = None
  # --mode=eval: seconds to wait for each new checkpoint (0: forever).
  eval_timeout: float = 3600
  # XLA-compile the train and eval steps (slower on CPU; see docs/performance.md).
  jit_compile: bool = False
  # --mode=embed: the split (None: --train_split) and the endpoint written to features.npy.
  embed_split: Optional[str] = None
  embed_endpoint: str = 'final_avg_pool'
  # --mode=neighbors: the query image or folder, and how many neighbours each.
  query: Optional[str] = None
  num_neighbors: int = 8
  # --mode=duplicates: images whose embeddings have cosine similarity >= this are linked.
  duplicate_threshold: float = 0.95
  # --mode=preview_augment: how many training images, and pairs of views of each.
  num_preview_images: int = 6
  num_preview_pairs: int = 3
  # Resume although flags the checkpoints depend on changed (config_record.check_resume_flags).
  allow_flag_changes: bool = False
  # The model_dir LOCK's lease (run_dir.py): renewed every loop and every lease/4 seconds.
  lock_lease_s: float = LOCK_LEASE_S

  def __post_init__(self):
    _check(bool(self.model_dir), '--model_dir is required: the folder for checkpoints, '
           'summaries and results (it is created if missing).')
    _check_choice('train_mode', self.train_mode, TRAIN_MODES)
    _check_choice('mode', self.mode, MODES)
    _check_choice('logits_layer_init', self.logits_layer_init, LOGITS_LAYER_INITS)
    _check(self.train_batch_size >= 1, f'--train_batch_size={self.train_batch_size} must be >= 1.')
    _check(self.eval_batch_size >= 1, f'--eval_batch_size={self.eval_batch_size} must be >= 1.')
    _check(self.train_steps >= 0, f'--train_steps={self.train_steps} must be >= 0.')
    _check(self.train_steps > 0 or self.train_epochs > 0,
           'Set --train_steps or --train_epochs to a positive number.')
    _check(self.eval_steps >= 0, f'--eval_steps={self.eval_steps} must be >= 0.')
    _check(self.checkpoint_steps >= 0, f'--checkpoint_steps={self.checkpoint_steps} must be >= 0.')
    _check(self.checkpoint_epochs >= 0,
           f'--checkpoint_epochs={self.checkpoint_epochs} must be >= 0.')
    _check(self.steps_per_loop >= 0, f'--steps_per_loop={self.steps_per_loop} must be >= 0.')
    _check(self.keep_checkpoint_max >= 1,
           f'--keep_checkpoint_max={self.keep_checkpoint_max} must be >= 1.')
    _check(self.temperature > 0, f'--temperature={self.temperature} must be > 0.')
    _check_choice('embed_endpoint', self.embed_endpoint, ENDPOINTS)
    _check(self.mode != 'neighbors' or bool(self.query),
           '--mode=neighbors needs --query: an image file or a folder of images.')
    _check(self.num_neighbors >= 1, f'--num_neighbors={self.num_neighbors} must be >= 1.')
    _check(0.0 < self.duplicate_threshold <= 1.0,
           f'--threshold={self.duplicate_threshold} must be in (0, 1] (a cosine '
           'similarity; 0.95-0.99 finds re-encoded, resized and flipped copies).')
    _check(self.num_preview_images >= 1,
           f'--num_preview_images={self.num_preview_images} must be >= 1.')
    _check(self.num_preview_pairs >= 1,
           f'--num_preview_pairs={self.num_preview_pairs} must be >= 1.')
    _check(self.eval_timeout >= 0,
           f'--eval_timeout={self.eval_timeout} must be >= 0 (seconds; 0 waits forever).')
    _check(self.lock_lease_s >= 1, f'--lock_lease_s={self.lock_lease_s} must be >= 1 (seconds).')


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  """Readouts on frozen features (evaluation/probe.py): kNN monitor, linear probe, random-init baseline.

  `knn` and `linear_probe` None mean automatic: the kNN runs when pretraining on a labelled dataset;
  the linear probe at the end of pretraining with --mode=train_then_eval (and always in
  --mode=probe). The experiment resolves them once it knows the dataset.
  """
  knn: Optional[bool] = None
  knn_k: int = 200
  knn_temperature: float = 0.1
  # kNN every this many epochs while training (0: only at evaluations).
  knn_every_epochs: int = 10
  # Class-balanced, seeded cap on the train examples read for the kNN bank and the probe (0: all).
  knn_max_bank_size: int = 50000
  linear_probe: Optional[bool] = None
  random_init_baseline: bool = False
  seed: int = 0

  def __post_init__(self):
    _check(self.knn_k >= 1, f'--knn_k={self.knn_k} must be >= 1 (200 as Wu et al. 2018).')
    _check(self.knn_temperature > 0,
           f'--knn_temperature={self.knn_temperature} must be > 0 (0.1 as Wu et al. 2018).')
    _check(self.knn_every_epochs >= 0,
           f'--knn_every_epochs={self.knn_every_epochs} must be >= 0 (0: only at evaluations).')
    _check(self.knn_max_bank_size >= 0,
           f'--knn_max_bank_size={self.knn_max_bank_size} must be >= 0 (0: the whole split).')


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything one run needs."""
  model: ModelConfig
  data: DataConfig
  optim: OptimConfig
  train: TrainConfig
  distribute: DistributeConfig = dataclasses.field(default_factory=DistributeConfig)
  distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
  probe: ProbeConfig = dataclasses.field(default_factory=ProbeConfig)

  def __post_init__(self):
    mode = self.train.train_mode
    _check(mode != 'pretrain' or self.model.fine_tune_after_block == -1,
           '--fine_tune_after_block freezes layers and only applies to --train_mode=finetune; '
           'leave it at -1 for pretraining.')
    _check(mode != 'distill' or bool(self.distill.teacher_checkpoint),
           '--train_mode=distill needs --teacher_checkpoint (a fine-tuned checkpoint or '
           'exported SavedModel directory).')
    if self.distribute.tpu_requested:  # A TPU found by probing is checked once it is known.
      check_tpu_paths(self)


def check_tpu_paths(config: 'Config') -> None:
  """On a TPU, --model_dir, the data and the weights to load must be on Cloud Storage (gs://).

  Every TPU host runs its own copy of the program: with a local model_dir each host would write
  its checkpoints and summaries to its own disk (and a TPU Node's server cannot reach this
  machine's disk at all), and a local --data_dir, --checkpoint or --teacher_checkpoint would
  have to exist on every host. --allow_local_paths_on_tpu lifts this for a single-host TPU VM,
  where local disk works.
  """
  if config.distribute.allow_local_paths_on_tpu:
    return
  hint = ('On a TPU every host reads and writes these paths: use a Cloud Storage bucket '
          '(gs://BUCKET/...), or pass --allow_local_paths_on_tpu on a single-host TPU VM.')
  _check(config.train.model_dir.startswith('gs://'),
         f'--model_dir={config.train.model_dir!r} is local but the strategy is a TPU. {hint}')
  for flag, path in (('--checkpoint', config.train.checkpoint),
                     ('--teacher_checkpoint', config.distill.teacher_checkpoint)):
    _check(not path or path.startswith('gs://'),
           f'{flag}={path!r} is local but the strategy is a TPU. {hint}')
  dataset = config.data.dataset
  if dataset == BUILTIN_DATASET:  # Generated in memory on every host.
    return
  if dataset.startswith(('folder:', 'images:')):
    _check(dataset.split(':', 1)[1].startswith('gs://'),
           f'--dataset={dataset!r} is a local folder but the strategy is a TPU. {hint}')
    return
  data_dir = config.data.data_dir
  _check(bool(data_dir) and data_dir.startswith('gs://'),
         f'--data_dir={data_dir!r} is local but the strategy is a TPU'
         f'{" (unset: TFDS reads ~/tensorflow_datasets)" if not data_dir else ""}. {hint}')


def check_same_architecture(model: ModelConfig, stored_flags: dict, where: str) -> None:
  """Raises ConfigError if `model` contradicts the architecture flags a run recorded.

  stored_flags: the flags.json of the run in `where` (the model_dir being resumed or read).
  """
  def stored(name):
    return stored_flags.get(name)

  # The head's size only counts when both heads are of one kind; ft_proj_selector picks a layer.
  same_head = model.proj_head_mode == stored('proj_head_mode')
  skipped = {'ft_proj_selector',
             *(() if same_head and model.proj_head_mode == 'nonlinear' else ('num_proj_layers',)),
             *(() if same_head and model.proj_head_mode != 'none' else ('proj_out_dim',))}
  pairs = [(name, getattr(model, name)) for name in ARCHITECTURE_FLAGS if name not in skipped]
  wrong = [f'--{name}={value!r} here but {stored(name)!r} in the run'
           for name, value in pairs
           if stored(name) is not None and not _same(stored(name), value)]
  size = stored('image_size')
  if isinstance(size, int) and small_images(size) != model.cifar_stem:
    wrong.append(f'the {"CIFAR" if model.cifar_stem else "ImageNet"} stem here (--image_size '
                 f'{"<=" if model.cifar_stem else ">"} 32) but the '
                 f'{"CIFAR" if small_images(size) else "ImageNet"} stem in the run '
                 f'(--image_size={size})')
  _check(not wrong, f'--model_dir={where} holds a run of another architecture (its flags.json): '
         + '; '.join(wrong) + '. Use the run\'s architecture flags, or a new --model_dir.')


def same_value(a, b) -> bool:
  """Two flag values are the same (numbers compared as floats: 1 == 1.0)."""
  if isinstance(a, bool) or isinstance(b, bool):
    return a == b
  return _same(a, b)


def _same(a, b) -> bool:
  if isinstance(a, (int, float)) and isinstance(b, (int, float)):
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
  return a == b


@dataclasses.dataclass(frozen=True)
class Steps:
  """Step counts derived from the dataset size; see `resolve_steps`."""
  train_steps: int
  epoch_steps: int
  warmup_steps: int
  checkpoint_steps: int
  steps_per_loop: int
  eval_steps: int


def resolve_steps(train: TrainConfig, optim: OptimConfig, num_train_examples: int,
                  num_eval_examples: int) -> Steps:
  """Turns epochs into steps for one dataset size (the only place this is done).

  Unlike the original, training runs exactly `train_steps` steps: the epochs' steps are
  ceil(examples * epochs / batch), and the cosine schedule ends on that step. As the original,
  warmup is not shortened to fit: a run shorter than its warmup ends still warming up.
  """
  _check(num_train_examples > 0, 'The train split is empty: check --dataset and --train_split.')
  batch = train.train_batch_size
  train_steps = train.train_steps or math.ceil(num_train_examples * train.train_epochs / batch)
  epoch_steps = max(1, int(round(num_train_examples / batch)))
  warmup_steps = int(math.floor(optim.warmup_epochs * num_train_examples / batch))
  checkpoint_steps = train.checkpoint_steps or max(1, train.checkpoint_epochs * epoch_steps)
  steps_per_loop = min(train.steps_per_loop or checkpoint_steps, train_steps)
  eval_steps = train.eval_steps or max(1, math.ceil(num_eval_examples / train.eval_batch_size))
  return Steps(train_steps=train_steps, epoch_steps=epoch_steps, warmup_steps=warmup_steps,
               checkpoint_steps=checkpoint_steps, steps_per_loop=max(1, steps_per_loop),
               eval_steps=eval_steps)
