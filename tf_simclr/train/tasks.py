"""One object per `--train_mode`, owning everything that differs by mode.

Class-level (known before a model exists, read by run/prepare.py, run/modes.py and the readouts):
the model parts it trains, which heads a --checkpoint may lack (`fresh_ok`), the data it needs
(labels, the label subset, a teacher) and whether the representation readouts are on by default.
`TASKS` maps each --train_mode to its class; `task_class(config)` is the one lookup.

Per run (`make_task`): what the step computes, which variables train, the metrics. A task's `train_loss(batch)` runs inside `strategy.run` (replica context) under a GradientTape
and returns the per-replica loss over its local batch plus a dict of scalar metrics (each a mean
over the local batch; the loop averages them over replicas and steps). Nothing here logs or
touches summaries except the augmented-image summary the loop asks for.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import tensorflow as tf

from tf_simclr import losses
from tf_simclr import metrics as metrics_lib
from tf_simclr.config import Config
from tf_simclr.errors import DatasetError
from tf_simclr.data import augment
from tf_simclr.models import simclr
from tf_simclr.models.simclr import SUPERVISED_HEAD
from tf_simclr.optim.decay import weight_decay_variables

log = logging.getLogger(__name__)

Metrics = Dict[str, tf.Tensor]


SUPERVISED_METRICS = ['supervised_loss', 'supervised_acc']


def supervised_metrics(labels, logits, loss) -> Metrics:
  """The supervised head's loss and top-1 on one batch (training and SimCLR.test_step)."""
  correct = tf.equal(tf.argmax(labels, 1), tf.argmax(logits, 1))
  return {'supervised_loss': loss,
          'supervised_acc': tf.reduce_mean(tf.cast(correct, tf.float32))}


class Task:
  """Shared plumbing: the model, weight decay and the loss/metric bookkeeping."""

  name = 'task'
  num_views = 1
  uses_label_mask = False
  # Heads a --checkpoint may lack or hold in another shape (they stay as built).
  fresh_ok: Tuple[str, ...] = ()
  # The kNN monitor and the end-of-run linear probe are on when their flags are unset.
  readouts_by_default = False
  needs_teacher = False
  needs_labels = False  # True: an unlabelled dataset is refused.
  # True: the --train_label_fraction subset is the training set; False: the whole split is read.
  trains_on_label_subset = True
  # Logged when training starts from no --checkpoint at all (None: nothing to say).
  scratch_warning: Optional[str] = None

  @classmethod
  def check_unlabelled(cls, dataset: str) -> None:
    """Raises DatasetError when this mode cannot train on the unlabelled --dataset."""
    if cls.needs_labels:
      raise DatasetError(f'--train_mode={cls.name} needs labels, but --dataset={dataset} is '
                         'unlabelled: use folder:PATH (PATH/<split>/<class>/...) or a TFDS '
                         'dataset.')

  @classmethod
  def unlabelled_config(cls, config: Config, training: bool) -> Config:
    """`config` for an unlabelled dataset (`training`: --mode trains); raises DatasetError for
    settings that need labels."""
    del training
    return config

  def __init__(self, config: Config, model, strategy: tf.distribute.Strategy, teacher=None):
    del teacher  # Only distillation has one.
    self.config = config
    self.model = model
    self.strategy = strategy
    self._decayed = weight_decay_variables(model, config.optim.optimizer)

  @property
  def trainable_variables(self) -> Sequence[tf.Variable]:
    return self.model.trainable_variables

  def train_label_subset(self, label_subset):
    """The label subset the train pipeline gets (ids of labelled examples, or None)."""
    return label_subset

  def image_summary(self, batch) -> tf.Tensor:
    """First view of the local batch, for the augmented-image summary."""
    return batch[0][..., :3]

  def _finish(self, loss, logs: Metrics) -> Tuple[tf.Tensor, Metrics]:
    decay = losses.l2_weight_decay(self._decayed, self.config.optim.weight_decay)
    loss = loss + decay
    logs['weight_decay'] = tf.convert_to_tensor(decay, tf.float32)
    logs['total_loss'] = loss
    return loss, logs

  def train_loss(self, batch) -> Tuple[tf.Tensor, Metrics]:
    raise NotImplementedError

  def metric_names(self) -> List[str]:
    """The keys `train_loss` returns, in logging order."""
    return self._metric_names() + ['weight_decay', 'total_loss']

  def _metric_names(self) -> List[str]:
    raise NotImplementedError


class SupervisedTask(Task):
  """A task trained only through the supervised head (fine-tuning, distillation)."""

  fresh_ok = (SUPERVISED_HEAD,)

  @property
  def trainable_variables(self) -> Sequence[tf.Variable]:
    """All trainable variables but those of projection-head layers past ft_proj_selector,
    which the supervised objective never reaches (they keep their pretrained values)."""
    unused = {id(v) for layer in self.model.projection_head.layers_after_selector()
              for v in layer.trainable_variables}
    return [v for v in self.model.trainable_variables if id(v) not in unused]


class PretrainTask(Task):
  """Contrastive pretraining on two views, with optional linear eval through stop_gradient."""

  name = 'pretrain'
  num_views = 2
  readouts_by_default = True

  @classmethod
  def unlabelled_config(cls, config, training):
    """Trains the contrastive objective alone: no online head, kNN monitor or linear probe."""
    if not training:
      return config
    if config.model.supervised_head or config.probe.knn or config.probe.linear_probe:
      log.info('--dataset=%s is unlabelled: training the contrastive objective alone (no online '
               'supervised head, kNN monitor or linear probe).', config.data.dataset)
    return dataclasses.replace(
        config, model=dataclasses.replace(config.model, supervised_head=False),
        probe=dataclasses.replace(config.probe, knn=False, linear_probe=False))

  def _metric_names(self):
    names = ['contrast_loss', 'contrast_acc', 'contrast_entropy']
    if self.model.supervised_head is not None:
      names += SUPERVISED_METRICS
    return names

  def train_loss(self, batch):
    images, labels = batch[0], batch[1]
    data = self.config.data
    views = augment.blur_train_views(images, self.num_views, data.image_size, data.use_blur)
    outputs = self.model(tf.concat(views, 0), training=True)
    train = self.config.train
    replicas = self.strategy if self.strategy.num_replicas_in_sync > 1 else None
    con_loss, logits_con, labels_con = losses.nt_xent(
        outputs[simclr.PROJ_HEAD_OUTPUT], temperature=train.temperature,
        hidden_norm=train.hidden_norm, strategy=replicas)
    logs = {'contrast_loss': con_loss,
            'contrast_acc': metrics_lib.contrastive_accuracy(logits_con, labels_con),
            'contrast_entropy': metrics_lib.contrastive_entropy(logits_con)}
    loss = con_loss
    if simclr.LOGITS_SUP in outputs:
      sup_labels = tf.concat([labels] * self.num_views, 0)
      sup_loss = losses.supervised_loss(sup_labels, outputs[simclr.LOGITS_SUP])
      logs.update(supervised_metrics(sup_labels, outputs[simclr.LOGITS_SUP], sup_loss))
      loss = loss + sup_loss
    return self._finish(loss, logs)


class FinetuneTask(SupervisedTask):
  """Supervised training of the (partly frozen) encoder and the supervised head."""

  name = 'finetune'
  needs_labels = True
  scratch_warning = ('Fine-tuning without --checkpoint: training from random initialisation '
                     '(the supervised baseline).')

  def _metric_names(self):
    return list(SUPERVISED_METRICS)

  def train_loss(self, batch):
    images, labels = batch[0], batch[1]
    logits = self.model(images, training=True)[simclr.LOGITS_SUP]
    sup_loss = losses.supervised_loss(labels, logits)
    return self._finish(sup_loss, supervised_metrics(labels, logits, sup_loss))


class DistillTask(SupervisedTask):
  """Student learns the teacher's softened predictions (SimCLRv2 Eq. 2, optionally Eq. 3)."""

  name = 'distill'
  needs_teacher = True
  trains_on_label_subset = False  # The subset only marks which examples keep their labels.

  @classmethod
  def unlabelled_config(cls, config, training):
    """Learns from the teacher alone; the labels' flags need labels."""
    if config.distill.label_weight > 0 or config.data.train_label_fraction < 1:
      raise DatasetError(f'--distill_label_weight/--train_label_fraction need labels, but '
                         f'--dataset={config.data.dataset} is unlabelled.')
    return config

  def __init__(self, config: Config, model, strategy,
               teacher: Optional[Callable[[tf.Tensor], tf.Tensor]] = None):
    super().__init__(config, model, strategy)
    if teacher is None:
      raise ValueError('train_mode=distill needs a teacher callable.')
    self.teacher = teacher
    self.uses_label_mask = config.distill.label_weight > 0

  def train_label_subset(self, label_subset):
    """Distillation reads the whole (unlabelled) split; the subset only marks labelled ones."""
    return label_subset if self.uses_label_mask else None

  def _metric_names(self):
    return ['distill_loss', 'teacher_agreement'] + (
        ['labeled_fraction'] if self.uses_label_mask else [])

  def train_loss(self, batch):
    images, labels = batch[0], batch[1]
    teacher_logits = tf.stop_gradient(self.teacher(images))
    logits = self.model(images, training=True)[simclr.LOGITS_SUP]
    distill = self.config.distill
    distill_loss = losses.distillation_loss(teacher_logits, logits, distill.temperature,
                                            distill.loss_scale)
    logs = {'distill_loss': distill_loss,
            'teacher_agreement': tf.reduce_mean(tf.cast(tf.equal(
                tf.argmax(teacher_logits, 1), tf.argmax(logits, 1)), tf.float32))}
    loss = distill_loss
    if self.uses_label_mask:
      mask = batch[2]
      loss = losses.mixed_distillation_loss(teacher_logits, logits, labels, mask,
                                            distill.temperature, distill.label_weight,
                                            distill.loss_scale)
      logs['labeled_fraction'] = tf.reduce_mean(mask)
    return self._finish(loss, logs)


TASKS = {cls.name: cls for cls in (PretrainTask, FinetuneTask, DistillTask)}


def task_class(config: Config) -> type:
  """The Task class of `config.train.train_mode` (the one place a mode is looked up)."""
  return TASKS[config.train.train_mode]


def make_task(config: Config, model, strategy, teacher=None, cls: Optional[type] = None) -> Task:
  """The task object for `config.train.train_mode` (`cls`: its class, when already looked up)."""
  return (cls or task_class(config))(config, model, strategy, teacher=teacher)
