"""Does the quickstart's pretraining help? Linear eval of the pretrained vs a random encoder.

Every arm also reports the readouts on frozen features that run.py writes to result.json (kNN
monitor and linear probe, tf_simclr/evaluation/probe.py); the pretrained arm's run includes the
random-init encoder's readouts when the flagfile sets --random_init_baseline (the quickstart does).

  python benchmarks/quickstart_gain.py                                  # runs all three arms
  python benchmarks/quickstart_gain.py --reuse_pretrained=/tmp/tf_simclr_quickstart
  python benchmarks/quickstart_gain.py --extra_flags=--train_steps=4    # smoke run

Arm `pretrained`: `run.py --flagfile=flags/quickstart.cfg` as is: contrastive pretraining of
ResNet-18 with a linear head trained on stop_gradient(features) at the same time, then top-1/top-5
of that head on the eval split.

Arm `random_init`: the same flagfile and budget (dataset, image size, batch, steps, schedule,
LARS settings, seed, eval) with `--train_mode=finetune --fine_tune_after_block=4` and no
--checkpoint: the encoder keeps its random initialisation, frozen (inference-mode batch norm), and
only the linear head trains. Both heads read the encoder output (ft_proj_selector=0) and get the
same optimizer: with LARS the supervised head is excluded from adaptation and decay, so in both
arms it is momentum SGD with the quickstart's warmup + cosine learning rate and the same L2 on its
kernel (see benchmarks/README.md for why this choice).

Arm `pretrained_linear_eval`: exactly the `random_init` run (same flags, same head training, same
budget) but with the encoder initialised from the `pretrained` arm's checkpoint (--checkpoint). It
is the like-for-like comparison with `random_init`: both train a linear head, from zero
(--logits_layer_init=zeros), on a frozen encoder; only the encoder's weights differ. (The
`pretrained` arm's own head is trained while the encoder still changes, on two jittered views,
and under-fits.)

Each arm is a `run.py` subprocess with its own --model_dir under --work_dir; the script reads
result.json, prints a table and writes benchmarks/results/quickstart_gain.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile

from cli_run import ROOT, run_cli  # pylint: disable=g-import-not-at-top
RESULTS_DIR = os.path.join(ROOT, 'benchmarks', 'results')
TOP1 = 'eval/label_top_1_accuracy'
TOP5 = 'eval/label_top_5_accuracy'
# Readouts on frozen features (evaluation/probe.py): result.json key -> column name.
READOUTS = {'eval/knn_top_1_accuracy': 'knn_top1',
            'eval/linear_probe_top_1_accuracy': 'probe_top1',
            'eval/linear_probe_top_5_accuracy': 'probe_top5',
            'eval/random_init/knn_top_1_accuracy': 'random_init_knn_top1',
            'eval/random_init/linear_probe_top_1_accuracy': 'random_init_probe_top1'}
RANDOM_INIT_FLAGS = ('--train_mode=finetune', '--fine_tune_after_block=4',
                     '--logits_layer_init=zeros')
# Flags that define the budget; a reused pretrained run must match the flagfile on these.
BUDGET_FLAGS = ('dataset', 'train_split', 'eval_split', 'image_size', 'resnet_depth',
                'width_multiplier', 'train_batch_size', 'train_epochs', 'train_steps',
                'learning_rate', 'optimizer', 'seed')


def read_flagfile(path: str) -> dict:
  """`--name=value` lines of a flagfile (comments and blank lines skipped)."""
  out = {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line.startswith('--') and '=' in line:
        name, value = line[2:].split('=', 1)
        out[name] = value
  return out


def _same(flag_value: str, stored) -> bool:
  try:
    return float(flag_value) == float(stored)
  except (TypeError, ValueError):
    return str(flag_value) == str(stored)


def check_reused(model_dir: str, flagfile: dict) -> list:
  """Budget flags on which the reused run differs from the flagfile (empty if none)."""
  path = os.path.join(model_dir, 'flags.json')
  if not os.path.exists(path):
    return [f'{path} missing: cannot check the budget']
  with open(path) as f:
    stored = json.load(f)
  return [f'--{k}: flagfile {flagfile[k]!r}, reused run {stored.get(k)!r}'
          for k in BUDGET_FLAGS if k in flagfile and not _same(flagfile[k], stored.get(k))]


def read_result(model_dir: str) -> dict:
  path = os.path.join(model_dir, 'result.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: the run did not finish its evaluation '
                            '(see its log in the same folder).')
  with open(path) as f:
    return json.load(f)


def run_arm(name: str, model_dir: str, flagfile: str, extra: list, python: str) -> dict:
  """Runs run.py for one arm; its output goes to model_dir/run.log."""
  cmd = [python, os.path.join(ROOT, 'run.py'), f'--flagfile={flagfile}', *extra,
         f'--model_dir={model_dir}']
  wall = run_cli(name, model_dir, [f'--flagfile={flagfile}', *extra], python=python)
  return {'arm': name, 'model_dir': model_dir, 'command': cmd, 'wall_seconds': wall,
          'reused': False, **_metrics(read_result(model_dir))}


def reused_arm(model_dir: str) -> dict:
  """The pretrained arm from an existing model_dir; wall time from file times (approximate)."""
  result = read_result(model_dir)
  wall = None
  flags_json = os.path.join(model_dir, 'flags.json')
  if os.path.exists(flags_json):
    wall = os.path.getmtime(os.path.join(model_dir, 'result.json')) - os.path.getmtime(flags_json)
  return {'arm': 'pretrained', 'model_dir': model_dir, 'command': None, 'wall_seconds': wall,
          'reused': True, **_metrics(result)}


def _metrics(result: dict) -> dict:
  return {'top1': result[TOP1], 'top5': result[TOP5],
          'global_step': int(result.get('global_step', 0)),
          'num_examples': int(result.get('num_examples', 0)),
          **{name: result.get(key) for key, name in READOUTS.items()}}


def _cell(value) -> str:
  return f'{value:.4f}' if value is not None else '-'


def print_readouts(rows: list) -> None:
  """kNN / probe top-1 of each arm's encoder, and of the random-init encoder where measured."""
  print(f'\n{"encoder":<34} {"kNN top-1":>9} {"probe top-1":>11} {"probe top-5":>11}')
  for r in rows:
    print(f'{r["arm"]:<34} {_cell(r["knn_top1"]):>9} {_cell(r["probe_top1"]):>11} '
          f'{_cell(r["probe_top5"]):>11}')
    if r['random_init_knn_top1'] is not None or r['random_init_probe_top1'] is not None:
      print(f'{"  random init (same seed, same run)":<34} {_cell(r["random_init_knn_top1"]):>9} '
            f'{_cell(r["random_init_probe_top1"]):>11} {"-":>11}')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--flagfile', default=os.path.join(ROOT, 'flags', 'quickstart.cfg'))
  parser.add_argument('--reuse_pretrained', default=None,
                      help='An existing quickstart --model_dir with result.json: reuse it '
                           'instead of running the pretrained arm.')
  parser.add_argument('--work_dir', default=None,
                      help='Parent of the arms\' model_dirs (default: a new temp dir, kept).')
  parser.add_argument('--extra_flags', default='',
                      help='Flags appended to both arms, e.g. "--train_steps=4" for a smoke run.')
  parser.add_argument('--output', default=os.path.join(RESULTS_DIR, 'quickstart_gain.json'))
  parser.add_argument('--python', default=sys.executable)
  args = parser.parse_args(argv)
  flagfile = os.path.abspath(args.flagfile)
  if not os.path.exists(flagfile):
    parser.error(f'--flagfile={args.flagfile} does not exist.')
  flag_values = read_flagfile(flagfile)
  extra = shlex.split(args.extra_flags)
  work_dir = args.work_dir or tempfile.mkdtemp(prefix='quickstart_gain_')
  notes = []

  rows = []
  if args.reuse_pretrained:
    if extra:
      parser.error('--extra_flags changes the budget; it cannot be combined with '
                   '--reuse_pretrained (the reused run did not have them).')
    mismatches = check_reused(args.reuse_pretrained, flag_values)
    for m in mismatches:
      print(f'WARNING: reused run differs from {args.flagfile}: {m}', flush=True)
    notes += [f'reused run differs: {m}' for m in mismatches]
    rows.append(reused_arm(args.reuse_pretrained))
    pretrained_dir = args.reuse_pretrained
  else:
    pretrained_dir = os.path.join(work_dir, 'pretrained')
    rows.append(run_arm('pretrained', pretrained_dir, flagfile, extra, args.python))
  rows.append(run_arm('random_init', os.path.join(work_dir, 'random_init'), flagfile,
                      [*RANDOM_INIT_FLAGS, *extra], args.python))
  rows.append(run_arm('pretrained_linear_eval', os.path.join(work_dir, 'pretrained_linear_eval'),
                      flagfile, [*RANDOM_INIT_FLAGS, f'--checkpoint={pretrained_dir}', *extra],
                      args.python))

  print()
  header = f'{"arm":<22} {"top-1":>7} {"top-5":>7} {"step":>6} {"wall time":>10}'
  print(header)
  print('-' * len(header))
  for r in rows:
    wall = f'{r["wall_seconds"]:.0f} s' if r['wall_seconds'] is not None else '?'
    if r['reused']:
      wall += '*'
    print(f'{r["arm"]:<22} {r["top1"]:>7.4f} {r["top5"]:>7.4f} {r["global_step"]:>6} '
          f'{wall:>10}')
  gain = rows[0]['top1'] - rows[1]['top1']
  linear_gain = rows[2]['top1'] - rows[1]['top1']
  print(f'\nTop-1 gain over a random-init encoder: {100 * gain:+.2f} points (head trained while '
        f'pretraining), {100 * linear_gain:+.2f} points (same linear eval on both encoders)')
  print_readouts(rows)
  pre = rows[0]
  readout_gains = {}
  for name in ('knn_top1', 'probe_top1'):
    if pre[name] is not None and pre['random_init_' + name] is not None:
      readout_gains[name] = pre[name] - pre['random_init_' + name]
      print(f'{name}: {100 * readout_gains[name]:+.2f} points over the random-init encoder')
  if rows[0]['reused']:
    print('* reused run: wall time = result.json mtime - flags.json mtime (includes eval).')
  payload = {
      'date_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'nproc': os.cpu_count(), 'loadavg_at_end': list(os.getloadavg()),
      'flagfile': os.path.relpath(flagfile, ROOT), 'extra_flags': extra,
      'random_init_flags': list(RANDOM_INIT_FLAGS), 'top1_gain': gain,
      'top1_gain_same_linear_eval': linear_gain, 'readout_gains': readout_gains, 'arms': rows,
      'notes': notes}
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output, 'w') as f:
    json.dump(payload, f, indent=2)
  print(f'Wrote {args.output}')


if __name__ == '__main__':
  main()
