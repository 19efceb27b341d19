"""Finetune throughput on 1 GPU and on every GPU of the host, data parallel and FSDP (issue #9).

    python3 -m benchmarks.scaling_bench                  # per-GPU batch 64, ACM and dense ViT-B/16
    python3 -m benchmarks.scaling_bench --per_gpu_batch=128 --models=acm

For each model (the ACM ViT-B/16 finetune step, and the dense ViT-B/16's supervised
step as reference) and each mode (dp: mesh data:G; fsdp: mesh fsdp:G), the same
per-GPU batch runs on 1 GPU and on all G GPUs. Records images/s, scaling
efficiency = images/s(G) / (G x images/s(1)) and peak memory per GPU
(`device.memory_stats()["peak_bytes_in_use"]`, reset by running each configuration
in its own process) in benchmarks/results/scaling_<gpu>.json and a line per run in
benchmarks/RESULTS.md. On a 1-GPU machine only the G=1 rows are produced.
Random device-resident batches: input loading is not measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def measure(model: str, mode: str, gpus: int, per_gpu_batch: int, repeats: int, remat: bool,
            preset: str = "vit_b16") -> dict:
  """One configuration, in this process (run through `--one` so peaks do not mix)."""
  import time
  import jax
  from benchmarks import sharding_bench
  tic = time.perf_counter()
  stage = lambda name: print(f"[{time.perf_counter() - tic:7.1f} s] {name}", file=sys.stderr, flush=True)
  devices = jax.devices()[:gpus]
  axis = "data" if mode == "dp" else "fsdp"
  s = sharding_bench.setup(batch_size=per_gpu_batch * gpus, mesh=f"{axis}:{gpus}", strategy=mode,
                           devices=devices, acm=model == "acm", remat=remat, model=preset)
  stage("setup")
  state, batch = s.init_state(), s.batch()
  jax.block_until_ready(state)
  stage("state initialised")
  step = s.sharded_step()
  step.lower(s.abstract_state, s.abstract_batch()).compile()
  stage("step compiled")
  seconds, state = sharding_bench.time_step(step, state, batch, repeats)
  stage("timed")
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in devices]
  return {"device": devices[0].device_kind, "gpus": gpus, "date": datetime.date.today().isoformat(),
          "jax_version": jax.__version__, "mode": mode, "model": f"{model} {preset}", "remat": remat,
          "per_gpu_batch": per_gpu_batch, "step_s": seconds, "images_per_s": per_gpu_batch * gpus / seconds,
          "peak_bytes_per_gpu": max(peaks), "xla_flags": os.environ.get("XLA_FLAGS", "")}


def _run_one(args, model: str, mode: str, gpus: int) -> dict:
  cmd = [sys.executable, "-m", "benchmarks.scaling_bench", "--one", f"{model},{mode},{gpus}",
         f"--per_gpu_batch={args.per_gpu_batch}", f"--repeats={args.repeats}", f"--model={args.model}",
         *(["--remat"] if args.remat else [])]
  failed = {"model": f"{model} {args.model}", "mode": mode, "gpus": gpus}
  try:
    out = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                         timeout=args.timeout)
  except subprocess.TimeoutExpired:
    return {**failed, "error": f"timed out after {args.timeout} s"}
  if out.returncode:
    return {**failed, "error": out.stderr[-2000:]}
  return json.loads(out.stdout.strip().splitlines()[-1])


def _write_json(kind: str, records: list[dict]) -> Path:
  from benchmarks.sharding_bench import _slug
  RESULTS.mkdir(parents=True, exist_ok=True)
  path = RESULTS / f"scaling_{_slug(kind)}.json"
  path.write_text(json.dumps(records, indent=2) + "\n")
  return path


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--per_gpu_batch", type=int, default=64)
  parser.add_argument("--models", default="acm,dense")
  parser.add_argument("--modes", default="dp,fsdp")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--model", default="vit_b16", help="ViT preset (tiny for a CPU smoke run)")
  parser.add_argument("--timeout", type=float, default=300, help="seconds allowed to one configuration")
  parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # model,mode,gpus: a child process
  args = parser.parse_args(argv)
  if args.one:
    model, mode, gpus = args.one.split(",")
    print(json.dumps(measure(model, mode, int(gpus), args.per_gpu_batch, args.repeats, args.remat, args.model)))
    return

  import jax  # the parent only counts the GPUs; every measurement runs in a child
  total = jax.device_count()
  kind = jax.devices()[0].device_kind
  records = []
  for model in args.models.split(","):
    for mode in args.modes.split(","):
      single = _run_one(args, model, mode, 1)
      records.append(single)
      print(json.dumps(single))
      if total > 1:
        full = _run_one(args, model, mode, total)
        if "error" not in full and "error" not in single:
          full["scaling_efficiency"] = full["images_per_s"] / (total * single["images_per_s"])
          full["peak_vs_single"] = full["peak_bytes_per_gpu"] / max(single["peak_bytes_per_gpu"], 1)
        records.append(full)
        print(json.dumps(full))
      if "error" not in single:
        single["scaling_efficiency"] = 1.0
      if args.model == "vit_b16":  # written as it goes: a run cut short keeps what it measured
        _write_json(kind, records)
  if args.model != "vit_b16":
    print(f"--model={args.model}: a smoke run, not recorded")
    return
  print(f"wrote {_write_json(kind, records)}")
  lines = [f"## Scaling: ViT-B/16 finetune step, {kind} x{total}, {datetime.date.today().isoformat()}", "",
           f"Command: `python3 -m benchmarks.scaling_bench --per_gpu_batch={args.per_gpu_batch}"
           f"{' --remat' if args.remat else ''}`. Targets: efficiency >= 0.90 at G=2 (>= 0.85 at G=8); "
           "FSDP peak per GPU at G=2 < 0.60 of G=1.", "",
           "| model | mode | GPUs | per-GPU batch | images/s | efficiency | peak GiB/GPU |", "|---|---|---|---|---|---|---|"]
  for r in records:
    if "error" in r:
      lines.append(f"| {r['model']} | {r['mode']} | {r['gpus']} | | failed | | |")
      continue
    lines.append(f"| {r['model']} | {r['mode']} | {r['gpus']} | {r['per_gpu_batch']} | {r['images_per_s']:.1f} | "
                 f"{r.get('scaling_efficiency', float('nan')):.3f} | {r['peak_bytes_per_gpu'] / 2**30:.2f} |")
  with RESULTS_MD.open("a") as f:
    f.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
