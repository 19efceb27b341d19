"""Baselines that convert the same dense ViT as the ACM, for one accuracy-compute plot.

Each `run_<method>(exp, bcfg, settings)` trains what the method needs through
the shared loop (resumable), evaluates every setting on the shared test batches
with the shared FLOP accounting, and returns curve records
{method, setting, gflops_per_image, top1, budget_or_threshold, ...}. A finished
setting's record is cached as JSON in its run directory and reused.
Run directories under the experiment's workdir: moefication/, early_exit/,
token_halting_d{depth}/, acm_halting_b{budget}_d{depth}/ (the ACM and static width use `phases`' own).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Callable

from acm_jax.vit.baselines import acm_halting, calibration, common, early_exit, moefication, token_halting
from acm_jax.train import loop, phases
from acm_jax.train.config import flag
from acm_jax.vit import task as vit_task
from acm_jax.pytree import PyTree

METHODS = ("acm", "static", "moefication", "early_exit", "token_halting", "acm_halting")
# What each baseline's training reads beyond the fields every run shares (`ExperimentConfig.resume_fields`):
# saved in its run's config.json, resolved (a None default as the value it stands for), and compared on
# resume like the shared fields. The calibration flags act at evaluation only.
RUN_FIELDS = {
    "moefication": ("baseline_steps", "num_experts", "router_hidden", "router_lr"),
    "early_exit": ("baseline_steps", "exit_lr", "label_smoothing"),
    "token_halting": ("baseline_steps", "halting_lr", "ponder_weight", "prior_weight", "halting_eps",
                      "label_smoothing"),
    "acm_halting": ("baseline_steps", "halting_lr", "ponder_weight", "prior_weight", "halting_eps",
                    "label_smoothing", "halting_acm_budget"),
}


@dataclasses.dataclass
class BaselineConfig:
  """Flags of the baselines (the shared ones live in `ExperimentConfig`)."""
  baseline_steps: int | None = flag(None, "training steps of each baseline run (default: --finetune_steps)")
  num_experts: int = flag(16, "MoEfication experts per MLP (must divide the MLP width)")
  router_hidden: int = flag(128, "hidden width of the MoEfication router")
  router_lr: float = flag(3e-3, "learning rate of the MoEfication routers")
  exit_lr: float = flag(1e-3, "learning rate of the early-exit heads")
  halting_lr: float | None = flag(None, "learning rate of token halting, which finetunes the whole model "
                                  "like the ACM (default: --finetune_lr)")
  ponder_weight: float = flag(5e-3, "weight of token halting's ponder loss")
  prior_weight: float = flag(0.1, "weight of token halting's depth-prior loss")
  halting_eps: float = flag(0.01, "token halting's threshold slack, in (0, 1)")
  halting_acm_budget: float = flag(0.5, "acm_halting: budget of the finetuned ACM that token halting is added to, "
                                   "in (0, 1]")
  calibration_examples: int = flag(256, "held-out train examples that calibrate any-budget shifts (>= 1)")
  calibration: str = flag("per_acm", "any-budget calibration rule: per_acm, global (the single shift), none "
                          "(a budget-conditioned model as it is; with --budget_conditioning the others fit on top "
                          "of the conditioned gates), or nested (per_acm fitted over all --any_budgets together so "
                          "that no token runs fewer learners at a higher budget)")

  def steps(self, exp: phases.Experiment) -> int:
    return self.baseline_steps or exp.config.finetune_steps

  def settings(self, method: str, exp: phases.Experiment) -> dict:
    """`RUN_FIELDS[method]` with their values in this run."""
    resolved = {**dataclasses.asdict(self), "baseline_steps": self.steps(exp),
                "halting_lr": self.halting_lr or exp.config.finetune_lr,
                "label_smoothing": exp.config.label_smoothing}
    return {f: resolved[f] for f in RUN_FIELDS[method]}

  def validate(self, num_mlp_units: int) -> "BaselineConfig":
    if self.baseline_steps is not None and self.baseline_steps < 1:
      raise ValueError(f"--baseline_steps must be >= 1, got {self.baseline_steps}")
    if self.num_experts < 1 or num_mlp_units % self.num_experts:
      raise ValueError(f"--num_experts={self.num_experts} must divide the MLP width {num_mlp_units}")
    if self.calibration not in calibration.RULES:
      raise ValueError(f"--calibration={self.calibration!r}: expected one of {calibration.RULES}")
    if self.calibration_examples < 1:
      raise ValueError(f"the calibration batch has no tokens: --calibration_examples={self.calibration_examples}")
    if not 0.0 < self.halting_eps < 1.0:
      raise ValueError(f"--halting_eps must be in (0, 1), got {self.halting_eps}")
    if not 0.0 < self.halting_acm_budget <= 1.0:
      raise ValueError(f"--halting_acm_budget must be in (0, 1], got {self.halting_acm_budget}")
    return self


def cached(path: Path, compute: Callable[[], dict]) -> dict:
  if path.exists():
    return json.loads(path.read_text())
  record = compute()
  phases.write_json(path, record)
  return record


def all_cached(paths: list[Path]) -> bool:
  """Whether every evaluation of a run is on disk: the run need not even be loaded."""
  return all(p.exists() for p in paths)


def curve_record(method: str, setting: str, value: float, record: dict) -> dict:
  return {"method": method, "setting": setting, "budget_or_threshold": value,
          "gflops_per_image": record["gflops_per_image"], "top1": record["top1"],
          **{k: v for k, v in record.items() if k not in ("gflops_per_image", "top1", "model")}}


def _trained(exp: phases.Experiment, run_dir: Path, settings: dict, evals: list[Path], init: Callable[[], PyTree],
             lr: float, make_step: Callable, num_steps: int, trainable=lambda path: True) -> PyTree | None:
  """A baseline's params trained in `run_dir` through the shared loop (resumable); None
  when every evaluation in `evals` is on disk already, so that nothing need be loaded.
  make_step(tx) -> the step function. `settings` (`BaselineConfig.settings`) must match
  those of a run already in `run_dir` before its state or evaluations are reused."""
  common.check_settings(exp, run_dir, settings)
  if all_cached(evals):
    return None
  params = init()
  tx = common.optimizer(exp, params, lr, num_steps, trainable)
  return common.train(exp, run_dir, params, tx, make_step(tx), num_steps, settings)


def _evaluated(exp: phases.Experiment, path: Path, forward: Callable, params: PyTree | None, method: str,
               setting: str, value: float) -> dict:
  """The curve record of `forward(params, images)` on the test batches, cached at `path`."""
  on_images = lambda p, batch: forward(p, exp.task.inputs(batch))
  record = cached(path, lambda: common.evaluate(exp, on_images, params))
  return curve_record(method, setting, value, record)


def run_moefication(exp: phases.Experiment, bcfg: BaselineConfig, dense: Callable[[], PyTree],
                    top_ks: list[int]) -> list[dict]:
  cfg = common.dense_config(exp)
  run_dir = exp.workdir / "moefication"
  evals = {k: run_dir / f"eval_k{k}.json" for k in top_ks}
  params = _trained(
      exp, run_dir, bcfg.settings("moefication", exp), list(evals.values()),
      lambda: moefication.init(cfg, dense(), bcfg.num_experts, bcfg.router_hidden, exp.config.seed), bcfg.router_lr,
      lambda tx: functools.partial(moefication.router_step, exp.task, bcfg.num_experts, bcfg.router_hidden, tx),
      bcfg.steps(exp), common.frozen_except(("routers/",)))
  return [_evaluated(exp, evals[k], functools.partial(moefication.eval_forward, cfg, bcfg.num_experts, k,
                                                      bcfg.router_hidden),
                     params, "moefication", f"top{k}/{bcfg.num_experts}", k / bcfg.num_experts) for k in top_ks]


def run_early_exit(exp: phases.Experiment, bcfg: BaselineConfig, dense: Callable[[], PyTree],
                   thresholds: list[float]) -> list[dict]:
  cfg = common.dense_config(exp)
  run_dir = exp.workdir / "early_exit"
  evals = {t: run_dir / f"eval_t{t:g}.json" for t in thresholds}
  params = _trained(exp, run_dir, bcfg.settings("early_exit", exp), list(evals.values()),
                    lambda: early_exit.init(cfg, dense()), bcfg.exit_lr,
                    lambda tx: functools.partial(early_exit.exit_step, exp.task, exp.config.label_smoothing, tx),
                    bcfg.steps(exp), common.frozen_except(("exits/",)))
  return [_evaluated(exp, evals[t], functools.partial(early_exit.forward, cfg, t), params, "early_exit",
                     f"threshold {t:g}", t) for t in thresholds]


def run_token_halting(exp: phases.Experiment, bcfg: BaselineConfig, dense: Callable[[], PyTree],
                      target_depths: list[float]) -> list[dict]:
  cfg = common.dense_config(exp)
  return _halting_runs(exp, bcfg, "token_halting", target_depths, cfg.depth, token_halting, exp.task,
                       lambda: token_halting.init(dense()), lambda depth: (f"token_halting_d{depth:g}", ""),
                       functools.partial(token_halting.eval_forward, cfg))


def run_acm_halting(exp: phases.Experiment, bcfg: BaselineConfig, target_depths: list[float]) -> list[dict]:
  """Token halting added to the ACM finetuned at --halting_acm_budget (finetuned first if it is not
  on disk yet), one run per target depth; the gates stay as that finetuning left them."""
  budget = bcfg.halting_acm_budget
  acm_run = vit_task.build(dataclasses.replace(exp.config, budget=budget, budget_conditioning=False))
  cfg = acm_halting.check(acm_run.task.acm_model.config)
  return _halting_runs(exp, bcfg, "acm_halting", target_depths, cfg.depth, acm_halting, acm_run.task,
                       lambda: acm_halting.init(_finetuned_acm(acm_run)),
                       lambda depth: (f"acm_halting_b{budget:.2f}_d{depth:g}", f"ACM b{budget:g}, "),
                       functools.partial(acm_halting.eval_forward, cfg), lambda path: not acm_halting.is_gate(path))


def _halting_runs(exp: phases.Experiment, bcfg: BaselineConfig, method: str, target_depths: list[float], depth_of: int,
                  module, task, init: Callable[[], PyTree], names: Callable[[float], tuple[str, str]],
                  eval_forward: Callable, trainable=lambda path: True) -> list[dict]:
  """One halting model per target depth, trained and evaluated alike for both halting methods:
  `module` provides halting_step, `names(depth)` the run directory and the setting's prefix."""
  lr = bcfg.halting_lr or exp.config.finetune_lr
  settings = bcfg.settings(method, exp)
  records = []
  for depth in target_depths:
    run_name, prefix = names(depth)
    run_dir = exp.workdir / run_name
    halting = token_halting.Halting(bcfg.halting_eps, bcfg.ponder_weight, bcfg.prior_weight, depth)
    params = _trained(
        exp, run_dir, settings, [run_dir / "eval.json"], init, lr,
        lambda tx: functools.partial(module.halting_step, task, halting, exp.config.label_smoothing, tx),
        bcfg.steps(exp), trainable)
    records.append(_evaluated(exp, run_dir / "eval.json", functools.partial(eval_forward, halting), params, method,
                              f"{prefix}target depth {depth:g}/{depth_of}", depth / depth_of))
  return records


def _finetuned_acm(run: phases.Experiment) -> PyTree:
  _unless_finished(run, "distill")
  _unless_finished(run, "gates")
  _unless_finished(run, "finetune")
  return phases.load_phase_params(run, "finetune")


def has_dense_checkpoint(exp: phases.Experiment) -> bool:
  return exp.config.init is not None or loop.params_dir(exp.run_dir("pretrain")).exists()


def _unless_finished(exp: phases.Experiment, phase: str) -> None:
  if not loop.params_dir(exp.run_dir(phase)).exists():
    getattr(phases, phase)(exp)


def run_acm(exp: phases.Experiment, bcfg: BaselineConfig, budgets: list[float], any_budgets: list[float],
            any_model_budget: float, fit: bool = True) -> list[dict]:
  """One ACM finetuned per budget, and one any-budget model evaluated at each of
  `any_budgets` (method "acm_any_budget"): with --budget_conditioning, the model whose
  gates read the budget, finetuned once over drawn budgets; otherwise the model finetuned
  at `any_model_budget`, calibrated at inference (`fit`: fit a calibration that is not
  saved with the model yet)."""
  records = []
  rule, examples = bcfg.calibration, bcfg.calibration_examples
  conditioned = exp.config.budget_conditioning
  plain = dataclasses.replace(exp.config, budget_conditioning=False)
  models = [(exp.config, False, True)] if conditioned and any_budgets else []
  models += [(dataclasses.replace(plain, budget=b), b in budgets, not conditioned and b == any_model_budget)
             for b in sorted(set(budgets) | ({any_model_budget} if any_budgets and not conditioned else set()))]
  for config, reference, any_budget in models:
    run = vit_task.build(config)
    evals = [run.run_dir("finetune") / "eval.json"] if reference else []
    # a nested calibration's levels depend on every budget of its chain: the chain names its records
    chain = "_of_" + "-".join(f"{t:g}" for t in sorted(any_budgets)) if rule == "nested" else ""
    calibrated = {t: run.run_dir("finetune") / f"any_budget_{rule}_{t:.3f}{chain}.json"
                  for t in (any_budgets if any_budget else [])}
    if not all_cached(evals + list(calibrated.values())):
      _unless_finished(exp, "distill")
      _unless_finished(exp, "gates")
      params = phases.finetune(run)
    if evals:
      record = cached(evals[0], lambda: phases.evaluate(run, params, f"acm_b{config.budget:.2f}", "argmax"))
      records.append(curve_record("acm", f"finetuned at budget {config.budget:g}", config.budget, record))
    source = ("budget-conditioned model" if config.budget_conditioning
              else f"b{config.budget:g} model calibrated")
    for target, path in calibrated.items():
      record = cached(path, lambda: calibration.evaluate_at_budget(run, params, target, examples, rule, fit,
                                                                   any_budgets))
      records.append(curve_record("acm_any_budget", f"{source} at {target:g}", target, record))
  return records


def run_static(exp: phases.Experiment, static_ks: list[int]) -> list[dict]:
  records = []
  for k in static_ks:
    run = vit_task.build(dataclasses.replace(exp.config, static_k=k, budget_conditioning=False))
    path = run.run_dir("static") / "eval.json"
    if not path.exists():
      _unless_finished(exp, "distill")
      params = phases.static(run)
    record = cached(path, lambda: phases.evaluate(run, params, f"static_k{k}", "fixed", fixed_k=k))
    records.append(curve_record("static", f"k={k}/{exp.config.num_learners}", k / exp.config.num_learners, record))
  return records


def run_dense(exp: phases.Experiment, dense: Callable[[], PyTree]) -> list[dict]:
  record = cached(exp.workdir / "dense_eval.json", lambda: phases.evaluate(exp, dense(), "dense", "dense"))
  return [curve_record("dense", "dense", 1.0, record)]
