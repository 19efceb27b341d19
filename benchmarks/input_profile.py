"""Where the image input pipeline's time goes: images/s of tf.data maps over the `input_bench` JPEGs
(500x375, quality 90) held in memory, on pinned cores (one by default), stage by stage and per augment preset.
Each map ends in a max over its output, so that crops of any size batch; the max costs ~1% of a decode.

  python3 -m benchmarks.input_profile [--images=256] [--batches=16] [--cores=0] [--only=preset]

Run it with --cores=0 and then --cores=0,1,... to see how the map alone scales, without the stream's
file reading, batching into numpy or mixing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def stages(tf):
  """{name: fn(encoded, position) -> tensor}, cheapest first."""
  from acm_jax.data import augment, tfds_data
  key = lambda position: tf.stack([tf.constant(0, tf.int64), position])
  window = lambda position: lambda shape: augment.inception_window(tf, shape, key(position))

  def whole_then_slice(encoded, position):
    image = tfds_data.decode(tf, encoded)
    return tf.slice(image, *window(position)(tf.shape(image)))

  def resize(crop):
    return tf.image.resize(crop, (224, 224), method="bilinear", antialias=True)

  preset = lambda name: lambda encoded, position: tfds_data.preprocess(tf, encoded, position, 0, 224, True, name)
  return {
      "read (no decode)": lambda encoded, position: tf.strings.length(encoded),
      "decode whole": lambda encoded, position: tfds_data.decode(tf, encoded),
      "decode whole, slice the inception window": whole_then_slice,
      "decode the inception window": lambda encoded, position: tfds_data.decode_window(tf, encoded, window(position)),
      "  + antialiased resize to 224": lambda encoded, position: resize(
          tfds_data.decode_window(tf, encoded, window(position))),
      "  + plain bilinear resize instead (not used)": lambda encoded, position: tf.image.resize(
          tfds_data.decode_window(tf, encoded, window(position)), (224, 224), method="bilinear"),
      "preset inception": preset("inception"),
      "preset three_augment": preset("three_augment"),
      "decode whole + antialiased resize to 341x256": lambda encoded, position: tf.image.resize(
          tfds_data.decode(tf, encoded), (256, 341), method="bilinear", antialias=True),
      "preset light": preset("light"),
      "preset none (= eval)": preset("none"),
  }


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--images", type=int, default=256)
  parser.add_argument("--batches", type=int, default=16)
  parser.add_argument("--cores", default="0", help="comma-separated CPU ids to pin to")
  parser.add_argument("--only", default="", help="time only the stages whose name contains this")
  args = parser.parse_args(argv)
  cores = [int(c) for c in args.cores.split(",")]
  os.sched_setaffinity(0, cores)  # before TensorFlow starts its thread pools
  from acm_jax.data.tfds_data import import_tf
  from benchmarks.input_bench import write_images
  tf, _ = import_tf()
  with tempfile.TemporaryDirectory() as tmp:
    write_images(Path(tmp), args.images)
    encoded = [path.read_bytes() for path in sorted(Path(tmp, "train").rglob("*.jpg"))]
  print(f"pinned to cores {cores}", flush=True)
  for name, fn in stages(tf).items():
    if args.only not in name:
      continue
    ds = tf.data.Dataset.from_tensor_slices(encoded).repeat().enumerate()
    ds = ds.map(lambda position, image: tf.reduce_max(fn(image, position)), num_parallel_calls=tf.data.AUTOTUNE)
    batches = iter(ds.batch(32).prefetch(2))
    for _ in range(2):  # tf.data start-up and autotuning
      next(batches)
    rates = []
    for _ in range(3):
      tic = time.perf_counter()
      for _ in range(args.batches):
        next(batches)
      rates.append(args.batches * 32 / (time.perf_counter() - tic))
    print(f"{name:48s} {statistics.median(rates):7.0f} images/s", flush=True)


if __name__ == "__main__":
  main()
