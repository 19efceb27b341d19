"""The halting analysis' forced halting and linear probe against independent references."""

import jax
import jax.numpy as jnp
import numpy as np

from acm_jax.vit.baselines import common
from acm_jax.vit import model as vit
from benchmarks import halting_analysis

CFG = vit.get_config("tiny", image_size=16, patch_size=4, dim=32, depth=3, num_heads=4, mlp_dim=64, num_classes=5)
IMAGES = jax.random.normal(jax.random.key(3), (4, 16, 16, 3))


def random_dense():
  params = vit.ViT(CFG).init(jax.random.key(0), IMAGES[:1])["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])


def test_forced_halting_is_the_vit_when_late_and_a_lone_class_token_when_early():
  dense = random_dense()
  tokens = CFG.num_tokens
  patches = jnp.broadcast_to(jnp.arange(tokens) > 0, (4, tokens))
  logits, _ = halting_analysis.forced_forward(CFG, dense, IMAGES, patches, CFG.depth)
  expected = vit.ViT(CFG).apply({"params": dense}, IMAGES)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
  # every patch halted after block 1: from block 2 on the class token sees only itself
  logits, _ = halting_analysis.forced_forward(CFG, dense, IMAGES, patches, 1)
  x = common.block(CFG, dense, 0, common.embed(CFG, dense, IMAGES))[:, :1]
  for i in range(1, CFG.depth):
    x = common.block(CFG, dense, i, x)
  np.testing.assert_allclose(logits, common.classify(CFG, dense["norm"], dense["head"], x[:, 0]), rtol=1e-4,
                             atol=1e-5)


def test_ridge_probe_reads_a_linear_code_and_not_noise():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, 600)
  codes = rng.normal(size=(4, 16))
  x = codes[labels] + 0.3 * rng.normal(size=(600, 16))
  assert halting_analysis.ridge_probe(x[:400], labels[:400], x[400:], labels[400:], 4) > 0.95
  noise = rng.normal(size=(600, 16))
  assert halting_analysis.ridge_probe(noise[:400], labels[:400], noise[400:], labels[400:], 4) < 0.45
