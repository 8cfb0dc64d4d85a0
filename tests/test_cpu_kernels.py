"""run.py's CPU-kernel default: oneDNN on x86-64 unless TF_ENABLE_ONEDNN_OPTS says otherwise."""

import os
import platform
import subprocess
import sys

import pytest

from tf_simclr import cpu_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What run.py does before TensorFlow loads, then what the loaded TensorFlow reports.
PROBE = ('import os; from tf_simclr import cpu_kernels; cpu_kernels.default_onednn_on(); '
         'import tensorflow; print(os.environ.get(cpu_kernels.ENV), cpu_kernels.onednn_enabled())')


def _probe(**env):
  environ = {k: v for k, v in os.environ.items() if k != cpu_kernels.ENV}
  environ.update(env, TF_CPP_MIN_LOG_LEVEL='3', CUDA_VISIBLE_DEVICES='')
  out = subprocess.run([sys.executable, '-c', PROBE], cwd=ROOT, env=environ, text=True,
                       capture_output=True, timeout=180)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout.split()[-2:]


@pytest.mark.slow
@pytest.mark.skipif(platform.machine().lower() != 'x86_64', reason='oneDNN default is x86-64 only')
def test_onednn_is_on_unless_the_user_set_the_variable():
  assert _probe() == ['1', 'True']  # TensorFlow really loaded oneDNN kernels
  assert _probe(TF_ENABLE_ONEDNN_OPTS='0') == ['0', 'False']  # the user's choice is kept


def test_default_is_left_alone_where_it_cannot_matter():
  env = {}
  # TensorFlow is already loaded in this process: setting the variable now would change nothing.
  assert not cpu_kernels.default_onednn_on(env, machine='x86_64') and env == {}
  assert 'tensorflow' in sys.modules


def test_bfloat16_units_from_cpu_flags(tmp_path):
  assert cpu_kernels.has_bfloat16_units(frozenset({'avx2', 'fma'})) is False
  assert cpu_kernels.has_bfloat16_units(frozenset({'avx512f', 'avx512_bf16'})) is True
  assert cpu_kernels.has_bfloat16_units(frozenset({'amx_bf16'})) is True
  info = tmp_path / 'cpuinfo'
  info.write_text('processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n')
  assert cpu_kernels.cpu_flags(str(info)) == frozenset({'fpu', 'avx2', 'avx512_bf16'})
  assert cpu_kernels.cpu_flags(str(tmp_path / 'missing')) is None
