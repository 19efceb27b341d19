"""Where an inference forward's device time goes: dense ViT vs ACM ViT, kernel by kernel (issue #21).

    python3 -m benchmarks.serve_profile                               # one GPU: ViT-B/16, batches 256 and 8
    python3 -m benchmarks.serve_profile --batches=1 --acm=mlp --r=0.25
    python3 -m benchmarks.serve_profile --norm-min-tokens=0 --residual-min-tokens=0   # with the opt-in fusions
    python3 -m benchmarks.serve_profile --model=tiny --impl=xla --batches=2 --forwards=2   # CPU smoke run
    python3 -m benchmarks.serve_profile --batches=8 --acm=mlp --variant default \
        --variant 'chunks:INLINE_SORT_PLACE=chunks'   # switch settings side by side, as benchmarks.switch_ab takes them

The models, weights and gates are `benchmarks.vit_bench`'s (random weights in bf16, gates
picking k ~ Binomial(N, r)). Each jitted forward is warmed up, timed over --forwards calls
(wall ms per forward, dispatch included), then traced over as many; the trace's kernels are
summed per name and per category as in `benchmarks.step_profile` (gemm includes cuDNN
attention and convolutions; triton the Pallas kernels). Prints the top kernels and writes
benchmarks/results/serve_profile_<gpu>.json (or --out): [{device, date, jax_version, model, r,
impl, norm_min_tokens, norm_mode, residual_min_tokens, down_split_max_tokens, down_split_per_learner_max_tokens,
down_split_parts, route_small_max_tokens, route_small, route_medium_max_tokens, route_medium, route_shared_min_tokens,
inline_sort_max_tokens (the fusion switches, see `vit_bench.add_fusion_flags`), variant, settings, runs:
{"<acm>_b<batch>": {wall_ms, device_ms_per_step, count_per_step, categories, top}}}], where <acm> is "none" for the
dense model and "_per_step" means per forward.

With --variant (NAME[:SWITCH=VALUE;...], `benchmarks.switch_ab`'s form; the first is the baseline), one record
per variant: its ACM models are built and traced with its `acm_fused` settings in place, in the same process, so
two settings' kernels can be set side by side; the dense model is profiled once, in the first variant's record.
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from acm_jax.vit import model as vit
from benchmarks import gpu_name
from benchmarks import step_profile as sp
from benchmarks import switch_ab as sab
from benchmarks import train_bench as tb
from benchmarks import vit_bench as vb


def profile_forward(fn, args, forwards: int, top: int) -> dict:
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  tic = time.perf_counter()
  for _ in range(forwards):
    out = fn(*args)
  jax.block_until_ready(out)
  wall_ms = (time.perf_counter() - tic) / forwards * 1e3
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      for _ in range(forwards):
        out = fn(*args)
      jax.block_until_ready(out)
    trace = sp.load_trace(log_dir)
  return {"wall_ms": round(wall_ms, 4), **sp.summarize(sp.device_events(trace), forwards, top)}


def main(argv=None) -> list[dict]:
  """The records written, one per variant."""
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="vit_b16", choices=("tiny", "vit_s16", "vit_b16", "vit_l16"))
  parser.add_argument("--batches", type=tb._ints, default=[256, 8])
  parser.add_argument("--acm", type=tb._list(tuple(vb.ACM_KINDS)), default=["mlp_qkvo", "mlp"])
  parser.add_argument("--r", type=float, default=0.5, help="the gates' target k/N")
  parser.add_argument("--impl", default="pallas", choices=("auto", "pallas", "triton", "xla"))
  parser.add_argument("--forwards", type=int, default=5, help="timed and traced forwards per model")
  parser.add_argument("--top", type=int, default=25, help="kernels printed and recorded per model")
  parser.add_argument("--out", type=Path, default=None)
  parser.add_argument("--variant", action="append", default=None,
                      help="NAME[:SWITCH=VALUE;...] of acm_fused settings, as benchmarks.switch_ab takes them "
                           "(repeatable; without any: one variant 'default')")
  vb.add_fusion_flags(parser)
  args = parser.parse_args(argv)
  if args.forwards < 1 or not 0 < args.r <= 1:
    parser.error(f"--forwards must be >= 1 and --r in (0, 1]; got {args.forwards}, {args.r}")
  try:
    variants = [sab.parse_variant(v) for v in (args.variant or ["default"])]
  except ValueError as error:
    parser.error(str(error))
  if len({name for name, _ in variants}) != len(variants):
    parser.error(f"variant names must differ: {[name for name, _ in variants]}")
  fusions = vb.apply_fusion_flags(args)
  dense_cfg = vit.get_config(args.model)
  images = jax.random.normal(jax.random.key(0), (max(args.batches), dense_cfg.image_size, dense_cfg.image_size, 3),
                             jnp.bfloat16)
  device = jax.devices()[0].device_kind
  records = []
  for index, (variant, settings) in enumerate(variants):
    runs = {}
    with sab.settings_applied(settings):  # new jitted forwards per variant, traced while its settings hold
      forwards = vb.serving_forwards(args.model, args.acm, args.impl, args.r, images[:1])
      if index:
        forwards.pop("none")  # the dense model has no ACM settings: profiled once
      for batch in args.batches:
        for kind, (fn, params) in forwards.items():
          res = runs[f"{kind}_b{batch}"] = profile_forward(fn, (params, images[:batch]), args.forwards, args.top)
          print(f"\n{kind} batch {batch}{'' if len(variants) == 1 else ', ' + variant}: {res['wall_ms']:.3f} ms per "
                f"forward, device busy {res['device_ms_per_step']:.3f} ms in {res['count_per_step']:.0f} kernels; "
                + ", ".join(f"{cat} {ms:.3f}" for cat, ms in res["categories"].items()), flush=True)
          for name, ms, calls in res["top"]:
            print(f"  {ms:9.4f} ms {calls:6.1f}x  {name[:110]}")
    records.append({"device": device, "date": datetime.date.today().isoformat(), "jax_version": jax.__version__,
                    "model": args.model, "r": args.r, "impl": args.impl, **fusions, "variant": variant,
                    "settings": sab._recordable(settings), "runs": runs})
  tb.append(args.out or tb.RESULTS / f"serve_profile_{gpu_name(device)}.json", records)
  return records


if __name__ == "__main__":
  main()
