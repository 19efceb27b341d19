"""Which XLA flags put the ACM kernels into CUDA graphs, and what that is worth at serving batches.

    python3 -m benchmarks.graph_probe [--batches 1,8] [--variants default,custom_call,...]

XLA reads XLA_FLAGS once per process, so every variant runs in a child process of its own
(an unknown flag makes XLA abort at start-up: the child's exit status says so). Each child
compiles the dense ViT-B/16 and the ACM ViT-B/16 (MLP, and MLP + q/k/v/o; r = 0.5, gates set
as in `benchmarks.vit_bench`), counts the Triton custom calls of the optimised HLO, times
images/s side by side, and compares each variant's logits with the default variant's.
Whether a call was captured cannot be read from the HLO (XLA forms command buffers on its
thunk sequence); the timing is the evidence. Writes
`benchmarks/results/graph_probe_<gpu>.json` (one record per variant, batch and model).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from benchmarks import gpu_name

VARIANTS = {
    "default": "",
    "graphs_off": "--xla_gpu_enable_command_buffer=",
    "custom_call": "--xla_gpu_enable_command_buffer=+CUSTOM_CALL",
    "legacy_targets": ("--xla_gpu_enable_command_buffer=+CUSTOM_CALL "
                       "--legacy_command_buffer_custom_call_targets=triton_kernel_call_ffi"),
    "legacy_targets_min1": ("--xla_gpu_enable_command_buffer=+CUSTOM_CALL "
                            "--legacy_command_buffer_custom_call_targets=triton_kernel_call_ffi "
                            "--xla_gpu_graph_min_graph_size=1"),
    # pallas_kernels.cuda_graphs.enable(): the ACM kernels' calls declared graph-compatible
    "registered": "",
    "registered_custom_call": "--xla_gpu_enable_command_buffer=+CUSTOM_CALL",
    "registered_custom_call_min1": "--xla_gpu_enable_command_buffer=+CUSTOM_CALL --xla_gpu_graph_min_graph_size=1",
}

TRITON_TARGETS = ("triton_kernel_call_ffi", "triton_kernel_call", "__gpu$xla.gpu.triton")


def triton_calls(hlo_text: str) -> int:
  """Number of Triton custom calls in optimised HLO text. (Whether XLA records them into a
  command buffer is decided later, on the thunk sequence, so the HLO cannot say.)"""
  return sum(1 for target in re.findall(r'custom_call_target="([^"]+)"', hlo_text) if target in TRITON_TARGETS)


def child(variant: str, batches: list[int]) -> list[dict]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from acm_jax.vit import model as vit
  from benchmarks.vit_bench import ACM_KINDS, NUM_LEARNERS, acm_config, bf16_params, set_gates, timed

  if variant.startswith("registered"):
    from pallas_kernels import cuda_graphs
    ok = cuda_graphs.enable()
    print(f"cuda_graphs.enable() -> {ok} {cuda_graphs._state.get('error', '')}", flush=True)
  dense_cfg = vit.get_config("vit_b16")
  images = jax.random.normal(jax.random.key(0), (max(batches), 224, 224, 3), jnp.bfloat16)
  dense = vit.ViT(dense_cfg)
  models = {"dense": (dense, bf16_params(dense, images[:1]))}
  for kind in ACM_KINDS:
    cfg = acm_config(dense_cfg, kind, "pallas")
    model = vit.ViT(cfg)
    models[kind] = (model, set_gates(bf16_params(model, images[:1]), NUM_LEARNERS, 0.5, cfg.dim, seed=2))
  records = []
  for batch in batches:
    x = images[:batch]
    dense_ips = None
    for name, (model, params) in models.items():
      fn = jax.jit(lambda p, x, model=model: model.apply({"params": p}, x))
      compiled = fn.lower(params, x).compile()
      calls = triton_calls(compiled.as_text())
      out = np.asarray(compiled(params, x), np.float32)
      np.save(Path(os.environ.get("OUT", "."), f"logits_{variant}_{name}_b{batch}.npy"), out)
      ips = batch / timed(compiled, params, x)
      dense_ips = ips if name == "dense" else dense_ips
      rec = dict(variant=variant, xla_flags=VARIANTS[variant], batch=batch, model=name,
                 images_per_s=round(ips, 1), ratio_to_dense=round(ips / dense_ips, 4),
                 triton_calls=calls)
      print(json.dumps(rec), flush=True)
      records.append(rec)
  return records


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--timeout", type=int, default=240, help="seconds per variant")
  parser.add_argument("--results-dir", default=str(Path(__file__).parent / "results"))
  args = parser.parse_args(argv)
  batches = [int(b) for b in args.batches.split(",")]
  if args.child:
    child(args.child, batches)
    return
  unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
  if unknown:
    sys.exit(f"unknown --variants {unknown}; known: {sorted(VARIANTS)}")
  import jax
  device = jax.devices()[0].device_kind
  records = []
  for variant in args.variants.split(","):
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + VARIANTS[variant]).strip())
    print(f"== {variant}: XLA_FLAGS={env['XLA_FLAGS']!r}", flush=True)
    try:
      run = subprocess.run([sys.executable, "-m", "benchmarks.graph_probe", "--child", variant,
                            "--batches", args.batches], env=env, capture_output=True, text=True,
                           timeout=args.timeout)
    except subprocess.TimeoutExpired as err:
      print(f"{variant}: timed out after {args.timeout} s", flush=True)
      out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
      run = None
    else:
      out = run.stdout
    got = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    for rec in got:
      print(f"  batch {rec['batch']:3d} {rec['model']:9s} {rec['images_per_s']:8.1f} images/s "
            f"{rec['ratio_to_dense']:.3f} x dense; Triton calls {rec['triton_calls']}", flush=True)
    if run is not None and run.returncode != 0:
      print(f"{variant}: exit status {run.returncode}; stderr tail:\n{run.stderr[-1500:]}", flush=True)
      records.append(dict(variant=variant, xla_flags=VARIANTS[variant], failed=run.returncode,
                          stderr_tail=run.stderr[-600:]))
    records.extend(got)
  import numpy as np
  out_dir = Path(os.environ.get("OUT", "."))
  for rec in records:  # logits of each variant against the default variant's (same weights, same images)
    if "model" in rec and rec["model"] != "dense" and rec["variant"] != "default":
      ref, got_path = (out_dir / f"logits_{v}_{rec['model']}_b{rec['batch']}.npy" for v in ("default", rec["variant"]))
      if ref.exists() and got_path.exists():
        a, b = np.load(ref), np.load(got_path)
        rec["logits_max_abs_diff_to_default"] = float(np.abs(a - b).max())
        print(f"  {rec['variant']} {rec['model']} b{rec['batch']}: max |logits - default| "
              f"{rec['logits_max_abs_diff_to_default']:.3g}", flush=True)
  for rec in records:
    rec.update(device=device, date=datetime.date.today().isoformat(), jax_version=jax.__version__,
               command="python3 -m benchmarks.graph_probe " + " ".join(argv if argv is not None else sys.argv[1:]))
  gpu = gpu_name(device)
  path = Path(args.results_dir) / f"graph_probe_{gpu}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(records, indent=1))
  Path(os.environ.get("OUT", "."), path.name).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
  main()
