"""Filters for what C/C++ code writes straight to file descriptor 2, where no Python log level
applies: TensorFlow's start-up CUDA lines (cli/quiet.py) and the JPEG decoder's complaints about
damaged files (data/datasets.py folds them into the one bad-image message).

This module must not import TensorFlow at import time.
"""

import contextlib
import os
import re
import sys
import tempfile
import threading
from typing import Iterable, List, Pattern

# What libjpeg and TensorFlow's JPEG decoder print about a damaged or mislabelled file.
JPEG_NOISE = (
    re.compile(r'^Corrupt JPEG data: '),
    re.compile(r'^Premature end of JPEG file'),
    re.compile(r'^(Not a JPEG file|Invalid JPEG file structure|Input file read error)'),
    re.compile(r'^(Unsupported marker type|Improper call to JPEG library)'),
    re.compile(r'jpeg_mem\.cc:\d+\] '),
    re.compile(r'local_rendezvous\.cc:\d+\] Local rendezvous is aborting with status: '
               r'INVALID_ARGUMENT: (jpeg::Uncompress failed|Input is empty|Unknown image file '
               r'format|Trying to decode)'),
)


def _dropped(line: str, noise) -> bool:
  return any(p.search(line) for p in noise)


@contextlib.contextmanager
def filtered_stderr(noise: Iterable[Pattern]):
  """Runs the block with file descriptor 2 in a temporary file, then writes its lines back to
  stderr, except those matching a pattern of `noise`. For short blocks (start-up)."""
  noise = tuple(noise)
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      kept = [line for line in captured.read().decode('utf-8', 'replace').splitlines(True)
              if not _dropped(line, noise)]
      if kept:
        os.write(2, ''.join(kept).encode('utf-8'))


@contextlib.contextmanager
def streamed_stderr(noise: Iterable[Pattern]):
  """Like `filtered_stderr`, but passes every other line on as it is written, so a long block
  (training) keeps its progress logs live. Yields the list the dropped lines are appended to.

  Python's own writes to sys.stderr go through the same pipe, so their order with C++ lines is
  kept. The thread that forwards lines stops after the block; a hard crash inside the block can
  lose the last line or two still in the pipe.
  """
  noise = tuple(noise)
  dropped: List[str] = []
  sys.stderr.flush()
  saved = os.dup(2)
  read_end, write_end = os.pipe()
  os.dup2(write_end, 2)
  os.close(write_end)

  def forward():
    with os.fdopen(read_end, 'rb') as pipe:
      for raw in pipe:
        line = raw.decode('utf-8', 'replace')
        if _dropped(line, noise):
          dropped.append(line.rstrip('\n'))
        else:
          os.write(saved, raw)

  thread = threading.Thread(target=forward, name='stderr-filter', daemon=True)
  thread.start()
  try:
    yield dropped
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)  # closes the pipe's last write end: the thread reads to its end and stops
    thread.join(timeout=10)
    os.close(saved)
