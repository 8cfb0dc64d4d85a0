"""tf-simclr command line: SimCLR v1/v2 pretraining, fine-tuning, distillation and export.

  tf-simclr --flagfile=flags/quickstart.cfg      (installed command)
  python -m tf_simclr ...    python run.py ...    (the same program)

The one part of tf_simclr that reads absl flags (defined by topic in `definitions.py`): it turns
them into a frozen `tf_simclr.config.Config` and calls `tf_simclr.run.modes.run`. The rest of the
library never reads flags, so a notebook uses it without absl.
"""

import json
import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging

from tf_simclr import config as cfg
from tf_simclr.cli import definitions  # noqa: F401  (defines the flags)
from tf_simclr.cli import quiet
from tf_simclr.cli import usage

FLAGS = flags.FLAGS
# Exit status after a SIGTERM that saved a checkpoint (2: a user error, 1: a crash).
EXIT_PREEMPTED = 3
# Exit status after SIGINT (Ctrl-C), as a shell reports a process killed by it (128 + 2).
EXIT_INTERRUPTED = 130



def config_from_flags(flag_values) -> cfg.Config:
  """Turns parsed flags into a frozen, validated Config (the only FLAGS reader)."""
  from tf_simclr import teacher as teacher_lib  # Imported late so --help stays fast.
  f = flag_values
  model = cfg.model_config(
      f.train_mode, f.image_size, lineareval_while_pretraining=f.lineareval_while_pretraining,
      fine_tune_after_block=f.fine_tune_after_block, frozen_batch_norm=f.frozen_batch_norm,
      resnet_depth=f.resnet_depth, width_multiplier=f.width_multiplier,
      sk_ratio=f.sk_ratio, se_ratio=f.se_ratio,
      batch_norm_decay=f.batch_norm_decay, global_bn=f.global_bn,
      proj_head_mode=f.proj_head_mode, proj_out_dim=f.proj_out_dim,
      num_proj_layers=f.num_proj_layers, ft_proj_selector=f.ft_proj_selector,
      precision=f.precision)
  data = cfg.DataConfig(
      dataset=f.dataset, data_dir=f.data_dir, train_split=f.train_split,
      eval_split=f.eval_split, image_size=f.image_size,
      color_jitter_strength=f.color_jitter_strength, color_jitter_impl=f.color_jitter_impl,
      use_blur=f.use_blur, cache_dataset=f.cache_dataset,
      train_label_fraction=f.train_label_fraction, label_fraction_seed=f.label_fraction_seed,
      skip_bad_images=f.skip_bad_images, skip_empty_classes=f.skip_empty_classes)
  optim = cfg.OptimConfig(
      optimizer=f.optimizer, learning_rate=f.learning_rate,
      learning_rate_scaling=f.learning_rate_scaling, warmup_epochs=f.warmup_epochs,
      weight_decay=f.weight_decay, momentum=f.momentum)
  train = cfg.TrainConfig(
      model_dir=f.model_dir or '', train_mode=f.train_mode, mode=f.mode,
      train_batch_size=f.train_batch_size, train_epochs=f.train_epochs,
      train_steps=f.train_steps, eval_steps=f.eval_steps, eval_batch_size=f.eval_batch_size,
      checkpoint_epochs=f.checkpoint_epochs, checkpoint_steps=f.checkpoint_steps,
      steps_per_loop=f.steps_per_loop, checkpoint=f.checkpoint,
      keep_checkpoint_max=f.keep_checkpoint_max, keep_hub_module_max=f.keep_hub_module_max,
      temperature=f.temperature, hidden_norm=f.hidden_norm,
      zero_init_logits_layer=f.zero_init_logits_layer,
      logits_layer_init=f.logits_layer_init, eval_name=f.eval_name, seed=f.seed,
      eval_timeout=f.eval_timeout, jit_compile=f.jit_compile, embed_split=f.embed_split,
      embed_endpoint=f.embed_endpoint, query=f.query, num_neighbors=f.num_neighbors,
      duplicate_threshold=f.threshold, num_preview_images=f.num_preview_images,
      num_preview_pairs=f.num_preview_pairs, allow_flag_changes=f.allow_flag_changes,
      lock_lease_s=f.lock_lease_s)
  strategy = 'tpu' if f.use_tpu is True else f.distribution_strategy
  distribute = cfg.DistributeConfig(
      strategy=strategy, tpu_name=f.tpu_name, tpu_zone=f.tpu_zone, gcp_project=f.gcp_project,
      master=f.master, allow_tpu=f.use_tpu is not False,
      allow_local_paths_on_tpu=f.allow_local_paths_on_tpu, cpu_devices=f.cpu_devices)
  overrides = {name: getattr(f, f'teacher_{name}') for name in cfg.ARCHITECTURE_FLAGS
               if getattr(f, f'teacher_{name}') is not None}
  if f.teacher_precision is not None:
    overrides['precision'] = f.teacher_precision
  distill = cfg.distill_config(
      f.train_mode,
      lambda: teacher_lib.teacher_model_config(model, f.teacher_checkpoint, overrides),
      teacher_checkpoint=f.teacher_checkpoint, temperature=f.distill_temperature,
      loss_scale=f.distill_loss_scale,
      label_weight=f.distill_label_weight)
  probe = cfg.ProbeConfig(
      knn=f.knn_monitor, knn_k=f.knn_k, knn_temperature=f.knn_temperature,
      knn_every_epochs=f.knn_every_epochs, knn_max_bank_size=f.knn_max_bank_size,
      linear_probe=f.linear_probe, random_init_baseline=f.random_init_baseline,
      seed=f.seed or 0)
  return cfg.Config(model=model, data=data, optim=optim, train=train, distribute=distribute,
                    distill=distill, probe=probe)


def fill_flags_from_record(flag_values) -> None:
  """--mode=eval|export|probe|embed: flags not given explicitly come from the run's record
  (model_dir's flags.json, else --checkpoint's; see config_record.read_record)."""
  from tf_simclr import config_record
  f = flag_values
  if f.mode not in cfg.READING_MODES:
    return
  record, where = config_record.read_record(f.model_dir, f.checkpoint)
  if record is None:
    return
  names = config_record.RECORD_MUST_AGREE + config_record.RECORD_FILLS + (
      config_record.RECORD_FILLS_PREVIEW if f.mode == 'preview_augment' else ())
  given = {name for name in names if f[name].present}
  values = config_record.fill_from_record(record, {name: f[name].value for name in names}, given,
                                          where, names)
  filled = sorted(name for name in names if name not in given and values[name] != f[name].value)
  for name in filled:
    f[name].value = values[name]
  if filled:
    logging.info('Read from %s: %s.', where,
                 ', '.join(f'--{name}={values[name]}' for name in filled))


def serializable_flags(flag_values) -> dict:
  """The flags as a JSON-serialisable dict (flags.json), as the original writes it."""
  out = {}
  for key, val in flag_values.flag_values_dict().items():
    try:
      json.dumps(val)
    except TypeError:
      continue
    out[key] = val
  return out


def _ignore_signals() -> None:
  import signal
  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, signal.SIG_IGN)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]} (flags take the form --name=value).')
  quiet.start_tensorflow()  # First: TensorFlow's start-up, without CUDA's lines on a CPU machine.
  quiet.install_log_filter()
  from tf_simclr.errors import UserError
  for ignored in ('train_summary_steps', 'variable_schema'):
    if FLAGS[ignored].present:
      logging.warning('--%s is accepted for compatibility with original command lines and has '
                      'no effect.', ignored)
  try:
    fill_flags_from_record(FLAGS)
    config = config_from_flags(FLAGS)
  except UserError as e:
    logging.error('%s', e)
    sys.exit(2)
  from tf_simclr import cpu_kernels
  from tf_simclr.run import modes
  logging.info('TensorFlow CPU kernels: %s (%s=%s; see docs/performance.md).',
               'oneDNN' if cpu_kernels.onednn_enabled() else 'Eigen', cpu_kernels.ENV,
               os.environ.get(cpu_kernels.ENV, 'unset'))
  try:
    modes.run(config, serializable_flags(FLAGS))
  except (modes.PREEMPTED, modes.INTERRUPTED) as e:
    _ignore_signals()  # Saved: a further Ctrl-C/SIGTERM while the process exits changes nothing.
    logging.error('%s', e)
    sys.exit(EXIT_PREEMPTED if isinstance(e, modes.PREEMPTED) else EXIT_INTERRUPTED)
  except KeyboardInterrupt:
    _ignore_signals()
    logging.error('Interrupted (SIGINT) outside the training loop: this interruption saved '
                  'nothing; rerun the same command (training resumes from the newest '
                  'checkpoint in --model_dir, if any).')
    sys.exit(EXIT_INTERRUPTED)
  except modes.USER_ERRORS as e:
    logging.error('%s', e)
    sys.exit(2)
  except modes.WORKER_LOST as e:
    _ignore_signals()
    logging.error('%s', e)
    sys.exit(1)


def run() -> None:
  """The command: `python run.py` and the installed `tf-simclr` entry point."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  # Before TensorFlow loads: oneDNN kernels on x86-64 unless TF_ENABLE_ONEDNN_OPTS is set.
  from tf_simclr import cpu_kernels
  cpu_kernels.default_onednn_on()
  std_logging.getLogger('tensorflow').setLevel(std_logging.ERROR)
  app.run(main, flags_parser=usage.parse_flags)


if __name__ == '__main__':
  run()
