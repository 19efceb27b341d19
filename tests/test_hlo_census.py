"""benchmarks/hlo_census.py: the counts on a hand-written program and on programs XLA compiles here, and a smoke
run of the tiny ViT (XLA path) on the CPU."""

import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks import hlo_census as hc

# a hand-written optimised module: what counts and what does not is known line by line
MODULE = """HloModule jit_forward

%fused_add (p0: f32[16,8]) -> f32[16,8] {
  %p0 = f32[16,8]{1,0} parameter(0)
  ROOT %add.1 = f32[16,8]{1,0} add(%p0, %p0)
}

ENTRY %main (x: bf16[16,8], w: bf16[8,8]) -> bf16[16,8] {
  %x = bf16[16,8]{1,0} parameter(0)
  %w = bf16[8,8]{1,0} parameter(1)
  %gemm = (bf16[16,8]{1,0}, s8[1024]{0}) custom-call(%x, %w), custom_call_target="__cublas$lt$matmul"
  %gte = bf16[16,8]{1,0} get-tuple-element(%gemm), index=0
  %pallas = f32[32,8]{1,0} custom-call(%gte), custom_call_target="__gpu$xla.gpu.triton"
  %stats = (f32[16]{0}, f32[16,8]{1,0}) fusion(%pallas), kind=kInput, calls=%fused_add
  %sum = f32[16,8]{1,0} fusion(%pallas), kind=kLoop, calls=%fused_add
  %small = f32[4]{0} fusion(%pallas), kind=kLoop, calls=%fused_add
  %bc = f32[8,16]{1,0} bitcast(%sum)
  %cp = bf16[16,8]{0,1} copy(%gte)
  ROOT %out = bf16[16,8]{1,0} fusion(%sum, %cp), kind=kLoop, calls=%fused_add
}
"""


def test_census_of_a_hand_written_module():
  got = hc.census(MODULE, min_elements=16 * 8)
  assert got["kernels_by_kind"] == {"copy": 1, "custom-call:__cublas$lt$matmul": 1,
                                    "custom-call:__gpu$xla.gpu.triton": 1, "fusion:kInput": 1, "fusion:kLoop": 3}
  assert got["kernels"] == 7
  # float32 outputs of >= 128 elements: the Pallas call's (256), the tuple's second member (128), %sum (128);
  # not the (16,) statistics, the (4,) fusion, the bitcast (no launch) nor the fused computation's add
  assert got["f32_activations"] == 3
  assert got["f32_activation_mb"] == round(4 * (256 + 128 + 128) / 2**20, 3)
  assert hc.census(MODULE, min_elements=200)["f32_activations"] == 1


def test_census_of_compiled_programs_tells_float32_outputs_from_bfloat16_ones():
  x = jnp.asarray(jax.random.normal(jax.random.key(0), (64, 32)), jnp.bfloat16)
  wide = lambda x: jnp.exp(x.astype(jnp.float32)) * 2 + 1
  narrow = lambda x: (jnp.exp(x.astype(jnp.float32)) * 2 + 1).astype(jnp.bfloat16)
  text = lambda f: jax.jit(f).lower(x).compile().as_text()
  assert hc.census(text(wide), 64 * 32)["f32_activations"] == 1
  assert hc.census(text(wide), 64 * 32 + 1)["f32_activations"] == 0
  assert hc.census(text(narrow), 64 * 32)["f32_activations"] == 0
  assert hc.census(text(wide), 1)["kernels"] >= 1


def test_a_program_without_an_entry_is_named():
  with pytest.raises(ValueError, match="no ENTRY computation"):
    hc.census("HloModule empty\n", 1)


def test_smoke_run_records(tmp_path):
  records = hc.main(["--model", "tiny", "--impl", "xla", "--batches", "1,2", "--acm", "mlp",
                     "--variant", "default", "--variant", "nosplit:DOWN_SPLIT_MAX_TOKENS=none",
                     "--results-dir", str(tmp_path)])
  saved = json.loads(next(tmp_path.glob("hlo_census_*.json")).read_text())
  assert saved == records
  assert sorted((r["batch"], r["variant"], r["model"]) for r in records) == sorted(
      (b, v, m) for b in (1, 2) for v in ("default", "nosplit") for m in ("none", "mlp"))
  for rec in records:
    assert rec["kernels"] == sum(rec["kernels_by_kind"].values()) > 0
    dense = next(r for r in records if (r["batch"], r["variant"], r["model"]) == (rec["batch"], rec["variant"], "none"))
    assert rec["kernels_over_dense"] == round(rec["kernels"] / dense["kernels"], 4)
    assert rec["settings"] == ({"DOWN_SPLIT_MAX_TOKENS": None} if rec["variant"] == "nosplit" else {})
  # the ACM model has the gate and the learners' matmuls on top of the dense model's program
  assert all(r["kernels"] > 0 and r["kernels_over_dense"] > 1 for r in records if r["model"] == "mlp")


def test_bad_flags_are_refused(capsys):
  for argv, message in ((["--batches", "0"], "--batches"), (["--variant", "x:NOT_A_SWITCH=1"], "NOT_A_SWITCH"),
                        (["--variant", "a", "--variant", "a"], "variant names must differ")):
    with pytest.raises(SystemExit):
      hc.main(["--model", "tiny", "--impl", "xla", *argv])
    assert message in capsys.readouterr().err
  if jax.default_backend() != "gpu":
    with pytest.raises(SystemExit, match="only --impl xla runs elsewhere"):
      hc.main(["--model", "tiny", "--impl", "pallas"])
