"""Images/s of the dense Flax ViT-B/16 and the ACM ViT-B/16 on a GPU, at serving and batch sizes.

    python3 -m benchmarks.vit_bench [--batches 1,8,32,256] [--acm mlp,mlp_qkvo] [--ratios 0.5,0.25]
                                    [--impls pallas,triton,xla] [--attention auto]
    python3 -m benchmarks.vit_bench --model tiny --impls xla --attention xla --batches 2 --no-append  # CPU smoke run

ACMs (N=4) replace all 12 MLPs ("mlp") or the MLPs and the q/k/v/o projections ("mlp_qkvo", the
paper's main configuration). The weights are random (speed does not depend on them) except the
gates: their logits are log Binomial(N, r) plus noise of the spread of a Gumbel variable, so
argmax picks k with a mean near N*r per token and a realistic spread. Before timing, each ACM
configuration's logits are compared with the XLA path forced to the same per-ACM choices, and
the block-0 gates (same inputs on both paths) with the XLA gates' argmax. Each row records the
measured mean k/N and the FLOP ideal; bf16, one jitted forward each, the same process; each
ACM configuration and the dense model timed in 5 alternating rounds of 10 calls (after warm-up,
dispatch included: what a server sees), ratio = median dense round / median ACM round.

A second baseline (on by default, `--no-dense-gelu-tanh` skips it): the dense model with GELU's tanh
form. In bfloat16 the ACM kernels compute GELU in that form (within bfloat16's rounding of the erf
form), while XLA runs the dense model's erf GELU as a separate, costly fusion: with the tanh form the
dense forward ran 1.04-1.23x faster on an H200 (benchmarks/RESULTS.md, 2026-12-04 (iii)). Rows record
`ratio_to_dense_tanh` beside `ratio_to_dense`; `ratio_to_dense_tanh` is the like-for-like figure.

A yardstick (on by default, `--no-static` skips it): the static-width model, what an ACM with no routing
cost at all would run. Every token takes the ACM configuration's measured mean compute: each ACMized MLP
becomes one XLA MLP of width mean k x learner width, each ACMized projection one low-rank pair of XLA
matmuls of that width (rounded to a multiple of 16), no gate, no sort, cuBLAS and XLA's own GELU. Rows
record `static_ratio_to_dense` (its images/s over the dense model's, timed in the same rounds) and
`static_widths`. Where an ACM row misses a target that its static model misses too, the limit is the
arithmetic left at that k on this GPU, not the routing.

Issue #21's speed targets (`TARGETS`, ViT-B/16 at r = 0.5 and 0.25, batches 1, 8, 32 and 256): rows of
that model record `target_ratio`, `meets_target` and `target_limit`, "met", "routing" (the yardstick clears
the target: the gate, sort and kernels cost the difference) or "yardstick" (the static model misses it
too), and the printed summary gains a table of the verdicts. `python3 -m benchmarks.vit_targets`
draws the same table from the records of earlier runs.

`--xla-option OPTION=VALUE` (repeatable) compiles every timed forward, dense, ACM and yardstick alike, with
that XLA compile option (e.g. `xla_gpu_enable_command_buffer=`: command buffers off); rows record
`xla_options`, and `vit_targets` leaves rows with options out of the default-path verdict. `--acm-xla-option`
does the same for the routed ACM forwards alone (rows record `acm_xla_options`, which include `--xla-option`'s):
each model compiled with the options that suit it, the dense model and the yardstick on XLA's defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
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
from acm_jax import serving
from acm_jax import transformer
from acm_jax.vit import model as vit
from benchmarks import gpu_name
from pallas_kernels import acm_fused


def log(*args):
  print(*args, flush=True)


# issue #21: whole ViT-B/16, images/s of the ACM model over the dense model's, (ACMized blocks, r) -> {batch: at least}
TARGETS = {
    ("mlp", 0.5): {1: 1.00, 8: 1.10, 32: 1.25, 256: 1.42},
    ("mlp", 0.25): {1: 1.00, 8: 1.20, 32: 1.45, 256: 1.75},
    ("mlp_qkvo", 0.5): {1: 1.00, 8: 1.10, 32: 1.30, 256: 1.60},
    ("mlp_qkvo", 0.25): {1: 1.00, 8: 1.20, 32: 1.50, 256: 2.10},
}


def target_verdict(rec: dict, model: str = "vit_b16") -> dict:
  """{target_ratio, meets_target, target_limit} for a record of `TARGETS`' model, ACM kind, r and batch ({} for
  any other). target_limit: "met"; "yardstick" where the static-width model misses the target as well (the
  arithmetic left at that k, not the routing, is short); "routing" where it clears it; "no yardstick" for a
  record without one (`--no-static`)."""
  target = TARGETS.get((rec.get("acm"), rec.get("r")), {}).get(rec.get("batch")) if model == "vit_b16" else None
  if target is None:
    return {}
  met = rec["ratio_to_dense"] >= target
  static = rec.get("static_ratio_to_dense")
  limit = "met" if met else "no yardstick" if static is None else "yardstick" if static < target else "routing"
  return dict(target_ratio=target, meets_target=met, target_limit=limit)


def verdict_cell(rec: dict) -> str:
  """"1.03 < 1.10, routing" (missed, and what limits it) or "1.45 >= 1.42, met" for a record with a target."""
  sign = ">=" if rec["meets_target"] else "<"
  return f"{rec['ratio_to_dense']:.2f} {sign} {rec['target_ratio']:.2f}, {rec['target_limit']}"


def verdict_lines(records: list[dict], batches) -> list[str]:
  """A markdown table of `verdict_cell` per (ACM kind, r, impl) row and batch; [] when no record has a target."""
  rows = {}
  for rec in records:
    if "target_ratio" in rec:
      rows.setdefault((rec["acm"], rec["r"], rec["impl"]), {})[rec["batch"]] = rec
  if not rows:
    return []
  lines = ["\nIssue #21's targets (ACM / dense, erf GELU; \"routing\": the static-width yardstick clears the target, "
           "\"yardstick\": it misses it too):\n",
           "| ACMized | r | impl | " + " | ".join(f"batch {b}" for b in batches) + " |",
           "|---|---|---|" + "---|" * len(batches)]
  for (kind, r, impl), row in rows.items():
    cells = [verdict_cell(row[b]) if b in row else "" for b in batches]
    lines.append(f"| {kind} | {r} | {impl} | " + " | ".join(cells) + " |")
  return lines


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
      flat[name] = jnp.asarray(np.broadcast_to(np.log(np.maximum(pmf, 1e-9)), flat[name].shape), flat[name].dtype)
  return flax.traverse_util.unflatten_dict(flat, sep="/")


ACM_KINDS = {"mlp": False, "mlp_qkvo": True}  # --acm value -> attention projections ACMized
NUM_LEARNERS = 4


def acm_config(dense_cfg: vit.ViTConfig, kind: str, impl: str = "auto") -> vit.ViTConfig:
  """`dense_cfg` with the blocks of --acm `kind` ACMized (NUM_LEARNERS learners each)."""
  return dataclasses.replace(dense_cfg, acm=acm_lib.ACMConfig(num_learners=NUM_LEARNERS, attention=ACM_KINDS[kind],
                                                              impl=impl)).validate()


def bf16_params(model: vit.ViT, image: jax.Array):
  """Random parameters of `model` (dense or ACM) in bfloat16, from key 1, initialised without
  tracing the inference kernels."""
  params = acm_lib.init_without_kernels(model, jax.random.key(1), image)["params"]
  return jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)


LAYOUTS = {"tree": 0, "packed": serving.SMALL_MAX_SIZE, "flat": None}  # --layout -> serving.pack's max_size


def serving_params(params, layout: str):
  """`params` in a serving layout (`LAYOUTS`): "tree" as they are, "packed" with the small leaves in one array per
  dtype (`acm_jax.serving`), "flat" with every leaf in one array per dtype."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
  return params if layout == "tree" else serving.pack(params, LAYOUTS[layout])


def serving_apply(model, **kwargs):
  """`model`'s forward `(params, images) -> logits` for parameters in any of `serving_params`' layouts."""
  def forward(params, images):
    tree = serving.unpack(params) if isinstance(params, serving.Packed) else params
    return model.apply({"params": tree}, images, **kwargs)
  return forward


def serving_forwards(model_name: str, kinds, impl: str, r: float, image, layout: str = "tree") -> dict:
  """{"none" (dense) or ACM kind: (jitted forward, bf16 parameters in `layout`)} of the `model_name` preset, the
  ACM gates set for target k/N = r (`set_gates`): the models `serve_profile` and `dispatch_bench` time."""
  dense_cfg = vit.get_config(model_name)
  configs = {"none": dense_cfg, **{kind: acm_config(dense_cfg, kind, impl) for kind in kinds}}
  forwards = {}
  for kind, cfg in configs.items():
    model = vit.ViT(cfg)
    params = bf16_params(model, image)
    if kind != "none":
      params = set_gates(params, cfg.acm.num_learners, r, cfg.dim, seed=2)
    forwards[kind] = (jax.jit(serving_apply(model)), serving_params(params, layout))
  return forwards


def acm_collection(state):
  """The sown "acm" collection keyed by per-layer paths (`block_i/...`) in either block layout."""
  return transformer.unstack_blocks(dict(flax.core.unfreeze(state["acm"])))


def mean_k_by_kind(state):
  """Mean k of the MLP ACMs and of the attention-projection ACMs (None where there are none)."""
  flat = flax.traverse_util.flatten_dict(acm_collection(state), sep="/")
  kinds = {"mlp": [], "attn": []}
  for name, v in flat.items():
    if name.endswith("choice"):
      kinds["attn" if "/attn/" in name else "mlp"].append(np.asarray(jnp.argmax(v[0], -1)).mean())
  return {kind: (float(np.mean(ks)) if ks else None) for kind, ks in kinds.items()}


def mean_k_ratio(mean_k):
  """Mean k/N over all ACMs (4 projections per MLP where the attention is ACMized)."""
  ks = [mean_k["mlp"]] + ([mean_k["attn"]] * 4 if mean_k["attn"] is not None else [])
  return float(np.mean(ks)) / 4


def choices_by_acm(state):
  """{ACM module path: (batch, tokens) k} from a sown "acm" collection (`acm.force_k`'s mapping)."""
  flat = flax.traverse_util.flatten_dict(acm_collection(state), sep="/")
  return {name[:-len("/choice")]: jnp.argmax(v[0], -1).astype(jnp.int32)
          for name, v in flat.items() if name.endswith("/choice")}


def forced_reference(model, params, images, kmap):
  """The XLA path with every ACM at the given choices: logits and its sown collection
  (whose "logits" are the XLA gates' own, on the forced path's activations)."""
  with acm_lib.force_k(kmap):
    return model.apply({"params": params}, images, mutable=["acm"])


def gate_agreement(kmap, ref_state):
  """Share of tokens where the kernel's k equals the XLA gate's argmax, over the ACMs of block 0
  (whose inputs are the same on both paths)."""
  flat = flax.traverse_util.flatten_dict(acm_collection(ref_state), sep="/")
  same = [np.asarray(jnp.argmax(flat[f"{name}/logits"][0], -1) == k).mean()
          for name, k in kmap.items() if name.startswith("block_0/")]
  return float(np.mean(same))


def relative_error(logits, ref) -> float:
  """max |logits - ref| over max |ref|, in float32."""
  logits, ref = np.asarray(logits, np.float32), np.asarray(ref, np.float32)
  return float(np.abs(logits - ref).max() / np.abs(ref).max())


def ideal_ratio(cfg, mean_k):
  """Dense time / ACM time if time followed the per-token matmul FLOPs of one block
  (MLP 4 d m, q/k/v/o 8 d^2, attention 4 T d; gates 2 d (N+1) each) at the measured mean k."""
  acm = cfg.acm
  d, t, n = cfg.dim, cfg.num_tokens, acm.num_learners
  gate = 2 * d * (n + 1)
  dense = 4 * d * cfg.mlp_dim + 8 * d * d + 4 * t * d
  mlp = mean_k["mlp"] * 4 * d * acm.mlp_learner_width(cfg.mlp_dim) + gate
  proj = 8 * d * d if mean_k["attn"] is None else 4 * (mean_k["attn"] * 4 * d * acm.attention_learner_width(d) + gate)
  return dense / (mlp + proj + 4 * t * d)


STATIC_MULTIPLE = 16  # the static-width yardstick's widths are rounded to this (a Triton / cuBLAS tile multiple)


def static_width(mean_k: float, learner: int) -> int:
  """The static-width yardstick's hidden width for ACMs of learners of `learner` units at mean choice `mean_k`:
  mean k x learner width rounded to a multiple of STATIC_MULTIPLE (at least one)."""
  return max(STATIC_MULTIPLE, round(mean_k * learner / STATIC_MULTIPLE) * STATIC_MULTIPLE)


def static_widths(acm_cfg: vit.ViTConfig, mean_k: dict) -> dict:
  """{"mlp": width, "attn": width or None}: `static_width` of the model's MLPs and projections."""
  acm = acm_cfg.acm
  return {"mlp": static_width(mean_k["mlp"], acm.mlp_learner_width(acm_cfg.mlp_dim)),
          "attn": (None if mean_k["attn"] is None
                   else static_width(mean_k["attn"], acm.attention_learner_width(acm_cfg.dim)))}


def static_config(acm_cfg: vit.ViTConfig, widths: dict) -> vit.ViTConfig:
  """The static-width yardstick of `static_widths`: `acm_cfg` with every ACM as one learner of that
  width on XLA; run it with mode="full" (every token takes its one learner, the gates go unused)."""
  total = (acm_cfg.dim * acm_cfg.dim + acm_cfg.dim) / (2 * acm_cfg.dim + 1)  # `attention_learner_width`'s total
  acm = dataclasses.replace(acm_cfg.acm, num_learners=1, learner_width=widths["mlp"], impl="xla",
                            width_factor=1.0 if widths["attn"] is None else widths["attn"] / total)
  cfg = dataclasses.replace(acm_cfg, acm=acm).validate()
  got = (acm.mlp_learner_width(cfg.mlp_dim), acm.attention_learner_width(cfg.dim) if acm.attention else None)
  if got != (widths["mlp"], widths["attn"]):
    raise ValueError(f"static widths {widths} came out as {got}")
  return cfg


ROUNDS = 5  # alternating dense / ACM timing rounds per configuration


def parse_xla_options(items) -> dict:
  """["KEY=VALUE", ...] -> {KEY: VALUE}: XLA compile options (DebugOptions fields) for `jax.jit`'s
  compiler_options, VALUE an int, a bool (true/false) or a string (possibly empty). ValueError names a bad item."""
  options = {}
  for item in items:
    key, eq, value = item.partition("=")
    if not eq or not key:
      raise ValueError(f"expected OPTION=VALUE, got {item!r}")
    if value.lower() in ("true", "false"):
      options[key] = value.lower() == "true"
    elif value.lstrip("-").isdigit():
      options[key] = int(value)
    else:
      options[key] = value
  return options


def timed(fn, *args, reps=30):
  jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    samples.append(time.perf_counter() - t0)
  return float(np.median(samples))


def add_fusion_flags(parser: argparse.ArgumentParser) -> None:
  """Flags that set the fusion switches of `pallas_kernels.acm_fused` for a run (all off by default except
  the split down launch, on up to 1,600 tokens)."""
  parser.add_argument("--norm-min-tokens", type=int, default=None,
                      help="acm_fused.NORM_MIN_TOKENS for this run (the LayerNorm before a group fused into its "
                           "kernels from this many tokens on; -1: never)")
  parser.add_argument("--norm-mode", default=None, choices=acm_fused.NORM_MODES,
                      help="acm_fused.NORM_MODE for this run (how the up launch takes a fused LayerNorm)")
  parser.add_argument("--residual-min-tokens", type=int, default=None,
                      help="acm_fused.RESIDUAL_MIN_TOKENS for this run (the skip connection added by an ACM's down "
                           "launch from this many tokens on; -1: never)")
  parser.add_argument("--down-split-max-tokens", type=int, default=None,
                      help="acm_fused.DOWN_SPLIT_MAX_TOKENS for this run (the down launch's reduction split into "
                           "parts up to this many tokens; default 1600; -1: never)")
  parser.add_argument("--route-shared-min-tokens", type=int, default=None,
                      help="acm_fused.ROUTE_SHARED_MIN_TOKENS for this run (a group's gates in one route program "
                           "per chunk from this many tokens on; default: acm_fused's; -1: never)")
  parser.add_argument("--inline-sort-max-tokens", type=int, default=None,
                      help="acm_fused.INLINE_SORT_MAX_TOKENS for this run (the sorted path without its scatter "
                           "launch up to this many tokens; default: acm_fused's; -1: never)")
  parser.add_argument("--inline-sort-place", choices=acm_fused.INLINE_SORT_PLACES, default=None,
                      help="acm_fused.INLINE_SORT_PLACE for this run (how the inline sort places each token: by "
                           "per-chunk counts or by atomic counters in the route launch)")
  parser.add_argument("--down-split-rounding", choices=acm_fused.DOWN_SPLIT_ROUNDINGS, default=None,
                      help="acm_fused.DOWN_SPLIT_ROUNDING for this run (where the split down launch's sum is rounded "
                           "to x's dtype: in its own fusion, or where XLA puts it)")
  parser.add_argument("--down-bias-loop-max-tokens", type=int, default=None,
                      help="acm_fused.DOWN_BIAS_LOOP_MAX_TOKENS for this run (the whole down launch adds the output "
                           "bias by a loop over the choices up to this many tokens; default: acm_fused's; -1: never)")


# `add_fusion_flags`' integer flags, each the acm_fused setting of its name in capitals
_TOKEN_BOUND_FLAGS = ("norm_min_tokens", "residual_min_tokens", "down_split_max_tokens", "route_shared_min_tokens",
                      "inline_sort_max_tokens", "down_bias_loop_max_tokens")


def apply_fusion_flags(args) -> dict:
  """Sets acm_fused's fusion switches from `add_fusion_flags`' flags; returns them as records keep them."""
  for name in _TOKEN_BOUND_FLAGS:  # token-count bounds: -1 turns the switch off (None)
    bound = getattr(args, name)
    if bound is not None:
      setattr(acm_fused, name.upper(), None if bound < 0 else bound)
  for name in ("norm_mode", "down_split_rounding", "inline_sort_place"):  # named choices
    if getattr(args, name) is not None:
      setattr(acm_fused, name.upper(), getattr(args, name))
  return dict(norm_min_tokens=acm_fused.NORM_MIN_TOKENS, norm_mode=acm_fused.NORM_MODE,
              residual_min_tokens=acm_fused.RESIDUAL_MIN_TOKENS, down_split_max_tokens=acm_fused.DOWN_SPLIT_MAX_TOKENS,
              down_split_per_learner_max_tokens=acm_fused.DOWN_SPLIT_PER_LEARNER_MAX_TOKENS,
              down_split_parts=acm_fused.DOWN_SPLIT_PARTS, route_small_max_tokens=acm_fused.ROUTE_SMALL_MAX_TOKENS,
              route_small=dict(acm_fused.ROUTE_SMALL), route_medium_max_tokens=acm_fused.ROUTE_MEDIUM_MAX_TOKENS,
              route_medium=dict(acm_fused.ROUTE_MEDIUM), route_shared_min_tokens=acm_fused.ROUTE_SHARED_MIN_TOKENS,
              inline_sort_min_tokens=acm_fused.INLINE_SORT_MIN_TOKENS,
              inline_sort_max_tokens=acm_fused.INLINE_SORT_MAX_TOKENS, inline_sort_place=acm_fused.INLINE_SORT_PLACE,
              down_split_rounding=acm_fused.DOWN_SPLIT_ROUNDING,
              down_bias_loop_max_tokens=acm_fused.DOWN_BIAS_LOOP_MAX_TOKENS, tuned_tiles=tuned_tiles())


def tuned_tiles(table: dict | None = None) -> dict:
  """A tile table (default acm_fused.TUNED) as JSON holds it: {"BUCKET/KIND": entry}, BUCKET a token bound or
  "none"."""
  table = acm_fused.TUNED if table is None else table
  return {f"{str(bucket).lower()}/{kind}": dict(entry) for (bucket, kind), entry in table.items()}


def _mosaic_tiles(flag: str, text: str) -> dict:
  """FIELD=VALUE,... of `acm_mgpu.DownConfig` (integers; split=m or n), or exit naming the bad item."""
  from pallas_kernels import acm_mgpu
  fields = sorted(f.name for f in dataclasses.fields(acm_mgpu.DownConfig))
  tiles = {}
  for item in filter(None, text.split(",")):
    name, _, value = item.partition("=")
    if name not in fields or not (value in ("m", "n") if name == "split" else value.isdigit()):
      sys.exit(f"{flag}: bad item {item!r}; expected FIELD=VALUE with FIELD one of {fields} "
               "(integers; split=m or n)")
    tiles[name] = value if name == "split" else int(value)
  return tiles


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="vit_b16", choices=("tiny", "vit_s16", "vit_b16", "vit_l16"),
                      help="the ViT preset (tiny with --impls xla runs on a CPU: a smoke run of the script)")
  parser.add_argument("--batches", default="1,8,32,256", help="comma list of batch sizes")
  parser.add_argument("--acm", default="mlp,mlp_qkvo", help=f"comma list of ACMized blocks: {sorted(ACM_KINDS)}")
  parser.add_argument("--ratios", default="0.5,0.25")
  parser.add_argument("--impls", default="pallas", help="comma list of ACM impls: pallas, triton, xla")
  parser.add_argument("--attention", default="auto", help="attention implementation (see transformer.attend)")
  parser.add_argument("--scan-blocks", action="store_true", help="dense and ACM models with scanned blocks")
  parser.add_argument("--sort-min-tokens", type=int, default=None,
                      help="override pallas_kernels.acm_fused.SORT_MIN_TOKENS (tuning)")
  parser.add_argument("--twolaunch-max-tokens", type=int, default=None,
                      help="acm_fused.TWOLAUNCH_MAX_TOKENS for this run (the gate inside the up kernel)")
  parser.add_argument("--onepass-max-tokens", type=int, default=None,
                      help="override pallas_kernels.acm_fused.ONEPASS_MAX_TOKENS (the one-launch path)")
  add_fusion_flags(parser)
  parser.add_argument("--mgpu-down-min-tokens", type=int, default=None,
                      help="acm_fused.MGPU_DOWN_MIN_TOKENS for this run (the Mosaic GPU down kernel; -1: never)")
  parser.add_argument("--mgpu-down-kinds", default=None,
                      help="acm_fused.MGPU_DOWN_KINDS for this run: comma list of mlp, proj")
  parser.add_argument("--mgpu-down-tiles", default=None,
                      help="acm_fused.MGPU_DOWN_TILES for this run: comma list of DownConfig fields, e.g. tile_n=64,stages=3")
  parser.add_argument("--mgpu-down-unsort", default=None, choices=acm_fused.MGPU_DOWN_UNSORTS,
                      help="acm_fused.MGPU_DOWN_UNSORT for this run (how the Mosaic down launch's rows return to "
                           "token order: XLA's gather, or one kernel that adds the skip connection too)")
  parser.add_argument("--mgpu-up-min-tokens", type=int, default=None,
                      help="acm_fused.MGPU_UP_MIN_TOKENS for this run (the Mosaic GPU up kernel; -1: never)")
  parser.add_argument("--mgpu-up-tiles", default=None,
                      help="acm_fused.MGPU_UP_TILES for this run: comma list of DownConfig fields, e.g. tile_m=64")
  parser.add_argument("--dense-gelu-tanh", action=argparse.BooleanOptionalAction, default=True,
                      help="also time the dense model with GELU's tanh form, the form the ACM kernels compute in "
                           "bfloat16 (a like-for-like baseline: ratio_to_dense_tanh)")
  parser.add_argument("--static", action=argparse.BooleanOptionalAction, default=True,
                      help="time the static-width yardstick of each ACM configuration (module docstring)")
  parser.add_argument("--tuned", default=None, help="JSON of benchmarks.fused_tune to load into acm_fused.TUNED")
  parser.add_argument("--xla-option", action="append", default=[], metavar="OPTION=VALUE",
                      help="an XLA compile option for every timed forward, dense, ACM and yardstick alike "
                           "(repeatable), e.g. xla_gpu_enable_command_buffer= (command buffers off)")
  parser.add_argument("--acm-xla-option", action="append", default=[], metavar="OPTION=VALUE",
                      help="an XLA compile option for the routed ACM forwards only (repeatable; added to "
                           "--xla-option), e.g. xla_gpu_enable_command_buffer= with the dense model and the yardstick "
                           "on the defaults")
  parser.add_argument("--layout", default="tree", choices=sorted(LAYOUTS),
                      help="the timed forwards' parameter layout, dense, ACM and yardstick alike (serving_params): "
                           "tree, packed (small leaves in one array per dtype: fewer arrays for the host to pass), "
                           "flat")
  parser.add_argument("--results-dir", default=str(Path(__file__).parent / "results"))
  parser.add_argument("--no-append", action="store_true", help="do not append to RESULTS.md")
  args = parser.parse_args(argv)
  command = "python3 -m benchmarks.vit_bench " + " ".join(argv if argv is not None else sys.argv[1:])
  if jax.default_backend() != "gpu" and set(args.impls.split(",")) != {"xla"}:
    sys.exit(f"vit_bench times the ACM kernels on a GPU (backend here: {jax.default_backend()!r}); "
             "only --impls xla runs elsewhere")
  batches = [int(b) for b in args.batches.split(",")]
  kinds = args.acm.split(",")
  try:
    xla_options = parse_xla_options(args.xla_option)
    acm_xla_options = {**xla_options, **parse_xla_options(args.acm_xla_option)}
  except ValueError as err:
    parser.error(f"--xla-option / --acm-xla-option: {err}")
  timed_jit = functools.partial(jax.jit, compiler_options=xla_options or None)
  acm_jit = functools.partial(jax.jit, compiler_options=acm_xla_options or None)  # the routed ACM forwards only
  bad = [k for k in kinds if k not in ACM_KINDS] + [b for b in batches if b < 1]
  if bad:
    sys.exit(f"bad --acm or --batches value(s) {bad}: --acm takes {sorted(ACM_KINDS)}, batches are >= 1")
  if args.sort_min_tokens is not None:
    acm_fused.SORT_MIN_TOKENS = args.sort_min_tokens
  if args.onepass_max_tokens is not None:
    acm_fused.ONEPASS_MAX_TOKENS = args.onepass_max_tokens
  if args.twolaunch_max_tokens is not None:
    acm_fused.TWOLAUNCH_MAX_TOKENS = args.twolaunch_max_tokens
  fusions = apply_fusion_flags(args)
  if args.mgpu_down_min_tokens is not None:
    acm_fused.MGPU_DOWN_MIN_TOKENS = None if args.mgpu_down_min_tokens < 0 else args.mgpu_down_min_tokens
  if args.mgpu_down_kinds is not None:
    acm_fused.MGPU_DOWN_KINDS = tuple(k for k in args.mgpu_down_kinds.split(",") if k)
  if args.mgpu_down_tiles:
    acm_fused.MGPU_DOWN_TILES = _mosaic_tiles("--mgpu-down-tiles", args.mgpu_down_tiles)
  if args.mgpu_down_unsort is not None:
    acm_fused.MGPU_DOWN_UNSORT = args.mgpu_down_unsort
  if args.mgpu_up_min_tokens is not None:
    acm_fused.MGPU_UP_MIN_TOKENS = None if args.mgpu_up_min_tokens < 0 else args.mgpu_up_min_tokens
  if args.mgpu_up_tiles:
    acm_fused.MGPU_UP_TILES = _mosaic_tiles("--mgpu-up-tiles", args.mgpu_up_tiles)
  if args.tuned:
    from benchmarks import fused_tune
    acm_fused.TUNED.update(fused_tune.load(args.tuned))
  device = jax.devices()[0].device_kind
  date = datetime.date.today().isoformat()
  records = []
  dense_cfg = vit.get_config(args.model, attention=args.attention, scan_blocks=args.scan_blocks)
  dense = vit.ViT(dense_cfg)
  size = dense_cfg.image_size
  all_images = jax.random.normal(jax.random.key(0), (max(batches), size, size, 3), jnp.bfloat16)
  dense_params = bf16_params(dense, all_images[:1])
  dense_fn = timed_jit(serving_apply(dense))
  served_dense_params = serving_params(dense_params, args.layout)
  dense_tanh_fn = None
  if args.dense_gelu_tanh:
    # the same weights under GELU's tanh form, which the kernels compute for "gelu" in bfloat16 (within
    # bfloat16's rounding of the erf form): XLA runs the dense model's erf GELU as a separate, costly fusion
    dense_tanh = vit.ViT(dataclasses.replace(dense_cfg, activation="gelu_tanh").validate())
    dense_tanh_fn = timed_jit(serving_apply(dense_tanh))
  setups = []
  for kind in kinds:
    acm_cfg = acm_config(dense_cfg, kind)
    base = bf16_params(vit.ViT(acm_cfg), all_images[:1])
    xla_model = vit.ViT(dataclasses.replace(acm_cfg, acm=dataclasses.replace(acm_cfg.acm, impl="xla")))
    reference = jax.jit(functools.partial(forced_reference, xla_model))
    for r in (float(v) for v in args.ratios.split(",")):
      setups.append((kind, acm_cfg, r, set_gates(base, NUM_LEARNERS, r, acm_cfg.dim, seed=2), reference))
  served = {}  # (kind, r) -> that setup's parameters in --layout, for the timed calls (packed once)

  jitted = {}  # (kind, impl) -> (forward, forward with the sown statistics): one compile per shape

  def compiled(kind, acm_cfg, impl):
    if (kind, impl) not in jitted:
      model = vit.ViT(dataclasses.replace(acm_cfg, acm=dataclasses.replace(acm_cfg.acm, impl=impl)))
      jitted[kind, impl] = (acm_jit(serving_apply(model)),
                            jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["acm"])))
    return jitted[kind, impl]

  statics = {}  # (kind, widths) -> (forward, params) of the static-width yardstick

  def static_model(kind, acm_cfg, widths):
    key = (kind, tuple(sorted(widths.items())))
    if key not in statics:
      model = vit.ViT(static_config(acm_cfg, widths))
      statics[key] = (timed_jit(serving_apply(model, mode="full")),
                      serving_params(bf16_params(model, all_images[:1]), args.layout))
    return statics[key]

  for batch in batches:
    images = all_images[:batch]
    dense_ips = batch / timed(dense_fn, served_dense_params, images)
    tanh_ips = batch / timed(dense_tanh_fn, served_dense_params, images) if dense_tanh_fn else None
    log(f"batch {batch}: dense {dense_ips:.1f} images/s"
        + (f", with GELU's tanh form {tanh_ips:.1f}" if tanh_ips else ""))
    records.append(dict(device=device, date=date, jax_version=jax.__version__, batch=batch, acm="none", r=1.0,
                        r_measured=1.0, impl="dense", attention=args.attention, images_per_s=round(dense_ips, 1),
                        ratio_to_dense=1.0, ideal_ratio=1.0, scanned=args.scan_blocks, xla_options=xla_options,
                        layout=args.layout, patch_embed=vit.PATCH_EMBED,
                        **({"images_per_s_gelu_tanh": round(tanh_ips, 1)} if tanh_ips else {})))
    for kind, acm_cfg, r, params, reference in setups:
      check = images[:min(batch, 32)]
      for impl in args.impls.split(","):
        fn, with_stats = compiled(kind, acm_cfg, impl)
        try:
          logits, state = with_stats(params, check)
          kmap = choices_by_acm(state)
          ref_logits, ref_state = reference(params, check, kmap)
          mean_k = mean_k_by_kind(state)
          r_real = mean_k_ratio(mean_k)
          ideal = ideal_ratio(acm_cfg, mean_k)
          gate_agree = gate_agreement(kmap, ref_state)
          err = relative_error(logits, ref_logits)
          if err > 0.05 or gate_agree < 0.99:  # timed all the same, and recorded as failed
            log(f"batch {batch} acm={kind} r={r} impl={impl}: BAD logits vs XLA at the same k {err:.3f}, "
                f"block-0 gates agree on {gate_agree:.4f} of tokens")
          widths = static_widths(acm_cfg, mean_k) if args.static else None
          static_fn, static_params = static_model(kind, acm_cfg, widths) if widths else (None, None)
          # dense, ACM and yardstick timed in alternating rounds: the host's dispatch speed drifts by
          # 5-15% between runs and within one, and at batch 1-8 the dispatch is most of a forward
          dense_s, tanh_s, acm_s, static_s = [], [], [], []
          if (kind, r) not in served:
            served[kind, r] = serving_params(params, args.layout)
          acm_params = served[kind, r]
          for _ in range(ROUNDS):
            dense_s.append(timed(dense_fn, served_dense_params, images, reps=10))
            if dense_tanh_fn:
              tanh_s.append(timed(dense_tanh_fn, served_dense_params, images, reps=10))
            acm_s.append(timed(fn, acm_params, images, reps=10))
            if static_fn:
              static_s.append(timed(static_fn, static_params, images, reps=10))
          ips = batch / float(np.median(acm_s))
          paired_dense_ips = batch / float(np.median(dense_s))
          baselines = {}
          if tanh_s:
            tanh_ips = batch / float(np.median(tanh_s))
            baselines = dict(dense_tanh_images_per_s=round(tanh_ips, 1), ratio_to_dense_tanh=round(ips / tanh_ips, 4))
          if static_s:
            static_ips = batch / float(np.median(static_s))
            baselines.update(static_widths=widths, static_images_per_s=round(static_ips, 1),
                             static_ratio_to_dense=round(static_ips / paired_dense_ips, 4))
        except Exception as err:  # e.g. jax-triton missing: record nothing, say why
          log(f"batch {batch} acm={kind} r={r} impl={impl}: FAILED {type(err).__name__}: {str(err)[:400]}")
          continue
        rec = dict(device=device, date=date, jax_version=jax.__version__, batch=batch, acm=kind, r=r,
                   r_measured=round(r_real, 4), impl=impl, attention=args.attention, images_per_s=round(ips, 1),
                   ratio_to_dense=round(ips / paired_dense_ips, 4), dense_images_per_s=round(paired_dense_ips, 1),
                   **baselines,
                   ideal_ratio=round(ideal, 4), logits_rel_err=err,
                   gate_agreement_block0=round(gate_agree, 5), check_passed=err <= 0.05 and gate_agree >= 0.99,
                   scanned=args.scan_blocks, xla_options=xla_options, acm_xla_options=acm_xla_options,
                   layout=args.layout,
                   patch_embed=vit.PATCH_EMBED, **fusions,
                   mgpu_down_min_tokens=acm_fused.MGPU_DOWN_MIN_TOKENS,
                   mgpu_down_kinds=list(acm_fused.MGPU_DOWN_KINDS), mgpu_down_tiles=dict(acm_fused.MGPU_DOWN_TILES),
                   mgpu_down_unsort=acm_fused.MGPU_DOWN_UNSORT,
                   mgpu_up_min_tokens=acm_fused.MGPU_UP_MIN_TOKENS, mgpu_up_tiles=dict(acm_fused.MGPU_UP_TILES),
                   mgpu_regions_min_tokens=acm_fused.MGPU_REGIONS_MIN_TOKENS,
                   mgpu_regions_max_tokens=acm_fused.MGPU_REGIONS_MAX_TOKENS)
        rec.update(target_verdict(rec, args.model))
        records.append(rec)
        log(f"batch {batch:4d} acm={kind:8s} r={r} (measured {r_real:.3f}) impl={impl:6s} {ips:9.1f} images/s "
            f"{ips / paired_dense_ips:.3f} x dense"
            + (f", {baselines['ratio_to_dense_tanh']:.3f} x dense with tanh GELU" if tanh_s else "")
            + (f", static width {baselines['static_ratio_to_dense']:.3f} x dense" if static_s else "")
            + f" (ideal {ideal:.2f}; logits vs XLA at the same k {err:.1e}; "
            f"block-0 gates agree {gate_agree:.4f})")

  gpu = gpu_name(device)
  results = Path(args.results_dir)
  results.mkdir(parents=True, exist_ok=True)
  path = results / f"vit_{gpu}.json"  # earlier runs' records are kept
  earlier = json.loads(path.read_text()) if path.exists() else []
  path.write_text(json.dumps(earlier + records, indent=1))
  lines = [f"\n## Whole {args.model}, ACM / dense images/s: {device}, {date}, jax {jax.__version__}\n",
           f"Command: `{command}`. {size}x{size}, bf16, random weights, gates set to pick k ~ Binomial(4, r); "
           "ideal = dense / ACM time if time followed the matmul FLOPs at the measured mean k/N"
           + ("; each cell: ACM / dense (erf GELU, the model's) and, after the slash, ACM / dense with GELU's "
              "tanh form (the form the kernels compute), same weights, timed in the same rounds" if args.dense_gelu_tanh
              else "")
           + ("; static = the static-width yardstick (the measured mean k for every token, XLA, no gate) / dense"
              if args.static else "") + ".\n",
           "| ACMized | r (target) | mean k/N | impl | " + " | ".join(f"batch {b}" for b in batches) + " |",
           "|---|---|---|---|" + "---|" * len(batches)]
  def cell(rec):
    tanh = f" / {rec['ratio_to_dense_tanh']:.2f}" if "ratio_to_dense_tanh" in rec else ""
    static = f", static {rec['static_ratio_to_dense']:.2f}" if "static_ratio_to_dense" in rec else ""
    return f"{rec['ratio_to_dense']:.2f}{tanh} (ideal {rec['ideal_ratio']:.2f}{static})"

  for kind, acm_cfg, r, _, _ in setups:
    for impl in args.impls.split(","):
      row = {rec["batch"]: rec for rec in records if rec["acm"] == kind and rec["r"] == r and rec["impl"] == impl}
      if not row:
        continue
      any_rec = next(iter(row.values()))
      cells = [cell(row[b]) if b in row else "failed" for b in batches]
      lines.append(f"| {kind} | {r} | {any_rec['r_measured']} | {impl} | " + " | ".join(cells) + " |")
  dense_rows = {rec["batch"]: rec for rec in records if rec["acm"] == "none"}
  lines.append("\nDense images/s: " + " / ".join(f"{dense_rows[b]['images_per_s']:.0f}" for b in batches) + " at batch "
               + " / ".join(map(str, batches)) + ".")
  if args.dense_gelu_tanh:
    lines.append("Dense with GELU's tanh form: " + " / ".join(f"{dense_rows[b]['images_per_s_gelu_tanh']:.0f}"
                                                               for b in batches) + " images/s.")
  lines += verdict_lines(records, batches)
  text = "\n".join(lines) + "\n"
  if not args.no_append:
    with open(Path(__file__).parent / "RESULTS.md", "a") as f:
      f.write(text)
  Path(os.environ.get("OUT", "."), "vit_table.md").write_text(text)
  log(text)


if __name__ == "__main__":
  main()
