"""`--help` in topic groups (basics first) and flag errors with exit status 2.

absl's own `--help` lists one alphabetical block; here `GROUPS` of definitions.py decides the
order. `--helpfull` stays absl's (every module's flags, TensorFlow's included).
"""

import sys
import textwrap

from absl import flags

from tf_simclr.cli import definitions

FLAGS = flags.FLAGS
HELP_ARGS = ('-h', '-help', '--help', '-?', '--helpshort', '-helpshort')
EXIT_USAGE = 2  # A user error (a flag typo, a bad value), as every other refusal of the CLI.
WIDTH = 100

USAGE = '''tf-simclr: SimCLR v1/v2 pretraining, fine-tuning, distillation and export (TensorFlow 2 / Keras 3).

  tf-simclr --flagfile=flags/quickstart.cfg                      # pretrain on the built-in shapes10
  tf-simclr --mode=probe --model_dir=runs/quickstart             # kNN + linear probe of a run
  tf-simclr --dataset=images:PATH --model_dir=runs/mine          # your own unlabelled images

--dataset: a TFDS name (cifar10, imagenet2012, ...), folder:PATH (PATH/<split>/<class>/*.jpg),
images:PATH (unlabelled image files) or shapes10 (built in, no download). Original
google-research/simclr tf2/run.py command lines work unchanged. `python run.py` and
`python -m tf_simclr` are the same program; --helpfull also lists TensorFlow's own flags.
'''


def _render_flag(flag) -> str:
  default = 'unset' if flag.default is None else flag.default_as_str
  head = f'  --{flag.name}' if flag.boolean is False else f'  --[no]{flag.name}'
  text = f'{flag.help} (default: {default})'
  body = textwrap.fill(text, WIDTH, initial_indent='      ', subsequent_indent='      ')
  return f'{head}\n{body}'


def help_text() -> str:
  """The grouped help: usage, then each topic's flags in GROUPS order."""
  parts = [USAGE]
  for _, title, names in definitions.GROUPS:
    parts.append(f'{title}:')
    parts.extend(_render_flag(FLAGS[name]) for name in names)
    parts.append('')
  return '\n'.join(parts)


def parse_flags(argv):
  """app.run's flags_parser: grouped --help (exit 0); a flag error is one message and exit 2."""
  if any(arg in HELP_ARGS for arg in argv[1:]):
    sys.stdout.write(help_text())
    sys.exit(0)
  try:
    return FLAGS(argv)
  except flags.Error as e:
    sys.stderr.write(f'FATAL Flags parsing error: {e}\nPass --help for the flags by topic.\n')
    sys.exit(EXIT_USAGE)
