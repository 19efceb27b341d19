"""The route launch alone (gate, argmax, per-chunk ranks and counts; issue #21): its kernel time per launch
for each tokens-per-program chunk, gate reduction step and pipeline depth, and for a group of G ACMs reading
the same x (the q/k/v group: `--groups 3`) with one program per (ACM, chunk) or per chunk for all G gates
(`--shared 0,1`, `acm_fused.ROUTE_SHARED_MIN_TOKENS`).

    python3 -m benchmarks.route_bench                          # one GPU: 197 and 1,576 tokens, d = 768
    python3 -m benchmarks.route_bench --tokens 197,6304,50432 --groups 3 --shared 0,1 --chunks 32,128 \
        --block-k 64,256 --stages 1,3                          # the q/k/v group's route, apart or shared
    python3 -m benchmarks.route_bench --tokens 40 --dim 64 --chunks 32,16 --block-k 64 --stages 1 \
        --calls 2 --interpret --out /tmp/route.json             # CPU smoke run (no kernel times)

Each setting jits `--calls` route launches over as many different inputs (so none is deduplicated) and
reads the launches' device time from a profiler trace (`serve_profile.profile_forward`), which leaves the
host's dispatch out: at a few hundred tokens the wall time of a jitted call is mostly dispatch. The gate
is an MLP ACM's linear gate (d -> N + 1, bfloat16, as `vit_bench` builds it), or G such gates; the sorted
path's ranks and counts are computed as in the model. Every setting's k is checked against the 128-token,
64-column route's with one program per (ACM, chunk), and an error is raised if it differs.

Records go to `results/route_<gpu>.json` (or --out; earlier records kept): one per setting with the fields
device, date, jax_version, tokens, dim, num_learners, groups, shared, chunk, block_k, num_stages, route_us and
scatter_us (device time per launch of the route and of the sorted path's scatter, which takes the same chunks;
null in interpret mode), k_agrees.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import gpu_name
from benchmarks import train_bench as tb
from pallas_kernels import acm_fused

# the route's tokens per program and gate columns per step above ROUTE_MEDIUM_MAX_TOKENS
BASELINE = (acm_fused.ROUTE_CHUNK, acm_fused.GATE_BLOCK_K)


def route_fn(tokens: int, dim: int, num_learners: int, calls: int, chunk: int, block_k: int, num_stages: int,
             interpret: bool, groups: int = 1, shared: bool = False):
  """A jitted function of (x stack (calls, tokens, dim), wg, bg) running `calls` route launches with these
  settings for `groups` gates (wg (groups, dim, N + 1), bg (groups, N + 1)), each ACM in its own programs or
  all in one program per chunk (`shared`); returns the k of each launch, (calls, groups, tokens) int32."""
  padded = -(-tokens // acm_fused.ROUTE_CHUNK) * acm_fused.ROUTE_CHUNK
  # the route takes its gate step (block_k) from `route_settings`
  settings = dict(num_learners=num_learners, min_choice=0, relative_cost=1.0, gate_dtype=jnp.dtype(jnp.bfloat16))
  small = {"chunk": chunk, "block_k": block_k, "num_stages": num_stages}

  def run(xs, wg, bg):
    saved = acm_fused.ROUTE_SMALL_MAX_TOKENS, acm_fused.ROUTE_SMALL, acm_fused.ROUTE_SHARED_MIN_TOKENS
    acm_fused.ROUTE_SMALL_MAX_TOKENS, acm_fused.ROUTE_SMALL = tokens, small
    acm_fused.ROUTE_SHARED_MIN_TOKENS = 0 if shared else None
    gates = [a for g in range(groups) for a in (wg[g], bg[g])]
    try:  # settings are read while tracing
      ks = [acm_fused._route(jnp.zeros((1,), jnp.float32), xs[i], gates, num_groups=groups, padded=padded,
                             linear_gate=True, sort=True, positions=False, gate_settings=settings,
                             num_stages=num_stages, interpret=interpret)[0][0].reshape(groups, padded)[:, :tokens]
            for i in range(calls)]
    finally:
      acm_fused.ROUTE_SMALL_MAX_TOKENS, acm_fused.ROUTE_SMALL, acm_fused.ROUTE_SHARED_MIN_TOKENS = saved
    return jnp.stack(ks)

  return jax.jit(run)


def launch_us(fn, args, calls: int) -> dict[str, float | None]:
  """Device time per launch (us) of the route and scatter kernels from a profiler trace: {"route_us",
  "scatter_us"}, None where the trace has no such kernel (interpret mode, CPU)."""
  from benchmarks import serve_profile
  prof = serve_profile.profile_forward(fn, args, forwards=3, top=8)
  times = {name: ms for name, ms, _ in prof["top"]}
  return {f"{kind}_us": None if f"acm_{kind}" not in times else round(times[f"acm_{kind}"] / calls * 1e3, 3)
          for kind in ("route", "scatter")}


def _forms(text: str) -> list[int]:
  """--shared: 0 (one program per ACM and chunk), 1 (one per chunk) or both, comma-separated."""
  values = text.split(",")
  if not values or any(v not in ("0", "1") for v in values):
    raise argparse.ArgumentTypeError(f"{text!r}: expected 0, 1 or 0,1")
  return [int(v) for v in values]


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokens", type=tb._ints, default=[197, 1576])
  parser.add_argument("--dim", type=int, default=768)
  parser.add_argument("--num-learners", type=int, default=4)
  parser.add_argument("--chunks", type=tb._ints, default=[128, 64, 32, 16], help="tokens per route program")
  parser.add_argument("--block-k", type=tb._ints, default=[64, 256], help="gate columns per reduction step")
  parser.add_argument("--stages", type=tb._ints, default=[1, 3], help="pipeline stages")
  parser.add_argument("--groups", type=int, default=1, help="ACMs reading the same x (3: the q/k/v group)")
  parser.add_argument("--shared", type=_forms, default=[0],
                      help="0: one program per (ACM, chunk); 1: one per chunk for the whole group (--groups > 1)")
  parser.add_argument("--calls", type=int, default=16, help="route launches per jitted call")
  parser.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU; no kernel times)")
  parser.add_argument("--out", type=Path, default=None)
  args = parser.parse_args(argv)
  for name, values in (("--chunks", args.chunks), ("--block-k", args.block_k)):
    if any(v < 16 or v & (v - 1) for v in values):
      parser.error(f"{name} must be powers of two >= 16, got {values}")
  if any(c > acm_fused.ROUTE_CHUNK for c in args.chunks):
    parser.error(f"--chunks must be at most ROUTE_CHUNK={acm_fused.ROUTE_CHUNK}, got {args.chunks}")
  if args.calls < 1:
    parser.error(f"--calls must be positive, got {args.calls}")
  if not 1 <= args.groups <= acm_fused.MAX_GROUP:
    parser.error(f"--groups must be in 1..{acm_fused.MAX_GROUP} (acm_fused.MAX_GROUP), got {args.groups}")
  if 1 in args.shared and args.groups == 1:
    parser.error(f"--shared 1 needs --groups > 1; got --groups {args.groups}")
  if not args.interpret and jax.default_backend() != "gpu":
    parser.error("the route launch needs a GPU; pass --interpret to run it on this backend")

  device = jax.devices()[0].device_kind
  out = args.out or Path(__file__).parent / "results" / f"route_{gpu_name(device)}.json"
  rng = np.random.default_rng(0)
  wg = jnp.asarray(rng.normal(size=(args.groups, args.dim, args.num_learners + 1)) * 0.05, jnp.bfloat16)
  bg = jnp.asarray(rng.normal(size=(args.groups, args.num_learners + 1)) * 0.1, jnp.bfloat16)
  base = dict(device=device, date=datetime.date.today().isoformat(), jax_version=jax.__version__, dim=args.dim,
              num_learners=args.num_learners, groups=args.groups)
  records = []
  for tokens in args.tokens:
    xs = jnp.asarray(rng.normal(size=(args.calls, tokens, args.dim)), jnp.bfloat16)
    want = np.asarray(route_fn(tokens, args.dim, args.num_learners, args.calls, *BASELINE, 1, args.interpret,
                               args.groups)(xs, wg, bg))
    for shared in args.shared:
      for chunk in args.chunks:
        for block_k in args.block_k:
          for stages in args.stages:
            fn = route_fn(tokens, args.dim, args.num_learners, args.calls, chunk, block_k, stages, args.interpret,
                          args.groups, bool(shared))
            got = np.asarray(jax.block_until_ready(fn(xs, wg, bg)))
            agrees = bool((got == want).all())
            setting = f"chunk {chunk}, block_k {block_k}, {stages} stages" + (", shared" if shared else "")
            if not agrees:
              raise SystemExit(f"route with {setting} at {tokens} tokens: k differs from the {BASELINE[0]}-token "
                               f"route on {int((got != want).sum())} tokens")
            us = ({"route_us": None, "scatter_us": None} if args.interpret
                  else launch_us(fn, (xs, wg, bg), args.calls))
            records.append(dict(base, tokens=tokens, shared=bool(shared), chunk=chunk, block_k=block_k,
                                num_stages=stages, **us, k_agrees=agrees))
            shown = "  ".join(f"{kind} " + ("n/a" if v is None else f"{v:6.2f} us") for kind, v in us.items())
            print(f"{tokens:6d} tokens  {args.groups} gate(s){'  shared' if shared else ''}  chunk {chunk:3d}  "
                  f"block_k {block_k:3d}  stages {stages}: {shown} per launch", flush=True)
  tb.append(out, records)
  return records


if __name__ == "__main__":
  main()
