"""Figures and a Markdown summary of an ACM work directory.

  python -m experiments.report --workdir=runs/embedded [--out=<workdir>/report] [--benchmarks=benchmarks/results]

Writes accuracy vs GFLOPs (with the Pareto front), latency vs k/N, per-token compute
maps, k histograms, distillation errors, gate labels, collapse and distribution-shift
diagnostics as PNGs, and summary.md beside them. A figure whose inputs are missing
is skipped with a message; the others are still written.
"""

from __future__ import annotations

import argparse
import sys

from experiments import plots as report_lib


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="runs/embedded", help="default: %(default)s")
  parser.add_argument("--out", default=None, help="default: <workdir>/report")
  parser.add_argument("--benchmarks", default="benchmarks/results", help="GPU timings; default: %(default)s")
  parser.add_argument("--examples", type=int, default=256,
                      help="test images for the shift diagnostics (default: %(default)s)")
  parser.add_argument("--map_images", type=int, default=8,
                      help="test images in the compute maps (default: %(default)s)")
  args = parser.parse_args(argv)
  if args.examples < 1 or args.map_images < 1:
    print(f"error: --examples and --map_images must be >= 1, got {args.examples} / {args.map_images}",
          file=sys.stderr)
    return 2
  report = report_lib.write_report(args.workdir, args.out, args.benchmarks, args.examples, args.map_images)
  return 0 if report.written else 1


if __name__ == "__main__":
  sys.exit(main())
