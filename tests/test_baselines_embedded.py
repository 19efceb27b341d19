"""The comparison record's writer: a --variant run lands beside the record, which it leaves as it was."""

import json

import numpy as np
import pytest

from benchmarks import baselines_embedded
from experiments import compare
from experiments import plots as report_lib


def record(method, budget, compute, top1):
  return {"method": method, "setting": f"{method} {budget:g}", "budget_or_threshold": budget,
          "gflops_per_image": 0.01 + 0.02 * compute, "top1": top1, "compute_fraction": compute}


RECORDS = [record("dense", 1.0, 1.0, 0.96), record("acm", 0.25, 0.26, 0.92), record("acm", 0.5, 0.49, 0.94),
           record("acm", 0.75, 0.77, 0.95), record("acm_any_budget", 0.25, 0.24, 0.90),
           record("acm_any_budget", 0.5, 0.51, 0.935)]


def test_variant_is_recorded_beside_the_record(tmp_path, monkeypatch):
  monkeypatch.setattr(baselines_embedded, "HERE", tmp_path)
  monkeypatch.setattr(compare, "run", lambda args, cfg, bcfg: RECORDS)

  def no_figure(*_):
    raise AssertionError("a variant must not redraw the record's figure")

  monkeypatch.setattr(baselines_embedded, "figure", no_figure)
  (tmp_path / "results").mkdir()
  stored = {"any_budget": {"0.25": {"top1": 0.5}}, "curves": [], "figure": "kept.png"}
  path = tmp_path / "results" / "baselines_embedded.json"
  path.write_text(json.dumps(stored))
  assert baselines_embedded.main(["--methods=acm", "--budget_conditioning=true", "--variant=low"]) == 0
  saved = json.loads(path.read_text())
  assert {k: saved[k] for k in stored} == stored
  variant = saved["any_budget_variants"]["low"]
  assert variant["command"].endswith("--variant=low") and variant["curves"] == RECORDS
  low, mid = variant["any_budget"]["0.25"], variant["any_budget"]["0.5"]
  assert low["within_0.02"] and mid["within_0.02"]
  assert low["finetuned_top1"] == 0.92 and not low["within_1.0_points"] and mid["within_1.0_points"]
  np.testing.assert_allclose(mid["finetuned_interpolated_top1"], np.interp(0.51, [0.26, 0.49, 0.77],
                                                                           [0.92, 0.94, 0.95]))
  assert "finetuned_interpolated_top1" not in low  # cheaper than every reference
  assert "## ACM vs baselines, synthetic" in (tmp_path / "RESULTS.md").read_text()


def test_any_budget_figure_is_a_png_from_hand_made_records(tmp_path, monkeypatch):
  """Two recipes' any-budget curves, one of them a variant of another data set's record, drawn from
  the JSON file alone; unknown names and records without an any-budget curve are refused."""
  monkeypatch.setattr(baselines_embedded, "HERE", tmp_path / "bench")
  shifted = [dict(r, top1=r["top1"] - 0.01) for r in RECORDS]
  stored = {"curves": RECORDS, "datasets": {"synthetic_shapes": {
      "curves": [record("dense", 1.0, 1.0, 0.7)], "any_budget_variants": {"nested": {"curves": shifted}}}}}
  (tmp_path / "bench" / "results").mkdir(parents=True)
  (tmp_path / "bench" / "results" / "baselines_embedded.json").write_text(json.dumps(stored))
  path = baselines_embedded.any_budget_figure(stored, "synthetic", ["record"], tmp_path / "out")
  assert path.name == "any_budget_vs_gflops.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert path.stat().st_size > 5000
  assert baselines_embedded.main(["--dataset=synthetic_shapes", "--any_budget_figure=nested"]) == 0
  drawn = tmp_path / "docs" / "figures" / "baselines_synthetic_shapes" / "any_budget_vs_gflops.png"
  assert drawn.stat().st_size > 5000
  with pytest.raises(ValueError, match=r"no recorded curves for \['absent'\]"):
    baselines_embedded.any_budget_figure(stored, "synthetic_shapes", ["absent"], tmp_path / "out2")
  with pytest.raises(report_lib.Skip, match="no any-budget curve"):  # the shapes record itself has none
    baselines_embedded.any_budget_figure(stored, "synthetic_shapes", ["record"], tmp_path / "out2")


def test_any_budget_model_alone_is_recorded(tmp_path, monkeypatch):
  """--budgets= (no ACM finetuned per budget): no matched-compute rows, the any-budget entry without references."""
  monkeypatch.setattr(baselines_embedded, "HERE", tmp_path)
  alone = [r for r in RECORDS if r["method"] != "acm"]
  monkeypatch.setattr(compare, "run", lambda args, cfg, bcfg: alone)
  (tmp_path / "results").mkdir()
  assert baselines_embedded.main(["--methods=acm", "--budgets=", "--budget_conditioning=true", "--variant=alone"]) == 0
  variant = json.loads((tmp_path / "results" / "baselines_embedded.json").read_text())["any_budget_variants"]["alone"]
  assert sorted(variant["any_budget"]) == ["0.25", "0.5"]
  assert all("finetuned_top1" not in e for e in variant["any_budget"].values())


def test_the_record_recipe_is_the_default_and_given_flags_win(tmp_path, monkeypatch):
  """Without flags the comparison trains the budget-conditioned model with 4 budget groups (and the
  references with its budget weight); a flag on the command line overrides its part of the recipe."""
  monkeypatch.setattr(baselines_embedded, "HERE", tmp_path)
  seen = []
  monkeypatch.setattr(compare, "run", lambda args, cfg, bcfg: seen.append(cfg) or RECORDS)
  (tmp_path / "results").mkdir()
  assert baselines_embedded.main(["--methods=acm", "--variant=default"]) == 0
  assert baselines_embedded.main(["--methods=acm", "--budget_groups=2", "--budget_conditioning=false",
                                  "--variant=mine"]) == 0
  default, mine = seen
  assert (default.budget_conditioning, default.budget_groups, default.budget_weight_power, default.budget_min) == (
      True, 4, 1.5, 0.0625)
  assert (mine.budget_conditioning, mine.budget_groups, mine.budget_weight_power) == (False, 2, 1.5)


def with_correct(rec, correct):
  from acm_jax.vit import task as vit_task
  return {**rec, "examples": len(correct), **vit_task.correct_bits([(correct, {})])}


def test_correct_bits_round_trip_drops_padding():
  from acm_jax.vit import task as vit_task
  rng = np.random.default_rng(3)
  host, expect = [], []
  for rows in (7, 16, 5):  # packed bits do not end on a byte
    correct, valid = rng.random(rows) < 0.6, rng.random(rows) < 0.8
    host.append((correct, {"valid": valid}))
    expect += [c for c, v in zip(correct, valid) if v]
  record = {"examples": len(expect), **vit_task.correct_bits(host)}
  np.testing.assert_array_equal(vit_task.decode_correct(record), np.array(expect))
  assert vit_task.decode_correct({"examples": 3}) is None


def test_any_budget_steps_carry_paired_errors():
  import statistics
  rng = np.random.default_rng(4)
  n = 500
  a = rng.random(n) < 0.7
  b = np.where(rng.random(n) < 0.9, a, ~a)  # mostly the same images right, as two budgets of one model are
  low = with_correct(record("acm_any_budget", 0.25, 0.25, float(a.mean())), a)
  high = with_correct(record("acm_any_budget", 0.5, 0.5, float(b.mean())), b)
  checks = baselines_embedded.any_budget_checks([low, high, record("acm", 0.5, 0.5, 0.7)])
  assert "step_from_lower_budget" not in checks["0.25"]
  step = checks["0.5"]["step_from_lower_budget"]
  d = [int(y) - int(x) for x, y in zip(a, b)]
  assert step["points"] == pytest.approx(100 * (b.sum() - a.sum()) / n)
  assert step["paired_se"] == pytest.approx(100 * statistics.stdev(d) / n ** 0.5)
  assert (step["gained"], step["lost"]) == (sum(x == 1 for x in d), sum(x == -1 for x in d))
  # the paired error of a difference is far below the unpaired one when the budgets agree on most images
  unpaired = 100 * (a.var(ddof=1) / n + b.var(ddof=1) / n) ** 0.5
  assert step["paired_se"] < 0.7 * unpaired
  # records without per-image correctness (older runs) have no step entry
  assert "step_from_lower_budget" not in baselines_embedded.any_budget_checks(RECORDS)["0.5"]


def test_correct_bits_are_left_out_when_rows_do_not_match_the_batch():
  from acm_jax.vit import task as vit_task
  assert vit_task.correct_bits([(np.ones(8, bool), {"valid": np.ones(4, bool)})]) == {}
