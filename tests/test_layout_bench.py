"""benchmarks.layout_bench on the CPU: the tiny ViT's two layouts, same weights, timed and compared."""

import json

import pytest

from benchmarks import layout_bench


def test_layout_bench_records_both_layouts_of_the_same_function(tmp_path):
  out = tmp_path / "layout.json"
  records = layout_bench.main(["--model", "tiny", "--dtype", "float32", "--acm", "none,mlp_qkvo", "--batches", "3",
                               "--impl", "xla", "--rounds", "1", "--out", str(out)])
  assert json.loads(out.read_text()) == records
  assert [(r["acm"], r["impl"], r["batch"]) for r in records] == [("none", "dense", 3), ("mlp_qkvo", "xla", 3)]
  for r in records:
    assert set(r) >= {"device", "date", "jax_version", "model", "unrolled_ms", "scanned_ms", "scanned_over_unrolled",
                      "max_abs_logit_diff", "rel_logit_diff"}
    assert r["unrolled_ms"] > 0 and r["scanned_ms"] > 0
    assert r["scanned_over_unrolled"] == pytest.approx(r["scanned_ms"] / r["unrolled_ms"], rel=1e-3)
    assert r["rel_logit_diff"] <= 1e-5  # float32: the scanned model computes the unrolled one's function


def test_layout_params_stack_to_what_the_scanned_model_expects():
  """The stacked unrolled params have exactly the scanned model's tree, shapes and dtypes."""
  import jax
  import jax.numpy as jnp
  from acm_jax import transformer
  from acm_jax.vit import model as vit

  unrolled, scanned = layout_bench.models("tiny", "mlp_qkvo", "xla")
  image = jnp.zeros((1, unrolled.image_size, unrolled.image_size, 3))
  stacked = transformer.stack_blocks(layout_bench.params_for(unrolled, image, jnp.float32))
  want = jax.eval_shape(lambda: vit.ViT(scanned).init({"params": jax.random.key(0), "gumbel": jax.random.key(0)},
                                                     image, mode="gumbel")["params"])
  assert jax.tree.structure(stacked) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(want)):
    assert (a.shape, a.dtype) == (b.shape, b.dtype)


@pytest.mark.parametrize("argv,message", [(["--acm", "mlp,bogus"], "--acm"), (["--rounds", "0"], "--rounds"),
                                          (["--batches", "0"], "batches")])
def test_layout_bench_rejects_bad_flags(argv, message, capsys):
  with pytest.raises(SystemExit):
    layout_bench.main(["--model", "tiny", *argv])
  assert message in capsys.readouterr().err
