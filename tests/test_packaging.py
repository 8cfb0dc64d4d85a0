"""`pip install .` installs the tf_simclr package and a `tf-simclr` command equal to run.py, with
LICENSE (Apache-2.0, as google-research/simclr) and NOTICE; the [gpu] extra pins TF with CUDA."""

import os
import shutil
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pyproject_pins_match_requirements():
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    project = tomllib.load(f)['project']
  with open(os.path.join(ROOT, 'requirements.txt')) as f:
    pins = sorted(line.split('#')[0].strip() for line in f
                  if line.split('#')[0].strip())
  assert sorted(project['dependencies']) == pins
  tf_pin = next(p for p in pins if p.startswith('tensorflow=='))
  assert project['optional-dependencies']['gpu'] == [
      tf_pin.replace('tensorflow==', 'tensorflow[and-cuda]==')]
  assert project['scripts'] == {'tf-simclr': 'tf_simclr.cli:run'}
  assert 'Apache License' in open(os.path.join(ROOT, 'LICENSE')).read(200)
  assert 'google-research/simclr' in open(os.path.join(ROOT, 'NOTICE')).read()


@pytest.mark.slow
def test_installed_command_equals_run_py(tmp_path):
  """A venv that sees the installed TensorFlow; the project installed without its dependencies
  (no download); the command run outside the clone gives run.py's answer to the same flags."""
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', '--system-site-packages', str(venv)], check=True)
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  env.update(TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='')
  # From a copy: setuptools builds in the source tree (build/, *.egg-info), which must stay clean.
  source = tmp_path / 'source'
  shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
      '.git', 'build', '*.egg-info', '__pycache__', '.pytest_cache', 'runs'))
  pip = subprocess.run([str(venv / 'bin' / 'pip'), 'install', '-q', '--no-deps',
                        '--no-build-isolation', str(source)], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=300)
  assert pip.returncode == 0, pip.stderr[-3000:]
  flags = ['--mode=export', f'--model_dir={tmp_path / "empty"}']
  installed = subprocess.run([str(venv / 'bin' / 'tf-simclr'), *flags], cwd=str(tmp_path),
                             env=env, capture_output=True, text=True, timeout=300)
  clone = subprocess.run([sys.executable, os.path.join(ROOT, 'run.py'), *flags], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
  message = '--mode=export: no checkpoint in --model_dir='
  assert installed.returncode == clone.returncode == 2
  assert message in installed.stderr and message in clone.stderr
  for command in ([str(venv / 'bin' / 'tf-simclr')], [sys.executable, 'run.py'],
                  [sys.executable, '-m', 'tf_simclr']):
    usage = subprocess.run([*command, '--help'], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
    assert usage.returncode == 0, command
    assert '--embed_endpoint' in usage.stdout and '--train_mode' in usage.stdout, command
  where = subprocess.run([str(venv / 'bin' / 'python'), '-c',
                          'import tf_simclr.cli, tf_simclr; print(tf_simclr.cli.__file__, tf_simclr.__file__)'],
                         cwd=str(tmp_path), env=env, capture_output=True, text=True)
  assert str(venv) in where.stdout, where.stdout + where.stderr
  # The recipes are installed as files (tf_simclr/flags links the clone's flags/).
  installed_package = os.path.dirname(where.stdout.split()[1])
  assert sorted(os.listdir(os.path.join(installed_package, 'flags'))) == sorted(
      f for f in os.listdir(os.path.join(ROOT, 'flags')) if f.endswith('.cfg'))
  dist = next((venv / 'lib').glob('python3*/site-packages/tf_simclr-*.dist-info'))
  assert {'LICENSE', 'NOTICE'} <= set(os.listdir(dist))
