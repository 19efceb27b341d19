"""The generated sets streamed: each batch built on demand from the chunks that hold it.

A set is a sequence of chunks (`synthetic.generate_chunk`), each a pure function
of (config, split, chunk index). The stream order is chunk-local: epoch e visits
the chunks in a permutation drawn from (seed, e) and each chunk's examples in a
permutation drawn from (seed, e, chunk); without shuffling, examples come in
their order. Position p of the stream is thus found without touching any other
chunk, and a batch needs at most two chunks (batch size <= chunk size).

A pool of worker processes generates the next `workers` chunks ahead of the
consumer (default: half the cores, two on two or three cores, `default_workers`).
Processes, not threads: the generator's many small numpy operations hold the GIL,
and 8 threads on a 16-core host gave 517 images/s at 224 px, what 2 cores give.
The workers are spawned, never forked (the parent runs JAX's threads), import
numpy and `synthetic` only (not the parent's `__main__`, which would bring JAX
into each of them), generate with BLAS on one thread, send back only the arrays a
batch uses, and end with the stream (closed, garbage-collected, interrupted by
Ctrl-C) or with the parent (killed outright). Where no process can be started (a
sandbox), threads generate instead, with a warning.

Host memory: about `workers` + 2 chunks in the parent plus one chunk's working
set per worker, whatever the set's size. The examples are those
`synthetic.generate` holds for the same config, bit for bit; only their order
differs from the in-memory path's global shuffle, which is why the sets small
enough to hold keep that path.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing.connection
import multiprocessing.context
import os
import signal
import sys
import threading
import warnings
from typing import Iterator

import numpy as np

from acm_jax.data import synthetic

STREAM_SALT = 20261203
MAX_WORKERS = 32
WAIT_SLICE_S = 0.5  # the longest the consumer waits for a chunk without returning to the interpreter's loop


def default_workers() -> int:
  """Half the cores this process may run on, but two on two or three cores: 1..MAX_WORKERS.

  Measured at 224 px on the 16-core H200 host (2026-12-02, `benchmarks.synthetic_stream_bench`,
  the affinity set with taskset): 4 workers 2,187 images/s, 8 workers 3,357, 15 workers 2,747.
  Past half the cores the workers crowd out the consumer (the training loop, which receives
  and unpickles every chunk and normalises the batch). On the 2-core VM two workers beat one
  (294-334 images/s at 224 px against 155-174): the consumer mostly waits there."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
  return min(MAX_WORKERS, max(min(2, cores), cores // 2))


def generate(config: synthetic.SyntheticConfig, split: str, index: int,
             keys: tuple[str, ...] | None) -> dict[str, np.ndarray]:
  """Chunk `index` of `split`, only the arrays `keys` (None: all); what a worker runs."""
  arrays = synthetic.generate_chunk(config, split, index)
  return arrays if keys is None else {key: arrays[key] for key in keys}


def _start_worker() -> None:
  """Ctrl-C ignored (a terminal sends it to the whole process group; the parent's interrupt closes the
  pool, and the workers finish their chunk and leave), BLAS on one thread for the worker's life
  (generate_chunk also asks, per chunk), and an exit as soon as the parent is gone: a parent killed
  outright never sends the pool's stop, and its workers would wait for work forever."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  if synthetic.threadpoolctl is not None:
    synthetic.threadpoolctl.threadpool_limits(limits=1, user_api="blas")
  parent = multiprocessing.parent_process()
  threading.Thread(target=_exit_with_parent, args=(parent.sentinel,), daemon=True).start()


def _exit_with_parent(sentinel: int) -> None:
  multiprocessing.connection.wait([sentinel])
  os._exit(1)


_main_lock = threading.Lock()


@contextlib.contextmanager
def _main_module_hidden():
  """multiprocessing's spawn re-imports the parent's __main__ in each child, found by its __spec__ or
  __file__; hidden while a worker starts, the workers import only what unpickling their task needs
  (under `python -m experiments.vit_imagenet` the main module costs 3.3 s and 200 MB of JAX per worker)."""
  main = sys.modules["__main__"]
  with _main_lock:
    spec, file = main.__spec__, main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
      yield
    finally:
      main.__spec__ = spec
      if file is not None:
        main.__file__ = file


class _WorkerProcess(multiprocessing.context.SpawnProcess):
  @staticmethod
  def _Popen(process_obj):
    with _main_module_hidden():
      return multiprocessing.context.SpawnProcess._Popen(process_obj)


class _SpawnContext(multiprocessing.context.SpawnContext):
  Process = _WorkerProcess


def start_pool(workers: int) -> concurrent.futures.Executor:
  """A pool of `workers` spawned processes, launched here and one of them answering (a sandbox that
  forbids processes fails now, not mid-epoch); of threads, with a warning, where they cannot start."""
  pool = None
  try:
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=_SpawnContext(), initializer=_start_worker)
    for started in [pool.submit(int) for _ in range(workers)]:
      started.result()
    return pool
  except (OSError, concurrent.futures.process.BrokenProcessPool) as error:
    if pool is not None:
      pool.shutdown(wait=False, cancel_futures=True)
    warnings.warn(f"synthetic stream: worker processes could not start ({error!r}); generating in {workers} "
                  "threads instead, several times slower on many cores", RuntimeWarning)
    return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="synthetic")


class ChunkStream:
  """Locates stream positions in chunks and serves chunks, generated ahead by a pool of workers."""

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
    self.workers = workers or default_workers()
    self._pool = start_pool(self.workers)
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
      self._futures[index] = self._submit(index)
    future = self._futures[index]
    while True:  # in slices: Python runs a signal's handler in the main thread only, between bytecodes, and a
      try:       # Ctrl-C that the kernel hands to one of the pool's threads would not end an unbounded wait here
        return future.result(timeout=WAIT_SLICE_S)
      except concurrent.futures.TimeoutError:
        continue

  def _submit(self, index: int) -> concurrent.futures.Future:
    return self._pool.submit(generate, self.config, self.split, index, self.keys)

  def prefetch(self, keep: list[int]) -> None:
    """Starts generating `keep` and forgets every other chunk."""
    for index in list(self._futures):
      if index not in keep:
        self._futures.pop(index).cancel()
    for index in keep:
      if index not in self._futures:
        self._futures[index] = self._submit(index)

  def close(self, wait: bool = True) -> None:
    """Cancels the chunks not started and waits for the workers to finish theirs and exit; without `wait` (an
    interrupt, which must end the program now whatever state the pool's queues were caught in) stops the
    worker processes at once instead."""
    processes = list((getattr(self._pool, "_processes", None) or {}).values())  # gone after shutdown
    results = getattr(self._pool, "_result_queue", None)  # as well
    self._pool.shutdown(wait=wait, cancel_futures=True)
    if not wait:
      for process in processes:
        process.terminate()
      for process in processes:
        process.join(timeout=5)
      _end_partial_results(results)


def _end_partial_results(results) -> None:
  """A worker stopped while it sent a chunk leaves part of a message in the process pool's results pipe
  (`results`, its queue; None for threads). The pool's manager thread, which the interpreter joins at exit, then
  waits for the rest forever: the parent holds a write end of that pipe too, so no end of file comes when the
  workers die (seen once in a CI run: the interrupted program outlived its Ctrl-C). Closing the parent's write
  end once the workers are gone ends that read; the manager takes the error for a broken pool and exits."""
  writer = getattr(results, "_writer", None)
  if writer is not None and not writer.closed:
    writer.close()


def iterate(config: synthetic.SyntheticConfig, split: str, bounds: Iterator[tuple[int, int]], seed: int,
            shuffle: bool, with_masks: bool, workers: int | None = None) -> Iterator[dict]:
  """(first position, uint8 batch {"image", "label"(, "object_mask")}) for the (first position, size)
  pairs of `bounds`."""
  keys = ("image", "label", "object_mask") if with_masks else ("image", "label")
  stream = ChunkStream(config, split, seed, shuffle, workers, keys)
  interrupted = False
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
  except KeyboardInterrupt:
    interrupted = True
    raise
  finally:
    stream.close(wait=not interrupted)
