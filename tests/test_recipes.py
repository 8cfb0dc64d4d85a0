"""Every recipe in flags/ parses and validates as run.py would run it, with its documented command.

Each flagfile starts with the command to run it (`python run.py --flagfile=flags/X.cfg ...` with
$PLACEHOLDERS); that command, placeholders pointed at a temporary folder, goes through run.py's
flag parsing and config validation (tests/helpers.py `config_from_argv`). A recipe with a flag that
no longer exists or a value config.py refuses fails here. Every `--name=value` line of the file
must reach its flag unchanged, and the small (<= 32 px) recipes also build their model.
"""

import pathlib
import re

import numpy as np
import pytest
import tensorflow as tf

from tf_simclr import config as cfg
from tf_simclr.models import simclr

from helpers import config_from_argv, parse_flags

FLAGS_DIR = pathlib.Path(__file__).resolve().parents[1] / 'flags'
RECIPES = sorted(p.name for p in FLAGS_DIR.glob('*.cfg'))
SMALL_RECIPE_CLASSES = 10  # shapes10 and CIFAR-10


def _documented_command(path: pathlib.Path, tmp_path) -> list:
  """The argv of the recipe's first `python run.py --flagfile=flags/<name>` comment command."""
  lines = path.read_text().splitlines()
  start = next(i for i, line in enumerate(lines)
               if re.match(rf'#\s+python run\.py --flagfile=flags/{re.escape(path.name)}\b', line))
  text = ''
  for line in lines[start:]:
    text += ' ' + line.lstrip('#').strip().rstrip('\\')
    if not line.rstrip().endswith('\\'):
      break
  argv = text.split()[2:]  # Drop `python run.py`.
  out = []
  for arg in argv:  # --x=$NAME or --x=NAME (a placeholder) -> a folder under tmp_path.
    name, _, value = arg.partition('=')
    if re.fullmatch(r'\$?[A-Z][A-Z0-9_]*', value):
      value = str(tmp_path / value.lstrip('$'))
    if name == '--flagfile':
      value = str(FLAGS_DIR / pathlib.Path(value).name)
    out.append(f'{name}={value}')
  return out


def _file_values(path: pathlib.Path) -> dict:
  """{flag: text value} of the recipe's `--name=value` lines (comments skipped)."""
  values = {}
  for line in path.read_text().splitlines():
    m = re.fullmatch(r'--([a-z0-9_]+)=(.*)', line.strip())
    if m:
      values[m.group(1)] = m.group(2)
  return values


def test_every_recipe_is_found():
  assert len(RECIPES) >= 8 and 'quickstart.cfg' in RECIPES


@pytest.mark.parametrize('recipe', RECIPES)
def test_recipe_parses_and_validates(recipe, tmp_path):
  path = FLAGS_DIR / recipe
  argv = _documented_command(path, tmp_path)
  assert argv[0] == f'--flagfile={path}', argv
  config = config_from_argv(argv)
  assert isinstance(config, cfg.Config)
  fv = parse_flags(argv)
  for name, text in _file_values(path).items():
    flag = fv[name]
    if name in {a[2:].partition('=')[0] for a in argv[1:]}:
      continue  # The command overrides the file.
    # The flag's own parser turns the file's text into the value the flag must hold.
    assert flag.value == flag.parser.parse(text), (recipe, name, text, flag.value)
  train = config.train
  assert train.model_dir == str(tmp_path / 'MODEL_DIR') or train.model_dir == fv.model_dir
  assert train.train_mode == fv.train_mode and train.mode == fv.mode
  assert config.model.resnet_depth == fv.resnet_depth
  assert config.model.width_multiplier == fv.width_multiplier
  assert config.data.image_size == fv.image_size


@pytest.mark.parametrize('recipe', [r for r in RECIPES if cfg.small_images(
    int(_file_values(FLAGS_DIR / r).get('image_size', '224')))])
def test_small_recipe_builds_its_model(recipe, tmp_path):
  config = config_from_argv(_documented_command(FLAGS_DIR / recipe, tmp_path))
  model = simclr.build_model(config.model, SMALL_RECIPE_CLASSES)
  size = config.data.image_size
  out = model(tf.zeros([2, size, size, 3]), training=False)  # As build_for_size, with outputs.
  width = int(64 * config.model.width_multiplier) * (4 if config.model.resnet_depth > 34 else 1)
  # ResNet's last block group has 8 x the stem's 64 * width channels (x4 for bottlenecks).
  assert out[simclr.FINAL_AVG_POOL].shape == (2, 8 * width)
  if config.model.proj_head_mode != 'none':
    assert out[simclr.PROJ_HEAD_OUTPUT].shape[-1] == config.model.proj_out_dim
  assert (simclr.LOGITS_SUP in out) == config.model.supervised_head
  if config.model.supervised_head:
    assert out[simclr.LOGITS_SUP].shape == (2, SMALL_RECIPE_CLASSES)
  assert np.all(np.isfinite(out[simclr.FINAL_AVG_POOL].numpy()))
