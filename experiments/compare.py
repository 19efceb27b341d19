"""ACM beside its baselines on one accuracy-compute plot, from one dense ViT.

  python -m experiments.compare --methods=acm,static,moefication,early_exit,token_halting \
      --budgets=0.25,0.5,0.75 --workdir=runs/compare [any vit_imagenet / baseline flag]

Trains the dense model first unless --init or <workdir>/pretrain has one (or
--pretrain=false forbids it), then runs or reuses every method's runs in the one
workdir (a killed sweep continues where it stopped), writes <workdir>/curves.json
(a list of {method, setting, gflops_per_image, top1, budget_or_threshold, ...})
and prints the table sorted by GFLOPs.
Settings per method: acm: one finetuning per --budgets, and the model finetuned at
--any_budget_model calibrated at inference (--calibration, saved with the model
in its run directory) to each --any_budgets (or only --eval_budget); with
--budget_conditioning=true the any-budget model is instead one finetuning whose gates
read the budget (drawn per step in [--budget_min, --budget_max]), evaluated at each
--any_budgets (--calibration=none: as it is; global / per_acm: fitted on top); static:
--static_ks; moefication: --moe_top_k experts out of --num_experts; early_exit: --thresholds; token_halting: target depth budget x depth;
acm_halting: token halting at those depths added to the ACM finetuned at --halting_acm_budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time

from acm_jax.vit.baselines import acm_halting, calibration
from acm_jax.vit.baselines import runs as baselines
from acm_jax.train import config as config_lib
from acm_jax.train import phases
from acm_jax.vit import model as vit
from acm_jax.vit import task as vit_task

ANY_BUDGETS = "0.125,0.25,0.375,0.5,0.625,0.75,0.875"
THRESHOLDS = "0.5,0.6,0.7,0.8,0.9,0.95,0.99,0.999"


def parse(argv: list[str] | None):
  parser = config_lib.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--methods", default=",".join(baselines.METHODS),
                      help=f"comma-separated subset of {', '.join(baselines.METHODS)}; default: all of them")
  parser.add_argument("--budgets", default="0.25,0.5,0.75",
                      help="ACM finetuning budgets and halting depths (empty, without halting methods: no ACM "
                      "finetuned per budget, only the any-budget model)")
  parser.add_argument("--any_budgets", default=ANY_BUDGETS, help="budgets the one any-budget ACM is calibrated to")
  parser.add_argument("--any_budget_model", type=float, default=0.5, help="budget of the ACM calibrated at inference")
  parser.add_argument("--eval_budget", type=float, default=None, help="calibrate to this budget only")
  parser.add_argument("--calibrate", type=lambda v: v.lower() in ("1", "true"), default=True,
                      help="fit a calibration not yet saved with the any-budget model (false: serve saved ones only)")
  parser.add_argument("--thresholds", default=THRESHOLDS, help="early-exit confidence thresholds")
  parser.add_argument("--moe_top_k", default=None, help="experts per token (default: E/8, E/4, ..., E)")
  parser.add_argument("--static_ks", default=None, help="static widths (default: 1..N-1)")
  parser.add_argument("--pretrain", type=config_lib.bool_parser, default=True,
                      help="train the dense model when no --init or finished pretrain run exists")
  config_lib.add_flags(parser, choices={"model": (*vit.PRESETS, "from_init")})
  config_lib.add_flags(parser, baselines.BaselineConfig)
  args = parser.parse_args(argv)
  cfg = config_lib.from_flags(args, config_lib.ExperimentConfig(workdir="runs/compare"))
  bcfg = config_lib.from_flags(args, baselines.BaselineConfig())
  return args, cfg, bcfg


def _numbers(flag: str, text: str, kind, low: float, high: float, low_open: bool = False) -> list:
  bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
  try:
    values = [kind(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise ValueError(f"--{flag} must be comma-separated numbers in {bounds}, got {text!r}") from None
  bad = [v for v in values if not (low < v <= high if low_open else low <= v <= high)]
  if not values or bad:
    raise ValueError(f"--{flag} must be comma-separated numbers in {bounds}, got {text!r}")
  return values


@dataclasses.dataclass
class Plan:
  methods: list[str]
  budgets: list[float]
  any_budgets: list[float]
  thresholds: list[float]
  moe_top_k: list[int]
  static_ks: list[int]
  halting_depths: list[float]


def plan(args, cfg: config_lib.ExperimentConfig, bcfg: baselines.BaselineConfig) -> tuple[phases.Experiment, Plan]:
  """Every check before any work: methods, settings, config, data, dense checkpoint."""
  methods = [m for m in args.methods.split(",") if m]
  unknown = [m for m in methods if m not in baselines.METHODS]
  if unknown or not methods:
    raise ValueError(f"--methods: unknown {unknown or args.methods!r}; expected a subset of {baselines.METHODS}")
  halting = [m for m in methods if m in ("token_halting", "acm_halting")]
  if args.budgets.strip() == "" and "acm" in methods and not halting:
    budgets = []  # the any-budget model alone, no ACM finetuned per budget
  else:
    budgets = _numbers("budgets", args.budgets, float, 0.0, 1.0, low_open=True)
  any_budgets = _numbers("any_budgets", args.any_budgets, float, 0.0, 1.0, low_open=True)
  if args.eval_budget is not None:
    any_budgets = _numbers("eval_budget", str(args.eval_budget), float, 0.0, 1.0, low_open=True)
  _numbers("any_budget_model", str(args.any_budget_model), float, 0.0, 1.0, low_open=True)
  thresholds = _numbers("thresholds", args.thresholds, float, 0.0, 1.0)
  exp = vit_task.build(cfg)
  depth, mlp_dim = exp.task.dense_model.config.depth, exp.task.dense_model.config.mlp_dim
  bcfg.validate(mlp_dim)
  e = bcfg.num_experts
  default_k = ",".join(str(max(1, round(e * f / 8))) for f in range(1, 9))
  moe_top_k = sorted(set(_numbers("moe_top_k", args.moe_top_k or default_k, int, 1, e)))
  n = cfg.num_learners
  static_ks = _numbers("static_ks", args.static_ks or ",".join(map(str, range(1, n))), int, 0, n)
  if "acm" in methods and any_budgets:
    model = exp if cfg.budget_conditioning else vit_task.build(dataclasses.replace(cfg, budget=args.any_budget_model))
    calibration.check_servable(model.run_dir("finetune"), any_budgets, bcfg.calibration,
                               bcfg.calibration_examples, fit=args.calibrate, conditioned=cfg.budget_range)
  if "acm_halting" in methods:
    acm_halting.check(exp.task.acm_model.config)
  if not baselines.has_dense_checkpoint(exp) and not args.pretrain:
    raise FileNotFoundError(
        f"methods {methods} convert a dense ViT, but there is none: no --init and no finished pretrain run at "
        f"{exp.run_dir('pretrain') / 'params'}; pass --init=CHECKPOINT or drop --pretrain=false")
  return exp, Plan(methods, budgets, any_budgets, thresholds, moe_top_k, static_ks, [b * depth for b in budgets])


def format_table(records: list[dict]) -> str:
  lines = [f"{'method':<16} {'setting':<36} {'GFLOPs/img':>11} {'top-1':>7}"]
  for r in sorted(records, key=lambda r: (r["gflops_per_image"], r["method"])):
    lines.append(f"{r['method']:<16} {r['setting']:<36} {r['gflops_per_image']:>11.5f} {100 * r['top1']:>6.2f}%")
  return "\n".join(lines)


def run(args, cfg, bcfg) -> list[dict]:
  exp, p = plan(args, cfg, bcfg)
  tic = time.time()
  if not baselines.has_dense_checkpoint(exp):
    phases.pretrain(exp)
  dense = functools.cache(lambda: phases.dense_params(exp))  # loaded once, only if a run needs it
  runners = {
      "acm": lambda: baselines.run_acm(exp, bcfg, p.budgets, p.any_budgets, args.any_budget_model,
                                       args.calibrate),
      "static": lambda: baselines.run_static(exp, p.static_ks),
      "moefication": lambda: baselines.run_moefication(exp, bcfg, dense, p.moe_top_k),
      "early_exit": lambda: baselines.run_early_exit(exp, bcfg, dense, p.thresholds),
      "token_halting": lambda: baselines.run_token_halting(exp, bcfg, dense, p.halting_depths),
      "acm_halting": lambda: baselines.run_acm_halting(exp, bcfg, p.halting_depths),
  }
  records = baselines.run_dense(exp, dense)
  for method in p.methods:
    records += runners[method]()
    phases.write_json(exp.workdir / "curves.json", records)  # partial results stay visible
  phases.write_json(exp.workdir / "curves.json", records)
  if phases.loop.is_main_process():
    print(format_table(records))
    print(f"done in {(time.time() - tic) / 60:.1f} min; curves in {exp.workdir / 'curves.json'}")
  return records


def main(argv: list[str] | None = None) -> int:
  try:
    args, cfg, bcfg = parse(argv)
  except SystemExit as e:  # --help, or a bad flag (argparse printed the one-line error)
    return e.code if isinstance(e.code, int) else 2
  try:
    with phases.loop.stop_signals():  # SIGTERM or Ctrl-C: save the step, exit 75 or 130
      run(args, cfg, bcfg)
  except phases.loop.Stopped as stop:
    return stop.status
  except (ValueError, FileNotFoundError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
