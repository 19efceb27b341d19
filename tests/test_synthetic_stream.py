"""The streamed generated sets: the same examples as the whole-set generator, exact resume, bounded chunks."""

import hashlib

import numpy as np
import pytest

from acm_jax import data
from acm_jax.data import synthetic, synthetic_stream

CONFIG = synthetic.SyntheticConfig(image_size=16, num_train=150, num_test=70, chunk_size=32)


def test_chunks_equal_the_seed_tree_of_the_whole_set_generator():
  """generate_chunk derives each chunk's seed directly; the generator before streaming spawned them."""
  root = np.random.SeedSequence([CONFIG.seed, 20261124]).spawn(2)
  for split, child in zip(("train", "test"), root):
    seeds = child.spawn(synthetic.num_chunks(CONFIG, split))
    for index in (0, synthetic.num_chunks(CONFIG, split) - 1):
      count = min(32, synthetic.split_size(CONFIG, split) - 32 * index)
      expect = synthetic._generate_chunk(CONFIG, seeds[index], count)
      got = synthetic.generate_chunk(CONFIG, split, index)
      for key in expect:
        np.testing.assert_array_equal(got[key], expect[key])


def stream(split, batch_size, start_step, shuffle, repeat, workers=2):
  n = synthetic.split_size(CONFIG, split)
  bounds = data.batch_bounds(n, batch_size, start_step, repeat, drop_remainder=False)
  batches = synthetic_stream.iterate(CONFIG, split, bounds, seed=3, shuffle=shuffle, with_masks=True, workers=workers)
  return (batch for _, batch in batches)


def test_stream_serves_the_whole_set_generator_examples_bit_for_bit():
  whole = synthetic._generate(CONFIG)
  ordered = list(stream("test", 16, 0, shuffle=False, repeat=False))
  for key in ("image", "label", "object_mask"):
    np.testing.assert_array_equal(np.concatenate([b[key] for b in ordered]), whole["test"][key])
  # shuffled: three epochs of train, each a permutation of the set, different orders
  train = whole["train"]
  flat = train["image"].reshape(150, -1)
  lookup = {row.tobytes(): i for i, row in enumerate(flat)}
  seen = []
  for _, b in zip(range(9), stream("train", 50, 0, shuffle=True, repeat=True)):
    idx = [lookup[row.tobytes()] for row in b["image"].reshape(len(b["image"]), -1)]
    np.testing.assert_array_equal(b["label"], train["label"][idx])
    seen += idx
  epochs = np.reshape(seen, (3, 150))
  assert all(sorted(e) == list(range(150)) for e in epochs)
  assert not np.array_equal(epochs[0], epochs[1])


@pytest.mark.parametrize("start_step", [1, 4, 7])  # inside the first epoch, across its end, in the third
def test_stream_resumes_exactly(start_step):
  full = [b for _, b in zip(range(start_step + 2), stream("train", 40, 0, shuffle=True, repeat=True))]
  resumed = [b for _, b in zip(range(2), stream("train", 40, start_step, shuffle=True, repeat=True, workers=1))]
  for got, expect in zip(resumed, full[start_step:]):
    for key in expect:
      np.testing.assert_array_equal(got[key], expect[key])


def test_large_generated_sets_stream_through_make_iterator():
  assert data.streams(data._synthetic_config("synthetic", 72))
  assert not data.streams(data._synthetic_config("synthetic", 64))
  first = next(data.make_iterator("synthetic", "train", 4, image_size=72, seed=1))
  again = next(data.make_iterator("synthetic", "train", 4, image_size=72, seed=1))
  assert first["image"].shape == (4, 72, 72, 3) and first["image"].dtype == np.float32
  np.testing.assert_array_equal(first["image"], again["image"])


# sha256 over the sorted keys and bytes of train chunk 1, computed with the generator of 2026-12-01
# (whole-chunk arrays), before it composited images block by block: the data must not move
GOLDEN_CHUNKS = [
    (dict(image_size=16, task="glyphs", chunk_size=70), "1505ed169963e78c97366fa376d18a6ea453d8b906f77a890130a76e3239c533"),
    (dict(image_size=40, task="shapes", num_classes=20, chunk_size=70),
     "0d040249d75c4641e801547919f6b3e58ad154321d2b64cacbed942fee8e8ae2"),
    (dict(image_size=32, task="glyphs", chunk_size=1000), "728dc3ba608d19ac05d21a3bd0bb1ea40debfbc607fb39470643001c13b0b7cf"),
]


@pytest.mark.parametrize("kept_bytes", [0, synthetic.FINE_NOISE_KEPT_BYTES], ids=["fine-noise-drawn-twice", "kept"])
@pytest.mark.parametrize("fields,digest", GOLDEN_CHUNKS)
def test_block_compositing_keeps_the_generated_data_bit_for_bit(fields, digest, kept_bytes, monkeypatch):
  monkeypatch.setattr(synthetic, "FINE_NOISE_KEPT_BYTES", kept_bytes)
  chunk = synthetic.generate_chunk(synthetic.SyntheticConfig(**fields), "train", 1)
  h = hashlib.sha256()
  for key in sorted(chunk):
    h.update(key.encode())
    h.update(np.ascontiguousarray(chunk[key]).tobytes())
  assert h.hexdigest() == digest


def test_blas_limit_is_lifted_when_the_last_generator_leaves():
  threadpoolctl = pytest.importorskip("threadpoolctl")
  blas = lambda: [info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]
  before = blas()
  with synthetic.single_threaded_blas():
    with synthetic.single_threaded_blas():  # a second generator thread
      assert all(n == 1 for n in blas())
    assert all(n == 1 for n in blas())  # the first is still inside
  assert blas() == before


def test_chunk_stream_keeps_only_the_arrays_asked_for():
  full = synthetic.generate_chunk(CONFIG, "train", 2)
  stream = synthetic_stream.ChunkStream(CONFIG, "train", seed=0, shuffle=False, workers=1, keys=("image", "label"))
  try:
    kept = stream.chunk(2)
  finally:
    stream.close()
  assert sorted(kept) == ["image", "label"]
  for key in kept:
    np.testing.assert_array_equal(kept[key], full[key])


def test_kept_fine_noise_gives_the_chunks_of_the_two_pass_generator(monkeypatch):
  rng = np.random.default_rng(0)
  for _ in range(6):
    config = synthetic.SyntheticConfig(
        image_size=int(rng.integers(16, 41)), chunk_size=int(rng.integers(1, 3 * synthetic.BLOCK)),
        task=str(rng.choice(synthetic.TASKS)), seed=int(rng.integers(100)),
        distractor_probability=float(rng.uniform()))
    n, size = config.chunk_size, config.image_size
    drawn = synthetic._background_params(np.random.default_rng(1), n, size)
    assert drawn["fine"] is not None and sum(len(b) for b in drawn["fine"]) == n  # the kept path is the one tested
    kept = synthetic.generate_chunk(config, "test", 0)
    monkeypatch.setattr(synthetic, "FINE_NOISE_KEPT_BYTES", n * size * size * 12 - 1)  # one byte short: two passes
    assert synthetic._background_params(np.random.default_rng(1), n, size)["fine"] is None
    twice = synthetic.generate_chunk(config, "test", 0)
    monkeypatch.undo()
    assert sorted(kept) == sorted(twice)
    for key in twice:
      np.testing.assert_array_equal(kept[key], twice[key], err_msg=f"{key} of {config}")
