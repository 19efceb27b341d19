"""How long a preemption checkpoint takes: the ACM finetune state of a ViT-B/16 saved with orbax.

    python3 -m benchmarks.save_bench --dir=$SCRATCH/save_bench     # on the GPU node, the workdir's file system
    python3 -m benchmarks.save_bench --model=tiny                  # a quick check anywhere (CPU)

The state is the one `--phase=finetune` checkpoints (params, AdamW state, step, rng),
of the official recipe's model: ViT-B/16 at 224x224, 1000 classes, every MLP and the
q, k, v, o projections ACMized (N=4), laid out on the mesh by the same partitioner
(`--sharding`). Each of `--repeats` saves is timed twice: until `save` returns (the
training loop is blocked while orbax copies the arrays to the host) and until
`wait_until_finished` (written and committed: what a SIGTERM grace period must cover).
Then one restore is timed (the cost of resuming). `--staging` is `loop.SAVE_STAGING`:
`parts` saves as the training loop does on a GPU (a device copy of the state, copied to the host
and written by orbax's write thread `loop.SAVE_PART_BYTES` at a time), `host` as it did from
2026-12-02 (`loop.host_copy`: the whole state copied to host memory, then written), both
uncompressed by `loop.checkpoint_handler`; `device` as it did before 2026-12-02 (orbax's
StandardSave of the device arrays: pinned host buffers, compressed). The process's host memory
(Linux /proc: resident, anonymous, shared; pinned buffers show as shared) is sampled every 5 ms
from before the first save to after the last commit. Writes benchmarks/results/save_<gpu>.json
for `parts` (save_<gpu>_<model>.json for another model; `_host` or `_device` appended for the
other stagings).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from acm_jax.train import config as config_lib
from acm_jax.train import loop, phases
from acm_jax.vit import task as vit_task
from benchmarks import gpu_name

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {  # the recipe's shapes; tiny for a check on a laptop or CI
    "vit_b16": dict(model="vit_b16", image_size=224, num_classes=1000, acm_attention=True, gate_depth=3,
                    gate_hidden=16),
    "tiny": dict(model="tiny", acm_attention=True, gate_depth=3, gate_hidden=16),
}


def finetune_state(model: str, sharding: str):
  cfg = config_lib.ExperimentConfig(dataset="synthetic", batch_size=jax.device_count(),
                                    eval_batch_size=jax.device_count(), sharding=sharding, **MODELS[model])
  exp = vit_task.build(cfg)
  params = phases.init_params(exp, "acm", 0)
  tx = phases.optimizer(exp, "finetune", params)
  state, shardings = exp.partitioner.create(lambda p: phases.new_state(p, tx, 0), exp.partitioner.put(params))

  # A fresh AdamW state is zeros, which compress to nothing on disk: fill it as training would.
  # The noise is drawn on the host: one jitted random draw per leaf took minutes to compile.
  rng = np.random.default_rng(1)
  leaves, tree = jax.tree.flatten(state)
  filled = []
  for x in leaves:
    if jnp.issubdtype(x.dtype, jnp.floating):
      noise = (1e-3 * rng.standard_normal(x.shape, np.float32)).astype(x.dtype)
      x = jax.device_put(np.asarray(x) + noise, x.sharding)
    filled.append(x)
  return jax.tree.unflatten(tree, filled)


def directory_bytes(path: Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


MEMORY_FIELDS = {"VmRSS": "rss", "RssAnon": "anon", "RssShmem": "shmem"}


def host_memory() -> dict[str, int]:
  """This process's resident bytes (Linux; empty elsewhere)."""
  try:
    text = Path("/proc/self/status").read_text()
  except OSError:
    return {}
  found = dict(re.findall(r"^(\w+):\s+(\d+) kB", text, re.MULTILINE))
  return {name: 1024 * int(found[key]) for key, name in MEMORY_FIELDS.items() if key in found}


class PeakMemory(threading.Thread):
  """The largest `host_memory()` values while the `with` block runs, sampled every 5 ms."""

  def __init__(self):
    super().__init__(daemon=True)
    self.peak = host_memory()
    self._done = threading.Event()

  def run(self):
    while not self._done.wait(0.005):
      for k, v in host_memory().items():
        self.peak[k] = max(self.peak.get(k, 0), v)

  def __enter__(self):
    self.start()
    return self

  def __exit__(self, *exc):
    self._done.set()
    self.join()


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="vit_b16", choices=sorted(MODELS))
  parser.add_argument("--sharding", default="dp", help="as the training flag (dp, fsdp, tp)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--staging", default="parts", choices=loop.SAVE_STAGINGS,
                      help="loop.SAVE_STAGING: parts (the loop on a GPU), host (whole host copies), device "
                           "(orbax's StandardSave of the device arrays, as before 2026-12-02)")
  parser.add_argument("--dir", default=None, help="where to save (default: a temporary directory, removed after)")
  parser.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/save_<device>.json)")
  args = parser.parse_args(argv)
  if args.repeats < 1:
    raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
  device = jax.devices()[0]
  kind = gpu_name(device.device_kind)
  tic = time.perf_counter()
  print(f"building the {args.model} finetune state ...", flush=True)
  state = finetune_state(args.model, args.sharding)
  jax.block_until_ready(state)
  setup_s = time.perf_counter() - tic
  print(f"state ready after {setup_s:.1f} s; saving {args.repeats} time(s)", flush=True)
  leaves = jax.tree.leaves(state)
  state_bytes = int(sum(np.dtype(x.dtype).itemsize * x.size for x in leaves))
  param_bytes = int(sum(np.dtype(x.dtype).itemsize * x.size for x in jax.tree.leaves(state["params"])))
  root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="save_bench_"))
  target = root / f"save_bench_{args.model}"
  shutil.rmtree(target, ignore_errors=True)
  blocked, committed = [], []
  memory_before = host_memory()
  try:
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
    standard = args.staging == "device"
    handler = None if standard else loop.checkpoint_handler()
    loop.SAVE_STAGING = args.staging
    with ocp.CheckpointManager(target, options=options, item_handlers=handler) as manager, PeakMemory() as memory:
      for step in range(1, args.repeats + 1):
        tic = time.perf_counter()
        manager.save(step, args=ocp.args.StandardSave(state) if standard else loop.save_args(state), force=True)
        blocked.append(time.perf_counter() - tic)
        manager.wait_until_finished()
        if not standard:
          loop.release_freed_host_memory()
        committed.append(time.perf_counter() - tic)
        print(f"save {step}: loop blocked {blocked[-1]:.2f} s, committed after {committed[-1]:.2f} s", flush=True)
      disk_bytes = directory_bytes(target / str(args.repeats))
      memory_after = host_memory()
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
      tic = time.perf_counter()
      restored = manager.restore(args.repeats,
                                 args=ocp.args.StandardRestore(abstract) if standard else loop.restore_args(abstract))
      jax.block_until_ready(restored)
      restore_s = time.perf_counter() - tic
  finally:
    shutil.rmtree(target, ignore_errors=True)
    if not args.dir:
      shutil.rmtree(root, ignore_errors=True)
  record = {
      "model": args.model, "staging": args.staging,
      "what": "ACM finetune state (params + AdamW state + step + rng), "
              + {"parts": f"a device copy, copied to the host and written {loop.SAVE_PART_BYTES >> 20} MiB at a time "
                          "(loop.DeviceSnapshot) by the loop's uncompressed pytree handler",
                 "host": "host copies (loop.host_copy) saved uncompressed by the loop's pytree handler",
                 "device": "the device arrays saved by orbax's StandardSave"}[args.staging],
      "part_bytes": loop.SAVE_PART_BYTES if args.staging == "parts" else None,
      "device": device.device_kind, "devices": jax.device_count(), "processes": jax.process_count(),
      "sharding": args.sharding, "directory": str(root), "state_bytes": state_bytes, "param_bytes": param_bytes,
      "disk_bytes": disk_bytes, "num_arrays": len(leaves), "setup_s": setup_s,
      "save_blocking_s": blocked, "save_committed_s": committed,
      "median_save_committed_s": statistics.median(committed), "restore_s": restore_s,
      "host_bytes_before": memory_before, "host_bytes_peak_saving": memory.peak,
      "host_bytes_after_saving": memory_after,
      "jax": jax.__version__, "orbax": ocp.__version__,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  suffix = ("" if args.model == "vit_b16" else f"_{args.model}") + ("" if args.staging == "parts" else f"_{args.staging}")
  out = Path(args.out) if args.out else RESULTS / f"save_{kind}{suffix}.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(record, indent=2) + "\n")
  print(f"{args.model}: {state_bytes / 2**20:.1f} MiB of state, {disk_bytes / 2**20:.1f} MiB on disk; save committed "
        f"in {record['median_save_committed_s']:.2f} s (median of {args.repeats}), loop blocked "
        f"{statistics.median(blocked):.2f} s; restore {restore_s:.2f} s; host memory peak growth "
        + ", ".join(f"{k} {(memory.peak[k] - memory_before[k]) / 2**30:+.2f} GB" for k in memory_before)
        + f" -> {out}")
  return record


if __name__ == "__main__":
  main()
