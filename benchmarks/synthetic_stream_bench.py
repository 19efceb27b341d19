"""The streamed generated set at ViT-B size: seconds to the first batch, images/s after it and the
peak host memory of the data stream alone (no model): the consumer process's, and the largest of its
generator processes' (`workers` of them), recorded in benchmarks/results/synthetic_stream_<host>.json.

  python3 -m benchmarks.synthetic_stream_bench [--image_size=224] [--batch_size=128] [--batches=20]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import time
from pathlib import Path

from acm_jax import data
from acm_jax.data import synthetic_stream

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--batches", type=int, default=20)
  args = parser.parse_args(argv)
  tic = time.perf_counter()
  stream = data.make_iterator("synthetic", "train", args.batch_size, image_size=args.image_size)
  next(stream)
  first = time.perf_counter() - tic
  tic = time.perf_counter()
  for _ in range(args.batches):
    next(stream)
  rate = args.batches * args.batch_size / (time.perf_counter() - tic)
  stream.close()  # joins the workers: their peak memory is then in RUSAGE_CHILDREN
  gigabytes = lambda who: round(resource.getrusage(who).ru_maxrss / 2**20, 2)
  record = {"device": f"{platform.machine()} CPU, {os.cpu_count()} cores",
            "date": datetime.date.today().isoformat(), "image_size": args.image_size,
            "batch_size": args.batch_size, "workers": synthetic_stream.default_workers(),
            "seconds_to_first_batch": round(first, 2), "images_per_s": round(rate, 1),
            "peak_rss_gb": gigabytes(resource.RUSAGE_SELF), "worker_peak_rss_gb": gigabytes(resource.RUSAGE_CHILDREN)}
  print(json.dumps(record))
  out = HERE / "results" / f"synthetic_stream_{platform.node() or 'host'}.json"
  out.write_text(json.dumps(record, indent=2) + "\n")
  return record


if __name__ == "__main__":
  main()
