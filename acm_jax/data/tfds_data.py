"""TFDS datasets (ImageNet among them) read from a local data dir, with the standard
ViT preprocessing. TensorFlow is imported in this module only: the GPU machines
have none, and the synthetic set never needs it.

Nothing is downloaded. A dataset already prepared in `data_dir` is read as it is;
one that is not is built from its manual dir (`<data_dir>/downloads/manual`, where
`imagenet2012` wants ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar) if its
builder takes manual files, and otherwise stops with an error saying to prepare it
elsewhere (`tfds build`) and copy it in.

Exact, cheap resumption. The records are read straight from the prepared TFRecord
shards, in groups: each epoch permutes the shards (pieces of at most `window`
examples) with (seed, epoch), packs consecutive ones into groups of up to
`window` examples, and permutes each group in memory with (seed, epoch, group).
The stream is thus a pure function of (seed, position), and resuming at step s
reads only the one group that holds position s * batch_size: no earlier epoch or
group is touched. Images stay encoded until they are drawn, and the random crop
and flip of each example are seeded by (seed, its position in the stream); a JPEG
is decoded only around its Inception crop (`decode_window`), to the same pixels.
Shuffling quality: a batch mixes `window` examples from several random shards;
TFDS shuffles examples across shards when it prepares a dataset, so this is
close to a global shuffle.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator, Sequence

import numpy as np

from acm_jax.data import augment as augment_lib

SPLIT_NAMES = {"train": ("train",), "test": ("validation", "test")}  # the first that the dataset has
CROP_FRACTION = 0.875  # eval: resize the short side to size / 0.875, then centre-crop size x size
# sets whose images are already centre crops (ImageNet-C: 224 x 224 crops of the validation set) are only
# resized to the image size
PRECROPPED = "_corrupted/"
DEFAULT_IMAGE_SIZE = 224
WINDOW = 8192  # examples held (encoded) in memory per shuffle group: ~0.9 GB for ImageNet
MAX_CYCLE = 64  # the most pieces of shards one group reads at once
JPEG_MARGIN = 16  # pixels decoded around a JPEG crop window (`decode_window`); 4 or more are needed


def import_tf():
  try:
    import tensorflow as tf
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError("TFDS datasets need tensorflow-cpu and tensorflow-datasets "
                      "(pip install -r requirements.txt); the synthetic set does not") from e
  tf.config.set_visible_devices([], "GPU")  # keep TensorFlow off the accelerators JAX uses
  return tf, tfds


def builder(name: str, data_dir: str | None):
  """The prepared TFDS builder of `name`, built offline from the manual dir if needed."""
  if data_dir is None:
    raise ValueError(f"tfds:{name} needs --data_dir (the TFDS data dir holding the prepared data set "
                     "or downloads/manual/ with its source files)")
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"--data_dir {data_dir!r} does not exist")
  tf, tfds = import_tf()
  try:
    b = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds raises its own DatasetNotFoundError and friends
    raise ValueError(f"unknown TFDS dataset {name!r}: {e}") from e
  if b.is_prepared():
    return b
  manual = os.path.join(data_dir, "downloads", "manual")
  if not getattr(b, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
    raise RuntimeError(f"tfds:{name} is not prepared in {data_dir} and would need a download; prepare it on a "
                       f"machine with network access (`tfds build {name} --data_dir=...`) and copy it there")
  config = tfds.download.DownloadConfig(manual_dir=manual, try_download_gcs=False)
  try:
    b.download_and_prepare(download_config=config, file_format="tfrecord")
  except Exception as e:
    raise RuntimeError(f"tfds:{name} is not prepared in {data_dir} and could not be built offline from "
                       f"{manual} ({type(e).__name__}: {e}); place its source files there "
                       "(for imagenet2012: ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar)") from e
  return b


def _split_name(b, split: str) -> str:
  for candidate in SPLIT_NAMES[split]:
    if candidate in b.info.splits:
      return candidate
  raise ValueError(f"{b.info.name} has no split among {SPLIT_NAMES[split]} for {split!r}; "
                   f"it has {sorted(b.info.splits)}")


def _keys(b) -> tuple[str, str]:
  keys = tuple(b.info.supervised_keys or ("image", "label"))
  if len(keys) != 2 or any(k not in b.info.features for k in keys):
    raise ValueError(f"{b.info.name} is not an (image, label) data set: supervised keys {keys!r}")
  return keys


def get_info(name: str, image_size: int | None, data_dir: str | None) -> tuple[int, int, int, int]:
  """(num_classes, image_size, num_train, num_test) of a prepared TFDS dataset."""
  b = builder(name, data_dir)
  splits = b.info.splits
  return (b.info.features[_keys(b)[1]].num_classes, image_size or DEFAULT_IMAGE_SIZE,
          splits[_split_name(b, "train")].num_examples, splits[_split_name(b, "test")].num_examples)


# --- the read schedule: plain Python, a pure function of (seed, epoch) --------------------------


@dataclasses.dataclass(frozen=True)
class Piece:
  """`take` records of one shard file after skipping `skip`."""
  file: str
  skip: int
  take: int


def pieces(file_instructions: Sequence, window: int) -> list[Piece]:
  """The split's shard ranges, those longer than `window` cut into near-equal pieces."""
  out = []
  for fi in file_instructions:
    count = -(-fi.take // window)
    bounds = np.linspace(0, fi.take, count + 1).round().astype(int)
    out += [Piece(os.fspath(fi.filename), fi.skip + int(a), int(b - a)) for a, b in zip(bounds[:-1], bounds[1:])]
  return out


def epoch_groups(parts: Sequence[Piece], seed: int, epoch: int, shuffle: bool, window: int) -> list[list[Piece]]:
  """The pieces of one epoch in reading order, packed into groups of at most `window`
  examples (and MAX_CYCLE pieces); without shuffling, one piece per group in file order."""
  if not shuffle:
    return [[p] for p in parts]
  order = np.random.default_rng([seed, epoch]).permutation(len(parts))
  groups, size = [], window
  for i in order:
    if size + parts[i].take > window or len(groups[-1]) == MAX_CYCLE:
      groups.append([])
      size = 0
    groups[-1].append(parts[i])
    size += parts[i].take
  return groups


def group_stream(parts: Sequence[Piece], seed: int, shuffle: bool, repeat: bool, window: int, start: int):
  """(files, skips, takes, order, skip) for each group from stream position `start` on: read the
  pieces interleaved record by record, reorder the group's records by `order`, drop the first
  `skip` (the part of the first group before `start`)."""
  total = sum(p.take for p in parts)
  epoch, offset = divmod(start, total)
  if epoch and not repeat:
    return
  while True:
    for g, group in enumerate(epoch_groups(parts, seed, epoch, shuffle, window)):
      size = sum(p.take for p in group)
      if offset >= size:
        offset -= size
        continue
      if shuffle:
        order = np.random.default_rng([seed, epoch, g]).permutation(size)
      else:
        order = np.arange(size)
      yield ([p.file for p in group], [p.skip for p in group], [p.take for p in group], order, offset)
      offset = 0
    if not repeat:
      return
    epoch += 1


# --- the TensorFlow pipeline ---------------------------------------------------------------------


def decode(tf, encoded):
  """uint8 (H, W, 3) of an encoded JPEG, PNG, GIF (its first frame) or BMP."""
  return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def decode_window(tf, encoded, window):
  """uint8 (h, w, 3) window of an encoded image, chosen from its shape (H, W, 3) by `window(shape) ->
  (begin, size)` (int32 (3,) each, as `tf.slice` takes them): the pixels of `decode` cut to the window.
  A JPEG is decoded only around the window (`tf.image.decode_and_crop_jpeg`). libjpeg-turbo upsamples
  the chroma of a cropped region as at an image edge, without the neighbouring sample, so the region's
  last column, and its first when it starts on the 16-pixel iMCU grid, differ from the whole decode (by
  up to 16 levels), and a region under 5 pixels wide gets a plainer upsampling. The fancy upsampling
  reads one chroma sample (2 pixels) beyond a pixel, so the region is the window widened by JPEG_MARGIN
  pixels per side (2 for the edges, 4 for the width), clipped to the image, where the whole decode has
  the same edge. Other formats are decoded whole."""
  def jpeg():
    shape = tf.image.extract_jpeg_shape(encoded)[:2]
    begin, size = window(tf.concat([shape, [3]], 0))
    top_left = tf.maximum(begin[:2] - JPEG_MARGIN, 0)
    bottom_right = tf.minimum(begin[:2] + size[:2] + JPEG_MARGIN, shape)
    region = tf.image.decode_and_crop_jpeg(encoded, tf.concat([top_left, bottom_right - top_left], 0), channels=3)
    return tf.slice(region, tf.concat([begin[:2] - top_left, [0]], 0), size)

  def whole():
    image = decode(tf, encoded)
    begin, size = window(tf.shape(image))
    return tf.slice(image, begin, size)

  return tf.cond(tf.io.is_jpeg(encoded), jpeg, whole)


def preprocess(tf, image, position, seed: int, size: int, train: bool, augment: str,
               crop_fraction: float = CROP_FRACTION):
  """Encoded image -> float32 (size, size, 3) in [-1, 1]: train images augmented by the preset
  (`acm_jax.data.augment`) with draws seeded by (seed, position in the stream); eval images resized
  (short side to size / 0.875) and centre-cropped. The crop-first presets decode only their crop
  window of a JPEG (`decode_window`)."""
  if not train:
    image = augment_lib.eval_image(tf, decode(tf, image), size, crop_fraction)
  else:
    key = tf.stack([tf.cast(seed, tf.int64), tf.cast(position, tf.int64)])
    if augment in augment_lib.CROP_FIRST:
      crop = decode_window(tf, image, lambda shape: augment_lib.inception_window(tf, shape, key))
      image = augment_lib.train_crop(tf, crop, key, size, augment)
    else:
      image = augment_lib.train_image(tf, decode(tf, image), key, size, augment)
  return tf.reshape(image / 127.5 - 1.0, (size, size, 3))


def make_iterator(name: str, split: str, batch_size: int, *, image_size: int | None, seed: int,
                  data_dir: str | None, shuffle: bool, repeat: bool, drop_remainder: bool, start_step: int,
                  augment: str = "inception", window: int = WINDOW) -> Iterator[dict]:
  """See `acm_jax.data.make_iterator`; `window` sets the shuffle group size (see the module docstring)."""
  tf, tfds = import_tf()
  b = builder(name, data_dir)
  if b.info.file_format is not None and b.info.file_format.value != "tfrecord":
    raise ValueError(f"tfds:{name} in {data_dir} is stored as {b.info.file_format.value}; this reader needs "
                     "tfrecord (rebuild it with `tfds build --file_format=tfrecord`)")
  image_key, label_key = _keys(b)
  size = image_size or DEFAULT_IMAGE_SIZE
  train = split == "train"
  parts = pieces(b.info.splits[_split_name(b, split)].file_instructions, window)
  start = start_step * batch_size
  features = b.info.features
  crop_fraction = 1.0 if PRECROPPED in name else CROP_FRACTION

  def read_group(files, skips, takes, order, skip):
    records = tf.data.Dataset.from_tensor_slices((files, skips, takes)).interleave(
        lambda f, s, t: tf.data.TFRecordDataset(f).skip(s).take(t), cycle_length=MAX_CYCLE, block_length=1)
    if shuffle:
      records = records.batch(tf.size(order, out_type=tf.int64)).map(lambda r: tf.gather(r, order)).unbatch()
    return records.skip(skip)

  def parse(position, record):
    example = features.deserialize_example(record, decoders={image_key: tfds.decode.SkipDecoding()})
    return {"image": preprocess(tf, example[image_key], position, seed, size, train, augment, crop_fraction),
            "label": tf.cast(example[label_key], tf.int32)}

  spec = (tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int64),
          tf.TensorSpec([None], tf.int64), tf.TensorSpec([], tf.int64))
  ds = tf.data.Dataset.from_generator(lambda: group_stream(parts, seed, shuffle, repeat, window, start),
                                      output_signature=spec)
  ds = ds.flat_map(read_group).enumerate(start=start)
  ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
  return ({"image": batch["image"], "label": batch["label"]} for batch in tfds.as_numpy(ds))
