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

"nested": the per-ACM rule fitted over a grid of budgets B_1 < ... < B_L at once, so
that no token runs fewer learners at a higher budget. Level i has its own offsets
o_{m,i}; at B_i ACM m runs k = max over j <= i of the per-ACM rule at level j (the
gate's score conditioned on B_j, offset o_{m,j}). The levels are fitted in increasing
budget, each ACM's offset at B_i with the k of the lower levels as its floor, so on the
same input a token's k is non-decreasing in the budget by construction. With one
budget it is the per-ACM rule. Serving B_i evaluates the gate at the i budgets <= B_i
for a budget-conditioned model (its gate cost times i; once for a plain model).

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
RULES = ("per_acm", "global", "none", "nested")
INACTIVE = 1e6  # the offset of a level not yet fitted: its k is min_choice, below every floor
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


def nested_choices(scores: jax.Array, offsets: jax.Array, num_learners: int, min_choice: int = 0) -> jax.Array:
  """The nested rule: scores (levels, ...) and offsets (levels,) -> the max over levels of
  `score_choices` (int32, shape ...). Non-decreasing as levels are added."""
  offsets = jnp.reshape(offsets, offsets.shape + (1,) * (scores.ndim - 1))
  return jnp.max(score_choices(scores, offsets, num_learners, min_choice), axis=0)


def offset_for_fraction(score: np.ndarray, weight: np.ndarray, target: float, num_learners: int,
                        min_choice: int = 0, iterations: int = 60,
                        floor: np.ndarray | None = None) -> tuple[float, float]:
  """(offset, fraction reached) putting the weighted mean of k / N on `target`.

  score, weight: flat arrays over tokens (weight 0 for padding). floor: each token's
  least k (the nested rule's lower levels), k = max(floor, rule). The fraction is
  a non-increasing step function of the offset; bisection over
  [-N - 1, N + 1] (every token at N at the left end, at `min_choice` or its floor at
  the right) returns the offset whose fraction is closest to the target."""
  score, weight = np.asarray(score, np.float64), np.asarray(weight, np.float64)
  if weight.sum() <= 0:
    raise ValueError("the calibration batch has no tokens (all token weights are zero)")
  floor = np.full(score.shape, min_choice, np.float64) if floor is None else np.asarray(floor, np.float64)

  def fraction(offset):
    k = np.maximum(floor, np.clip(np.floor(score - offset + 0.5), min_choice, num_learners))
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
  offsets = offsets_array(specs, offsets) if isinstance(offsets, dict) else jnp.asarray(offsets)
  with serve_levels(specs, offsets[None], [budget]):
    yield


def offsets_array(specs: tuple[steps.ACMSpec, ...], offsets: dict[str, float]) -> jax.Array:
  """{path: offset} -> (len(specs),) float32 in the order of `specs`."""
  missing = sorted({s.path for s in specs} - set(offsets))
  if missing:
    raise ValueError(f"the calibration has no offsets for ACMs {missing}; it was fitted on another model")
  return jnp.asarray([offsets[s.path] for s in specs], jnp.float32)


@contextlib.contextmanager
def serve_levels(specs: tuple[steps.ACMSpec, ...], offsets: list[dict[str, float]] | jax.Array,
                 budgets: list[float | None], sow_scores: bool = False) -> Iterator[None]:
  """Within the context every ACM of `specs` runs the nested rule over the levels given:
  k = max over levels j of the per-ACM rule with offsets[j] on the gate conditioned on
  budgets[j] (None: a plain gate, evaluated once for every level). One level is `serve`.

  offsets: one {path: offset} per level, or an array (levels, len(specs)) (traceable).
  sow_scores: also sow each ACM's per-level scores (levels, batch, tokens) as "level_scores"
  in the "acm" collection (what the fitting reads)."""
  if not isinstance(offsets, jax.Array) and not isinstance(offsets, np.ndarray):
    offsets = jnp.stack([offsets_array(specs, o) for o in offsets])
  offsets = jnp.asarray(offsets, jnp.float32)
  if offsets.shape != (len(budgets), len(specs)):
    raise ValueError(f"offsets of shape {offsets.shape} for {len(budgets)} levels of {len(specs)} ACMs")
  by_path = {s.path: i for i, s in enumerate(specs)}

  def intercept(next_fun, args, kwargs, context):
    if not (isinstance(context.module, acm_lib.ACM) and context.method_name == "__call__"):
      return next_fun(*args, **kwargs)
    # a scanned stack's ACM serves every layer: each layer's offset under its unrolled path
    paths, layer = acm_lib.unrolled_paths("/".join(context.module.path))
    indices = [next((i for p, i in by_path.items() if path.endswith(p)), None) for path in paths]
    if None in indices:
      raise ValueError(f"ACM {paths[indices.index(None)]!r} is not one of the calibrated ACMs {sorted(by_path)}")
    spec = specs[indices[0]]  # the layers of a stack differ in offset only
    offset = offsets[:, indices[0]] if layer is None else offsets[:, jnp.asarray(indices)][:, layer]
    gate = context.module.variables["params"]["gate"]
    if all(b is None for b in budgets):
      scores = jnp.broadcast_to(compute_score(steps.apply_gate(spec, gate, args[0])),
                                (len(budgets),) + args[0].shape[:-1])
    else:
      scores = jnp.stack([compute_score(steps.apply_gate(spec, gate, args[0], b)) for b in budgets])
    if sow_scores:
      context.module.sow("acm", "level_scores", scores)
    k = nested_choices(scores, offset, spec.num_learners, spec.min_choice)
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
              budgets: list[float | None]) -> Callable[[np.ndarray], list[np.ndarray]]:
  """offsets (levels, M) -> every ACM's per-level compute scores (levels, batch, tokens) on
  `batch`, served by the nested rule under those offsets (level j's gates conditioned on
  budgets[j] when given)."""
  images = exp.task.inputs(batch)
  specs = exp.task.acm_specs

  @jax.jit
  def scores(offsets):
    with serve_levels(specs, offsets, budgets, sow_scores=True):
      _, aux = exp.task.acm_model.apply({"params": params}, images, mode="argmax", mutable=["acm"])
    flat = flatten(transformer.unstack_blocks(aux["acm"]))
    return [flat[f"{s.path}/level_scores"][0] for s in specs]

  return lambda offsets: [np.asarray(s) for s in scores(jnp.asarray(offsets, jnp.float32))]


def fit_offsets(scores: Callable[[np.ndarray], list[np.ndarray]], weight: np.ndarray,
                specs: tuple[steps.ACMSpec, ...], budget: float) -> dict:
  """The per-ACM rule: offsets putting every ACM on its `allocate` target, fitted in depth
  order (the nested rule with one level).

  scores(offsets (M,)) -> per-ACM (batch, tokens) scores; ACM m's scores may depend on
  offsets[:m] only. weight: (batch, tokens) real-token mask."""
  levels = fit_nested_offsets(lambda offsets: [s[None] for s in scores(offsets[0])], weight, specs, [budget])
  return {k: levels[0][k] for k in ("offsets", "targets", "calibration_fraction")}


def fit_nested_offsets(scores: Callable[[np.ndarray], list[np.ndarray]], weight: np.ndarray,
                       specs: tuple[steps.ACMSpec, ...], budgets: list[float]) -> list[dict]:
  """The nested rule over `budgets` (increasing): one calibration per budget, level by level.

  scores(offsets (levels, M)) -> per-ACM (levels, batch, tokens) scores, those of level j
  read by the gates conditioned on budgets[j], on the inputs of the forward served by the
  nested rule with these offsets; ACM m's may depend on offsets[:, :m] only. weight:
  (batch, tokens) real-token mask. At level i the targets are `allocate`'s on the level's
  own scores at offset 0 (those of the per-ACM rule at B_i), and ACM m's offset is fitted
  with the k of levels < i as each token's floor: a floor above the target leaves the ACM
  over it (that level's calibration_fraction says by how much)."""
  for b in budgets:
    check_budget(b)
  if list(budgets) != sorted(set(budgets)):
    raise ValueError(f"nested calibration budgets must be increasing and distinct, got {list(budgets)}")
  weight = np.asarray(weight, np.float64).reshape(-1)
  if weight.sum() <= 0:
    raise ValueError("the calibration batch has no tokens (all token weights are zero)")
  shares = cost_shares(specs)
  rule = lambda score, offset, spec: np.clip(np.floor(score - offset + 0.5), spec.min_choice, spec.num_learners)
  fraction = lambda k, spec: float(k @ weight / weight.sum() / spec.num_learners)
  offsets = np.full((len(budgets), len(specs)), INACTIVE)
  levels = []
  for i, budget in enumerate(budgets):
    offsets[i] = 0.0
    start = scores(offsets)
    targets = allocate([fraction(rule(s[i].reshape(-1), 0.0, spec), spec) for s, spec in zip(start, specs)],
                       shares, budget)
    reached = np.zeros(len(specs))
    for m, spec in enumerate(specs):
      score = scores(offsets)[m].reshape(len(budgets), -1)
      floor = np.full(score.shape[1], float(spec.min_choice))
      for j in range(i):
        floor = np.maximum(floor, rule(score[j], offsets[j, m], spec))
      offsets[i, m], reached[m] = offset_for_fraction(score[i], weight, targets[m], spec.num_learners,
                                                      spec.min_choice, floor=floor)
    levels.append({"budgets": [float(b) for b in budgets[:i + 1]],
                   "level_offsets": [{s.path: float(o) for s, o in zip(specs, row)} for row in offsets[:i + 1]],
                   "offsets": {s.path: float(o) for s, o in zip(specs, offsets[i])},
                   "targets": {s.path: float(t) for s, t in zip(specs, targets)},
                   "calibration_fraction": float(shares @ reached)})
  return levels


# --- saved with the model -----------------------------------------------------------


def load(run_dir: Path) -> dict:
  """{rule: {budget key: calibration}} saved with the model in `run_dir`."""
  path = Path(run_dir) / FILE
  return json.loads(path.read_text()) if path.exists() else {}


def key(budget: float) -> str:
  return f"{budget:.4f}"


def saved(run_dir: Path, budget: float, rule: str, examples: int, chain: list[float] | None = None) -> dict | None:
  """The saved calibration of `rule` at `budget`; for rule "nested", only one fitted over the
  budgets `chain` (a level's offsets depend on every budget below it in its chain)."""
  found = load(run_dir).get(rule, {}).get(key(budget))
  if found is None or found["calibration_examples"] != examples:
    return None
  if rule == "nested" and [key(b) for b in found["chain"]] != [key(b) for b in chain]:
    return None
  return found


def check_servable(run_dir: Path, budgets: list[float], rule: str, examples: int, fit: bool,
                   conditioned: tuple[float, float] | None = None) -> None:
  """Before any work: a model without saved calibration serves no other budget unless fitting is
  allowed; a budget-conditioned model (`conditioned`: its trained range) serves budgets in its range.
  Rule "nested" is fitted over `budgets` together (their chain)."""
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
  missing = [b for b in budgets if saved(run_dir, b, rule, examples, sorted(budgets)) is None]
  if missing and not fit:
    raise ValueError(
        f"the model at {run_dir} has no saved {rule} calibration on {examples} examples for budgets {missing} "
        f"({Path(run_dir) / FILE}); drop --calibrate=false to fit it on the held-out calibration batch")


def calibrate(exp: phases.Experiment, params: PyTree, budget: float, examples: int = 256,
              rule: str = "per_acm", tolerance: float = 0.02) -> dict:
  """The calibration of `params` to `budget` on a held-out train batch (on top of the gates
  conditioned on `budget` when the model's are)."""
  check_budget(budget)
  if rule not in ("per_acm", "global"):
    raise ValueError(f"calibration rule {rule!r} is not fitted per budget; expected one of {RULES[:2]} "
                     "(rule nested: `calibrate_nested`)")
  batch = calibration_batch(exp, examples)
  found = {"rule": rule, "calibration_examples": examples}
  condition = budget if exp.config.budget_conditioning else None
  if rule == "global":
    fraction = compute_fraction_fn(exp, params, batch, condition)
    shift, reached = bisect(fraction, budget, tolerance / 2)
    return {**found, "cost_shift": float(shift), "calibration_fraction": float(reached)}
  scores = scores_fn(exp, params, batch, [condition])
  weight = _token_weight(exp, batch, scores, 1)
  return {**found, **fit_offsets(lambda o: [s[0] for s in scores(o[None])], weight, exp.task.acm_specs, budget)}


def calibrate_nested(exp: phases.Experiment, params: PyTree, budgets: list[float], examples: int = 256) -> dict:
  """{budget key: calibration} of `params` by the nested rule over `budgets` together, on a
  held-out train batch (level j on the gates conditioned on budgets[j] when the model's are)."""
  chain = sorted(check_budget(b) for b in budgets)
  batch = calibration_batch(exp, examples)
  conditions = [b if exp.config.budget_conditioning else None for b in chain]
  scores = scores_fn(exp, params, batch, conditions)
  levels = fit_nested_offsets(scores, _token_weight(exp, batch, scores, len(chain)), exp.task.acm_specs,
                              chain)
  return {key(b): {"rule": "nested", "calibration_examples": examples, "chain": chain, **level}
          for b, level in zip(chain, levels)}


def _token_weight(exp: phases.Experiment, batch: dict, scores: Callable, levels: int) -> np.ndarray:
  """(batch, tokens) real-token mask of the calibration batch (all ones where every token is real)."""
  real = steps.real_tokens(exp.task, batch)
  if real is not None:
    return np.asarray(real)
  return np.ones(scores(np.full((levels, len(exp.task.acm_specs)), INACTIVE))[0].shape[1:])


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
                       rule: str = "per_acm", fit: bool = True, chain: list[float] | None = None) -> dict:
  """The ACM evaluated at `budget` with its saved calibration (fitted and saved first
  when missing and `fit`), through the shared `phases.evaluate`; a budget-conditioned
  model's gates read `budget` (rule "none": nothing more). Rule "nested": the calibration
  fitted over the budgets `chain` together (default: `budget` alone), which holds `budget`."""
  run_dir = exp.run_dir("finetune")
  conditioned = exp.config.budget_range
  chain = sorted(chain or [budget])
  if rule == "nested" and key(budget) not in map(key, chain):
    raise ValueError(f"budget {budget} is not one of the nested calibration's budgets {chain}")
  check_servable(run_dir, chain if rule == "nested" else [budget], rule, examples, fit, conditioned)
  name = f"acm_any_b{budget:.3f}"
  condition = {} if conditioned is None else {"budget": budget}
  extra = {"eval_budget": budget, **({} if conditioned is None else {"budget_conditioning": list(conditioned)})}
  if rule == "none":
    return {**phases.evaluate(exp, params, name, "argmax", **condition), "rule": rule, **extra}
  found = saved(run_dir, budget, rule, examples, chain)
  if found is None:
    table = load(run_dir)
    if rule == "nested":  # a new chain replaces the old one: its levels' offsets differ
      table[rule] = calibrate_nested(exp, params, chain, examples)
    else:
      table.setdefault(rule, {})[key(budget)] = calibrate(exp, params, budget, examples, rule)
    phases.write_json(run_dir / FILE, table)
    found = table[rule][key(budget)]
  if rule == "global":
    record = phases.evaluate(exp, params, name, "argmax", cost_shift=found["cost_shift"], **condition)
  elif rule == "nested":
    levels = [b if conditioned is not None else None for b in found["budgets"]]
    with serve_levels(exp.task.acm_specs, found["level_offsets"], levels):  # traced in evaluate's jit
      record = phases.evaluate(exp, params, name, "argmax", **condition)
    if conditioned is not None:  # the gates run once per level (a plain model's once in all)
      extra_gates = (len(levels) - 1) * record["gate_gflops_per_image"]
      record = {**record, "gflops_per_image": record["gflops_per_image"] + extra_gates,
                "gate_gflops_per_image": record["gate_gflops_per_image"] + extra_gates,
                "nested_extra_gate_gflops_per_image": extra_gates}
  else:
    with serve(exp.task.acm_specs, found["offsets"], condition.get("budget")):  # traced in evaluate's jit
      record = phases.evaluate(exp, params, name, "argmax", **condition)
  return {**record, **found, **extra}
