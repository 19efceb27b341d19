"""ACM against its baselines on the embedded default, timed, compared at matched
compute, and recorded in benchmarks/results/baselines_embedded.json and RESULTS.md.

  nice -n 10 python3 -m benchmarks.baselines_embedded [--workdir=runs/baselines_bench] [compare flags]

The workdir is kept (a killed run continues); the minutes recorded are those of
this invocation.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

from experiments import compare

HERE = Path(__file__).resolve().parent
BASELINES = ("static", "moefication", "early_exit", "token_halting")


def pareto(records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
  """Upper envelope of a curve: the points no cheaper point beats, by GFLOPs."""
  points = sorted((r["gflops_per_image"], r["top1"]) for r in records)
  front = []
  for g, t in points:
    if not front or t > front[-1][1]:
      front.append((g, t))
  return np.array([g for g, _ in front]), np.array([t for _, t in front])


def at_gflops(records: list[dict], level: float) -> float | None:
  """Top-1 of a curve's envelope at `level` GFLOPs, linearly interpolated; beyond
  its most expensive point the envelope is flat, below its cheapest it is undefined."""
  g, t = pareto(records)
  if len(g) == 0 or level < g[0] - 1e-12:
    return None
  return float(np.interp(level, g, t))


def matched(records: list[dict]) -> list[dict]:
  acm = [r for r in records if r["method"] == "acm"]
  g = sorted(r["gflops_per_image"] for r in acm)
  levels = [g[0], 0.5 * (g[0] + g[-1]), g[-1]]
  rows = []
  for level in levels:
    row = {"gflops_per_image": level, "acm": at_gflops(acm, level)}
    for method in BASELINES:
      row[method] = at_gflops([r for r in records if r["method"] == method], level)
    rows.append(row)
  return rows


def any_budget_checks(records: list[dict]) -> dict:
  calibrated = {r["budget_or_threshold"]: r for r in records if r["method"] == "acm_any_budget"}
  finetuned = {r["budget_or_threshold"]: r for r in records if r["method"] == "acm"}
  out = {}
  for b, r in sorted(calibrated.items()):
    entry = {"test_compute_fraction": r["compute_fraction"], "within_0.02": abs(r["compute_fraction"] - b) <= 0.02,
             "top1": r["top1"], "cost_shift": r["cost_shift"]}
    if b in finetuned:
      entry["finetuned_top1"] = finetuned[b]["top1"]
      entry["finetuned_compute_fraction"] = finetuned[b]["compute_fraction"]
      entry["within_1.5_points"] = r["top1"] >= finetuned[b]["top1"] - 0.015
    out[f"{b:g}"] = entry
  return out


def main(argv: list[str]) -> int:
  workdir = next((a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")), "runs/baselines_bench")
  extra = [a for a in argv if not a.startswith("--workdir=")]
  tic = time.time()
  args, cfg, bcfg = compare.parse([f"--workdir={workdir}", *extra])
  records = compare.run(args, cfg, bcfg)
  minutes = (time.time() - tic) / 60
  rows = matched(records)
  any_budget = any_budget_checks(records)
  record = {
      "device": (f"{platform.machine()} CPU, {os.cpu_count()} cores" if jax.default_backend() == "cpu"
                 else jax.devices()[0].device_kind),
      "date": datetime.date.today().isoformat(), "minutes": round(minutes, 2),
      "command": " ".join(["python3 -m benchmarks.baselines_embedded", *argv]),
      "curves": records, "matched_compute": rows, "any_budget": any_budget,
  }
  (HERE / "results").mkdir(exist_ok=True)
  (HERE / "results" / "baselines_embedded.json").write_text(json.dumps(record, indent=2) + "\n")
  pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}"
  lines = [f"\n## ACM vs baselines, embedded default ({record['date']}, {record['device']})\n",
           f"Command: `{record['command']}`; {minutes:.1f} min.\n",
           "| method | setting | GFLOPs/image | top-1 |", "|---|---|---|---|"]
  lines += [f"| {r['method']} | {r['setting']} | {r['gflops_per_image']:.5f} | {pct(r['top1'])} |"
            for r in sorted(records, key=lambda r: r["gflops_per_image"])]
  lines += ["", "Top-1 at matched compute (each curve's upper envelope, linearly interpolated; n/a: the "
            "method has no point that cheap):", "",
            "| GFLOPs/image | ACM | " + " | ".join(BASELINES) + " |", "|---|---|" + "---|" * len(BASELINES)]
  lines += [f"| {row['gflops_per_image']:.5f} | {pct(row['acm'])} | " + " | ".join(pct(row[m]) for m in BASELINES)
            + " |" for row in rows]
  lines += ["", "Any budget (the ACM finetuned at budget 0.5, gates shifted at inference):", "",
            "| target | test compute | top-1 | finetuned at target: top-1 (compute) |", "|---|---|---|---|"]
  for b, e in any_budget.items():
    ft = (f"{pct(e['finetuned_top1'])} ({e['finetuned_compute_fraction']:.3f})" if "finetuned_top1" in e else "-")
    lines.append(f"| {b} | {e['test_compute_fraction']:.3f} | {pct(e['top1'])} | {ft} |")
  lines.append("")
  with (HERE / "RESULTS.md").open("a") as f:
    f.write("\n".join(lines))
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
