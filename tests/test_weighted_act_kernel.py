"""The MLP ACM's weighted-activation kernels (`pallas_kernels.weighted_act`) against plain jnp.

Pallas interpret mode on the CPU fills kernel outputs with NaN before the kernel runs
(`test_acm_mlp_kernel.test_interpreter_poisons_outputs`), so an element the kernels leave
unwritten fails the comparisons. The GPU runs (benchmarks/RESULTS.md, 2026-12-04 (i)) compile them
with Triton, where the reciprocal is the hardware's approximate one; here it is a division.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from acm_jax import acm
from acm_jax import transformer
from acm_jax.acmize import flatten
from acm_jax.vit import model as vit
from pallas_kernels import weighted_act as wa


def rel_err(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def _inputs(tokens, learners, width, dtype, seed=0):
  rng = np.random.default_rng(seed + tokens + width)
  pre = jnp.asarray(rng.normal(size=(tokens, learners * width)) * 2.5, dtype)
  b1 = jnp.asarray(rng.normal(size=(learners * width,)) * 0.5, dtype)
  weight_t = jnp.asarray(rng.uniform(0.05, 1.0, size=(learners, tokens)), dtype)
  grad = jnp.asarray(rng.normal(size=(tokens, learners * width)), dtype)
  return pre, b1, weight_t, grad


@pytest.mark.parametrize("tokens,learners,width,dtype,activation", [
    (16, 4, 16, jnp.float32, "gelu"),
    (208, 4, 96, jnp.float32, "gelu"),  # 13 row blocks of 16; a width of 96 = three column blocks of 32
    (1584, 4, 768, jnp.bfloat16, "gelu"),  # ViT-B/16's MLP learners, 8 images of 198 tokens
    (48, 3, 32, jnp.float32, "gelu_tanh"),
    (32, 2, 48, jnp.bfloat16, "relu"),
])
def test_kernels_match_the_reference(tokens, learners, width, dtype, activation):
  pre, b1, weight_t, grad = _inputs(tokens, learners, width, dtype)
  want = wa.reference(pre, b1, weight_t, grad, activation=activation)
  hidden = wa.forward(pre, b1, weight_t, activation=activation, interpret=True)
  got = wa.backward(pre, b1, weight_t, grad, activation=activation, interpret=True)
  # bf16 outputs: their rounding (2^-9 relative) is the error; the float32 sums are exact to ~1e-6
  tol = {jnp.float32: 1e-6, jnp.bfloat16: 4e-3}[dtype]
  for name, a, b, t in zip(("forward", "hidden", "d_pre", "d_weight^T", "d_b1"), (hidden, *got), (want[0], *want),
                           (tol, tol, tol, 1e-6, 1e-6), strict=True):
    assert a.shape == b.shape, name
    assert np.all(np.isfinite(np.asarray(a, np.float32))), name  # every element written
    assert rel_err(a, b) < t, (name, rel_err(a, b))
  assert got[2].dtype == jnp.float32 and got[3].dtype == jnp.float32 and got[1].dtype == dtype


def test_gelu_fit_against_float64():
  """Phi's absolute error at most ~1e-7 (the fit's 7.5e-8 plus float32 rounding) on [-12, 12], so x Phi(x)'s
  within 2.5e-7 max(|x|, 1) (float32 rounding of values near 1 included); the slope within 3e-7."""
  v = np.linspace(-12.0, 12.0, 48001).astype(np.float32)
  value, slope = (np.asarray(a, np.float64) for a in wa.gelu_value_and_slope(jnp.asarray(v)))
  x = v.astype(np.float64)
  cdf = np.array([0.5 * math.erfc(-t / math.sqrt(2)) for t in x])
  pdf = np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
  assert np.max(np.abs(value - x * cdf) / np.maximum(np.abs(x), 1.0)) < 2.5e-7
  assert np.max(np.abs(slope - (cdf + x * pdf))) < 3e-7
  np.testing.assert_array_equal(value[v == 0], 0.0)


def _acm_params(dim, learners, width, seed=1):
  rng = np.random.default_rng(seed)
  return {"w1": jnp.asarray(rng.normal(size=(dim, learners * width)) / np.sqrt(dim), jnp.float32),
          "b1": jnp.asarray(rng.normal(size=(learners * width,)) * 0.3, jnp.float32),
          "w2": jnp.asarray(rng.normal(size=(learners * width, dim)) / np.sqrt(width), jnp.float32),
          "b2": jnp.asarray(rng.normal(size=(learners + 1, dim)) * 0.1, jnp.float32)}


def test_acm_apply_soft_with_the_kernels_has_the_xla_paths_value_and_gradients():
  learners, width, dim = 4, 32, 24
  params = _acm_params(dim, learners, width)
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 8, dim)), jnp.float32)
  choice = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 8, learners + 1)), jnp.float32) * 2)
  g = jnp.asarray(rng.normal(size=(2, 8, dim)), jnp.float32)

  def value_and_grads(mode):
    with acm.act_kernel(mode):
      f = lambda p, x, c: acm.acm_apply_soft(p, x, c, num_learners=learners)
      y, vjp = jax.vjp(jax.jit(f), params, x, choice)
      jaxpr = str(jax.make_jaxpr(f)(params, x, choice))
      return y, vjp(g), jaxpr

  y_k, grads_k, jaxpr_k = value_and_grads("interpret")
  y_x, grads_x, jaxpr_x = value_and_grads(False)
  assert "acm_weighted_act_fwd" in jaxpr_k and "acm_weighted_act" not in jaxpr_x
  assert rel_err(y_k, y_x) < 1e-6
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads_k), jax.tree.leaves(grads_x), strict=True):
    assert a.shape == b.shape and a.dtype == b.dtype, path
    assert rel_err(a, b) < 1e-6, (jax.tree_util.keystr(path), rel_err(a, b))


def test_token_counts_the_kernels_do_not_take_keep_the_xla_path():
  params = _acm_params(24, 4, 32)
  x = jnp.ones((3, 5, 24))  # 15 tokens: not a multiple of 16
  choice = jax.nn.softmax(jnp.arange(15 * 5, dtype=jnp.float32).reshape(3, 5, 5) / 10)
  with acm.act_kernel("interpret"):
    jaxpr = str(jax.make_jaxpr(lambda p: acm.acm_apply_soft(p, x, choice, num_learners=4))(params))
  assert "acm_weighted_act" not in jaxpr
  # off a GPU the default (None) and True keep XLA's fusions too
  sixteen = jax.nn.softmax(jnp.arange(16 * 5, dtype=jnp.float32).reshape(2, 8, 5) / 10)
  for mode in (None, True):
    with acm.act_kernel(mode):
      jaxpr = str(jax.make_jaxpr(lambda p: acm.acm_apply_soft(p, jnp.ones((2, 8, 24)), sixteen, num_learners=4))(params))
    assert ("acm_weighted_act" in jaxpr) == (jax.default_backend() == "gpu")


def test_scanned_vit_gradients_with_the_kernels_under_remat():
  """The kernels inside `nn.scan` under `--remat=dots` (their custom VJP, flax's DCE check of the scan body):
  gradients equal the XLA path's. 16 images of 17 tokens: 272 tokens per layer."""
  config = vit.ViTConfig(image_size=16, patch_size=4, dim=32, depth=2, num_heads=2, mlp_dim=64, num_classes=5,
                         acm=acm.ACMConfig(num_learners=4, gate_hidden=8, attention=True, impl="xla"))
  images = jax.random.normal(jax.random.key(1), (16, 16, 16, 3))
  unrolled = vit.ViT(config)
  params = unrolled.init({"params": jax.random.key(0), "gumbel": jax.random.key(0)}, images, mode="gumbel")["params"]
  model = vit.ViT(dataclasses.replace(config, scan_blocks=True, remat="dots").validate())
  stacked = transformer.stack_blocks(params)

  def grads(mode):
    loss = lambda q: jnp.sum(model.apply({"params": q}, images, mode="gumbel", mutable=["acm"],
                                         rngs={"gumbel": jax.random.key(2)})[0] ** 2)
    with acm.act_kernel(mode):
      ran = "acm_weighted_act_bwd" in str(jax.make_jaxpr(jax.grad(loss))(stacked))
      assert ran == (mode == "interpret"), mode
      return flatten(transformer.unstack_blocks(jax.jit(jax.grad(loss))(stacked)))

  got, want = grads("interpret"), grads(False)
  # relative per parameter: single elements near zero move with the float32 summation order
  for key, value in want.items():
    assert rel_err(got[key], value) < 1e-5, (key, rel_err(got[key], value))
  assert any("mlp" in key and key.endswith("b1") for key in want)


def test_bad_inputs_name_the_value():
  pre, b1, weight_t, grad = _inputs(32, 4, 16, jnp.float32)
  with pytest.raises(ValueError, match="token count divisible by 16, got 24"):
    wa.forward(pre[:24], b1, weight_t[:, :24], interpret=True)
  with pytest.raises(ValueError, match=r"weight\^T \(4, 31\)"):
    wa.forward(pre, b1, weight_t[:, :31], interpret=True)
  with pytest.raises(ValueError, match="activation 'identity'"):
    wa.forward(pre, b1, weight_t, activation="identity", interpret=True)
  with pytest.raises(ValueError, match="block_rows=24 must be a power of two"):
    wa.forward(pre, b1, weight_t, block_rows=24, interpret=True)
  with pytest.raises(ValueError, match=r"grad \(32, 32\) does not match pre \(32, 64\)"):
    wa.backward(pre, b1, weight_t, grad[:, :32], interpret=True)
  with pytest.raises(ValueError, match="learner width divisible by 16, got 8"):
    wa.forward(pre, b1, jnp.concatenate([weight_t, weight_t]), interpret=True)  # 8 learners of 8
  with pytest.raises(ValueError, match="act_kernel\\('on'\\)"):
    with acm.act_kernel("on"):
      pass
