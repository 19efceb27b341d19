"""Host-side parameter initialisation: dense, ACM the old way and `phases.acm_params` (issue #22).

    python3 -m benchmarks.init_bench                          # ViT-B/16, MLP + q/k/v/o ACMs, both layouts
    python3 -m benchmarks.init_bench --model=tiny --out=/tmp/init.json

Seconds, each with the result ready, in this order in one process:
  dense_s        `phases.init_params(exp, "dense", 0)` (the jitted init, compiled then run)
  acm_params_s   `phases.acm_params(exp, dense, 0)`: fresh gates plus the acmize copy
  acm_init_s     `phases.init_params(exp, "acm", 0)`, what the ACM phases ran before
  acmize_s       `acmize(dense, <that init>)`, the copy on its own (it runs second, with the eager
                 ops that acm_params compiled already cached: if anything, too fast)
The target: acm_params_s <= dense_s + acmize_s (the old ACM init cost acm_init_s + acmize_s);
acm_params_over_dense is acm_params_s / dense_s.
Records are appended to benchmarks/results/init.json (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import jax

from acm_jax.acmize import acmize
from acm_jax.train import phases
from benchmarks import train_bench

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn):
  tic = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, round(time.perf_counter() - tic, 2)


def measure(model: str, scanned: bool) -> dict:
  dense_exp = train_bench.experiment(model, "none", 64, scanned, "none", "bfloat16")
  exp = train_bench.experiment(model, "mlp_qkvo", 64, scanned, "none", "bfloat16")
  dense, dense_s = timed(lambda: phases.init_params(dense_exp, "dense", 0))
  _, acm_params_s = timed(lambda: phases.acm_params(exp, dense, 0))
  init, acm_init_s = timed(lambda: phases.init_params(exp, "acm", 0))
  _, acmize_s = timed(lambda: acmize(dense, init, exp.task.paths, num_learners=exp.config.num_learners))
  return {"dense_s": dense_s, "acm_params_s": acm_params_s, "acm_init_s": acm_init_s, "acmize_s": acmize_s,
          "old_acm_s": round(acm_init_s + acmize_s, 2), "met": acm_params_s <= dense_s + acmize_s,
          "acm_params_over_dense": round(acm_params_s / dense_s, 2)}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="vit_b16", choices=("tiny", "vit_s16", "vit_b16", "vit_l16"))
  parser.add_argument("--layouts", default=",".join(train_bench.LAYOUTS), help="unrolled, scanned")
  parser.add_argument("--out", type=Path, default=RESULTS / "init.json")
  args = parser.parse_args(argv)
  args.layouts = args.layouts.split(",")
  if not args.layouts or set(args.layouts) - set(train_bench.LAYOUTS):
    parser.error(f"--layouts={','.join(args.layouts)}: expected a comma-separated subset of unrolled, scanned")
  base = {"date": datetime.date.today().isoformat(), "jax_version": jax.__version__,
          "device": f"{platform.machine()} CPU, {os.cpu_count()} cores", "model": args.model, "acm": "mlp_qkvo"}
  records = []
  for layout in args.layouts:
    records.append({**base, "scanned": layout == "scanned", **measure(args.model, layout == "scanned")})
    print(json.dumps(records[-1]), flush=True)
  train_bench.append(args.out, records)


if __name__ == "__main__":
  main()
