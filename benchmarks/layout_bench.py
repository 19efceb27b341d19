"""Inference forward of the scanned ViT against the unrolled one, same weights, one process (issue #22).

    python3 -m benchmarks.layout_bench                        # ViT-B/16, dense and mlp_qkvo, batch 256, bf16
    python3 -m benchmarks.layout_bench --acm none,mlp --batches 32,256
    python3 -m benchmarks.layout_bench --model tiny --dtype float32 --out /tmp/layout.json   # CPU smoke run

For each ACM configuration ("none": the dense ViT; "mlp", "mlp_qkvo" as in `vit_bench`, gates set
by `vit_bench.set_gates` at r = 0.5; the ACMs on the XLA path by default, `--impl auto` for the
fused kernels in both layouts) the unrolled model's parameters are initialised once and
stacked for the scanned model (`transformer.stack_blocks`), so both layouts compute the same
function. Before timing, the two layouts' logits on up to 8 images are compared (max_abs_logit_diff,
and relative to the largest logit). Then both forwards are timed in 5 alternating rounds of 10
calls, the median round each (`vit_bench.timed`, dispatch included). Records {device, date,
jax_version, model, acm, batch, dtype, impl, scan_unroll, unrolled_ms, scanned_ms, scanned_over_unrolled,
max_abs_logit_diff, rel_logit_diff} are appended to benchmarks/results/layout_<gpu>.json (or --out).
The training step's two layouts are `benchmarks.train_bench --layouts unrolled,scanned`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from acm_jax import acm as acm_lib
from acm_jax import transformer
from acm_jax.vit import model as vit
from benchmarks import gpu_name, train_bench, vit_bench

RESULTS = Path(__file__).resolve().parent / "results"
ROUNDS = 5
ACM_CHOICES = ("none", *vit_bench.ACM_KINDS)


def models(model: str, kind: str, impl: str, unroll: int = 1) -> tuple[vit.ViTConfig, vit.ViTConfig]:
  """(unrolled, scanned) configs of preset `model`, ACMized as `kind` ("none": dense); the scanned one
  runs `unroll` blocks per loop iteration."""
  unrolled = vit.get_config(model)
  if kind != "none":
    unrolled = vit_bench.acm_config(unrolled, kind, impl)
  return unrolled, dataclasses.replace(unrolled, scan_blocks=True, scan_unroll=unroll).validate()


def params_for(cfg: vit.ViTConfig, image: jax.Array, dtype) -> dict:
  """The unrolled model's random params in `dtype` (gates at r = 0.5 for an ACM model)."""
  params = acm_lib.init_without_kernels(vit.ViT(cfg), jax.random.key(1), image)["params"]
  params = jax.tree.map(lambda a: a.astype(dtype), params)
  if cfg.acm is not None:
    params = vit_bench.set_gates(params, cfg.acm.num_learners, 0.5, cfg.dim, seed=2)
  return params


def measure(model: str, kind: str, batch: int, dtype: str, impl: str, rounds: int = ROUNDS, reps: int = 10,
            unrolls: tuple[int, ...] = (1,)) -> list[dict]:
  """One record per scan_unroll in `unrolls`, each scanned forward timed against the same rounds of the
  unrolled one."""
  configs = [models(model, kind, impl, u) for u in unrolls]
  unrolled_cfg = configs[0][0]
  size = unrolled_cfg.image_size
  images = jax.random.normal(jax.random.key(0), (batch, size, size, 3), jnp.dtype(dtype))
  params = params_for(unrolled_cfg, images[:1], jnp.dtype(dtype))
  stacked = transformer.stack_blocks(params)
  forward = lambda cfg: jax.jit(functools.partial(lambda m, p, x: m.apply({"params": p}, x), vit.ViT(cfg)))
  unrolled_fn = forward(unrolled_cfg)
  scanned_fns = [forward(scanned) for _, scanned in configs]
  check = images[:min(batch, 8)]
  a = np.asarray(unrolled_fn(params, check), np.float32)
  diffs = [float(np.abs(a - np.asarray(fn(stacked, check), np.float32)).max()) for fn in scanned_fns]
  unrolled_s, scanned_s = [], [[] for _ in unrolls]
  for _ in range(rounds):  # alternating: the host's dispatch speed drifts within a run
    unrolled_s.append(vit_bench.timed(unrolled_fn, params, images, reps=reps))
    for times, fn in zip(scanned_s, scanned_fns):
      times.append(vit_bench.timed(fn, stacked, images, reps=reps))
  unrolled_ms = float(np.median(unrolled_s)) * 1e3
  records = []
  for unroll, times, diff in zip(unrolls, scanned_s, diffs):
    scanned_ms = float(np.median(times)) * 1e3
    records.append({"model": model, "acm": kind, "batch": batch, "dtype": dtype,
                    "impl": "dense" if kind == "none" else impl, "scan_unroll": unroll,
                    "unrolled_ms": round(unrolled_ms, 4), "scanned_ms": round(scanned_ms, 4),
                    "scanned_over_unrolled": round(scanned_ms / unrolled_ms, 4), "max_abs_logit_diff": diff,
                    "rel_logit_diff": diff / max(float(np.abs(a).max()), 1e-30)})
  return records


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="vit_b16", choices=("tiny", "vit_s16", "vit_b16", "vit_l16"))
  parser.add_argument("--acm", type=train_bench._list(ACM_CHOICES), default=["none", "mlp_qkvo"])
  parser.add_argument("--batches", type=train_bench._ints, default=[256])
  parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  parser.add_argument("--impl", default="xla", choices=("auto", "pallas", "triton", "xla"),
                      help="the ACMs' impl in both layouts (auto: the fused kernels on a GPU)")
  parser.add_argument("--rounds", type=int, default=ROUNDS, help="alternating timing rounds per layout")
  parser.add_argument("--scan_unroll", type=train_bench._ints, default=[1],
                      help="blocks per scanned loop iteration; a comma-separated list times each against the "
                      "same unrolled rounds")
  parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/layout_<gpu>.json")
  args = parser.parse_args(argv)
  if args.rounds < 1:
    parser.error(f"--rounds={args.rounds}: expected at least 1")
  device = jax.devices()[0].device_kind
  base = {"device": device, "date": datetime.date.today().isoformat(), "jax_version": jax.__version__}
  records = []
  for kind in args.acm:
    for batch in args.batches:
      try:
        new = [{**base, **r} for r in measure(args.model, kind, batch, args.dtype, args.impl, args.rounds,
                                              unrolls=tuple(args.scan_unroll))]
      except Exception as err:  # e.g. an impl this machine lacks (jax-triton): say so, go on
        print(f"{kind:8s} batch {batch:4d}: FAILED {type(err).__name__}: {str(err)[:400]}", flush=True)
        continue
      records += new
      for r in new:
        print(f"{kind:8s} batch {batch:4d}: unrolled {r['unrolled_ms']:.3f} ms, scanned (unroll {r['scan_unroll']}) "
              f"{r['scanned_ms']:.3f} ms, scanned / unrolled {r['scanned_over_unrolled']:.3f}; logits differ by "
              f"{r['max_abs_logit_diff']:.2e}", flush=True)
  train_bench.append(args.out or RESULTS / f"layout_{gpu_name(device)}.json", records)
  return records


if __name__ == "__main__":
  main()
