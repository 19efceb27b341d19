"""ACM functional core and Flax shell against plain-numpy float64 references."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from acm_jax import acm

N, H, D = 4, 8, 16


def random_params(seed=0, output_bias=True, n=N, h=H, d=D):
  rng = np.random.default_rng(seed)
  params = {"w1": rng.normal(size=(d, n * h)) / np.sqrt(d), "b1": rng.normal(size=(n * h,)),
            "w2": rng.normal(size=(n * h, d)) / np.sqrt(h), }
  if output_bias:
    params["b2"] = rng.normal(size=(n + 1, d))
  return {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}


def reference(params, x, k, activation="gelu"):
  """Loop over learners in float64: sum of the first k learners plus bias(k)."""
  p = {name: np.asarray(v, np.float64) for name, v in params.items()}
  x = np.asarray(x, np.float64)
  act = {"gelu": lambda z: 0.5 * z * (1 + erf(z / np.sqrt(2))), "relu": lambda z: np.maximum(z, 0),
         "identity": lambda z: z}[activation]
  out = np.zeros(x.shape)
  for t in np.ndindex(*x.shape[:-1]):
    for n in range(int(k[t])):
      cols = slice(n * H, (n + 1) * H)
      out[t] += act(x[t] @ p["w1"][:, cols] + p["b1"][cols]) @ p["w2"][cols]
    if "b2" in p:
      out[t] += p["b2"][: int(k[t]) + 1].sum(0)
  return out


@pytest.mark.parametrize("activation", ["gelu", "relu", "identity"])
@pytest.mark.parametrize("output_bias", [True, False])
def test_acm_apply_matches_reference_for_every_k(activation, output_bias):
  params = random_params(1, output_bias)
  x = jax.random.normal(jax.random.key(2), (3, 7, D))
  k = jax.random.randint(jax.random.key(3), (3, 7), 0, N + 1)
  got = acm.acm_apply(params, x, k, num_learners=N, activation=activation)
  np.testing.assert_allclose(got, reference(params, x, np.asarray(k), activation), rtol=1e-5, atol=1e-5)
  prefix = acm.prefix_outputs(params, x, num_learners=N, activation=activation)
  for kk in range(N + 1):
    np.testing.assert_allclose(prefix[..., kk, :], reference(params, x, np.full((3, 7), kk), activation),
                               rtol=1e-5, atol=1e-5)


def test_k_zero_gives_zero_without_bias_and_full_k_is_dense_mlp():
  params = random_params(4, output_bias=False)
  x = jax.random.normal(jax.random.key(5), (5, D))
  zero = acm.acm_apply(params, x, jnp.zeros(5, jnp.int32), num_learners=N)
  np.testing.assert_array_equal(zero, 0.0)
  full = acm.acm_apply(params, x, jnp.full(5, N), num_learners=N)
  dense = jax.nn.gelu(x @ params["w1"] + params["b1"], approximate=False) @ params["w2"]
  np.testing.assert_allclose(full, dense, rtol=1e-5, atol=1e-6)


def test_soft_apply_with_one_hot_equals_hard_apply_and_passes_gate_gradients():
  params = random_params(6)
  x = jax.random.normal(jax.random.key(7), (4, 9, D))
  k = jax.random.randint(jax.random.key(8), (4, 9), 0, N + 1)
  one_hot = jax.nn.one_hot(k, N + 1)
  np.testing.assert_allclose(acm.acm_apply_soft(params, x, one_hot, num_learners=N),
                             acm.acm_apply(params, x, k, num_learners=N), rtol=1e-5, atol=1e-5)
  # relaxed choice: output is the expectation over k of h(x, k)
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(9), (4, 9, N + 1)))
  prefix = acm.prefix_outputs(params, x, num_learners=N)
  np.testing.assert_allclose(acm.acm_apply_soft(params, x, probs, num_learners=N),
                             jnp.einsum("btk,btkd->btd", probs, prefix), rtol=1e-4, atol=1e-4)


def test_gumbel_straight_through_is_one_hot_and_differentiable():
  logits = jax.random.normal(jax.random.key(0), (64, N + 1))
  choice = acm.gumbel_softmax_st(jax.random.key(1), logits, 0.8)
  np.testing.assert_array_equal(jnp.sum(choice, -1), 1.0)
  assert set(np.unique(np.asarray(choice)).tolist()) <= {0.0, 1.0}
  params = random_params(2)
  x = jax.random.normal(jax.random.key(3), (64, D))

  def loss(lg):
    out = acm.acm_apply_soft(params, x, acm.gumbel_softmax_st(jax.random.key(1), lg, 0.8), num_learners=N)
    return jnp.sum(out ** 2)

  grad = jax.grad(loss)(logits)
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0


def test_detach_trick_routes_each_prefix_gradient_to_its_last_learner():
  params = random_params(3, output_bias=False)
  x = jax.random.normal(jax.random.key(4), (6, D))
  for kk in range(1, N + 1):
    grad = jax.grad(lambda p: jnp.sum(acm.prefix_outputs(p, x, num_learners=N, grad_mode="detach")[:, kk]))(params)
    per_learner = np.abs(np.asarray(grad["w2"])).reshape(N, H, D).sum((1, 2))
    assert per_learner[kk - 1] > 0 and np.all(np.delete(per_learner, kk - 1) == 0)
    grad = jax.grad(lambda p: jnp.sum(acm.prefix_outputs(p, x, num_learners=N, grad_mode="no_detach")[:, kk]))(params)
    per_learner = np.abs(np.asarray(grad["w2"])).reshape(N, H, D).sum((1, 2))
    assert np.all(per_learner[:kk] > 0) and np.all(per_learner[kk:] == 0)


def test_module_modes_and_min_choice():
  module = acm.ACM(D, N, H, min_choice=1, impl="xla")
  x = jax.random.normal(jax.random.key(0), (2, 5, D))
  variables = module.init(jax.random.key(1), x)
  variables = {"params": {**variables["params"], **random_params(5)}}  # non-zero biases
  for mode, kwargs in [("full", {}), ("fixed", {"fixed_k": 2}), ("argmax", {})]:
    out, state = module.apply(variables, x, mode=mode, mutable=["acm"], **kwargs)
    k = np.argmax(state["acm"]["choice"][0], -1)
    params = {name: v for name, v in variables["params"].items() if name != "gate"}
    np.testing.assert_allclose(out, reference(params, x, k, "gelu"), rtol=1e-5, atol=1e-5)
    assert np.all(k >= 1)
  _, state = module.apply(variables, x, mode="gumbel", mutable=["acm"], rngs={"gumbel": jax.random.key(2)})
  assert np.all(np.argmax(state["acm"]["choice"][0], -1) >= 1)
  with pytest.raises(ValueError, match="fixed_k"):
    module.apply(variables, x, mode="fixed", fixed_k=N + 1, mutable=["acm"])
  with pytest.raises(ValueError, match="unknown ACM mode"):
    module.apply(variables, x, mode="sometimes", mutable=["acm"])


def test_gumbel_detached_gives_same_output_and_no_task_gradient_to_the_gate():
  """The public code's phase 3: the output sends no gradient to the gate, the sown choices still do."""
  module = acm.ACM(D, N, H, impl="xla")
  x = jax.random.normal(jax.random.key(3), (2, 5, D))
  params = module.init(jax.random.key(4), x)["params"]
  rngs = {"gumbel": jax.random.key(5)}

  def run(p, mode):
    out, state = module.apply({"params": p}, x, mode=mode, mutable=["acm"], rngs=rngs)
    return out, state["acm"]["choice"][0]

  out, choice = run(params, "gumbel")
  out_detached, choice_detached = run(params, "gumbel_detached")
  np.testing.assert_array_equal(out, out_detached)
  np.testing.assert_array_equal(choice, choice_detached)
  task = lambda mode: jax.grad(lambda p: jnp.sum(run(p, mode)[0] ** 2))(params)
  aux = jax.grad(lambda p: jnp.sum(run(p, "gumbel_detached")[1] * jnp.arange(N + 1.0)))(params)
  gate_norm = lambda g: sum(float(jnp.abs(v).sum()) for v in jax.tree.leaves(g["gate"]))
  assert gate_norm(task("gumbel")) > 0 and gate_norm(task("gumbel_detached")) == 0
  assert gate_norm(aux) > 0
  np.testing.assert_array_equal(task("gumbel")["w1"], task("gumbel_detached")["w1"])


def test_per_token_fixed_k_and_force_k():
  """mode="fixed" with a (batch, tokens) map against the float64 reference; `force_k` given the
  gates' own argmax choices reproduces the argmax path; bad maps are refused by name."""
  module = acm.ACM(D, N, H, impl="xla")
  x = jax.random.normal(jax.random.key(6), (3, 7, D))
  variables = module.init(jax.random.key(7), x)
  variables = {"params": {**variables["params"], **random_params(8)}}
  params = {name: v for name, v in variables["params"].items() if name != "gate"}
  k = np.asarray(jax.random.randint(jax.random.key(9), (3, 7), 0, N + 1))
  out, state = module.apply(variables, x, mode="fixed", fixed_k=k, mutable=["acm"])
  np.testing.assert_allclose(out, reference(params, x, k), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.argmax(state["acm"]["choice"][0], -1), k)
  row = module.apply(variables, x, mode="fixed", fixed_k=k[:1, :])  # broadcasts over the batch
  np.testing.assert_allclose(row, reference(params, x, np.broadcast_to(k[:1], k.shape)), rtol=1e-5, atol=1e-5)

  gated, state = module.apply(variables, x, mode="argmax", mutable=["acm"])
  chosen = np.argmax(state["acm"]["choice"][0], -1)
  assert len(np.unique(chosen)) > 1  # the check below would be weak on a constant map
  with acm.force_k(chosen):
    forced, forced_state = jax.jit(lambda v, x: module.apply(v, x, mode="argmax", mutable=["acm"]))(variables, x)
  np.testing.assert_allclose(forced, gated, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(forced_state["acm"]["choice"][0], state["acm"]["choice"][0])
  with acm.force_k(N - k):  # outside the context the gates decide again
    other = module.apply(variables, x)
  np.testing.assert_allclose(module.apply(variables, x), gated, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(other, reference(params, x, N - k), rtol=1e-5, atol=1e-5)

  with pytest.raises(ValueError, match=r"fixed_k in 0..4, got values 1..5"):
    module.apply(variables, x, mode="fixed", fixed_k=k + 1)
  with pytest.raises(ValueError, match=r"does not broadcast to the tokens' shape \(3, 7\)"):
    module.apply(variables, x, mode="fixed", fixed_k=k[:, :2])
  with pytest.raises(ValueError, match="must be integer"):
    module.apply(variables, x, mode="fixed", fixed_k=k.astype(np.float32))


def test_config_widths_and_bad_values():
  cfg = acm.ACMConfig(num_learners=4)
  assert cfg.mlp_learner_width(3072) == 768
  assert dataclasses.replace(cfg, width_factor=0.5).mlp_learner_width(3072) == 384
  assert cfg.attention_learner_width(768) == round((768 ** 2 + 768) / (2 * 768 + 1)) // 4
  with pytest.raises(ValueError, match="does not divide"):
    acm.ACMConfig(num_learners=5).mlp_learner_width(256)
  with pytest.raises(ValueError, match="does not fit"):
    acm.ACMConfig(num_learners=4, learner_width=100).mlp_learner_width(256)
  with pytest.raises(ValueError, match="out of range"):
    acm.ACMConfig(blocks=(0, 7)).block_indices(4)
  with pytest.raises(ValueError, match="unknown activation"):
    acm.get_activation("swish2")
