"""`benchmarks.group_profile`'s pieces that run without a GPU: the PTX census, the variants, the FLOP count."""

import numpy as np
import pytest

from benchmarks import group_profile as gp

PTX = """
.version 8.4
.target sm_90a
.extern .shared .align 16 .b8 global_smem[];
.visible .entry acm_group_up(
\t.param .u64 acm_group_up_param_0
)
{
\t.shared .align 16 .b8 scratch[49152];
\tcp.async.cg.shared.global [%r1], [%rd2], 16;
\tcp.async.cg.shared.global [%r3], [%rd4], 16;
\twgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1}, %rd5, %rd6;
\twgmma.wait_group.sync.aligned 1;
\twgmma.wait_group.sync.aligned 0;
\twgmma.wait_group.sync.aligned 0;
\tst.global.v4.b32 [%rd7], {%r8, %r9, %r10, %r11};
\tret;
}
.visible .entry acm_group_down_split(
\t.param .u64 p0
)
{
\tld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];
\tldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r5, %r6, %r7, %r8}, [%r9];
\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};
\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};
\tret;
}
.visible .entry fusion_123(
)
{
\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, %rd5, %rd6;
}
"""


def test_ptx_census_counts_per_kernel_and_skips_other_entries():
  census = gp.ptx_census(PTX)
  assert set(census) == {"acm_group_up", "acm_group_down_split"}  # the XLA fusion is not one of ours
  up, down = census["acm_group_up"], census["acm_group_down_split"]
  assert (up["wgmma"], up["mma_sync"], up["cp_async"], up["st_global"], up["ld_global"]) == (1, 0, 2, 1, 0)
  assert (up["wgmma_wait_n"], up["wgmma_wait0"]) == (1, 2)  # one wait leaves an MMA in flight, two drain them
  assert up["static_shared_bytes"] == 49152  # the sized array; the extern one has no size
  assert (down["wgmma"], down["mma_sync"], down["ldmatrix"], down["ld_global"]) == (0, 2, 1, 1)
  # "acm_group_down_split" is matched by its own name, not by the shorter "acm_group_down"
  assert down["entry"] == "acm_group_down_split"


def test_ptx_capture_records_the_kernels_pallas_builds_and_restores_the_library(monkeypatch):
  from jax._src.pallas.triton import pallas_call_registration as reg

  class FakeLib:  # stands for triton_kernel_call_lib: what jaxlib >= 0.11 builds each Pallas kernel with
    built = []
    other = "passed through"

    @staticmethod
    def TritonKernel(*args):  # noqa: N802
      FakeLib.built.append(args)
      return ("kernel", args[0])

  monkeypatch.setattr(reg, "triton_kernel_call_lib", FakeLib, raising=False)
  ptx_down = PTX[PTX.index(".visible .entry acm_group_down_split"):PTX.index(".visible .entry fusion_123")]
  with gp.PtxCapture() as capture:
    assert reg.triton_kernel_call_lib.other == "passed through"
    made = reg.triton_kernel_call_lib.TritonKernel("acm_group_up", 4, 1, 73728, PTX.encode(), "ttir", 90)
    reg.triton_kernel_call_lib.TritonKernel("acm_group_down_split", 8, 1, 98304, ptx_down, "ttir", 90)
  assert reg.triton_kernel_call_lib is FakeLib  # restored on exit
  assert made == ("kernel", "acm_group_up") and len(FakeLib.built) == 2  # the real constructor still ran
  census = capture.census(1)  # from the second kernel on: the down launch alone
  assert set(census) == {"acm_group_down_split"}
  assert (census["acm_group_down_split"]["mma_sync"], census["acm_group_down_split"]["num_warps"]) == (2, 8)
  whole = capture.census()
  assert whole["acm_group_up"]["wgmma"] == 1 and whole["acm_group_up"]["shared_bytes"] == 73728


def test_variants_take_switch_ab_items_and_an_activation():
  name, settings, act = gp.parse_variant('x:TUNED@2048/mlp={"block_rows": 128};DOWN_SPLIT_PARTS=4;activation=relu')
  assert (name, act, settings["DOWN_SPLIT_PARTS"]) == ("x", "relu", 4)
  assert settings["TUNED"][(2048, "mlp")]["block_rows"] == 128
  assert gp.parse_variant("default") == ("default", {}, None)  # the kind's own activation
  with pytest.raises(ValueError, match="activation must be one of"):
    gp.parse_variant("y:activation=swish")
  with pytest.raises(ValueError, match="NOT_A_SWITCH"):
    gp.parse_variant("z:NOT_A_SWITCH=1")


def test_useful_flops_follow_each_tokens_own_k():
  rng = np.random.default_rng(3)
  k = rng.integers(0, 5, size=197)
  expected = sum(2 * int(kt) * 768 * 768 for kt in k)
  assert gp.flops(k, 768, 768) == expected


def test_bad_flags_are_refused_naming_them(capsys):
  with pytest.raises(SystemExit):
    gp.main(["--tokens", "0"])
  assert "--tokens must be at least 1, got 0" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    gp.main(["--variant", "a", "--variant", "a"])
  assert "variant names must differ" in capsys.readouterr().err
