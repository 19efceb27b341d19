"""Any budget at inference: one finetuned ACM, one scalar shift of its gates.

Every gate's logit for choice k is lowered by lambda * k * learner_width / dim
(`cost_shift` of `acm.ACM`). For each token, the argmax over k of
(logit_k - lambda * c * k) cannot increase when lambda increases, so the mean
compute fraction is a non-increasing step function of lambda, and bisection
finds the lambda that puts it on a target budget B. The calibration batch comes
from the train split at steps past the end of training (not the test split).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from acm_jax import acm as acm_lib
from acm_jax.train import phases, steps
from acm_jax.pytree import PyTree

CALIBRATION_STEP = 10**7  # train-split batches this far out were never trained on


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
  best = min(((lo, f_lo), (hi, f_hi)), key=lambda p: abs(p[1] - target))
  for _ in range(max_iterations):
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


def calibration_batch(exp: phases.Experiment, examples: int) -> dict:
  if examples < 1:
    raise ValueError(f"the calibration batch has no tokens: --calibration_examples={examples}; give at least 1")
  cfg = exp.config
  batch = next(exp.iterator(cfg.dataset, "train", examples, image_size=cfg.image_size, seed=cfg.seed + 1,
                            data_dir=cfg.data_dir, start_step=CALIBRATION_STEP // examples))
  return batch


def compute_fraction_fn(exp: phases.Experiment, params: PyTree, batch: dict) -> Callable[[float], float]:
  """lambda -> mean compute fraction of the ACM (argmax gates) on `batch`."""
  images = exp.task.inputs(batch)
  if images.size == 0 or images.shape[0] == 0:
    raise ValueError("the calibration batch has no tokens (empty batch)")
  specs = exp.task.acm_specs

  @jax.jit
  def fraction(shift):
    _, aux = exp.task.acm_model.apply({"params": params}, images, mode="argmax", cost_shift=shift, mutable=["acm"])
    mean_k = [jnp.mean(jnp.argmax(c, -1)) for c in steps.acm_choices(exp.task, aux)]
    return acm_lib.compute_fraction(mean_k, [s.learner_cost for s in specs], [s.num_learners for s in specs])

  return lambda shift: float(fraction(jnp.float32(shift)))


def calibrate(exp: phases.Experiment, params: PyTree, budget: float, examples: int = 256,
              tolerance: float = 0.02) -> dict:
  """{"cost_shift", "calibration_fraction"} for `budget` on a held-out train batch."""
  if not 0.0 < budget <= 1.0:
    raise ValueError(f"--eval_budget must be in (0, 1], got {budget}")
  fraction = compute_fraction_fn(exp, params, calibration_batch(exp, examples))
  shift, reached = bisect(fraction, budget, tolerance / 2)
  return {"cost_shift": float(shift), "calibration_fraction": float(reached), "calibration_examples": examples}


def evaluate_at_budget(exp: phases.Experiment, params: PyTree, budget: float, examples: int = 256) -> dict:
  """The ACM evaluated with its gates shifted to `budget` (the shared `phases.evaluate`)."""
  found = calibrate(exp, params, budget, examples)
  record = phases.evaluate(exp, params, f"acm_any_b{budget:.3f}", "argmax", cost_shift=found["cost_shift"])
  return {**record, **found, "eval_budget": budget}

