"""ACMize a Vision Transformer: pretrain (or --init), distill, gates, finetune, eval.

Embedded default (no download, CPU):  python -m experiments.vit_imagenet --phase=all
Accuracy-compute curve (one ACM per budget from the same gates checkpoint):
                                      python -m experiments.vit_imagenet --phase=sweep --budgets=0.25,0.5,0.75
ImageNet with a pretrained ViT-B/16:  python -m experiments.vit_imagenet --phase=all \
    --dataset=tfds:imagenet2012 --data_dir=$TFDS_DIR --model=vit_b16 --init=ckpt.npz ...
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from acm_jax.train import config as config_lib
from acm_jax.train import phases
from acm_jax.vit import task as vit_task

EVAL_MODELS = ("dense", "acm", "static")


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, config_lib.ExperimentConfig]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--phase", default="all", choices=(*config_lib.PHASES, "sweep"))
  parser.add_argument("--budgets", default="0.25,0.5,0.75",
                      help="comma-separated budgets for --phase=sweep (default: %(default)s)")
  parser.add_argument("--eval_models", default=None,
                      help=f"comma-separated subset of {EVAL_MODELS} for --phase=eval (default: every finished one)")
  config_lib.add_flags(parser)
  args = parser.parse_args(argv)
  return args, config_lib.from_flags(args, config_lib.ExperimentConfig())


def format_table(records: list[dict]) -> str:
  lines = [f"{'model':<16} {'top-1':>7} {'GFLOPs/img':>11} {'compute':>8}  mean k per layer / share of k"]
  for r in records:
    compute = f"{r['compute_fraction']:.3f}" if "compute_fraction" in r else "1.000"
    lines.append(f"{r['model']:<16} {100 * r['top1']:>6.2f}% {r['gflops_per_image']:>11.4f} {compute:>8}")
    for path, mean_k in r.get("mean_k_per_layer", {}).items():
      share = " ".join(f"{s:.2f}" for s in r["k_share_per_layer"][path])
      lines.append(f"{'':<16}   {path:<24} k={mean_k:.2f}  [{share}]")
    for name, value in r.get("mean_k_per_group", {}).items():
      lines.append(f"{'':<16}   mean k on {name} tokens: {value:.2f}")
  return "\n".join(lines)


def evaluate_models(exp: phases.Experiment, models: list[str]) -> list[dict]:
  records = []
  for model in models:
    if model == "dense":
      params = phases.dense_params(exp)
      record = phases.evaluate(exp, params, "dense", "dense")
      run_dir = exp.run_dir("pretrain")
    else:
      phase = "finetune" if model == "acm" else "static"
      params = phases.loop.load_params(exp.run_dir(phase), phases.abstract_params(exp, "acm"), f"{phase} phase")
      if model == "acm":
        record = phases.evaluate(exp, params, f"acm_b{exp.config.budget:.2f}", "argmax")
      else:
        k = exp.config.resolved_static_k
        record = phases.evaluate(exp, params, f"static_k{k}", "fixed", fixed_k=k)
      run_dir = exp.run_dir(phase)
    phases.write_json(run_dir / "eval.json", record)
    phases.write_json(exp.workdir / "eval.json", record)
    records.append(record)
  return records


def finished_models(exp: phases.Experiment) -> list[str]:
  found = []
  if exp.config.init is not None or phases.loop.params_dir(exp.run_dir("pretrain")).exists():
    found.append("dense")
  if phases.loop.params_dir(exp.run_dir("finetune")).exists():
    found.append("acm")
  if phases.loop.params_dir(exp.run_dir("static")).exists():
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


def sweep(exp: phases.Experiment, budgets: list[float]) -> list[dict]:
  """The accuracy-compute curve in one command: the shared phases (a finished one is
  only restored), one finetuning per budget from the same gates checkpoint, the static
  baseline, and the evaluation of each."""
  per_budget = [vit_task.build(dataclasses.replace(exp.config, budget=b)) for b in budgets]
  if exp.config.init is None:
    phases.pretrain(exp)
  phases.distill(exp)
  phases.gates(exp)
  for acm_exp in per_budget:
    phases.finetune(acm_exp)
  phases.static(exp)
  acm_records = [record for acm_exp in per_budget for record in evaluate_models(acm_exp, ["acm"])]
  return evaluate_models(exp, ["dense"]) + acm_records + evaluate_models(exp, ["static"])


def run(args: argparse.Namespace, cfg: config_lib.ExperimentConfig) -> list[dict]:
  exp = vit_task.build(cfg)  # validates everything before any work
  if args.eval_models is not None:
    bad = [m for m in args.eval_models.split(",") if m not in EVAL_MODELS]
    if bad:
      raise ValueError(f"--eval_models: unknown {bad}; expected a subset of {EVAL_MODELS}")
  tic = time.time()
  records: list[dict] = []
  if args.phase == "all":
    if cfg.init is None:
      phases.pretrain(exp)
    for phase in (phases.distill, phases.gates, phases.finetune, phases.static):
      phase(exp)
    records = evaluate_models(exp, ["dense", "acm", "static"])
  elif args.phase == "sweep":
    records = sweep(exp, parse_budgets(args.budgets))
  elif args.phase == "eval":
    models = args.eval_models.split(",") if args.eval_models else finished_models(exp)
    if not models:
      raise FileNotFoundError(f"nothing to evaluate in {exp.workdir}: no finished pretrain, finetune or "
                              "static run (and no --init)")
    records = evaluate_models(exp, models)
  else:
    if args.phase == "pretrain" and cfg.init is not None:
      raise ValueError("--phase=pretrain trains a dense model from scratch; drop --init or start at distill")
    getattr(phases, args.phase)(exp)
  if records and phases.loop.is_main_process():
    print(format_table(records))
    print(f"done in {(time.time() - tic) / 60:.1f} min; results in {exp.workdir}")
  return records


def main(argv: list[str] | None = None) -> int:
  args, cfg = parse(argv)
  try:
    run(args, cfg)
  except (ValueError, FileNotFoundError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
