"""acm_jax.vit.model.PatchEmbed: the patch embedding as one matmul over cut-out patches gives what a stride-p
convolution gives (an independent numpy loop over patches in float64, and XLA's convolution), with
`nn.Conv`'s parameters and initial values, so checkpoints and earlier runs are unchanged."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from acm_jax.vit import model as vit


def numpy_patch_embed(images, kernel, bias):
  """Each p x p patch dotted with the (p, p, C, F) kernel, in float64, patches in row-major order."""
  images, kernel = np.asarray(images, np.float64), np.asarray(kernel, np.float64)
  b, h, w, _ = images.shape
  p = kernel.shape[0]
  out = np.zeros((b, (h // p) * (w // p), kernel.shape[-1]))
  for i in range(h // p):
    for j in range(w // p):
      patch = images[:, i * p:(i + 1) * p, j * p:(j + 1) * p, :]
      out[:, i * (w // p) + j] = np.einsum("bxyc,xycf->bf", patch, kernel)
  return out + np.asarray(bias, np.float64)


@pytest.mark.parametrize("mode", vit.PATCH_EMBED_MODES)
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_both_modes_match_the_numpy_reference(monkeypatch, mode, dtype, tol):
  monkeypatch.setattr(vit, "PATCH_EMBED", mode)
  module = vit.PatchEmbed(features=24, patch_size=4)
  images = jax.random.normal(jax.random.key(0), (3, 16, 12, 3), jnp.float32)
  params = module.init(jax.random.key(1), images)["params"]
  params = {"kernel": params["kernel"], "bias": jax.random.normal(jax.random.key(2), (24,))}
  got = jax.jit(module.apply)({"params": params}, images.astype(dtype))
  assert got.shape == (3, 4 * 3, 24) and got.dtype == dtype
  want = numpy_patch_embed(np.asarray(images.astype(dtype), np.float64),
                           np.asarray(params["kernel"].astype(dtype), np.float64), params["bias"].astype(dtype))
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol * np.abs(want).max())


def test_parameters_and_initial_values_are_nn_conv_s():
  class WithConv(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(32, (4, 4), strides=(4, 4), padding="VALID", name="embedding")(x)

  class WithPatchEmbed(nn.Module):
    @nn.compact
    def __call__(self, x):
      return vit.PatchEmbed(32, 4, name="embedding")(x)

  images = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
  conv = WithConv().init(jax.random.key(4), images)["params"]
  ours = WithPatchEmbed().init(jax.random.key(4), images)["params"]
  assert jax.tree.structure(conv) == jax.tree.structure(ours)
  for a, b in zip(jax.tree.leaves(conv), jax.tree.leaves(ours)):
    np.testing.assert_array_equal(a, b)
  # and the forwards agree (the matmul against nn.Conv itself)
  np.testing.assert_allclose(WithPatchEmbed().apply({"params": ours}, images).reshape(2, 2, 2, 32),
                             WithConv().apply({"params": conv}, images), rtol=1e-5, atol=1e-5)


def test_whole_vit_logits_do_not_depend_on_the_mode(monkeypatch):
  cfg = vit.get_config("tiny")
  model = vit.ViT(cfg)
  images = jax.random.normal(jax.random.key(5), (2, cfg.image_size, cfg.image_size, 3))
  variables = model.init(jax.random.key(6), images)
  matmul = model.apply(variables, images)
  monkeypatch.setattr(vit, "PATCH_EMBED", "conv")
  np.testing.assert_allclose(model.apply(variables, images), matmul, rtol=1e-5, atol=1e-5)
  monkeypatch.setattr(vit, "PATCH_EMBED", "im2col")
  with pytest.raises(ValueError, match="PATCH_EMBED must be one of"):
    model.apply(variables, images)
