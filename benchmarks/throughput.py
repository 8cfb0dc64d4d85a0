"""Throughput of the pretraining step and of the input pipeline on this machine.

  python benchmarks/throughput.py                       # every config, default step counts
  python benchmarks/throughput.py --configs=r18_32 --steps=10
  python benchmarks/throughput.py --configs=input_32,input_224
  python benchmarks/throughput.py --configs=r50_224 --precisions=float32 --xla=off --profile

Train configs time the full PretrainTask step (two views through the encoder in one batch,
projection head, NT-Xent, linear-eval head on stop_gradient features, LARS update) inside
`loop.Trainer`'s multi-step tf.function, fed one synthetic in-memory batch repeated, so the input
pipeline is not the bottleneck. Input configs time `pipeline.make_train_dataset` alone on the
built-in shapes10 (two augmented views per example). Each config is warmed up first (tracing, the
shuffle buffer), then timed.

Train configs run in arms (--precisions x --xla, timed interleaved in rounds); --profile reads the
share of the step spent waiting for tf.data and in the batched blur from a TF profiler trace, and
prints each precision's op-type breakdown (op_breakdown.py: casts, layout changes, batch norm,
conv/matmul, LARS, NT-Xent; graph op counts and profiled time shares); --onednn picks
TensorFlow's CPU kernels for the whole process (default: as run.py).

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
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))  # op_breakdown

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
# Timed arms stay referenced until exit: freeing them (models, iterators) mid-run once hung the
# process in a destructor (futex wait) right after the last timing.
_KEEP_ALIVE = []


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
  from tf_simclr import cpu_kernels
  model = ''
  try:
    with open('/proc/cpuinfo') as f:
      model = next((line.split(':', 1)[1].strip() for line in f
                    if line.startswith('model name')), '')
  except OSError:
    pass
  flags = cpu_kernels.cpu_flags() or frozenset()
  isa = [x for x in ('avx2', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'amx_bf16') if x in flags]
  onednn = cpu_kernels.onednn_enabled()
  return {
      'date_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'nproc': os.cpu_count(),
      'cpu_model': model,
      'cpu_isa': isa,
      'onednn': onednn,
      'TF_ENABLE_ONEDNN_OPTS': os.environ.get('TF_ENABLE_ONEDNN_OPTS'),
      'tensorflow': tf.__version__,
      'python': platform.python_version(),
      'loadavg_at_start': list(os.getloadavg()),
  }


def _train_objects(bench: Bench, model_dir: str, precision: str = 'float32',
                   jit_compile: bool = False, batch_size: int = 0):
  """Model, LARS, PretrainTask and Trainer from train.assemble.assemble_trainer (as training)."""
  import tensorflow as tf
  from tf_simclr import config as cfg
  from tf_simclr.train import assemble

  size, batch = bench.image_size, batch_size or bench.batch_size
  model_config = cfg.model_config('pretrain', size, lineareval_while_pretraining=True,
                                  resnet_depth=bench.resnet_depth, precision=precision)
  optim = cfg.OptimConfig(optimizer='lars', learning_rate=0.3, warmup_epochs=0,
                          weight_decay=1e-6)
  config = cfg.Config(
      model=model_config,
      data=cfg.DataConfig(dataset='shapes10', eval_split='test', image_size=size,
                          use_blur=bench.use_blur,
                          color_jitter_strength=0.5),
      optim=optim,
      train=cfg.TrainConfig(model_dir=model_dir, train_batch_size=batch, temperature=0.1,
                            jit_compile=jit_compile))
  strategy = tf.distribute.get_strategy()
  total = 10_000
  steps = cfg.Steps(train_steps=total, epoch_steps=total, warmup_steps=0,
                    checkpoint_steps=total, steps_per_loop=bench.steps, eval_steps=1)
  built = assemble.assemble_trainer(config, strategy, steps, num_classes=10)
  return built.model, built.trainer, config


def forward_gflops(model, image_size: int) -> float:
  """GFLOPs of one inference forward pass of one image (TF profiler's float-op count)."""
  import tensorflow as tf
  from tensorflow.python.profiler import model_analyzer, option_builder
  fn = tf.function(lambda x: model(x, training=False))
  graph = fn.get_concrete_function(
      tf.TensorSpec([1, image_size, image_size, 3], tf.float32)).graph
  opts = option_builder.ProfileOptionBuilder.float_operation()
  opts['output'] = 'none'
  return model_analyzer.profile(graph, options=opts).total_float_ops / 1e9


def matmul_peaks(n: int = 2048, reps: int = 10, rounds: int = 5) -> dict:
  """Achieved GFLOP/s of an n x n x n matmul in float32 and in bfloat16: best of `rounds`,
  the two dtypes timed alternately so that load from other processes hits both alike."""
  import tensorflow as tf
  runs = {}
  for dtype in (tf.float32, tf.bfloat16):
    a = tf.cast(tf.random.uniform((n, n)), dtype)
    b = tf.cast(tf.random.uniform((n, n)), dtype)

    def body(a, b, dtype=dtype):
      acc = tf.zeros((), tf.float32)
      for _ in tf.range(reps):
        acc += tf.cast(tf.reduce_sum(tf.matmul(a, b)[:1, :1]), tf.float32)
        a = a + tf.cast(acc * 0, dtype)  # a dependence, so no result is reused
      return acc

    run = tf.function(body)
    run(a, b).numpy()
    runs[dtype.name] = (run, a, b)
  best = {name: float('inf') for name in runs}
  for _ in range(rounds):
    for name, (run, a, b) in runs.items():
      t0 = time.perf_counter()
      run(a, b).numpy()
      best[name] = min(best[name], time.perf_counter() - t0)
  return {name: 2.0 * n ** 3 * reps / t / 1e9 for name, t in best.items()}


def blur_seconds(image_size: int, batch_size: int, reps: int = 3) -> float:
  """Seconds of the train step's batched blur (both views of one batch), best of `reps`."""
  import tensorflow as tf
  from tf_simclr.data import augment
  views = tf.random.uniform((batch_size, image_size, image_size, 3))
  fn = tf.function(lambda v: [augment.batch_random_blur(x, image_size, image_size, 1.0)
                              for x in (v, v)])
  fn(views)
  best = float('inf')
  for _ in range(reps):
    t0 = time.perf_counter()
    [x.numpy() for x in fn(views)]
    best = min(best, time.perf_counter() - t0)
  return best


def profile_input_share(arm, steps: int, logdir: str) -> dict:
  """Profiles `steps` steps of `arm` with the TF profiler and reads its trace (XSpace).

  Reports per step and as a share of the step's wall time: the time the step's IteratorGetNext
  waited for tf.data (the trace's `IteratorGetNextOp::DoCompute` events), the summed time of the
  batched blur's ops (name scope batch_random_blur; TF ops are traced as "name:Type"), and the
  CPU time of tf.data's own threads, which on a small machine competes with the step's.
  """
  import tensorflow as tf
  tf.profiler.experimental.start(logdir)
  t0 = time.perf_counter()
  arm.time(steps)
  wall = time.perf_counter() - t0
  tf.profiler.experimental.stop()
  import op_breakdown
  profile = op_breakdown.newest_profile(logdir)
  wait = blur = data_cpu = 0.0
  waits = ops = 0
  for line_name, name, event in op_breakdown.host_events(profile):
    seconds = event.duration_ps * 1e-12
    if name == 'IteratorGetNextOp::DoCompute':
      wait += seconds
      waits += 1
    elif line_name.startswith('tf_data') and name == 'ExecutorState::Process':
      data_cpu += seconds
    elif ':' in name and '::' not in name:
      ops += 1
      if 'batch_random_blur' in name:
        blur += seconds
  if not ops or waits < steps:
    raise RuntimeError(f'The profile {profile} has {ops} TF op events and {waits} '
                       f'IteratorGetNext events for {steps} steps: has the trace format changed?')
  return {'profiled_steps': steps, 'profiled_wall_seconds': wall, 'profile': profile,
          'input_wait_seconds_per_step': wait / steps, 'blur_op_seconds_per_step': blur / steps,
          'tf_data_cpu_seconds_per_step': data_cpu / steps,
          'input_wait_share': wait / wall, 'blur_op_share': blur / wall,
          'tf_data_cpu_share': data_cpu / wall}


def profile_op_types(arm, bench: Bench, steps: int, logdir: str) -> dict:
  """The op-type breakdown of `arm`'s step (benchmarks/op_breakdown.py): op counts of the traced
  replica step and the profiler's summed op time per category over `steps` steps."""
  import tensorflow as tf
  import op_breakdown
  size = bench.image_size
  graph = op_breakdown.replica_step_graph(arm.trainer, [(arm.batch, size, size, 6),
                                                        (arm.batch, 10)])
  tf.profiler.experimental.start(logdir)
  arm.time(steps)
  tf.profiler.experimental.stop()
  return {'ops': op_breakdown.graph_counts(graph), 'time': op_breakdown.trace_times(logdir),
          'profiled_steps': steps}


class _Variant:
  """One (precision, XLA, input) arm of a train config, warmed up and ready to time."""

  def __init__(self, bench, precision, jit_compile, model_dir, real_input=False, batch_size=0):
    import numpy as np
    import tensorflow as tf
    from tf_simclr.data import datasets, pipeline
    self.precision, self.jit_compile, self.real_input = precision, jit_compile, real_input
    self.label = (f'{precision}{" +XLA" if jit_compile else ""}'
                  f'{" +tf.data" if real_input else ""}')
    model, self.trainer, config = _train_objects(bench, model_dir, precision, jit_compile,
                                                 batch_size)
    self.batch = config.train.train_batch_size
    size = bench.image_size
    self.num_params = int(sum(np.prod(v.shape) for v in model.trainable_variables))
    if real_input:  # the shapes10 pipeline (two augmented views per example), as training uses
      source = datasets.resolve_from_config(config.data)
      dataset = pipeline.make_train_dataset(source, config.data, self.batch, num_views=2, seed=0)
    else:  # one in-memory batch, repeated: no input cost
      rng = np.random.RandomState(0)
      images = rng.uniform(size=(self.batch, size, size, 6)).astype(np.float32)
      labels = np.eye(10, dtype=np.float32)[rng.randint(10, size=self.batch)]
      dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
    self.iterator = iter(dataset)
    # Trainer.train() would also checkpoint and log; time its multi-step function alone.
    self.trainer._build_state()
    self.fn = self.trainer._build_train_fn()
    t0 = time.perf_counter()
    self.time(1)
    self.warmup = time.perf_counter() - t0
    self.times = []
    self.op_breakdown = None

  def time(self, steps: int) -> float:
    import tensorflow as tf
    t0 = time.perf_counter()
    with self.trainer.writer.as_default():
      self.fn(self.iterator, tf.constant(steps, tf.int32))
      metrics = self.trainer._accumulator.result()  # Forces completion.
    elapsed = (time.perf_counter() - t0) / steps
    self.trainer._accumulator.reset()
    if not all(v == v and abs(v) != float('inf') for v in metrics.values()):
      raise RuntimeError(f'{self.label}: non-finite metrics {metrics}')
    return elapsed


def run_train(bench: Bench, steps: int, precisions, xla_modes, rounds: int = 2,
              input_share: bool = False, batch_size: int = 0, profile: bool = False) -> list:
  """Builds and warms up every (precision, XLA) arm, then times them interleaved: `rounds`
  rounds, each timing every arm for `steps` steps, so load changes hit every arm alike. The
  median per arm is reported. `input_share` adds an arm of the first precision fed by the real
  pipeline; `profile` (which implies it) then profiles that arm (`profile_input_share`)."""
  import statistics
  arms = []
  # Summaries of the arms go to a temp folder left in place (small; see _KEEP_ALIVE).
  tmp = tempfile.mkdtemp(prefix='tf_simclr_throughput_')
  for precision in precisions:
    for jit in xla_modes:
      print(f'[{bench.name}] building and warming up {precision} xla={jit}...', flush=True)
      arms.append(_Variant(bench, precision, jit, os.path.join(tmp, str(len(arms))),
                           batch_size=batch_size))
  if input_share or profile:
    print(f'[{bench.name}] building the real-input arm...', flush=True)
    arms.append(_Variant(bench, precisions[0], False, os.path.join(tmp, 'input'),
                         real_input=True, batch_size=batch_size))
  gflops = forward_gflops(arms[0].trainer.task.model, bench.image_size)
  for r in range(rounds):
    for arm in arms:
      arm.times.append(arm.time(steps))
      print(f'[{bench.name}] round {r + 1}/{rounds} {arm.label}: '
            f'{arm.times[-1]:.3f} s/step', flush=True)
  _KEEP_ALIVE.extend(arms)
  profiled = {}
  if profile:
    print(f'[{bench.name}] profiling {arms[-1].label} for {steps} steps...', flush=True)
    profiled = profile_input_share(arms[-1], steps, os.path.join(tmp, 'profile'))
    for i, arm in enumerate(arms):
      if not arm.jit_compile and not arm.real_input:
        print(f'[{bench.name}] op-type profile of {arm.label} for {steps} steps...', flush=True)
        arm.op_breakdown = profile_op_types(arm, bench, steps, os.path.join(tmp, f'ops{i}'))
  blur = blur_seconds(bench.image_size, arms[0].batch) if bench.use_blur else 0.0
  rows = []
  for arm in arms:
    sec = statistics.median(arm.times)
    # Training = forward + backward (about 2x forward) = 3x forward FLOPs, for 2 views/example.
    step_gflops = 3 * gflops * 2 * arm.batch
    rows.append({'precision': arm.precision, 'jit_compile': arm.jit_compile,
                 'real_input': arm.real_input, 'batch_size': arm.batch,
                 'seconds_per_step': sec, 'all_seconds_per_step': arm.times,
                 'warmup_seconds': arm.warmup, 'trainable_params': arm.num_params,
                 'blur_seconds_per_step': blur,
                 'forward_gflops_per_view': gflops, 'step_gflops': step_gflops,
                 'achieved_gflops_per_s': step_gflops / sec,
                 **({'op_breakdown': arm.op_breakdown} if arm.op_breakdown else {}),
                 **(profiled if arm.real_input else {})})
  return rows


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
                      help='Timed steps (train) or batches (input) per config and round; 0 = '
                           'per-config defaults (r18_32: 5, r50_224: 3, input: 20).')
  parser.add_argument('--precisions', default='float32,mixed_bfloat16',
                      help='Precision arms of the train configs (float32, mixed_bfloat16, '
                           'mixed_float16); the first is the reference.')
  parser.add_argument('--xla', default='off,on',
                      help='XLA arms of the train configs: off, on or off,on.')
  parser.add_argument('--rounds', type=int, default=3,
                      help='Interleaved timing rounds per train config (median reported).')
  parser.add_argument('--input_share', action='store_true',
                      help='Also time the first precision fed by the real shapes10 pipeline.')
  parser.add_argument('--profile', action='store_true',
                      help='Profile the real-input arm (implies --input_share) with the TF '
                           'profiler: the share of the step spent waiting for tf.data and in '
                           'the batched blur, read from the trace; and print the op-type '
                           'breakdown (casts, layout, batch norm, conv/matmul, LARS, NT-Xent) '
                           'of each precision\'s step: graph op counts and profiled time.')
  parser.add_argument('--onednn', choices=('run_py', 'on', 'off', 'tf_default'),
                      default='run_py',
                      help='TF_ENABLE_ONEDNN_OPTS, set before TensorFlow loads (a process-wide '
                           'switch, so compare it across two runs). run_py: as run.py (on for '
                           'x86-64 unless already set); tf_default: TensorFlow\'s choice for '
                           'this CPU.')
  parser.add_argument('--batch_size', type=int, default=0,
                      help='Override every train config\'s batch size (quick checks).')
  parser.add_argument('--output', default=os.path.join(RESULTS_DIR, 'throughput.json'),
                      help='Where to write the JSON results.')
  args = parser.parse_args(argv)
  chosen = [c.strip() for c in args.configs.split(',') if c.strip()]
  unknown = [c for c in chosen if c not in names]
  if unknown or not chosen:
    parser.error(f'--configs: unknown {unknown or "(empty)"}; choose from {", ".join(names)}.')
  if args.steps < 0:
    parser.error('--steps must be >= 0.')
  precisions = [p.strip() for p in args.precisions.split(',') if p.strip()]
  from tf_simclr.config import PRECISIONS  # No TensorFlow import.
  bad = [p for p in precisions if p not in PRECISIONS]
  xla_modes = [{'off': False, 'on': True}.get(x.strip()) for x in args.xla.split(',')]
  if bad or not precisions or None in xla_modes:
    parser.error(f'--precisions takes {"/".join(PRECISIONS)}, --xla off/on.')

  from tf_simclr import cpu_kernels  # TensorFlow is imported after this point.
  if args.onednn == 'run_py':
    cpu_kernels.default_onednn_on()
  elif args.onednn != 'tf_default':
    os.environ[cpu_kernels.ENV] = '1' if args.onednn == 'on' else '0'
  facts = machine_facts()
  print('Measuring matmul peaks (2048^3, float32 and bfloat16)...', flush=True)
  facts['matmul_peak_gflops_per_s'] = peaks = matmul_peaks()
  rows = []
  for bench in (b for b in BENCHES if b.name in chosen):
    steps = args.steps or bench.steps
    print(f'[{bench.name}] timing {steps} steps per arm...', flush=True)
    load_before = os.getloadavg()[0]
    common = {'config': bench.name, 'kind': bench.kind, 'image_size': bench.image_size,
              'use_blur': bench.use_blur, 'timed_steps': steps,
              'loadavg_1min_before': load_before, 'note': bench.note}
    if bench.kind == 'train':
      for out in run_train(bench, steps, precisions, xla_modes, args.rounds, args.input_share,
                           args.batch_size, args.profile):
        ips = out['batch_size'] / out['seconds_per_step']
        rows.append({**common, 'resnet_depth': bench.resnet_depth, 'images_per_s': ips,
                     'views_per_s': 2 * ips, **out})
    else:
      out = run_input(bench, steps)
      ips = bench.batch_size / out['seconds_per_step']
      rows.append({**common, 'resnet_depth': None, 'precision': None, 'jit_compile': None,
                   'real_input': True, 'batch_size': bench.batch_size, 'images_per_s': ips,
                   'views_per_s': 2 * ips, **out})

  print()
  print('images/s counts one view pair (one example) as one image; views/s = 2 x images/s.')
  print(f'oneDNN: {"on" if facts["onednn"] else "off"} (TF_ENABLE_ONEDNN_OPTS='
        f'{facts["TF_ENABLE_ONEDNN_OPTS"] or "unset"}).')
  print(f'Matmul peak on this CPU, measured now: float32 {peaks["float32"]:.0f} GFLOP/s, '
        f'bfloat16 {peaks["bfloat16"]:.0f} GFLOP/s. "x ref" = speed vs the first arm.')
  header = (f'{"config":<10} {"arm":<26} {"batch":>5} {"s/step":>8} {"images/s":>9} '
            f'{"x ref":>6} {"GFLOP/s":>8} {"%peak":>6} {"warmup s":>8}')
  print(header)
  print('-' * len(header))
  ref = {}
  for r in rows:
    if r['kind'] == 'input':
      print(f'{r["config"]:<10} {"tf.data alone":<26} {r["batch_size"]:>5} '
            f'{r["seconds_per_step"]:>8.3f} {r["images_per_s"]:>9.1f}')
      continue
    arm = (f'{r["precision"]}{" +XLA" if r["jit_compile"] else ""}'
           f'{" +tf.data" if r["real_input"] else ""}')
    base = ref.setdefault(r['config'], r['seconds_per_step'])
    r['speedup_vs_reference'] = base / r['seconds_per_step']
    peak = peaks['float32' if r['precision'] == 'float32' else 'bfloat16']
    r['fraction_of_peak'] = r['achieved_gflops_per_s'] / peak
    print(f'{r["config"]:<10} {arm:<26} {r["batch_size"]:>5} {r["seconds_per_step"]:>8.3f} '
          f'{r["images_per_s"]:>9.1f} {r["speedup_vs_reference"]:>6.2f} '
          f'{r["achieved_gflops_per_s"]:>8.1f} {100 * r["fraction_of_peak"]:>5.1f}% '
          f'{r["warmup_seconds"]:>8.1f}')
  for config in ref:
    synth = [r for r in rows if r['config'] == config and not r['real_input']]
    real = [r for r in rows if r['config'] == config and r['real_input']]
    if real and synth:
      share = 1 - synth[0]['seconds_per_step'] / real[0]['seconds_per_step']
      print(f'{config}: input pipeline share of the step (real tf.data vs in-memory batch, '
            f'{synth[0]["precision"]}): {100 * share:.1f}%')
    if real and 'input_wait_share' in real[0]:
      p = real[0]
      print(f'{config}: TF profiler, {p["profiled_steps"]} steps of the real-input arm: waiting '
            f'for tf.data (IteratorGetNext) {100 * p["input_wait_share"]:.2f}% of the step, '
            f'batched blur ops {100 * p["blur_op_share"]:.2f}%, together '
            f'{100 * (p["input_wait_share"] + p["blur_op_share"]):.2f}%; tf.data threads\' '
            f'CPU time {100 * p["tf_data_cpu_share"]:.2f}% of the step\'s wall time.')
    broken = {r['precision']: r['op_breakdown'] for r in synth if 'op_breakdown' in r}
    if broken:
      import op_breakdown
      print(f'\n{config}: op types of the train step (ops: the traced replica step incl. '
            f'gradient and LARS, constants excluded; time share: TF profiler, summed op time, '
            f'{next(iter(broken.values()))["profiled_steps"]} steps, ratios within this run)')
      print(op_breakdown.format_table(broken))
    if synth and synth[0]['blur_seconds_per_step']:
      print(f'{config}: batched blur (always applied, both views) alone takes '
            f'{100 * synth[0]["blur_seconds_per_step"] / synth[0]["seconds_per_step"]:.1f}% '
            f'of the {synth[0]["precision"]} step (in it, half the batches are blurred).')
  facts['loadavg_at_end'] = list(os.getloadavg())
  print(f'\n{facts["cpu_model"]} ({", ".join(facts["cpu_isa"])}), {facts["nproc"]} cores, '
        f'TF {facts["tensorflow"]}, '
        f'load average at start {facts["loadavg_at_start"][0]:.2f}, '
        f'at end {facts["loadavg_at_end"][0]:.2f}')
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output, 'w') as f:
    json.dump({'machine': facts, 'units': {
        'images_per_s': 'examples (view pairs) per second',
        'views_per_s': 'augmented views per second (2 per example)',
        'achieved_gflops_per_s': '3 x forward FLOPs (TF profiler) x 2 views x batch / s'},
        'results': rows}, f, indent=2)
  print(f'Wrote {args.output}', flush=True)


if __name__ == '__main__':
  main()
  # Skip interpreter teardown of the kept TF objects (see _KEEP_ALIVE).
  sys.stdout.flush()
  os._exit(0)
