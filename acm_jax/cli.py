"""The one command-line driver of every model family: flags -> config -> phases -> eval.

`python -m experiments.vit_imagenet` and `python -m experiments.wav2vec2_commonvoice`
are `main("vit")` and `main("wav2vec2")`. Phases: pretrain (skipped with --init),
distill, gates, finetune, static, eval, all, and sweep (one finetuning per
--budgets from the same gates checkpoint). Every evaluated model's record goes to
its run directory's eval.json and, keyed by model name, into the work dir's
eval.json summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from acm_jax import compile_cache, registry, scan_outputs, sharding, xla_flags
from acm_jax.checkpoint_io import CheckpointError
from acm_jax.train import config as config_lib
from acm_jax.train import loop, phases

EVAL_MODELS = ("dense", "acm", "static")


def parse(family: registry.Family, argv: list[str] | None) -> tuple[argparse.Namespace, config_lib.ExperimentConfig]:
  parser = config_lib.ArgumentParser(
      description=family.description, formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=f"--init reads these checkpoint formats: {', '.join(family.checkpoint_formats)}")
  phases_text = ", ".join((*config_lib.PHASES, "sweep"))
  parser.add_argument("--phase", default="all", type=config_lib.choice_parser((*config_lib.PHASES, "sweep")),
                      metavar="PHASE", help=f"what to run; allowed: {phases_text}; default: all")
  parser.add_argument("--budgets", default="0.25,0.5,0.75", metavar="B1,B2,...",
                      help="comma-separated budgets in (0, 1] for --phase=sweep; default: %(default)s")
  parser.add_argument("--eval_models", default=None, metavar="M1,M2,...",
                      help=f"comma-separated subset of {', '.join(EVAL_MODELS)} for --phase=eval; "
                           "default: every finished one")
  parser.add_argument("--corruptions", default=None, metavar="all|C1,C2,...",
                      help="with --phase=eval, image models: evaluate under these ImageNet-C corruptions "
                           "(acm_jax/data/corruptions.py) into <workdir>/imagenet_c.json")
  parser.add_argument("--severities", default="1,2,3,4,5", metavar="S1,S2,...",
                      help="severities in 1..5 for --corruptions; default: %(default)s")
  parser.add_argument("--frost_pictures", default=None, metavar="DIR",
                      help="folder of ImageNet-C's frost pictures (frost1.png ... frost6.jpg) for frost on the "
                           "fly; default: those of an installed imagecorruptions package")
  models = (*family.model_presets, "from_init")
  config_lib.add_flags(parser, family.config_class, choices={"model": models})
  args = parser.parse_args(argv)
  return args, config_lib.from_flags(args, family.config_class())


def format_table(family: registry.Family, records: list[dict]) -> str:
  cols = family.columns
  lines = [f"{'model':<16} " + " ".join(f"{c.header:>{c.width}}" for c in cols)
           + f" {'compute':>8}  mean k per layer / share of k"]
  for r in records:
    compute = f"{r['compute_fraction']:.3f}" if "compute_fraction" in r else "1.000"
    cells = " ".join(f"{c.scale * r[c.key]:>{c.width - len(c.unit)}.{c.digits}f}{c.unit}" for c in cols)
    lines.append(f"{r['model']:<16} {cells} {compute:>8}")
    for path, mean_k in r.get("mean_k_per_layer", {}).items():
      share = " ".join(f"{s:.2f}" for s in r["k_share_per_layer"][path])
      lines.append(f"{'':<16}   {path:<24} k={mean_k:.2f}  [{share}]")
    for name, value in r.get("mean_k_per_group", {}).items():
      lines.append(f"{'':<16}   mean k on {name} {family.token_word}: {value:.2f}")
  return "\n".join(lines)


def write_summary(workdir: Path, records: list[dict]) -> None:
  """Adds the records, keyed by model name, to <workdir>/eval.json (earlier models stay)."""
  path = workdir / "eval.json"
  summary = {}
  if path.is_file():
    try:
      summary = json.loads(path.read_text())
    except ValueError:
      summary = {}
    if not isinstance(summary, dict) or "model" in summary:  # a single record of an older run
      summary = {}
  summary.update({r["model"]: r for r in records})
  phases.write_json(path, summary)


def load_model(exp: phases.Experiment, model: str) -> tuple[str, object, str, int | None, Path]:
  """(record name, params, eval mode, fixed k, run dir) of a finished "dense", "acm" or "static" run."""
  if model == "dense":
    return "dense", phases.dense_params(exp), "dense", None, exp.run_dir("pretrain")
  phase = "finetune" if model == "acm" else "static"
  params = phases.load_phase_params(exp, phase)
  if model == "acm":
    return f"acm_b{exp.config.budget:.2f}", params, "argmax", None, exp.run_dir(phase)
  k = exp.config.resolved_static_k
  return f"static_k{k}", params, "fixed", k, exp.run_dir(phase)


def evaluate_models(family: registry.Family, exp: phases.Experiment, models: list[str]) -> list[dict]:
  evaluate = family.evaluate or phases.evaluate
  records = []
  for model in models:
    name, params, mode, fixed_k, run_dir = load_model(exp, model)
    record = evaluate(exp, params, name, mode, fixed_k=fixed_k)
    if model == "dense" and family.check_dense is not None and loop.is_main_process():
      message = family.check_dense(record, exp.config)
      if message:
        print(message, file=sys.stderr, flush=True)
    phases.write_json(run_dir / "eval.json", record)
    records.append(record)
  write_summary(exp.workdir, records)
  return records


def evaluate_corruptions(family: registry.Family, exp: phases.Experiment, models: list[str], names,
                         severities, frost_dir: str | None = None) -> dict:
  """Top-1 per corruption and severity, mean and mCE of every model: <workdir>/imagenet_c.json."""
  from acm_jax.train import robustness
  loaded = [load_model(exp, m)[:4] for m in models]
  result = robustness.evaluate(exp, loaded, names, severities, family.evaluate or phases.evaluate, frost_dir)
  phases.write_json(exp.workdir / "imagenet_c.json", result)
  return result


def format_corruptions(result: dict) -> str:
  names = result["corruptions"]
  lines = [f"{'model':<16} {'mean':>6} {'mCE':>6}  " + " ".join(f"{c[:10]:>10}" for c in names)]
  for model, per in result["top1"].items():
    mce = result.get("ce", {}).get(model, {}).get("mCE")
    means = " ".join(f"{100 * sum(per[c].values()) / len(per[c]):>9.1f}%" for c in names)
    lines.append(f"{model:<16} {100 * result['mean_top1'][model]:>5.1f}% {'-' if mce is None else f'{100 * mce:.1f}':>6}"
                 f"  {means}")
  return "\n".join(lines)


def finished_models(exp: phases.Experiment) -> list[str]:
  found = []
  if exp.config.init is not None or loop.params_dir(exp.run_dir("pretrain")).exists():
    found.append("dense")
  if loop.params_dir(exp.run_dir("finetune")).exists():
    found.append("acm")
  if loop.params_dir(exp.run_dir("static")).exists():
    found.append("static")
  return found


def parse_budgets(text: str) -> list[float]:
  try:
    budgets = [float(b) for b in text.split(",")]
  except ValueError:
    raise ValueError(f"--budgets must be comma-separated numbers in (0, 1], got {text!r}") from None
  if not budgets or any(not 0.0 < b <= 1.0 for b in budgets):
    raise ValueError(f"--budgets must be comma-separated numbers in (0, 1], got {text!r}")
  return budgets


def sweep(family: registry.Family, exp: phases.Experiment, budgets: list[float]) -> list[dict]:
  """The accuracy-compute curve in one command: the shared phases (a finished one is
  only restored), one finetuning per budget from the same gates checkpoint, the static
  baseline, and the evaluation of each."""
  per_budget = [family.build(dataclasses.replace(exp.config, budget=b)) for b in budgets]
  if exp.config.init is None:
    phases.pretrain(exp)
  phases.distill(exp)
  phases.gates(exp)
  for acm_exp in per_budget:
    phases.finetune(acm_exp)
  phases.static(exp)
  acm_records = [record for acm_exp in per_budget for record in evaluate_models(family, acm_exp, ["acm"])]
  return evaluate_models(family, exp, ["dense"]) + acm_records + evaluate_models(family, exp, ["static"])


def describe(cfg: config_lib.ExperimentConfig) -> str:
  changed = cfg.non_default()
  flags = " ".join(f"--{k}={v}" for k, v in sorted(changed.items()) if k != "workdir") or "(all defaults)"
  return f"work dir: {Path(cfg.workdir).absolute()}\nconfig: {type(cfg).__name__} {flags}"


def run(family: registry.Family, args: argparse.Namespace, cfg: config_lib.ExperimentConfig) -> list[dict]:
  corrupted = None
  if args.corruptions is not None:
    if args.phase != "eval" or family.name != "vit":
      raise ValueError(f"--corruptions goes with --phase=eval of an image model, got --phase={args.phase} "
                       f"of {family.name}")
    from acm_jax.data import corruptions
    corrupted = corruptions.parse(args.corruptions, args.severities)
  # multi-process runs start jax.distributed before anything touches a device (the cache's backend
  # check does); family.build's own call is then a no-op
  sharding.initialize_distributed(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
  cache = compile_cache.enable(cfg.compilation_cache)  # before the first compile
  if cache and loop.is_main_process():
    print(f"compilation cache: {cache}", flush=True)
  exp = family.build(cfg)  # validates config, checkpoint and data before any work
  scan_outputs.enable_for_process()  # one GPU: scans' stacked outputs allocated unfilled (see the module)
  if corrupted is not None:
    from acm_jax.train import robustness
    for name in corrupted[0]:  # every source is checked before any evaluation
      for severity in corrupted[1]:
        robustness.corrupted_experiment(exp, name, severity, args.frost_pictures)
  if args.eval_models is not None:
    bad = [m for m in args.eval_models.split(",") if m not in EVAL_MODELS]
    if bad:
      raise ValueError(f"--eval_models: unknown {bad}; expected a subset of {EVAL_MODELS}")
  budgets = parse_budgets(args.budgets) if args.phase == "sweep" else None
  if loop.is_main_process():
    print(describe(cfg), flush=True)
  tic = time.time()
  records: list[dict] = []
  if args.phase == "all":
    if cfg.init is None:
      phases.pretrain(exp)
    records = evaluate_models(family, exp, ["dense"])  # first: a model that has not learned is worth a warning now
    for phase in (phases.distill, phases.gates, phases.finetune, phases.static):
      phase(exp)
    records += evaluate_models(family, exp, ["acm", "static"])
  elif args.phase == "sweep":
    records = sweep(family, exp, budgets)
  elif args.phase == "eval":
    models = args.eval_models.split(",") if args.eval_models else finished_models(exp)
    if not models:
      raise FileNotFoundError(f"nothing to evaluate in {exp.workdir}: no finished pretrain, finetune or "
                              "static run (and no --init)")
    if corrupted is not None:
      result = evaluate_corruptions(family, exp, models, *corrupted, args.frost_pictures)
      if loop.is_main_process():
        print(format_corruptions(result))
    else:
      records = evaluate_models(family, exp, models)
  else:
    if args.phase == "pretrain" and cfg.init is not None:
      raise ValueError("--phase=pretrain trains a dense model from scratch; drop --init or start at distill")
    getattr(phases, args.phase)(exp)
  if records and loop.is_main_process():
    print(format_table(family, records))
    print(f"done in {(time.time() - tic) / 60:.1f} min; results in {exp.workdir}")
  return records


def main(family_name: str, argv: list[str] | None = None) -> int:
  xla_flags.host_memory_defaults()  # before JAX starts its GPU client
  family = registry.get(family_name)
  try:
    args, cfg = parse(family, argv)
  except SystemExit as e:  # --help, or a bad flag (argparse printed the one-line error)
    return e.code if isinstance(e.code, int) else 2
  try:
    with loop.stop_signals():  # SIGTERM or Ctrl-C: save the step, exit 75 or 130
      run(family, args, cfg)
  except loop.Stopped as stop:
    return stop.status
  except (ValueError, FileNotFoundError, KeyError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    return 130
  return 0


def main_vit() -> int:  # the acm-jax-vit console script
  return main("vit", sys.argv[1:])


def main_wav2vec2() -> int:  # the acm-jax-wav2vec2 console script
  return main("wav2vec2", sys.argv[1:])
