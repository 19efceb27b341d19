"""Same-process A/B of `pallas_kernels.acm_fused` switch settings on the whole ViT.

    python3 -m benchmarks.switch_ab --acm mlp --batches 256,32 --r 0.5 \
        --variant default \
        --variant "mosaic_unsort:MGPU_DOWN_MIN_TOKENS=4096;MGPU_DOWN_KINDS=mlp;MGPU_DOWN_UNSORT=kernel"
    python3 -m benchmarks.switch_ab --model tiny --batches 2 --variant default \
        --variant "split:DOWN_SPLIT_MAX_TOKENS=8192"  # CPU smoke run (the XLA path: every variant the same)

`acm_fused`'s switches are module settings read when a forward is traced, so two settings can live
in one process: each variant's forward is traced and compiled with its settings in place, then the
settings are put back. The variants and the dense model are then timed in alternating rounds (as
`vit_bench` times dense and ACM), so they see the same drift of the host's dispatch speed. Between
two processes the ratios of one setting move by up to 0.03, which is the size of the effects these
switches have; within one process the spread of the rounds is recorded.

An item TUNED@BUCKET/KIND={JSON object} changes one entry of the tuned tile table instead, e.g.
`--variant 'proj32:TUNED@512/proj={"block_k_down": 32}'` (BUCKET: a `TOKEN_BUCKETS` bound or none).

The first `--variant` is the baseline. A variant whose compiled program is the same text as the
baseline's (the switch does not apply at that token count) is recorded as such and not timed.
Correctness: each timed variant's logits are compared with the XLA path run at the choices k that
variant's gates made (`vit_bench.forced_reference`), on the timed batch itself, so the check sees the
token count the switch acts on; more than 5% of the largest logit is reported as bad. The logits are
also compared with the baseline's without forcing k (`rel_err_vs_baseline`): a last-bit change in one
layer moves later gates across near-ties, which a random network amplifies (0.2-0.8 of the largest
logit at 1,576 tokens or more), so that figure measures drift, not correctness.

Records go to `results/switch_ab_<gpu>.json` (earlier records kept) with the fields device, date,
jax_version, model, batch, acm, r, variant, settings, images_per_s, ratio_to_dense, ratio_to_baseline,
rel_err_at_same_k, rel_err_vs_baseline, same_program_as_baseline and round_ms.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from acm_jax.vit import model as vit
from benchmarks import gpu_name
from benchmarks import vit_bench as vb
from pallas_kernels import acm_fused

ROUNDS = 7  # alternating timing rounds of 10 calls per model


def _switch_value(name: str, text: str):
  """The value of acm_fused.`name` written as `text`, typed as the setting's current value: an
  integer or "none" for thresholds, names joined by "+" for tuples, JSON for dicts, one of the
  listed choices (`name + "S"`) for strings."""
  current = getattr(acm_fused, name)
  if isinstance(current, tuple):
    return tuple(filter(None, text.split("+")))
  if isinstance(current, dict):
    value = json.loads(text)
    if not isinstance(value, dict):
      raise ValueError(f"{name} takes a JSON object, got {text!r}")
    return value
  if isinstance(current, str):
    choices = getattr(acm_fused, name + "S", None)
    if choices is not None and text not in choices:
      raise ValueError(f"{name} takes one of {choices}, got {text!r}")
    return text
  if text.lower() == "none":
    return None
  return int(text)


def _tuned_entry(table: dict, switch: str, text: str, name: str) -> dict:
  """A copy of the tuned table with the entry TUNED@BUCKET/KIND (BUCKET a token bucket or "none", KIND "mlp"
  or "proj") updated by the JSON object `text` (e.g. {"block_k_down": 32})."""
  bucket, _, kind = switch[len("TUNED@"):].partition("/")
  buckets = {str(b).lower(): b for b in acm_fused.TOKEN_BUCKETS}
  try:
    update = json.loads(text)
  except json.JSONDecodeError:
    update = None
  if bucket.lower() not in buckets or kind not in ("mlp", "proj") or not isinstance(update, dict):
    raise ValueError(f"variant {name!r}: bad item {switch}={text}; expected TUNED@BUCKET/KIND={{JSON object}} with "
                     f"BUCKET one of {[str(b).lower() for b in acm_fused.TOKEN_BUCKETS]} and KIND mlp or proj")
  key = (buckets[bucket.lower()], kind)
  return {**table, key: {**table.get(key, {}), **update}}


def parse_variant(spec: str) -> tuple[str, dict]:
  """NAME or NAME:SWITCH=VALUE;SWITCH=VALUE... -> (name, {switch: value}); ValueError naming the bad part.
  TUNED@BUCKET/KIND={JSON} changes one entry of the tuned tile table (`_tuned_entry`)."""
  name, _, body = spec.partition(":")
  if not name or not name.replace("_", "").replace("-", "").isalnum():
    raise ValueError(f"variant {spec!r}: expected NAME[:SWITCH=VALUE;...] with a plain NAME")
  settings = {}
  for item in filter(None, body.split(";")):
    switch, eq, text = item.partition("=")
    switch = switch.strip()
    if switch.startswith("TUNED@"):
      settings["TUNED"] = _tuned_entry(settings.get("TUNED", acm_fused.TUNED), switch, text, name)
      continue
    if switch == "TUNED":
      raise ValueError(f"variant {name!r}: the tuned table changes one entry at a time: "
                       'TUNED@BUCKET/KIND={"block_k_down": 32}')
    if not eq or not switch.isupper() or not hasattr(acm_fused, switch) or callable(getattr(acm_fused, switch)):
      raise ValueError(f"variant {name!r}: bad item {item!r}; expected SWITCH=VALUE with SWITCH a setting of "
                       "pallas_kernels.acm_fused (e.g. DOWN_SPLIT_MAX_TOKENS=8192)")
    try:
      settings[switch] = _switch_value(switch, text.strip())
    except ValueError as err:
      raise ValueError(f"variant {name!r}: {err}") from None
  return name, settings


def _recordable(settings: dict) -> dict:
  """Settings as JSON holds them: tuples as lists, the tuned table as its changed entries keyed "BUCKET/KIND"."""
  out = {}
  for name, value in settings.items():
    if name == "TUNED":
      committed = vb.tuned_tiles()
      value = {key: entry for key, entry in vb.tuned_tiles(value).items() if committed.get(key) != entry}
    out[name] = list(value) if isinstance(value, tuple) else value
  return out


@contextlib.contextmanager
def settings_applied(settings: dict):
  """Within the block, acm_fused's module settings `settings` ({name: value}) are in place; restored after.
  The kernels read them when a function is traced, so trace inside the block."""
  saved = {name: getattr(acm_fused, name) for name in settings}
  try:
    for name, value in settings.items():
      setattr(acm_fused, name, value)
    yield
  finally:
    for name, value in saved.items():
      setattr(acm_fused, name, value)


def compile_with(settings: dict, fn, *args):
  """`fn` jitted, traced and compiled for `args` with acm_fused's `settings` in place; restores them.
  Returns (compiled, program text). `fn` is wrapped in a new function for each call: jit caches a
  trace by the function it is given, and a cached trace would keep the settings it was traced with."""
  with settings_applied(settings):
    lowered = jax.jit(lambda *a: fn(*a)).lower(*args)
    return lowered.compile(), lowered.as_text()


def same_k_error(with_stats, reference, params, x) -> float:
  """Relative error of a variant's logits against the XLA path forced to the choices its own gates
  made: `with_stats` returns (logits, sown "acm" collection), `reference(params, x, kmap)` (logits, _)."""
  logits, state = with_stats(params, x)
  ref, _ = reference(params, x, vb.choices_by_acm(state))
  return vb.relative_error(logits, ref)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="vit_b16", choices=("tiny", "vit_s16", "vit_b16", "vit_l16"))
  parser.add_argument("--acm", default="mlp", choices=sorted(vb.ACM_KINDS))
  parser.add_argument("--batches", default="256,32", help="comma list of batch sizes")
  parser.add_argument("--r", type=float, default=0.5, help="the gates' target k/N")
  parser.add_argument("--variant", action="append", required=True,
                      help="NAME[:SWITCH=VALUE;...] (repeat; the first is the baseline)")
  parser.add_argument("--rounds", type=int, default=ROUNDS)
  parser.add_argument("--results-dir", default=str(Path(__file__).parent / "results"))
  args = parser.parse_args(argv)
  try:
    variants = [parse_variant(spec) for spec in args.variant]
    batches = [int(b) for b in args.batches.split(",")]
  except ValueError as err:
    sys.exit(str(err))
  names = [name for name, _ in variants]
  if len(set(names)) != len(names) or any(b < 1 for b in batches) or not 0 < args.r <= 1 or args.rounds < 1:
    sys.exit(f"variant names must differ (got {names}), batches be >= 1 (got {batches}), "
             f"0 < --r <= 1 (got {args.r}) and --rounds >= 1 (got {args.rounds})")

  dense_cfg = vit.get_config(args.model)
  dense = vit.ViT(dense_cfg)
  size = dense_cfg.image_size
  images = jax.random.normal(jax.random.key(0), (max(batches), size, size, 3), jnp.bfloat16)
  dense_params = vb.bf16_params(dense, images[:1])
  acm_cfg = vb.acm_config(dense_cfg, args.acm)
  model = vit.ViT(acm_cfg)
  params = vb.set_gates(vb.bf16_params(model, images[:1]), vb.NUM_LEARNERS, args.r, acm_cfg.dim, seed=2)
  device = jax.devices()[0].device_kind
  date = datetime.date.today().isoformat()
  results = Path(args.results_dir)
  results.mkdir(parents=True, exist_ok=True)
  path = results / f"switch_ab_{gpu_name(device)}.json"
  records = json.loads(path.read_text()) if path.exists() else []
  dense_forward = lambda p, x: dense.apply({"params": p}, x)
  acm_forward = lambda p, x: model.apply({"params": p}, x)
  acm_with_stats = lambda p, x: model.apply({"params": p}, x, mutable=["acm"])
  xla_model = vit.ViT(dataclasses.replace(acm_cfg, acm=dataclasses.replace(acm_cfg.acm, impl="xla")))
  reference = jax.jit(functools.partial(vb.forced_reference, xla_model))
  lines = [f"| batch | variant | x dense | x {names[0]} | err. at same k | drift vs {names[0]} | rounds (ms) |",
           "|---|---|---|---|---|---|---|"]
  for batch in batches:
    x = images[:batch]
    dense_fn, _ = compile_with({}, dense_forward, dense_params, x)
    compiled, texts = {}, {}
    for name, settings in variants:
      compiled[name], texts[name] = compile_with(settings, acm_forward, params, x)
    base = names[0]
    timed = [name for name in names if name == base or texts[name] != texts[base]]
    ref = compiled[base](params, x)
    drift = {name: vb.relative_error(compiled[name](params, x), ref) for name in timed}
    errs = {name: same_k_error(compile_with(dict(variants)[name], acm_with_stats, params, x)[0], reference,
                               params, x) for name in timed}
    rounds = {name: [] for name in ["dense", *timed]}
    for _ in range(args.rounds):
      rounds["dense"].append(vb.timed(dense_fn, dense_params, x, reps=10))
      for name in timed:
        rounds[name].append(vb.timed(compiled[name], params, x, reps=10))
    median = {name: float(np.median(samples)) for name, samples in rounds.items()}
    for name, settings in variants:
      same = name not in timed
      rec = dict(device=device, date=date, jax_version=jax.__version__, model=args.model, batch=batch, acm=args.acm,
                 r=args.r, variant=name, settings=_recordable(settings),
                 same_program_as_baseline=same)
      if not same:
        rec.update(images_per_s=round(batch / median[name], 1), ratio_to_dense=round(median["dense"] / median[name], 4),
                   ratio_to_baseline=round(median[base] / median[name], 4), rel_err_at_same_k=errs[name],
                   rel_err_vs_baseline=drift[name],
                   dense_images_per_s=round(batch / median["dense"], 1),
                   round_ms=[round(t * 1e3, 4) for t in rounds[name]])
        if errs[name] > 0.05:
          vb.log(f"batch {batch} {name}: BAD logits vs XLA at the same k: relative error {errs[name]:.3f}")
        spread = f"{min(rounds[name]) * 1e3:.3f}-{max(rounds[name]) * 1e3:.3f}"
        lines.append(f"| {batch} | {name} | {rec['ratio_to_dense']:.3f} | {rec['ratio_to_baseline']:.3f} | "
                     f"{errs[name]:.1e} | {drift[name]:.1e} | {spread} |")
      else:
        lines.append(f"| {batch} | {name} | same program as {base} | | | | |")
      records.append(rec)
    vb.log(f"batch {batch} done: dense {batch / median['dense']:.1f} images/s")
    path.write_text(json.dumps(records, indent=1))  # after every batch: a cut-off run keeps what it timed
  text = (f"\n{args.model}, acm={args.acm}, r={args.r}, {device}, {date}, jax {jax.__version__}; "
          f"{args.rounds} alternating rounds of 10 calls, medians\n\n" + "\n".join(lines) + "\n")
  Path(os.environ.get("OUT", "."), "switch_ab_table.md").write_text(text)
  vb.log(text)


if __name__ == "__main__":
  main()
