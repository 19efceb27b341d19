"""ACM against its baselines on the embedded default, timed, compared at matched
compute, and recorded in benchmarks/results/baselines_embedded.json and RESULTS.md.

  nice -n 10 python3 -m benchmarks.baselines_embedded [--workdir=runs/baselines_bench] [compare flags]

The any-budget model is the budget-conditioned one trained with budget groups, and
the ACMs finetuned per budget share its budget weight, unless flags say otherwise
(RECIPE: --budget_conditioning=true --budget_groups=4 --budget_weight_power=1.5
--budget_min=0.0625; given flags win). On the 2-core CPU the whole comparison from
scratch takes 53 min (RESULTS.md, 2026-12-03).

The workdir is kept (a killed run continues); the minutes recorded are those of
this invocation. The default dataset's record is the file's top level; another
--dataset (e.g. synthetic_shapes) goes to its "datasets" entry, the rest kept.
--variant=NAME records a recipe variant (e.g. other finetuning flags) under
"any_budget_variants"/NAME of its dataset's record instead, the record untouched.
The accuracy-vs-GFLOPs figure goes to docs/figures/baselines_<dataset>/.

  python3 -m benchmarks.baselines_embedded --any_budget_figure=NAME,NAME [--dataset=...]

draws (and runs nothing) the any-budget curves of the dataset's recorded variants NAME
("record": the record itself) into docs/figures/baselines_<dataset>/any_budget_vs_gflops.png.
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

from acm_jax.vit import task as vit_task
from experiments import compare
from experiments import plots as report_lib

HERE = Path(__file__).resolve().parent
DEFAULT_DATASET = "synthetic"
# the any-budget recipe of the record (#25): one model for every budget, 4 budgets per batch
RECIPE = ("--budget_conditioning=true", "--budget_groups=4", "--budget_weight_power=1.5", "--budget_min=0.0625")
BASELINES = ("static", "moefication", "early_exit", "token_halting", "acm_halting")


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
  if not acm:  # the any-budget model alone (--budgets=): no ACM curve to match the baselines at
    return []
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
  """Per target budget: where the one calibrated model landed on the test set, and
  how it compares to the separately finetuned models (at the same target, and
  their curve interpolated in compute at the calibrated model's test compute)."""
  calibrated = {r["budget_or_threshold"]: r for r in records if r["method"] == "acm_any_budget"}
  finetuned = {r["budget_or_threshold"]: r for r in records if r["method"] == "acm"}
  curve = sorted((r["compute_fraction"], r["top1"]) for r in finetuned.values())
  out = {}
  for b, r in sorted(calibrated.items()):
    entry = {"test_compute_fraction": r["compute_fraction"], "within_0.02": abs(r["compute_fraction"] - b) <= 0.02,
             "top1": r["top1"], "rule": r.get("rule", "global"),
             **{k: r[k] for k in ("cost_shift", "offsets", "budget_conditioning") if k in r}}
    if b in finetuned:
      entry["finetuned_top1"] = finetuned[b]["top1"]
      entry["finetuned_compute_fraction"] = finetuned[b]["compute_fraction"]
      entry["within_1.0_points"] = r["top1"] >= finetuned[b]["top1"] - 0.01
    if curve and curve[0][0] <= r["compute_fraction"] <= curve[-1][0]:
      entry["finetuned_interpolated_top1"] = float(np.interp(r["compute_fraction"], *zip(*curve)))
    out[f"{b:g}"] = entry
  budgets = sorted(calibrated)
  for lower, higher in zip(budgets, budgets[1:]):
    step = paired_step(calibrated[lower], calibrated[higher])
    if step is not None:
      out[f"{higher:g}"]["step_from_lower_budget"] = step
  return out


def paired_step(lower: dict, higher: dict) -> dict | None:
  """Top-1 change (points) from one eval record to another on the same test images, with its paired
  standard error: sd of the per-image difference in correctness / sqrt(images). A dip between two
  budgets is read against this error, not against each top-1's own. None without per-image records."""
  a, b = vit_task.decode_correct(lower), vit_task.decode_correct(higher)
  if a is None or b is None or len(a) != len(b) or len(a) < 2:
    return None
  diff = b.astype(np.float64) - a.astype(np.float64)
  return {"points": float(100 * diff.mean()), "paired_se": float(100 * diff.std(ddof=1) / np.sqrt(len(diff))),
          "gained": int(np.sum(diff > 0)), "lost": int(np.sum(diff < 0))}


def figure(records: list[dict], dataset: str) -> Path:
  out = HERE.parent / "docs" / "figures" / f"baselines_{dataset}"
  report = report_lib.Report(out)
  report_lib.plot_accuracy(report, [], records)
  return out / report.written[0][0]


def any_budget_figure(stored: dict, dataset: str, names: list[str], out: Path | None = None) -> Path:
  """The any-budget curves of `names` (variants of `dataset`'s record in `stored`, the contents of
  baselines_embedded.json; "record" is the record itself) in one accuracy-vs-GFLOPs figure."""
  record = stored if dataset == DEFAULT_DATASET else stored.get("datasets", {}).get(dataset, {})
  variants = {"record": record, **record.get("any_budget_variants", {})}
  unknown = [n for n in names if n not in variants or "curves" not in variants[n]]
  if unknown or not names:
    raise ValueError(f"--any_budget_figure: no recorded curves for {unknown or names} on {dataset}; "
                     f"recorded: {sorted(n for n, v in variants.items() if 'curves' in v)}")
  out = out or HERE.parent / "docs" / "figures" / f"baselines_{dataset}"
  report = report_lib.Report(out)
  report_lib.plot_any_budget(report, {n: variants[n]["curves"] for n in names}, f"One model for any budget, {dataset}")
  return out / report.written[0][0]


def main(argv: list[str]) -> int:
  names = next((a.split("=", 1)[1] for a in argv if a.startswith("--any_budget_figure=")), None)
  if names is not None:
    dataset = next((a.split("=", 1)[1] for a in argv if a.startswith("--dataset=")), DEFAULT_DATASET)
    stored = json.loads((HERE / "results" / "baselines_embedded.json").read_text())
    print(any_budget_figure(stored, dataset, [n for n in names.split(",") if n]))
    return 0
  workdir = next((a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")), "runs/baselines_bench")
  variant = next((a.split("=", 1)[1] for a in argv if a.startswith("--variant=")), None)
  extra = [a for a in argv if not a.startswith(("--workdir=", "--variant="))]
  tic = time.time()
  args, cfg, bcfg = compare.parse([f"--workdir={workdir}", *RECIPE, *extra])  # later flags win
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
  if variant is None:  # a variant's curves would replace the record's figure
    record["figure"] = str(figure(records, cfg.dataset).relative_to(HERE.parent))
  (HERE / "results").mkdir(exist_ok=True)
  path = HERE / "results" / "baselines_embedded.json"
  stored = json.loads(path.read_text()) if path.exists() else {}
  if variant is not None:
    # a recipe variant beside the record: its any-budget entry and run, the record itself untouched
    target = stored if cfg.dataset == DEFAULT_DATASET else stored.setdefault("datasets", {}).setdefault(cfg.dataset, {})
    target.setdefault("any_budget_variants", {})[variant] = {
        "any_budget": any_budget, **{k: record[k] for k in ("device", "date", "minutes", "command", "curves")}}
  elif cfg.dataset != DEFAULT_DATASET:
    stored.setdefault("datasets", {})[cfg.dataset] = record
  elif set(args.methods.split(",")) == {"acm"} and "curves" in stored:
    # an ACM-only run renews the any-budget entry and keeps the full comparison it was not part of
    stored["any_budget"] = any_budget
    stored["any_budget_run"] = {k: record[k] for k in ("device", "date", "minutes", "command", "curves", "figure")}
  else:
    stored = {**record, **({"datasets": stored["datasets"]} if "datasets" in stored else {})}
  path.write_text(json.dumps(stored, indent=2) + "\n")
  pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}"
  lines = [f"\n## ACM vs baselines, {cfg.dataset} ({record['date']}, {record['device']})\n",
           f"Command: `{record['command']}`; {minutes:.1f} min.\n",
           "| method | setting | GFLOPs/image | top-1 |", "|---|---|---|---|"]
  lines += [f"| {r['method']} | {r['setting']} | {r['gflops_per_image']:.5f} | {pct(r['top1'])} |"
            for r in sorted(records, key=lambda r: r["gflops_per_image"])]
  lines += ["", "Top-1 at matched compute (each curve's upper envelope, linearly interpolated; n/a: the "
            "method has no point that cheap):", "",
            "| GFLOPs/image | ACM | " + " | ".join(BASELINES) + " |", "|---|---|" + "---|" * len(BASELINES)]
  lines += [f"| {row['gflops_per_image']:.5f} | {pct(row['acm'])} | " + " | ".join(pct(row[m]) for m in BASELINES)
            + " |" for row in rows]
  source = (f"one ACM finetuned with budget-conditioned gates over [{cfg.budget_min:g}, {cfg.budget_max:g}] "
            f"(drawn {cfg.budget_draw.replace('_', '-')}"
            + (f", stratified over {cfg.budget_groups} groups of each batch" if cfg.budget_groups > 1 else "") + "), "
            f"calibration on top: {bcfg.calibration}" if cfg.budget_conditioning else
            f"the ACM finetuned at budget {args.any_budget_model:g}, gates recalibrated at inference, "
            f"rule {bcfg.calibration}")
  lines += ["", f"Any budget ({source}):", "",
            "| target | test compute | top-1 | finetuned at target: top-1 (compute) | finetuned curve at that compute "
            "| step from the budget below: points (paired SE) |",
            "|---|---|---|---|---|---|"]
  for b, e in any_budget.items():
    ft = (f"{pct(e['finetuned_top1'])} ({e['finetuned_compute_fraction']:.3f})" if "finetuned_top1" in e else "-")
    step = e.get("step_from_lower_budget")
    step = "-" if step is None else f"{step['points']:+.2f} ({step['paired_se']:.2f})"
    lines.append(f"| {b} | {e['test_compute_fraction']:.3f} | {pct(e['top1'])} | {ft} | "
                 f"{pct(e.get('finetuned_interpolated_top1'))} | {step} |")
  lines.append("")
  with (HERE / "RESULTS.md").open("a") as f:
    f.write("\n".join(lines))
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
