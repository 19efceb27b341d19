"""Host batches prepared ahead of the training loop, in a background thread.

The loop dispatches a step and returns at once (JAX runs it asynchronously), then asks
for the next batch. Without a producer ahead of it, assembling that batch (gathering
the examples, the uint8 -> float32 conversion: about 77 MB per 128 images at 224 px)
runs while the GPU may already be idle. `Prefetch` moves that work to a thread, a few
batches ahead; numpy releases the GIL in it. The batches and their order are the
source's, so resuming from a step count stays exact.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


class Prefetch(Iterator[T]):
  """Iterates `source` in a daemon thread, at most `depth` items ahead of the consumer.

  An exception of the source is raised by the `next` that would have returned its item.
  `close()` (also on garbage collection, and on leaving a `with` block) stops the thread
  and then closes the source, so a generator's `finally` (e.g. a worker pool's shutdown)
  runs in the consumer's thread."""

  def __init__(self, source: Iterator[T], depth: int = 2):
    if depth < 1:
      raise ValueError(f"prefetch depth must be >= 1, got {depth}")
    self._source = source
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._produce, name="acm_jax-prefetch", daemon=True)
    self._finished = False
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _produce(self) -> None:
    try:
      for item in self._source:
        if not self._put((item, None)):
          return
    except BaseException as err:  # handed to the consumer, raised there
      self._put((None, err))
      return
    self._put((_DONE, None))

  def __iter__(self) -> "Prefetch[T]":
    return self

  def __next__(self) -> T:
    if self._finished:
      raise StopIteration
    item, err = self._queue.get()
    if err is not None:
      self._finished = True
      raise err
    if item is _DONE:
      self._finished = True
      raise StopIteration
    return item

  def close(self) -> None:
    self._stop.set()
    while self._thread.is_alive():  # drain, so that a producer blocked on a full queue sees the stop
      try:
        self._queue.get(timeout=0.05)
      except queue.Empty:
        pass
    self._finished = True
    close = getattr(self._source, "close", None)
    if close is not None:
      close()

  def __enter__(self) -> "Prefetch[T]":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self) -> None:
    if hasattr(self, "_thread"):
      self.close()


def prefetch(source: Iterator[T], depth: int = 2) -> Prefetch[T]:
  """`source`'s items, produced up to `depth` ahead in a background thread (`Prefetch`)."""
  return Prefetch(source, depth)
