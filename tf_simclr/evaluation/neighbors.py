"""--mode=neighbors --query=PATH: the images of a split closest to query images, by cosine
similarity of their embeddings (the split's features.npy, computed first if missing).

Writes neighbors.csv (query, rank, path, cosine similarity; rank 1 is the nearest) and
neighbors.png (one row per query: the query, then its --num_neighbors nearest with their
similarities) beside features.npy. Queries get the eval preprocessing the split got.

The search is exact: the bank is read in chunks of `CHUNK_ROWS` rows, each L2-normalised and
multiplied by the normalised queries (Q x CHUNK_ROWS similarities), and a running top-k is kept.
Cost: Q * N * D multiply-adds; memory: the bank itself (features.npy, N * D * 4 bytes, memory-
mapped) plus Q * CHUNK_ROWS floats, so a few million rows of 2048 features work on one machine.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from typing import List, Tuple

import numpy as np
import tensorflow as tf

from tf_simclr import run_dir
from tf_simclr.data import image_files, pipeline
from tf_simclr.errors import ConfigError
from tf_simclr.evaluation import embed, pictures

log = logging.getLogger(__name__)

CHUNK_ROWS = 65536
EPSILON = 1e-12  # Norm floor: an all-zero feature row has similarity 0 to everything.


def normalize(rows: np.ndarray) -> np.ndarray:
  """Rows scaled to unit L2 norm (float32)."""
  rows = np.asarray(rows, np.float32)
  return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), EPSILON)


def top_k(queries: np.ndarray, bank: np.ndarray, k: int,
          chunk_rows: int = CHUNK_ROWS) -> Tuple[np.ndarray, np.ndarray]:
  """(similarities (Q, k), bank rows (Q, k)) of each query's k nearest bank rows by cosine
  similarity, best first (ties: lower row first). k is capped at the bank's size."""
  k = min(k, len(bank))
  queries = normalize(queries)
  best_sim = np.full([len(queries), 0], -np.inf, np.float32)
  best_row = np.zeros([len(queries), 0], np.int64)
  for start in range(0, len(bank), chunk_rows):
    sims = queries @ normalize(bank[start:start + chunk_rows]).T
    rows = np.broadcast_to(np.arange(start, start + sims.shape[1]), sims.shape)
    sims = np.concatenate([best_sim, sims], axis=1)
    rows = np.concatenate([best_row, rows], axis=1)
    # Sort by similarity (descending), then row (ascending): deterministic ties.
    order = np.lexsort((rows, -sims), axis=1)[:, :k]
    best_sim = np.take_along_axis(sims, order, axis=1)
    best_row = np.take_along_axis(rows, order, axis=1)
  return best_sim, best_row


def query_paths(query: str) -> List[str]:
  """The query images: --query itself (an image file) or every image under it (a folder)."""
  if not query or not tf.io.gfile.exists(query):
    raise ConfigError(f'--query={query!r} does not exist: pass an image file or a folder of '
                      'images.')
  if not tf.io.gfile.isdir(query):
    if os.path.splitext(query)[1].lower() not in image_files.IMAGE_EXTENSIONS:
      raise ConfigError(f'--query={query!r} is not an image '
                        f'({", ".join(image_files.IMAGE_EXTENSIONS)}).')
    return [query]
  paths = image_files.list_images(query)[0]
  if not paths:
    raise ConfigError(f'--query={query!r}: no images (jpg, jpeg, png, bmp, gif) in that folder.')
  return list(paths)


def query_views(paths, data_config) -> np.ndarray:
  """float32 (Q, S, S, 3): each query image's eval view (as --mode=embed preprocesses)."""
  view_fn = pipeline.eval_view_fn(data_config)
  views = []
  for path in paths:
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    views.append(view_fn(image).numpy())
  return np.stack(views)


def embed_views(model, endpoint: str, views: np.ndarray, batch_size: int) -> np.ndarray:
  """Features (Q, D) of preprocessed images, in inference mode."""
  fn = embed.endpoint_fn(model, endpoint)
  return np.concatenate([fn(tf.constant(views[i:i + batch_size]), training=False).numpy()
                         for i in range(0, len(views), batch_size)])


def csv_text(queries, sims, rows, paths) -> str:
  """neighbors.csv: query, rank, path (the row number when the split has no files), cosine."""
  out = io.StringIO()
  writer = csv.writer(out, lineterminator='\n')
  writer.writerow(['query', 'rank', 'path', 'cosine_similarity'])
  for query, sim_row, row_row in zip(queries, sims, rows):
    for rank, (sim, row) in enumerate(zip(sim_row, row_row), start=1):
      writer.writerow([query, rank, paths[row] if paths else f'row {row}', f'{sim:.6f}'])
  return out.getvalue()


def run(ctx, model) -> str:
  """--mode=neighbors: writes neighbors.csv and neighbors.png; returns the csv's path."""
  config = ctx.config
  features, _, paths, directory = embed.load_or_embed(ctx, lambda: model)
  queries = query_paths(config.train.query)
  views = query_views(queries, config.data)
  query_features = embed_views(model, config.train.embed_endpoint, views,
                               config.train.eval_batch_size)
  if query_features.shape[1] != features.shape[1]:
    raise ConfigError(f'The queries have {query_features.shape[1]} features but {directory} '
                      f'holds {features.shape[1]}: it was embedded with another --embed_endpoint;'
                      ' pass that one, or rerun --mode=embed.')
  sims, rows = top_k(query_features, features, config.train.num_neighbors)
  csv_path = os.path.join(directory, run_dir.NEIGHBORS_CSV)
  with tf.io.gfile.GFile(csv_path, 'w') as f:
    f.write(csv_text(queries, sims, rows, paths))
  thumbs = pictures.eval_views(ctx.source, config.data, embed.split_of(config), rows.reshape(-1),
                               config.train.eval_batch_size).reshape(rows.shape + views.shape[1:])
  picture = pictures.grid(
      [[pictures.to_uint8(v)] + list(t) for v, t in zip(views, thumbs)],
      captions=[['query'] + [f'{s:.3f}' for s in sim_row] for sim_row in sims],
      row_titles=[os.path.basename(q) for q in queries])
  pictures.save_png(picture, os.path.join(directory, run_dir.NEIGHBORS_PNG))
  log.info('Nearest %d of %d rows for %d queries: %s and %s.', rows.shape[1], len(features),
           len(queries), csv_path, run_dir.NEIGHBORS_PNG)
  print(f'Wrote {csv_path} and {os.path.join(directory, run_dir.NEIGHBORS_PNG)}')
  return csv_path
