"""Issue #21's targets: the verdict vit_bench records per row, and benchmarks/vit_targets.py, which draws the
table from recorded runs (on records written here, not the repository's)."""

import json

import pytest

from benchmarks import vit_bench as vb
from benchmarks import vit_targets as vt


def record(batch=8, acm="mlp", r=0.5, ratio=1.0, static=None, date="2026-12-05", **extra):
  rec = {**dict(device="NVIDIA H200", date=date, batch=batch, acm=acm, r=r, impl="pallas", attention="auto",
                ratio_to_dense=ratio, scanned=False), **extra}
  if static is not None:
    rec["static_ratio_to_dense"] = static
  return rec


@pytest.mark.parametrize("ratio, static, met, limit", [
    (1.10, 1.30, True, "met"),     # exactly at the target counts as met
    (1.09, 1.30, False, "routing"),  # the yardstick clears it: the routing costs the difference
    (1.09, 1.10, False, "routing"),
    (1.05, 1.09, False, "yardstick"),  # the static-width model misses it too
    (1.05, None, False, "no yardstick"),
])
def test_verdicts_name_what_limits_a_miss(ratio, static, met, limit):
  got = vb.target_verdict(record(batch=8, ratio=ratio, static=static))
  assert got == dict(target_ratio=1.10, meets_target=met, target_limit=limit)
  assert vb.verdict_cell({**record(ratio=ratio), **got}) == f"{ratio:.2f} {'>=' if met else '<'} 1.10, {limit}"


def test_targets_are_the_issues_table_and_only_for_its_cells():
  assert vb.target_verdict(record(batch=256, acm="mlp_qkvo", r=0.25, ratio=2.2))["target_ratio"] == 2.10
  assert vb.target_verdict(record(batch=32, acm="mlp", r=0.25, ratio=1.0))["target_ratio"] == 1.45
  assert vb.target_verdict(record(batch=16)) == {}  # no target at batch 16
  assert vb.target_verdict(record(r=0.75)) == {}
  assert vb.target_verdict(record(acm="none")) == {}
  assert vb.target_verdict(record(), model="tiny") == {}
  lines = vb.verdict_lines([{**record(ratio=1.2), **vb.target_verdict(record(ratio=1.2))}, record(batch=16)], [8, 16])
  assert lines[-1] == "| mlp | 0.5 | pallas | 1.20 >= 1.10, met |  |"
  assert vb.verdict_lines([record(batch=16)], [16]) == []


def test_the_newest_default_path_record_gives_each_cell():
  records = [
      record(ratio=1.01, static=1.2, date="2026-12-04"),
      record(ratio=1.02, static=1.2, date="2026-12-05"),
      record(ratio=1.50, static=1.6, date="2026-12-05", norm_min_tokens=0),  # an opt-in fusion: an A/B, skipped
      record(ratio=1.50, static=1.6, date="2026-12-06", impl="xla"),  # another impl
      record(ratio=1.50, static=1.6, date="2026-12-06", scanned=True),
      record(ratio=1.50, static=1.6, date="2026-12-06", xla_options={"xla_gpu_enable_command_buffer": ""}),
      record(ratio=1.04, static=1.0, date="2026-12-05", xla_options={}),  # no option given: the default path
      record(ratio=1.50, static=1.6, date="2026-12-06", layout="packed"),  # another parameter layout
      record(ratio=1.04, static=1.0, date="2026-12-05", layout="tree"),
      record(ratio=1.50, static=1.6, date="2026-12-06", acm_xla_options={"xla_gpu_enable_command_buffer": ""}),
      record(ratio=1.50, static=1.6, date="2026-12-06", patch_embed="matmul"),  # the opt-in patch embedding
      record(ratio=1.04, static=1.0, date="2026-12-05", patch_embed="conv"),
      record(ratio=1.03, static=1.0, date="2026-12-05"),  # same date, later in the file: newest
      record(ratio=1.01, static=1.2, date="2026-12-01"),  # older, though later in the file
      record(batch=256, ratio=1.5, static=1.4),
  ]
  cells = vt.newest_cells(records)
  assert set(cells) == {("mlp", 0.5, 8), ("mlp", 0.5, 256)}
  assert cells["mlp", 0.5, 8]["ratio_to_dense"] == 1.03 and cells["mlp", 0.5, 8]["target_limit"] == "yardstick"
  assert cells["mlp", 0.5, 256]["meets_target"]
  assert vt.newest_cells(records, impl="xla")["mlp", 0.5, 8]["ratio_to_dense"] == 1.50


def test_main_prints_one_table_per_file_and_counts_the_limits(tmp_path, capsys):
  path = tmp_path / "vit_h200.json"
  path.write_text(json.dumps([record(batch=8, ratio=1.03, static=1.23), record(batch=32, ratio=1.22, static=1.24),
                              record(batch=256, ratio=1.45, static=1.35), record(batch=1, acm="mlp_qkvo", ratio=0.6)]))
  vt.main([str(path)])
  out = capsys.readouterr().out
  assert "| mlp | 0.5 | not measured | 1.03 < 1.10, routing (static 1.23; 2026-12-05) | " in out
  assert "1.22 < 1.25, yardstick (static 1.24; 2026-12-05)" in out and "1.45 >= 1.42, met" in out
  assert "| mlp_qkvo | 0.5 | 0.60 < 1.00, no yardstick (2026-12-05) |" in out
  assert ("1 of 4 measured targets met; misses limited by the yardstick: 1, by the routing: 1, without a "
          "yardstick: 1.") in out


def test_bad_files_are_named(tmp_path):
  with pytest.raises(SystemExit, match="no such results file"):
    vt.main([str(tmp_path / "missing.json")])
  bad = tmp_path / "vit_x.json"
  bad.write_text("{")
  with pytest.raises(SystemExit, match="not JSON"):
    vt.main([str(bad)])
  bad.write_text("{}")
  with pytest.raises(SystemExit, match="expected a list"):
    vt.main([str(bad)])
