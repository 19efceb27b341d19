"""ViT, acmize and FLOP accounting."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from acm_jax import acm, acmize, flops
from acm_jax.vit import flops as vit_flops
from acm_jax import transformer
from acm_jax.vit import model as vit

SMALL = dict(image_size=16, patch_size=4, dim=32, depth=3, num_heads=4, mlp_dim=128, num_classes=7)


def make(acm_cfg=None, **overrides):
  cfg = vit.get_config("tiny", **{**SMALL, **overrides})
  return dataclasses.replace(cfg, acm=acm_cfg).validate() if acm_cfg else cfg


def init(cfg, seed):
  x = jnp.zeros((1, cfg.image_size, cfg.image_size, 3))
  return vit.ViT(cfg).init(jax.random.key(seed), x)["params"]


def randomize(params, seed):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])


@pytest.mark.parametrize("blocks", [None, (0, 2)])
def test_acmize_reproduces_dense_logits_at_full_k(blocks):
  dense_cfg = make()
  acm_cfg = make(acm.ACMConfig(num_learners=4, blocks=blocks, impl="xla"))
  dense = randomize(init(dense_cfg, 0), 1)  # random biases too, not the zero init
  params = acmize.acmize(dense, init(acm_cfg, 2), acm_cfg.acm_paths(), num_learners=4)
  images = jax.random.normal(jax.random.key(3), (4, 16, 16, 3))
  expected = vit.ViT(dense_cfg).apply({"params": dense}, images)
  got = vit.ViT(acm_cfg).apply({"params": params}, images, mode="full", mutable=["acm"])[0]
  assert float(jnp.linalg.norm(got - expected) / jnp.linalg.norm(expected)) < 1e-5
  # fewer learners change the output, more compute gets closer
  errs = [float(jnp.linalg.norm(vit.ViT(acm_cfg).apply({"params": params}, images, mode="fixed", fixed_k=k,
                                                       mutable=["acm"])[0] - expected)) for k in range(5)]
  assert errs[0] > errs[4] and errs[4] < 1e-4 * np.linalg.norm(expected)


def test_acmize_attention_projections_use_singular_directions():
  dense_cfg = make()
  acm_cfg = make(acm.ACMConfig(num_learners=4, learner_width=32, attention=True, width_factor=2.0,
                                 impl="xla"))
  # width factor 2 gives the projections about dim hidden units: full rank, so k = N is exact
  dense = randomize(init(dense_cfg, 0), 1)
  params = acmize.acmize(dense, init(acm_cfg, 2), acm_cfg.acm_paths(), num_learners=4)
  q = params["block_1"]["attn"]["query"]
  assert q["w1"].shape[1] >= SMALL["dim"]
  np.testing.assert_allclose(q["w1"] @ q["w2"], dense["block_1"]["attn"]["query"]["dense"]["kernel"],
                             rtol=1e-4, atol=1e-5)
  # prefix errors of the low-rank learners fall with k
  kernel = dense["block_1"]["attn"]["query"]["dense"]["kernel"]
  h = q["w1"].shape[1] // 4
  errs = [float(jnp.linalg.norm(q["w1"][:, : k * h] @ q["w2"][: k * h] - kernel)) for k in range(5)]
  assert all(a > b for a, b in zip(errs, errs[1:]))


@pytest.mark.parametrize("shape,rank", [((24, 24), 12), ((24, 24), 24), ((10, 16), 8), ((16, 10), 16)])
def test_singular_factors_are_the_best_low_rank_approximation(shape, rank):
  """Against numpy's float64 SVD: every prefix of r directions is the rank-r truncation, the
  directions come largest first, and columns past the kernel's rank are zeros."""
  kernel = np.random.default_rng(sum(shape) + rank).standard_normal(shape).astype(np.float32)
  w1, w2 = acmize.singular_factors(kernel, rank)
  assert (w1.shape, w2.shape) == ((shape[0], rank), (rank, shape[1]))
  u, s, vt = np.linalg.svd(kernel.astype(np.float64), full_matrices=False)
  for r in range(1, min(rank, s.size) + 1):
    np.testing.assert_allclose(w1[:, :r] @ w2[:r], (u[:, :r] * s[:r]) @ vt[:r], atol=1e-10)
  np.testing.assert_array_equal(w1[:, s.size:], 0.0)
  np.testing.assert_array_equal(w2[s.size:], 0.0)


def test_many_singular_factors_match_one_at_a_time_and_numpy_params_give_numpy_learners():
  """The threaded factorisation of several kernels equals the factors of each alone, and acmize of
  numpy params (the host path of `phases.acm_params`) equals acmize of the same params as jax
  arrays, leaf for leaf, with numpy leaves."""
  rng = np.random.default_rng(3)
  kernels = [rng.standard_normal((20, 20)) for _ in range(5)]
  for (a1, a2), k in zip(acmize.many_singular_factors(kernels, [8] * 5), kernels):
    b1, b2 = acmize.singular_factors(k, 8)
    np.testing.assert_allclose(a1 @ a2, b1 @ b2, atol=1e-12)
  dense_cfg = make()
  acm_cfg = make(acm.ACMConfig(num_learners=4, attention=True, impl="xla"))
  dense = randomize(init(dense_cfg, 0), 1)
  template = init(acm_cfg, 2)
  via_jax = acmize.flatten(acmize.acmize(dense, template, acm_cfg.acm_paths(), num_learners=4))
  via_numpy = acmize.flatten(acmize.acmize(jax.tree.map(np.asarray, dense), template, acm_cfg.acm_paths(),
                                           num_learners=4))
  assert sorted(via_numpy) == sorted(via_jax)
  for key, value in via_jax.items():
    if "/gate/" not in key:
      assert isinstance(via_numpy[key], np.ndarray), key
    assert via_numpy[key].dtype == value.dtype, key
    np.testing.assert_array_equal(via_numpy[key], value, err_msg=key)


def test_acmize_rejects_mismatched_trees():
  dense_cfg = make()
  acm_cfg = make(acm.ACMConfig(num_learners=4, impl="xla"), dim=48)
  with pytest.raises(ValueError, match="shape"):
    acmize.acmize(init(dense_cfg, 0), init(acm_cfg, 1), acm_cfg.acm_paths(), num_learners=4)


def test_vit_bad_configs():
  with pytest.raises(ValueError, match="not divisible by patch_size"):
    vit.get_config("tiny", image_size=30)
  with pytest.raises(ValueError, match="unknown model preset"):
    vit.get_config("vit_x99")
  cfg = make()
  with pytest.raises(ValueError, match="expected images of 16x16"):
    vit.ViT(cfg).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def xla_flops(cfg):
  module = vit.ViT(cfg)
  x = jnp.zeros((1, cfg.image_size, cfg.image_size, 3))
  params = module.init(jax.random.key(0), x)
  analysis = jax.jit(module.apply).lower(params, x).compile().cost_analysis()
  return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]


@pytest.mark.parametrize("preset, overrides", [("tiny", {}), ("vit_s16", {"depth": 2, "image_size": 64}),
                                               ("vit_b16", {"depth": 1})])
def test_dense_flops_match_xla_cost_analysis(preset, overrides):
  cfg = vit.get_config(preset, **overrides)
  assert vit_flops.vit_flops(cfg)["total"] == pytest.approx(xla_flops(cfg), rel=0.05)


def test_acm_flops_scale_with_mean_k():
  dense_cfg = make()
  acm_cfg = make(acm.ACMConfig(num_learners=4, gate_depth=2, gate_hidden=16, impl="xla"))
  full = vit_flops.vit_flops(acm_cfg)
  half = vit_flops.vit_flops(acm_cfg, {p: 2.0 for p in acm_cfg.acm_paths()})
  zero = vit_flops.vit_flops(acm_cfg, {p: 0.0 for p in acm_cfg.acm_paths()})
  t, d, h = acm_cfg.num_tokens, 32, 32
  learner = 4 * d * h + h + 64 * h  # matmuls, hidden bias, exact-GELU elementwise work
  per_layer_gate = t * (2 * d * 16 + 2 * 16 * 5)
  assert full["gate"] == pytest.approx(3 * per_layer_gate)
  assert full["total"] - half["total"] == pytest.approx(3 * t * 2 * learner)
  assert half["total"] - zero["total"] == pytest.approx(3 * t * 2 * learner)
  # at full k the ACM costs the dense model plus gates (same hidden width)
  assert full["total"] == pytest.approx(vit_flops.vit_flops(dense_cfg)["total"] + full["gate"], rel=1e-3)
  paths = acm_cfg.acm_paths()
  costs = flops.learner_costs(acm_cfg)
  assert acm.compute_fraction([1.0] * len(paths), costs, [4] * len(paths)) == pytest.approx(0.25)


def _attention_reference(q, k, v, mask):
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    scores = np.where(np.asarray(mask), scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, v)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("impl", ["auto", "xla"])
def test_attend_matches_float64_softmax(impl, masked):
  q, k, v = jax.random.normal(jax.random.key(3), (3, 2, 7, 3, 8))
  mask = None
  if masked:  # batch element 1 sees only its first 4 keys
    valid = jnp.arange(7)[None, :] < jnp.array([7, 4])[:, None]
    mask = valid[:, None, None, :]
  out = transformer.attend(q, k, v, mask, impl)
  np.testing.assert_allclose(np.asarray(out), _attention_reference(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_attention_impl_selection(monkeypatch):
  resolve = transformer.resolve_attention_impl
  assert resolve("auto", jnp.bfloat16, 64, masked=False) == ("cudnn" if jax.default_backend() == "gpu" else "xla")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert resolve("auto", jnp.bfloat16, 64, masked=False) == "cudnn"
  assert resolve("auto", jnp.float32, 64, masked=False) == "xla"  # cuDNN's fused attention is half precision
  assert resolve("auto", jnp.bfloat16, 64, masked=True) == "xla"
  assert resolve("auto", jnp.bfloat16, 160, masked=False) == "xla"
  assert resolve("xla", jnp.bfloat16, 64, masked=False) == "xla"
  with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
    vit.get_config("tiny", attention="flash")
  q = jnp.ones((1, 4, 2, 8), jnp.float32)
  with pytest.raises(ValueError, match="needs bfloat16 or float16"):
    transformer.attend(q, q, q, None, "cudnn")


def test_cudnn_route_pads_odd_lengths_when_differentiated(monkeypatch):
  """cuDNN trains only on even lengths: `attend` runs odd ones as they are when not
  differentiated and padded (keys cut off by the sequence lengths) under grad. Checked
  with XLA's implementation standing in for cuDNN, which CPUs lack."""
  real = jax.nn.dot_product_attention
  seen = []

  def stand_in(q, k, v, *args, implementation=None, **kwargs):
    seen.append(q.shape[1])
    return real(q, k, v, *args, implementation="xla", **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
  q, k, v = jax.random.normal(jax.random.key(5), (3, 2, 7, 3, 8), jnp.bfloat16)
  out = transformer.attend(q, k, v, None, "cudnn")
  assert seen == [7] and out.shape == q.shape
  np.testing.assert_allclose(np.asarray(out, np.float32), _attention_reference(q, k, v, None), atol=2e-2)
  seen.clear()
  weights = jax.random.normal(jax.random.key(6), q.shape)
  loss = lambda impl: lambda q, k, v: (transformer.attend(q, k, v, None, impl).astype(jnp.float32) * weights).sum()
  grads = jax.grad(loss("cudnn"), argnums=(0, 1, 2))(q, k, v)
  assert seen == [8]
  want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(grads, want):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=5e-2)
