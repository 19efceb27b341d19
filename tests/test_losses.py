"""Losses against hand-computed values, hand-made error tables and gradient signs."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from acm_jax import losses


@pytest.mark.parametrize("errors, ours, official", [
    # every learner helps a lot -> N under both rules
    ([10.0, 5.0, 2.5, 1.2, 0.5], 4, 4),
    # learners 3 and 4 bring < 1.2x: ours stops at 2; official labels first i+1 = 3
    ([10.0, 5.0, 2.5, 2.4, 2.3], 2, 3),
    # nothing helps (output already ~ right): ours skips (0); official collides to N
    ([1.0, 0.99, 0.98, 0.97, 0.96], 0, 4),
    # small gain at step 2 but a big one later: ours must not stop early (4); official stops (2)
    ([10.0, 5.0, 4.9, 1.0, 0.9], 3, 2),
    # only the last learner matters
    ([8.0, 8.0, 8.0, 8.0, 1.0], 4, 4),
])
def test_gate_labels_on_hand_made_tables(errors, ours, official):
  table = jnp.asarray([errors])
  assert int(losses.gate_labels(table, 1.2, "ours")[0]) == ours
  assert int(losses.gate_labels(table, 1.2, "official")[0]) == official


def test_gate_labels_ours_is_brute_force_definition():
  rng = np.random.default_rng(0)
  errors = np.sort(rng.uniform(0.1, 10, size=(500, 5)), axis=1)[:, ::-1] * rng.uniform(0.9, 1.1, size=(500, 5))
  got = np.asarray(losses.gate_labels(jnp.asarray(errors), 1.3, "ours"))
  for row, label in zip(errors, got):
    expect = next(k for k in range(5) if all(row[j] / row[j + 1] < 1.3 for j in range(k, 4)))
    assert label == expect
  with pytest.raises(ValueError, match="label rule"):
    losses.gate_labels(jnp.asarray(errors), 1.3, "mine")


def one_hots(ks, n=4):
  return jax.nn.one_hot(jnp.asarray(ks), n + 1)


def test_compute_fraction_and_budget_loss_by_hand():
  # two ACMs, costs 1 and 3; batch 1, tokens 2
  choices = [one_hots([[0, 4]]), one_hots([[2, 2]])]
  # spent = mean k: 2 * 1 + 2 * 3 = 8; total = 4 * 1 + 4 * 3 = 16
  assert float(losses.compute_fraction(choices, [1.0, 3.0])) == pytest.approx(0.5)
  assert float(losses.budget_loss(choices, [1.0, 3.0], 0.25, "l1")) == pytest.approx(0.25)
  assert float(losses.budget_loss(choices, [1.0, 3.0], 0.25, "l2")) == pytest.approx(0.0625)
  assert float(losses.budget_loss(choices, [1.0, 3.0], 0.25, "l2_100")) == pytest.approx(625.0)
  # gradient sign: above budget, raising the probability of a larger k increases the loss
  logits = jnp.zeros((1, 2, 5))
  grad = jax.grad(lambda lg: losses.budget_loss([jax.nn.softmax(lg)], [1.0], 0.1))(logits)
  assert float(grad[0, 0, 4]) > 0 > float(grad[0, 0, 0])
  with pytest.raises(ValueError, match="budget loss"):
    losses.budget_loss(choices, [1.0, 3.0], 0.5, "l3")


def test_entropy_loss_by_hand():
  # one ACM, two samples of 4 tokens: sample 0 all k=1 (entropy 0), sample 1 uniform over 4 choices
  choices = [one_hots([[1, 1, 1, 1], [0, 1, 2, 3]])]
  expected = -np.mean([0.0, np.log(4) / np.log(5)])
  assert float(losses.entropy_loss(choices)) == pytest.approx(expected, rel=1e-6)
  # gradient sign: spreading a collapsed sample's choices lowers the loss
  logits = jnp.stack([jnp.zeros(5).at[1].set(3.0)] * 4)[None]
  grad = jax.grad(lambda lg: losses.entropy_loss([jax.nn.softmax(lg)]))(logits)
  assert float(grad[0, 0, 1]) > 0


def test_diversity_loss_by_hand():
  choices = [one_hots([[0, 0], [4, 4], [2, 2]]), one_hots([[0, 0], [4, 4], [1, 3]])]
  # per-sample c = mean over acms, tokens, slots of p_k * k = mean k / (N+1)
  c = np.array([0.0, 4.0, 2.0]) / 5
  expected = -2.0 * np.mean([abs(a - b) for a, b in itertools.product(c, c)])
  assert float(losses.diversity_loss(choices)) == pytest.approx(expected, rel=1e-6)


def test_distillation_and_classification_losses():
  rng = np.random.default_rng(1)
  prefix, target = rng.normal(size=(3, 5, 6)), rng.normal(size=(3, 6))
  expected = np.mean([(prefix[:, k] - target) ** 2 for k in range(1, 5)])
  assert float(losses.distillation_loss(jnp.asarray(prefix), jnp.asarray(target))) == pytest.approx(expected, rel=1e-5)
  errors = losses.choice_errors(jnp.asarray(prefix), jnp.asarray(target))
  np.testing.assert_allclose(errors, np.linalg.norm(prefix - target[:, None], axis=-1), rtol=1e-5)
  logits, labels = rng.normal(size=(4, 3)), np.array([0, 2, 1, 1])
  smooth = 0.1
  target = np.full((4, 3), smooth / 3) + np.eye(3)[labels] * (1 - smooth)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = -np.mean(np.sum(target * logp, -1))
  got = losses.classification_loss(jnp.asarray(logits), jnp.asarray(labels), smooth)
  assert float(got) == pytest.approx(expected, rel=1e-5)


def test_masked_losses_equal_the_losses_of_the_unpadded_samples():
  """Padding tokens (mask 0) must change nothing: each masked loss against a float64
  reference computed sample by sample on the real tokens only."""
  rng = np.random.default_rng(0)
  lengths, tokens, n = [5, 2, 4], 5, 4
  mask = (np.arange(tokens)[None] < np.array(lengths)[:, None]).astype(np.float32)
  choices = [jax.nn.softmax(jnp.asarray(rng.normal(size=(3, tokens, n + 1)), jnp.float32) * 2) for _ in range(2)]
  costs = [1.0, 3.0]
  real = [[np.asarray(c[b, :lengths[b]], np.float64) for b in range(3)] for c in choices]  # [acm][sample]
  k = np.arange(n + 1)
  spent = sum(cost * np.mean(np.concatenate([r @ k for r in per_sample]))
              for cost, per_sample in zip(costs, real))
  fraction = spent / (n * sum(costs))
  assert float(losses.compute_fraction(choices, costs, jnp.asarray(mask))) == pytest.approx(fraction, rel=1e-5)
  assert float(losses.budget_loss(choices, costs, 0.3, "l1", jnp.asarray(mask))) == pytest.approx(
      abs(fraction - 0.3), rel=1e-4)
  entropies = []
  for per_sample in real:
    for r in per_sample:
      dist = r.mean(0)
      entropies.append(-np.sum(dist * np.log(dist)) / np.log(n + 1))
  assert float(losses.entropy_loss(choices, jnp.asarray(mask))) == pytest.approx(-np.mean(entropies), rel=1e-5)
  c = [np.mean([np.mean(real[a][b] * k) for a in range(2)]) for b in range(3)]
  expected = -2.0 * np.mean([abs(x - y) for x, y in itertools.product(c, c)])
  assert float(losses.diversity_loss(choices, jnp.asarray(mask))) == pytest.approx(expected, rel=1e-5)
  # distillation and gate losses: means over real tokens only
  prefix = rng.normal(size=(3, tokens, n + 1, 6)).astype(np.float32)
  target = rng.normal(size=(3, tokens, 6)).astype(np.float32)
  mse = np.mean(np.concatenate([np.square(prefix[b, :lengths[b], 1:] - target[b, :lengths[b], None]).ravel()
                                for b in range(3)]).astype(np.float64))
  assert float(losses.distillation_loss(jnp.asarray(prefix), jnp.asarray(target), jnp.asarray(mask))) == (
      pytest.approx(mse, rel=1e-5))
  logits = rng.normal(size=(3, tokens, n + 1)).astype(np.float32)
  labels = rng.integers(0, n + 1, size=(3, tokens))
  log_p = logits - np.log(np.sum(np.exp(logits.astype(np.float64)), -1, keepdims=True))
  nll = np.concatenate([-np.take_along_axis(log_p[b, :lengths[b]], labels[b, :lengths[b], None], -1).ravel()
                        for b in range(3)])
  assert float(losses.gate_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))) == (
      pytest.approx(nll.mean(), rel=1e-5))
  # an all-ones mask is the unmasked loss
  ones = jnp.ones((3, tokens))
  for fn in (losses.entropy_loss, losses.diversity_loss):
    assert float(fn(choices, ones)) == pytest.approx(float(fn(choices)), rel=1e-6)


def official_labels_reference(row, factor):
  """The public rule in plain Python floats: 0/0 is NaN and x/0 is inf, neither below the factor."""
  def ratio(a, b):
    if b == 0.0:
      return math.nan if a == 0.0 else math.inf
    return a / b
  n = len(row) - 1
  below = [ratio(row[i], row[i + 1]) < factor for i in range(n)]
  first = below.index(True) if any(below) else 0
  return n if first == 0 else first + 1


@pytest.mark.parametrize("errors, official", [
    ([1.0, 0.0, 0.0, 0.0, 0.0], 4),  # ratios inf, 0/0, 0/0, 0/0: nothing below 1.2
    ([2.0, 1.0, 0.0, 0.0, 0.0], 4),  # 2, inf, NaN, NaN
    ([3.0, 3.0, 0.0, 0.0, 0.0], 4),  # first ratio 1 < 1.2: i = 0 collides with "none"
    ([4.0, 2.0, 2.0, 0.0, 0.0], 2),  # 2, 1 (< 1.2 at i = 1: label i + 1), inf, NaN
    ([0.0, 0.0, 0.0, 0.0, 0.0], 4),
])
def test_official_label_rule_on_zero_errors(errors, official):
  assert official_labels_reference(errors, 1.2) == official
  assert int(losses.gate_labels(jnp.asarray([errors]), 1.2, "official")[0]) == official


def test_official_label_rule_matches_reference_on_random_tables_with_zeros():
  rng = np.random.default_rng(1)
  errors = rng.choice([0.0, 0.5, 1.0, 1.1, 2.0, 3.0], size=(400, 5))
  got = np.asarray(losses.gate_labels(jnp.asarray(errors, jnp.float32), 1.2, "official"))
  np.testing.assert_array_equal(got, [official_labels_reference(list(r), 1.2) for r in errors])


def _learners(rng, dim, num_learners, width, with_bias):
  params = {"w1": rng.normal(size=(dim, num_learners * width)), "b1": rng.normal(size=(num_learners * width,)),
            "w2": 0.3 * rng.normal(size=(num_learners * width, dim))}
  if with_bias:
    params["b2"] = rng.normal(size=(num_learners + 1, dim))
  return {name: jnp.asarray(value, jnp.float32) for name, value in params.items()}


@pytest.mark.parametrize("activation, grad_mode, with_bias, with_mask", [
    ("gelu", "detach", True, True), ("gelu", "no_detach", False, True),
    ("identity", "detach", False, False), ("identity", "no_detach", True, False)])
def test_learner_distillation_loss_equals_the_prefix_route(activation, grad_mode, with_bias, with_mask):
  """The fused loss (choice axis leading) against distillation_loss(prefix_outputs(...)): value
  and gradients of every parameter, in float32 on random inputs, with and without a token mask."""
  from acm_jax import acm
  rng = np.random.default_rng(7)
  dim, n, width = 6, 3, 8
  params = _learners(rng, dim, n, width, with_bias)
  x, y = (jnp.asarray(rng.normal(size=(2, 5, dim)), jnp.float32) for _ in range(2))
  mask = jnp.asarray(rng.integers(0, 2, (2, 5)), jnp.float32).at[0, 0].set(1.0) if with_mask else None
  settings = dict(num_learners=n, activation=activation, grad_mode=grad_mode)
  reference = lambda p: losses.distillation_loss(acm.prefix_outputs(p, x, **settings), y, mask)
  fused = lambda p: losses.learner_distillation_loss(p, x, y, mask, **settings)
  (want, want_grads), (got, got_grads) = jax.value_and_grad(reference)(params), jax.value_and_grad(fused)(params)
  assert float(got) == pytest.approx(float(want), rel=1e-5)
  for name in params:
    np.testing.assert_allclose(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-5, err_msg=name)
  # by hand: mean over k = 1..N and over real tokens of |sum_{n<=k} s_n(x) + b2[0] + ... + b2[k] - y|^2
  hidden = np.asarray(acm.get_activation(activation)(x @ params["w1"] + params["b1"]))
  outs = [hidden[..., i * width:(i + 1) * width] @ np.asarray(params["w2"])[i * width:(i + 1) * width]
          for i in range(n)]
  bias = np.cumsum(np.asarray(params.get("b2", np.zeros((n + 1, dim)))), axis=0)
  weight = np.ones((2, 5)) if mask is None else np.asarray(mask)
  squares = [np.sum((sum(outs[:k]) + bias[k] - np.asarray(y)) ** 2, axis=-1) for k in range(1, n + 1)]
  expected = sum(np.sum(sq * weight) for sq in squares) / (n * dim * weight.sum())
  assert float(got) == pytest.approx(expected, rel=1e-4)


def test_learner_distillation_loss_runs_the_matmuls_in_the_input_dtype():
  """bfloat16 activations with float32 master weights: the learners run in bfloat16 (as acm.ACM
  does), accumulate and compare in float32. Reference: float32 math on the weights and inputs
  rounded to bfloat16."""
  rng = np.random.default_rng(3)
  params = _learners(rng, 16, 2, 16, True)
  x = jnp.asarray(rng.normal(size=(4, 16)), jnp.bfloat16)
  y = jnp.asarray(rng.normal(size=(4, 16)), jnp.bfloat16)
  got = losses.learner_distillation_loss(params, x, y, num_learners=2, activation="identity")
  rounded = {k: v.astype(jnp.bfloat16).astype(jnp.float32) for k, v in params.items()}
  want = losses.learner_distillation_loss(rounded, x.astype(jnp.float32), y.astype(jnp.float32), num_learners=2,
                                          activation="identity")
  assert got.dtype == jnp.float32
  assert float(got) == pytest.approx(float(want), rel=2e-2)
  with pytest.raises(ValueError, match="unknown grad_mode 'half'"):
    losses.learner_distillation_loss(params, x, y, num_learners=2, grad_mode="half")
