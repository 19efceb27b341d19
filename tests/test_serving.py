"""acm_jax/serving.py: the packed layout gives back every leaf bit for bit, under jit too, takes fewer
arrays, and a whole tiny ACM ViT's logits do not change with it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from acm_jax import serving
from acm_jax.vit import model as vit
from benchmarks import vit_bench as vb


def random_tree(seed=0):
  rng = np.random.default_rng(seed)
  return {"a": {"kernel": jnp.asarray(rng.normal(size=(64, 48)), jnp.bfloat16),
                "bias": jnp.asarray(rng.normal(size=(48,)), jnp.bfloat16)},
          "b": [jnp.asarray(rng.normal(size=(3, 5)), jnp.float32), jnp.asarray(rng.normal(), jnp.float32),
                jnp.asarray(rng.integers(-9, 9, size=(7,)), jnp.int32)],
          "c": jnp.asarray(rng.normal(size=(2, 2, 2)), jnp.bfloat16)}


def assert_same_tree(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_array_equal(np.asarray(g, np.float64), np.asarray(w, np.float64))


@pytest.mark.parametrize("max_size, arrays", [(None, 3), (100, 4), (0, 6)])
def test_round_trip_is_exact_eager_and_jitted(max_size, arrays):
  """None packs all six leaves into one array per dtype (bfloat16, float32, int32); 100 keeps the 64 x 48
  kernel apart; 0 packs nothing."""
  tree = random_tree()
  packed = serving.pack(tree, max_size)
  assert packed.num_arrays == len(jax.tree.leaves(packed)) == arrays
  assert_same_tree(serving.unpack(packed), tree)
  assert_same_tree(jax.jit(serving.unpack)(packed), tree)
  # a function of the packed tree agrees with the same function of the tree
  fn = lambda t: t["a"]["kernel"].astype(jnp.float32).sum(0) * t["b"][1] + t["a"]["bias"].astype(jnp.float32)
  np.testing.assert_array_equal(jax.jit(lambda p: fn(serving.unpack(p)))(packed), jax.jit(fn)(tree))


def test_layout_is_static_and_the_jit_cache_holds():
  traces = []

  @jax.jit
  def total(p):
    traces.append(1)
    return sum(jnp.sum(leaf.astype(jnp.float32)) for leaf in jax.tree.leaves(serving.unpack(p)))

  first = serving.pack(random_tree(0))
  np.testing.assert_allclose(total(first), sum(np.sum(np.asarray(leaf, np.float64))
                                               for leaf in jax.tree.leaves(random_tree(0))), rtol=1e-5)
  total(serving.pack(random_tree(1)))  # other values, same layout: no retrace
  assert len(traces) == 1
  total(serving.pack(random_tree(0), max_size=100))  # another layout: a new trace
  assert len(traces) == 2


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="max_size"):
    serving.pack(random_tree(), -1)
  with pytest.raises(TypeError, match=r"\['x'\].*str"):
    serving.pack({"x": "oops"})
  with pytest.raises(TypeError, match="what pack returns"):
    serving.unpack(random_tree())


def test_whole_acm_vit_logits_unchanged_with_fewer_arrays():
  """The tiny ViT with its MLPs and q/k/v/o ACMized (XLA path): the packed forward's logits equal the
  tree's, and the call takes under a third of the arrays."""
  cfg = vb.acm_config(vit.get_config("tiny"), "mlp_qkvo", impl="xla")
  model = vit.ViT(cfg)
  images = jax.random.normal(jax.random.key(3), (2, cfg.image_size, cfg.image_size, 3), jnp.float32)
  params = vb.set_gates(vb.bf16_params(model, images[:1]), cfg.acm.num_learners, 0.5, cfg.dim, seed=2)
  params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  packed = serving.pack(params)
  want = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images)
  got = jax.jit(lambda p, x: model.apply({"params": serving.unpack(p)}, x))(packed, images)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  assert packed.num_arrays * 3 < len(jax.tree.leaves(params))
