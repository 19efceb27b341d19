"""How Triton lowers the fused ACM kernels, read on a machine without a GPU.

    python3 -m benchmarks.triton_lowering [--tokens 1576] [--kind mlp|proj] [--r 0.5]
        [--variant NAME[:SWITCH=VALUE;...]]... [--capability 90] [--family hopper] [--keep DIR]

One ACM group (`fused_tune.inputs`: ViT-B/16's MLP, or its q/k/v group with `--kind proj`) is lowered for CUDA
with the kernels traced as on a GPU of `--family` (the tuned tile table applies to Hopper only), once per
variant (`group_profile`'s form). What becomes of each Pallas kernel then depends on jaxlib:

- Where jaxlib compiles each Triton kernel in Pallas itself (`triton_kernel_call_lib.TritonKernel`), its PTX
  is taken there (`group_profile.PtxCapture`): the very code a GPU of that capability runs.
- Where jaxlib hands XLA the kernel's Triton IR (TTIR) instead, as 0.10.2 and 0.11.2 do (custom call
  `__gpu$xla.gpu.triton`; checked on an H100, 2026-12-07), this takes that IR, with the kernel's warps and stages,
  and compiles it with the `triton` package (pip; not a project requirement) for `sm_<capability>`: Triton's
  TTIR passes (one of them folds `acc + dot(a, b)` into the dot's accumulator, which is what lets a warpgroup
  MMA stay in flight), then TTGIR, LLVM and PTX. The package's Triton is not the one inside jaxlib, so its
  pipeline may differ in details. XLA compiles the IR on a GPU without dumping PTX (jaxlib 0.11.2, even with
  `xla_gpu_dump_llvmir`), so `group_profile --ptx` finds none there and this is the way to read the lowering.

Printed per kernel: warps, stages, the MMA instructions (`wgmma.mma_async` shapes, Hopper's warpgroup MMA,
against `mma.sync`), how many warpgroup MMAs the main loop leaves in flight (the largest N of
`wgmma.wait_group N`: 0 means each MMA is waited for before the next load), shared memory, and, where `ptxas`
is at hand (the `triton` package ships one), registers and spilled bytes. Records go to
benchmarks/results/triton_lowering.json (appended).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import re
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

from benchmarks import group_profile as gp


def kernel_settings(hlo_text: str) -> dict:
  """{kernel name: (num_warps, num_stages)} from the Triton custom calls of a lowered program (a jaxlib that hands
  XLA the Triton IR writes them into each call's backend config, whose attributes print in alphabetical order)."""
  found = re.findall(r'name = "(\w+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32', hlo_text)
  return {name: (int(warps), int(stages)) for name, stages, warps in found}


@contextlib.contextmanager
def traced_as_gpu(family: str):
  """Within the block, `acm_fused` traces its GPU kernels on any backend (as a GPU of `family` would pick
  them): what `lowering_platforms=("cuda",)` needs to lower them without a GPU. Nothing runs."""
  import jax
  from pallas_kernels import acm_fused as af
  saved = jax.default_backend, af.gpu_family
  jax.default_backend, af.gpu_family = (lambda: "gpu"), (lambda: family)
  try:
    yield
  finally:
    jax.default_backend, af.gpu_family = saved


@contextlib.contextmanager
def capturing_ttir():
  """Within the block, the Triton IR of every Pallas kernel lowered, as (name, text) in `.modules`."""
  from jax._src.pallas.triton import pallas_call_registration as reg
  lowering = reg.lowering
  original = lowering.lower_jaxpr_to_triton_module
  record = types.SimpleNamespace(modules=[])

  def wrapped(jaxpr, *args, **kwargs):
    result = original(jaxpr, *args, **kwargs)
    record.modules.append((jaxpr.debug_info.func_name, result.module.operation.get_asm()))
    return result

  lowering.lower_jaxpr_to_triton_module = wrapped
  try:
    yield record
  finally:
    lowering.lower_jaxpr_to_triton_module = original


def lower_group(tokens: int, kind: str, r: float, settings: dict, activation: str, family: str) -> dict:
  """{kernel: dict(ptx=... or ttir=..., num_warps, num_stages)} for one variant of one ACM group."""
  import jax
  import numpy as np
  from benchmarks import fused_tune as ft
  from benchmarks import switch_ab as sab
  from pallas_kernels import acm_fused as af
  x, groups, _ = ft.inputs(tokens, kind, np.random.default_rng(0), r)
  fn = lambda x, g: af.acm_group(x, g, num_learners=4, activation=activation, min_choice=0 if kind == "mlp" else 1)
  capture = gp.PtxCapture()
  with sab.settings_applied(settings), traced_as_gpu(family), capturing_ttir() as ttir, capture:
    text = jax.jit(fn).trace(x, groups).lower(lowering_platforms=("cuda",)).as_text()
  kernels = {}
  if capture.kernels:  # a jaxlib that compiles in Pallas: the PTX that would run
    for kernel in capture.kernels:
      kernels[kernel["name"]] = dict(ptx=kernel["ptx"], num_warps=kernel["num_warps"], num_stages=None,
                                     shared_bytes=kernel["shared_bytes"], source="jaxlib")
    return kernels
  warps_stages = kernel_settings(text)
  for name, module in ttir.modules:
    if name not in warps_stages:
      raise ValueError(f"kernel {name!r}: no Triton custom call with its warps and stages in the lowered program")
    warps, stages = warps_stages[name]
    kernels[name] = dict(ttir=module, num_warps=warps, num_stages=stages)
  return kernels


def compile_ttir(ttir: str, num_warps: int, num_stages: int, capability: int) -> dict:
  """The `triton` package's NVIDIA pipeline on one kernel's TTIR: dict(ptx, ttgir, shared_bytes, version)."""
  import triton
  from triton._C.libtriton import ir
  from triton.backends.compiler import GPUTarget
  from triton.compiler import make_backend
  source = re.sub(r"^module @[\w$.]+ \{", "module {", ttir.lstrip(), count=1)  # Pallas names its module
  backend = make_backend(GPUTarget("cuda", capability, 32))
  options = backend.parse_options(dict(num_warps=num_warps, num_stages=num_stages))
  context = ir.context()
  ir.load_dialects(context)
  backend.load_dialects(context)
  with tempfile.TemporaryDirectory() as tmp:
    raw = Path(tmp, "kernel.ttir")
    raw.write_text(source)
    module = ir.parse_mlir_module(str(raw), context)
    module.context = context
    # `triton.compile` skips the passes of the stage its source is written in; run TTIR's here, then hand over
    module = backend.make_ttir(module, {}, options)
    combined = Path(tmp, "combined.ttir")
    combined.write_text(str(module))
    kernel = triton.compile(str(combined), target=GPUTarget("cuda", capability, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
  return dict(ptx=kernel.asm["ptx"], ttgir=kernel.asm["ttgir"], shared_bytes=kernel.metadata.shared,
              version=triton.__version__)


def ptxas_usage(ptx: str, capability: int) -> dict:
  """Registers and spilled bytes per thread from `ptxas -v` (the `triton` package's copy, or one on PATH);
  {} without one."""
  candidates = [shutil.which("ptxas")]
  with contextlib.suppress(ImportError):
    import triton
    candidates.insert(0, str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"))
  ptxas = next((c for c in candidates if c and Path(c).exists()), None)
  if ptxas is None:
    return {}
  arch = f"sm_{capability}a" if capability == 90 else f"sm_{capability}"
  with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp, "kernel.ptx")
    path.write_text(ptx)
    done = subprocess.run([ptxas, f"-arch={arch}", "-v", str(path), "-o", str(Path(tmp, "k.cubin"))],
                          capture_output=True, text=True, check=False)
  log = done.stdout + done.stderr
  regs = re.findall(r"Used (\d+) registers", log)
  spills = re.findall(r"(\d+) bytes spill stores", log)
  return dict(registers=max(map(int, regs)) if regs else None, spill_bytes=sum(map(int, spills)) if spills else None)


def mma_summary(ptx: str) -> dict:
  """The MMA instruction shapes a kernel's PTX issues and the largest N of its `wgmma.wait_group N`."""
  shapes = sorted(set(re.findall(r"\b(wgmma\.mma_async\.sync\.aligned\.m\d+n\d+k\d+|mma\.sync\.aligned\.m\d+n\d+k\d+)",
                                 ptx)))
  waits = [int(n) for n in re.findall(r"\bwgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)]
  return dict(mma=[s.replace(".sync.aligned", "") for s in shapes], wgmma_in_flight=max(waits) if waits else None)


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokens", type=int, default=1576)
  parser.add_argument("--kind", default="mlp", choices=("mlp", "proj"))
  parser.add_argument("--r", type=float, default=0.5, help="the gates pick k ~ Binomial(4, r)")
  parser.add_argument("--variant", action="append", default=None,
                      help="NAME[:SWITCH=VALUE;...] as benchmarks.group_profile takes it (repeatable)")
  parser.add_argument("--capability", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80")
  parser.add_argument("--family", default="hopper", help="the GPU family the tile table is read for")
  parser.add_argument("--keep", default=None, help="a folder to write each kernel's TTIR/TTGIR/PTX into")
  parser.add_argument("--results-dir", default=str(Path(__file__).parent / "results"))
  args = parser.parse_args(argv)
  if args.tokens < 1:
    parser.error(f"--tokens must be at least 1, got {args.tokens}")
  if not 0.0 <= args.r <= 1.0:
    parser.error(f"--r must lie in [0, 1], got {args.r}")
  if args.capability < 70:
    parser.error(f"--capability must be 70 or more (Triton's NVIDIA targets), got {args.capability}")
  try:
    variants = [gp.parse_variant(spec) for spec in args.variant or ["default"]]
  except ValueError as err:
    parser.error(str(err))
  import jax
  from benchmarks import switch_ab as sab
  base = dict(date=datetime.date.today().isoformat(), jax_version=jax.__version__, tokens=args.tokens,
              kind=args.kind, r=args.r, capability=args.capability, family=args.family)
  records = []
  print("| variant | kernel | warps | stages | MMA | in flight | shared bytes | registers | spill bytes | from |")
  print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
  for name, settings, activation in variants:
    kernels = lower_group(args.tokens, args.kind, args.r, settings, activation, args.family)
    for kernel, got in kernels.items():
      if "ptx" not in got:
        try:
          got.update(compile_ttir(got["ttir"], got["num_warps"], got["num_stages"], args.capability))
        except ImportError:
          sys.exit("triton_lowering: this jaxlib hands XLA the kernels' Triton IR; compiling it needs the "
                   "`triton` package (pip install triton), which is not installed")
        got["source"] = f"triton {got.pop('version')}"
      usage = ptxas_usage(got["ptx"], args.capability)
      rec = dict(base, variant=name, settings=sab._recordable(settings), activation=activation, kernel=kernel,
                 num_warps=got["num_warps"], num_stages=got["num_stages"], shared_bytes=got["shared_bytes"],
                 source=got["source"], **mma_summary(got["ptx"]), **usage,
                 census={key: v for key, v in gp.ptx_census(got["ptx"]).get(kernel, {}).items() if key != "entry"})
      records.append(rec)
      if args.keep:
        folder = Path(args.keep)
        folder.mkdir(parents=True, exist_ok=True)
        for ext in ("ttir", "ttgir", "ptx"):
          if ext in got:
            (folder / f"{name}.{kernel}.{ext}").write_text(got[ext])
      print(f"| {name} | {kernel} | {rec['num_warps']} | {rec['num_stages']} | {', '.join(rec['mma']) or '-'} | "
            f"{rec['wgmma_in_flight']} | {rec['shared_bytes']} | {rec.get('registers')} | {rec.get('spill_bytes')} | "
            f"{rec['source']} |", flush=True)
  out = Path(args.results_dir) / "triton_lowering.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  old = json.loads(out.read_text()) if out.exists() else []
  out.write_text(json.dumps(old + records, indent=1))
  print(f"appended {len(records)} records to {out}")
  return records


if __name__ == "__main__":
  main()
