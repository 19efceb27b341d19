"""The embedded default end to end (`--phase=all`), timed, checked against the targets
of issue #2, and recorded in benchmarks/results/embedded_default.json and RESULTS.md.

  python3 -m benchmarks.embedded_default [--workdir=runs/embedded_bench] [extra vit_imagenet flags]
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import jax

from acm_jax import cli, registry

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
  workdir = next((a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")), "runs/embedded_bench")
  extra = [a for a in argv if not a.startswith("--workdir=")]
  if Path(workdir).exists():
    shutil.rmtree(workdir)  # a timing must include every phase
  tic = time.time()
  args, cfg = cli.parse(registry.get("vit"), ["--phase=all", f"--workdir={workdir}", *extra])
  dense, acm, static = cli.run(registry.get("vit"), args, cfg)
  minutes = (time.time() - tic) / 60
  errors = json.loads((Path(workdir) / "distill" / "distill_errors.json").read_text())
  groups = acm.get("mean_k_per_group", {})
  record = {
      "device": (f"{platform.machine()} CPU, {os.cpu_count()} cores" if jax.default_backend() == "cpu"
                 else jax.devices()[0].device_kind),
      "date": datetime.date.today().isoformat(), "minutes": round(minutes, 2), "budget": cfg.budget,
      "dense_top1": dense["top1"], "acm_top1": acm["top1"], "static_width_top1": static["top1"],
      "dense_gflops": dense["gflops_per_image"], "acm_gflops": acm["gflops_per_image"],
      "static_width_gflops": static["gflops_per_image"], "acm_compute_fraction": acm["compute_fraction"],
      "distinct_k_per_layer": acm["distinct_k_per_layer"],
      "mean_k_object": groups.get("object"), "mean_k_background": groups.get("background"),
      "distill_error_per_layer_per_k": errors, "command": "python3 -m benchmarks.embedded_default " + " ".join(extra),
  }
  checks = {
      "finishes in < 20 min": minutes < 20,
      "ACM within 2 points of dense": acm["top1"] >= dense["top1"] - 0.02,
      "ACM >= static + 3 points": acm["top1"] >= static["top1"] + 0.03,
      "every ACM uses >= 3 distinct k": min(acm["distinct_k_per_layer"].values()) >= 3,
      "more compute on object tokens": (groups.get("object") or 0) > (groups.get("background") or 0),
      "distillation error falls with k": all(all(a > b for a, b in zip(e, e[1:])) for e in errors.values()),
  }
  record["checks"] = checks
  (HERE / "results").mkdir(exist_ok=True)
  (HERE / "results" / "embedded_default.json").write_text(json.dumps(record, indent=2) + "\n")
  lines = [f"\n## Embedded default, `--phase=all` ({record['date']}, {record['device']})\n",
           f"Command: `{record['command']}`; {minutes:.1f} min.\n",
           "| model | top-1 | GFLOPs/image |", "|---|---|---|",
           f"| dense | {100 * dense['top1']:.2f} | {dense['gflops_per_image']:.4f} |",
           f"| ACM, budget {cfg.budget} (compute {acm['compute_fraction']:.2f}) | {100 * acm['top1']:.2f} | "
           f"{acm['gflops_per_image']:.4f} |",
           f"| static width k={cfg.resolved_static_k} | {100 * static['top1']:.2f} | {static['gflops_per_image']:.4f} |",
           "", f"Mean k on object tokens {groups.get('object', float('nan')):.2f}, on background tokens "
           f"{groups.get('background', float('nan')):.2f}; distinct k per layer {acm['distinct_k_per_layer']}.",
           "", "Distillation MSE per layer for k = 0..N (held-out tokens):", "",
           "| layer | " + " | ".join(f"k={k}" for k in range(len(next(iter(errors.values()))))) + " |",
           "|---|" + "---|" * len(next(iter(errors.values())))]
  lines += [f"| {path} | " + " | ".join(f"{v:.4f}" for v in e) + " |" for path, e in errors.items()]
  lines += ["", "Targets: " + "; ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in checks.items()), ""]
  with (HERE / "RESULTS.md").open("a") as f:
    f.write("\n".join(lines))
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
