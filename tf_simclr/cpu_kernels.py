"""What this machine offers TensorFlow: oneDNN CPU kernels (on by default for tf-simclr on x86-64),
bfloat16 units, and whether an NVIDIA GPU driver is present.

TensorFlow turns its oneDNN CPU kernels on by default only on CPUs with AVX512-VNNI/BF16 or AMX;
on others (AVX2 servers and laptops) it keeps Eigen kernels, which ran this project's ResNet
pretraining steps 1.6-1.7x slower than oneDNN on its 2-core AVX2 CPU (benchmarks/README.md).
The switch is the TF_ENABLE_ONEDNN_OPTS environment variable, read when TensorFlow loads, so it
is set before the first `import tensorflow`; a value the user set is always kept.

This module must not import TensorFlow.
"""

import os
import platform
import shutil
import sys
from typing import MutableMapping, Optional

ENV = 'TF_ENABLE_ONEDNN_OPTS'
_X86 = ('x86_64', 'amd64', 'x64')


def default_onednn_on(environ: MutableMapping[str, str] = os.environ,
                      machine: Optional[str] = None) -> bool:
  """Sets TF_ENABLE_ONEDNN_OPTS=1 on x86-64 unless it is set already or TensorFlow is loaded
  (then it is too late to matter); returns whether it set it."""
  if ENV in environ or 'tensorflow' in sys.modules:
    return False
  if (machine or platform.machine()).lower() not in _X86:
    return False
  environ[ENV] = '1'
  return True


def onednn_enabled() -> Optional[bool]:
  """Whether the loaded TensorFlow uses oneDNN kernels (None if this build cannot tell)."""
  try:
    from tensorflow.python.util import _pywrap_util_port  # pylint: disable=g-import-not-at-top
    return bool(_pywrap_util_port.IsMklEnabled())
  except (ImportError, AttributeError):
    return None


def cpu_flags(path: str = '/proc/cpuinfo') -> Optional[frozenset]:
  """The ISA flags of the first CPU in /proc/cpuinfo (None where there is no such file)."""
  try:
    with open(path) as f:
      for line in f:
        if line.startswith('flags'):
          return frozenset(line.split(':', 1)[1].split())
  except OSError:
    pass
  return None


def has_bfloat16_units(flags: Optional[frozenset] = None) -> Optional[bool]:
  """Whether the CPU computes bfloat16 natively (avx512_bf16 or AMX); None if unknown."""
  flags = cpu_flags() if flags is None else flags
  if flags is None:
    return None
  return bool(flags & {'avx512_bf16', 'amx_bf16'})


# Signs of an NVIDIA GPU and its driver on this machine (besides nvidia-smi on the PATH).
_NVIDIA_PATHS = ('/proc/driver/nvidia', '/dev/nvidia0')


def nvidia_sign() -> Optional[str]:
  """A path showing an NVIDIA GPU on this machine (driver folder, device, nvidia-smi), or None."""
  for path in _NVIDIA_PATHS:
    if os.path.exists(path):
      return path
  return shutil.which('nvidia-smi')
