"""notebooks/quickstart.ipynb runs from top to bottom (at tiny sizes: its parameter cell is
replaced), so it never rots; its saved outputs are from its real settings."""

import os
import pathlib

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / 'notebooks' / 'quickstart.ipynb'
TINY = """TRAIN_EXAMPLES = 64
TEST_EXAMPLES = 32
EPOCHS = 1
BATCH_SIZE = 16
FINETUNE_EPOCHS = 1
WIDTH_MULTIPLIER = 0.125"""


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  parameters = [c for c in notebook.cells if 'parameters' in c.metadata.get('tags', [])]
  assert len(parameters) == 1
  names = {line.split('=')[0].strip() for line in parameters[0].source.splitlines()
           if '=' in line and not line.startswith('#')}
  assert names == {line.split('=')[0].strip() for line in TINY.splitlines()}
  parameters[0].source = TINY
  env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL='2')
  client = nbclient.NotebookClient(notebook, timeout=300, kernel_name='python3',
                                   resources={'metadata': {'path': str(tmp_path)}})
  old = dict(os.environ)
  os.environ.update(env)  # the kernel inherits this process's environment
  try:
    client.execute()
  finally:
    os.environ.clear()
    os.environ.update(old)
  text = '\n'.join(o.get('text', '') for c in notebook.cells if c.cell_type == 'code'
                   for o in c.get('outputs', []))
  assert 'reloaded outputs identical: True' in text
  assert 'linear probe' in text and 'fine-tuned on' in text
  images = [o for c in notebook.cells for o in c.get('outputs', [])
            if 'image/png' in o.get('data', {})]
  assert len(images) == 2  # the PCA map and the neighbour grid
