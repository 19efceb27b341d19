"""The training loop's background batch producer (`acm_jax.train.prefetch`) against the plain
iterator: same items in the same order, runs ahead by at most its depth, raises the source's
errors where the plain iterator would, and stops and closes its source when closed."""

import threading
import time

import numpy as np
import pytest

from acm_jax.train.prefetch import Prefetch


def test_items_and_order_equal_the_source():
  rng = np.random.default_rng(0)
  items = [rng.normal(size=(3, 4)) for _ in range(25)]
  got = list(Prefetch(iter(items), depth=3))
  assert len(got) == len(items)
  for a, b in zip(got, items):
    np.testing.assert_array_equal(a, b)


def test_runs_ahead_by_its_depth_and_no_further():
  produced = []

  def source():
    for i in range(20):
      produced.append(i)
      yield i

  with Prefetch(source(), depth=2) as stream:
    assert next(stream) == 0
    deadline = time.time() + 10  # the producer fills the queue, then waits (polled: CI machines are loaded)
    while len(produced) < 4 and time.time() < deadline:
      time.sleep(0.01)
    time.sleep(0.2)  # room for a wrong fifth item to appear
    # item 0 consumed, items 1 and 2 queued, item 3 produced and waiting for room
    assert produced == [0, 1, 2, 3]
    assert [next(stream) for _ in range(3)] == [1, 2, 3]


def test_the_source_error_is_raised_at_its_place():
  def source():
    yield 1
    yield 2
    raise OSError("truncated chunk 7")

  stream = Prefetch(source())
  assert next(stream) == 1
  assert next(stream) == 2
  with pytest.raises(OSError, match="truncated chunk 7"):
    next(stream)
  with pytest.raises(StopIteration):
    next(stream)


def test_close_stops_the_thread_and_closes_the_source_in_the_callers_thread():
  closed_in = []

  def source():
    try:
      i = 0
      while True:  # endless, as the training stream with repeat
        yield i
        i += 1
    finally:
      closed_in.append(threading.current_thread().name)

  stream = Prefetch(source(), depth=2)
  assert [next(stream) for _ in range(5)] == [0, 1, 2, 3, 4]
  stream.close()
  assert not stream._thread.is_alive()
  assert closed_in == [threading.current_thread().name]
  with pytest.raises(StopIteration):
    next(stream)


def test_end_of_source_and_bad_depth():
  assert list(Prefetch(iter([]))) == []
  with pytest.raises(ValueError, match="prefetch depth must be >= 1, got 0"):
    Prefetch(iter([1]), depth=0)
