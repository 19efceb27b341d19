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


@pytest.mark.parametrize("baselines", [True, False])
def test_main_on_the_cpu_records_the_issue_fields_and_the_baselines(baselines, tmp_path, monkeypatch):
  """A smoke run of the script on the tiny model (--impls xla runs without a GPU): every row carries
  the fields other tools read, the ACM rows their ratios to the tanh-GELU dense model and of the
  static-width yardstick when those are timed."""
  monkeypatch.setenv("OUT", str(tmp_path))
  monkeypatch.setattr(vb, "ROUNDS", 1)
  argv = ["--model", "tiny", "--batches", "2", "--acm", "mlp,mlp_qkvo", "--ratios", "0.5", "--impls", "xla",
          "--attention", "xla", "--results-dir", str(tmp_path), "--no-append"]
  vb.main(argv + ([] if baselines else ["--no-dense-gelu-tanh", "--no-static"]))
  rows = json.loads(next(tmp_path.glob("vit_*.json")).read_text())
  issue_fields = {"device", "date", "jax_version", "batch", "acm", "r", "r_measured", "impl", "attention",
                  "images_per_s", "ratio_to_dense", "ideal_ratio"}
  assert sorted(r["acm"] for r in rows) == ["mlp", "mlp_qkvo", "none"]
  for row in rows:
    assert issue_fields <= set(row) and row["batch"] == 2 and row["images_per_s"] > 0
    assert ("images_per_s_gelu_tanh" in row or "ratio_to_dense_tanh" in row) is baselines
    assert "target_ratio" not in row  # issue #21 sets targets for ViT-B/16 only
    if row["acm"] != "none":
      assert row["check_passed"] and 0 < row["r_measured"] < 1 and row["ideal_ratio"] > 1
      assert ("static_ratio_to_dense" in row) is baselines
      if baselines:
        assert row["ratio_to_dense_tanh"] == pytest.approx(row["images_per_s"] / row["dense_tanh_images_per_s"],
                                                           rel=1e-3)
        assert row["static_ratio_to_dense"] == pytest.approx(row["static_images_per_s"] / row["dense_images_per_s"],
                                                             rel=1e-3)
        widths = row["static_widths"]
        assert widths["mlp"] % vb.STATIC_MULTIPLE == 0 and (widths["attn"] is None) is (row["acm"] == "mlp")
  table = (tmp_path / "vit_table.md").read_text()
  assert "| mlp_qkvo | 0.5 |" in table and ("Dense with GELU's tanh form" in table) is baselines
  assert (", static " in table) is baselines


def test_static_widths_round_the_mean_compute_to_tile_multiples():
  cfg = vb.acm_config(vit.get_config("vit_b16"), "mlp_qkvo")  # learners of 768 (MLP) and 96 (projections)
  assert vb.static_widths(cfg, {"mlp": 2.0, "attn": 2.08}) == {"mlp": 1536, "attn": 192}
  assert vb.static_widths(cfg, {"mlp": 1.04, "attn": 1.28}) == {"mlp": 800, "attn": 128}
  assert vb.static_widths(cfg, {"mlp": 0.0, "attn": None}) == {"mlp": 16, "attn": None}  # never a zero width
  static = vb.static_config(cfg, {"mlp": 800, "attn": 128})
  assert static.acm.num_learners == 1 and static.acm.impl == "xla"
  assert static.acm.mlp_learner_width(static.mlp_dim) == 800 and static.acm.attention_learner_width(static.dim) == 128


def _static_params(params, k, num_learners):
  """An ACM model's parameters cut to its first k learners as the one-learner static model holds them:
  w1, b1 and w2 sliced, the output bias as (b2[0], b2[1] + ... + b2[k]); the gates are the static model's."""
  if isinstance(params, dict) and "w1" in params:
    width = params["w1"].shape[1] // num_learners * k
    b2 = params["b2"]
    return {**params, "w1": params["w1"][:, :width], "b1": params["b1"][:width], "w2": params["w2"][:width],
            "b2": jnp.stack([b2[0], b2[1:k + 1].sum(0)])}
  if isinstance(params, dict):
    return {name: _static_params(value, k, num_learners) for name, value in params.items()}
  return params


@pytest.mark.parametrize("kind", ["mlp", "mlp_qkvo"])
def test_static_yardstick_computes_the_acm_at_a_fixed_k(kind):
  """The yardstick is the ACM model with every token at k learners: cut to k = 2 of 4 learners, its logits
  equal the ACM model's in mode "fixed" (float32, XLA), on random weights and output biases."""
  acm_cfg = vb.acm_config(vit.get_config("tiny"), kind, "xla")
  images = jax.random.normal(jax.random.key(7), (2, acm_cfg.image_size, acm_cfg.image_size, 3))
  acm_model = vit.ViT(acm_cfg)
  params = acm_model.init(jax.random.key(8), images)["params"]
  params = jax.tree_util.tree_map_with_path(  # output biases are zero at init: make them random
      lambda path, a: jax.random.normal(jax.random.key(len(str(path))), a.shape) * 0.1
      if path[-1] == jax.tree_util.DictKey("b2") else a, params)
  assert np.abs(np.asarray(params["block_0"]["mlp"]["b2"])).min() > 0
  widths = vb.static_widths(acm_cfg, {"mlp": 2, "attn": 2 if kind == "mlp_qkvo" else None})
  static_model = vit.ViT(vb.static_config(acm_cfg, widths))
  static_params = static_model.init(jax.random.key(9), images)["params"]
  # the gates (N + 1 = 2 choices there) are the static model's own: mode "full" does not read them
  cut = jax.tree.map(lambda c, s: c if c.shape == s.shape else s, _static_params(params, 2, vb.NUM_LEARNERS),
                     static_params)
  want = np.asarray(acm_model.apply({"params": params}, images, mode="fixed", fixed_k=2), np.float64)
  got = np.asarray(static_model.apply({"params": cut}, images, mode="full"), np.float64)
  full = np.asarray(acm_model.apply({"params": params}, images, mode="full"), np.float64)
  assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
  assert np.abs(full - want).max() > 1e-2 * np.abs(want).max()  # k = 2 is not the full model


def test_fusion_flags_set_the_switches_and_are_recorded(tmp_path, monkeypatch):
  """--norm-min-tokens / --norm-mode / --residual-min-tokens / --down-split-max-tokens / --route-shared-min-tokens /
  --inline-sort-max-tokens / --inline-sort-place / --down-split-rounding / --down-bias-loop-max-tokens (and
  --mgpu-down-unsort) set
  acm_fused's switches (-1: off) and every ACM row records them, with the tuned tile table."""
  from pallas_kernels import acm_fused
  for name in ("NORM_MIN_TOKENS", "NORM_MODE", "RESIDUAL_MIN_TOKENS", "MGPU_DOWN_UNSORT",
               "DOWN_SPLIT_MAX_TOKENS", "ROUTE_SHARED_MIN_TOKENS", "INLINE_SORT_MAX_TOKENS",
               "DOWN_SPLIT_ROUNDING", "DOWN_BIAS_LOOP_MAX_TOKENS", "INLINE_SORT_PLACE"):  # restored after
    monkeypatch.setattr(acm_fused, name, getattr(acm_fused, name))
  parser = __import__("argparse").ArgumentParser()
  vb.add_fusion_flags(parser)
  got = vb.apply_fusion_flags(parser.parse_args(["--norm-min-tokens", "4096", "--norm-mode", "prologue",
                                                 "--residual-min-tokens", "-1", "--down-split-max-tokens", "2048",
                                                 "--route-shared-min-tokens", "4096",
                                                 "--inline-sort-max-tokens", "2048", "--inline-sort-place", "atomic",
                                                 "--down-split-rounding", "consumers",
                                                 "--down-bias-loop-max-tokens", "-1"]))
  tiles = got.pop("tuned_tiles")
  assert len(tiles) == len(acm_fused.TUNED) and tiles["8192/mlp"] == acm_fused.TUNED[8192, "mlp"]
  assert tiles["none/proj"] == acm_fused.TUNED[None, "proj"]
  assert got == {"norm_min_tokens": 4096, "norm_mode": "prologue", "residual_min_tokens": None,
                 "down_split_max_tokens": 2048, "down_split_per_learner_max_tokens": 1024, "down_split_parts": None,
                 "route_small_max_tokens": 2048, "route_small": {"chunk": 32, "block_k": 256, "num_stages": 1},
                 "route_medium_max_tokens": 8192, "route_medium": {"chunk": 64, "block_k": 256, "num_stages": 1},
                 "route_shared_min_tokens": 4096, "inline_sort_min_tokens": acm_fused.INLINE_SORT_MIN_TOKENS,
                 "inline_sort_max_tokens": 2048, "inline_sort_place": "atomic",
                 "down_split_rounding": "consumers",
                 "down_bias_loop_max_tokens": None}
  assert (acm_fused.NORM_MIN_TOKENS, acm_fused.NORM_MODE, acm_fused.RESIDUAL_MIN_TOKENS,
          acm_fused.DOWN_SPLIT_MAX_TOKENS, acm_fused.ROUTE_SHARED_MIN_TOKENS,
          acm_fused.INLINE_SORT_MAX_TOKENS, acm_fused.DOWN_SPLIT_ROUNDING, acm_fused.INLINE_SORT_PLACE) == (
              4096, "prologue", None, 2048, 4096, 2048, "consumers", "atomic")
  with pytest.raises(SystemExit):
    parser.parse_args(["--norm-mode", "epilogue"])
  with pytest.raises(SystemExit):
    parser.parse_args(["--down-split-rounding", "reader"])
  monkeypatch.setattr(vb, "ROUNDS", 1)
  monkeypatch.setenv("OUT", str(tmp_path))  # where the script writes its table
  vb.main(["--model", "tiny", "--batches", "2", "--acm", "mlp", "--ratios", "0.5", "--impls", "xla", "--attention",
           "xla", "--no-dense-gelu-tanh", "--no-static", "--norm-min-tokens", "0", "--residual-min-tokens", "0",
           "--mgpu-down-unsort", "kernel", "--route-shared-min-tokens", "-1", "--inline-sort-max-tokens", "-1",
           "--down-split-rounding", "sum", "--down-bias-loop-max-tokens", "300", "--results-dir", str(tmp_path),
           "--no-append"])
  rows = [r for r in json.loads(next(tmp_path.glob("vit_*.json")).read_text()) if r["acm"] != "none"]
  assert rows and all((r["norm_min_tokens"], r["norm_mode"], r["residual_min_tokens"], r["route_shared_min_tokens"],
                       r["inline_sort_max_tokens"], r["down_split_rounding"], r["down_bias_loop_max_tokens"])
                      == (0, "prologue", 0, None, None, "sum", 300) and r["tuned_tiles"]["8192/mlp"]["num_warps"] == 8
                      for r in rows)
  assert acm_fused.MGPU_DOWN_UNSORT == "kernel" and all(r["mgpu_down_unsort"] == "kernel" for r in rows)


def test_main_refuses_the_kernels_without_a_gpu():
  if jax.default_backend() == "gpu":
    pytest.skip("the refusal is for backends without a GPU")
  with pytest.raises(SystemExit, match="only --impls xla runs elsewhere"):
    vb.main(["--model", "tiny", "--impls", "pallas", "--no-append"])


def test_xla_options_are_parsed_typed_applied_and_recorded(tmp_path, monkeypatch):
  """--xla-option OPTION=VALUE reaches every timed forward's compile (a bad option name stops the run in XLA)
  and every row records it; a malformed item is refused by name."""
  assert vb.parse_xla_options(["xla_gpu_enable_command_buffer=", "xla_gpu_graph_min_graph_size=2", "a=True",
                               "b=-3", "c=x1"]) == {"xla_gpu_enable_command_buffer": "",
                                                     "xla_gpu_graph_min_graph_size": 2, "a": True, "b": -3, "c": "x1"}
  with pytest.raises(ValueError, match="OPTION=VALUE, got 'novalue'"):
    vb.parse_xla_options(["novalue"])
  monkeypatch.setattr(vb, "ROUNDS", 1)
  monkeypatch.setenv("OUT", str(tmp_path))
  argv = ["--model", "tiny", "--batches", "2", "--acm", "mlp", "--ratios", "0.5", "--impls", "xla", "--attention",
          "xla", "--no-dense-gelu-tanh", "--no-static", "--results-dir", str(tmp_path), "--no-append"]
  vb.main(argv + ["--xla-option", "xla_cpu_enable_fast_math=false", "--xla-option", "xla_gpu_enable_command_buffer="])
  rows = json.loads(next(tmp_path.glob("vit_*.json")).read_text())
  assert {r["acm"] for r in rows} == {"none", "mlp"}
  assert all(r["xla_options"] == {"xla_cpu_enable_fast_math": False, "xla_gpu_enable_command_buffer": ""}
             for r in rows)
  with pytest.raises(Exception, match="xla_no_such_option"):
    vb.main(argv + ["--xla-option", "xla_no_such_option=1"])
  with pytest.raises(SystemExit):
    vb.main(argv + ["--xla-option", "oops"])


def test_acm_xla_options_reach_the_acm_forwards_only(tmp_path, monkeypatch):
  """--acm-xla-option compiles the routed ACM forwards alone with an option: a bad option name fails the ACM row
  (recorded as failed, no row) while the dense model compiles and is timed; a good one is recorded on the ACM
  row together with --xla-option's."""
  monkeypatch.setattr(vb, "ROUNDS", 1)
  monkeypatch.setenv("OUT", str(tmp_path))
  argv = ["--model", "tiny", "--batches", "2", "--acm", "mlp", "--ratios", "0.5", "--impls", "xla", "--attention",
          "xla", "--no-dense-gelu-tanh", "--no-static", "--no-append"]
  vb.main(argv + ["--results-dir", str(tmp_path / "bad"), "--acm-xla-option", "xla_no_such_option=1"])
  rows = json.loads(next((tmp_path / "bad").glob("vit_*.json")).read_text())
  assert [r["acm"] for r in rows] == ["none"]
  vb.main(argv + ["--results-dir", str(tmp_path / "good"), "--xla-option", "xla_cpu_enable_fast_math=false",
                  "--acm-xla-option", "xla_gpu_enable_command_buffer="])
  rows = {r["acm"]: r for r in json.loads(next((tmp_path / "good").glob("vit_*.json")).read_text())}
  assert rows["mlp"]["acm_xla_options"] == {"xla_cpu_enable_fast_math": False, "xla_gpu_enable_command_buffer": ""}
  assert rows["none"]["xla_options"] == {"xla_cpu_enable_fast_math": False} and "acm_xla_options" not in rows["none"]
  assert rows["mlp"]["check_passed"]


def test_packed_layout_is_timed_checked_and_recorded(tmp_path, monkeypatch):
  """--layout packed times every forward with the small parameters packed (acm_jax.serving): the rows say so,
  and the ACM row's check against the XLA path passes (vit_targets keeps such rows out of the default verdict:
  tests/test_vit_targets.py)."""
  monkeypatch.setattr(vb, "ROUNDS", 1)
  monkeypatch.setenv("OUT", str(tmp_path))
  vb.main(["--model", "tiny", "--batches", "2", "--acm", "mlp_qkvo", "--ratios", "0.5", "--impls", "xla",
           "--attention", "xla", "--results-dir", str(tmp_path), "--no-append", "--layout", "packed"])
  rows = json.loads(next(tmp_path.glob("vit_*.json")).read_text())
  assert {r["acm"] for r in rows} == {"none", "mlp_qkvo"} and all(r["layout"] == "packed" for r in rows)
  assert all(r["patch_embed"] == "conv" for r in rows)
  acm_row = next(r for r in rows if r["acm"] == "mlp_qkvo")
  assert acm_row["check_passed"] and acm_row["static_images_per_s"] > 0
  with pytest.raises(ValueError, match="layout must be one of"):
    vb.serving_params({}, "rows")
