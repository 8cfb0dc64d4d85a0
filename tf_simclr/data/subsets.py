"""Seeded, class-balanced subsets of a labelled split: every "pick examples per class" rule.

`select_label_subset`: the --train_label_fraction subset (round(fraction * count) of each class);
`select_bank`: the readouts' capped train bank (classes take turns); `holdout_split`: the linear
probe's held-out part for choosing its penalty. Each is deterministic for (labels, size, seed);
their generators differ as before, so the subsets chosen are the same as in earlier versions.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from tf_simclr import config as config_lib


def select_label_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """Sorted example indices keeping round(fraction * count) of every class (at least 1).

  Deterministic for a given (labels, fraction, seed); round half up. fraction 1 keeps all.
  """
  config_lib.check_label_fraction(fraction)
  labels = np.asarray(labels)
  rng = np.random.Generator(np.random.PCG64(seed))
  chosen = []
  for cls in np.unique(labels):
    members = np.flatnonzero(labels == cls)
    keep = min(len(members), max(1, int(np.floor(fraction * len(members) + 0.5))))
    chosen.append(rng.permutation(members)[:keep])
  return np.sort(np.concatenate(chosen or [np.zeros([0], np.int64)])).astype(np.int64)


def select_bank(labels: np.ndarray, max_size: int, seed: int) -> np.ndarray:
  """Sorted indices of at most `max_size` examples, class-balanced and seeded.

  Classes take turns (in a seeded order), each giving its next seeded-random example, until
  `max_size` are chosen; so class counts differ by at most one unless a class runs out.
  """
  labels = np.asarray(labels).reshape([-1])
  if max_size <= 0 or max_size >= len(labels):
    return np.arange(len(labels))
  rng = np.random.default_rng(seed)
  classes = rng.permutation(np.unique(labels))
  rank = np.empty(len(labels), np.int64)
  class_position = np.empty(len(labels), np.int64)
  for position, c in enumerate(classes):
    members = np.flatnonzero(labels == c)
    rank[rng.permutation(members)] = np.arange(len(members))
    class_position[members] = position
  order = np.lexsort((class_position, rank))  # By rank within class, then class order.
  return np.sort(order[:max_size])


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
  """(fit indices, held-out indices): a seeded `fraction` of each class is held out."""
  labels = np.asarray(labels).reshape([-1])
  rng = np.random.default_rng(seed)
  held = []
  for c in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == c))
    held.append(members[:int(round(fraction * len(members)))])
  held = np.sort(np.concatenate(held))
  mask = np.ones(len(labels), bool)
  mask[held] = False
  return np.flatnonzero(mask), held
