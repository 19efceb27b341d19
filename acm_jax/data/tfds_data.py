"""TFDS datasets (ImageNet among them) read from a local data dir, with the
standard ViT preprocessing. TensorFlow is imported here only: the GPU machines
have none, and the synthetic set never needs it.

Nothing is downloaded. A dataset that is not prepared in `data_dir` is built
from its manual dir (`<data_dir>/downloads/manual`, where `imagenet2012` wants
ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar); a dataset that would need
a download stops with an error saying so.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np

SPLIT_NAMES = {"train": "train", "test": "validation"}
CROP_FRACTION = 0.875  # eval: resize to size / 0.875, then centre-crop size


def _tfds():
  try:
    import tensorflow as tf
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError("TFDS datasets need tensorflow and tensorflow-datasets "
                      "(pip install -r requirements.txt); the synthetic set does not") from e
  tf.config.set_visible_devices([], "GPU")  # keep TensorFlow off the accelerators JAX uses
  return tf, tfds


def builder(name: str, data_dir: str | None):
  """The prepared TFDS builder, built from the manual dir if needed (offline)."""
  tf, tfds = _tfds()
  if data_dir is None:
    raise ValueError(f"tfds:{name} needs --data_dir (the TFDS data dir holding the prepared data set "
                     "or downloads/manual/ with its source files)")
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"--data_dir {data_dir!r} does not exist")
  try:
    b = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds raises its own DatasetNotFoundError
    raise ValueError(f"unknown TFDS dataset {name!r}: {e}") from e
  if not b.is_prepared():
    manual = os.path.join(data_dir, "downloads", "manual")
    config = tfds.download.DownloadConfig(manual_dir=manual)
    try:
      b.download_and_prepare(download_config=config, file_format="tfrecord")
    except Exception as e:
      raise RuntimeError(f"tfds:{name} is not prepared in {data_dir} and could not be built offline from "
                         f"{manual} ({type(e).__name__}: {e}); place its source files there "
                         "(for imagenet2012: ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar)") from e
  return b


def get_info(name: str, image_size: int | None, data_dir: str | None):
  from acm_jax.data import DatasetInfo
  b = builder(name, data_dir)
  splits = b.info.splits
  return DatasetInfo(f"tfds:{name}", b.info.features["label"].num_classes, image_size or 224,
                     splits[SPLIT_NAMES["train"]].num_examples, splits[_test_split(b)].num_examples)


def _test_split(b) -> str:
  return SPLIT_NAMES["test"] if SPLIT_NAMES["test"] in b.info.splits else "test"


def _preprocess(tf, image, index, seed: int, size: int, train: bool):
  """Encoded image -> float32 (size, size, 3) in [-1, 1]. Train: Inception-style
  random resized crop + flip, seeded by the example's position in the stream."""
  image = tf.io.decode_image(image, channels=3, expand_animations=False)
  if train:
    rng = tf.stack([tf.cast(seed, tf.int64), index])
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(rng, 2))
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), tf.zeros([0, 0, 4], tf.float32), seed=crop_seed, min_object_covered=0.1,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    image = tf.slice(image, begin, crop_size)
    image = tf.image.resize(image, (size, size), method="bilinear", antialias=True)
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  else:
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = (size / CROP_FRACTION) / tf.reduce_min(shape)
    resized = tf.cast(tf.round(shape * scale), tf.int32)
    image = tf.image.resize(image, resized, method="bilinear", antialias=True)
    top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
    image = image[top:top + size, left:left + size]
  return tf.cast(image, tf.float32) / 127.5 - 1.0


def make_iterator(name: str, split: str, batch_size: int, *, image_size: int | None, seed: int,
                  data_dir: str | None, start_step: int, drop_remainder: bool) -> Iterator[dict]:
  tf, tfds = _tfds()
  b = builder(name, data_dir)
  size = image_size or 224
  train = split == "train"
  tfds_split = SPLIT_NAMES["train"] if train else _test_split(b)
  read_config = tfds.ReadConfig(shuffle_seed=seed, interleave_cycle_length=1)
  # images stay encoded until after the skip, so resuming does not decode what it skips
  ds = b.as_dataset(split=tfds_split, shuffle_files=train, read_config=read_config,
                    decoders={"image": tfds.decode.SkipDecoding()})
  ds = ds.map(lambda ex: (ex["image"], ex["label"]))
  if train:
    # a pure function of (seed, position in the stream): skipping start_step batches resumes exactly
    ds = ds.shuffle(16 * batch_size, seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.enumerate().skip(start_step * batch_size)
  else:
    ds = ds.enumerate()
  ds = ds.map(lambda i, ex: {"image": _preprocess(tf, ex[0], i, seed, size, train), "label": tf.cast(ex[1], tf.int32)},
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=train or drop_remainder).prefetch(2)
  for batch in tfds.as_numpy(ds):
    yield {"image": np.asarray(batch["image"]), "label": np.asarray(batch["label"])}
