"""Does fine-tuning a pretrained model reach at least the linear probe on the same features?

Fine-tunes --checkpoint (default: the original's digits32 ResNet-18 in ../shared/fixtures) on a
small labelled set (--dataset, e.g. digits32 as a class folder) with the earlier fine-tuning comparison's flags (LARS,
lr 0.05 sqrt-scaled, no warmup or decay, whole network, global BN) for --seeds, once per
--logits_layer_init arm, and reads the same checkpoint's frozen features out with
`--mode=probe` (linear probe and kNN). Prints a table of mean +- spread (half the max-min range)
and writes benchmarks/results/finetune_fidelity.json.

digits32 (sklearn's load_digits, 8x8 -> 32x32 RGB by 4x nearest upscaling, 1437 train / 360 test):
see benchmarks/README.md for the snippet that writes it as PATH/{train,test}/<class>/*.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import tempfile

from cli_run import ROOT, run_cli  # pylint: disable=g-import-not-at-top
RESULTS = os.path.join(ROOT, 'benchmarks', 'results', 'finetune_fidelity.json')
FIXTURE = os.path.join(os.path.dirname(ROOT), 'shared', 'fixtures', 'original_tf2', 'saved_model',
                       'variables', 'variables')
TOP1 = 'eval/label_top_1_accuracy'
PROBE = 'eval/linear_probe_top_1_accuracy'
KNN = 'eval/knn_top_1_accuracy'
# The fixture's architecture and the fine-tuning flags (the original's command line).
ARCHITECTURE = ['--image_size=32', '--resnet_depth=18', '--proj_head_mode=nonlinear',
                '--num_proj_layers=3', '--proj_out_dim=128', '--ft_proj_selector=0',
                '--global_bn=True']
FINETUNE = ['--train_mode=finetune', '--learning_rate_scaling=sqrt',
            '--weight_decay=0', '--warmup_epochs=0', '--fine_tune_after_block=-1',
            '--zero_init_logits_layer=True', '--mode=train_then_eval']


def run(name: str, model_dir: str, flags: list) -> dict:
  """One run.py subprocess (log in model_dir/run.log); returns its result.json."""
  run_cli(name, model_dir, flags)
  with open(os.path.join(model_dir, 'result.json')) as f:
    return json.load(f)


def spread(values: list) -> tuple:
  """(mean, half range): the table's mean +- spread."""
  return statistics.fmean(values), (max(values) - min(values)) / 2


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dataset', required=True, help='e.g. folder:/data/digits32')
  parser.add_argument('--checkpoint', default=FIXTURE)
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--arms', default='checkpoint,zeros',
                      help='--logits_layer_init values to compare (checkpoint = the original)')
  parser.add_argument('--train_steps', type=int, default=90)
  parser.add_argument('--train_batch_size', type=int, default=64)
  parser.add_argument('--learning_rate', type=float, default=0.05,
                      help='0.05: the fidelity comparison\'s (x sqrt(64) = 0.4); the original README uses 0.005')
  parser.add_argument('--architecture', default=' '.join(ARCHITECTURE),
                      help="--checkpoint's architecture flags (default: the digits32 fixture's)")
  parser.add_argument('--eval_split', default='test')
  parser.add_argument('--extra_flags', default='',
                      help='more run.py flags for every fine-tuning run (a recipe, e.g. '
                      '"--optimizer=momentum"); they override the earlier fine-tuning comparison\'s flags')
  parser.add_argument('--results', default=RESULTS, help='where the JSON record goes')
  parser.add_argument('--work_dir', default=None)
  args = parser.parse_args(argv)
  work = args.work_dir or tempfile.mkdtemp(prefix='finetune_fidelity_')
  common = [f'--dataset={args.dataset}', f'--eval_split={args.eval_split}',
            f'--checkpoint={args.checkpoint}'] + shlex.split(args.architecture)
  probe = run('probe', os.path.join(work, 'probe'), common + ['--mode=probe'])
  rows = {}
  for arm in args.arms.split(','):
    accs = []
    for seed in args.seeds.split(','):
      result = run(f'{arm} seed {seed}', os.path.join(work, f'{arm}_{seed}'), common + FINETUNE + [
          f'--logits_layer_init={arm}', f'--seed={seed}', f'--learning_rate={args.learning_rate}', f'--train_steps={args.train_steps}',
          f'--train_batch_size={args.train_batch_size}', f'--checkpoint_steps={args.train_steps}',
          '--eval_batch_size=256', '--linear_probe=False', '--knn_monitor=False']
          + shlex.split(args.extra_flags))
      accs.append(result[TOP1])
    rows[arm] = accs
  print(f'\nfine-tuning {args.train_steps} steps of batch {args.train_batch_size}, '
        f'lr {args.learning_rate} (sqrt scaling) {args.extra_flags}, '
        f'seeds {args.seeds}; frozen features of the same checkpoint:')
  print('| readout | top-1 (mean +- spread) | runs |\n|---|---|---|')
  for arm, accs in rows.items():
    mean, half = spread(accs)
    print(f'| fine-tune, --logits_layer_init={arm} | {mean:.3f} +- {half:.3f} | '
          f'{", ".join(f"{a:.3f}" for a in accs)} |')
  print(f'| linear probe | {probe[PROBE]:.3f} | 1 (deterministic) |')
  print(f'| kNN | {probe[KNN]:.3f} | 1 |')
  record = {'date': datetime.datetime.utcnow().isoformat(timespec='seconds') + 'Z',
            'loadavg': os.getloadavg(), 'dataset': args.dataset, 'checkpoint': args.checkpoint,
            'train_steps': args.train_steps, 'train_batch_size': args.train_batch_size,
            'learning_rate': args.learning_rate,
            'seeds': args.seeds, 'finetune_top1': rows, 'linear_probe_top1': probe[PROBE],
            'knn_top1': probe[KNN], 'flags': common + FINETUNE,
            'extra_flags': args.extra_flags}
  os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
  with open(args.results, 'w') as f:
    json.dump(record, f, indent=2)
  print(f'wrote {args.results}')


if __name__ == '__main__':
  main()
