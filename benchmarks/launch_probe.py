"""What one Pallas (Triton) launch costs inside a jitted forward, against one XLA kernel (issue #21).

    python3 -m benchmarks.launch_probe [--chain=8,32,96] [--tokens=197,1576]

At batch 1-8 the fused ACM kernels' device time is at or below the dense layers' (see
`benchmarks.fused_tune`), yet the whole ACM ViT runs slower than the dense one. This probe
isolates the per-launch cost: one jitted function runs a chain of C dependent steps on a
(tokens, 768) bf16 array, each step either a trivial Pallas kernel (x * 0.5 + 1, one
program per 64 x 256 block) or the same arithmetic as an XLA fusion kept apart by an
optimization barrier. Per chain length it prints the median time of single waited calls
(dispatch included, as `vit_bench` times a forward) and of queued calls (device time), and
the slope per extra step: the per-launch cost of each kind, with and without XLA's command
buffers (one child process per `XLA_FLAGS` variant, as `benchmarks.graph_probe`). Writes
benchmarks/results/launch_probe_<gpu>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from benchmarks import fused_tune, gpu_name, vit_bench

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {"default": "", "command_buffers_off": "--xla_gpu_enable_command_buffer="}
ROWS = 64
COLS = 256  # Triton blocks need power-of-two sides: 768 columns are three blocks


def _step_kernel(x_ref, o_ref):
  o_ref[...] = (x_ref[...].astype(jnp.float32) * 0.5 + 1.0).astype(o_ref.dtype)


def pallas_step(x: jax.Array, interpret: bool = False) -> jax.Array:
  tokens, dim = x.shape
  return pl.pallas_call(_step_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                        grid=(pl.cdiv(tokens, ROWS), pl.cdiv(dim, COLS)),
                        in_specs=[pl.BlockSpec((ROWS, COLS), lambda i, j: (i, j))],
                        out_specs=pl.BlockSpec((ROWS, COLS), lambda i, j: (i, j)),
                        interpret=interpret, name="probe_step")(x)


def xla_step(x: jax.Array, interpret: bool = False) -> jax.Array:
  del interpret
  # the barrier keeps XLA from fusing the chain into one kernel
  return jax.lax.optimization_barrier((x.astype(jnp.float32) * 0.5 + 1.0).astype(x.dtype))


def chain(step, length: int, interpret: bool = False):
  def fn(x):
    for _ in range(length):
      x = step(x, interpret)
    return x
  return jax.jit(fn)


def slope(lengths, values):
  """Least-squares ms per extra step."""
  return float(np.polyfit(np.asarray(lengths, float), np.asarray(values, float), 1)[0])


def measure(lengths, tokens_list) -> list[dict]:
  rows = []
  for tokens in tokens_list:
    x = jax.random.normal(jax.random.key(0), (tokens, 768), jnp.bfloat16)
    for kind, step in (("pallas", pallas_step), ("xla", xla_step)):
      waited, queued = [], []
      for length in lengths:
        fn = chain(step, length)
        np.testing.assert_allclose(np.asarray(fn(x), np.float32),
                                   np.asarray(chain(xla_step, length)(x), np.float32), rtol=2e-2, atol=2e-2)
        waited.append(vit_bench.timed(fn, x, reps=50) * 1e3)
        queued.append(fused_tune.timed_ms(fn, x))
      rows.append(dict(tokens=tokens, kind=kind, lengths=list(lengths), waited_ms=waited, queued_ms=queued,
                       waited_ms_per_step=slope(lengths, waited), queued_ms_per_step=slope(lengths, queued)))
      print(f"T={tokens:5d} {kind:6s} waited {[round(v, 3) for v in waited]} ms -> "
            f"{rows[-1]['waited_ms_per_step'] * 1e3:.1f} us/step; queued {[round(v, 3) for v in queued]} ms -> "
            f"{rows[-1]['queued_ms_per_step'] * 1e3:.1f} us/step", flush=True)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--chain", default="8,32,96", help="comma list of chain lengths (>= 2 values)")
  parser.add_argument("--tokens", default="197,1576")
  parser.add_argument("--variants", default=",".join(VARIANTS), help=f"XLA_FLAGS variants: {sorted(VARIANTS)}")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--out", type=Path, default=None)
  args = parser.parse_args(argv)
  lengths = [int(v) for v in args.chain.split(",")]
  tokens = [int(v) for v in args.tokens.split(",")]
  if len(lengths) < 2 or min(lengths) < 1 or min(tokens) < 1:
    parser.error("--chain needs at least two lengths >= 1 and --tokens values >= 1")
  if args.child:  # one variant, in its own process (XLA_FLAGS are read once)
    print(json.dumps(measure(lengths, tokens)))
    return
  if jax.default_backend() != "gpu":
    sys.exit("launch_probe needs a GPU (tests run the chains in interpret mode)")
  variants = args.variants.split(",")
  bad = [v for v in variants if v not in VARIANTS]
  if bad:
    parser.error(f"unknown --variants {bad}; expected some of {sorted(VARIANTS)}")
  records = []
  for variant in variants:
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + VARIANTS[variant]).strip()}
    print(f"--- {variant}: XLA_FLAGS={env['XLA_FLAGS']!r}", flush=True)
    out = subprocess.run([sys.executable, "-m", "benchmarks.launch_probe", "--child=1", f"--chain={args.chain}",
                          f"--tokens={args.tokens}"], env=env, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("[")]
    print("\n".join(line for line in out.stdout.splitlines() if not line.startswith("[")), flush=True)
    if out.returncode or not lines:
      print(f"{variant}: FAILED rc={out.returncode}: {out.stderr[-800:]}", flush=True)
      continue
    for row in json.loads(lines[-1]):
      records.append(dict(device=jax.devices()[0].device_kind, date=datetime.date.today().isoformat(),
                          jax_version=jax.__version__, variant=variant, **row))
  gpu = gpu_name(jax.devices()[0].device_kind)
  path = args.out or RESULTS / f"launch_probe_{gpu}.json"
  old = json.loads(path.read_text()) if path.exists() else []
  path.write_text(json.dumps(old + records, indent=1) + "\n")
  print(f"wrote {len(records)} records to {path}")


if __name__ == "__main__":
  main()
