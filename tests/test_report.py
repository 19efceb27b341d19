"""The report: every figure from a tiny two-budget sweep, numbers that match eval.json, and bad input."""

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from experiments import plots as report_lib
from experiments import report as report_main
from experiments import vit_imagenet

TINY = ["--model=tiny", "--batch_size=16", "--eval_batch_size=32", "--eval_examples=32", "--pretrain_steps=4",
        "--distill_steps=2", "--gates_steps=2", "--finetune_steps=2", "--log_every=2", "--checkpoint_every=100",
        "--gate_hidden=8"]
REPORT = ["--examples=32", "--map_images=4"]


def write_benchmarks(folder: Path) -> Path:
  folder.mkdir(parents=True, exist_ok=True)
  kernel = [{"device": "H100", "date": "2026-11-24", "jax_version": "0.11", "d": d, "h": d, "num_learners": 4,
             "tokens": tokens, "r": r, "impl": impl, "ms": 1.0 * r + 0.05, "ratio_to_dense": r + 0.05}
            for d in (384, 768) for tokens in (8192, 50432) for r in (0.25, 0.5, 0.75, 1.0)
            for impl in ("dense_xla", "ideal", "overhead", "ragged_dot_xla", "pallas", "pallas_e2e")]
  vit = [{"device": "H100", "date": "2026-11-24", "model": "vit_b16", "r": 1.0, "impl": "dense",
          "images_per_s": 3000.0, "ratio_to_dense": 1.0}]
  vit += [{"device": "H100", "date": "2026-11-24", "model": "vit_b16_acm", "r": r, "impl": impl,
           "images_per_s": 3000 / (0.4 + 0.6 * r), "ratio_to_dense": 1 / (0.4 + 0.6 * r), "r_measured": r + 0.01}
          for impl in ("pallas", "xla") for r in (0.5, 0.25)]
  (folder / "kernel_h100.json").write_text(json.dumps(kernel))
  (folder / "vit_h100.json").write_text(json.dumps(vit))
  return folder


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
  path = tmp_path_factory.mktemp("sweep")
  assert vit_imagenet.main([f"--workdir={path}", "--phase=sweep", "--budgets=0.25,0.5", *TINY]) == 0
  return path


def summary_rows(summary: str) -> dict[str, list[str]]:
  rows = {}
  for line in summary.splitlines():
    cells = [c.strip() for c in line.strip("|").split("|")]
    if line.startswith("| ") and re.match(r"(pretrain|finetune_b|static_k)", cells[0]):
      rows[cells[0]] = cells
  return rows


@pytest.mark.xdist_group("report_workdir")  # one run of the module fixture, in one worker
def test_sweep_finetunes_and_evaluates_every_budget(workdir):
  for budget in ("0.25", "0.50"):
    record = json.loads((workdir / f"finetune_b{budget}" / "eval.json").read_text())
    assert record["model"] == f"acm_b{budget}"
  assert (workdir / "static_k2" / "eval.json").is_file() and (workdir / "pretrain" / "eval.json").is_file()


def check_corruption_eval(workdir, capsys):
  """--phase=eval --corruptions on the finished runs: top-1 per corruption and severity, mean, mCE."""
  assert vit_imagenet.main([f"--workdir={workdir}", "--phase=eval", "--corruptions=contrast,gaussian_noise",
                            "--severities=1,5", *TINY]) == 0
  result = json.loads((workdir / "imagenet_c.json").read_text())
  assert set(result["top1"]) == {"dense", "acm_b0.50", "static_k2"}
  per = result["top1"]["acm_b0.50"]
  assert set(per) == {"contrast", "gaussian_noise"} and set(per["contrast"]) == {"1", "5"}
  assert result["mean_top1"]["acm_b0.50"] == pytest.approx(sum(v for c in per.values() for v in c.values()) / 4)
  dense = result["top1"]["dense"]
  ce = sum(1 - v for v in per["contrast"].values()) / sum(1 - v for v in dense["contrast"].values())
  assert result["ce"]["acm_b0.50"]["contrast"] == pytest.approx(ce)
  assert result["ce"]["dense"]["mCE"] == pytest.approx(1.0)
  assert "mCE" in capsys.readouterr().out


@pytest.mark.xdist_group("report_workdir")  # one run of the module fixture, in one worker
def test_report_writes_every_figure_and_the_eval_numbers(workdir, tmp_path, capsys):
  bench = write_benchmarks(tmp_path / "bench")
  curves = [{"method": "MoEfication", "setting": f"k={k}", "gflops_per_image": 0.02 + 0.002 * k, "top1": 0.05 * k,
             "budget_or_threshold": k} for k in (1, 2, 3)]
  curves.append({"method": "acm", "setting": "finetuned at budget 0.5", "gflops_per_image": 1.0, "top1": 0.99,
                 "budget_or_threshold": 0.5})  # the same run as finetune_b0.50: drawn once, from its eval.json
  (workdir / "curves.json").write_text(json.dumps(curves))
  check_corruption_eval(workdir, capsys)
  out = tmp_path / "report"
  tic = time.time()
  assert report_main.main([f"--workdir={workdir}", f"--out={out}", f"--benchmarks={bench}", *REPORT]) == 0
  assert time.time() - tic < 90
  assert "skipped" not in capsys.readouterr().out
  for name in report_lib.FIGURES:
    assert (out / name).stat().st_size > 5000, name
    assert (out / name).stat().st_size < 400_000, name
  summary = (out / "summary.md").read_text()
  rows = summary_rows(summary)
  assert set(rows) == {"pretrain", "finetune_b0.25", "finetune_b0.50", "static_k2"}
  for name, cells in rows.items():
    record = json.loads((workdir / name / "eval.json").read_text())
    assert cells[1] == record["model"]
    assert float(cells[2]) == pytest.approx(100 * record["top1"], abs=0.005)
    assert float(cells[3]) == pytest.approx(record["gflops_per_image"], rel=1e-3)
    assert float(cells[4]) == pytest.approx(record.get("compute_fraction", 1.0), abs=5e-4)
    if name.startswith("finetune"):
      assert float(cells[5]) == pytest.approx(record["mean_k_per_group"]["object"], abs=0.005)
  for name in report_lib.FIGURES:
    assert f"]({name})" in summary
  assert "## Distribution shift" in summary and "| ACM β=0.25 |" in summary


def test_missing_or_empty_workdir_skips_with_reasons_and_still_draws_latency(tmp_path, capsys):
  bench = write_benchmarks(tmp_path / "bench")
  for workdir, reason in ((tmp_path / "missing", "does not exist"), (tmp_path / "empty", "holds no run")):
    (tmp_path / "empty").mkdir(exist_ok=True)
    out = tmp_path / f"out_{workdir.name}"
    assert report_main.main([f"--workdir={workdir}", f"--out={out}", f"--benchmarks={bench}"]) == 0
    printed = capsys.readouterr().out
    for name in report_lib.FIGURES:
      if name != "latency_vs_k.png":
        assert f"skipped {name}: " in printed and reason in printed
        assert not (out / name).exists()
    assert (out / "latency_vs_k.png").stat().st_size > 5000
    assert reason in (out / "summary.md").read_text()
  assert report_main.main([f"--workdir={tmp_path / 'missing'}", f"--out={tmp_path / 'none'}",
                           f"--benchmarks={tmp_path / 'nobench'}"]) == 1
  assert f"skipped latency_vs_k.png: no benchmark directory {tmp_path / 'nobench'}" in capsys.readouterr().out


def fake_run(workdir: Path, name: str, model: str, record: dict | None) -> None:
  (workdir / name).mkdir(parents=True)
  (workdir / name / "config.json").write_text(json.dumps({"model": model, "dataset": "synthetic", "num_learners": 4,
                                                          "workdir": str(workdir), "gate_hidden": 8}))
  if record is not None:
    (workdir / name / "eval.json").write_text(json.dumps(record))


def acm_record(model: str, top1: float, gflops: float) -> dict:
  share = [0.1, 0.2, 0.3, 0.2, 0.2]
  return {"model": model, "top1": top1, "gflops_per_image": gflops, "compute_fraction": 0.5, "examples": 32,
          "mean_k_per_layer": {f"block_{i}/mlp": 2.1 for i in range(4)},
          "k_share_per_layer": {f"block_{i}/mlp": share for i in range(4)}}


def test_mixed_models_missing_benchmarks_and_missing_phase_files_are_reported(tmp_path, capsys):
  workdir = tmp_path / "mixed"
  fake_run(workdir, "pretrain", "tiny", {"model": "dense", "top1": 0.5, "gflops_per_image": 0.035, "examples": 32})
  fake_run(workdir, "finetune_b0.50", "tiny", acm_record("acm_b0.50", 0.45, 0.026))
  fake_run(workdir, "finetune_b0.25", "tiny", acm_record("acm_b0.25", 0.40, 0.021))
  fake_run(workdir, "finetune_b0.75", "vit_s16", acm_record("acm_b0.75", 0.70, 3.1))
  fake_run(workdir, "static_k1", "tiny", None)
  (workdir / "static_k1" / "eval.json").write_text("{not json")
  (tmp_path / "bench").mkdir()
  out = tmp_path / "out"
  assert report_main.main([f"--workdir={workdir}", f"--out={out}", f"--benchmarks={tmp_path / 'bench'}",
                           *REPORT]) == 0
  printed = capsys.readouterr().out
  assert "runs of different models are mixed" in printed and "finetune_b0.75" in printed and "vit_s16" in printed
  assert f"skipped latency_vs_k.png: no kernel_<gpu>.json or vit_<gpu>.json in {tmp_path / 'bench'}" in printed
  assert "run static_k1 left out: evaluation at" in printed and "is not valid JSON" in printed
  assert "skipped distillation_error.png: no distillation errors" in printed
  assert "skipped gate_labels.png: no gate-label distribution" in printed
  assert "skipped token_compute_maps.png: no finished ACM run" in printed
  for name in ("accuracy_vs_gflops.png", "k_histograms.png", "collapse.png"):
    assert (out / name).stat().st_size > 5000
  rows = summary_rows((out / "summary.md").read_text())
  assert set(rows) == {"pretrain", "finetune_b0.25", "finetune_b0.50"}


def test_malformed_benchmark_rows_name_the_missing_keys(tmp_path):
  bench = tmp_path / "bench"
  bench.mkdir()
  (bench / "kernel_a100.json").write_text(json.dumps([{"device": "A100", "r": 0.5}]))
  report = report_lib.Report(tmp_path / "out")
  report.draw("latency_vs_k.png", lambda: report_lib.plot_latency(report, bench, None))
  assert report.skipped and "lack ['impl', 'ratio_to_dense']" in report.skipped[0][1]


def test_pareto_front_on_hand_made_points():
  points = [(1.0, 0.5), (2.0, 0.4), (2.0, 0.7), (3.0, 0.7), (0.5, 0.2), (4.0, 0.9)]
  assert report_lib.pareto_front(points) == [4, 0, 2, 5]


@pytest.mark.parametrize("budgets", ["0,0.5", "1.5", "a,b", ""])
def test_bad_budgets_stop_before_work(tmp_path, capsys, budgets):
  assert vit_imagenet.main([f"--workdir={tmp_path}", "--phase=sweep", f"--budgets={budgets}", *TINY]) == 2
  assert "--budgets must be comma-separated numbers in (0, 1]" in capsys.readouterr().err
  assert not any(tmp_path.iterdir())


def test_curves_of_compare_are_named_and_do_not_duplicate_our_runs(tmp_path):
  runs = [report_lib.Run("finetune_b0.50", tmp_path, {}, acm_record("acm_b0.50", 0.45, 0.026)),
          report_lib.Run("pretrain", tmp_path, {}, {"model": "dense", "top1": 0.5, "gflops_per_image": 0.035})]
  curves = [{"method": "acm", "setting": "b0.5", "gflops_per_image": 0.026, "top1": 0.45},
            {"method": "static", "setting": "k=2/4", "gflops_per_image": 0.024, "top1": 0.40},
            {"method": "moefication", "setting": "top2/16", "gflops_per_image": 0.03, "top1": 0.3}]
  points = report_lib.accuracy_points(runs, curves)
  assert sorted(p["method"] for p in points) == ["ACM (ours)", "MoEfication", "dense", "static width"]


def test_benchmark_rows_newest_per_measurement(tmp_path):
  """The GPU benchmarks append runs: the report keeps the newest row of each measurement,
  leaves out kernel_profile's per-piece rows, and draws one attention setting."""
  bench = tmp_path / "bench"
  bench.mkdir()
  row = {"device": "H100", "d": 768, "tokens": 50432, "num_learners": 4, "impl": "pallas_e2e", "r": 0.5}
  (bench / "kernel_h100.json").write_text(json.dumps([
      {**row, "date": "2026-11-24", "ratio_to_dense": 0.66}, {**row, "date": "2026-11-26", "ratio_to_dense": 0.48},
      {**row, "date": "2026-11-25", "ratio_to_dense": 0.51}, {**row, "r": 1.0, "date": "2026-11-24", "ratio_to_dense": 1.0}]))
  piece = {name: value for name, value in row.items() if name != "impl"}
  (bench / "kernel_profile_h100.json").write_text(json.dumps([{**piece, "part": "gate", "date": "2026-11-27",
                                                                "ratio_to_dense": 0.05}]))
  kernel = report_lib._load_benchmarks(bench, "kernel")
  assert sorted((r["r"], r["ratio_to_dense"]) for r in kernel) == [(0.5, 0.48), (1.0, 1.0)]
  vit_row = {"device": "H100", "model": "vit_b16_acm", "impl": "pallas", "r": 0.5}
  (bench / "vit_h100.json").write_text(json.dumps([
      {**vit_row, "date": "2026-11-25", "images_per_s": 8800.0},  # before the attention option: XLA's
      {**vit_row, "date": "2026-11-26", "images_per_s": 13600.0, "attention": "auto"},
      {**vit_row, "date": "2026-11-26", "images_per_s": 8780.0, "attention": "xla"}]))
  vit = report_lib._load_benchmarks(bench, "vit")
  assert [(r["attention"], r["images_per_s"]) for r in vit] == [("auto", 13600.0)]
