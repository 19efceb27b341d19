"""benchmarks/embed_ab.py on the CPU: a smoke run of the tiny ViT (XLA path) compiles every model under both
patch-embedding modes, records one row per (batch, mode, model) with ratios computed from its own timings, the
two modes' logits agree, and the module switch is put back."""

import json

import numpy as np
import pytest

from acm_jax.vit import model as vit
from benchmarks import embed_ab as ea


def test_smoke_run_records(tmp_path):
  before = vit.PATCH_EMBED
  records = ea.main(["--model", "tiny", "--impl", "xla", "--batches", "1,2", "--acm", "mlp", "--rounds", "1",
                     "--calls", "2", "--results-dir", str(tmp_path)])
  assert vit.PATCH_EMBED == before
  saved = json.loads((tmp_path / f"embed_ab_{records[0]['device'].lower().split()[0]}.json").read_text())
  assert saved == records
  assert sorted((r["batch"], r["patch_embed"], r["model"]) for r in records) == sorted(
      (b, m, k) for b in (1, 2) for m in vit.PATCH_EMBED_MODES for k in ("none", "mlp"))
  for rec in records:
    same = lambda mode, model: next(d for d in records if (d["batch"], d["patch_embed"], d["model"]) ==
                                    (rec["batch"], mode, model))
    assert rec["sync_ms"] > 0
    np.testing.assert_allclose(rec["ratio_to_dense"], same(rec["patch_embed"], "none")["sync_ms"] / rec["sync_ms"],
                               rtol=2e-3)
    np.testing.assert_allclose(rec["over_conv"], rec["sync_ms"] / same("conv", rec["model"])["sync_ms"], rtol=2e-3)
    assert rec["logits_match_conv"] < 2e-2  # bfloat16 weights and images; the same math in another order
    # each mode's program is its own (a reused trace would compile the first mode twice)
    assert rec["convolution_in_program"] is (rec["patch_embed"] == "conv")


def test_bad_flags_are_refused(capsys):
  for argv, message in ((["--rounds", "0"], "--rounds"), (["--acm", "attn"], "--acm")):
    with pytest.raises(SystemExit):
      ea.main(["--model", "tiny", "--impl", "xla", *argv])
    assert message in capsys.readouterr().err
