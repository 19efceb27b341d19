"""The streamed generated sets: the same examples as the whole-set generator, exact resume, bounded chunks."""

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
