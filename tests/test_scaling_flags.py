"""`benchmarks.scaling_bench --flag_sweep` (issue #22, item 3): the XLA_FLAGS of each variant, and the
sweep's records (variant, flags, speedup against the run without any overlap flag), with the
GPU measurement replaced by a stand-in that reads the flags it was given."""

import json

import pytest

from acm_jax import xla_flags
from benchmarks import scaling_bench


def test_variants_flag_by_flag_and_leave_one_out():
  user = "--xla_dump_to=/tmp/d --xla_gpu_enable_pipelined_all_gather=false"
  variants = scaling_bench.flag_variants(user)
  parse = xla_flags.parse_flags
  # the user's other flags stay in every variant; their setting of an overlap flag is not the baseline's
  assert parse(variants["none"]) == {"--xla_dump_to": "/tmp/d"}
  assert parse(variants["all"]) == {"--xla_dump_to": "/tmp/d", **xla_flags.GPU_OVERLAP_FLAGS}
  alone = {k: v for k, v in variants.items() if k not in ("none", "all")}
  assert len(alone) == len(xla_flags.GPU_OVERLAP_FLAGS)
  for name, flags in alone.items():
    assert parse(flags) == {"--xla_dump_to": "/tmp/d", f"--xla_gpu_{name}": "true"}
  out = scaling_bench.flag_variants("", ["enable_pipelined_all_gather"], leave_one_out=True)
  assert set(out) == {"none", "all", "without_enable_pipelined_all_gather"}
  without = parse(out["without_enable_pipelined_all_gather"])
  assert "--xla_gpu_enable_pipelined_all_gather" not in without
  assert len(without) == len(xla_flags.GPU_OVERLAP_FLAGS) - 1
  with pytest.raises(ValueError, match=r"unknown \['pipelined_nothing'\]"):
    scaling_bench.flag_variants("", ["pipelined_nothing"])


def test_sweep_records_each_variant_against_the_baseline(monkeypatch, capsys):
  rates = {"none": 100.0, "all": 125.0, "enable_latency_hiding_scheduler": 110.0}

  def fake_run_one(args, model, mode, gpus, flags):
    on = [name.removeprefix("--xla_gpu_") for name in xla_flags.parse_flags(flags)]
    key = "none" if not on else "all" if len(on) > 1 else on[0]
    return {"model": model, "mode": mode, "gpus": gpus, "images_per_s": rates[key], "xla_flags": flags}

  monkeypatch.setattr(scaling_bench, "_run_one", fake_run_one)
  monkeypatch.setenv("XLA_FLAGS", "")
  args = scaling_bench.argparse.Namespace(models="acm,dense", modes="fsdp", sweep_flags="enable_latency_hiding_scheduler",
                                          leave_one_out=False)
  records = scaling_bench.flag_sweep(args, 4)
  assert [(r["model"], r["variant"]) for r in records] == [
      (m, v) for m in ("acm", "dense") for v in ("none", "all", "enable_latency_hiding_scheduler")]
  assert [round(r["speedup_vs_none"], 6) for r in records[:3]] == [1.0, 1.25, 1.1]
  assert len(capsys.readouterr().out.strip().splitlines()) == 6  # one JSON line per child, as it goes
  table = scaling_bench._flag_table("GPU", 4, scaling_bench.argparse.Namespace(
      models="acm", modes="fsdp", per_gpu_batch=64, remat=False, scan=True, leave_one_out=False,
      sweep_flags=None), records[:3])
  assert "| acm | fsdp | 4 | all | 125.0 | 1.250 |" in table
  json.dumps(records)


def test_bad_sweep_flags_are_refused(capsys):
  with pytest.raises(SystemExit):
    scaling_bench.main(["--sweep_flags=enable_pipelined_all_gather"])
  assert "go with --flag_sweep" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    scaling_bench.main(["--flag_sweep", "--sweep_flags=bogus"])
  assert "unknown ['bogus']" in capsys.readouterr().err
