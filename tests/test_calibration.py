"""Any-budget calibration: the per-ACM rule against brute-force references, and its bad inputs."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from acm_jax import acm, transformer
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


# --- the nested rule ----------------------------------------------------------------------------


def numpy_scores(logits):
  """Expected choice of (..., N+1) logits, in float64."""
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True)) @ np.arange(N + 1)


def numpy_k(score, offset, min_choice=0):
  return np.clip(np.floor(score - offset + 0.5), min_choice, N)


def numpy_targets(base, share, budget):
  """`allocate` by bisection on alpha in plain numpy (no ACM here is ever dead or all full)."""
  lo, hi = 0.0, 1.0 / base.min()
  for _ in range(200):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if share @ np.minimum(1, mid * base) < budget else (lo, mid)
  return np.minimum(1, hi * base)


def numpy_nested(scores, weight, min_choices, share, budgets):
  """The nested fitting rule by exhaustive search: scores (levels, ACMs, tokens) read on fixed
  inputs; at level i each ACM's offset is, among every offset where its fraction can change, one
  whose fraction with the lower levels' k as floor is closest to the level's target. Returns the
  reached fractions (levels, ACMs), the targets and the distance the best offset leaves."""
  levels, acms, _ = scores.shape
  floors = np.array([np.full(scores.shape[-1], float(c)) for c in min_choices])
  reached, targets, gaps = np.zeros((levels, acms)), np.zeros((levels, acms)), np.zeros((levels, acms))
  for i, budget in enumerate(budgets):
    base = np.array([weight @ numpy_k(scores[i, m], 0.0, c) / weight.sum() / N for m, c in enumerate(min_choices)])
    targets[i] = numpy_targets(base, share, budget)
    for m, c in enumerate(min_choices):
      edges = (scores[i, m][:, None] - np.arange(1, N + 1) + 0.5).reshape(-1)
      candidates = np.concatenate([edges, edges + 1e-9, edges - 1e-9, [-N - 1.0, N + 1.0]])
      fractions = [weight @ np.maximum(floors[m], numpy_k(scores[i, m], o, c)) / weight.sum() / N
                   for o in candidates]
      best = candidates[np.argmin(np.abs(np.array(fractions) - targets[i, m]))]
      gaps[i, m] = np.abs(np.array(fractions) - targets[i, m]).min()
      floors[m] = np.maximum(floors[m], numpy_k(scores[i, m], best, c))
      reached[i, m] = weight @ floors[m] / weight.sum() / N
  return reached, targets, gaps


@pytest.mark.parametrize("seed, conditioned", [(0, True), (1, True), (2, False)])
def test_nested_offsets_match_a_numpy_search_and_k_never_falls_as_the_budget_rises(seed, conditioned):
  """Random gate logits per level (a budget-conditioned gate reads each budget differently; a
  plain one the same) on fixed inputs: every level as close to its targets as an exhaustive
  search, and every token's k non-decreasing in the budget in every ACM."""
  rng = np.random.default_rng(seed)
  budgets = [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875]
  specs = (spec("a", cost=1.0), spec("b", min_choice=1, cost=2.0), spec("c", cost=1.5))
  tokens = 150
  logits = 1.5 * rng.normal(size=(1 if not conditioned else len(budgets), 3, tokens, N + 1))
  logits = logits + np.linspace(-1, 1, len(budgets))[:, None, None, None] * np.arange(N + 1) * conditioned
  logits[:, 1, :, 0] = -np.inf  # min_choice 1 masks k = 0, as apply_gate does
  scores = np.broadcast_to(numpy_scores(logits), (len(budgets), 3, tokens))
  weight = (rng.uniform(size=(1, tokens)) > 0.1).astype(float)
  levels = calibration.fit_nested_offsets(lambda o: [scores[:, m][:, None] for m in range(3)], weight, specs, budgets)
  share = calibration.cost_shares(specs)
  reached, targets, gaps = numpy_nested(scores, weight.reshape(-1), [0, 1, 0], share, budgets)
  w = weight.reshape(-1)
  previous = [np.zeros(tokens)] * 3
  for i, level in enumerate(levels):
    assert level["budgets"] == budgets[:i + 1]
    np.testing.assert_allclose(list(level["targets"].values()), targets[i], atol=1e-9)
    offsets = np.array([list(o.values()) for o in level["level_offsets"]])  # (i + 1, ACMs)
    got = []
    for m, s in enumerate(specs):
      k = np.max([numpy_k(scores[j, m], offsets[j, m], s.min_choice) for j in range(i + 1)], axis=0)
      assert np.all(k >= previous[m])  # no token loses a learner as the budget rises
      previous[m] = k
      got.append(w @ k / w.sum() / N)
      assert abs(got[m] - targets[i, m]) <= gaps[i, m] + 1e-12
    np.testing.assert_allclose(got, reached[i], atol=1e-12)
    assert level["calibration_fraction"] == pytest.approx(share @ np.array(got))
    if budgets[i] >= 0.25:  # below, ACM b's min_choice of 1 alone costs 0.11 of the whole
      assert abs(level["calibration_fraction"] - budgets[i]) <= 0.03


@pytest.mark.parametrize("seed, budget", [(0, 0.25), (1, 0.6)])
def test_nested_with_one_budget_is_the_per_acm_rule(seed, budget):
  scores = coupled_scores(seed)
  specs = (spec("a", cost=1.0), spec("b", cost=2.0), spec("c", cost=1.0))
  weight = np.ones((1, 120))
  per_acm = calibration.fit_offsets(scores, weight, specs, budget)
  (nested,) = calibration.fit_nested_offsets(lambda o: [s[None] for s in scores(o[0])], weight, specs, [budget])
  assert nested["offsets"] == per_acm["offsets"] and nested["targets"] == per_acm["targets"]
  assert nested["level_offsets"] == [per_acm["offsets"]]


def test_nested_bad_input_is_refused_with_the_value(tmp_path):
  scores = lambda o: [np.ones((len(o), 1, 4))]
  specs = (spec("a"),)
  for budgets, message in (([0.0, 0.5], r"must be in \(0, 1\], got 0.0"), ([0.25, 1.5], "got 1.5"),
                           ([0.5, 0.25], "increasing and distinct"), ([0.25, 0.25], "increasing and distinct")):
    with pytest.raises(ValueError, match=message):
      calibration.fit_nested_offsets(scores, np.ones((1, 4)), specs, budgets)
  with pytest.raises(ValueError, match="no tokens"):
    calibration.fit_nested_offsets(scores, np.zeros((1, 4)), specs, [0.25, 0.5])
  with pytest.raises(ValueError, match="no saved nested calibration"):
    calibration.check_servable(tmp_path, [0.25, 0.5], "nested", 256, fit=False)
  # a calibration fitted over another chain of budgets is not this one's
  calibration.phases.write_json(tmp_path / calibration.FILE, {"nested": {"0.2500": {
      "calibration_examples": 256, "chain": [0.25, 0.75], "offsets": {}}}})
  assert calibration.saved(tmp_path, 0.25, "nested", 256, [0.25, 0.75]) is not None
  assert calibration.saved(tmp_path, 0.25, "nested", 256, [0.25, 0.5]) is None


def test_nested_in_a_model_scanned_or_not_and_the_first_acm_never_loses_a_learner():
  """A tiny budget-conditioned ViT with random FiLM layers: the nested calibration fitted on the
  unrolled and on the scanned layout agree, and served level by level on the calibration batch
  the first ACM's k (whose input no budget changes) is non-decreasing per token."""
  exps = {scan: vit_task.build(ExperimentConfig(model="tiny", dataset="synthetic", gate_depth=2, batch_size=8,
                                                eval_batch_size=8, scan_blocks=scan, budget_conditioning=True))
          for scan in (False, True)}
  unrolled = phases.init_params(exps[False], "acm", 0)
  leaves, tree = jax.tree_util.tree_flatten_with_path(unrolled)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  unrolled = jax.tree.unflatten(tree, [v + 0.5 * jax.random.normal(k, v.shape)
                                       if "budget_film" in jax.tree_util.keystr(p) else v
                                       for (p, v), k in zip(leaves, keys)])
  params = {False: unrolled, True: transformer.stack_blocks(unrolled)}
  budgets = [0.25, 0.5, 0.75]
  found = {scan: calibration.calibrate_nested(exp, params[scan], budgets, examples=16) for scan, exp in exps.items()}
  for b in map(calibration.key, budgets):
    assert found[True][b]["level_offsets"] == pytest.approx(found[False][b]["level_offsets"], abs=1e-6)
  exp = exps[False]
  images = exp.task.inputs(calibration.calibration_batch(exp, 16))
  first = []
  for b in budgets:
    level = found[False][calibration.key(b)]
    assert abs(level["calibration_fraction"] - b) <= 0.05
    with calibration.serve_levels(exp.task.acm_specs, level["level_offsets"], level["budgets"]), acm.with_budget(b):
      _, aux = exp.task.acm_model.apply({"params": params[False]}, images, mode="argmax", mutable=["acm"])
    first.append(np.argmax(np.asarray(steps.acm_choices(exp.task, aux)[0]), -1))
  assert np.all(np.diff(np.stack(first), axis=0) >= 0)
  assert not np.array_equal(first[0], first[-1])
