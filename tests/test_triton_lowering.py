"""`benchmarks.triton_lowering` without a GPU: the kernels lowered for CUDA on this machine, their warps and
stages read back, the MMA summary, and (where the `triton` package is installed) Triton's own pipeline."""

import jax
import pytest

from benchmarks import triton_lowering as tl
from pallas_kernels import acm_fused as af

HLO = ('stablehlo.custom_call @"__gpu$xla.gpu.triton"(%0) {backend_config = {debug = false, grid_x = 25 : i32, '
       'grid_y = 1 : i32, grid_z = 1 : i32, ir = "ML\\EFR...", name = "acm_group_up", num_stages = 3 : i32, '
       'num_warps = 4 : i32}}\n'
       'stablehlo.custom_call @"__gpu$xla.gpu.triton"(%1) {backend_config = {debug = false, grid_x = 7 : i32, '
       'grid_y = 1 : i32, grid_z = 1 : i32, ir = "ML\\EFR...", name = "acm_route", num_stages = 1 : i32, '
       'num_warps = 8 : i32}}')

PTX = """
.visible .entry acm_group_up(
)
{
\twgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1}, %rd5, %rd6;
\twgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1}, %rd7, %rd8;
\twgmma.wait_group.sync.aligned 1;
\twgmma.wait_group.sync.aligned 0;
\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};
}
"""


def test_kernel_settings_read_each_calls_warps_and_stages():
  assert tl.kernel_settings(HLO) == {"acm_group_up": (4, 3), "acm_route": (8, 1)}


def test_mma_summary_names_the_shapes_and_the_mmas_left_in_flight():
  summary = tl.mma_summary(PTX)
  assert summary == {"mma": ["mma.m16n8k16", "wgmma.mma_async.m64n128k16"], "wgmma_in_flight": 1}
  assert tl.mma_summary("ld.global.b32 %r1, [%rd1];") == {"mma": [], "wgmma_in_flight": None}


def test_the_group_lowers_for_cuda_here_and_the_switches_come_back():
  backend, family = jax.default_backend(), af.gpu_family
  kernels = tl.lower_group(40, "mlp", 0.5, {"DOWN_SPLIT_MAX_TOKENS": 0}, "gelu", "hopper")
  assert (jax.default_backend(), af.gpu_family) == (backend, family)  # restored
  assert af.DOWN_SPLIT_MAX_TOKENS != 0  # the variant's setting was undone
  assert {"acm_group_up", "acm_group_down"} <= set(kernels)  # split off: the plain down launch
  for name in ("acm_group_up", "acm_group_down"):
    got = kernels[name]
    if "ttir" in got:  # a jaxlib that hands XLA Triton IR: one dot in the reduction loop, the table's warps, stages
      assert got["ttir"].count("tt.dot") == 1 and "scf.for" in got["ttir"]
      assert (got["num_warps"], got["num_stages"]) == (4, 6)  # the one-image bucket's entry on Hopper
    else:  # a jaxlib that compiles the kernels in Pallas
      assert f".entry {name}" in got["ptx"]


def test_bad_flags_are_refused_naming_them(capsys):
  for argv, message in ((["--tokens", "0"], "--tokens must be at least 1, got 0"),
                        (["--r", "1.5"], "--r must lie in [0, 1], got 1.5"),
                        (["--capability", "61"], "--capability must be 70 or more"),
                        (["--variant", "x:NOT_A_SWITCH=1"], "NOT_A_SWITCH")):
    with pytest.raises(SystemExit):
      tl.main(argv)
    assert message in capsys.readouterr().err


def test_tritons_pipeline_puts_the_up_launch_on_warpgroup_mma_where_triton_is_installed():
  pytest.importorskip("triton")
  got = tl.lower_group(1576, "mlp", 0.5, {}, "gelu", "hopper")["acm_group_up"]
  if "ttir" not in got:
    pytest.skip("this jaxlib compiles the kernels itself")
  out = tl.compile_ttir(got["ttir"], got["num_warps"], got["num_stages"], 90)
  summary = tl.mma_summary(out["ptx"])
  assert summary["mma"] and all(s.startswith("wgmma") for s in summary["mma"])
  assert summary["wgmma_in_flight"] == 1  # the accumulator folded into the dot: one MMA stays in flight
