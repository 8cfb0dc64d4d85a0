"""MultiWorkerMirroredStrategy chosen from TF_CONFIG: two worker processes on 127.0.0.1."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import tensorflow as tf

from tf_simclr import weights

ROOT = __import__('conftest').PROJECT_ROOT


def _free_ports(n):
  sockets = [socket.socket() for _ in range(n)]
  for s in sockets:
    s.bind(('127.0.0.1', 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def test_two_workers_train_in_lockstep_and_end_with_identical_weights(tmp_path):
  workers = [f'127.0.0.1:{p}' for p in _free_ports(2)]
  model_dir = tmp_path / 'run'
  argv = [sys.executable, 'run.py', '--dataset=shapes10', '--eval_split=test',
          '--image_size=16', '--resnet_depth=18', '--num_proj_layers=2', '--proj_out_dim=16',
          '--train_batch_size=8', '--train_steps=2', '--checkpoint_steps=2',
          '--learning_rate=0.5', '--temperature=0.5', '--use_blur=True', '--mode=train',
          f'--model_dir={model_dir}']
  procs = []
  for index in range(2):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', TF_CONFIG=json.dumps(
        {'cluster': {'worker': workers}, 'task': {'type': 'worker', 'index': index}}))
    log = open(tmp_path / f'worker{index}.log', 'w')
    procs.append((subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT), log))
  for proc, log in procs:
    proc.wait(timeout=400)
    log.close()
  logs = [open(tmp_path / f'worker{i}.log').read() for i in range(2)]
  for i, (proc, _) in enumerate(procs):
    assert proc.returncode == 0, logs[i][-3000:]
  assert 'MultiWorkerMirroredStrategy, 2 replicas' in logs[0]
  chief = tf.train.latest_checkpoint(str(model_dir))
  other = tf.train.latest_checkpoint(str(model_dir / '.workers' / 'worker_1'))
  assert chief.endswith('ckpt-2') and other.endswith('ckpt-2')
  values = []
  for path in (chief, other):
    reader = tf.train.load_checkpoint(path)
    paths = weights.source.variable_paths(reader, root_child='model')
    values.append({p: reader.get_tensor(k) for p, k in paths.items()})
  assert values[0].keys() == values[1].keys() and len(values[0]) > 50
  initial_kernel_changed = False
  for path, value in values[0].items():
    np.testing.assert_array_equal(values[1][path], value, err_msg=path)
    initial_kernel_changed |= path.endswith('moving_mean') and np.any(value != 0)
  assert initial_kernel_changed  # they trained (BN statistics moved), identically
  # Only the chief writes the shared outputs.
  assert (model_dir / 'flags.json').exists()
  assert not (model_dir / '.workers' / 'worker_1' / 'flags.json').exists()
