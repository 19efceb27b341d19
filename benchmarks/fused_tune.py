"""Tile sizes and the sort decision of the fused ACM kernels, per token bucket and shape.

    python3 -m benchmarks.fused_tune [--out tuned.json]

For ViT-B/16 shapes at 197 / 1,576 / 6,304 / 50,432 tokens (batch 1 / 8 / 32 / 256) and
the two shapes the whole model runs (an MLP ACM, G=1, N=4 learners of 768, GELU; the
q/k/v group, G=3, N=4 learners of 96, identity, min choice 1), each candidate is timed
end to end (gate, sort, learners) with gates picking k ~ Binomial(4, 0.5), against the
dense XLA block it replaces in the same process (MLP, or the three projections). The
candidates are the sorted, unsorted, two-launch (and with --onepass one-launch) kernel paths
at several tile sizes and
the group's dense XLA path (`acm_group(..., xla=True)`). The
best settings per (bucket, shape) are written as JSON that `pallas_kernels.acm_fused.TUNED`
takes (and `benchmarks.vit_bench --tuned` loads).

`--merged`: the q/k/v group also on the merged path (each ACM's linear learners as one (d, d)
matrix per choice, `acm_fused.merge_linear_learners`), whose best settings go to the table
under the kind "merged". `--kinds` limits the run to some of mlp, proj; `--r` sets the gates'
Binomial(4, r). `--space wide` times the sorted path over a larger tile space instead
(`wide_candidates`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import switch_ab as sab
from pallas_kernels import acm_fused as af

TOKENS = (197, 1576, 6304, 50432)
# Up to this many tokens the queued calls are host-bound: on an H100 (2026-12-07 (xxi)) this run's pick at 1,576
# tokens (32-row blocks, 128 columns out: 0.073 against 0.076 ms for the table's tiles) took 69.6 against 47.5 us
# of device time per group (`group_profile`), and the dense MLP took 0.114 ms queued against 44.6 us on the device.
HOST_BOUND_TOKENS = 2048


def timed_ms(fn, *args, calls=50, rounds=5):
  """Median over `rounds` of the mean ms per call of `calls` calls queued back to back (one
  wait at the end): device time, the host's dispatch overlapped. Single waited calls (as
  `vit_bench.timed`) carry the host's dispatch jitter, which at 0.1-0.4 ms per call moved a
  candidate's ratio by up to 1.7x between two runs of the same inputs."""
  jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    out = [fn(*args) for _ in range(calls)]
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / calls)
  return float(np.median(samples)) * 1e3


def inputs(tokens, kind, rng, r=0.5, merged=False):
  d, n = 768, 4
  h, size = (768, 1) if kind == "mlp" else (96, 3)
  pmf = np.array([math.comb(n, j) * r ** j * (1 - r) ** (n - j) for j in range(n + 1)])
  x = jnp.asarray(rng.normal(size=(tokens, d)), jnp.bfloat16)
  groups, dense = [], []
  for _ in range(size):
    total = n * h
    groups.append(dict(
        w1=jnp.asarray(rng.normal(size=(d, total)) / np.sqrt(d), jnp.bfloat16),
        b1=jnp.asarray(0.1 * rng.normal(size=(total,)), jnp.bfloat16),
        w2=jnp.asarray(rng.normal(size=(total, d)) / np.sqrt(total), jnp.bfloat16),
        b2=jnp.asarray(0.1 * rng.normal(size=(n + 1, d)), jnp.bfloat16),
        # x has unit variance per feature: logit noise of Gumbel's spread (pi / sqrt(6)) around log pmf, so that
        # argmax spreads k about as Binomial(n, r) does (`vit_bench.set_gates`); a spread of 1.28 / d (before
        # 2026-12-07 (xix)) left every token at the pmf's mode
        gate=(jnp.asarray(rng.normal(size=(d, n + 1)) * (math.pi / math.sqrt(6)) / math.sqrt(d), jnp.bfloat16),
              jnp.asarray(np.log(np.maximum(pmf, 1e-9)), jnp.bfloat16))))
    if merged:
      groups[-1].update(af.merge_linear_learners(groups[-1], n))
    width = 4 * d if kind == "mlp" else d
    dense.append((jnp.asarray(rng.normal(size=(d, width)) / np.sqrt(d), jnp.bfloat16),
                  jnp.asarray(rng.normal(size=(width, d)) / np.sqrt(width), jnp.bfloat16) if kind == "mlp" else None))
  return x, groups, dense


def dense_fn(kind):
  if kind == "mlp":
    return jax.jit(lambda x, w: jax.nn.gelu(x @ w[0][0], approximate=False) @ w[0][1])
  return jax.jit(lambda x, w: [x @ wi for wi, _ in w])


def merged_candidates(tokens):
  """The merged path's settings: sorted (route, scatter, select), unsorted (route, select) and,
  at few tokens, one launch (`twolaunch`: the gate inside the select launch)."""
  rows = (32, 64) if tokens < 4096 else (64, 128)
  outs = (64, 128) if tokens < 4096 else (128, 256)
  paths = [dict(sort=True)] + ([dict(sort=False), dict(twolaunch=True)] if tokens < 4096 else [])
  for r, o, path in itertools.product(rows, outs, paths):
    yield dict(block_rows=r, block_out=o, num_warps=8 if r == 128 else 4, merged=True, **path)


def candidates(tokens, kind, onepass=False):
  rows = (32, 64) if tokens < 4096 else (64, 128)
  outs = (64, 128) if tokens < 4096 else (128, 256)
  hidden = (128,)
  sorts = (False, True) if tokens < 20000 else (True,)
  for r, o, hd, srt in itertools.product(rows, outs, hidden, sorts):
    yield dict(block_rows=r, block_out=o, block_hidden=hd, num_warps=8 if r == 128 else 4, sort=srt)
  if tokens < 4096:  # the two-launch path (gate inside the up kernel): the unsorted tiles
    for r, o in itertools.product(rows, outs):
      yield dict(block_rows=r, block_out=o, block_hidden=128, num_warps=4, twolaunch=True)
  yield dict(xla=True)  # the dense XLA path: no kernels, no skipped arithmetic
  if onepass and tokens < 4096:  # the one-launch path (float32 atomic adds of the hidden tiles' partial outputs)
    for r, o, hd in itertools.product((32, 64), (128, 256), (128, 256) if kind == "mlp" else (128,)):
      yield dict(block_rows=r, block_out=o, block_hidden=hd, num_warps=4, onepass=True)


def wide_candidates(tokens, kind):
  """`--space wide`: the sorted path over a larger tile space (row blocks 32 to 128 on 4 warps, 8 for 128 rows,
  hidden tiles 128 and 256, output tiles 64 to 256), for the token counts where the default space's small tiles
  may leave the launches bound by L2 traffic: w1 and w2 are read once per row block, the hidden rows once per
  output tile. Where the down launch splits its reduction (`acm_fused.DOWN_SPLIT_MAX_TOKENS`) into fewer parts
  than learners, the output tiles of 128 and 256 also with one part per learner ("parts": 4), which gives the
  larger tiles back the programs they take away."""
  hidden = (128, 256) if kind == "mlp" else (128,)
  split = af.DOWN_SPLIT_MAX_TOKENS is not None and tokens <= af.DOWN_SPLIT_MAX_TOKENS
  fewer_parts = split and af.split_parts(4, tokens) < 4
  for r, o, hd in itertools.product((32, 64, 128), (64, 128, 256), hidden):
    cand = dict(block_rows=r, block_out=o, block_hidden=hd, num_warps=8 if r == 128 else 4, sort=True)
    yield cand
    if fewer_parts and o >= 128:
      yield dict(cand, parts=4)


SPACES = {"default": candidates, "wide": lambda tokens, kind, onepass=False: wide_candidates(tokens, kind)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="tuned.json")
  parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
  parser.add_argument("--kinds", default="mlp,proj", help="comma list of mlp, proj")
  parser.add_argument("--merged", action="store_true", help="the q/k/v group on the merged path too")
  parser.add_argument("--r", type=float, default=0.5, help="the gates pick k ~ Binomial(4, r)")
  parser.add_argument("--onepass", action="store_true",
                      help="also the one-launch path (2-5x slower than the dense block on an H200, 2026-12-01)")
  parser.add_argument("--space", default="default", choices=sorted(SPACES),
                      help="the candidates: the default space, or `wide` (the sorted path over larger tiles)")
  args = parser.parse_args(argv)
  unknown = set(args.kinds.split(",")) - {"mlp", "proj"}
  if unknown:
    parser.error(f"--kinds takes mlp and/or proj, got {sorted(unknown)}")
  if jax.default_backend() != "gpu":
    sys.exit("fused_tune needs a GPU")
  token_counts = [int(t) for t in args.tokens.split(",")]
  host_bound = [t for t in token_counts if t <= HOST_BOUND_TOKENS]
  if host_bound:
    print(f"note: at {host_bound} tokens these queued-call times follow host dispatch more than the kernels; "
          "check a pick's device time with `python3 -m benchmarks.group_profile --variant` before adopting it",
          flush=True)
  rng = np.random.default_rng(0)
  table, rows, baselines = {}, [], []
  for tokens in token_counts:
    for kind in args.kinds.split(","):
      merged = kind == "proj" and args.merged
      x, groups, dense = inputs(tokens, kind, rng, args.r, merged)
      act, min_choice = ("gelu", 0) if kind == "mlp" else ("identity", 1)
      dense_ms = timed_ms(dense_fn(kind), x, dense)
      default = jax.jit(lambda x, g: af.acm_group(x, g, num_learners=4, activation=act, min_choice=min_choice,
                                                  merged=False)[0])
      default_ms = timed_ms(default, x, groups)
      baselines.append(dict(tokens=tokens, kind=kind, r=args.r, dense_ms=dense_ms, default_ms=default_ms))
      sets = [(kind, list(SPACES[args.space](tokens, kind, args.onepass)))]
      if merged:
        sets.append(("merged", list(merged_candidates(tokens))))
      for table_kind, cands in sets:
        best = (default_ms, None) if table_kind == kind else (float("inf"), None)
        for cand in cands:
          cand = {"merged": False, **cand}
          settings = {name: value for name, value in cand.items() if name != "parts"}
          fn = jax.jit(lambda x, g, c=settings: af.acm_group(x, g, num_learners=4, activation=act,
                                                             min_choice=min_choice, **c)[0])
          try:
            # DOWN_SPLIT_PARTS is read when `fn` is traced, in its first call: inside the block
            with sab.settings_applied({"DOWN_SPLIT_PARTS": cand["parts"]} if "parts" in cand else {}):
              ms = timed_ms(fn, x, groups)
          except Exception as err:
            print(f"T={tokens} {table_kind} {cand}: FAILED {type(err).__name__}: {str(err)[:200]}", flush=True)
            continue
          rows.append(dict(tokens=tokens, kind=table_kind, r=args.r, **cand, ms=ms, ratio_to_dense=ms / dense_ms))
          save(args.out, table, rows, baselines)  # after every candidate: a run cut short keeps what it timed
          if ms < best[0]:
            best = (ms, cand)
        key = f"{af.token_bucket(tokens)}|{table_kind}"
        if best[1] is not None:
          # "parts" (DOWN_SPLIT_PARTS) is a module setting, not a tile: the printed line shows it, the table does not
          table[key] = {name: value for name, value in best[1].items() if name not in ("merged", "parts")}
        print(f"T={tokens:6d} {table_kind}: dense {dense_ms:.4f} ms, factored default {default_ms:.4f} ms "
              f"({default_ms / dense_ms:.3f}), best {best[0]:.4f} ms ({best[0] / dense_ms:.3f}) {best[1]}", flush=True)
        save(args.out, table, rows, baselines)


def save(path, table, rows, baselines):
  with open(path, "w") as f:
    # k_spread: files written before 2026-12-07 (xix) lack it; their gates gave every token the pmf's mode
    json.dump(dict(table=table, rows=rows, baselines=baselines, device=jax.devices()[0].device_kind,
                   jax_version=jax.__version__, k_spread="binomial"), f, indent=1)


def load(path):
  """The table of a tuning run, keyed as `acm_fused.TUNED`."""
  with open(path) as f:
    table = json.load(f)["table"]
  return {(None if b == "None" else int(b), kind): v for (b, kind), v in
          ((key.split("|"), value) for key, value in table.items())}


if __name__ == "__main__":
  main()
