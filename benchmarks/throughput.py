"""Throughput of the pretraining step and of the input pipeline on this machine.

  python benchmarks/throughput.py                       # every config, default step counts
  python benchmarks/throughput.py --configs=r18_32 --steps=10
  python benchmarks/throughput.py --configs=input_32,input_224

Train configs time the full PretrainTask step (two views through the encoder in one batch,
projection head, NT-Xent, linear-eval head on stop_gradient features, LARS update) inside
`loop.Trainer`'s multi-step tf.function, fed one synthetic in-memory batch repeated, so the input
pipeline is not the bottleneck. Input configs time `pipeline.make_train_dataset` alone on the
built-in shapes10 (two augmented views per example). Each config is warmed up first (tracing, the
shuffle buffer), then timed.

"images/s" counts each view pair as one image (one dataset example, what --train_batch_size
counts); "views/s" counts the augmented views (2 per image), i.e. what the encoder processes.

Prints a table and writes benchmarks/results/throughput.json with the machine's facts (CPU model,
cores, TF version, load average): the numbers are only comparable on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


@dataclasses.dataclass(frozen=True)
class Bench:
  name: str
  kind: str  # 'train' or 'input'
  image_size: int
  batch_size: int
  steps: int  # timed steps (train) or batches (input)
  resnet_depth: int = 18
  use_blur: bool = False
  note: str = ''


BENCHES = (
    Bench('r18_32', 'train', 32, 256, 5, resnet_depth=18, use_blur=False,
          note='CIFAR recipe: CIFAR stem, no blur'),
    Bench('r50_224', 'train', 224, 32, 3, resnet_depth=50, use_blur=True,
          note='ImageNet recipe: ImageNet stem, batched blur'),
    Bench('input_32', 'input', 32, 256, 20,
          note='shapes10 32 px, crop+flip+colour jitter, 2 views'),
    Bench('input_224', 'input', 224, 32, 20,
          note='shapes10 upsampled to 224 px by the random crop-resize, 2 views'),
)


def machine_facts() -> dict:
  import tensorflow as tf
  model = ''
  flags = ''
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name') and not model:
          model = line.split(':', 1)[1].strip()
        elif line.startswith('flags') and not flags:
          flags = line.split(':', 1)[1]
  except OSError:
    pass
  isa = [x for x in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16') if f' {x} ' in f' {flags} ']
  return {
      'date_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'nproc': os.cpu_count(),
      'cpu_model': model,
      'cpu_isa': isa,
      'tensorflow': tf.__version__,
      'python': platform.python_version(),
      'loadavg_at_start': list(os.getloadavg()),
  }


def _train_objects(bench: Bench, model_dir: str):
  """Model, LARS, PretrainTask and Trainer from experiment.assemble_trainer (as training)."""
  import tensorflow as tf
  from tf_simclr import config as cfg
  from tf_simclr.train import experiment

  size, batch = bench.image_size, bench.batch_size
  model_config = cfg.model_config('pretrain', size, lineareval_while_pretraining=True,
                                  resnet_depth=bench.resnet_depth)
  optim = cfg.OptimConfig(optimizer='lars', learning_rate=0.3, warmup_epochs=0,
                          weight_decay=1e-6)
  config = cfg.Config(
      model=model_config,
      data=cfg.DataConfig(dataset='shapes10', image_size=size, use_blur=bench.use_blur),
      optim=optim,
      train=cfg.TrainConfig(model_dir=model_dir, train_batch_size=batch, temperature=0.1))
  strategy = tf.distribute.get_strategy()
  total = 10_000
  steps = cfg.Steps(train_steps=total, epoch_steps=total, warmup_steps=0,
                    checkpoint_steps=total, steps_per_loop=bench.steps, eval_steps=1)
  built = experiment.assemble_trainer(config, strategy, steps, num_classes=10)
  return built.model, built.trainer


def run_train(bench: Bench, steps: int) -> dict:
  """Traces + runs one step, then times `steps` steps in one multi-step tf.function call."""
  import numpy as np
  import tensorflow as tf

  size, batch = bench.image_size, bench.batch_size
  with tempfile.TemporaryDirectory() as model_dir:
    model, trainer = _train_objects(bench, model_dir)
    num_params = int(sum(np.prod(v.shape) for v in model.trainable_variables))
    rng = np.random.RandomState(0)
    images = rng.uniform(size=(batch, size, size, 6)).astype(np.float32)
    labels = np.eye(10, dtype=np.float32)[rng.randint(10, size=batch)]
    iterator = iter(tf.data.Dataset.from_tensors((images, labels)).repeat())
    # Trainer.train() would also checkpoint and log; time its multi-step function alone.
    trainer._build_state()  # The metric sums and the summary-image buffer the step writes.
    train_steps = trainer._build_train_fn()
    t0 = time.perf_counter()
    with trainer.writer.as_default():
      train_steps(iterator, tf.constant(1, tf.int32))
      trainer._accumulator.result()  # Forces completion.
      warmup = time.perf_counter() - t0
      t0 = time.perf_counter()
      train_steps(iterator, tf.constant(steps, tf.int32))
      metrics = trainer._accumulator.result()
      elapsed = time.perf_counter() - t0
  if not np.isfinite(metrics['total_loss']):
    raise RuntimeError(f'{bench.name}: non-finite loss {metrics}')
  return {'seconds_per_step': elapsed / steps, 'warmup_seconds': warmup,
          'trainable_params': num_params}


def run_input(bench: Bench, steps: int) -> dict:
  """Warms the pipeline up (shuffle buffer, tracing), then times `steps` batches."""
  from tf_simclr import config as cfg
  from tf_simclr.data import datasets, pipeline

  data = cfg.DataConfig(dataset='shapes10', train_split='train', eval_split='test',
                        image_size=bench.image_size, color_jitter_strength=0.5, use_blur=False)
  source = datasets.resolve_from_config(data)
  ds = pipeline.make_train_dataset(source, data, bench.batch_size, num_views=2, seed=0)
  it = iter(ds)
  t0 = time.perf_counter()
  # Enough batches to fill the shuffle buffer and let AUTOTUNE settle.
  for _ in range(5):
    next(it)[0].numpy()
  warmup = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    next(it)[0].numpy()
  elapsed = time.perf_counter() - t0
  return {'seconds_per_step': elapsed / steps, 'warmup_seconds': warmup}


def main(argv=None):
  names = [b.name for b in BENCHES]
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--configs', default=','.join(names),
                      help=f'Comma-separated subset of: {", ".join(names)}.')
  parser.add_argument('--steps', type=int, default=0,
                      help='Timed steps (train) or batches (input) per config; 0 = per-config '
                           'defaults (r18_32: 5, r50_224: 3, input: 20).')
  parser.add_argument('--output', default=os.path.join(RESULTS_DIR, 'throughput.json'),
                      help='Where to write the JSON results.')
  args = parser.parse_args(argv)
  chosen = [c.strip() for c in args.configs.split(',') if c.strip()]
  unknown = [c for c in chosen if c not in names]
  if unknown or not chosen:
    parser.error(f'--configs: unknown {unknown or "(empty)"}; choose from {", ".join(names)}.')
  if args.steps < 0:
    parser.error('--steps must be >= 0.')

  facts = machine_facts()
  rows = []
  for bench in (b for b in BENCHES if b.name in chosen):
    steps = args.steps or bench.steps
    print(f'[{bench.name}] warming up, then timing {steps} steps...', flush=True)
    load_before = os.getloadavg()[0]
    out = run_train(bench, steps) if bench.kind == 'train' else run_input(bench, steps)
    images_per_s = bench.batch_size / out['seconds_per_step']
    row = {'config': bench.name, 'kind': bench.kind, 'resnet_depth':
           bench.resnet_depth if bench.kind == 'train' else None,
           'image_size': bench.image_size, 'batch_size': bench.batch_size,
           'use_blur': bench.use_blur, 'timed_steps': steps,
           'images_per_s': images_per_s, 'views_per_s': 2 * images_per_s,
           'loadavg_1min_before': load_before, 'note': bench.note, **out}
    rows.append(row)
    print(f'[{bench.name}] {out["seconds_per_step"]:.3f} s/step, {images_per_s:.1f} images/s',
          flush=True)

  print()
  print('images/s counts one view pair (one example) as one image; views/s = 2 x images/s.')
  header = (f'{"config":<10} {"kind":<6} {"model":<10} {"px":>4} {"batch":>5} {"s/step":>8} '
            f'{"images/s":>9} {"views/s":>9} {"warmup s":>8}')
  print(header)
  print('-' * len(header))
  for r in rows:
    model = f'ResNet-{r["resnet_depth"]}' if r['resnet_depth'] else 'tf.data'
    print(f'{r["config"]:<10} {r["kind"]:<6} {model:<10} {r["image_size"]:>4} '
          f'{r["batch_size"]:>5} {r["seconds_per_step"]:>8.3f} {r["images_per_s"]:>9.1f} '
          f'{r["views_per_s"]:>9.1f} {r["warmup_seconds"]:>8.1f}')
  facts['loadavg_at_end'] = list(os.getloadavg())
  print(f'\n{facts["cpu_model"]}, {facts["nproc"]} cores, TF {facts["tensorflow"]}, '
        f'load average at start {facts["loadavg_at_start"][0]:.2f}, '
        f'at end {facts["loadavg_at_end"][0]:.2f}')
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output, 'w') as f:
    json.dump({'machine': facts, 'units': {
        'images_per_s': 'examples (view pairs) per second',
        'views_per_s': 'augmented views per second (2 per example)'}, 'results': rows},
              f, indent=2)
  print(f'Wrote {args.output}')


if __name__ == '__main__':
  main()
