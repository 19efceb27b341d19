"""The patch embedding as a matmul against XLA's convolution, whole ViT, dense and ACM, in one process (#21).

    python3 -m benchmarks.embed_ab [--batches 1,8,32,256] [--acm mlp,mlp_qkvo] [--rounds 5] [--calls 10]
    python3 -m benchmarks.embed_ab --model tiny --impl xla --batches 2 --rounds 1 --calls 2  # CPU smoke run

`acm_jax.vit.model.PATCH_EMBED` is read when a forward is traced, so the dense ViT and each ACM configuration
(r, gates as `vit_bench` sets them) are compiled once per mode ("conv", "matmul") and all of them are timed
in alternating rounds (`dispatch_bench.time_calls`, waited calls: what `vit_bench` times). The patch
embedding is the same in the dense and the ACM model, so what it costs dilutes the ACMs' savings in the
whole-model ratio. Records go to `results/embed_ab_<gpu>.json` with the fields device, date, jax_version,
model_preset, impl, r, batch, patch_embed, model ("none" for dense, or the --acm kind), sync_ms (median over
rounds of each round's median), ratio_to_dense (the dense model's sync_ms of the same mode over this one's:
images/s of the model over the dense model's), over_conv (sync_ms over the same model's with "conv"),
convolution_in_program (whether the compiled program has a convolution: a check that the mode took effect) and
logits_match_conv (the largest difference from the "conv" forward's logits over their largest magnitude).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np

from acm_jax.vit import model as vit
from benchmarks import dispatch_bench as db
from benchmarks import vit_bench as vb


def measure(built: dict, images, batches, rounds: int, calls: int) -> list[dict]:
  """One record per (batch, mode, model); built: {model: (jitted forward, parameters)}."""
  records = []
  saved = vit.PATCH_EMBED
  for batch in batches:
    x = images[:batch]
    compiled = {}
    try:
      for mode in vit.PATCH_EMBED_MODES:
        vit.PATCH_EMBED = mode  # read while tracing
        for name, (fn, params) in built.items():
          # a new function per mode: jax caches a trace by the Python function, blind to the module setting
          fresh = jax.jit(lambda p, x, f=fn.__wrapped__: f(p, x))
          compiled[mode, name] = (fresh.lower(params, x).compile(), params)
    finally:
      vit.PATCH_EMBED = saved
    for run, params in compiled.values():
      jax.block_until_ready(run(params, x))
    samples = {key: [] for key in compiled}
    for _ in range(rounds):
      for key, (run, params) in compiled.items():
        samples[key].append(db.time_calls(run, (params, x), calls)["sync_ms"])
    sync = {key: float(np.median(v)) for key, v in samples.items()}
    logits = {key: np.asarray(run(params, x), np.float32) for key, (run, params) in compiled.items()}
    has_conv = {key: any(op in run.as_text() for op in ("convolution", "cudnn-conv"))
                for key, (run, _) in compiled.items()}
    for mode, name in compiled:
      conv = logits["conv", name]
      records.append(dict(batch=batch, patch_embed=mode, model=name, sync_ms=round(sync[mode, name], 4),
                          ratio_to_dense=round(sync[mode, "none"] / sync[mode, name], 4),
                          over_conv=round(sync[mode, name] / sync["conv", name], 4),
                          convolution_in_program=has_conv[mode, name],
                          logits_match_conv=float(np.abs(logits[mode, name] - conv).max() / np.abs(conv).max())))
  return records


def table(records: list[dict]) -> str:
  lines = ["| batch | model | patch embed | sync ms | x dense (images/s) | time / conv | logits vs conv | "
           "convolution |",
           "|---|---|---|---|---|---|---|---|"]
  for rec in records:
    lines.append(f"| {rec['batch']} | {rec['model']} | {rec['patch_embed']} | {rec['sync_ms']:.3f} | "
                 f"{rec['ratio_to_dense']:.3f} | {rec['over_conv']:.3f} | {rec['logits_match_conv']:.1e} | "
                 f"{rec['convolution_in_program']} |")
  return "\n".join(lines)


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  db.add_model_args(parser, batches=[1, 8, 32, 256], calls=10)
  parser.add_argument("--results-dir", default=str(Path(__file__).parent / "results"))
  args = parser.parse_args(argv)
  images = db.check_model_args(parser, args, "embed_ab")
  built = vb.serving_forwards(args.model, args.acm, args.impl, args.r, images[:1])
  records = measure(built, images, args.batches, args.rounds, args.calls)
  return db.save_records(args, records, "embed_ab", table, f"r = {args.r}, waited calls")


if __name__ == "__main__":
  main()
