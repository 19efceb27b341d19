"""What XLA made of the whole ViT forward: kernels and float32 activations in the optimised program (issue #21).

    python3 -m benchmarks.hlo_census [--batches 1,8] [--acm mlp,mlp_qkvo] \
        [--variant default --variant 'sum:DOWN_SPLIT_ROUNDING=consumers']
    python3 -m benchmarks.hlo_census --model tiny --impl xla --batches 2 --acm mlp --results-dir /tmp  # CPU smoke run

No timing: each model of `vit_bench.serving_forwards` (dense, and each --acm kind, gates set for --r) is
compiled per batch and per variant (`acm_fused` settings as `benchmarks.switch_ab` takes them; the first
variant is the baseline), and the optimised program's entry computation is counted:
- kernels: the top-level instructions that launch work (fusions, custom calls, copies, loops and conditionals),
  and the same by kind ("fusion:kLoop", "custom-call:__cublas$lt$matmul", "custom-call:__gpu$xla.gpu.triton" for
  the Pallas kernels, ...);
- f32 activations: outputs in float32 (of a fusion or custom call, tuple members included) with at least as many
  elements as the tokens times the model width. A bfloat16 model writes its activations in bfloat16; a float32
  one that size is a sum or a partial written at twice the bytes, which is how the split down launch's sum was
  found (benchmarks/RESULTS.md, 2026-12-06 (xiv)).
XLA forms command buffers after this program, on its thunk sequence; `dispatch_bench --variant
'dump:xla_dump_to=DIR'` dumps that.

Records go to `results/hlo_census_<gpu>.json` (earlier records kept) with the fields device, date, jax_version,
model_preset, impl, r, batch, variant, settings, model ("none" for dense, or the --acm kind), kernels,
kernels_by_kind, f32_activations, f32_activation_mb and kernels_over_dense (against the dense model of the same
batch).
"""

from __future__ import annotations

import argparse
import collections
import math
import re
from pathlib import Path

from acm_jax.vit import model as vit
from benchmarks import dispatch_bench as db
from benchmarks import switch_ab as sab
from benchmarks import vit_bench as vb

LAUNCHING = ("fusion", "custom-call", "copy", "while", "conditional", "sort", "scatter", "gather")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%\S+ = (\(.*?\)|\S+) ([a-z-]+)\((.*)$", re.M)
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def entry_computation(text: str) -> str:
  """The ENTRY computation of an HLO module's text; ValueError where there is none."""
  start = text.find("\nENTRY")
  if start < 0:
    raise ValueError("no ENTRY computation in the program text")
  end = text.find("\n}", start)
  return text[start:end if end >= 0 else len(text)]


def census(text: str, min_elements: int) -> dict:
  """{kernels, kernels_by_kind, f32_activations, f32_activation_mb} of an optimised HLO module's text:
  the entry computation's launching instructions (`LAUNCHING`), and their float32 outputs (arrays and
  tuple members) of at least `min_elements` elements."""
  by_kind = collections.Counter()
  f32_count, f32_bytes = 0, 0
  for shape, opcode, rest in _INSTRUCTION.findall(entry_computation(text)):
    if opcode not in LAUNCHING:
      continue
    kind = opcode
    if opcode == "fusion":
      found = re.search(r"kind=(k\w+)", rest)
      kind = f"fusion:{found.group(1) if found else '?'}"
    elif opcode == "custom-call":
      found = re.search(r'custom_call_target="([^"]+)"', rest)
      kind = f"custom-call:{found.group(1) if found else '?'}"
    by_kind[kind] += 1
    for dtype, dims in _ARRAY.findall(shape):
      elements = math.prod(int(d) for d in dims.split(",") if d)
      if dtype == "f32" and elements >= min_elements:
        f32_count += 1
        f32_bytes += 4 * elements
  return dict(kernels=sum(by_kind.values()), kernels_by_kind=dict(sorted(by_kind.items())),
              f32_activations=f32_count, f32_activation_mb=round(f32_bytes / 2**20, 3))


def measure(built: dict, images, batches, variants, tokens_per_image: int, dim: int) -> list[dict]:
  """One record per (batch, variant, model): `census` of the compiled forward (`switch_ab.compile_with`)."""
  records = []
  for batch in batches:
    x = images[:batch]
    for variant, settings in variants:
      rows = {}
      for name, (fn, params) in built.items():
        compiled, _ = sab.compile_with(settings, fn, params, x)
        rows[name] = dict(batch=batch, variant=variant, settings=sab._recordable(settings), model=name,
                          **census(compiled.as_text(), batch * tokens_per_image * dim))
        print(f"batch {batch} {variant} {name}: {rows[name]['kernels']} kernels, "
              f"{rows[name]['f32_activations']} float32 activations", flush=True)
      for rec in rows.values():
        rec["kernels_over_dense"] = round(rec["kernels"] / rows["none"]["kernels"], 4)
      records += rows.values()
  return records


def table(records: list[dict]) -> str:
  lines = ["| batch | variant | model | kernels | x dense | Pallas launches | float32 activations (MB) |",
           "|---|---|---|---|---|---|---|"]
  for rec in records:
    pallas = rec["kernels_by_kind"].get("custom-call:__gpu$xla.gpu.triton", 0)
    lines.append(f"| {rec['batch']} | {rec['variant']} | {rec['model']} | {rec['kernels']} | "
                 f"{rec['kernels_over_dense']:.3f} | {pallas} | {rec['f32_activations']} "
                 f"({rec['f32_activation_mb']:.1f}) |")
  return "\n".join(lines)


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  db.add_model_args(parser, batches=[1, 8], calls=None)
  parser.add_argument("--variant", action="append", default=None,
                      help="NAME[:SWITCH=VALUE;...] acm_fused settings, as benchmarks.switch_ab takes them "
                           "(repeatable; without any: one variant 'default')")
  parser.add_argument("--results-dir", default=str(Path(__file__).parent / "results"))
  args = parser.parse_args(argv)
  images = db.check_model_args(parser, args, "hlo_census")
  try:
    variants = tuple(sab.parse_variant(v) for v in args.variant) if args.variant else (("default", {}),)
  except ValueError as err:
    parser.error(str(err))
  if len({name for name, _ in variants}) != len(variants):
    parser.error(f"variant names must differ: {[name for name, _ in variants]}")
  cfg = vit.get_config(args.model)
  built = vb.serving_forwards(args.model, args.acm, args.impl, args.r, images[:1])
  records = measure(built, images, args.batches, variants, cfg.num_tokens, cfg.dim)
  return db.save_records(args, records, "hlo_census", table, "optimised programs, no timing")


if __name__ == "__main__":
  main()
