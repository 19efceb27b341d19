"""Any budget at inference: one finetuned ACM, its gates recalibrated to a budget B.

Two rules, both fitted on a held-out calibration batch (train split, at steps
past the end of training, never the test split):

"global" (the first version, kept as the ablation): every gate's logit for
choice k is lowered by lambda * k * learner_width / dim (`cost_shift` of
`acm.ACM`); the compute fraction is non-increasing in lambda and bisection puts
it on B. On the glyph set this starves the object tokens at B = 0.25: the one
shift inverts the model's own ranking (object tokens mean k 0.87, background
1.01, against 1.42 / 1.09 for a model finetuned at 0.25), because a token whose
gate prefers k = 3 over k = 1 and k = 2 drops straight to k = 0 once the shift
passes its margin over k = 0.

"per_acm" (the default): each token's compute score is its gate's expected
choice, s = sum_k softmax(logits)_k * k, and ACM m runs
k = clip(floor(s - offset_m + 1/2), min_choice, N) learners: within an ACM the
tokens keep the gate's ranking for any offset. The offsets are fitted jointly,
ACM by ACM in depth order (an ACM's inputs depend only on the offsets before
it), so that ACM m lands on its target fraction f_m; the targets keep the
model's own split of compute over ACMs (`allocate`): f_m = min(1, alpha * g_m)
with g_m the ACM's fraction at offset 0, alpha set so that the cost-weighted
mean of the f_m is B.

The fitted offsets are saved with the model (`<finetune run>/calibration.json`,
keyed by budget); `serve` applies them to any forward pass.

A model finetuned with budget-conditioned gates (`--budget_conditioning`) reads the
budget itself: rule "none" serves it as it is, and "global" / "per_acm" fit their
shift or offsets on top of the gates conditioned on B (to land closer to B). Its
range of trained budgets is saved with it (the run's config.json) and bounds what it serves.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from acm_jax import acm as acm_lib
from acm_jax import transformer
from acm_jax.acmize import flatten
from acm_jax.pytree import PyTree
from acm_jax.train import phases, steps

CALIBRATION_STEP = 10**7  # train-split batches this far out were never trained on
RULES = ("per_acm", "global", "none")
FILE = "calibration.json"


def check_budget(budget: float, flag: str = "--eval_budget") -> float:
  if not 0.0 < budget <= 1.0:
    raise ValueError(f"{flag} must be in (0, 1], got {budget}")
  return budget


def bisect(fraction: Callable[[float], float], target: float, tolerance: float = 0.02,
           max_iterations: int = 60) -> tuple[float, float]:
  """lambda with |fraction(lambda) - target| <= tolerance for a non-increasing
  `fraction`; returns (lambda, fraction(lambda)), the closest found if the step
  function jumps over the band."""
  if not 0.0 < target <= 1.0:
    raise ValueError(f"budget must be in (0, 1], got {target}")
  lo, hi = -1.0, 1.0
  f_lo, f_hi = fraction(lo), fraction(hi)
  for _ in range(max_iterations):  # widen until fraction(lo) >= target >= fraction(hi)
    if f_lo >= target - tolerance:
      break
    lo *= 4
    f_lo = fraction(lo)
  for _ in range(max_iterations):
    if f_hi <= target + tolerance:
      break
    hi *= 4
    f_hi = fraction(hi)
  return _closest((lo, f_lo), (hi, f_hi), fraction, target, tolerance, max_iterations)


def _closest(low: tuple[float, float], high: tuple[float, float], fraction: Callable[[float], float],
             target: float, tolerance: float, iterations: int) -> tuple[float, float]:
  """Bisection of a non-increasing `fraction` between the points low = (lo, fraction(lo)) and
  high: the point met closest to `target`, stopping once it is within `tolerance`."""
  (lo, _), (hi, _) = low, high
  best = min(low, high, key=lambda p: abs(p[1] - target))
  for _ in range(iterations):
    if abs(best[1] - target) <= tolerance:
      break
    mid = 0.5 * (lo + hi)
    f_mid = fraction(mid)
    best = min(best, (mid, f_mid), key=lambda p: abs(p[1] - target))
    if f_mid > target:
      lo = mid
    else:
      hi = mid
  return best


# --- the per-ACM rule as pure functions ---------------------------------------------


def compute_score(logits: jax.Array) -> jax.Array:
  """The gate's expected choice: (..., N+1) logits -> (...,) in [0, N]."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return probs @ jnp.arange(logits.shape[-1], dtype=jnp.float32)


def score_choices(score: jax.Array, offset: float | jax.Array, num_learners: int,
                  min_choice: int = 0) -> jax.Array:
  """Learners run per token: clip(floor(score - offset + 1/2), min_choice, N) as int32.
  Non-increasing in `offset`, non-decreasing in `score`."""
  k = jnp.floor(score - offset + 0.5)
  return jnp.clip(k, min_choice, num_learners).astype(jnp.int32)


def offset_for_fraction(score: np.ndarray, weight: np.ndarray, target: float, num_learners: int,
                        min_choice: int = 0, iterations: int = 60) -> tuple[float, float]:
  """(offset, fraction reached) putting the weighted mean of k / N on `target`.

  score, weight: flat arrays over tokens (weight 0 for padding). The fraction is
  a non-increasing step function of the offset; bisection over
  [-N - 1, N + 1] (every token at N at the left end, at `min_choice` at the
  right) returns the offset whose fraction is closest to the target."""
  score, weight = np.asarray(score, np.float64), np.asarray(weight, np.float64)
  if weight.sum() <= 0:
    raise ValueError("the calibration batch has no tokens (all token weights are zero)")

  def fraction(offset):
    k = np.clip(np.floor(score - offset + 0.5), min_choice, num_learners)
    return float(weight @ k / weight.sum() / num_learners)

  lo, hi = -num_learners - 1.0, num_learners + 1.0
  # tolerance 0: stops only on an exact hit, which no later point could beat
  return _closest((lo, fraction(lo)), (hi, fraction(hi)), fraction, target, 0.0, iterations)


def allocate(base: np.ndarray, cost_share: np.ndarray, budget: float, iterations: int = 100) -> np.ndarray:
  """Per-ACM target fractions f = min(1, alpha * base) with sum(cost_share * f) = budget.

  base: each ACM's fraction under the uncalibrated gates; cost_share: each ACM's
  share of the full compute (sums to 1). An ACM whose gates run nothing keeps
  nothing until every other ACM is full, then they share what is left."""
  base, cost_share = np.asarray(base, np.float64), np.asarray(cost_share, np.float64)
  check_budget(budget, "budget")
  base = np.where(base > 0, base, 0.0)
  total = lambda alpha: float(cost_share @ np.minimum(1.0, alpha * base))
  if base.max() <= 0 or total(1.0 / base[base > 0].min()) < budget:
    # the ACMs with gates that ever run are full: spread the rest over the others evenly
    full = np.where(base > 0, 1.0, 0.0)
    rest = cost_share @ (1 - full)
    return full + (1 - full) * ((budget - cost_share @ full) / rest if rest > 0 else 0.0)
  lo, hi = 0.0, 1.0 / base[base > 0].min()
  for _ in range(iterations):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if total(mid) < budget else (lo, mid)
  return np.minimum(1.0, hi * base)


# --- applying offsets inside a model ------------------------------------------------


@contextlib.contextmanager
def serve(specs: tuple[steps.ACMSpec, ...], offsets: dict[str, float] | jax.Array,
          budget: float | None = None) -> Iterator[None]:
  """Within the context every ACM of `specs` runs the per-ACM rule with its offset
  (on the gates conditioned on `budget`, for a budget-conditioned model).

  offsets: {path: offset}, or an array (len(specs),) in the order of `specs`
  (traceable: one compiled forward serves every offset); paths are the unrolled ones
  ("block_3/mlp") for scanned blocks too. Each ACM is called in mode "fixed" with the
  rule's k, computed by its own gate, so it sows its choices as usual and eval's
  statistics (k histograms, compute) describe the calibrated allocation."""
  by_path = {s.path: i for i, s in enumerate(specs)}
  if isinstance(offsets, dict):
    missing = sorted(set(by_path) - set(offsets))
    if missing:
      raise ValueError(f"the calibration has no offsets for ACMs {missing}; it was fitted on another model")
    offsets = jnp.asarray([offsets[s.path] for s in specs], jnp.float32)

  def intercept(next_fun, args, kwargs, context):
    if not (isinstance(context.module, acm_lib.ACM) and context.method_name == "__call__"):
      return next_fun(*args, **kwargs)
    # a scanned stack's ACM serves every layer: each layer's offset under its unrolled path
    paths, layer = acm_lib.unrolled_paths("/".join(context.module.path))
    indices = [next((i for p, i in by_path.items() if path.endswith(p)), None) for path in paths]
    if None in indices:
      raise ValueError(f"ACM {paths[indices.index(None)]!r} is not one of the calibrated ACMs {sorted(by_path)}")
    spec = specs[indices[0]]  # the layers of a stack differ in offset only
    offset = offsets[indices[0]] if layer is None else offsets[jnp.asarray(indices)][layer]
    logits = steps.apply_gate(spec, context.module.variables["params"]["gate"], args[0], budget)
    k = score_choices(compute_score(logits), offset, spec.num_learners, spec.min_choice)
    return next_fun(*args, **{**kwargs, "mode": "fixed", "fixed_k": k})

  with nn.intercept_methods(intercept):
    yield


# --- fitting on the calibration batch -----------------------------------------------


def calibration_batch(exp: phases.Experiment, examples: int) -> dict:
  if examples < 1:
    raise ValueError(f"the calibration batch has no tokens: --calibration_examples={examples}; give at least 1")
  cfg = exp.config
  batch = next(exp.iterator(cfg.dataset, "train", examples, image_size=cfg.image_size, seed=cfg.seed + 1,
                            data_dir=cfg.data_dir, start_step=CALIBRATION_STEP // examples))
  if exp.task.inputs(batch).size == 0:
    raise ValueError("the calibration batch has no tokens (empty batch)")
  return batch


def cost_shares(specs: tuple[steps.ACMSpec, ...]) -> np.ndarray:
  full = np.array([s.num_learners * s.learner_cost for s in specs], np.float64)
  return full / full.sum()


def conditioning(budget: float | None):
  """The context feeding `budget` to budget-conditioned gates (none for a plain model)."""
  return contextlib.nullcontext() if budget is None else acm_lib.with_budget(budget)


def scores_fn(exp: phases.Experiment, params: PyTree, batch: dict,
              budget: float | None = None) -> Callable[[np.ndarray], list[np.ndarray]]:
  """offsets (M,) -> every ACM's compute scores (batch, tokens) on `batch` under them
  (gates conditioned on `budget` when given)."""
  images = exp.task.inputs(batch)
  specs = exp.task.acm_specs

  @jax.jit
  def scores(offsets):
    with serve(specs, offsets, budget), conditioning(budget):
      _, aux = exp.task.acm_model.apply({"params": params}, images, mode="argmax", mutable=["acm"])
    flat = flatten(transformer.unstack_blocks(aux["acm"]))
    return [compute_score(flat[f"{s.path}/logits"][0]) for s in specs]

  return lambda offsets: [np.asarray(s) for s in scores(jnp.asarray(offsets, jnp.float32))]


def fit_offsets(scores: Callable[[np.ndarray], list[np.ndarray]], weight: np.ndarray,
                specs: tuple[steps.ACMSpec, ...], budget: float) -> dict:
  """Offsets putting every ACM on its `allocate` target, fitted in depth order.

  scores(offsets) -> per-ACM (batch, tokens) scores; ACM m's scores may depend on
  offsets[:m] only. weight: (batch, tokens) real-token mask."""
  check_budget(budget)
  weight = np.asarray(weight, np.float64).reshape(-1)
  if weight.sum() <= 0:
    raise ValueError("the calibration batch has no tokens (all token weights are zero)")
  count = len(specs)

  def fractions(per_acm):
    return np.array([np.clip(np.floor(s.reshape(-1) + 0.5), spec.min_choice, spec.num_learners) @ weight
                     / weight.sum() / spec.num_learners for s, spec in zip(per_acm, specs)])

  base = fractions(scores(np.zeros(count)))
  targets = allocate(base, cost_shares(specs), budget)
  offsets = np.zeros(count)
  reached = np.zeros(count)
  for m, spec in enumerate(specs):
    score = scores(offsets)[m].reshape(-1)
    offsets[m], reached[m] = offset_for_fraction(score, weight, targets[m], spec.num_learners, spec.min_choice)
  return {"offsets": {s.path: float(o) for s, o in zip(specs, offsets)},
          "targets": {s.path: float(t) for s, t in zip(specs, targets)},
          "calibration_fraction": float(cost_shares(specs) @ reached)}


# --- saved with the model -----------------------------------------------------------


def load(run_dir: Path) -> dict:
  """{rule: {budget key: calibration}} saved with the model in `run_dir`."""
  path = Path(run_dir) / FILE
  return json.loads(path.read_text()) if path.exists() else {}


def key(budget: float) -> str:
  return f"{budget:.4f}"


def saved(run_dir: Path, budget: float, rule: str, examples: int) -> dict | None:
  found = load(run_dir).get(rule, {}).get(key(budget))
  return found if found is not None and found["calibration_examples"] == examples else None


def check_servable(run_dir: Path, budgets: list[float], rule: str, examples: int, fit: bool,
                   conditioned: tuple[float, float] | None = None) -> None:
  """Before any work: a model without saved calibration serves no other budget unless fitting is
  allowed; a budget-conditioned model (`conditioned`: its trained range) serves budgets in its range."""
  if rule not in RULES:
    raise ValueError(f"unknown calibration rule {rule!r}; expected one of {RULES}")
  for b in budgets:
    check_budget(b)
  if conditioned is None and rule == "none":
    raise ValueError(f"--calibration=none serves budget-conditioned models only, and the model at {run_dir} was "
                     "finetuned at one budget; finetune with --budget_conditioning=true or pick "
                     f"--calibration={RULES[0]} or {RULES[1]}")
  if conditioned is not None:
    outside = [b for b in budgets if not conditioned[0] <= b <= conditioned[1]]
    if outside:
      raise ValueError(f"budgets {outside} lie outside the range the model at {run_dir} was finetuned for "
                       f"([{conditioned[0]:g}, {conditioned[1]:g}], --budget_min / --budget_max)")
    if rule == "none":
      return
  missing = [b for b in budgets if saved(run_dir, b, rule, examples) is None]
  if missing and not fit:
    raise ValueError(
        f"the model at {run_dir} has no saved {rule} calibration on {examples} examples for budgets {missing} "
        f"({Path(run_dir) / FILE}); drop --calibrate=false to fit it on the held-out calibration batch")


def calibrate(exp: phases.Experiment, params: PyTree, budget: float, examples: int = 256,
              rule: str = "per_acm", tolerance: float = 0.02) -> dict:
  """The calibration of `params` to `budget` on a held-out train batch (on top of the gates
  conditioned on `budget` when the model's are)."""
  check_budget(budget)
  if rule not in RULES or rule == "none":
    raise ValueError(f"calibration rule {rule!r} fits nothing; expected one of {RULES[:2]}")
  batch = calibration_batch(exp, examples)
  found = {"rule": rule, "calibration_examples": examples}
  condition = budget if exp.config.budget_conditioning else None
  if rule == "global":
    fraction = compute_fraction_fn(exp, params, batch, condition)
    shift, reached = bisect(fraction, budget, tolerance / 2)
    return {**found, "cost_shift": float(shift), "calibration_fraction": float(reached)}
  real = steps.real_tokens(exp.task, batch)
  scores = scores_fn(exp, params, batch, condition)
  weight = np.ones(scores(np.zeros(len(exp.task.acm_specs)))[0].shape) if real is None else np.asarray(real)
  return {**found, **fit_offsets(scores, weight, exp.task.acm_specs, budget)}


def compute_fraction_fn(exp: phases.Experiment, params: PyTree, batch: dict,
                        budget: float | None = None) -> Callable[[float], float]:
  """lambda -> mean compute fraction of the ACM (argmax gates, global shift, conditioned on
  `budget` when given) on `batch`."""
  images = exp.task.inputs(batch)
  specs = exp.task.acm_specs

  @jax.jit
  def fraction(shift):
    with conditioning(budget):
      _, aux = exp.task.acm_model.apply({"params": params}, images, mode="argmax", cost_shift=shift, mutable=["acm"])
    mean_k = [jnp.mean(jnp.argmax(c, -1)) for c in steps.acm_choices(exp.task, aux)]
    return acm_lib.compute_fraction(mean_k, [s.learner_cost for s in specs], [s.num_learners for s in specs])

  return lambda shift: float(fraction(jnp.float32(shift)))


def evaluate_at_budget(exp: phases.Experiment, params: PyTree, budget: float, examples: int = 256,
                       rule: str = "per_acm", fit: bool = True) -> dict:
  """The ACM evaluated at `budget` with its saved calibration (fitted and saved first
  when missing and `fit`), through the shared `phases.evaluate`; a budget-conditioned
  model's gates read `budget` (rule "none": nothing more)."""
  run_dir = exp.run_dir("finetune")
  conditioned = exp.config.budget_range
  check_servable(run_dir, [budget], rule, examples, fit, conditioned)
  name = f"acm_any_b{budget:.3f}"
  condition = {} if conditioned is None else {"budget": budget}
  extra = {"eval_budget": budget, **({} if conditioned is None else {"budget_conditioning": list(conditioned)})}
  if rule == "none":
    return {**phases.evaluate(exp, params, name, "argmax", **condition), "rule": rule, **extra}
  found = saved(run_dir, budget, rule, examples)
  if found is None:
    found = calibrate(exp, params, budget, examples, rule)
    table = load(run_dir)
    table.setdefault(rule, {})[key(budget)] = found
    phases.write_json(run_dir / FILE, table)
  if rule == "global":
    record = phases.evaluate(exp, params, name, "argmax", cost_shift=found["cost_shift"], **condition)
  else:
    with serve(exp.task.acm_specs, found["offsets"], condition.get("budget")):  # traced in evaluate's jit
      record = phases.evaluate(exp, params, name, "argmax", **condition)
  return {**record, **found, **extra}
