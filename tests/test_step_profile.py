"""The trace arithmetic of benchmarks/step_profile.py on hand-built traces (the GPU run is not a test)."""

import numpy as np
import pytest

from benchmarks import step_profile as sp


def trace(gpu: bool, rng):
  meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "python3"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "tf_XLACpu/1"}}]
  if gpu:
    meta += [{"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
             {"ph": "M", "name": "thread_name", "pid": 2, "tid": 1, "args": {"name": "Stream #13(Compute)"}},
             {"ph": "M", "name": "thread_name", "pid": 2, "tid": 2, "args": {"name": "XLA Ops"}}]
  names = ["sm90_xmma_gemm_bf16", "acm_group_up", "loop_add_fusion", "input_reduce_fusion", "memcpy32_post",
           "ncclDevKernel_AllReduce", "mystery_kernel"]
  kernels = [(names[i % len(names)], float(rng.uniform(1, 100))) for i in range(40)]
  pid, tid = (2, 1) if gpu else (1, 8)
  events = [{"ph": "X", "pid": pid, "tid": tid, "name": n, "dur": d, "ts": i} for i, (n, d) in enumerate(kernels)]
  noise = [{"ph": "X", "pid": 1, "tid": 7, "name": "PjitFunction(step)", "dur": 5000.0, "ts": 0}]
  if gpu:  # the same ops again on the "XLA Ops" line: not kernels, must not be counted twice
    noise.append({"ph": "X", "pid": 2, "tid": 2, "name": "fusion.1", "dur": 900.0, "ts": 0})
  else:
    noise.append({"ph": "X", "pid": 1, "tid": 8, "name": "ThunkExecutor::Execute", "dur": 900.0, "ts": 0})
  return {"traceEvents": meta + events + noise}, kernels


@pytest.mark.parametrize("gpu", [True, False])
def test_summary_sums_kernels_per_step_and_category(gpu):
  rng = np.random.default_rng(0)
  t, kernels = trace(gpu, rng)
  res = sp.summarize(sp.device_events(t), steps=4)
  total = sum(d for _, d in kernels)
  assert res["device_ms_per_step"] == pytest.approx(total / 1e3 / 4)
  assert res["count_per_step"] == len(kernels) / 4
  expect = {"gemm": "sm90_xmma_gemm_bf16", "triton": "acm_group_up", "copy": "memcpy32_post",
            "collective": "ncclDevKernel_AllReduce", "other": "mystery_kernel"}
  for cat, name in expect.items():
    assert res["categories"][cat] == pytest.approx(sum(d for n, d in kernels if n == name) / 1e3 / 4, abs=1e-4)
  fusion = sum(d for n, d in kernels if n in ("loop_add_fusion", "input_reduce_fusion"))
  assert res["categories"]["fusion"] == pytest.approx(fusion / 1e3 / 4, abs=1e-4)
  top_name, top_ms, top_calls = res["top"][0]
  sums = {}
  for n, d in kernels:
    sums[n] = sums.get(n, 0.0) + d
  assert top_name == max(sums, key=sums.get) and top_ms == pytest.approx(sums[top_name] / 1e3 / 4, abs=1e-4)
  assert top_calls == sum(n == top_name for n, _ in kernels) / 4


def test_serve_profile_records_every_model_and_batch_on_the_cpu(tmp_path):
  """The inference profiler end to end on the tiny ViT (XLA executor threads stand in for a GPU)."""
  from benchmarks import serve_profile
  out = tmp_path / "serve.json"
  [record] = serve_profile.main(["--model=tiny", "--impl=xla", "--batches=2,3", "--acm=mlp", "--forwards=2",
                                 f"--out={out}"])
  assert set(record["runs"]) == {"none_b2", "mlp_b2", "none_b3", "mlp_b3"}
  assert (record["variant"], record["settings"]) == ("default", {})
  assert (record["norm_min_tokens"], record["residual_min_tokens"]) == (None, None)  # the fusions' defaults
  for run in record["runs"].values():
    assert run["wall_ms"] > 0 and run["device_ms_per_step"] > 0 and run["top"]
    assert sum(run["categories"].values()) == pytest.approx(run["device_ms_per_step"], rel=1e-3, abs=1e-3)
  assert __import__("json").loads(out.read_text())[-1]["runs"].keys() == record["runs"].keys()


def test_serve_profile_variants_trace_with_their_settings_and_restore_them(tmp_path, monkeypatch):
  """--variant: one record per variant, the dense model in the first only, each variant's models traced while its
  acm_fused settings hold (seen by the kernels' switch reader) and the settings put back afterwards."""
  from benchmarks import serve_profile
  from pallas_kernels import acm_fused
  seen = []
  real = acm_fused.acm_group
  monkeypatch.setattr(acm_fused, "acm_group",
                      lambda *a, **kw: seen.append(acm_fused.INLINE_SORT_PLACE) or real(*a, **kw))
  before = acm_fused.INLINE_SORT_PLACE
  out = tmp_path / "serve.json"
  records = serve_profile.main(["--model=tiny", "--impl=pallas", "--batches=2", "--acm=mlp", "--forwards=1",
                                "--top=3", f"--out={out}", "--variant", "default", "--variant",
                                "chunks:INLINE_SORT_PLACE=chunks"])
  assert [r["variant"] for r in records] == ["default", "chunks"]
  assert records[1]["settings"] == {"INLINE_SORT_PLACE": "chunks"}
  assert set(records[0]["runs"]) == {"none_b2", "mlp_b2"} and set(records[1]["runs"]) == {"mlp_b2"}
  assert acm_fused.INLINE_SORT_PLACE == before
  assert seen and set(seen) == {before, "chunks"}, seen
  assert len(__import__("json").loads(out.read_text())) == 2
  with pytest.raises(SystemExit):
    serve_profile.main(["--model=tiny", "--variant", "a", "--variant", "a"])


@pytest.mark.parametrize("kind, name", [("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"),
                                        ("NVIDIA A100-SXM4-80GB", "a100-sxm4-80gb"), ("cpu", "cpu")])
def test_results_files_carry_the_short_gpu_name(kind, name):
  from benchmarks import gpu_name
  assert gpu_name(kind) == name


HLO = """HloModule jit_step, entry_computation_layout={()->()}

%fused_a (p: bf16[4]) -> bf16[4] {
  %p = bf16[4]{0} parameter(0)
  ROOT %n = bf16[4]{0} negate(%p)
}

%body.7 (arg: (s32[], bf16[4])) -> (s32[], bf16[4]) {
  %arg = (s32[], bf16[4]{0}) parameter(0)
  %x = bf16[4]{0} get-tuple-element(%arg), index=1
  %loop_neg_fusion = bf16[4]{0} fusion(%x), kind=kLoop, calls=%fused_a, metadata={op_name="jit(step)/jvp(ViT)/while/body/blocks/blocks/blocks/mlp/gate/hidden_0/neg"}
  %gemm = (bf16[4]{0}, s8[8]{0}) custom-call(%x), custom_call_target="__cublas$gemm", metadata={op_name="jit(step)/jvp(ViT)/while/body/checkpoint/blocks/blocks/blocks/attn/attn._gumbel_group/dot_general"}
  %copy.3 = bf16[4]{0} copy(%x)
  %update = bf16[4]{0} fusion(%x), kind=kLoop, calls=%fused_a, metadata={op_name="jit(step)/jvp(ViT)/while/body/jit(dynamic_update_index_in_dim)/dynamic_update_slice"}
  %i = s32[] get-tuple-element(%arg), index=0
  ROOT %t = (s32[], bf16[4]{0}) tuple(%i, %update)
}

%cond.8 (arg: (s32[], bf16[4])) -> pred[] {
  %arg = (s32[], bf16[4]{0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main.9 (x: bf16[4]) -> bf16[4] {
  %x = bf16[4]{0} parameter(0)
  %outside = bf16[4]{0} fusion(%x), kind=kLoop, calls=%fused_a, metadata={op_name="jit(step)/mlp/neg"}
  %zero = s32[] constant(0)
  %init = (s32[], bf16[4]{0}) tuple(%zero, %outside)
  %w = (s32[], bf16[4]{0}) while(%init), condition=%cond.8, body=%body.7
  ROOT %r = bf16[4]{0} get-tuple-element(%w), index=1
}
"""


def test_loop_kernels_counts_each_loop_bodys_launches_by_module():
  loops = sp.loop_kernels(HLO)
  assert [loop["body"] for loop in loops] == ["body.7"]
  # the fused computation's own instructions and the entry's fusion are not in the loop body
  assert loops[0]["launches"] == 4
  assert loops[0]["by_module"] == {"mlp/gate": 1, "attn/attn._gumbel_group": 1, "(loop)": 2}


@pytest.mark.parametrize("op_name, module", [
    ("jit(wrapped)/transpose(jvp(ViT))/while/body/eval_jaxpr/checkpoint/blocks/blocks/blocks/mlp/reduce_sum", "mlp"),
    ("jit(wrapped)/jvp(ViT)/while/body/blocks/blocks/blocks/attn/out/gate/hidden_1/dot_general", "attn/out"),
    ("jit(wrapped)/jvp(ViT)/while/body/checkpoint/ln2/rsqrt", "ln2"),
    ("jit(wrapped)/jvp(ViT)/while/body/add", "(loop)"),
])
def test_module_of_names_the_flax_module(op_name, module):
  assert sp.module_of(op_name) == module
