"""The pictures of docs/own_images.md: a photo-like folder, pretrained on, then inspected.

  python benchmarks/inspect_pictures.py [--work_dir=/tmp/tf_simclr_inspect] [--train_steps=400]

Renders shapes10-style images at 64 px (the built-in generator, data/synthetic.py, at twice its
size) into WORK/photos/, plants near-duplicates (a JPEG re-encode, a 1.5x resize and a mirror
image of three of them) and renders four more as WORK/queries/. Then runs the documented commands
(run.py processes): pretraining on images:WORK/photos, --mode=embed, --mode=neighbors,
--mode=duplicates, --mode=preview_augment; and copies the PNGs into docs/images/.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests import helpers  # noqa: E402  pylint: disable=wrong-import-position
from tf_simclr.data import synthetic  # noqa: E402  pylint: disable=wrong-import-position

NUM_PHOTOS = 400
PLANTED = (('dup_jpeg.jpg', 0, 'jpeg'), ('dup_resized.png', 1, 'resize'),
           ('dup_mirror.png', 2, 'flip'))


def render(num: int, seed: int, size: int = 64) -> np.ndarray:
  """shapes10 images at `size` px (the generator's module size, changed for this call)."""
  old = synthetic.IMAGE_SIZE
  synthetic.IMAGE_SIZE = size
  try:
    return synthetic.generate(num, seed)[0]
  finally:
    synthetic.IMAGE_SIZE = old


def make_folders(work: str) -> tuple:
  photos, queries = os.path.join(work, 'photos'), os.path.join(work, 'queries')
  for folder in (photos, queries):
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
  images = render(NUM_PHOTOS + 4, seed=7)
  for i, image in enumerate(images[:NUM_PHOTOS]):
    Image.fromarray(image).save(os.path.join(photos, f'photo{i:03d}.png'))
  helpers.save_planted_copies(photos, images, PLANTED, resize_to=96, quality=85)
  for i, image in enumerate(images[NUM_PHOTOS:]):
    Image.fromarray(image).save(os.path.join(queries, f'query{i}.png'))
  return photos, queries


def run_py(*flags):
  command = [sys.executable, os.path.join(ROOT, 'run.py'), *flags]
  print('$', ' '.join(command[1:]), flush=True)
  subprocess.run(command, cwd=ROOT, check=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--work_dir', default='/tmp/tf_simclr_inspect')
  parser.add_argument('--train_steps', type=int, default=400)
  parser.add_argument('--threshold', type=float, default=0.9993)
  args = parser.parse_args()
  photos, queries = make_folders(args.work_dir)
  model_dir = os.path.join(args.work_dir, 'run')
  shutil.rmtree(model_dir, ignore_errors=True)
  run_py(f'--dataset=images:{photos}', f'--model_dir={model_dir}', '--image_size=32',
         '--resnet_depth=18', '--width_multiplier=0.25', '--train_batch_size=64',
         f'--train_steps={args.train_steps}', '--optimizer=adam', '--learning_rate=0.016',
         '--warmup_epochs=1', '--temperature=0.1', '--color_jitter_strength=0.5',
         '--use_blur=False', '--steps_per_loop=50', '--seed=0')
  run_py('--mode=embed', f'--model_dir={model_dir}')
  run_py('--mode=neighbors', f'--model_dir={model_dir}', f'--query={queries}',
         '--num_neighbors=6')
  run_py('--mode=duplicates', f'--model_dir={model_dir}', f'--threshold={args.threshold}')
  # Split order is sorted file names (dup_* first): four colourful photos, photo026-029.
  run_py('--mode=preview_augment', f'--model_dir={model_dir}', '--num_preview_images=4',
         '--train_split=train[29:33]')
  out = os.path.join(ROOT, 'docs', 'images')
  os.makedirs(out, exist_ok=True)
  embed_dir = os.path.join(model_dir, 'embeddings', 'train')
  for source, name in ((os.path.join(embed_dir, 'neighbors.png'), 'neighbors.png'),
                       (os.path.join(embed_dir, 'duplicates.png'), 'duplicates.png'),
                       (os.path.join(model_dir, 'augment_preview.png'), 'augment_preview.png')):
    shutil.copy(source, os.path.join(out, name))
    print('copied', os.path.join(out, name))


if __name__ == '__main__':
  main()
