"""--mode=duplicates: groups of near-duplicate images of a split, from its embeddings.

Two images are linked when the cosine similarity of their embeddings is >= --threshold;
a group is a connected component of these links (so A~B and B~C group A, B, C even if A and C
are further apart). Writes duplicates.csv (group, size, path, similarity to the group's first
image; groups largest first) and duplicates.png (the largest groups, one row each) beside
features.npy, computing the embeddings first if --mode=embed has not.

Exact all-pairs search in chunks of rows: N^2 * D / 2 multiply-adds (100 000 rows of 512 features:
~2.6e12, minutes on a CPU) and `BLOCK_ELEMENTS` similarities (64 MB) in memory at a time, besides
the bank (N * D * 4 bytes).
"""

from __future__ import annotations

import csv
import io
import logging
import os
from typing import List

import numpy as np
import tensorflow as tf

from tf_simclr import run_dir
from tf_simclr.evaluation import embed, neighbors, pictures

log = logging.getLogger(__name__)

BLOCK_ELEMENTS = 1 << 24
MAX_GROUPS_SHOWN = 8
MAX_GROUP_SHOWN = 8  # images per row of duplicates.png


def similar_pairs(features: np.ndarray, threshold: float,
                  block_elements: int = BLOCK_ELEMENTS) -> np.ndarray:
  """int64 (P, 2) pairs (i < j) of rows with cosine similarity >= threshold."""
  n = len(features)
  chunk = max(1, block_elements // max(n, 1))
  pairs = []
  for start in range(0, n, chunk):
    block = neighbors.normalize(features[start:start + chunk])
    sims = block @ neighbors.normalize(features[start:]).T  # only j >= start: each pair once
    i, j = np.nonzero(sims >= threshold)
    keep = j + start > i + start
    pairs.append(np.stack([i[keep] + start, j[keep] + start], axis=1))
  return np.concatenate(pairs) if pairs else np.zeros([0, 2], np.int64)


def components(n: int, pairs: np.ndarray) -> List[List[int]]:
  """Connected components of size >= 2 of the graph on n rows with edges `pairs`, each sorted,
  largest first (ties: lowest first row)."""
  parent = np.arange(n)

  def root(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i
  for a, b in pairs:
    ra, rb = root(a), root(b)
    if ra != rb:
      parent[max(ra, rb)] = min(ra, rb)
  groups = {}
  for i in np.unique(pairs):
    groups.setdefault(root(i), []).append(int(i))
  return sorted((sorted(g) for g in groups.values()), key=lambda g: (-len(g), g[0]))


def csv_text(groups, features, paths) -> str:
  out = io.StringIO()
  writer = csv.writer(out, lineterminator='\n')
  writer.writerow(['group', 'size', 'path', 'cosine_similarity_to_first'])
  for number, group in enumerate(groups, start=1):
    sims = neighbors.normalize(features[group]) @ neighbors.normalize(features[group[:1]])[0]
    for row, sim in zip(group, sims):
      writer.writerow([number, len(group), paths[row] if paths else f'row {row}', f'{sim:.6f}'])
  return out.getvalue()


def run(ctx, model_fn) -> str:
  """--mode=duplicates: writes duplicates.csv and duplicates.png; returns the csv's path."""
  config = ctx.config
  threshold = config.train.duplicate_threshold
  features, _, paths, directory = embed.load_or_embed(ctx, model_fn)
  groups = components(len(features), similar_pairs(features, threshold))
  csv_path = os.path.join(directory, run_dir.DUPLICATES_CSV)
  with tf.io.gfile.GFile(csv_path, 'w') as f:
    f.write(csv_text(groups, features, paths))
  shown = [g[:MAX_GROUP_SHOWN] for g in groups[:MAX_GROUPS_SHOWN]]
  png_path = os.path.join(directory, run_dir.DUPLICATES_PNG)
  if shown:
    views = pictures.eval_views(ctx.source, config.data, embed.split_of(config),
                                [i for g in shown for i in g], config.train.eval_batch_size)
    rows, captions, offset = [], [], 0
    for group in shown:
      rows.append(list(views[offset:offset + len(group)]))
      offset += len(group)
      captions.append([os.path.basename(paths[i]) if paths else f'row {i}' for i in group])
    titles = [f'group {n + 1}: {len(g)} images' for n, g in enumerate(groups[:len(shown)])]
    pictures.save_png(pictures.grid(rows, captions=captions, row_titles=titles), png_path)
  elif tf.io.gfile.exists(png_path):
    tf.io.gfile.remove(png_path)  # Not a stale picture of another threshold.
  in_groups = sum(len(g) for g in groups)
  log.info('%d group(s) of near-duplicates (cosine >= %g) holding %d of %d images: %s.',
           len(groups), threshold, in_groups, len(features), csv_path)
  print(f'{len(groups)} group(s) of near-duplicates (cosine >= {threshold:g}), {in_groups} '
        f'images: {csv_path}' + (f' and {png_path}' if shown else ''))
  return csv_path
