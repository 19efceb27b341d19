"""Where the time of one gated ACM MLP goes, piece by piece (GPU).

    python3 -m benchmarks.kernel_profile [--shape=vit_b] [--tokens=50432] [--ratios=0.25,0.5,1.0]

For each mean k/N it times, as ratios to the dense XLA MLP of the same shape
(same timing loop as kernel_bench): the gate alone (x Wg + argmax), each sort
method, `prepare` (sorted k, row indices and the persistent launch's tile
table), the up launch (default, and with one thing changed: block loads of
pre-sorted x, persistent walk, erf GELU, relu, no activation), the down
launch, the whole kernel on pre-sorted tokens, and gate + sort + kernel end to
end for each sort method and for variants that each change one default. Writes
benchmarks/results/kernel_profile_<gpu>.json and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import gpu_name
from benchmarks import kernel_bench as kb
from pallas_kernels import acm_mlp as pk


def profile(shape: str, tokens: int, ratios: list[float], config: dict, sets: int = 8) -> list[dict]:
  d, n, h = kb.SHAPES[shape]
  device = jax.devices()[0].device_kind
  records = []
  cfg = pk.resolve_config(kb.DTYPE, d, h, **config)
  fields = [f.name for f in dataclasses.fields(pk.Prepared) if f.name != "num_row_blocks"]

  def prep_fn(kk, order):
    prep = pk.prepare(kk, order, tokens=tokens, num_learners=n, width=h, block_rows=cfg.block_rows,
                      block_hidden=cfg.block_hidden)
    return [getattr(prep, f) for f in fields]

  num_row_blocks = -(-tokens // cfg.block_rows)
  interpret = jax.default_backend() != "gpu"  # CPU: a slow smoke run of the same code

  def up_fn(arrays, x, w1, b1):
    prep = pk.Prepared(*arrays, num_row_blocks)
    return pk.up_projection(prep, x, w1, b1, cfg=cfg, num_learners=n, activation="gelu", interpret=interpret)

  def up_variant(arrays, x, w1, b1, gather=True, persistent=False, activation="gelu", fast_math=None):
    prep = pk.Prepared(*arrays, num_row_blocks)
    return pk.up_projection(prep, x, w1, b1, cfg=cfg, num_learners=n, activation=activation, interpret=interpret,
                            gather=gather, persistent=persistent, fast_math=fast_math)

  def down_fn(arrays, hidden, w2, bias):
    prep = pk.Prepared(*arrays, num_row_blocks)
    return pk.down_projection(prep, hidden, w2, bias, cfg=cfg, tokens=tokens, interpret=interpret)

  def e2e(x, wg, bg, w1, b1, w2, bias, method="blocked", **variant):
    kk = kb.gate_choices(x, wg, bg)
    return pk.acm_mlp(x, kk, w1, b1, w2, bias, num_learners=n, order=pk.sort_order(kk, n, method),
                      **{**config, **variant})

  # e2e variants, each one change from the current defaults (one program per tile,
  # fast GELU for bf16, tuned tiles, x gathered inside the kernel)
  variants = {
      "persistent": dict(persistent=True),
      "erf": dict(fast_math=False),
      "bk32": dict(block_k=(32, 64), num_stages=(4, 3)),
      "bh256": dict(block_hidden=256),
      "w4": dict(num_warps=(4, 8)),
      "br64": dict(block_rows=64),
      "xgather": dict(x_gather="xla"),
  }

  routes_fixed = {
      "dense_xla": kb.dense_mlp,
      "gate": kb.gate_choices,
      **{f"sort_{m}": functools.partial(pk.sort_order, num_learners=n, method=m) for m in pk.SORT_METHODS},
      "prepare_sorted": lambda kk: prep_fn(kk, None),
      "prepare_order": prep_fn,
      "up": up_fn, "down": down_fn,
      "up_erf": functools.partial(up_variant, fast_math=False),
      "up_relu": functools.partial(up_variant, activation="relu"),
      "up_identity": functools.partial(up_variant, activation="identity"),
      "up_contig": functools.partial(up_variant, gather=False),
      "up_persistent": functools.partial(up_variant, persistent=True),
      "kernel_sorted": lambda x, kk, w1, b1, w2, bias: pk.acm_mlp(x, kk, w1, b1, w2, bias, num_learners=n, **config),
      **{f"e2e_{m}": functools.partial(e2e, method=m) for m in pk.SORT_METHODS},
      **{f"e2e_{name}": functools.partial(e2e, **v) for name, v in variants.items()},
  }
  for r in ratios:
    k_np, params = kb.make_inputs(d, n, h, tokens, r, sets)
    k = jnp.asarray(k_np)
    order_np = np.argsort(-k_np, kind="stable")
    ks = jnp.asarray(k_np[order_np])
    order = jnp.asarray(order_np.astype(np.int32))
    prep_sorted = jax.jit(lambda kk: prep_fn(kk, None))(ks)
    hidden = [jax.jit(up_fn)(prep_sorted, p["x"][order_np], p["w1"], p["b1"]) for p in params]
    args = {
        "dense_xla": [(p["x"], p["w1"], p["b1"], p["w2"], p["bias"][n]) for p in params],
        "gate": [(p["x"], p["wg"], p["bg"]) for p in params],
        **{f"sort_{m}": [(k + 0 * i,) for i in range(sets)] for m in pk.SORT_METHODS},
        "prepare_sorted": [(ks + 0 * i,) for i in range(sets)],
        "prepare_order": [(k + 0 * i, order + 0 * i) for i in range(sets)],
        "up": [(prep_sorted, p["x"][order_np], p["w1"], p["b1"]) for p in params],
        **{f"up_{v}": [(prep_sorted, p["x"][order_np], p["w1"], p["b1"]) for p in params]
           for v in ("contig", "persistent", "erf", "relu", "identity")},
        "down": [(prep_sorted, hd, p["w2"], p["bias"]) for hd, p in zip(hidden, params)],
        "kernel_sorted": [(p["x"][order_np], ks, p["w1"], p["b1"], p["w2"], p["bias"]) for p in params],
        **{f"e2e_{m}": [(p["x"], p["wg"], p["bg"], p["w1"], p["b1"], p["w2"], p["bias"]) for p in params]
           for m in (*pk.SORT_METHODS, *variants)},
    }
    dense_ms = None
    for name, fn in routes_fixed.items():
      ms = kb.time_fn(fn, args[name])
      dense_ms = dense_ms or ms
      rec = dict(device=device, date=datetime.date.today().isoformat(), jax_version=jax.__version__, d=d, h=h,
                 num_learners=n, tokens=tokens, r=r, part=name, ms=round(ms, 4), ratio_to_dense=round(ms / dense_ms, 4))
      records.append(rec)
      kb.log(f"{shape} T={tokens} r={r:.2f} {name:16s} {ms:8.4f} ms {ms / dense_ms:6.3f}")
  return records


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shape", default="vit_b", choices=sorted(kb.SHAPES))
  parser.add_argument("--tokens", type=int, default=50432)
  parser.add_argument("--ratios", default="0.25,0.5,1.0")
  parser.add_argument("--config", default="{}", help="kernel overrides as JSON, e.g. '{\"block_rows\": 64}'")
  parser.add_argument("--results-dir", default=str(Path(__file__).parent / "results"))
  args = parser.parse_args(argv)
  if jax.default_backend() != "gpu":
    print("no GPU: running the kernels in the Pallas interpreter (a smoke run; the times mean nothing)")
  records = profile(args.shape, args.tokens, [float(r) for r in args.ratios.split(",")], json.loads(args.config))
  gpu = gpu_name(jax.devices()[0].device_kind)
  out = Path(args.results_dir) / f"kernel_profile_{gpu}.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(records, indent=1))
  parts = list(dict.fromkeys(r["part"] for r in records))
  lines = ["| r | " + " | ".join(parts) + " |", "|---|" + "---|" * len(parts)]
  for r in dict.fromkeys(rec["r"] for rec in records):
    row = {rec["part"]: rec for rec in records if rec["r"] == r}
    lines.append(f"| {r} | " + " | ".join(
        f"{row[p]['ms']:.3f} ms" if p == "dense_xla" else f"{row[p]['ratio_to_dense']:.3f}" for p in parts) + " |")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
