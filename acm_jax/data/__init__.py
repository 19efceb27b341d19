"""Data: the embedded synthetic set and TFDS datasets, as iterators of numpy batches.

Batches are dicts: "image" float32 (batch, H, W, 3) in [-1, 1], "label" int32
(batch,), and for the synthetic set with `with_masks=True` "object_mask" bool
(batch, H, W). The train split is shuffled, repeats forever and is a pure
function of (seed, step): `start_step` resumes exactly where a run stopped. The
test split is one ordered pass; its last batch may be smaller.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from acm_jax.data import synthetic

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_classes: int
  image_size: int
  num_train: int
  num_test: int


def _check(name: str, split: str | None = None) -> None:
  if name != "synthetic" and not name.startswith("tfds:"):
    raise ValueError(f"unknown dataset {name!r}; expected 'synthetic' or 'tfds:<name>' (e.g. tfds:imagenet2012)")
  if split is not None and split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def _synthetic_config(image_size: int | None, seed: int = 0) -> synthetic.SyntheticConfig:
  size = image_size or synthetic.SyntheticConfig.image_size
  if size < 16:
    raise ValueError(f"synthetic images must be at least 16 pixels wide, got {size}")
  return synthetic.SyntheticConfig(image_size=size, seed=seed)


def get_dataset_info(name: str, image_size: int | None = None, data_dir: str | None = None) -> DatasetInfo:
  _check(name)
  if name == "synthetic":
    cfg = _synthetic_config(image_size)
    return DatasetInfo(name, cfg.num_classes, cfg.image_size, cfg.num_train, cfg.num_test)
  from acm_jax.data import tfds_data
  return tfds_data.get_info(name[len("tfds:"):], image_size, data_dir)


def train_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Indices of the train batch at `step`: consecutive slices of per-epoch permutations."""
  start = step * batch_size
  out, filled = np.empty(batch_size, np.int64), 0
  while filled < batch_size:
    epoch, offset = divmod(start + filled, num_examples)
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    take = min(batch_size - filled, num_examples - offset)
    out[filled:filled + take] = perm[offset:offset + take]
    filled += take
  return out


def _synthetic_iterator(split: str, batch_size: int, image_size: int | None, seed: int, start_step: int,
                        with_masks: bool, drop_remainder: bool) -> Iterator[dict]:
  # the data itself does not depend on the training seed: runs with other seeds see the same images
  arrays = synthetic.generate(_synthetic_config(image_size))[split]
  keys = ("image", "label", "object_mask") if with_masks else ("image", "label")
  n = len(arrays["label"])
  if split == "train":
    step = start_step
    while True:
      idx = train_indices(n, batch_size, seed, step)
      yield {k: arrays[k][idx] for k in keys}
      step += 1
  stop = n - n % batch_size if drop_remainder else n
  for begin in range(0, stop, batch_size):
    yield {k: arrays[k][begin:begin + batch_size] for k in keys}


def make_iterator(name: str, split: str, batch_size: int, *, image_size: int | None = None, seed: int = 0,
                  data_dir: str | None = None, start_step: int = 0, with_masks: bool = False,
                  drop_remainder: bool = False) -> Iterator[dict]:
  _check(name, split)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  if name == "synthetic":
    return _synthetic_iterator(split, batch_size, image_size, seed, start_step, with_masks, drop_remainder)
  if with_masks:
    raise ValueError(f"{name} has no object masks; with_masks=True is only for the synthetic set")
  from acm_jax.data import tfds_data
  return tfds_data.make_iterator(name[len("tfds:"):], split, batch_size, image_size=image_size, seed=seed,
                                 data_dir=data_dir, start_step=start_step, drop_remainder=drop_remainder)
