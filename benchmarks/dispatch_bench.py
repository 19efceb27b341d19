"""Host dispatch against device time for whole ViT forwards at serving batches (issue #21).

    python3 -m benchmarks.dispatch_bench [--batches 1,8] [--acm mlp,mlp_qkvo] [--rounds 5] [--calls 20]
                                         [--variant NAME:OPTION=VALUE;...] [--layouts tree,packed,flat]

`vit_bench` times a forward as one waited call: `jax.block_until_ready(forward(params, images))`.
At batches 1 to 8 that wall time is much more than the kernels' time, and this script splits it.
For the dense ViT and each ACM configuration (r = 0.5, gates set as `vit_bench` sets them), per call:
- dispatch_ms: until the jitted call returns (the host flattens the parameters and runs XLA's
  thunks: launches, command-buffer updates);
- sync_ms: until its result is ready (what `vit_bench` times);
- pipelined_ms: per call, over `calls` calls queued back to back and waited for once (the rate
  when a server keeps requests in flight).
The models are timed in alternating rounds, and each record carries the median over rounds of each
round's median. XLA_FLAGS are read from the environment; a record carries them. `--variant
NAME:OPTION=VALUE;...` compiles every model a second (third, ...) time with those XLA compile options
(DebugOptions fields, e.g. `graphs_off:xla_gpu_enable_command_buffer=`), timed in the same rounds, so
that such a setting is A/B'd in one process; the first variant is the baseline (`default`, no options,
unless given). Each model's logits at one input are returned by two calls to check that the
forward is repeatable within the process (`repeatable`), and `logits_sha1` (of the first call's float32 logits)
lets two processes, or two variants, be compared for bitwise agreement.
`--layouts` times every model with its parameters in each of `vit_bench.serving_params`' layouts (the
first is the baseline of sync_over_first_layout): "tree" as Flax keeps them, "packed" with the small
leaves in one array per dtype (`acm_jax.serving`), "flat" with every leaf in one.
Records go to `results/dispatch_<gpu>.json` with the fields device, date, jax_version, xla_flags,
model_preset, impl, r, batch, variant, compiler_options, layout, model ("none" for dense, or the --acm kind),
num_leaves (parameter arrays the call takes), arrays_only_dispatch_ms (the dispatch of a jitted function
that takes the same parameters and images, passes every array to its executable and only adds 1 to the
images: what the arrays alone cost the host), dispatch_ms, sync_ms, pipelined_ms, dispatch_over_dense,
sync_over_dense, pipelined_over_dense (against the dense model of the same variant), sync_over_baseline
(against the same model under the first variant), sync_over_first_layout, repeatable and logits_sha1.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from acm_jax.vit import model as vit
from benchmarks import gpu_name
from benchmarks import train_bench as tb
from benchmarks import vit_bench as vb


def time_calls(fn, args, calls: int) -> dict:
  """Medians over `calls` waited calls of the dispatch and sync times, and the per-call time of
  `calls` queued calls (milliseconds)."""
  dispatch, sync = [], []
  for _ in range(calls):
    t0 = time.perf_counter()
    out = fn(*args)
    t1 = time.perf_counter()
    jax.block_until_ready(out)
    t2 = time.perf_counter()
    dispatch.append(t1 - t0)
    sync.append(t2 - t0)
  t0 = time.perf_counter()
  for _ in range(calls):
    out = fn(*args)
  jax.block_until_ready(out)
  pipelined = (time.perf_counter() - t0) / calls
  return {"dispatch_ms": float(np.median(dispatch)) * 1e3, "sync_ms": float(np.median(sync)) * 1e3,
          "pipelined_ms": pipelined * 1e3}


def parse_variant(text: str) -> tuple[str, dict]:
  """"NAME:OPTION=VALUE;OPTION=VALUE" -> (NAME, {OPTION: VALUE}) (values typed as `vit_bench.parse_xla_options`
  types them); "NAME" alone has no options."""
  name, _, rest = text.partition(":")
  if not name:
    raise ValueError(f"a variant needs a name before ':', got {text!r}")
  try:
    return name, vb.parse_xla_options(filter(None, rest.split(";")))
  except ValueError as err:
    raise ValueError(f"variant {name!r}: {err}") from None


def measure(built: dict, images, batches, rounds: int, calls: int, variants=(("default", {}),)) -> list[dict]:
  """One record per (batch, variant, layout, model): the medians over `rounds` alternating rounds. built:
  {(layout, model): (jitted forward, parameters in that layout)}."""
  records = []
  for batch in batches:
    x = images[:batch]
    # the same arguments into a function that only adds 1 to the images, every array passed to its executable:
    # what the parameter arrays alone cost the host
    trivial = {key: jax.jit(lambda p, x: x + 1, keep_unused=True).lower(params, x).compile()
               for key, (_, params) in built.items()}
    compiled = {(variant, *key): (fn.lower(params, x).compile(compiler_options=options or None), params)
                for variant, options in variants for key, (fn, params) in built.items()}
    for _ in range(3):  # warm up
      for key, (_, params) in built.items():
        jax.block_until_ready(trivial[key](params, x))
      for run, params in compiled.values():
        jax.block_until_ready(run(params, x))
    samples = {key: [] for key in compiled}
    arrays_only = {key: [] for key in built}
    for _ in range(rounds):
      for key, (run, params) in compiled.items():
        samples[key].append(time_calls(run, (params, x), calls))
      for key, (_, params) in built.items():
        arrays_only[key].append(time_calls(trivial[key], (params, x), calls))
    batch_records = {}
    for (variant, layout, name), (run, params) in compiled.items():
      med = {key: round(float(np.median([s[key] for s in samples[variant, layout, name]])), 4)
             for key in ("dispatch_ms", "sync_ms", "pipelined_ms")}
      first, second = (np.asarray(run(params, x), np.float32) for _ in range(2))
      batch_records[variant, layout, name] = dict(
          batch=batch, variant=variant, compiler_options=dict(variants)[variant], layout=layout, model=name,
          num_leaves=len(jax.tree.leaves(params)), **med,
          arrays_only_dispatch_ms=round(float(np.median([s["dispatch_ms"] for s in arrays_only[layout, name]])), 4),
          repeatable=bool(np.array_equal(first, second)), logits_sha1=hashlib.sha1(first.tobytes()).hexdigest())
    baseline = variants[0][0]
    first_layout = next(iter(built))[0]
    for (variant, layout, name), rec in batch_records.items():
      dense = batch_records[variant, layout, "none"]
      for key in ("dispatch", "sync", "pipelined"):
        rec[f"{key}_over_dense"] = round(rec[f"{key}_ms"] / dense[f"{key}_ms"], 4)
      rec["sync_over_baseline"] = round(rec["sync_ms"] / batch_records[baseline, layout, name]["sync_ms"], 4)
      rec["sync_over_first_layout"] = round(rec["sync_ms"] / batch_records[variant, first_layout, name]["sync_ms"], 4)
      records.append(rec)
  return records


def table(records: list[dict]) -> str:
  lines = ["| batch | variant | layout | model | arrays | arrays-only dispatch ms | dispatch ms | sync ms | "
           "pipelined ms | sync / dense | sync / baseline | sync / first layout | repeatable |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for rec in records:
    lines.append(f"| {rec['batch']} | {rec['variant']} | {rec['layout']} | {rec['model']} | {rec['num_leaves']} | "
                 f"{rec['arrays_only_dispatch_ms']:.3f} | "
                 f"{rec['dispatch_ms']:.3f} | {rec['sync_ms']:.3f} | {rec['pipelined_ms']:.3f} | "
                 f"{rec['sync_over_dense']:.3f} | {rec['sync_over_baseline']:.3f} | "
                 f"{rec['sync_over_first_layout']:.3f} | {rec['repeatable']} |")
  return "\n".join(lines)


def add_model_args(parser: argparse.ArgumentParser, batches: list[int], calls: int | None) -> None:
  """The flags of a script that times the dense ViT and ACM configurations in rounds of waited calls (this one,
  `embed_ab`): --model, --batches, --acm, --impl, --r, --rounds, --calls (the last two not where calls is None:
  a script that only compiles them, `hlo_census`)."""
  parser.add_argument("--model", default="vit_b16", choices=("tiny", "vit_s16", "vit_b16", "vit_l16"),
                      help="the ViT preset (tiny with --impl xla runs on a CPU: a smoke run of the script)")
  parser.add_argument("--batches", type=tb._ints, default=batches)
  parser.add_argument("--acm", type=tb._list(tuple(vb.ACM_KINDS)), default=["mlp", "mlp_qkvo"])
  parser.add_argument("--impl", default="pallas", choices=("auto", "pallas", "triton", "xla"))
  parser.add_argument("--r", type=float, default=0.5, help="the gates' target k/N")
  if calls is not None:
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=calls, help="calls per model and round")


def check_model_args(parser: argparse.ArgumentParser, args, script: str) -> jax.Array:
  """Refuses bad `add_model_args` values by name (and the kernels off a GPU); returns the images to time,
  (largest batch, size, size, 3) in bfloat16. --rounds and --calls are checked where the script has them."""
  counts = {f"--{name}": getattr(args, name) for name in ("rounds", "calls") if hasattr(args, name)}
  counts["--batches"] = min(args.batches)
  if min(counts.values()) < 1 or not 0 < args.r <= 1:
    parser.error(f"{', '.join(counts)} must be >= 1 and --r in (0, 1]; got {list(counts.values())}, {args.r}")
  if jax.default_backend() != "gpu" and args.impl != "xla":
    sys.exit(f"{script} runs the ACM kernels on a GPU only (backend here: {jax.default_backend()!r}); "
             "only --impl xla runs elsewhere")
  size = vit.get_config(args.model).image_size
  return jax.random.normal(jax.random.key(0), (max(args.batches), size, size, 3), jnp.bfloat16)


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_args(parser, batches=[1, 8], calls=20)
  parser.add_argument("--variant", action="append", default=None,
                      help="NAME:OPTION=VALUE;... XLA compile options for every model (repeatable; the first is "
                           "the baseline; without any: one variant 'default' with no options)")
  parser.add_argument("--layouts", type=tb._list(tuple(vb.LAYOUTS)), default=["tree"],
                      help="parameter layouts to time every model in (vit_bench.serving_params; the first is the "
                           "baseline of sync_over_first_layout): tree, packed (small leaves in one array per dtype), "
                           "flat (every leaf)")
  parser.add_argument("--results-dir", default=str(Path(__file__).parent / "results"))
  args = parser.parse_args(argv)
  try:
    variants = tuple(parse_variant(v) for v in args.variant) if args.variant else (("default", {}),)
  except ValueError as err:
    parser.error(str(err))
  if len({name for name, _ in variants}) != len(variants):
    parser.error(f"variant names must differ: {[name for name, _ in variants]}")
  images = check_model_args(parser, args, "dispatch_bench")
  built = {}
  for layout in args.layouts:
    forwards = vb.serving_forwards(args.model, args.acm, args.impl, args.r, images[:1], layout)
    built.update({(layout, kind): forward for kind, forward in forwards.items()})
  records = measure(built, images, args.batches, args.rounds, args.calls, variants)
  xla_flags = os.environ.get("XLA_FLAGS", "")
  return save_records(args, records, "dispatch", table, f"XLA_FLAGS={xla_flags!r}", xla_flags=xla_flags)


def save_records(args, records: list[dict], stem: str, table_fn, summary: str, **fields) -> list[dict]:
  """`records` with the run's header (device, date, jax_version, `fields`, model_preset, impl, r), printed as
  `table_fn` draws them (with the rounds and calls, where `args` has them) and appended to
  `results/<stem>_<gpu>.json`."""
  device = jax.devices()[0].device_kind
  header = dict(device=device, date=datetime.date.today().isoformat(), jax_version=jax.__version__, **fields,
                model_preset=args.model, impl=args.impl, r=args.r)
  records = [{**header, **rec} for rec in records]
  timing = f"; {args.rounds} rounds of {args.calls} calls, medians" if hasattr(args, "rounds") else ""
  print(f"\n{args.model}, {device}, jax {jax.__version__}, {summary}{timing}\n\n{table_fn(records)}\n")
  tb.append(Path(args.results_dir) / f"{stem}_{gpu_name(device)}.json", records)
  return records


if __name__ == "__main__":
  main()
