"""The generated sets streamed: each batch built on demand from the chunks that hold it.

A set is a sequence of chunks (`synthetic.generate_chunk`), each a pure function
of (config, split, chunk index). The stream order is chunk-local: epoch e visits
the chunks in a permutation drawn from (seed, e) and each chunk's examples in a
permutation drawn from (seed, e, chunk); without shuffling, examples come in
their order. Position p of the stream is thus found without touching any other
chunk, a batch needs at most two chunks (batch size <= chunk size), and a pool of
threads generates the next `workers` chunks ahead of the consumer (numpy releases
the GIL in its array work). Host memory: about `workers` + 2 chunks, whatever the
set's size. The examples are those `synthetic.generate` holds for the same config,
bit for bit; only their order differs from the in-memory path's global shuffle,
which is why the sets small enough to hold keep that path.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Iterator

import numpy as np

from acm_jax.data import synthetic

STREAM_SALT = 20261203


class ChunkStream:
  """Locates stream positions in chunks and serves chunks, generated ahead by a thread pool."""

  def __init__(self, config: synthetic.SyntheticConfig, split: str, seed: int, shuffle: bool,
               workers: int | None = None, keys: tuple[str, ...] | None = None):
    """keys: the arrays of each chunk to keep (default: all); the others are dropped as soon as a
    chunk is generated (without the two masks, a chunk of 1,000 images at 224 px holds 150 MB, not 250)."""
    self.config, self.split, self.seed, self.shuffle, self.keys = config, split, seed, shuffle, keys
    self.num_examples = synthetic.split_size(config, split)
    self.num_chunks = synthetic.num_chunks(config, split)
    sizes = np.full(self.num_chunks, config.chunk_size)
    sizes[-1] = self.num_examples - config.chunk_size * (self.num_chunks - 1)
    self.sizes = sizes
    self.workers = workers or min(8, os.cpu_count() or 1)
    self._pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="synthetic")
    self._futures: dict[int, concurrent.futures.Future] = {}
    self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}

  def chunk_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(chunk ids in visiting order, the stream offset within the epoch where each ends)."""
    if epoch not in self._orders:
      order = np.arange(self.num_chunks)
      if self.shuffle:
        order = np.random.default_rng([self.seed, STREAM_SALT, epoch]).permutation(self.num_chunks)
      self._orders = {e: v for e, v in self._orders.items() if e == epoch - 1}  # the current two epochs
      self._orders[epoch] = order, np.cumsum(self.sizes[order])
    return self._orders[epoch]

  def local_order(self, epoch: int, chunk: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self.sizes[chunk])
    return np.random.default_rng([self.seed, STREAM_SALT, epoch, chunk]).permutation(self.sizes[chunk])

  def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(chunk, index within the chunk) of each stream position."""
    epochs, offsets = np.divmod(np.asarray(positions, np.int64), self.num_examples)
    chunks, local = np.empty_like(offsets), np.empty_like(offsets)
    for epoch in np.unique(epochs).tolist():
      sel = np.flatnonzero(epochs == epoch)
      order, ends = self.chunk_order(epoch)
      slot = np.searchsorted(ends, offsets[sel], side="right")
      chunks[sel] = order[slot]
      ordinal = offsets[sel] - (ends[slot] - self.sizes[order[slot]])
      for chunk in np.unique(order[slot]).tolist():
        here = order[slot] == chunk
        local[sel[here]] = self.local_order(epoch, chunk)[ordinal[here]]
    return chunks, local

  def upcoming(self, position: int, count: int) -> list[int]:
    """The ids of the next `count` distinct chunks visited from stream `position` on."""
    epoch, offset = divmod(position, self.num_examples)
    out: dict[int, None] = {}
    for e in range(epoch, epoch + 2):
      order, ends = self.chunk_order(e)
      for chunk in order[np.searchsorted(ends, offset if e == epoch else 0, side="right"):].tolist():
        out.setdefault(chunk)
        if len(out) == count:
          return list(out)
    return list(out)

  def chunk(self, index: int) -> dict[str, np.ndarray]:
    if index not in self._futures:
      self._futures[index] = self._pool.submit(self._generate, index)
    return self._futures[index].result()

  def _generate(self, index: int) -> dict[str, np.ndarray]:
    arrays = synthetic.generate_chunk(self.config, self.split, index)
    return arrays if self.keys is None else {key: arrays[key] for key in self.keys}

  def prefetch(self, keep: list[int]) -> None:
    """Starts generating `keep` and forgets every other chunk."""
    for index in list(self._futures):
      if index not in keep:
        self._futures.pop(index).cancel()
    for index in keep:
      if index not in self._futures:
        self._futures[index] = self._pool.submit(self._generate, index)

  def close(self) -> None:
    self._pool.shutdown(wait=False, cancel_futures=True)


def iterate(config: synthetic.SyntheticConfig, split: str, bounds: Iterator[tuple[int, int]], seed: int,
            shuffle: bool, with_masks: bool, workers: int | None = None) -> Iterator[dict]:
  """(first position, uint8 batch {"image", "label"(, "object_mask")}) for the (first position, size)
  pairs of `bounds`."""
  keys = ("image", "label", "object_mask") if with_masks else ("image", "label")
  stream = ChunkStream(config, split, seed, shuffle, workers, keys)
  try:
    for begin, size in bounds:
      chunks, local = stream.locate(np.arange(begin, begin + size))
      needed = list(dict.fromkeys(int(c) for c in chunks))
      stream.prefetch(needed + [c for c in stream.upcoming(begin + size, stream.workers) if c not in needed])
      first = stream.chunk(needed[0])
      batch = {key: np.empty((size,) + first[key].shape[1:], first[key].dtype) for key in keys}
      for chunk in needed:
        sel = chunks == chunk
        arrays = stream.chunk(chunk)
        for key in keys:
          batch[key][sel] = arrays[key][local[sel]]
      yield begin, batch
  finally:
    stream.close()
