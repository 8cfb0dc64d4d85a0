"""`tf_simclr.SimCLR`: the command line's model and training step as a Keras model.

One step, two front doors: `train_step` calls `train.loop.replica_update`, the function the
command line's Trainer calls for every step, with the same Task (`train/tasks.py`: NT-Xent across
replicas, the online head on stop_gradient features, the weight-decay rule, global BN, the loss
divided by the replicas). Arguments map onto the frozen config dataclasses (`config.py`), so the
command line's validation and derived settings (the CIFAR stem at <= 32 px, the supervised head of
each train_mode) apply unchanged.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

import keras
import tensorflow as tf

from tf_simclr import config as cfg
from tf_simclr import losses
from tf_simclr import precision as precision_lib
from tf_simclr import recipes
from tf_simclr.data import views
from tf_simclr.models import simclr as simclr_lib
from tf_simclr.optim import decay, lars
from tf_simclr.train import loop, tasks

LOSS = 'loss'  # the total loss under the name Keras callbacks monitor by default
_PYTHON_RUN = '<python>'  # TrainConfig.model_dir / DataConfig.dataset: unused by the step


@keras.saving.register_keras_serializable(package='tf_simclr')
class SimCLR(keras.Model):
  """SimCLR v1/v2 as a `keras.Model` whose `fit()` runs the command line's training step.

  Build it from the command line's flags as arguments (the same defaults), or from a recipe with
  `SimCLR.from_recipe('quickstart', **overrides)`; then `compile(optimizer=...)` (any Keras
  optimizer, or `tf_simclr.LARS`, which gets the command line's exclusions: batch norm, biases
  and the supervised head) and `fit(dataset)`. Under `strategy.scope()` it trains on every
  replica as the command line does. Calling the model returns the endpoint dict
  (`final_avg_pool`, `proj_head_output`, `logits_sup`, ...).

  Args:
    train_mode: 'pretrain' (contrastive, two views) or 'finetune' (supervised, one view).
    num_classes: classes of the supervised head. Pretraining: None trains no online head (for
      unlabelled data); a number adds the linear head on stop_gradient(features)
      (lineareval_while_pretraining). Fine-tuning needs it.
    image_size: training crop size; <= 32 selects the CIFAR stem (3x3 conv, no max pool).
    resnet_depth, width_multiplier, sk_ratio, se_ratio, batch_norm_decay, global_bn: the ResNet
      encoder (global_bn: batch statistics over all replicas).
    proj_head_mode ('none', 'linear', 'nonlinear'), proj_out_dim, num_proj_layers,
      ft_proj_selector: the projection head, and which of its layers feeds the supervised head.
    lineareval_while_pretraining: pretraining with num_classes trains the online head.
    fine_tune_after_block: fine-tuning freezes the stem and block groups 1..k (-1: none).
    temperature, hidden_norm: NT-Xent.
    weight_decay: L2 added to the loss as the command line does (with LARS: the supervised head's
      kernels; with other optimizers: every trainable variable but batch norm). LARS applies its
      own `weight_decay` to the rest.
    color_jitter_strength, color_jitter_impl: augmentation of the pretraining views made by
      `fit` (`tf_simclr.data.training_views`); use_blur: the per-batch Gaussian blur of the step.
    precision: 'float32', 'mixed_bfloat16' or 'mixed_float16' (dynamic loss scaling).
  """

  def __init__(self, train_mode: str = 'pretrain', num_classes: Optional[int] = None,
               image_size: int = 224, resnet_depth: int = 50, width_multiplier: float = 1,
               sk_ratio: float = 0.0, se_ratio: float = 0.0, batch_norm_decay: float = 0.9,
               global_bn: bool = True, proj_head_mode: str = 'nonlinear',
               proj_out_dim: int = 128, num_proj_layers: int = 3, ft_proj_selector: int = 0,
               lineareval_while_pretraining: bool = True, fine_tune_after_block: int = -1,
               temperature: float = 0.1, hidden_norm: bool = True, weight_decay: float = 1e-6,
               color_jitter_strength: float = 1.0, color_jitter_impl: str = 'simclrv2',
               use_blur: bool = True, precision: str = 'float32', name: str = 'simclr',
               **kwargs):
    super().__init__(name=name, **kwargs)
    self.arguments = {k: v for k, v in locals().items()
                      if k in inspect.signature(SimCLR.__init__).parameters
                      and k not in ('self', 'name', 'kwargs')}
    if train_mode == 'distill':
      raise cfg.ConfigError('train_mode=distill is not available from Python yet: use the '
                            'command line (--train_mode=distill).')
    self.config = build_config(**self.arguments)
    self.num_classes = num_classes
    self.image_size = image_size
    self.task_class = tasks.task_class(self.config)
    self.network = simclr_lib.build_model(self.config.model, num_classes or 0)
    self.network.build_for_size(image_size)
    self.built = True  # Every variable exists (Keras 3 cannot defer; see DESIGN.md).
    self.task = None
    self._loss_scaling = False
    self._metrics_by_name = {}
    self._train_names = self._test_names = ()

  @classmethod
  def from_recipe(cls, recipe: str, **overrides) -> 'SimCLR':
    """The model of a command-line recipe (`flags/<recipe>.cfg`, `tf_simclr.recipes.names()`):
    its architecture, task and augmentation flags, then `overrides` (e.g. num_classes=10)."""
    return cls(**{**cls.recipe_arguments(recipe), **overrides})

  @classmethod
  def recipe_arguments(cls, recipe: str) -> dict:
    """The recipe's flags that are SimCLR arguments (architecture, task, augmentation); the rest
    (dataset, optimizer, batch size, epochs, ...) are in `tf_simclr.recipes.flags(recipe)`."""
    accepted = set(inspect.signature(cls.__init__).parameters) - {'self', 'name', 'kwargs'}
    return {k: v for k, v in recipes.flags(recipe).items() if k in accepted}

  def get_config(self):
    """The constructor arguments (plain values): `from_config` rebuilds the same model."""
    return {'name': self.name, 'trainable': self.trainable, **self.arguments}

  def build(self, input_shape=None):
    """Nothing to do: the constructor builds every variable for images of any size."""
    del input_shape
    self.built = True

  def build_from_config(self, config):
    """Loading: already built by the constructor."""
    del config
    self.built = True

  def call(self, images, training=False):
    """images (N, H, W, 3) float32 in [0, 1] -> {endpoint name: tensor} (models/simclr.py)."""
    return self.network(images, training=training)

  @property
  def encoder(self):
    """The ResNet encoder: images -> the 2048 x width representation (`final_avg_pool`)."""
    return self.network.encoder

  # -------------------------------------------------------------------------------------------
  # Training.

  def compile(self, optimizer='lars', jit_compile=False, **kwargs):
    """Keras `compile` with the command line's step (no `loss`: the task owns it).

    optimizer: a Keras optimizer, a name, or 'lars' (`tf_simclr.LARS(0.3 * batch / 256)` is the
    command line's; 'lars' here means LARS(learning_rate=1.0): give your own schedule). A
    `tf_simclr.LARS` made without exclusions gets the command line's (batch norm, biases, the
    supervised head). jit_compile: False by default (XLA is slower on CPUs; see the README).
    """
    if kwargs.get('loss') is not None:
      raise ValueError('SimCLR.compile takes no loss: the train_mode\'s task owns it.')
    kwargs.pop('loss', None)
    if isinstance(optimizer, str) and optimizer.lower() == 'lars':
      optimizer = lars.LARS(1.0)
    optimizer = keras.optimizers.get(optimizer)
    inner = precision_lib.inner_optimizer(optimizer)
    if isinstance(inner, lars.LARS) and not inner.exclusions_given:
      inner.set_exclusions(decay.lars_exclusions(self.network))
    optimizer = precision_lib.wrap_optimizer(optimizer, self.config.model.precision)
    super().compile(optimizer=optimizer, jit_compile=jit_compile, **kwargs)
    name = 'lars' if isinstance(inner, lars.LARS) else 'momentum'  # the weight-decay rule
    self.config = dataclasses.replace(
        self.config, optim=dataclasses.replace(self.config.optim, optimizer=name))
    strategy = self.distribute_strategy
    self._loss_scaling = precision_lib.loss_scale(self.optimizer) is not None
    with strategy.scope():
      # Keras 3 cannot build an optimizer inside a traced replica step.
      self.optimizer.build(self.network.trainable_variables)
      self.task = tasks.make_task(self.config, self.network, strategy)
      names = [LOSS] + self.task.metric_names() + ([loop.SKIPPED] if self._loss_scaling else [])
      # One running mean per name, reset by Keras per epoch and per evaluate(); test_step
      # updates the supervised ones (the task's names hold them whenever there is a head).
      self._metrics_by_name = {n: keras.metrics.Mean(name=n) for n in names}
    self._train_names = tuple(names)
    self._test_names = (LOSS,) + tuple(tasks.SUPERVISED_METRICS)

  def get_compile_config(self):
    """What `compile` was given (the optimizer serialised), for `.keras` files."""
    return super().get_compile_config()

  def compile_from_config(self, config):
    """Loading a `.keras` file: `compile` again with the saved optimizer (its state follows)."""
    config = keras.saving.deserialize_keras_object(config)
    for key in ('loss', 'loss_weights', 'metrics', 'weighted_metrics'):
      config.pop(key, None)
    self.compile(**config)

  @property
  def metrics(self):
    """The running means of the step's metrics (Keras resets them each epoch)."""
    return list(self._metrics_by_name.values())

  def _update_metrics(self, logs, names):
    for name in names:
      self._metrics_by_name[name].update_state(logs[name])
    return {name: self._metrics_by_name[name].result() for name in names}

  def _check_compiled(self):
    if self.task is None:
      raise RuntimeError('Call model.compile(optimizer=...) before training.')

  def _batch(self, data, views_expected: int):
    """(images, one-hot labels) of a Keras data element; labels are zeros when there are none."""
    images, labels = views.image_and_label(data)
    if images.shape[-1] != 3 * views_expected:
      raise ValueError(
          f'{self.config.train.train_mode} batches need {3 * views_expected} channels '
          f'({views_expected} view(s) of 3 on the channel axis); got {images.shape[-1]}. Let '
          'fit() make them (augment=True) or use tf_simclr.data.training_views.')
    if self.network.supervised_head is None:
      labels = tf.zeros([tf.shape(images)[0], 1])  # Unused without the head.
    elif labels is None:
      raise ValueError('This model has a supervised head (num_classes) but the data has no '
                       'labels: give (images, labels) or build it with num_classes=None.')
    elif labels.shape.rank == 1:
      labels = tf.one_hot(tf.cast(labels, tf.int32), self.num_classes)
    return images, tf.cast(labels, tf.float32)

  def train_step(self, data):
    """One step of the task on this replica's batch: `loop.replica_update`, as the command line."""
    self._check_compiled()
    batch = self._batch(data, self.task.num_views)
    logs = loop.replica_update(self.task, self.optimizer, batch, self._loss_scaling)
    logs[LOSS] = logs['total_loss']
    return self._update_metrics(logs, self._train_names)

  def make_train_function(self, force=False):
    """The train function: `steps_per_execution` steps in one while-loop, as the command line's
    Trainer runs `steps_per_loop`, the step outside any tf.cond (under MirroredStrategy Keras'
    own multi-step loop puts it in a cond branch, where the optimizer's cross-replica update
    fails: "You must feed a value for placeholder tensor ..."). After each execution, as the
    Trainer after each loop, unsynchronized BN statistics (global_bn=False) are averaged over
    the replicas."""
    if self.train_function is not None and not force:
      return self.train_function
    steps = self.steps_per_execution
    if self.run_eagerly:
      return super().make_train_function(force)
    strategy = self.distribute_strategy
    average_bn = loop.bn_statistics_averager(self.network, strategy)

    def one_step(data):
      self.train_step(data)

    @tf.function
    def multi_step(iterator):
      def body(i, optional):
        strategy.run(one_step, args=(optional.get_value(),))
        following = tf.cond(i + 1 < steps, iterator.get_next_as_optional, lambda: optional)
        return i + 1, following
      ran, _ = tf.while_loop(lambda i, optional: tf.logical_and(i < steps, optional.has_value()),
                             body, [tf.constant(0), iterator.get_next_as_optional()])
      return ran, {name: m.result() for name, m in self._metrics_by_name.items()
                   if name in self._train_names}

    def function(iterator):
      ran, logs = multi_step(iterator)
      if int(ran) == 0:
        raise StopIteration
      if average_bn is not None:
        average_bn()
      return logs

    self.train_function = function
    return function

  def test_step(self, data):
    """Supervised loss and top-1 of the supervised head on eval-preprocessed images."""
    self._check_compiled()
    if self.network.supervised_head is None:
      raise ValueError('evaluate()/validation_data need a supervised head (num_classes).')
    images, labels = self._batch(data, 1)
    logits = self(images, training=False)[simclr_lib.LOGITS_SUP]
    loss = losses.supervised_loss(labels, logits)
    logs = tasks.supervised_metrics(labels, logits, loss)
    logs = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.MEAN, logs)
    logs[LOSS] = logs['supervised_loss']
    return self._update_metrics(logs, self._test_names)

  def _replica_batches(self, dataset):
    """Checks that every batch splits evenly over the replicas (NT-Xent gathers equal shapes
    from every replica); a map, so the dataset keeps its known length."""
    replicas = self.distribute_strategy.num_replicas_in_sync
    if replicas == 1:
      return dataset

    def check(*element):
      images = views.image_and_label(element if len(element) > 1 else element[0])[0]
      tf.debugging.assert_equal(
          tf.shape(images)[0] % replicas, 0, message=(
              f'A batch does not split evenly over the {replicas} replicas: batch with '
              'drop_remainder=True, or pass batch_size to fit() to batch again.'))
      return element if len(element) > 1 else element[0]
    return dataset.map(check)

  def training_data(self, dataset, batch_size=None, value_range='auto'):
    """`dataset` as this model trains on it (`tf_simclr.data.training_views` with its settings)."""
    return views.training_views(
        dataset, self.image_size, num_views=self.task_class.num_views,
        color_jitter_strength=self.config.data.color_jitter_strength,
        color_jitter_impl=self.config.data.color_jitter_impl, num_classes=self.num_classes,
        batch_size=batch_size, value_range=value_range)

  def eval_data(self, dataset, batch_size=None, value_range='auto'):
    """`dataset` with the evaluation preprocessing (`tf_simclr.data.eval_images`)."""
    return views.eval_images(dataset, self.image_size, num_classes=self.num_classes,
                             batch_size=batch_size, value_range=value_range)

  def fit(self, x=None, y=None, batch_size=None, *, augment=True, value_range='auto', **kwargs):
    """Keras `fit` on a tf.data.Dataset (images, (images, labels) or TFDS dicts).

    augment=True makes the training views here (`training_data`) and preprocesses
    `validation_data` for evaluation; `batch_size` then batches unbatched data (a TFDS split).
    augment=False: `x` already yields the command line's batches (views on the channel axis).
    """
    if y is not None or not isinstance(x, tf.data.Dataset):
      raise ValueError('SimCLR.fit takes a tf.data.Dataset (x), labels inside it.')
    if augment:
      x = self.training_data(x, batch_size, value_range)
      if kwargs.get('validation_data') is not None:
        kwargs['validation_data'] = self.eval_data(kwargs['validation_data'], batch_size,
                                                   value_range)
    elif batch_size is not None:
      raise ValueError('batch_size batches the data that fit augments: with augment=False, batch '
                       'the dataset yourself.')
    kwargs.setdefault('shuffle', False)  # Keras cannot shuffle a dataset: shuffle it yourself.
    return super().fit(self._replica_batches(x), **kwargs)

  def evaluate(self, x=None, y=None, batch_size=None, *, augment=True, value_range='auto',
               **kwargs):
    """Keras `evaluate` of the supervised head; augment=True applies the eval preprocessing."""
    if augment and isinstance(x, tf.data.Dataset):
      x = self.eval_data(x, batch_size, value_range)
    return super().evaluate(x, y, **kwargs)

  # -------------------------------------------------------------------------------------------
  # Weights in the command line's formats.

  def export_hub(self, path: str) -> str:
    """Writes the fine-tunable hub SavedModel of `--mode=export` (tf_simclr/export.py) to `path`;
    `tf_simclr.export.load(path)` reads it back."""
    from tf_simclr import export  # pylint: disable=g-import-not-at-top
    return export.save(self.network, path)

  def load_checkpoint(self, path: str):
    """Loads weights the command line wrote (a model_dir, a ckpt-N prefix, an export, or
    google-research/simclr's), strictly: a missing or mis-shaped variable is an error; heads
    this train_mode may lack (the supervised head when fine-tuning) stay as built."""
    from tf_simclr import weights  # pylint: disable=g-import-not-at-top
    return weights.match.load(self.network, path, fresh_ok=self.task_class.fresh_ok)

  def save_checkpoint(self, model_dir: str) -> str:
    """Writes a command-line checkpoint (`model_dir/ckpt-<step>`, model + optimizer + step) that
    `--checkpoint=model_dir` (e.g. fine-tuning) and `load_checkpoint` read. Needs `compile`."""
    from tf_simclr.weights import state  # pylint: disable=g-import-not-at-top
    self._check_compiled()
    return state.TrainState(self.network, self.optimizer, model_dir, max_to_keep=5).save()


def build_config(train_mode='pretrain', num_classes=None, image_size=224,
                 lineareval_while_pretraining=True, fine_tune_after_block=-1, temperature=0.1,
                 hidden_norm=True, weight_decay=1e-6, color_jitter_strength=1.0,
                 color_jitter_impl='simclrv2', use_blur=True, **architecture) -> cfg.Config:
  """The validated `config.Config` of SimCLR's arguments, as the command line builds it from the
  flags of the same names (`cli.config_from_flags`)."""
  if train_mode == 'finetune' and not num_classes:
    raise cfg.ConfigError('train_mode=finetune needs num_classes (the supervised head).')
  model = cfg.model_config(
      train_mode, image_size,
      lineareval_while_pretraining=bool(lineareval_while_pretraining and num_classes),
      fine_tune_after_block=fine_tune_after_block, **architecture)
  data = cfg.DataConfig(dataset=_PYTHON_RUN, image_size=image_size,
                        color_jitter_strength=color_jitter_strength,
                        color_jitter_impl=color_jitter_impl, use_blur=use_blur)
  optim = cfg.OptimConfig(weight_decay=weight_decay)
  train = cfg.TrainConfig(model_dir=_PYTHON_RUN, train_mode=train_mode, temperature=temperature,
                          hidden_norm=hidden_norm)
  return cfg.Config(model=model, data=data, optim=optim, train=train)
