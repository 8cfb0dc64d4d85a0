"""SimCLRv2's three steps in miniature on shapes10 with 10% of the labels, next to a supervised
baseline on the same labels. About 10-25 minutes on a 2-core CPU.

  python benchmarks/semi_supervised.py                       # reuses /tmp/tf_simclr_quickstart
  python benchmarks/semi_supervised.py --pretrained_dir=''   # pretrains its own (shorter) model
  python benchmarks/semi_supervised.py --smoke               # a few steps per arm, for CI

Arms, each a `run.py` subprocess with its own --model_dir under --work_dir:
  pretrain        contrastive pretraining (flags/quickstart.cfg, --pretrain_epochs); skipped when
                  --pretrained_dir holds a finished run (result.json), e.g. the quickstart's.
  finetune        --train_mode=finetune from the pretrain checkpoint on a class-balanced, seeded
                  10% of train (--train_label_fraction=0.1), fine-tuning from the first projection
                  head layer (--ft_proj_selector=1) as SimCLRv2 does for 1%/10% labels.
  distill         --train_mode=distill: the fine-tuned model is the teacher, a same-size student
                  learns its softened predictions on the whole (unlabelled) train split (Eq. 2).
                  The student starts from the pretrained encoder (--distill_init=pretrained) or
                  random weights (--distill_init=scratch, the paper's setting) - the miniature
                  budget is too small for a scratch student to catch up, so the default is
                  `pretrained`; the table says which.
  supervised      the fine-tune arm without --checkpoint: the same labels, steps, optimizer and
                  schedule from random initialisation (the supervised baseline).
Every arm evaluates top-1/top-5 on the 2000-image test split, and the readouts of its encoder's
frozen features (tf_simclr/evaluation/probe.py): the kNN monitor and the linear probe, which use the
labels of the whole train split (they measure the representation, not the 10%-label protocol).
Prints a table and writes benchmarks/results/semi_supervised.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

from cli_run import ROOT, run_cli  # pylint: disable=g-import-not-at-top
RESULTS_DIR = os.path.join(ROOT, 'benchmarks', 'results')
QUICKSTART_DIR = '/tmp/tf_simclr_quickstart'
TOP1 = 'eval/label_top_1_accuracy'
TOP5 = 'eval/label_top_5_accuracy'
# The architecture of flags/quickstart.cfg; every arm uses it (a reused pretrain run is checked).
ARCHITECTURE = {'dataset': 'shapes10', 'image_size': 16, 'resnet_depth': 18,
                'width_multiplier': 0.25, 'sk_ratio': 0.0, 'proj_head_mode': 'nonlinear',
                'num_proj_layers': 3, 'proj_out_dim': 128}
COMMON = ['--dataset=shapes10', '--train_split=train', '--eval_split=test', '--image_size=16',
          '--resnet_depth=18', '--width_multiplier=0.25', '--sk_ratio=0',
          '--proj_head_mode=nonlinear', '--num_proj_layers=3', '--proj_out_dim=128',
          '--mode=train_then_eval', '--eval_batch_size=500', '--use_blur=False', '--seed=0',
          # Readouts of each arm's encoder at its final eval (not during training).
          '--knn_monitor=True', '--linear_probe=True', '--knn_every_epochs=0']
KNN_TOP1 = 'eval/knn_top_1_accuracy'
PROBE_TOP1 = 'eval/linear_probe_top_1_accuracy'


def _run(name: str, argv: list, model_dir: str) -> float:
  """Runs `python run.py argv` (log in model_dir/run.log); returns wall seconds."""
  return run_cli(name, model_dir, argv)


def read_result(model_dir: str) -> dict:
  path = os.path.join(model_dir, 'result.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: the run did not finish its evaluation '
                            f'(see {model_dir}/run.log).')
  with open(path) as f:
    return json.load(f)


def check_architecture(model_dir: str) -> None:
  """A reused pretrain run must have the architecture every later arm is built with."""
  with open(os.path.join(model_dir, 'flags.json')) as f:
    stored = json.load(f)
  bad = [f'--{k}={stored.get(k)!r} (expected {v!r})' for k, v in ARCHITECTURE.items()
         if str(stored.get(k)) != str(v) and not (
             isinstance(v, float) and float(stored.get(k, -1)) == v)]
  if bad:
    raise SystemExit(f'--pretrained_dir={model_dir} was trained with {", ".join(bad)}; pass '
                     "--pretrained_dir='' to pretrain a matching model.")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--work_dir', default='/tmp/tf_simclr_semi_supervised')
  parser.add_argument('--pretrained_dir', default=QUICKSTART_DIR,
                      help='A finished pretrain run to reuse (needs result.json); empty = '
                           'pretrain under --work_dir.')
  parser.add_argument('--pretrain_epochs', type=int, default=2)
  parser.add_argument('--label_fraction', type=float, default=0.1)
  parser.add_argument('--finetune_epochs', type=int, default=20,
                      help='Epochs over the labelled subset (fine-tune and supervised arms).')
  parser.add_argument('--finetune_batch_size', type=int, default=64)
  parser.add_argument('--finetune_learning_rate', type=float, default=0.1,
                      help='LARS, sqrt scaling (0.1 x sqrt(64) = 0.8).')
  parser.add_argument('--distill_epochs', type=int, default=2)
  parser.add_argument('--distill_batch_size', type=int, default=128)
  parser.add_argument('--distill_temperature', type=float, default=1.0)
  parser.add_argument('--distill_init', choices=('pretrained', 'scratch'), default='pretrained')
  parser.add_argument('--smoke', action='store_true', help='4 steps per arm (checks plumbing).')
  parser.add_argument('--output', default=os.path.join(RESULTS_DIR, 'semi_supervised.json'))
  args = parser.parse_args()

  work = args.work_dir
  dirs = {name: os.path.join(work, name) for name in ('pretrain', 'finetune', 'distill',
                                                       'supervised')}
  smoke = ['--train_steps=4', '--eval_steps=1'] if args.smoke else []
  seconds = {}
  reuse = args.pretrained_dir and os.path.exists(os.path.join(args.pretrained_dir, 'result.json'))
  if reuse:
    check_architecture(args.pretrained_dir)
    dirs['pretrain'] = args.pretrained_dir
    print(f'[pretrain] reusing {args.pretrained_dir}', flush=True)
  else:
    if args.pretrained_dir:
      print(f'[pretrain] {args.pretrained_dir}/result.json not found: pretraining here.')
    seconds['pretrain'] = _run('pretrain', [
        f'--flagfile={os.path.join(ROOT, "flags", "quickstart.cfg")}',
        f'--train_epochs={args.pretrain_epochs}'] + COMMON + smoke, dirs['pretrain'])

  labels = [f'--train_label_fraction={args.label_fraction}', '--label_fraction_seed=0']
  finetune = COMMON + labels + [
      # The pretrain run's linear head read the encoder output (selector 0): start a new one.
      '--train_mode=finetune', '--ft_proj_selector=1', '--logits_layer_init=zeros',
      '--optimizer=lars',
      f'--learning_rate={args.finetune_learning_rate}', '--learning_rate_scaling=sqrt',
      '--weight_decay=0', '--warmup_epochs=0', f'--train_batch_size={args.finetune_batch_size}',
      f'--train_epochs={args.finetune_epochs}', '--checkpoint_epochs=5', '--steps_per_loop=25']
  seconds['finetune'] = _run('finetune', finetune + [f'--checkpoint={dirs["pretrain"]}'] + smoke,
                             dirs['finetune'])
  seconds['supervised'] = _run('supervised', finetune + smoke, dirs['supervised'])
  distill = COMMON + [
      '--train_mode=distill', f'--teacher_checkpoint={dirs["finetune"]}',
      f'--distill_temperature={args.distill_temperature}', '--distill_label_weight=0',
      '--ft_proj_selector=0', '--optimizer=lars', '--learning_rate=1.0',
      '--learning_rate_scaling=linear', '--weight_decay=1e-4', '--warmup_epochs=0.2',
      f'--train_batch_size={args.distill_batch_size}', f'--train_epochs={args.distill_epochs}',
      '--checkpoint_epochs=1', '--steps_per_loop=25']
  if args.distill_init == 'pretrained':
    distill.append(f'--checkpoint={dirs["pretrain"]}')
  seconds['distill'] = _run('distill', distill + smoke, dirs['distill'])

  rows = [('pretrain + finetune (10% labels)', 'finetune'),
          (f'+ distill (unlabelled train, student init: {args.distill_init})', 'distill'),
          ('supervised only (10% labels, random init)', 'supervised')]
  results = {}
  print(f'\nshapes10, ResNet-18 16 px, {args.label_fraction:.0%} labels; top-1/top-5 on test')
  print(f'{"arm":58s} {"top-1":>7s} {"top-5":>7s} {"kNN":>7s} {"probe":>7s} {"steps":>6s} '
        f'{"minutes":>8s}')

  def cell(value):
    return f'{value:7.4f}' if value is not None else f'{"-":>7s}'
  for title, key in rows:
    result = read_result(dirs[key])
    results[key] = {'top1': result[TOP1], 'top5': result[TOP5],
                    'knn_top1': result.get(KNN_TOP1), 'probe_top1': result.get(PROBE_TOP1),
                    'global_step': int(result.get('global_step', 0)), 'model_dir': dirs[key],
                    'seconds': round(seconds.get(key, 0.0), 1)}
    print(f'{title:58s} {result[TOP1]:7.4f} {result[TOP5]:7.4f} {cell(result.get(KNN_TOP1))} '
          f'{cell(result.get(PROBE_TOP1))} {int(result.get("global_step", 0)):6d} '
          f'{seconds.get(key, 0) / 60:8.1f}')
  pretrain = read_result(dirs['pretrain'])
  results['pretrain_linear_eval'] = {'top1': pretrain.get(TOP1), 'top5': pretrain.get(TOP5),
                                     'knn_top1': pretrain.get(KNN_TOP1),
                                     'probe_top1': pretrain.get(PROBE_TOP1),
                                     'model_dir': dirs['pretrain'], 'reused': bool(reuse),
                                     'seconds': round(seconds.get('pretrain', 0.0), 1)}
  print(f'(pretrain, 100% labels: head trained while pretraining top-1 {pretrain.get(TOP1)}, '
        f'kNN {pretrain.get(KNN_TOP1)}, linear probe {pretrain.get(PROBE_TOP1)})')
  payload = {'benchmark': 'semi_supervised', 'date': datetime.datetime.now().isoformat(),
             'smoke': args.smoke, 'settings': vars(args), 'results': results,
             'total_minutes': round(sum(seconds.values()) / 60, 1)}
  if args.output:
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, 'w') as f:
      json.dump(payload, f, indent=2, sort_keys=True)
    print(f'Wrote {args.output}')


if __name__ == '__main__':
  main()
