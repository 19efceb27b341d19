"""What the sharding layer costs and saves, for the ACM ViT-B/16 finetune step (issue #8).

    # memory from the compiled step's own accounting, 8 simulated CPU devices (no GPU needed),
    # for the unrolled and the scanned blocks (--layouts=unrolled,scanned)
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python3 -m benchmarks.sharding_bench memory
    # one GPU: sharded step on a 1-device mesh vs the plain jitted step, and the largest batch
    # that fits with and without rematerialisation (images/s at each)
    python3 -m benchmarks.sharding_bench gpu [--parts=overhead,largest,largest_remat]
    # (a subset of --parts re-measures only those and merges into the existing JSON,
    # e.g. when one call's time limit cannot hold every compile)

Both write benchmarks/results/sharding*.json and append a section to benchmarks/RESULTS.md; memory
keeps the runs it does not measure again (each run carries its date), and those it does under
"replaced_runs".
The model is the paper's configuration: ViT-B/16, 224px, 1000 classes, every MLP and
every q/k/v/o projection ACMized (N=4), gates of 3 layers of width 16; bf16 activations.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from acm_jax import sharding
from acm_jax.train import phases, steps
from acm_jax.vit import task as vit_task
from acm_jax.train.config import ExperimentConfig

RESULTS = Path(__file__).resolve().parent / "results"
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


@dataclasses.dataclass
class StepSetup:
  exp: phases.Experiment
  tx: object
  step_fn: object  # (state, batch) -> (state, metrics), unjitted
  abstract_state: object  # ShapeDtypeStructs carrying their shardings
  state_shardings: object
  batch_size: int

  @property
  def parts(self) -> sharding.Partitioner:
    return self.exp.partitioner

  def abstract_batch(self):
    rows = self.parts.batch_sharding()
    size = self.exp.info.image_size
    return {"image": jax.ShapeDtypeStruct((self.batch_size, size, size, 3), jnp.float32, sharding=rows),
            "label": jax.ShapeDtypeStruct((self.batch_size,), jnp.int32, sharding=rows)}

  def batch(self, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    size = self.exp.info.image_size
    host = {"image": rng.uniform(-1, 1, (self.batch_size, size, size, 3)).astype(np.float32),
            "label": rng.integers(0, self.exp.info.num_classes, self.batch_size).astype(np.int32)}
    return self.parts.shard_batch(host, self.batch_size)

  def sharded_step(self):
    return phases.keyed_step(self.step_fn, self.parts, self.state_shardings)

  def plain_step(self):
    """The step as jitted before the sharding layer: no shardings given."""
    def wrapped(state, batch):
      new_state, metrics = self.step_fn({**state, "rng": jax.random.wrap_key_data(state["rng"])}, batch)
      return {**new_state, "rng": state["rng"]}, metrics
    return jax.jit(wrapped, donate_argnums=0)

  def init_state(self):
    """The state placed on the mesh from host-initialised params."""
    params = phases.init_params(self.exp, "acm" if self.acm else "dense", 0)  # on the host CPU
    return self.parts.create(lambda p: phases.new_state(p, self.tx, 0), self.parts.put(params))[0]

  @property
  def acm(self) -> bool:
    return self.step_fn.func is steps.finetune_step


def setup(*, batch_size: int, mesh: str | None = None, strategy: str = "dp", devices=None, acm: bool = True,
          remat: bool | str = False, model: str = "vit_b16", dtype: str = "bfloat16",
          scan: bool = False) -> StepSetup:
  """The finetune step of the ACM ViT (or the dense ViT's supervised step with acm=False);
  scan: the encoder blocks as one scanned block."""
  cfg = ExperimentConfig(model=model, dataset="synthetic", image_size=224, num_classes=1000, batch_size=batch_size,
                         eval_batch_size=batch_size, sharding=strategy, remat=remat, dtype=dtype, acm_attention=True,
                         gate_depth=3, gate_hidden=16, finetune_steps=1000, scan_blocks=scan)
  # built for all devices with a batch they divide, then given the requested devices and batch
  exp = vit_task.build(dataclasses.replace(cfg, batch_size=jax.device_count(), eval_batch_size=jax.device_count()))
  exp = dataclasses.replace(exp, config=dataclasses.replace(cfg, mesh=mesh),
                            partitioner=sharding.Partitioner.from_flags(mesh, strategy, devices))
  params = phases.abstract_params(exp, "acm" if acm else "dense")
  tx = phases.optimizer(exp, "finetune", params)
  if acm:
    step_fn = functools.partial(steps.finetune_step, exp.task, tx, steps.FinetuneWeights(budget=0.5))
  else:
    step_fn = functools.partial(steps.pretrain_step, exp.task, tx, 0.0)
  abstract = jax.eval_shape(lambda p: phases.new_state(p, tx, 0), params)
  shardings = exp.partitioner.shardings(abstract)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return StepSetup(exp, tx, step_fn, abstract, shardings, batch_size)


def state_bytes_per_device(abstract_state) -> dict[str, int]:
  """Bytes of params and of optimizer state held by one device under their shardings."""
  def per_device(tree):
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree))
  return {"params": per_device(abstract_state["params"]), "opt_state": per_device(abstract_state["opt_state"])}


def compiled_memory(s: StepSetup) -> dict:
  tic = time.time()
  compiled = s.sharded_step().lower(s.abstract_state, s.abstract_batch()).compile()
  stats = compiled.memory_analysis()
  state = state_bytes_per_device(s.abstract_state)
  return {"mesh": dict(s.parts.mesh.shape), "strategy": s.parts.strategy, "global_batch": s.batch_size,
          "argument_bytes": int(stats.argument_size_in_bytes), "output_bytes": int(stats.output_size_in_bytes),
          "temp_bytes": int(stats.temp_size_in_bytes), "alias_bytes": int(stats.alias_size_in_bytes),
          "params_bytes": state["params"], "opt_state_bytes": state["opt_state"],
          "params_plus_opt_bytes": state["params"] + state["opt_state"], "compile_s": round(time.time() - tic, 1)}


def one_layer_bytes(s: StepSetup) -> int:
  """Bytes of one encoder block's parameters, whole (what FSDP gathers for one layer)."""
  params = s.abstract_state["params"]
  if "blocks" in params:
    return sum(math.prod(a.shape[1:]) * a.dtype.itemsize for a in jax.tree.leaves(params["blocks"]))
  return sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(params["block_0"]))


def run_memory(args) -> dict:
  devices = jax.devices()
  if len(devices) < 8:
    raise SystemExit("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu")
  today = datetime.date.today().isoformat()
  old = json.loads((RESULTS / "sharding.json").read_text()) if (RESULTS / "sharding.json").exists() else {}
  # runs of layouts not measured now are kept (each with its date), so one call may measure one layout
  runs = {name: {"date": old.get("date"), **r} for name, r in old.get("runs", {}).items()}
  # a run measured again replaces its entry in `runs`; the replaced one moves here, named
  replaced = list(old.get("replaced_runs", []))
  layer = old.get("one_layer_param_bytes")

  def measured(name: str, run: dict) -> None:
    if name in runs:
      replaced.append({"name": name, **runs[name]})
    runs[name] = run
    print(name, json.dumps(run), flush=True)

  for layout in args.layouts:
    scan, suffix = layout == "scanned", "_scanned" if layout == "scanned" else ""
    if not scan and args.single:
      measured("single", {"date": today, **compiled_memory(setup(batch_size=args.batch, mesh="data:1",
                                                                    devices=devices[:1]))})
    for name, mesh, strategy in (("dp8", "data:8", "dp"), ("fsdp8", "fsdp:8", "fsdp")):
      s = setup(batch_size=args.batch, mesh=mesh, strategy=strategy, scan=scan)
      layer = one_layer_bytes(s)
      measured(name + suffix, {"date": today, **compiled_memory(s), "scanned": scan})
  record = {"benchmark": "sharding_memory", "date": today, "jax_version": jax.__version__,
            "device": f"{len(devices)} simulated {jax.default_backend()} devices", "model": "ACM ViT-B/16 (MLP + q/k/v/o)",
            "runs": runs, "one_layer_param_bytes": layer, "replaced_runs": replaced}
  if "single" in runs and "fsdp8" in runs:
    single, fsdp = runs["single"]["params_plus_opt_bytes"], runs["fsdp8"]["params_plus_opt_bytes"]
    record.update(fsdp8_over_single_params_plus_opt=fsdp / single,
                  target="fsdp8 params+opt bytes per device <= 1/8 x single x 1.10",
                  target_met=bool(fsdp <= single / 8 * 1.10))
  gather_checks = {}
  for suffix in ("", "_scanned"):
    if f"fsdp8{suffix}" in runs:
      fsdp, dp = runs[f"fsdp8{suffix}"]["temp_bytes"], runs[f"dp8{suffix}"]["temp_bytes"]
      gather_checks["scanned" if suffix else "unrolled"] = {"fsdp8_temp": fsdp, "dp8_temp": dp,
                                                             "met": bool(fsdp <= dp + layer)}
  record["gather_target"] = "fsdp8 temp bytes per device <= dp8 temp + one layer's gathered parameters (issue #22)"
  record["gather_checks"] = gather_checks
  _write("sharding.json", record)
  mib = lambda b: f"{b / 2**20:,.1f}"
  lines = [f"## Sharding memory: ACM ViT-B/16 finetune step, {record['device']}, {record['date']}, jax {jax.__version__}",
           "",
           "Command: `XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python3 -m "
           f"benchmarks.sharding_bench memory --batch={args.batch} --layouts={','.join(args.layouts)}`. Per device, "
           "from `jit(step).lower(...).compile().memory_analysis()` (XLA:CPU's accounting); params + opt state from "
           "the shardings. The state is donated, so output bytes alias argument bytes.",
           "",
           "| run | measured | blocks | mesh | global batch | params+opt MiB | argument MiB | output MiB | temp MiB |",
           "|---|---|---|---|---|---|---|---|---|"]
  for name, r in runs.items():
    mesh = ",".join(f"{k}:{v}" for k, v in r["mesh"].items() if v > 1) or "1 device"
    lines.append(f"| {name} | {r['date']} | {'scanned' if r.get('scanned') else 'unrolled'} | {mesh} | "
                 f"{r['global_batch']} | "
                 f"{mib(r['params_plus_opt_bytes'])} | {mib(r['argument_bytes'])} | {mib(r['output_bytes'])} | "
                 f"{mib(r['temp_bytes'])} |")
  lines.append("")
  if "target_met" in record:
    lines.append(f"FSDP over 8: params+opt per device = {record['fsdp8_over_single_params_plus_opt']:.4f} of one "
                 f"device (target <= {1.1 / 8:.4f}): {'met' if record['target_met'] else 'NOT met'}.")
  for layout, c in gather_checks.items():
    lines.append(f"{layout} blocks: fsdp:8 temp {mib(c['fsdp8_temp'])} MiB vs dp:8 temp {mib(c['dp8_temp'])} MiB + one "
                 f"layer's parameters {mib(layer)} MiB: {'met' if c['met'] else 'NOT met'}.")
  _append_md(lines + [""])
  return record


# --- one GPU ------------------------------------------------------------------------------


def time_step(step, state, batch, repeats: int) -> tuple[float, object]:
  """Median seconds per step after warm-up; the state is donated and threaded through."""
  for _ in range(3):
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  times = []
  for _ in range(repeats):
    tic = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - tic)
  return float(np.median(times)), state


def fits(batch_size: int, remat: bool, device) -> dict | None:
  """Compiles the 1-device step at `batch_size`; its memory, or None when it does not fit."""
  s = setup(batch_size=batch_size, mesh="data:1", devices=[device], remat=remat)
  try:
    stats = s.sharded_step().lower(s.abstract_state, s.abstract_batch()).compile().memory_analysis()
  except Exception as e:  # XLA refuses programs larger than the device at compile time
    if "RESOURCE_EXHAUSTED" in str(e) or "memory" in str(e).lower():
      return None
    raise
  need = stats.argument_size_in_bytes + stats.temp_size_in_bytes + stats.output_size_in_bytes \
      - stats.alias_size_in_bytes
  return {"bytes": int(need), "limit": int(device.memory_stats()["bytes_limit"])}


def largest_batch(remat: bool, device, start: int = 64, multiple: int = 8) -> tuple[int, dict]:
  """Linear model of compiled bytes in the batch from two compiles, then verified
  downward (compiles only; the run at that batch comes after). Returns the batch
  and its compiled footprint."""
  a, b = fits(start, remat, device), fits(2 * start, remat, device)
  if a is None:
    raise SystemExit(f"batch {start} does not fit even once (remat={remat})")
  if b is None:
    return start, a
  per_example = (b["bytes"] - a["bytes"]) / start
  fixed = a["bytes"] - per_example * start
  guess = int((0.97 * a["limit"] - fixed) / per_example) // multiple * multiple
  while guess > 2 * start:
    got = fits(guess, remat, device)
    if got is not None and got["bytes"] <= 0.97 * got["limit"]:
      return guess, got
    guess = int(guess * 0.93) // multiple * multiple
  return 2 * start, b


def throughput(batch_size: int, remat: bool, device, repeats: int, plain: bool = False) -> dict:
  s = setup(batch_size=batch_size, mesh="data:1", devices=[device], remat=remat)
  state, batch = s.init_state(), s.batch()
  step = s.plain_step() if plain else s.sharded_step()
  seconds, state = time_step(step, state, batch, repeats)
  peak = device.memory_stats().get("peak_bytes_in_use")
  del state
  return {"batch": batch_size, "remat": remat, "step": "plain jit" if plain else "sharded (1-device mesh)",
          "step_s": seconds, "images_per_s": batch_size / seconds, "peak_bytes": peak}


def overhead_pair(batch_size: int, device, repeats: int, rounds: int = 3) -> list[dict]:
  """Plain jit vs sharded step, alternated `rounds` times so drift (clocks, other
  tenants) hits both; the median of the per-round medians of each."""
  s = setup(batch_size=batch_size, mesh="data:1", devices=[device])
  batch = s.batch()
  runs = {"plain jit": [s.plain_step(), s.init_state(), []],
          "sharded (1-device mesh)": [s.sharded_step(), s.init_state(), []]}
  for _ in range(rounds):
    for run in runs.values():
      seconds, run[1] = time_step(run[0], run[1], batch, repeats)
      run[2].append(seconds)
  peak = device.memory_stats().get("peak_bytes_in_use")
  out = []
  for name, (_, _, times) in runs.items():
    seconds = float(np.median(times))
    out.append({"batch": batch_size, "remat": False, "step": name, "step_s": seconds,
                "round_step_s": times, "images_per_s": batch_size / seconds, "peak_bytes": peak})
  return out


def run_gpu(args) -> dict:
  """Parts run in order; a partial run (--parts) merges into the device's existing record."""
  device = jax.devices()[0]
  if device.platform != "gpu":
    raise SystemExit(f"the gpu benchmark needs a GPU; found {device.platform}")
  path = RESULTS / f"sharding_{_slug(device.device_kind)}.json"
  old = json.loads(path.read_text()) if path.exists() else {}
  overhead = old.get("overhead", [])
  largest = {bool(r["remat"]): r for r in old.get("largest_batch", [])}
  if "overhead" in args.parts:
    overhead = overhead_pair(args.batch, device, args.repeats)
    print(json.dumps(overhead, indent=1), flush=True)
  for remat in (False, True):
    if ("largest_remat" if remat else "largest") in args.parts:
      size, footprint = largest_batch(remat, device, start=args.batch)
      largest[remat] = {**throughput(size, remat, device, args.repeats), "compiled_bytes": footprint["bytes"],
                        "bytes_limit": footprint["limit"], "date": datetime.date.today().isoformat()}
      print(json.dumps(largest[remat]), flush=True)
  largest = [largest[r] for r in (False, True) if r in largest]
  ratio = overhead[1]["images_per_s"] / overhead[0]["images_per_s"] if overhead else None
  record = {"benchmark": "sharding_gpu", "date": datetime.date.today().isoformat(), "jax_version": jax.__version__,
            "device": device.device_kind, "host": platform.node(), "model": "ACM ViT-B/16 (MLP + q/k/v/o), bf16",
            "overhead": overhead, "sharded_over_plain": ratio, "target": "sharded >= 0.97 x plain images/s",
            "target_met": None if ratio is None else bool(ratio >= 0.97), "largest_batch": largest}
  _write(path.name, record)
  lines = [f"## Sharding on one GPU: ACM ViT-B/16 finetune step, {device.device_kind}, {record['date']}, "
           f"jax {jax.__version__}", "",
           f"Command: `python3 -m benchmarks.sharding_bench gpu --batch={args.batch} --repeats={args.repeats} "
           f"--parts={','.join(args.parts)}`. "
           "Median step time after warm-up, random device-resident batches (data loading excluded), bf16; "
           "plain and sharded alternated over 3 rounds. Compiled GiB: the program's own footprint "
           "(arguments + temps + outputs - aliased); peak GiB: the process high-water mark so far.", "",
           "| step | batch | remat | images/s | compiled GiB | peak GiB |", "|---|---|---|---|---|---|"]
  for r in overhead + largest:
    peak = f"{r['peak_bytes'] / 2**30:.1f}" if r["peak_bytes"] else "n/a"
    compiled = f"{r['compiled_bytes'] / 2**30:.1f}" if r.get("compiled_bytes") else "-"
    lines.append(f"| {r['step']} | {r['batch']} | {'yes' if r['remat'] else 'no'} | {r['images_per_s']:.1f} | "
                 f"{compiled} | {peak} |")
  verdict = "not measured" if ratio is None else f"{ratio:.3f} (target >= 0.97): " + (
      "met" if record["target_met"] else "NOT met")
  lines += ["", f"Sharded / plain images/s = {verdict}. Largest batches are the largest multiples of 8 whose "
            "compiled footprint stays under 97% of the memory XLA may use (`bytes_limit`).", ""]
  _append_md(lines)
  return record


def _slug(kind: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in kind.lower()).strip("_")


def _write(name: str, record: dict) -> None:
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / name).write_text(json.dumps(record, indent=2) + "\n")
  print(f"wrote {RESULTS / name}")


def _append_md(lines: list[str]) -> None:
  with RESULTS_MD.open("a") as f:
    f.write("\n" + "\n".join(lines))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("what", choices=("memory", "gpu"))
  parser.add_argument("--batch", type=int, default=None,
                      help="global batch (memory: default 32), or the batch of the overhead comparison and the "
                           "start of the largest-batch search (gpu: default 64)")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--layouts", default="unrolled,scanned",
                      help="memory: encoder block layouts to measure (unrolled, scanned)")
  parser.add_argument("--single", action=argparse.BooleanOptionalAction, default=True,
                      help="memory: also compile the one-device step (the slowest compile)")
  parser.add_argument("--parts", default="overhead,largest,largest_remat",
                      help="gpu: which measurements to run (a subset merges into the existing JSON)")
  args = parser.parse_args(argv)
  args.parts = args.parts.split(",")
  unknown = set(args.parts) - {"overhead", "largest", "largest_remat"}
  if unknown:
    parser.error(f"unknown --parts {sorted(unknown)}; expected overhead, largest, largest_remat")
  args.layouts = args.layouts.split(",")
  if set(args.layouts) - {"unrolled", "scanned"}:
    parser.error(f"unknown --layouts {sorted(set(args.layouts) - {'unrolled', 'scanned'})}; expected unrolled, scanned")
  if args.batch is None:
    args.batch = 32 if args.what == "memory" else 64
  (run_memory if args.what == "memory" else run_gpu)(args)


if __name__ == "__main__":
  main()
