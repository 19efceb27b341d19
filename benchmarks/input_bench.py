"""Decoded, augmented 224 px train images per second of the image input pipeline (tf.data: read,
decode, augment; then mixup / cutmix on the host), per augment preset, with and without mixing,
on 1 core and on all cores of this machine. Adds its records to benchmarks/results/input_<host>.json.

The images are generated ImageNet-like JPEGs (500x375, quality 90, smooth colour fields with
texture: ~75 KB each; ImageNet's mean is ~110 KB) in a `folder:` dataset; the TFDS path runs the same
decode and augmentation (`tfds_data.preprocess`) on records instead of files. Each core count runs
in its own process pinned to those cores (os.sched_setaffinity), which TensorFlow's thread pools follow.

  python3 -m benchmarks.input_bench [--images=256] [--batches=8] [--batch_size=32]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PRESETS = ("inception", "three_augment", "light", "none")
MIXES = {"off": (0.0, 0.0), "mixup 0.8 + cutmix 1.0": (0.8, 1.0)}


def write_images(root: Path, count: int, classes: int = 8) -> None:
  """ImageNet-like JPEGs: bicubically upsampled colour noise (objects, shading) plus fine texture."""
  from PIL import Image
  rng = np.random.default_rng(0)
  for i in range(count):
    for split in ("train", "val"):
      (root / split / f"c{i % classes}").mkdir(parents=True, exist_ok=True)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), np.uint8)).resize((500, 375), Image.BICUBIC)
    pixels = np.asarray(coarse, np.float32) + rng.normal(0, 12, (375, 500, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    image.save(root / "train" / f"c{i % classes}" / f"{i}.jpg", quality=90)
    if i < classes:
      image.save(root / "val" / f"c{i}" / f"{i}.jpg", quality=90)


def measure(root: str, batches: int, batch_size: int) -> list[dict]:
  """Runs in the pinned child process: images/s for every preset and mixing."""
  from acm_jax import data
  rows = []
  for augment in PRESETS:
    for mix, (mixup, cutmix) in MIXES.items():
      stream = data.make_iterator(f"folder:{root}", "train", batch_size, image_size=224, augment=augment,
                                  mixup=mixup, cutmix=cutmix)
      for _ in range(2):  # tf.data start-up and autotuning
        next(stream)
      tic = time.perf_counter()
      for _ in range(batches):
        next(stream)
      rows.append({"augment": augment, "mixup": mix,
                   "images_per_s": round(batches * batch_size / (time.perf_counter() - tic), 1)})
  return rows


def main(argv: list[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--images", type=int, default=256)
  parser.add_argument("--batches", type=int, default=8)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # "root,cores" in a pinned child
  args = parser.parse_args(argv)
  if args.child:
    root, cores = args.child.rsplit(",", 1)
    print(json.dumps(measure(root, args.batches, args.batch_size)))
    return []
  available = sorted(os.sched_getaffinity(0))
  records, today = [], datetime.date.today().isoformat()
  device = f"{platform.machine()} CPU ({platform.processor() or 'unknown'}), {len(available)} cores"
  with tempfile.TemporaryDirectory() as tmp:
    write_images(Path(tmp), args.images)
    for cores in sorted({1, len(available)}):
      pinned = available[:cores]
      child = subprocess.run(
          [sys.executable, "-m", "benchmarks.input_bench", f"--child={tmp},{cores}", f"--batches={args.batches}",
           f"--batch_size={args.batch_size}"], capture_output=True, text=True, check=True,
          preexec_fn=lambda: os.sched_setaffinity(0, pinned), cwd=HERE.parent)
      for row in json.loads(child.stdout.strip().splitlines()[-1]):
        records.append({"device": device, "date": today, "cores": cores, **row,
                        "images_per_s_per_core": round(row["images_per_s"] / cores, 1)})
        print(json.dumps(records[-1]))
  out = HERE / "results" / f"input_{platform.node() or 'host'}.json"
  earlier = json.loads(out.read_text()) if out.exists() else []
  out.write_text(json.dumps(earlier + records, indent=2) + "\n")
  return records


if __name__ == "__main__":
  main()
