"""benchmarks/dispatch_bench.py on the CPU: the timer splits a call into the time until it returns and
the time until its result is ready, and a smoke run of the tiny ViT (XLA path) writes one record per
batch and model with ratios to the dense model of the same batch."""

import hashlib
import json
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import dispatch_bench as db


def test_time_calls_splits_host_time_from_waiting():
  """A call that spends 3 ms on the host before returning: dispatch and sync are at least that, and the
  queued calls take at least that each."""
  def slow_host(x):
    end = time.perf_counter() + 0.003
    while time.perf_counter() < end:
      pass
    return x + 1

  got = db.time_calls(slow_host, (jnp.ones(4),), calls=5)
  assert 3.0 <= got["dispatch_ms"] <= got["sync_ms"] < 50.0
  assert 3.0 <= got["pipelined_ms"] < 50.0


def test_smoke_run_records(tmp_path):
  # one ACM configuration: the records' arithmetic is the same for mlp_qkvo (test_vit_bench builds both)
  records = db.main(["--model", "tiny", "--impl", "xla", "--batches", "2", "--acm", "mlp",
                     "--rounds", "1", "--calls", "2", "--results-dir", str(tmp_path), "--variant", "default",
                     "--layouts", "tree,packed", "--variant",
                     "nofuse:xla_cpu_enable_fast_math=false;xla_gpu_enable_command_buffer="])
  saved = json.loads((tmp_path / f"dispatch_{records[0]['device'].lower().split()[0]}.json").read_text())
  assert saved == records
  assert sorted((r["batch"], r["variant"], r["layout"], r["model"]) for r in records) == sorted(
      (b, v, lay, m) for b in (2,) for v in ("default", "nofuse") for lay in ("tree", "packed")
      for m in ("none", "mlp"))
  assert {r["variant"]: r["compiler_options"] for r in records} == {
      "default": {}, "nofuse": {"xla_cpu_enable_fast_math": False, "xla_gpu_enable_command_buffer": ""}}
  size = db.vit.get_config("tiny").image_size
  built = db.vb.serving_forwards("tiny", ["mlp"], "xla", 0.5, jnp.zeros((1, size, size, 3), jnp.bfloat16))
  for rec in records:
    same = lambda variant, model, layout=rec["layout"]: next(
        d for d in records
        if (d["batch"], d["variant"], d["layout"], d["model"]) == (rec["batch"], variant, layout, model))
    dense = same(rec["variant"], "none")
    for key in ("dispatch", "sync", "pipelined"):
      assert rec[f"{key}_ms"] > 0
      np.testing.assert_allclose(rec[f"{key}_over_dense"], rec[f"{key}_ms"] / dense[f"{key}_ms"], rtol=2e-3)
    np.testing.assert_allclose(rec["sync_over_baseline"], rec["sync_ms"] / same("default", rec["model"])["sync_ms"],
                               rtol=2e-3)
    np.testing.assert_allclose(rec["sync_over_first_layout"],
                               rec["sync_ms"] / same(rec["variant"], rec["model"], "tree")["sync_ms"], rtol=2e-3)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(built[rec["model"]][1]))
    packed = db.vb.serving_params(built[rec["model"]][1], rec["layout"])
    assert rec["num_leaves"] == (len(flat) if rec["layout"] == "tree" else packed.num_arrays) == len(
        jax.tree.leaves(packed))
    assert 0 < rec["arrays_only_dispatch_ms"]
    assert rec["repeatable"] is True
    if rec["variant"] == "default":  # the digest is of the logits that the plain jitted forward gives
      images = jax.random.normal(jax.random.key(0), (2, size, size, 3), jnp.bfloat16)[:rec["batch"]]
      fn, params = built[rec["model"]]
      logits = np.asarray(fn(params, images), np.float32)
      assert rec["logits_sha1"] == hashlib.sha1(logits.tobytes()).hexdigest()
      # the packed layout's forward gives the same logits bit for bit
      assert rec["logits_sha1"] == same("default", rec["model"], "packed")["logits_sha1"]
  leaves = {r["model"]: r["num_leaves"] for r in records if r["layout"] == "tree"}
  assert leaves["none"] < leaves["mlp"]  # the gates add parameters
  packed = {r["model"]: r["num_leaves"] for r in records if r["layout"] == "packed"}
  assert all(packed[m] * 2 < leaves[m] for m in leaves)


def test_variant_parsing_and_bad_flags(capsys):
  assert db.parse_variant("off:xla_gpu_enable_command_buffer=;xla_gpu_graph_min_graph_size=1;x=true") == (
      "off", {"xla_gpu_enable_command_buffer": "", "xla_gpu_graph_min_graph_size": 1, "x": True})
  assert db.parse_variant("plain") == ("plain", {})
  for bad in (":a=1", "v:novalue"):
    with pytest.raises(ValueError, match="variant"):
      db.parse_variant(bad)
  for argv, message in ((["--variant", "a", "--variant", "a"], "must differ"), (["--rounds", "0"], "--rounds"),
                        (["--variant", "v:oops"], "OPTION=VALUE")):
    with pytest.raises(SystemExit):
      db.main(["--model", "tiny", "--impl", "xla", *argv])
    assert message in capsys.readouterr().err
