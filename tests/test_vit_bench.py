"""The model setup benchmarks/vit_bench.py shares with serve_profile and graph_probe (the timing itself needs a GPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from acm_jax.vit import model as vit
from benchmarks import vit_bench as vb


def test_bf16_params_are_the_models_own_init_in_bfloat16():
  cfg = vit.get_config("tiny")
  image = jax.random.normal(jax.random.key(3), (1, cfg.image_size, cfg.image_size, 3))
  model = vit.ViT(cfg)
  got = vb.bf16_params(model, image)
  want = model.init(jax.random.key(1), image)["params"]
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w.astype(jnp.bfloat16), np.float32))


@pytest.mark.parametrize("kind, attention", [("mlp", False), ("mlp_qkvo", True)])
def test_acm_config_acmizes_the_blocks_of_each_kind(kind, attention):
  cfg = vb.acm_config(vit.get_config("tiny"), kind, "xla")
  assert cfg.acm.attention is attention and cfg.acm.num_learners == vb.NUM_LEARNERS and cfg.acm.impl == "xla"
  image = jnp.ones((1, cfg.image_size, cfg.image_size, 3))
  params = vb.bf16_params(vit.ViT(cfg), image)
  for block in (params[f"block_{i}"] for i in range(cfg.depth)):
    assert {"w1", "w2", "gate"} <= set(block["mlp"])
    for proj in ("query", "key", "value", "out"):
      assert ("gate" in block["attn"][proj]) is attention
