"""Where a training step's device time goes: dense step vs ACM phase steps, kernel by kernel (issue #22).

    python3 -m benchmarks.step_profile                                   # one GPU: ViT-B/16, batch 64
    python3 -m benchmarks.step_profile --phases=pretrain,distill,finetune --acm=mlp --scanned
    python3 -m benchmarks.step_profile --model=tiny --steps=2            # CPU smoke run (host threads)

Each phase's step is built, compiled and warmed up as `benchmarks.train_bench` does, then
--steps steps run under `jax.profiler.trace`. The trace's device events (on a CPU backend,
the XLA executor threads' events) are summed per kernel name and per category (gemm,
triton (the Pallas/Triton kernels and XLA's own Triton fusions), fusion, copy, collective,
other), per step. Prints, for each phase, the top kernels and the categories beside the
dense step's, and writes benchmarks/results/step_profile_<gpu>.json (or --out):
{device, date, jax_version, model, acm, batch, scanned, remat, phases: {phase: {step_ms,
device_ms_per_step, categories: {name: ms per step}, count_per_step, top: [[name, ms per step, calls per step]]}}}.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import jax

from benchmarks import train_bench as tb
from acm_jax import scan_outputs, transformer
from acm_jax.train import phases

CATEGORIES = (  # first match wins; names as cuBLAS / cuDNN / XLA / Triton give them
    ("gemm", re.compile(r"gemm|cutlass|cublas|xmma|nvjet|wgmma|sm\d\d_.*(mma|hmma)|cudnn|dot", re.I)),
    ("triton", re.compile(r"triton|^acm_|pallas", re.I)),
    ("copy", re.compile(r"copy|memcpy|memset|transpose|dynamic[-_]update[-_]slice", re.I)),
    ("collective", re.compile(r"nccl|all[-_]?reduce|all[-_]?gather|reduce[-_]scatter", re.I)),
    ("fusion", re.compile(r"fusion|loop_|input_|reduce|convert|broadcast|ynn|eigen|select|add|multiply", re.I)),
)


def category(name: str) -> str:
  return next((cat for cat, pattern in CATEGORIES if pattern.search(name)), "other")


def device_events(trace: dict) -> list[tuple[str, float]]:
  """(name, duration in microseconds) of the kernels in a Chrome/Perfetto trace: events of
  processes named like a GPU device, or, when there is none (CPU backend), of the XLA
  executor threads (names starting with "tf_XLA")."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  gpu = {pid for pid, name in procs.items() if re.search(r"/device:GPU|GPU:\d|gpu", name, re.I)}
  if gpu:
    keep = lambda e: e["pid"] in gpu and not threads.get((e["pid"], e["tid"]), "").lower().startswith(
        ("xla ops", "xla modules", "steps", "framework", "source"))
  else:
    keep = lambda e: (threads.get((e["pid"], e["tid"]), "").startswith("tf_XLA")
                      and not e["name"].startswith(("ThunkExecutor", "end: ")))  # containers, not kernels
  return [(e["name"], float(e.get("dur", 0.0))) for e in events if e.get("ph") == "X" and keep(e)]


def summarize(events: list[tuple[str, float]], steps: int, top: int = 25) -> dict:
  """Per-step sums (ms) by category and by kernel name, from `device_events`."""
  by_name = collections.defaultdict(lambda: [0.0, 0])
  by_cat = collections.Counter()
  for name, dur in events:
    by_name[name][0] += dur
    by_name[name][1] += 1
    by_cat[category(name)] += dur
  ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])
  return {"device_ms_per_step": sum(d for _, d in events) / 1e3 / steps,
          "count_per_step": len(events) / steps,
          "categories": {cat: round(v / 1e3 / steps, 4) for cat, v in by_cat.most_common()},
          "top": [[name, round(v / 1e3 / steps, 4), calls / steps] for name, (v, calls) in ranked[:top]]}


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$")
_LAUNCH = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = .*? (fusion|custom-call|copy-start|copy)\(")
_WHILE_BODY = re.compile(r" while\(.*body=%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]+)"')


def module_of(op_name: str) -> str:
  """The Flax module an instruction's op_name points at, below the scanned stack ("attn/out",
  "mlp/gate", ...), or "(loop)" for the loop's own bookkeeping (stack updates, counters)."""
  path = op_name.split("/")
  names = [part for part in path if part not in ("blocks", "checkpoint", "rematted_computation", "eval_jaxpr")
           and not part.startswith(("jit(", "jvp(", "transpose(", "while", "body", "cond"))]
  modules = [part for part in names if part in ("attn", "mlp", "ln1", "ln2") or part.split(".")[0] in (
      "attn", "query", "key", "value", "out", "gate", "fc1", "fc2") or part.startswith("hidden_")]
  if not modules:
    return "(loop)"
  return "/".join(modules[:2])


def loop_kernels(hlo_text: str) -> list[dict]:
  """Launches (fusions, custom calls, copies) of each while-loop body of an optimised HLO module
  (`compiled.as_text()`), by the module they come from: for a scanned model, what one layer
  launches in the forward and in the backward loop. [{body, launches, by_module: {module: n}}]."""
  bodies, computations, current = [], {}, None
  for line in hlo_text.splitlines():
    match = _COMPUTATION.match(line)
    if match:
      current = computations.setdefault(match.group(1), [])
      continue
    if line.startswith("}"):
      current = None
    elif current is not None:
      current.append(line)
      body = _WHILE_BODY.search(line)
      if body:
        bodies.append(body.group(1))
  out = []
  for body in bodies:
    by_module = collections.Counter()
    for line in computations.get(body, []):
      if _LAUNCH.match(line):
        op_name = _OP_NAME.search(line)
        by_module[module_of(op_name.group(1)) if op_name else "(loop)"] += 1
    out.append({"body": body, "launches": sum(by_module.values()), "by_module": dict(by_module.most_common())})
  return out


def load_trace(log_dir: str) -> dict:
  files = sorted(glob.glob(f"{log_dir}/**/*.trace.json.gz", recursive=True))
  if not files:
    raise FileNotFoundError(f"the profiler wrote no *.trace.json.gz under {log_dir}")
  with gzip.open(files[-1]) as f:
    return json.load(f)


def profile_phase(exp, phase: str, dense_params, steps: int, top: int = 25, hlo_dir: Path | None = None) -> dict:
  run, state, compiled, _, _ = tb.compiled_step(exp, phase, dense_params)
  if hlo_dir is not None:  # the optimised HLO, to read what the profile's fusions compute
    hlo_dir.mkdir(parents=True, exist_ok=True)
    text = compiled.as_text()
    with gzip.open(hlo_dir / f"{phase}.hlo.txt.gz", "wt") as f:
      f.write(text)
    loops = loop_kernels(text)
  for _ in range(3):
    state, metrics = run(state)
  jax.block_until_ready((state, metrics))
  tic = time.perf_counter()
  for _ in range(steps):
    state, metrics = run(state)
  jax.block_until_ready((state, metrics))
  step_ms = (time.perf_counter() - tic) / steps * 1e3
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      for _ in range(steps):
        state, metrics = run(state)
      jax.block_until_ready((state, metrics))
    trace = load_trace(log_dir)
  res = {"step_ms": round(step_ms, 3), **summarize(device_events(trace), steps, max(top, 25))}
  if hlo_dir is not None:
    res["loops"] = loops
  return res


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="vit_b16", choices=("tiny", "vit_s16", "vit_b16", "vit_l16"))
  parser.add_argument("--acm", default="mlp_qkvo", choices=tb.ACM_KINDS)
  parser.add_argument("--phases", type=tb._list(("pretrain", *tb.ACM_PHASES)), default=["pretrain", "finetune"])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--scanned", action="store_true", help="scanned blocks (default: unrolled)")
  parser.add_argument("--remat", default="none", choices=transformer.REMAT_POLICIES)
  parser.add_argument("--group_qkv_gates", default="auto", choices=tb.config_lib.GROUP_QKV_GATES)
  parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  parser.add_argument("--steps", type=int, default=5, help="profiled steps per phase")
  parser.add_argument("--top", type=int, default=15, help="kernels printed per phase (and recorded, at least 25)")
  parser.add_argument("--out", type=Path, default=None)
  parser.add_argument("--scan_outputs", default="auto", choices=("auto", "zeros"),
                      help="as benchmarks.train_bench: auto allocates scans' stacked outputs unfilled on one GPU")
  parser.add_argument("--hlo_dir", type=Path, default=None,
                      help="write each phase's optimised HLO there (<phase>.hlo.txt.gz), to look up kernel names")
  args = parser.parse_args(argv)
  if args.batch < 1 or args.steps < 1:
    parser.error("--batch and --steps must be >= 1")
  if args.scan_outputs == "auto" and scan_outputs.enable_for_process():
    print("scan outputs: allocated unfilled (acm_jax.scan_outputs)", file=sys.stderr)
  dense_exp = tb.experiment(args.model, "none", args.batch, args.scanned, args.remat, args.dtype)
  dense_params = phases.init_params(dense_exp, "dense", 0)
  acm_exp = tb.experiment(args.model, args.acm, args.batch, args.scanned, args.remat, args.dtype,
                          args.group_qkv_gates)
  results = {}
  for phase in args.phases:
    exp = dense_exp if phase == "pretrain" else acm_exp
    results[phase] = profile_phase(exp, phase, dense_params, args.steps, args.top, args.hlo_dir)
    res = results[phase]
    print(f"\n{phase}: step {res['step_ms']:.2f} ms, device busy {res['device_ms_per_step']:.2f} ms in "
          f"{res['count_per_step']:.0f} kernels per step", flush=True)
    for cat, ms in res["categories"].items():
      print(f"  {cat:10s} {ms:9.3f} ms")
    for name, ms, calls in res["top"][:args.top]:
      print(f"  {ms:9.3f} ms {calls:6.1f}x  {name[:110]}")
    for loop in res.get("loops", []):
      print(f"  while body {loop['body']}: {loop['launches']} launches per trip, by module {loop['by_module']}")
  if "pretrain" in results:
    base = results["pretrain"]["categories"]
    for phase, res in results.items():
      if phase != "pretrain":
        diff = {cat: round(ms - base.get(cat, 0.0), 3) for cat, ms in res["categories"].items()}
        print(f"\n{phase} - pretrain, ms per step by category: {diff}")
  device = jax.devices()[0].device_kind
  record = {"device": device, "date": datetime.date.today().isoformat(), "jax_version": jax.__version__,
            "model": args.model, "acm": args.acm, "batch": args.batch, "scanned": args.scanned,
            "remat": args.remat, "scan_outputs": scan_outputs.active(), "phases": results}
  out = args.out or tb.RESULTS / f"step_profile_{tb._slug(device)}.json"
  tb.append(out, [record])
  return record


if __name__ == "__main__":
  main()
