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

    python3 -m benchmarks.scaling_bench --flag_sweep --models=acm --modes=fsdp --scan   # issue #22, item 3

measures the collective-overlap XLA flags of `acm_jax.xla_flags.GPU_OVERLAP_FLAGS` flag by flag on
every GPU of the host: one child process without any of them (the baseline; other flags of the
user's XLA_FLAGS are kept), one with all of them, one with each alone. Each record carries its
`variant`, its `xla_flags` and `speedup_vs_none` (images/s over the baseline's); they go to
benchmarks/results/scaling_flags_<gpu>.json and a table in RESULTS.md. This is the measurement
the entry points wait for before they set any of these flags.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def measure(model: str, mode: str, gpus: int, per_gpu_batch: int, repeats: int, remat: bool,
            preset: str = "vit_b16", scan: bool = False) -> dict:
  """One configuration, in this process (run through `--one` so peaks do not mix)."""
  import time
  import jax
  from benchmarks import sharding_bench
  tic = time.perf_counter()
  stage = lambda name: print(f"[{time.perf_counter() - tic:7.1f} s] {name}", file=sys.stderr, flush=True)
  devices = jax.devices()[:gpus]
  axis = "data" if mode == "dp" else "fsdp"
  s = sharding_bench.setup(batch_size=per_gpu_batch * gpus, mesh=f"{axis}:{gpus}", strategy=mode,
                           devices=devices, acm=model == "acm", remat=remat, model=preset, scan=scan)
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
          "peak_bytes_per_gpu": max(peaks), "xla_flags": os.environ.get("XLA_FLAGS", ""), "scanned": scan}


def _run_one(args, model: str, mode: str, gpus: int, xla_flags: str | None = None) -> dict:
  """One configuration in a child process; xla_flags: its XLA_FLAGS (None: this process's)."""
  cmd = [sys.executable, "-m", "benchmarks.scaling_bench", "--one", f"{model},{mode},{gpus}",
         f"--per_gpu_batch={args.per_gpu_batch}", f"--repeats={args.repeats}", f"--model={args.model}",
         *(["--remat"] if args.remat else []), *(["--scan"] if args.scan else [])]
  failed = {"model": f"{model} {args.model}", "mode": mode, "gpus": gpus}
  env = None if xla_flags is None else {**os.environ, "XLA_FLAGS": xla_flags}
  try:
    out = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                         timeout=args.timeout, env=env)
  except subprocess.TimeoutExpired:
    return {**failed, "error": f"timed out after {args.timeout} s"}
  if out.returncode:
    return {**failed, "error": out.stderr[-2000:]}
  return json.loads(out.stdout.strip().splitlines()[-1])


def flag_variants(user_flags: str, names: list[str] | None = None, leave_one_out: bool = False) -> dict[str, str]:
  """XLA_FLAGS of each variant of the flag sweep: "none" (the user's flags without any overlap flag),
  "all" (every overlap flag added) and, per flag (or per name of `names`, the flag without its
  --xla_gpu_ prefix), that flag alone, or with leave_one_out every flag but that one
  ("without_<name>": the pipelining flags may only act under the latency-hiding scheduler)."""
  from acm_jax import xla_flags
  short = {name.removeprefix("--xla_gpu_"): name for name in xla_flags.GPU_OVERLAP_FLAGS}
  chosen = list(short) if names is None else names
  unknown = [n for n in chosen if n not in short]
  if unknown:
    raise ValueError(f"--sweep_flags: unknown {unknown}; expected names from {sorted(short)}")
  kept = [item for item in shlex.split(user_flags) if item.partition("=")[0] not in xla_flags.GPU_OVERLAP_FLAGS]
  base = " ".join(kept)

  def added(wanted: dict[str, str]) -> str:
    env = {"XLA_FLAGS": base}
    xla_flags.overlap_flags(env, wanted)
    return env["XLA_FLAGS"]
  variants = {"none": base, "all": added(xla_flags.GPU_OVERLAP_FLAGS)}
  for name in chosen:
    if leave_one_out:
      variants[f"without_{name}"] = added({k: v for k, v in xla_flags.GPU_OVERLAP_FLAGS.items() if k != short[name]})
    else:
      variants[name] = added({short[name]: xla_flags.GPU_OVERLAP_FLAGS[short[name]]})
  return variants


def flag_sweep(args, total: int) -> list[dict]:
  """Every model x mode on all `total` GPUs under each XLA_FLAGS variant (`flag_variants`)."""
  names = args.sweep_flags.split(",") if args.sweep_flags else None
  variants = flag_variants(os.environ.get("XLA_FLAGS", ""), names, args.leave_one_out)
  records = []
  for model in args.models.split(","):
    for mode in args.modes.split(","):
      group = []
      for variant, flags in variants.items():
        record = {**_run_one(args, model, mode, total, flags), "variant": variant}
        group.append(record)
        print(json.dumps(record), flush=True)
      base = group[0]
      for record in group:
        if "error" not in record and "error" not in base:
          record["speedup_vs_none"] = record["images_per_s"] / base["images_per_s"]
      records += group
  return records


def _flag_table(kind: str, total: int, args, records: list[dict]) -> list[str]:
  lines = [f"## XLA flag sweep: ViT-B/16 step on {kind} x{total}, {datetime.date.today().isoformat()}", "",
           f"Command: `python3 -m benchmarks.scaling_bench --flag_sweep --models={args.models} --modes={args.modes}"
           f" --per_gpu_batch={args.per_gpu_batch}{' --remat' if args.remat else ''}{' --scan' if args.scan else ''}"
           f"{' --leave_one_out' if args.leave_one_out else ''}"
           f"{f' --sweep_flags={args.sweep_flags}' if args.sweep_flags else ''}`.",
           "", "| model | mode | GPUs | variant | images/s | speedup vs none |", "|---|---|---|---|---|---|"]
  for r in records:
    if "error" in r:
      lines.append(f"| {r['model']} | {r['mode']} | {r['gpus']} | {r['variant']} | failed | |")
      continue
    lines.append(f"| {r['model']} | {r['mode']} | {r['gpus']} | {r['variant']} | {r['images_per_s']:.1f} | "
                 f"{r.get('speedup_vs_none', float('nan')):.3f} |")
  return lines


def _write_json(kind: str, records: list[dict], prefix: str = "scaling") -> Path:
  from benchmarks.sharding_bench import _slug
  RESULTS.mkdir(parents=True, exist_ok=True)
  path = RESULTS / f"{prefix}_{_slug(kind)}.json"
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
  parser.add_argument("--scan", action="store_true", help="the encoder blocks scanned (--scan_blocks=true)")
  parser.add_argument("--flag_sweep", action="store_true",
                      help="measure the collective-overlap XLA flags one by one on all GPUs (see above)")
  parser.add_argument("--sweep_flags", default=None,
                      help="with --flag_sweep: only these flags alone, e.g. enable_pipelined_all_gather (names "
                      "without --xla_gpu_)")
  parser.add_argument("--leave_one_out", action="store_true",
                      help="with --flag_sweep: every flag but one per variant, instead of one flag alone")
  parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # model,mode,gpus: a child process
  args = parser.parse_args(argv)
  if args.one:
    model, mode, gpus = args.one.split(",")
    print(json.dumps(measure(model, mode, int(gpus), args.per_gpu_batch, args.repeats, args.remat, args.model,
                             args.scan)))
    return
  if (args.sweep_flags or args.leave_one_out) and not args.flag_sweep:
    parser.error("--sweep_flags and --leave_one_out go with --flag_sweep")
  if args.flag_sweep:
    try:
      flag_variants("", args.sweep_flags.split(",") if args.sweep_flags else None)
    except ValueError as e:
      parser.error(str(e))

  from acm_jax import xla_flags
  # as the entry points: no preallocation (unless the environment asks), so that the parent, which only
  # counts the GPUs, does not hold 75% of each GPU's memory while its children measure
  xla_flags.host_memory_defaults()
  import jax  # the parent only counts the GPUs; every measurement runs in a child
  total = jax.device_count()
  kind = jax.devices()[0].device_kind
  if args.flag_sweep:
    records = flag_sweep(args, total)
    if args.model != "vit_b16":
      print(f"--model={args.model}: a smoke run, not recorded")
      return
    print(f"wrote {_write_json(kind, records, 'scaling_flags')}")
    with RESULTS_MD.open("a") as f:
      f.write("\n" + "\n".join(_flag_table(kind, total, args, records)) + "\n")
    return
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
