"""`scan_outputs.uninitialised`: scans lowered inside it allocate their stacked outputs with
lax.empty (XLA's AllocateBuffer on GPU) instead of zeros. The GPU lowering is checked on the CPU
(lowered for cuda); values against the unpatched scan (on the CPU lax.empty is zeros, so this
checks the patch changes no shape, dtype or result) and against an unrolled float64 reference."""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from acm_jax import scan_outputs
from acm_jax.acmize import flatten
from acm_jax.vit import model as vit

from jax._src.lax.control_flow import loops


def _scanned_loss(w, x):
  """Three tanh layers as one scan; under jax.grad its residuals are stacked outputs."""
  def body(h, wi):
    h = jnp.tanh(h @ wi)
    return h, h * 2.0  # a stacked output of its own too
  h, ys = jax.lax.scan(body, x, w)
  return jnp.sum(h ** 2) + jnp.mean(ys)


def _reference_loss(w, x):
  h, ys = np.asarray(x, np.float64), []
  for wi in np.asarray(w, np.float64):
    h = np.tanh(h @ wi)
    ys.append(2.0 * h)
  return np.sum(h ** 2) + np.mean(ys)


def _args():
  w = 0.5 * jax.random.normal(jax.random.key(0), (3, 8, 8))
  x = jax.random.normal(jax.random.key(1), (4, 8))
  return w, x


def test_this_jax_is_supported():
  assert scan_outputs.supported()


def test_gpu_lowering_allocates_the_stacks_unfilled():
  w, x = _args()
  step = jax.jit(jax.value_and_grad(_scanned_loss))
  plain = step.trace(w, x).lower(lowering_platforms=("cuda",)).as_text()
  with scan_outputs.uninitialised() as active:
    assert active and scan_outputs.active()
    patched = jax.jit(jax.value_and_grad(_scanned_loss)).trace(w, x).lower(lowering_platforms=("cuda",)).as_text()
  assert not scan_outputs.active() and loops._empty_array is scan_outputs._ORIGINAL
  assert "AllocateBuffer" not in plain
  # the forward scan stacks ys and the residuals (tanh outputs); each such buffer is allocated unfilled
  assert patched.count("AllocateBuffer") >= 2


def test_values_and_gradients_are_unchanged():
  w, x = _args()
  want_loss = _reference_loss(w, x)
  plain_loss, plain_grad = jax.jit(jax.value_and_grad(_scanned_loss))(w, x)
  with scan_outputs.uninitialised():
    loss, grad = jax.jit(jax.value_and_grad(_scanned_loss))(w, x)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_array_equal(loss, plain_loss)
  np.testing.assert_array_equal(grad, plain_grad)
  eps = 1e-3  # the gradient of one weight against a float64 central difference
  w64 = np.asarray(w, np.float64)
  bumped = [w64.copy(), w64.copy()]
  bumped[0][1, 2, 3] += eps
  bumped[1][1, 2, 3] -= eps
  numeric = (_reference_loss(bumped[0], x) - _reference_loss(bumped[1], x)) / (2 * eps)
  np.testing.assert_allclose(grad[1, 2, 3], numeric, rtol=1e-3, atol=1e-5)


def test_scanned_vit_gradients_unchanged():
  config = dataclasses.replace(vit.ViTConfig(image_size=16, patch_size=4, dim=32, depth=3, num_heads=2, mlp_dim=64,
                                             num_classes=5), scan_blocks=True).validate()
  model = vit.ViT(config)
  images = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
  params = model.init(jax.random.key(3), images)["params"]
  loss = lambda p: jnp.sum(model.apply({"params": p}, images) ** 2)
  want = jax.jit(jax.grad(loss))(params)
  with scan_outputs.uninitialised():
    got = jax.jit(jax.grad(loss))(params)
  for name, value in flatten(want).items():
    np.testing.assert_array_equal(flatten(got)[name], value)


def test_contexts_nest_and_restore():
  with scan_outputs.uninitialised():
    with scan_outputs.uninitialised():
      assert scan_outputs.active()
    assert scan_outputs.active()
  assert not scan_outputs.active()


def test_unsupported_jax_warns_and_leaves_scans(monkeypatch):
  monkeypatch.setattr(scan_outputs, "_ORIGINAL", None)
  with pytest.warns(UserWarning, match="scans keep their zero-filled outputs"):
    with scan_outputs.uninitialised() as active:
      assert not active
  assert loops._empty_array is not scan_outputs._empty_array


def test_entry_point_default_is_one_gpu_only():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert not scan_outputs.enable_for_process()  # the CPU backend
    assert not scan_outputs.enable_for_process(devices=8)
  assert not scan_outputs.active()
