"""What the data modules share: the generated sets' names, `DatasetInfo`, and stream positions.

Kept apart from `acm_jax.data` (which re-exports them) so that its submodules can use them
without importing the package that imports them.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Iterator

import numpy as np

# the generated sets by name and task (acm_jax/data/synthetic.py): "synthetic" is the embedded default
SYNTHETIC = {"synthetic": "glyphs", "synthetic_shapes": "shapes"}


def is_synthetic(name: str) -> bool:
  return name in SYNTHETIC


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_classes: int
  image_size: int
  num_train: int
  num_test: int


def stream_indices(num_examples: int, start: int, count: int, seed: int, shuffle: bool) -> np.ndarray:
  """Example indices at stream positions [start, start + count): position p is the (p mod n)-th
  entry of epoch p // n, each epoch a fresh permutation drawn from (seed, epoch) when shuffling."""
  positions = np.arange(start, start + count, dtype=np.int64)
  epochs, offsets = np.divmod(positions, num_examples)
  if not shuffle:
    return offsets
  out = np.empty(count, np.int64)
  for epoch in np.unique(epochs):
    sel = epochs == epoch
    out[sel] = _permutation(num_examples, seed, int(epoch))[offsets[sel]]
  return out


@functools.lru_cache(maxsize=4)
def _permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_bounds(num_examples: int, batch_size: int, start_step: int, repeat: bool,
                 drop_remainder: bool) -> Iterator[tuple[int, int]]:
  """(first stream position, size) of each batch from `start_step` on."""
  steps = itertools.count(start_step)
  for step in steps:
    begin = step * batch_size
    if repeat:
      yield begin, batch_size
      continue
    size = min(batch_size, num_examples - begin)
    if size <= 0 or (drop_remainder and size < batch_size):
      return
    yield begin, size
