"""One `run.py` subprocess for a benchmark arm: the command printed, its log in model_dir/run.log,
the log's tail in the error when it fails. Shared by the benchmarks that run the command line."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(name: str, model_dir: str, argv: list, python: str = sys.executable) -> float:
  """Runs `python run.py argv --model_dir=model_dir`; returns its wall seconds.

  Raises SystemExit with the log's last lines when it exits with another status than 0.
  """
  os.makedirs(model_dir, exist_ok=True)
  command = [python, os.path.join(ROOT, 'run.py'), *argv, f'--model_dir={model_dir}']
  log_path = os.path.join(model_dir, 'run.log')
  print(f'[{name}] {" ".join(shlex.quote(c) for c in command[1:])}\n[{name}] log: {log_path}',
        flush=True)
  start = time.time()
  with open(log_path, 'w') as log:
    code = subprocess.call(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  seconds = time.time() - start
  if code:
    with open(log_path) as f:
      tail = ''.join(f.readlines()[-25:])
    raise SystemExit(f'[{name}] run.py exited with {code}; last lines of {log_path}:\n{tail}')
  print(f'[{name}] done in {seconds / 60:.1f} min', flush=True)
  return seconds
