"""Images/s of the dense Flax ViT-B/16 and the ACM ViT-B/16 on a GPU (issue #3, item 6).

    python3 -m benchmarks.vit_bench [--batch 256] [--impls pallas,triton,xla] [--attention auto,xla]

All 12 MLPs are ACMs (N=4 learners of width 768). The weights are random (speed
does not depend on them) except the gates: their logits are log Binomial(N, r)
plus noise of the spread of a Gumbel variable, so argmax picks k with a mean
near N*r per token and a realistic spread. The realised mean k/N of each run is
measured and recorded beside the target r. `--attention` lists attention
implementations (see `transformer.attend`); each gets its own dense baseline,
and the dense logits of each are checked against XLA's before timing. Batch 256 of 224x224 images, bf16
parameters and activations, one jitted forward each, the same process; the
median of 20 timed calls after warm-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np

from acm_jax import acm as acm_lib
from acm_jax.vit import model as vit


def log(*args):
  print(*args, flush=True)


def set_gates(params, num_learners, r, dim, seed):
  """Gate logits = log Binomial(N, r) pmf + noise with Gumbel's spread, for every ACM."""
  pmf = np.array([math.comb(num_learners, j) * r ** j * (1 - r) ** (num_learners - j)
                  for j in range(num_learners + 1)])
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  for name in list(flat):
    if name.endswith("gate/out/kernel"):
      # inputs are layer-normalised (unit scale per feature): logit noise std ~ pi / sqrt(6)
      flat[name] = jnp.asarray(rng.normal(size=flat[name].shape) * (math.pi / math.sqrt(6)) / math.sqrt(dim),
                               flat[name].dtype)
    elif name.endswith("gate/out/bias"):
      flat[name] = jnp.asarray(np.log(np.maximum(pmf, 1e-9)), flat[name].dtype)
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def ideal_speedup(cfg, r):
  """Dense time / ACM time if time followed FLOPs: the MLPs' share of the per-token
  matmul FLOPs (MLP 16 d^2, q/k/v/o 8 d^2, attention 4 T d per layer) scaled by r."""
  d, t = cfg.dim, cfg.num_tokens
  mlp, other = 4 * d * cfg.mlp_dim, 8 * d * d + 4 * t * d
  return 1 / (1 - mlp / (mlp + other) * (1 - r))


def measured_ratio(state, num_learners):
  """Mean k/N over every ACM's sown one-hot choices."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(state["acm"]), sep="/")
  ks = [np.asarray(jnp.argmax(v[0], -1)).mean() for name, v in flat.items() if name.endswith("choice")]
  return float(np.mean(ks)) / num_learners


def timed(fn, *args, reps=20):
  jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    samples.append(time.perf_counter() - t0)
  return float(np.median(samples))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--ratios", default="0.5,0.25")
  parser.add_argument("--impls", default="pallas,triton,xla")
  parser.add_argument("--attention", default="auto", help="comma list of attention implementations")
  parser.add_argument("--results-dir", default=str(Path(__file__).parent / "results"))
  parser.add_argument("--no-append", action="store_true", help="do not append to RESULTS.md")
  args = parser.parse_args(argv)
  command = "python3 -m benchmarks.vit_bench " + " ".join(argv if argv is not None else sys.argv[1:])
  if jax.default_backend() != "gpu":
    sys.exit("vit_bench needs a GPU")
  device = jax.devices()[0].device_kind
  date = datetime.date.today().isoformat()
  images = jax.random.normal(jax.random.key(0), (args.batch, 224, 224, 3), jnp.bfloat16)
  to_bf16 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.bfloat16), tree)
  records = []

  def record(model, r, impl, ips, dense_ips, attention, r_real=None):
    rec = dict(device=device, date=date, model=model, r=r, impl=impl, images_per_s=round(ips, 1),
               ratio_to_dense=round(ips / dense_ips, 4), attention=attention)
    if r_real is not None:
      rec["r_measured"] = round(r_real, 4)
    records.append(rec)
    log(f"{model:12s} r={r} impl={impl:7s} attention={attention:5s} {ips:9.1f} images/s  "
        f"{ips / dense_ips:.3f} x dense" + ("" if r_real is None else f"  (measured mean k/N {r_real:.3f})"))

  reference_logits = None
  for attention in args.attention.split(","):
    dense_cfg = vit.get_config("vit_b16", attention=attention)
    dense = vit.ViT(dense_cfg)
    dense_params = to_bf16(dense.init(jax.random.key(1), images[:1])["params"])
    dense_fn = jax.jit(lambda p, x, dense=dense: dense.apply({"params": p}, x))
    logits = np.asarray(dense_fn(dense_params, images[:32]), np.float32)
    if reference_logits is None:
      xla_fn = vit.ViT(dataclasses.replace(dense_cfg, attention="xla"))
      reference_logits = np.asarray(xla_fn.apply({"params": dense_params}, images[:32]), np.float32)
    err = float(np.abs(logits - reference_logits).max() / np.abs(reference_logits).max())
    log(f"attention={attention}: dense logits vs XLA attention, max abs error / max abs = {err:.2e}")
    if err > 0.05:
      sys.exit(f"attention={attention} disagrees with XLA attention (relative error {err:.3f})")
    dense_ips = args.batch / timed(dense_fn, dense_params, images)
    record("vit_b16", 1.0, "dense", dense_ips, dense_ips, attention)

    for impl in args.impls.split(","):
      acm_cfg = dataclasses.replace(dense_cfg, acm=acm_lib.ACMConfig(num_learners=4, impl=impl)).validate()
      model = vit.ViT(acm_cfg)
      base = to_bf16(model.init(jax.random.key(1), images[:1])["params"])
      fn = jax.jit(lambda p, x, model=model: model.apply({"params": p}, x))
      choices = jax.jit(lambda p, x, model=model: model.apply({"params": p}, x, mutable=["acm"])[1])
      for r in (float(v) for v in args.ratios.split(",")):
        params = set_gates(base, 4, r, acm_cfg.dim, seed=2)
        r_real = measured_ratio(choices(params, images[:16]), 4)
        try:
          ips = args.batch / timed(fn, params, images)
        except Exception as err:  # e.g. jax-triton missing: record nothing, say why
          log(f"vit_b16_acm r={r} impl={impl}: FAILED {type(err).__name__}: {str(err)[:300]}")
          break
        record("vit_b16_acm", r, impl, ips, dense_ips, attention, r_real)

  gpu = device.lower().replace("nvidia", "").strip().split()[0]
  results = Path(args.results_dir)
  results.mkdir(parents=True, exist_ok=True)
  path = results / f"vit_{gpu}.json"  # earlier runs' records are kept
  earlier = json.loads(path.read_text()) if path.exists() else []
  path.write_text(json.dumps(earlier + records, indent=1))
  lines = [f"\n## ViT-B/16 throughput: {device}, {date}, jax {jax.__version__}\n",
           f"Command: `{command}`. Batch {args.batch}, 224x224, bf16, all 12 MLPs ACMized (N=4); "
           "target r vs measured mean k/N; ideal = dense time / ACM time if time followed the matmul "
           "FLOPs (MLPs are 64% of them in ViT-B/16).\n",
           "| model | attention | r (target) | mean k/N (measured) | impl | images/s | x dense | ideal x dense |",
           "|---|---|---|---|---|---|---|---|"]
  for rec in records:
    lines.append(f"| {rec['model']} | {rec['attention']} | {rec['r']} | {rec.get('r_measured', '-')} | {rec['impl']} | "
                 f"{rec['images_per_s']} | {rec['ratio_to_dense']:.3f} | {ideal_speedup(vit.get_config('vit_b16'), rec['r']):.2f} |")
  text = "\n".join(lines) + "\n"
  if not args.no_append:
    with open(Path(__file__).parent / "RESULTS.md", "a") as f:
      f.write(text)
  Path(os.environ.get("OUT", "."), "vit_table.md").write_text(text)
  log(text)


if __name__ == "__main__":
  main()
