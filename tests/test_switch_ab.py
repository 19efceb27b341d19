"""benchmarks/switch_ab.py: variant parsing, settings in place only while a forward is traced, and a CPU
smoke run (on the CPU the ViT takes the XLA path, which no kernel switch changes)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import switch_ab
from pallas_kernels import acm_fused


def test_variants_parse_to_typed_settings():
  name, settings = switch_ab.parse_variant(
      "mosaic:MGPU_DOWN_MIN_TOKENS=4096;MGPU_DOWN_KINDS=mlp+qkv;MGPU_DOWN_UNSORT=kernel;DOWN_SPLIT_MAX_TOKENS=none;"
      'MGPU_DOWN_TILES={"block_m": 128}')
  assert name == "mosaic"
  assert settings == {"MGPU_DOWN_MIN_TOKENS": 4096, "MGPU_DOWN_KINDS": ("mlp", "qkv"), "MGPU_DOWN_UNSORT": "kernel",
                      "DOWN_SPLIT_MAX_TOKENS": None, "MGPU_DOWN_TILES": {"block_m": 128}}
  assert switch_ab.parse_variant("default") == ("default", {})


def test_a_tuned_table_entry_is_changed_in_a_copy_and_recorded_by_its_key():
  name, settings = switch_ab.parse_variant('proj32:TUNED@512/proj={"block_k_down": 32};TUNED@none/mlp={"num_warps": 8}')
  table = settings["TUNED"]
  assert table is not acm_fused.TUNED and set(table) == set(acm_fused.TUNED) | {(None, "mlp")}
  assert table[512, "proj"] == {**acm_fused.TUNED[512, "proj"], "block_k_down": 32}
  assert table[None, "mlp"] == {"num_warps": 8}
  assert all(table[key] == entry for key, entry in acm_fused.TUNED.items() if key != (512, "proj"))
  assert switch_ab._recordable(settings) == {"TUNED": {"512/proj": table[512, "proj"], "none/mlp": {"num_warps": 8}}}


@pytest.mark.parametrize("spec, named", [
    ("a:TUNED={}", "one entry at a time"),
    ("a:TUNED@300/mlp={}", "TUNED@300/mlp"),
    ("a:TUNED@512/attn={}", "TUNED@512/attn"),
    ("a:TUNED@512/mlp=32", "TUNED@512/mlp=32"),
    ("a:NO_SUCH_SWITCH=1", "NO_SUCH_SWITCH"),
    ("a:MGPU_DOWN_UNSORT=scatter", "scatter"),
    ("a:DOWN_SPLIT_MAX_TOKENS=many", "many"),
    ("a:DOWN_SPLIT_MAX_TOKENS", "DOWN_SPLIT_MAX_TOKENS"),
    ("a:acm_group=1", "acm_group"),
    ("a b:SORT_MIN_TOKENS=1", "a b"),
])
def test_bad_variants_are_refused_naming_the_bad_part(spec, named):
  with pytest.raises(ValueError, match=named):
    switch_ab.parse_variant(spec)


def test_settings_hold_while_tracing_and_are_restored():
  before = acm_fused.UNSORT_ROWS
  x = jnp.arange(4.0)
  fn = lambda x: x * acm_fused.UNSORT_ROWS  # read at trace time, as the kernels read their switches
  default, default_text = switch_ab.compile_with({}, fn, x)
  changed, changed_text = switch_ab.compile_with({"UNSORT_ROWS": before + 3}, fn, x)
  assert acm_fused.UNSORT_ROWS == before
  np.testing.assert_array_equal(np.asarray(changed(x)), np.arange(4.0) * (before + 3))
  np.testing.assert_array_equal(np.asarray(default(x)), np.arange(4.0) * before)
  assert changed_text != default_text and switch_ab.compile_with({}, fn, x)[1] == default_text


def test_settings_are_restored_when_the_block_raises():
  rows, parts = acm_fused.UNSORT_ROWS, acm_fused.DOWN_SPLIT_PARTS
  with pytest.raises(RuntimeError, match="inside"):
    with switch_ab.settings_applied({"UNSORT_ROWS": rows + 5, "DOWN_SPLIT_PARTS": 2}):
      assert (acm_fused.UNSORT_ROWS, acm_fused.DOWN_SPLIT_PARTS) == (rows + 5, 2)
      raise RuntimeError("inside")
  assert (acm_fused.UNSORT_ROWS, acm_fused.DOWN_SPLIT_PARTS) == (rows, parts)


def test_main_on_the_cpu_times_the_baseline_and_marks_unchanged_programs(tmp_path, monkeypatch):
  monkeypatch.setenv("OUT", str(tmp_path))
  switch_ab.main(["--model", "tiny", "--batches", "2", "--rounds", "1", "--results-dir", str(tmp_path),
                  "--variant", "default", "--variant", "split:DOWN_SPLIT_MAX_TOKENS=8192"])
  rows = json.loads(next(tmp_path.glob("switch_ab_*.json")).read_text())
  assert [(r["variant"], r["same_program_as_baseline"]) for r in rows] == [("default", False), ("split", True)]
  base = rows[0]
  assert base["ratio_to_baseline"] == 1.0 and base["rel_err_vs_baseline"] == 0.0 and base["images_per_s"] > 0
  assert 0.0 <= base["rel_err_at_same_k"] < 1e-5  # on the CPU the variant is the XLA path itself
  assert base["ratio_to_dense"] == pytest.approx(base["images_per_s"] / base["dense_images_per_s"], rel=1e-2)
  assert rows[1]["settings"] == {"DOWN_SPLIT_MAX_TOKENS": 8192} and "images_per_s" not in rows[1]
  assert "same program as default" in (tmp_path / "switch_ab_table.md").read_text()


def test_the_same_k_check_forces_the_variants_own_choices_and_measures_the_gap():
  """`same_k_error` hands the reference the k that the variant's own gates chose (argmax of the sown choice
  one-hots) and returns max |difference| / max |reference|."""
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(3, 10)), jnp.float32)
  choice = jnp.asarray(rng.integers(0, 5, size=(3, 7)))
  state = {"acm": {"block_0": {"mlp": {"choice": (jax.nn.one_hot(choice, 5),)}}}}
  seen = {}

  def reference(params, x, kmap):
    seen.update(kmap)
    return logits + 0.5, None

  err = switch_ab.same_k_error(lambda p, x: (logits, state), reference, None, None)
  np.testing.assert_array_equal(np.asarray(seen["block_0/mlp"]), np.asarray(choice))
  assert err == pytest.approx(0.5 / float(np.abs(np.asarray(logits) + 0.5).max()), rel=1e-6)


def test_main_refuses_duplicate_names_and_bad_batches(tmp_path):
  with pytest.raises(SystemExit, match="differ"):
    switch_ab.main(["--batches", "2", "--variant", "a", "--variant", "a", "--results-dir", str(tmp_path)])
  with pytest.raises(SystemExit, match="NOPE"):
    switch_ab.main(["--batches", "2", "--variant", "a:NOPE=1", "--results-dir", str(tmp_path)])
