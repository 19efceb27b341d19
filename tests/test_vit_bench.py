"""The model setup benchmarks/vit_bench.py shares with serve_profile and graph_probe, and a CPU smoke run
of the script (the kernels' timing itself needs a GPU)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from acm_jax.vit import model as vit
from benchmarks import vit_bench as vb


def test_bf16_params_are_the_models_own_init_in_bfloat16():
  cfg = vit.get_config("tiny")
  image = jax.random.normal(jax.random.key(3), (1, cfg.image_size, cfg.image_size, 3))
  model = vit.ViT(cfg)
  got = vb.bf16_params(model, image)
  want = model.init(jax.random.key(1), image)["params"]
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w.astype(jnp.bfloat16), np.float32))


@pytest.mark.parametrize("kind, attention", [("mlp", False), ("mlp_qkvo", True)])
def test_acm_config_acmizes_the_blocks_of_each_kind(kind, attention):
  cfg = vb.acm_config(vit.get_config("tiny"), kind, "xla")
  assert cfg.acm.attention is attention and cfg.acm.num_learners == vb.NUM_LEARNERS and cfg.acm.impl == "xla"
  image = jnp.ones((1, cfg.image_size, cfg.image_size, 3))
  params = vb.bf16_params(vit.ViT(cfg), image)
  for block in (params[f"block_{i}"] for i in range(cfg.depth)):
    assert {"w1", "w2", "gate"} <= set(block["mlp"])
    for proj in ("query", "key", "value", "out"):
      assert ("gate" in block["attn"][proj]) is attention


def test_gelu_tanh_dense_model_is_the_same_weights_within_gelus_forms():
  """The second baseline of vit_bench: the dense model with GELU's tanh form takes the erf model's
  parameters and stays within the two forms' difference (|d| <= 5e-4 per unit) of its logits."""
  cfg = vit.get_config("tiny")
  images = jax.random.normal(jax.random.key(4), (2, cfg.image_size, cfg.image_size, 3))
  erf_model = vit.ViT(cfg)
  tanh_model = vit.ViT(dataclasses.replace(cfg, activation="gelu_tanh").validate())
  params = erf_model.init(jax.random.key(5), images)["params"]
  erf, tanh = (np.asarray(m.apply({"params": params}, images), np.float64) for m in (erf_model, tanh_model))
  diff = np.abs(erf - tanh).max() / np.abs(erf).max()
  assert 0 < diff < 1e-2


@pytest.mark.parametrize("tanh_baseline", [True, False])
def test_main_on_the_cpu_records_the_issue_fields_and_the_tanh_baseline(tanh_baseline, tmp_path, monkeypatch):
  """A smoke run of the script on the tiny model (--impls xla runs without a GPU): every row carries
  the fields other tools read, the ACM rows their ratio to the tanh-GELU dense model when it is timed."""
  monkeypatch.setenv("OUT", str(tmp_path))
  monkeypatch.setattr(vb, "ROUNDS", 1)
  argv = ["--model", "tiny", "--batches", "2", "--acm", "mlp,mlp_qkvo", "--ratios", "0.5", "--impls", "xla",
          "--attention", "xla", "--results-dir", str(tmp_path), "--no-append"]
  vb.main(argv + ([] if tanh_baseline else ["--no-dense-gelu-tanh"]))
  rows = json.loads(next(tmp_path.glob("vit_*.json")).read_text())
  issue_fields = {"device", "date", "jax_version", "batch", "acm", "r", "r_measured", "impl", "attention",
                  "images_per_s", "ratio_to_dense", "ideal_ratio"}
  assert sorted(r["acm"] for r in rows) == ["mlp", "mlp_qkvo", "none"]
  for row in rows:
    assert issue_fields <= set(row) and row["batch"] == 2 and row["images_per_s"] > 0
    assert ("images_per_s_gelu_tanh" in row or "ratio_to_dense_tanh" in row) is tanh_baseline
    if row["acm"] != "none":
      assert row["check_passed"] and 0 < row["r_measured"] < 1 and row["ideal_ratio"] > 1
      if tanh_baseline:
        assert row["ratio_to_dense_tanh"] == pytest.approx(row["images_per_s"] / row["dense_tanh_images_per_s"],
                                                           rel=1e-3)
  table = (tmp_path / "vit_table.md").read_text()
  assert "| mlp_qkvo | 0.5 |" in table and ("Dense with GELU's tanh form" in table) is tanh_baseline


def test_fusion_flags_set_the_switches_and_are_recorded(tmp_path, monkeypatch):
  """--norm-min-tokens / --norm-mode / --residual-min-tokens set acm_fused's switches (-1: off) and every
  ACM row records them."""
  from pallas_kernels import acm_fused
  for name in ("NORM_MIN_TOKENS", "NORM_MODE", "RESIDUAL_MIN_TOKENS"):  # restored after the test
    monkeypatch.setattr(acm_fused, name, getattr(acm_fused, name))
  parser = __import__("argparse").ArgumentParser()
  vb.add_fusion_flags(parser)
  got = vb.apply_fusion_flags(parser.parse_args(["--norm-min-tokens", "4096", "--norm-mode", "prologue",
                                                 "--residual-min-tokens", "-1"]))
  assert got == {"norm_min_tokens": 4096, "norm_mode": "prologue", "residual_min_tokens": None}
  assert (acm_fused.NORM_MIN_TOKENS, acm_fused.NORM_MODE, acm_fused.RESIDUAL_MIN_TOKENS) == (4096, "prologue", None)
  with pytest.raises(SystemExit):
    parser.parse_args(["--norm-mode", "epilogue"])
  monkeypatch.setattr(vb, "ROUNDS", 1)
  monkeypatch.setenv("OUT", str(tmp_path))  # where the script writes its table
  vb.main(["--model", "tiny", "--batches", "2", "--acm", "mlp", "--ratios", "0.5", "--impls", "xla", "--attention",
           "xla", "--no-dense-gelu-tanh", "--norm-min-tokens", "0", "--residual-min-tokens", "0",
           "--results-dir", str(tmp_path), "--no-append"])
  rows = [r for r in json.loads(next(tmp_path.glob("vit_*.json")).read_text()) if r["acm"] != "none"]
  assert rows and all((r["norm_min_tokens"], r["norm_mode"], r["residual_min_tokens"]) == (0, "prologue", 0)
                      for r in rows)


def test_main_refuses_the_kernels_without_a_gpu():
  if jax.default_backend() == "gpu":
    pytest.skip("the refusal is for backends without a GPU")
  with pytest.raises(SystemExit, match="only --impls xla runs elsewhere"):
    vb.main(["--model", "tiny", "--impls", "pallas", "--no-append"])
