"""Device time of each launch of one ACM group, per variant, beside the dense block's kernels (GPU).

    python3 -m benchmarks.group_profile [--tokens 1576] [--r 0.5] [--variant NAME[:SWITCH=VALUE;...]]... [--ptx]

One ViT-B/16 MLP ACM (four learners of 768, GELU, gates picking k ~ Binomial(4, r) as `fused_tune` sets them)
or, with `--kind proj`, the q/k/v group (three ACMs of four learners of 96, identity activation, min_choice 1)
at one token count. Each variant's forward is run under the JAX profiler and every kernel's device time is
summed per call, so that host dispatch, which dominates queued calls at serving token counts (`fused_tune`'s
timing), does not enter. Beside them: the dense MLP (gelu(x @ w1) @ w2, XLA) or the three dense projections,
and the yardstick, the same at the measured mean width (`vit_bench`'s static layer; for projections a low-rank
pair of matmuls). For the up and down launches it prints the useful TFLOP/s
(the arithmetic of each token's own k; the kernels also run the padding of each row block to its largest k).

Variants take `switch_ab`'s form (`TUNED@2048/mlp={"block_rows": 128}`, `DOWN_SPLIT_PARTS=4`, ...), plus
`activation=NAME` (gelu, relu, identity) to see what the up launch's epilogue costs. `--ptx` counts, per Pallas
kernel, the PTX instructions that tell how its matmuls and loads were lowered: `wgmma.mma_async` (Hopper's
warpgroup MMA) against `mma.sync`, how many warpgroup MMAs stay in flight (`wgmma.wait_group N`), bulk (TMA)
copies against `cp.async` and plain global loads. It reads the PTX where it can find it: where Pallas builds
each kernel itself (`triton_kernel_call_lib.TritonKernel`, taken by `PtxCapture`) or in XLA's dump (`xla_dump_to`).
Under jaxlib 0.11.2 neither holds it (H100, 2026-12-07): Pallas hands XLA the Triton IR (custom call
`__gpu$xla.gpu.triton`), and XLA compiles it without dumping PTX or LLVM IR, even with `xla_gpu_dump_llvmir`.
The run then says so, and `python3 -m benchmarks.triton_lowering` lowers the same kernels offline instead.
Records go to benchmarks/results/group_profile_<gpu>.json.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import glob
import json
import os
import re
import sys
import tempfile
from pathlib import Path

PTX_PATTERNS = {
    "wgmma": r"\bwgmma\.mma_async\b",
    "mma_sync": r"\bmma\.sync\b",
    "ldmatrix": r"\bldmatrix\b",
    "tma": r"\bcp\.async\.bulk\b",
    "cp_async": r"\bcp\.async\.c[ag]\b",
    "ld_global": r"\bld\.global\b",
    "st_global": r"\bst\.global\b",
    "wgmma_wait0": r"\bwgmma\.wait_group\.sync\.aligned\s+0\b",  # waits for every MMA in flight
    "wgmma_wait_n": r"\bwgmma\.wait_group\.sync\.aligned\s+[1-9]",  # leaves some in flight (pipelined)
}
KERNELS = ("acm_route", "acm_scatter", "acm_group_up", "acm_group_down_split", "acm_group_down", "acm_unsort")


def ptx_census(ptx_text: str, names=KERNELS) -> dict:
  """Per kernel entry of a PTX module whose name starts with one of `names`: counts of `PTX_PATTERNS` and the
  bytes of shared memory it declares statically (Triton's kernels take theirs as dynamic shared memory, an
  `.extern` array without a size, which this does not see). Entries are cut at each `.entry`; the longest
  matching name wins."""
  out = {}
  parts = re.split(r"(?m)^\s*(?:\.visible\s+)?\.entry\s+", ptx_text)
  for part in parts[1:]:
    entry = re.match(r"[\w$.]+", part).group(0)
    name = max((n for n in names if entry.startswith(n)), key=len, default=None)
    if name is None:
      continue
    counts = {key: len(re.findall(pattern, part)) for key, pattern in PTX_PATTERNS.items()}
    shared = [int(n) for n in re.findall(r"\.shared[^;\[]*\[(\d+)\]", part)]
    out[name] = dict(counts, entry=entry, static_shared_bytes=sum(shared))
  return out


class PtxCapture:
  """Within the block, records the PTX of every Triton kernel that Pallas compiles itself, where
  `pallas_call_registration` builds each kernel with `triton_kernel_call_lib.TritonKernel(name, num_warps,
  num_ctas, shared_bytes, ptx, ...)`: `kernels` holds dicts of name, num_warps, shared_bytes and ptx. Where the
  hook is absent (jaxlib 0.11.2 hands XLA the Triton IR instead) nothing is recorded."""

  def __init__(self):
    self.kernels = []
    self._reg = self._lib = None

  def __enter__(self):
    from jax._src.pallas.triton import pallas_call_registration as reg
    lib = getattr(reg, "triton_kernel_call_lib", None)
    if lib is None or not hasattr(lib, "TritonKernel"):
      return self
    kernels = self.kernels

    class Recording:
      def __getattr__(self, attr):
        return getattr(lib, attr)

      @staticmethod
      def TritonKernel(name, num_warps, num_ctas, shared_bytes, ptx, *rest):  # noqa: N802 (the library's name)
        text = ptx.decode() if isinstance(ptx, bytes) else str(ptx)
        kernels.append(dict(name=name, num_warps=num_warps, shared_bytes=shared_bytes, ptx=text))
        return lib.TritonKernel(name, num_warps, num_ctas, shared_bytes, ptx, *rest)

    self._reg, self._lib = reg, lib
    reg.triton_kernel_call_lib = Recording()
    return self

  def __exit__(self, *exc):
    if self._reg is not None:
      self._reg.triton_kernel_call_lib = self._lib
    return False

  def census(self, start: int = 0) -> dict:
    """`ptx_census` of the kernels recorded from index `start` on, with each one's warps and shared bytes."""
    out = {}
    for kernel in self.kernels[start:]:
      for name, counts in ptx_census(kernel["ptx"]).items():
        out[name] = dict(counts, num_warps=kernel["num_warps"], shared_bytes=kernel["shared_bytes"])
    return out


def parse_variant(spec: str) -> tuple[str, dict, str | None]:
  """switch_ab's NAME[:SWITCH=VALUE;...] with one more item, activation=NAME -> (name, settings, activation);
  activation None where the variant names none (the kind's own: gelu for the MLP, identity for projections)."""
  from benchmarks import switch_ab as sab
  from pallas_kernels.acm_mlp import ACTIVATIONS
  name, _, body = spec.partition(":")
  items, activation = [], None
  for item in filter(None, body.split(";")):
    key, _, value = item.partition("=")
    if key.strip() == "activation":
      activation = value.strip()
      if activation not in ACTIVATIONS:
        raise ValueError(f"variant {name!r}: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    else:
      items.append(item)
  name, settings = sab.parse_variant(":".join([name, ";".join(items)]) if items else name)
  return name, settings, activation


def flops(k: "np.ndarray", width: int, dim: int) -> float:
  """Useful multiply-adds x 2 of one projection (up or down) over tokens choosing k learners of `width`."""
  return 2.0 * float(k.sum()) * width * dim


def profile_calls(fn, args, calls: int) -> dict:
  """{kernel name: us per call} and the device total per call, from a profiler trace of `calls` calls."""
  import jax
  from benchmarks import step_profile as sp
  for _ in range(3):
    jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir):
      out = [fn(*args) for _ in range(calls)]
      jax.block_until_ready(out)
    events = sp.device_events(sp.load_trace(log_dir))
  per = collections.defaultdict(float)
  for name, dur in events:
    per[name] += dur / calls
  return {"kernels_us": {name: round(us, 3) for name, us in sorted(per.items(), key=lambda kv: -kv[1])},
          "device_us": round(sum(per.values()), 3)}


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokens", type=int, default=1576)
  parser.add_argument("--kind", default="mlp", choices=("mlp", "proj"),
                      help="the MLP ACM, or the q/k/v group of projection ACMs")
  parser.add_argument("--r", type=float, default=0.5, help="the gates pick k ~ Binomial(4, r)")
  parser.add_argument("--variant", action="append", default=None,
                      help="NAME[:SWITCH=VALUE;...] as benchmarks.switch_ab takes it, plus activation=NAME "
                           "(repeatable; without any: one variant 'default')")
  parser.add_argument("--calls", type=int, default=20, help="profiled calls per variant")
  parser.add_argument("--ptx", action="store_true", help="dump the compiled programs and count PTX instructions")
  parser.add_argument("--results-dir", default=str(Path(__file__).parent / "results"))
  args = parser.parse_args(argv)
  if args.tokens < 1:
    parser.error(f"--tokens must be at least 1, got {args.tokens}")
  if not 0.0 < args.r <= 1.0:
    parser.error(f"--r must be in (0, 1], got {args.r}")
  try:
    variants = [parse_variant(v) for v in (args.variant or ["default"])]
  except ValueError as err:
    parser.error(str(err))
  if len({name for name, _, _ in variants}) != len(variants):
    parser.error(f"variant names must differ: {[name for name, _, _ in variants]}")
  dump_dir = tempfile.mkdtemp(prefix="group_profile_") if args.ptx else None
  if dump_dir:  # XLA reads its flags once, when the backend starts: before the first device call below
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump_dir}".strip()

  import jax
  import numpy as np
  from benchmarks import fused_tune as ft
  from benchmarks import gpu_name
  from benchmarks import switch_ab as sab
  from benchmarks import vit_bench as vb
  from pallas_kernels import acm_fused as af
  if jax.default_backend() != "gpu":
    sys.exit("group_profile needs a GPU")

  x, groups, dense = ft.inputs(args.tokens, args.kind, np.random.default_rng(0), args.r)
  d, width, n = x.shape[1], groups[0]["w1"].shape[1] // 4, 4
  base = dict(device=jax.devices()[0].device_kind, date=datetime.date.today().isoformat(),
              jax_version=jax.__version__, tokens=args.tokens, r=args.r, kind=args.kind)
  if args.kind == "mlp":
    activation_default, min_choice = "gelu", 0
    dense_fn = jax.jit(lambda x, w1, w2: jax.nn.gelu(x @ w1, approximate=False) @ w2)
    dense_args = (x, *dense[0])
    static_fn = dense_fn
  else:  # the three dense projections; the yardstick a low-rank pair per projection
    activation_default, min_choice = "identity", 1
    dense_fn = jax.jit(lambda x, ws: [x @ w for w in ws])
    dense_args = (x, [w for w, _ in dense])
    static_fn = jax.jit(lambda x, pairs: [x @ a @ b for a, b in pairs])
  dense_prof = profile_calls(dense_fn, dense_args, args.calls)
  out = Path(args.results_dir) / f"group_profile_{gpu_name(base['device'])}.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  old = json.loads(out.read_text()) if out.exists() else []
  what, dense_what = ("MLP ACM", "MLP") if args.kind == "mlp" else ("q/k/v group of projection ACMs", "projections")
  print(f"{what} at {args.tokens} tokens, r = {args.r}, {base['device']}, jax {base['jax_version']}; device us "
        f"per call (profiler). Dense {dense_what} {dense_prof['device_us']:.1f} us\n", flush=True)
  print("| variant | device us | x dense | up us (TFLOP/s) | down us (TFLOP/s) | other launches (us) |")
  print("|---|---|---|---|---|---|", flush=True)
  records, seen = [], set()
  capture = PtxCapture() if dump_dir else None
  for name, settings, activation in variants:
    act = activation or activation_default
    fn = lambda x, g, act=act: af.acm_group(x, g, num_learners=n, activation=act, min_choice=min_choice)
    first = len(capture.kernels) if capture else 0
    with capture or contextlib.nullcontext():
      compiled, _ = sab.compile_with(settings, fn, x, groups)
    outs, k = compiled(x, groups)
    k = np.asarray(k)
    mean_width = vb.static_width(float(k.mean()), width)
    if not records:  # the yardstick at this variant's measured mean width (the gates are the same in every variant)
      if args.kind == "mlp":
        w1, w2 = dense[0]
        static = profile_calls(static_fn, (x, w1[:, :mean_width], w2[:mean_width]), args.calls)
      else:
        static = profile_calls(static_fn, (x, [(g["w1"][:, :mean_width], g["w2"][:mean_width]) for g in groups]),
                               args.calls)
    prof = profile_calls(compiled, (x, groups), args.calls)
    useful = flops(k, width, d)  # summed over the group's ACMs
    rate = lambda kernel: (round(useful / (prof["kernels_us"][kernel] * 1e-6) / 1e12, 1)
                           if prof["kernels_us"].get(kernel) else None)
    rec = dict(base, variant=name, settings=sab._recordable(settings), activation=act,
               k_mean=round(float(k.mean()), 4), k_counts=np.bincount(k.ravel(), minlength=n + 1).tolist(),
               k_spread="binomial", **prof, dense_us=dense_prof["device_us"],
               dense_kernels_us=dense_prof["kernels_us"], static_width=mean_width, static_us=static["device_us"],
               up_tflops=rate("acm_group_up"), down_tflops=rate("acm_group_down_split") or rate("acm_group_down"),
               ratio_to_dense=round(dense_prof["device_us"] / prof["device_us"], 4))
    if dump_dir:  # this variant's own kernels: those Pallas compiled for it, or those XLA dumped (files not seen)
      rec["ptx"] = capture.census(first)
      for path in sorted(set(glob.glob(f"{dump_dir}/*.ptx")) - seen):
        seen.add(path)
        with open(path) as f:
          rec["ptx"].update(ptx_census(f.read()))
    records.append(rec)
    del outs
    ks = rec["kernels_us"]
    down = "acm_group_down_split" if "acm_group_down_split" in ks else "acm_group_down"
    rest = ", ".join(f"{kname} {us:.1f}" for kname, us in list(ks.items())[:8] if kname not in ("acm_group_up", down))
    print(f"| {name} | {rec['device_us']:.1f} | {rec['ratio_to_dense']:.3f} | "
          f"{ks.get('acm_group_up', 0):.1f} ({rec['up_tflops']}) | {ks.get(down, 0):.1f} ({rec['down_tflops']}) | "
          f"{rest} |", flush=True)
    out.write_text(json.dumps(old + records, indent=1))  # after every variant: a run cut short keeps what it timed
  print(f"\nyardstick (width {records[0]['static_width']}): {records[0]['static_us']:.1f} us")
  for rec in records if dump_dir else ():
    print(f"PTX per kernel, {rec['variant']}:", json.dumps(rec["ptx"]))
  if dump_dir and not any(rec["ptx"] for rec in records):
    print(f"no PTX found: this jaxlib neither builds the Triton kernels in Pallas nor dumps their PTX to "
          f"{dump_dir}; `python3 -m benchmarks.triton_lowering` lowers the same kernels offline")
  print(f"appended {len(records)} records to {out}")
  return records


if __name__ == "__main__":
  main()
