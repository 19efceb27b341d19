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
  record = serve_profile.main(["--model=tiny", "--impl=xla", "--batches=2,3", "--acm=mlp", "--forwards=2",
                               f"--out={out}"])
  assert set(record["runs"]) == {"none_b2", "mlp_b2", "none_b3", "mlp_b3"}
  for run in record["runs"].values():
    assert run["wall_ms"] > 0 and run["device_ms_per_step"] > 0 and run["top"]
    assert sum(run["categories"].values()) == pytest.approx(run["device_ms_per_step"], rel=1e-3, abs=1e-3)
  assert __import__("json").loads(out.read_text())[-1]["runs"].keys() == record["runs"].keys()


@pytest.mark.parametrize("kind, name", [("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"),
                                        ("NVIDIA A100-SXM4-80GB", "a100-sxm4-80gb"), ("cpu", "cpu")])
def test_results_files_carry_the_short_gpu_name(kind, name):
  from benchmarks import gpu_name
  assert gpu_name(kind) == name
