"""Quiet logs for the command line: TensorFlow's start-up noise and per-save/per-export lines.

On a machine without an NVIDIA driver, TensorFlow's C++ start-up (import and the first device
listing) prints CUDA lines that say nothing to a CPU user ("Could not find cuda drivers", "failed
call to cuInit"). They are written by C++ code straight to file descriptor 2, before any log level
applies, so `start_tensorflow` runs that start-up through native_stderr.filtered_stderr, which
writes back every other line. With a driver present nothing is filtered: a GPU's messages stay visible.

Python-side, TensorFlow logs through absl one line per checkpoint save ("Sharding callback
duration") and per export (the traced function's input names, the fingerprint file):
`install_log_filter` drops those.

This module must not import TensorFlow at import time.
"""

import logging
import re

from tf_simclr import cpu_kernels
from tf_simclr.native_stderr import filtered_stderr  # noqa: F401 (used here, patched by tests)

# C++ start-up lines that only say "no CUDA here" (and absl's banner that precedes them).
CUDA_NOISE = (
    re.compile(r'cudart_stub\.cc:\d+\] Could not find cuda drivers'),
    re.compile(r'cuda_platform\.cc:\d+\] failed call to cuInit'),
    re.compile(r'cuda_executor\.cc:\d+\].*(kernel driver does not appear|no NVIDIA GPU)'),
    re.compile(r'^WARNING: All log messages before absl::InitializeLog\(\) is called'),
    # Not CUDA, but start-up noise too: the run's own first line names the CPU kernels
    # ("TensorFlow CPU kernels: oneDNN (TF_ENABLE_ONEDNN_OPTS=1; ...)"), so TensorFlow's
    # notice, printed twice, adds nothing.
    re.compile(r'port\.cc:\d+\] oneDNN custom operations are on'),
)
# TensorFlow's Python log lines repeated at every checkpoint save or export.
TF_ROUTINE = (
    re.compile(r'^Sharding callback duration'),
    re.compile(r'^Function `\w+` contains input name\(s\)'),
    re.compile(r'^Writing fingerprint to '),
)


def start_tensorflow() -> None:
  """Imports TensorFlow and lists its devices (where CUDA is probed), without the CUDA lines
  when this machine has no NVIDIA driver."""
  if cpu_kernels.nvidia_sign() is not None:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.list_physical_devices()
    return
  with filtered_stderr(CUDA_NOISE):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.list_physical_devices()


class _DropRoutine(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(p.search(message) for p in TF_ROUTINE)


def install_log_filter() -> None:
  """Drops TensorFlow's per-save and per-export log lines (TF_ROUTINE) from the absl and
  tensorflow loggers."""
  for name in ('absl', 'tensorflow'):
    logging.getLogger(name).addFilter(_DropRoutine())
