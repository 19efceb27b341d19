"""Data: the embedded synthetic set, TFDS datasets and image folders, as iterators of numpy batches.

Batches are dicts: "image" float32 (batch, H, W, 3) in [-1, 1] (x / 127.5 - 1, the
ViT convention), "label" int32 (batch,), and for the synthetic set with
`with_masks=True` "object_mask" bool (batch, H, W), True on the pixels of the
object that decides the class.

Defaults by split: "train" is shuffled, repeats forever and keeps every batch
full; "test" is one ordered pass whose last batch may be smaller. Each can be
overridden (`shuffle`, `repeat`, `drop_remainder`). The stream is a pure
function of (seed, position): `start_step=s` starts at the batch an iterator
started at 0 would yield as its s-th (0-based), without producing the ones
before it, so a resumed run sees exactly the batches an uninterrupted one would.

Train augmentation (`augment`, `mixup`, `cutmix`: see `acm_jax.data.augment`)
is drawn from (seed, position) too; mixed batches also carry "mix_label" and
"mix_weight".
"""

from __future__ import annotations

from typing import Iterator

from acm_jax.data import augment as augment_lib
from acm_jax.data import synthetic
from acm_jax.data.base import (SYNTHETIC, DatasetInfo, batch_bounds, is_synthetic,  # noqa: F401 (re-exported)
                               stream_indices)

SPLITS = ("train", "test")
TFDS_PREFIX = "tfds:"
FOLDER_PREFIX = "folder:"  # acm_jax/data/folder.py
# Generated sets with larger images stream (acm_jax/data/synthetic_stream.py) from chunks of STREAM_CHUNK
# examples, generated on demand: a 224 px set held whole took 407 s and 23 GB before the first step. Up to
# this size they are generated whole (chunks of 1000) and shuffled globally, as the recorded results were.
STREAM_ABOVE_PIXELS = 64
STREAM_CHUNK = 64


def _check_name(name: str) -> None:
  prefixed = any(name.startswith(p) and name[len(p):] for p in (TFDS_PREFIX, FOLDER_PREFIX)) \
      if isinstance(name, str) else False
  if not isinstance(name, str) or (name not in SYNTHETIC and not prefixed):
    raise ValueError(f"unknown dataset {name!r}; expected one of {tuple(SYNTHETIC)}, 'tfds:<name>' "
                     "(e.g. tfds:imagenet2012) or 'folder:<path>' (train/ and val/ with a folder per class)")


def _check_image_size(image_size: int | None) -> None:
  if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
    raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")


def _synthetic_config(name: str, image_size: int | None) -> synthetic.SyntheticConfig:
  # the data never depends on the training seed: runs with different seeds see the same images
  if image_size is None:
    return synthetic.SyntheticConfig(task=SYNTHETIC[name])
  chunk = STREAM_CHUNK if image_size > STREAM_ABOVE_PIXELS else synthetic.CHUNK
  return synthetic.SyntheticConfig(image_size=image_size, task=SYNTHETIC[name], chunk_size=chunk)


def streams(config: synthetic.SyntheticConfig) -> bool:
  return config.image_size > STREAM_ABOVE_PIXELS


def get_dataset_info(name: str, image_size: int | None = None, data_dir: str | None = None) -> DatasetInfo:
  """Classes, image size (None: the dataset's default, 224 for TFDS) and split sizes."""
  _check_name(name)
  _check_image_size(image_size)
  if is_synthetic(name):
    cfg = _synthetic_config(name, image_size)
    return DatasetInfo(name, cfg.num_classes, cfg.image_size, cfg.num_train, cfg.num_test)
  if name.startswith(FOLDER_PREFIX):
    from acm_jax.data import folder
    return folder.get_info(name[len(FOLDER_PREFIX):], image_size)
  from acm_jax.data import tfds_data
  return DatasetInfo(name, *tfds_data.get_info(name[len(TFDS_PREFIX):], image_size, data_dir))


def _synthetic_iterator(name: str, split: str, batch_size: int, image_size: int | None, seed: int, shuffle: bool,
                        repeat: bool, drop_remainder: bool, start_step: int, with_masks: bool,
                        augment: str, uint8_images: bool = False) -> Iterator[dict]:
  config = _synthetic_config(name, image_size)
  n = synthetic.split_size(config, split)
  bounds = batch_bounds(n, batch_size, start_step, repeat, drop_remainder)
  if streams(config):
    from acm_jax.data import synthetic_stream
    raw = synthetic_stream.iterate(config, split, bounds, seed, shuffle, with_masks)
  else:
    raw = _held_batches(synthetic.generate(config)[split], bounds, seed, shuffle, with_masks)
  for begin, batch in raw:
    if augment == "light":
      images = batch["image"]
      batch["image"] = augment_lib.light_numpy(images, *augment_lib.light_params(seed, begin, len(images),
                                                                                  images.shape[1]))
    if not uint8_images:
      batch["image"] = synthetic.normalize(batch["image"])
    yield batch


def _held_batches(arrays: dict, bounds, seed: int, shuffle: bool, with_masks: bool):
  n = len(arrays["label"])
  for begin, size in bounds:
    idx = stream_indices(n, begin, size, seed, shuffle)
    if not shuffle and idx[-1] - idx[0] == size - 1:
      idx = slice(idx[0], idx[-1] + 1)  # an ordered batch within one pass: a view, no gather
    batch = {"image": arrays["image"][idx], "label": arrays["label"][idx]}
    if with_masks:
      batch["object_mask"] = arrays["object_mask"][idx]
    yield begin, batch


def make_iterator(name: str, split: str, batch_size: int, *, image_size: int | None = None, seed: int = 0,
                  data_dir: str | None = None, shuffle: bool | None = None, repeat: bool | None = None,
                  drop_remainder: bool | None = None, start_step: int = 0, with_masks: bool = False,
                  augment: str | None = None, mixup: float = 0.0, cutmix: float = 0.0,
                  uint8_images: bool = False) -> Iterator[dict]:
  """Batches of `split` ("train" or "test") of dataset `name`; see the module docstring.

  `seed` drives the shuffling and the augmentation, never the synthetic images themselves.
  `augment` (None: the dataset's default preset), `mixup` and `cutmix` act on the train split
  only. `uint8_images` (synthetic sets, no mixup or cutmix): the images as generated, uint8, for
  the consumer to normalise where it likes (`synthetic.normalize` / `normalize_jax`, equal
  values); a quarter of the bytes to copy to a device. Arguments are checked here, before the
  first batch is asked for.
  """
  _check_name(name)
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  if not isinstance(start_step, int) or start_step < 0:
    raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
  _check_image_size(image_size)
  augment_lib.check(augment, mixup, cutmix, name)
  train = split == "train"
  augment = (augment or augment_lib.default_preset(name)) if train else "none"
  shuffle = train if shuffle is None else bool(shuffle)
  repeat = train if repeat is None else bool(repeat)
  drop_remainder = train if drop_remainder is None else bool(drop_remainder)
  if not is_synthetic(name) and with_masks:
    raise ValueError(f"{name} has no object masks; with_masks=True is only for the synthetic set")
  if uint8_images and (not is_synthetic(name) or (train and (mixup > 0 or cutmix > 0))):
    raise ValueError(f"uint8_images=True is for the synthetic sets without mixup or cutmix; got {name!r}, "
                     f"mixup {mixup}, cutmix {cutmix}")
  if is_synthetic(name):
    _synthetic_config(name, image_size)  # validates the size now rather than at the first batch
    batches = _synthetic_iterator(name, split, batch_size, image_size, seed, shuffle, repeat, drop_remainder,
                                  start_step, with_masks, augment, uint8_images)
  elif name.startswith(FOLDER_PREFIX):
    from acm_jax.data import folder
    batches = folder.make_iterator(name[len(FOLDER_PREFIX):], split, batch_size, image_size=image_size, seed=seed,
                                   shuffle=shuffle, repeat=repeat, drop_remainder=drop_remainder,
                                   start_step=start_step, augment=augment)
  else:
    from acm_jax.data import tfds_data
    batches = tfds_data.make_iterator(name[len(TFDS_PREFIX):], split, batch_size, image_size=image_size, seed=seed,
                                      data_dir=data_dir, shuffle=shuffle, repeat=repeat,
                                      drop_remainder=drop_remainder, start_step=start_step, augment=augment)
  if train and (mixup > 0 or cutmix > 0):
    batches = augment_lib.mix_batches(batches, seed, start_step * batch_size, batch_size, mixup, cutmix)
  return batches
