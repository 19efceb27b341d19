"""benchmarks/launch_probe.py on the CPU: the Pallas chain (interpret mode) computes what the XLA
chain and plain numpy compute, and the slope fit returns the per-step cost it is given."""

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import launch_probe as lp


def test_chains_agree_with_numpy():
  x = jax.random.normal(jax.random.key(0), (130, 768), jnp.float32)  # 130: a partial last row block
  expect = np.asarray(x, np.float64)
  for _ in range(3):
    expect = expect * 0.5 + 1.0
  for step in (lp.pallas_step, lp.xla_step):
    out = lp.chain(step, 3, interpret=True)(x)
    np.testing.assert_allclose(np.asarray(out), expect, rtol=1e-6)


def test_slope_recovers_a_linear_cost():
  rng = np.random.default_rng(0)
  per_step, base = rng.uniform(0.001, 0.02), rng.uniform(0.05, 0.5)
  lengths = [8, 32, 96]
  assert abs(lp.slope(lengths, [base + per_step * n for n in lengths]) - per_step) < 1e-9
