"""Any-budget calibration: the per-ACM rule against brute-force references, and its bad inputs."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from acm_jax import transformer
from acm_jax.train import phases, steps
from acm_jax.train.config import ExperimentConfig
from acm_jax.vit import task as vit_task
from acm_jax.vit.baselines import calibration

N = 4


def spec(path, min_choice=0, cost=1.0):
  return steps.ACMSpec(path, "gelu", min_choice, cost, N, 1, 8)


def rule_in_words(s, offset, min_choice=0):
  """Learners for one token, by counting: the rule in words."""
  k = min_choice
  while k < N and s - offset >= k + 0.5:
    k += 1
  return k


def brute_fraction(score, weight, offset, min_choice=0):
  """The weighted mean of k / N, each token's k compared against every choice."""
  score, weight = np.asarray(score), np.asarray(weight)
  reached = score[:, None] - offset >= np.arange(1, N + 1) - 0.5  # (tokens, N): choice n is passed
  k = np.maximum(min_choice, np.where(np.all(reached, -1), N, np.argmin(reached, -1)))
  return float(weight @ k / weight.sum() / N)


def test_compute_score_is_the_expected_choice():
  logits = np.random.default_rng(0).normal(size=(7, N + 1))
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(calibration.compute_score(jnp.asarray(logits)), probs @ np.arange(N + 1), rtol=1e-5)


@pytest.mark.parametrize("min_choice", [0, 1])
def test_score_choices_count_like_the_rule_in_words(min_choice):
  rng = np.random.default_rng(1)
  score, offset = rng.uniform(0, N, 300), rng.normal()
  got = np.asarray(calibration.score_choices(jnp.asarray(score), offset, N, min_choice))
  assert got.tolist() == [rule_in_words(s, offset, min_choice) for s in score]
  assert brute_fraction(score, np.ones(300), offset, min_choice) == pytest.approx(got.mean() / N)


@pytest.mark.parametrize("seed, min_choice", [(0, 0), (1, 0), (2, 1)])
def test_offset_for_fraction_is_as_close_as_a_fine_grid_search(seed, min_choice):
  rng = np.random.default_rng(seed)
  score = rng.uniform(0, N, 400) ** rng.uniform(0.5, 2)  # skewed, as real gates are
  score = np.minimum(score, N)
  weight = (rng.uniform(size=400) > 0.2).astype(float)  # some padding
  grid = np.linspace(-N - 1, N + 1, 4001)
  values = [brute_fraction(score, weight, o, min_choice) for o in grid[::10]]
  assert all(a >= b for a, b in zip(values, values[1:]))  # non-increasing in the offset
  for target in (0.125, 0.3, 0.5, 0.77, 0.875):
    offset, reached = calibration.offset_for_fraction(score, weight, target, N, min_choice)
    assert reached == pytest.approx(brute_fraction(score, weight, offset, min_choice))
    best = min(abs(brute_fraction(score, weight, o, min_choice) - target) for o in grid[::4])
    assert abs(reached - target) <= best + 1e-12


@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5, 0.8, 0.95, 1.0])
def test_allocate_keeps_the_split_and_hits_the_budget(budget):
  base = np.array([0.6, 0.45, 0.3, 0.0])
  share = np.array([0.1, 0.2, 0.3, 0.4])
  got = calibration.allocate(base, share, budget)
  assert share @ got == pytest.approx(budget, abs=1e-9)
  assert np.all((got >= -1e-12) & (got <= 1 + 1e-12))
  # reference: the largest scale alpha on a fine grid whose capped split fits the budget
  alphas = np.linspace(0, 1 / 0.3, 200001)
  totals = (share[:3] * np.minimum(1.0, alphas[:, None] * base[:3])).sum(-1)
  if totals[-1] >= budget:  # the live ACMs absorb it: the dead one keeps nothing
    alpha = alphas[np.argmin(np.abs(totals - budget))]
    np.testing.assert_allclose(got, np.append(np.minimum(1.0, alpha * base[:3]), 0.0), atol=1e-4)
  else:  # every live ACM full, the dead one takes the rest
    np.testing.assert_allclose(got[:3], 1.0)
    assert got[3] == pytest.approx((budget - share[:3].sum()) / share[3])


def coupled_scores(seed, tokens=120):
  """Three ACMs whose scores depend on the earlier ACMs' choices, as layers do."""
  rng = np.random.default_rng(seed)
  raw = rng.uniform(0, N, (3, tokens))

  def scores(offsets):
    out, previous = [], np.zeros(tokens)
    for m in range(3):
      s = np.clip(raw[m] + 0.6 * (previous - 2), 0, N)
      out.append(s.reshape(1, tokens))
      previous = np.clip(np.floor(s - offsets[m] + 0.5), 0, N)
    return out

  return scores


@pytest.mark.parametrize("seed, budget", [(0, 0.25), (1, 0.5), (2, 0.7)])
def test_fit_offsets_matches_a_brute_force_search_over_offset_triples(seed, budget):
  scores = coupled_scores(seed)
  specs = (spec("a", cost=1.0), spec("b", cost=2.0), spec("c", cost=1.0))
  weight = np.ones((1, 120))
  found = calibration.fit_offsets(scores, weight, specs, budget)
  targets = np.array(list(found["targets"].values()))
  share = calibration.cost_shares(specs)
  assert share @ targets == pytest.approx(budget)

  def fractions(offsets):
    return np.array([brute_fraction(s.reshape(-1), weight.reshape(-1), o) for s, o in zip(scores(offsets), offsets)])

  got = fractions(np.array(list(found["offsets"].values())))
  assert share @ got == pytest.approx(found["calibration_fraction"])
  grid = np.linspace(-N - 1, N + 1, 21)
  best = min(np.abs(fractions(np.array(o)) - targets).max() for o in itertools.product(grid, repeat=3))
  assert np.abs(got - targets).max() <= best + 1e-12
  assert abs(found["calibration_fraction"] - budget) <= 0.02


def test_bad_budgets_and_empty_batches_are_refused_with_the_value(tmp_path):
  for bad in (0.0, -0.5, 1.2):
    with pytest.raises(ValueError, match=r"--eval_budget must be in \(0, 1\], got"):
      calibration.check_budget(bad)
  scores = coupled_scores(0)
  with pytest.raises(ValueError, match="no tokens"):
    calibration.fit_offsets(scores, np.zeros((1, 120)), (spec("a"), spec("b"), spec("c")), 0.5)
  with pytest.raises(ValueError, match="no tokens"):
    calibration.offset_for_fraction(np.ones(3), np.zeros(3), 0.5, N)
  with pytest.raises(ValueError, match="no saved per_acm calibration"):
    calibration.check_servable(tmp_path, [0.3], "per_acm", 256, fit=False)
  calibration.check_servable(tmp_path, [0.3], "per_acm", 256, fit=True)
  with pytest.raises(ValueError, match="unknown calibration rule"):
    calibration.check_servable(tmp_path, [0.3], "median", 256, fit=True)


@pytest.mark.parametrize("rule", ["per_acm", "global"])
def test_scanned_blocks_calibrate_and_serve_like_the_unrolled_model(rule):
  """The same params, unrolled and stacked: the same fitted calibration, and under `serve`
  the same logits and per-layer choices."""
  exps = {scan: vit_task.build(ExperimentConfig(model="tiny", dataset="synthetic", acm_attention=True, gate_depth=2,
                                                batch_size=8, eval_batch_size=8, scan_blocks=scan))
          for scan in (False, True)}
  unrolled = phases.init_params(exps[False], "acm", 0)
  params = {False: unrolled, True: transformer.stack_blocks(unrolled)}
  found = {scan: calibration.calibrate(exp, params[scan], 0.4, examples=16, rule=rule) for scan, exp in exps.items()}
  if rule == "global":
    assert found[True]["cost_shift"] == pytest.approx(found[False]["cost_shift"], abs=1e-6)
    return
  assert found[True]["offsets"] == pytest.approx(found[False]["offsets"], abs=1e-6)
  assert found[True]["calibration_fraction"] == pytest.approx(found[False]["calibration_fraction"])
  images = exps[False].task.inputs(calibration.calibration_batch(exps[False], 16))
  out = {}
  for scan, exp in exps.items():
    with calibration.serve(exp.task.acm_specs, found[False]["offsets"]):
      logits, aux = exp.task.acm_model.apply({"params": params[scan]}, images, mode="argmax", mutable=["acm"])
    out[scan] = logits, steps.acm_choices(exp.task, aux)
  np.testing.assert_allclose(out[True][0], out[False][0], atol=1e-5)
  for got, want in zip(out[True][1], out[False][1], strict=True):
    np.testing.assert_array_equal(got, want)
  assert 0.3 < found[False]["calibration_fraction"] < 0.5
