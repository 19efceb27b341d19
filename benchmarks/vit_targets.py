"""Issue #21's speed targets against the recorded whole-model runs: one table per GPU.

    python3 -m benchmarks.vit_targets                       # every results/vit_<gpu>.json
    python3 -m benchmarks.vit_targets results/vit_h200.json --impl pallas

For every (ACMized blocks, r, batch) that #21 sets a target for (`vit_bench.TARGETS`), the newest record of
the file taken with the default switches (no opt-in fusion, unrolled blocks, the default attention) gives
the cell: ACM / dense (erf GELU) against the target, and what limits a miss: "routing" where the
static-width yardstick of the same run clears the target (the gate, the sort and the kernels cost the
difference), "yardstick" where it misses it too (the arithmetic left at that k, on that GPU, is short),
"no yardstick" for a run without one. The newest record wins by date, then by its place in the file
(records are appended); each cell names its date, since the cells of one table may come from several runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import vit_bench as vb

RESULTS = Path(__file__).parent / "results"
# fusion switches a run may have turned on; a record with any of them set is an A/B, not the default path
OPT_INS = ("norm_min_tokens", "residual_min_tokens", "mgpu_down_min_tokens", "mgpu_up_min_tokens")


def default_path(rec: dict, impl: str) -> bool:
  """Whether a record times ViT-B/16 with `impl` on the default path (no opt-in switch, unrolled blocks,
  the default attention, no `--xla-option` or `--acm-xla-option`, parameters in the tree layout, the convolution as
  patch embedding)."""
  return (rec.get("model", "vit_b16") == "vit_b16" and rec.get("impl") == impl and not rec.get("scanned")
          and rec.get("attention", "auto") == "auto" and all(rec.get(name) is None for name in OPT_INS)
          and not rec.get("xla_options") and not rec.get("acm_xla_options") and rec.get("layout", "tree") == "tree"
          and rec.get("patch_embed", "conv") == "conv")


def newest_cells(records: list[dict], impl: str = "pallas") -> dict:
  """{(acm, r, batch): the newest default-path record with a target, its verdict fields filled in}."""
  cells = {}
  for place, rec in enumerate(records):
    if not default_path(rec, impl):
      continue
    verdict = vb.target_verdict(rec)
    if not verdict:
      continue
    key = (rec["acm"], rec["r"], rec["batch"])
    if key not in cells or (rec["date"], place) >= (cells[key]["date"], cells[key]["place"]):
      cells[key] = {**rec, **verdict, "place": place}
  return cells


def table(cells: dict, device: str) -> str:
  """Markdown: one row per (ACMized blocks, r) of `TARGETS`, one column per batch."""
  batches = sorted({b for row in vb.TARGETS.values() for b in row})
  lines = [f"{device}: ACM / dense (erf GELU) against issue #21's target, what limits a miss, and the yardstick\n",
           "| ACMized | r | " + " | ".join(f"batch {b}" for b in batches) + " |",
           "|---|---|" + "---|" * len(batches)]
  for kind, r in vb.TARGETS:
    row = []
    for b in batches:
      rec = cells.get((kind, r, b))
      if rec is None:
        row.append("not measured")
        continue
      static = rec.get("static_ratio_to_dense")
      row.append(vb.verdict_cell(rec) + (f" (static {static:.2f}; " if static is not None else " (") + f"{rec['date']})")
    lines.append(f"| {kind} | {r} | " + " | ".join(row) + " |")
  met = sum(rec["meets_target"] for rec in cells.values())
  limits = [rec["target_limit"] for rec in cells.values() if not rec["meets_target"]]
  lines.append(f"\n{met} of {len(cells)} measured targets met; misses limited by the yardstick: "
               f"{limits.count('yardstick')}, by the routing: {limits.count('routing')}, "
               f"without a yardstick: {limits.count('no yardstick')}.")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("files", nargs="*", help="vit_<gpu>.json files (default: every results/vit_<gpu>.json)")
  parser.add_argument("--impl", default="pallas", help="the ACM path whose records are read")
  args = parser.parse_args(argv)
  files = [Path(f) for f in args.files] or sorted(p for p in RESULTS.glob("vit_*.json")
                                                  if p.stem.count("_") == 1 and p.stem != "vit_cpu")
  if not files:
    sys.exit(f"no vit_<gpu>.json under {RESULTS}: run `python3 -m benchmarks.vit_bench` on a GPU first")
  for path in files:
    if not path.is_file():
      sys.exit(f"no such results file: {path}")
    try:
      records = json.loads(path.read_text())
    except json.JSONDecodeError as err:
      sys.exit(f"{path} is not JSON: {err}")
    if not isinstance(records, list):
      sys.exit(f"{path}: expected a list of vit_bench records, got {type(records).__name__}")
    cells = newest_cells(records, args.impl)
    if not cells:
      print(f"{path}: no ViT-B/16 record on the default path with impl={args.impl}\n")
      continue
    device = next(iter(cells.values()))["device"]
    print(table(cells, f"{device} ({path.name})") + "\n")


if __name__ == "__main__":
  main()
