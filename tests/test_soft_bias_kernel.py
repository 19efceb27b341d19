"""The soft choice bias' backward kernel (`pallas_kernels.soft_bias`) against plain jnp.

Pallas interpret mode on the CPU fills kernel outputs with NaN before the kernel runs
(`test_acm_mlp_kernel.test_interpreter_poisons_outputs`), so an element the kernel leaves unwritten
fails the comparison. The GPU run (`benchmarks/RESULTS.md`, 2026-12-04) compiles it with Triton.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from acm_jax import acm
from pallas_kernels import soft_bias as sb


def rel_err(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(out - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize("tokens,dim,choices,dtype", [
    (1, 64, 5, jnp.float32),
    (197, 768, 5, jnp.float32),  # ViT-B/16, one image
    (1576, 96, 5, jnp.bfloat16),  # a block count that ends mid-block (1,576 = 24.6 x 64)
    (300, 48, 16, jnp.bfloat16),  # the most choices the padding holds; a width under one column chunk
])
def test_kernel_matches_the_reference(tokens, dim, choices, dtype):
  rng = np.random.default_rng(tokens + dim)
  g = jnp.asarray(rng.normal(size=(tokens, dim)), dtype)
  at_least = jnp.asarray(rng.uniform(0.05, 1.0, size=(tokens, choices)), dtype)
  b2 = jnp.asarray(rng.normal(size=(choices, dim)), dtype)
  got = sb.soft_bias_grads(g, at_least, b2, interpret=True)
  want = sb.soft_bias_grads_reference(g, at_least, b2)
  for name, a, b in zip(("d_at_least", "d_b2"), got, want, strict=True):
    assert a.shape == b.shape and a.dtype == jnp.float32, name
    assert np.all(np.isfinite(np.asarray(a))), name  # every element written
    assert rel_err(a, b) < (1e-5 if dtype == jnp.float32 else 1e-2), name


def test_kernel_refuses_what_it_cannot_take():
  g, at, b2 = jnp.ones((8, 64)), jnp.ones((8, 5)), jnp.ones((5, 64))
  with pytest.raises(ValueError, match="at most 16 choices, got 17"):
    sb.soft_bias_grads(jnp.ones((8, 64)), jnp.ones((8, 17)), jnp.ones((17, 64)), interpret=True)
  with pytest.raises(ValueError, match="width divisible by 16, got 40"):
    sb.soft_bias_grads(jnp.ones((8, 40)), at, jnp.ones((5, 40)), interpret=True)
  with pytest.raises(ValueError, match=r"at_least \(8, 4\)"):
    sb.soft_bias_grads(g, jnp.ones((8, 4)), b2, interpret=True)


def test_switch_off_the_gpu_keeps_the_xla_backward():
  """Off a GPU the switch (default, on, off) changes nothing: soft_choice_bias' VJP equals autodiff of the
  plain sum in float64 either way."""
  with jax.enable_x64():
    rng = np.random.default_rng(3)
    b2 = jnp.asarray(rng.normal(size=(5, 32)))
    at_least = jnp.asarray(rng.uniform(size=(2, 7, 5)))
    g = jnp.asarray(rng.normal(size=(2, 7, 32)))
    plain = lambda b2, a: jnp.einsum("...j,jd->...d", a, b2)
    want = jax.vjp(plain, b2, at_least)[1](g)
    for enabled in (None, True, False):
      with acm.soft_bias_kernel(enabled):
        got = jax.vjp(acm.soft_choice_bias, b2, at_least)[1](g)
      for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
