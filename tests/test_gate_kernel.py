"""The Pallas gate+argmax kernel against a float32 argmax (interpret mode on CPU), and
the ACM module's fused-gate inference path against its XLA path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from acm_jax import acm
from pallas_kernels import gate


def gate_inputs(seed, tokens, dim, choices, dtype):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(tokens, dim)), dtype)
  w = jnp.asarray(rng.normal(size=(dim, choices)) / np.sqrt(dim), jnp.float32)
  b = jnp.asarray(0.5 * rng.normal(size=(choices,)), jnp.float32)
  return x, w, b


def float64_margin(x, w, b):
  """Gap between each token's two best logits, computed in float64."""
  logits = np.asarray(x, np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
  top2 = np.sort(logits, axis=-1)[:, -2:]
  return top2[:, 1] - top2[:, 0], logits.argmax(-1)


@pytest.mark.parametrize("tokens, dim, choices, dtype, block_rows", [
    (1, 16, 5, jnp.float32, 16),
    (127, 64, 5, jnp.float32, 64),
    (1000, 96, 3, jnp.float32, 32),
    (300, 768, 17, jnp.float32, 64),
    (1000, 384, 5, jnp.bfloat16, 64),
])
def test_gate_argmax_matches_float64_argmax(tokens, dim, choices, dtype, block_rows):
  x, w, b = gate_inputs(tokens + dim, tokens, dim, choices, dtype)
  w_rounded = w.astype(dtype)  # the kernel multiplies in x.dtype
  k = np.asarray(gate.gate_argmax(x, w, b, block_rows=block_rows))
  margin, expected = float64_margin(x, w_rounded, b)
  assert k.shape == (tokens,) and k.dtype == np.int32
  clear = margin > (1e-5 if dtype == jnp.float32 else 1e-2)  # float32-accumulation ties aside
  assert clear.mean() > 0.95
  np.testing.assert_array_equal(k[clear], expected[clear])
  assert tokens == 1 or len(np.unique(k)) > 1  # the inputs exercise several choices


def test_gate_argmax_ties_and_excluded_choices():
  x = jax.random.normal(jax.random.key(0), (40, 32))
  w = jnp.zeros((32, 5))
  # all logits equal the bias: choices 1 and 3 tie for the maximum, the first wins
  b = jnp.array([0.0, 2.0, 1.0, 2.0, -1.0])
  np.testing.assert_array_equal(gate.gate_argmax(x, w, b), np.ones(40))
  # a -inf bias removes a choice even when it would win
  b = jnp.array([0.0, -jnp.inf, 1.0, -jnp.inf, -1.0])
  np.testing.assert_array_equal(gate.gate_argmax(x, w, b), np.full(40, 2))


def test_gate_argmax_bad_inputs():
  x, w, b = gate_inputs(0, 8, 32, 5, jnp.float32)
  with pytest.raises(ValueError, match="d divisible by 16"):
    gate.gate_argmax(x[:, :24], w[:24], b)
  with pytest.raises(ValueError, match=r"b must have shape \(5,\)"):
    gate.gate_argmax(x, w, b[:4])
  with pytest.raises(ValueError, match="w must be"):
    gate.gate_argmax(x, w[:16], b)
  with pytest.raises(ValueError, match="x must be"):
    gate.gate_argmax(x[0], w, b)
  with pytest.raises(ValueError, match="bfloat16 or float32"):
    gate.gate_argmax(x.astype(jnp.float16), w, b)
  with pytest.raises(ValueError, match="block_rows"):
    gate.gate_argmax(x, w, b, block_rows=24)


@pytest.mark.parametrize("min_choice, cost_shift", [(0, 0.0), (0, 0.7), (1, -0.3)])
def test_acm_module_fused_gate_matches_xla_path(monkeypatch, min_choice, cost_shift):
  dim, n, width = 32, 4, 16
  x = jax.random.normal(jax.random.key(0), (2, 9, dim))
  calls = []
  original = gate.gate_argmax
  monkeypatch.setattr(gate, "gate_argmax", lambda *a, **kw: calls.append(1) or original(*a, **kw))
  outputs = {}
  for impl in ("xla", "pallas"):
    module = acm.ACM(dim, n, width, min_choice=min_choice, impl=impl)
    variables = {"params": module.init(jax.random.key(1), x)["params"]}
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    variables = jax.tree.unflatten(tree, [jax.random.normal(k, l.shape) / 4 for k, l in zip(keys, leaves)])
    outputs[impl] = module.apply(variables, x, cost_shift=cost_shift)
    _, state = module.apply(variables, x, cost_shift=cost_shift, mutable=["acm"])
    k = np.argmax(state["acm"]["choice"][0], -1)
    assert len(np.unique(k)) > 1 and k.min() >= min_choice
  assert calls, "the pallas impl did not take the fused gate path"
  np.testing.assert_allclose(outputs["pallas"], outputs["xla"], rtol=1e-5, atol=1e-5)
