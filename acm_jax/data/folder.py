"""Image folders: `--dataset=folder:/path` for people's own images.

Layout: `<root>/train/<class>/*.{jpg,jpeg,png}` and `<root>/val/<class>/...` (or
`test/`), any image sizes; classes are the train subfolders in sorted order,
and the evaluation folder may lack some of them but not add others.

At the first use a scan checks every file without decoding the pixels: PIL
reads its header and structure (`Image.verify`, which for PNG also checks every
chunk up to IEND), and a JPEG must end with its end-of-image marker. Files that
fail are left out of the stream, counted and named on stderr, and listed in
`scan(root).splits[split].unreadable`; non-image files (other extensions) are
counted there too. A folder without class subfolders or with an empty class
stops the run with a message naming it.

The stream has the TFDS path's semantics: position p of the stream is the
(p mod n)-th file of epoch p // n in a permutation drawn from (seed, epoch),
decoded and augmented by tf.data (`tfds_data.preprocess`, draws seeded by
(seed, p)), so resuming at step s reads nothing before s x batch_size; every host
reads the global batch and keeps its rows (`sharding.Partitioner.shard_batch`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import sys
from typing import Iterator

import numpy as np

PREFIX = "folder:"
EXTENSIONS = (".jpg", ".jpeg", ".png")
SPLIT_DIRS = {"train": ("train",), "test": ("val", "test")}  # the first that exists
JPEG_TAIL = 64  # bytes at the end of a JPEG searched for its end-of-image marker (some writers pad)


@dataclasses.dataclass(frozen=True)
class FolderSplit:
  directory: str
  files: tuple[str, ...]  # readable images, sorted by class then name
  labels: np.ndarray  # (len(files),) int32
  unreadable: tuple[tuple[str, str], ...]  # (path, reason)


@dataclasses.dataclass(frozen=True)
class Folder:
  root: str
  classes: tuple[str, ...]
  splits: dict[str, FolderSplit]


def check_image(path: str) -> str | None:
  """None for a readable JPEG or PNG, else the reason it is not."""
  from PIL import Image
  try:
    with Image.open(path) as image:
      kind = image.format
      image.verify()
  except Exception as e:  # PIL raises many types for damaged files
    return f"{type(e).__name__}: {e}"
  if kind not in ("JPEG", "PNG"):
    return f"{kind} image; expected JPEG or PNG"
  if kind == "JPEG":
    with open(path, "rb") as f:
      f.seek(max(os.path.getsize(path) - JPEG_TAIL, 0))
      if b"\xff\xd9" not in f.read():
        return "truncated JPEG (no end-of-image marker)"
  return None


def _split_dir(root: str, split: str) -> str:
  for name in SPLIT_DIRS[split]:
    if os.path.isdir(os.path.join(root, name)):
      return os.path.join(root, name)
  raise ValueError(f"folder dataset {root!r} has no {' or '.join(n + '/' for n in SPLIT_DIRS[split])} folder; "
                   "expected train/ and val/ (or test/), each with one subfolder of images per class")


def _scan_split(directory: str, classes: tuple[str, ...] | None) -> tuple[tuple[str, ...], list, list]:
  found = tuple(sorted(e.name for e in os.scandir(directory) if e.is_dir()))
  if not found:
    raise ValueError(f"{directory!r} has no class subfolders; expected one subfolder of images per class")
  if classes is not None and set(found) - set(classes):
    raise ValueError(f"{directory!r} has classes that train/ lacks: {sorted(set(found) - set(classes))[:10]}")
  files, labels, other = [], [], []
  for name in found:
    entries = sorted(e.path for e in os.scandir(os.path.join(directory, name)) if e.is_file())
    images = [p for p in entries if p.lower().endswith(EXTENSIONS)]
    other += [(p, f"not a {'/'.join(EXTENSIONS)} file") for p in entries if not p.lower().endswith(EXTENSIONS)]
    if not images:
      raise ValueError(f"class folder {os.path.join(directory, name)!r} holds no {'/'.join(EXTENSIONS)} image")
    files += images
    labels += [(classes or found).index(name)] * len(images)
  return found, list(zip(files, labels)), other


@functools.lru_cache(maxsize=4)
def scan(root: str, workers: int = 16) -> Folder:
  """Lists and checks every file of `root` (once per process); reports unreadable ones on stderr."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"folder dataset {root!r} does not exist")
  classes, splits = None, {}
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for split in ("train", "test"):
      directory = _split_dir(root, split)
      found, entries, other = _scan_split(directory, classes)
      classes = classes or found
      reasons = list(pool.map(check_image, [path for path, _ in entries]))
      good = [(p, label) for (p, label), why in zip(entries, reasons) if why is None]
      bad = [(p, why) for (p, _), why in zip(entries, reasons) if why is not None] + other
      if not good:
        raise ValueError(f"{directory!r} holds no readable image ({len(bad)} unreadable)")
      if bad:
        names = "\n  ".join(f"{p}: {why}" for p, why in bad[:20])
        print(f"warning: {len(bad)} of {len(entries) + len(other)} files in {directory} are left out "
              f"(unreadable or not images):\n  {names}{' ...' if len(bad) > 20 else ''}", file=sys.stderr)
      splits[split] = FolderSplit(directory, tuple(p for p, _ in good),
                                  np.array([label for _, label in good], np.int32), tuple(bad))
  return Folder(root, classes, splits)


def get_info(root: str, image_size: int | None):
  from acm_jax.data.base import DatasetInfo
  from acm_jax.data.tfds_data import DEFAULT_IMAGE_SIZE
  folder = scan(root)
  return DatasetInfo(f"{PREFIX}{root}", len(folder.classes), image_size or DEFAULT_IMAGE_SIZE,
                     len(folder.splits["train"].files), len(folder.splits["test"].files))


def make_iterator(root: str, split: str, batch_size: int, *, image_size: int | None, seed: int,
                  shuffle: bool, repeat: bool, drop_remainder: bool, start_step: int,
                  augment: str) -> Iterator[dict]:
  """See `acm_jax.data.make_iterator`."""
  from acm_jax.data.base import batch_bounds, stream_indices
  from acm_jax.data import tfds_data
  tf, _ = tfds_data.import_tf()
  part = scan(root).splits[split]
  files, labels = np.array(part.files), part.labels
  n = len(files)
  size = image_size or tfds_data.DEFAULT_IMAGE_SIZE
  train = split == "train"

  def schedule():  # the stream's files batch by batch: a pure function of (seed, position)
    for begin, count in batch_bounds(n, batch_size, start_step, repeat, drop_remainder):
      idx = stream_indices(n, begin, count, seed, shuffle)
      yield np.arange(begin, begin + count, dtype=np.int64), files[idx], labels[idx]

  def parse(position, path, label):
    image = tfds_data.preprocess(tf, tf.io.read_file(path), position, seed, size, train, augment)
    return {"image": image, "label": label}

  spec = (tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.int32))
  ds = tf.data.Dataset.from_generator(schedule, output_signature=spec).unbatch()
  ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
  return iter(ds.as_numpy_iterator())
