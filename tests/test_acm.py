"""ACM functional core and Flax shell against plain-numpy float64 references."""

import dataclasses
import functools

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


# the activations as jax.nn writes them, differentiated by JAX's autodiff
PLAIN_ACTIVATIONS = {"gelu": functools.partial(jax.nn.gelu, approximate=False),
                     "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
                     "relu": jax.nn.relu, "identity": lambda x: x}


@pytest.mark.parametrize("activation", sorted(PLAIN_ACTIVATIONS))
def test_activation_values_and_gradients_equal_jax_nn(activation):
  """The table's activations, as served outside and inside a scanned stack of blocks: forward
  bit for bit jax.nn's in float32, gradient equal to autodiff of jax.nn's formula in float64,
  value_and_slope equal to both; the scan variants of the GELUs keep one activation-sized
  residual (autodiff keeps x and the erfc / tanh terms)."""
  plain = PLAIN_ACTIVATIONS[activation]
  outside = acm.get_activation(activation)
  with acm.scanned_layer("blocks", jnp.int32(0), ["block_0"]):
    inside = acm.get_activation(activation)
  assert (inside is not outside) == activation.startswith("gelu")
  assert inside is (acm.ACTIVATIONS[activation].in_scan or outside)
  x32 = jax.random.normal(jax.random.key(30), (4, 6, 32)) * 3.0
  x16 = x32.astype(jnp.bfloat16)
  exact = np.asarray(plain(x16.astype(jnp.float32)))
  for fn in (outside, inside):
    np.testing.assert_array_equal(fn(x32), plain(x32))
    # bfloat16: within half a bfloat16 step of the float32 value at the same inputs where the
    # activation is evaluated in float32 and rounded once (the scan variants), never further
    # from it than jax.nn's bfloat16 result
    ours, theirs = (np.abs(np.asarray(f(x16), np.float32) - exact) for f in (fn, plain))
    assert np.all(ours <= theirs)
    if fn is inside:
      assert np.all(ours <= np.abs(exact) * 2 ** -8 + 1e-30)
    with jax.enable_x64():
      x = jax.random.normal(jax.random.key(31), (4, 6, 32), jnp.float64) * 3.0
      g = jax.random.normal(jax.random.key(32), x.shape, jnp.float64)
      (got,) = jax.vjp(fn, x)[1](g)
      (want,) = jax.vjp(plain, x)[1](g)
      assert np.abs(np.asarray(want)).max() > 0
      np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # bfloat16 gradient: within bfloat16 rounding of the float32 one
    (g16,) = jax.vjp(fn, x16)[1](jnp.ones(x16.shape, jnp.bfloat16))
    (g32,) = jax.vjp(plain, x32)[1](jnp.ones(x32.shape))
    np.testing.assert_allclose(np.asarray(g16, np.float32), g32, rtol=2e-2, atol=2e-2)
  with jax.enable_x64():
    value, slope = acm.ACTIVATIONS[activation].value_and_slope(x)
    np.testing.assert_allclose(value, plain(x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(slope, jax.vmap(jax.grad(plain))(x.ravel()).reshape(x.shape), rtol=1e-12, atol=1e-12)
  if activation.startswith("gelu"):
    big = lambda f: [leaf for leaf in jax.tree_util.tree_leaves(jax.vjp(f, x32)[1])
                     if getattr(leaf, "shape", ()) == x32.shape]
    assert len(big(inside)) == 1 and len(big(plain)) > 1


@pytest.mark.parametrize("activation", sorted(PLAIN_ACTIVATIONS))
def test_weighted_activation_vjp_equals_autodiff_of_the_plain_formula(activation):
  """The hand-written VJP of `weighted_activation` against JAX's autodiff of the same formula
  written out by hand, in float64 on random inputs, for the value and both gradients."""
  with jax.enable_x64():
    pre = jax.random.normal(jax.random.key(10), (3, 5, N * H), jnp.float64) * 2.0
    weight = jax.random.uniform(jax.random.key(11), (3, 5, N), jnp.float64)
    cotangent = jax.random.normal(jax.random.key(12), (3, 5, N * H), jnp.float64)
    act = PLAIN_ACTIVATIONS[activation]
    plain = lambda p, w: act(p) * jnp.repeat(w, H, axis=-1)
    got, got_vjp = jax.vjp(lambda p, w: acm.weighted_activation(p, w, activation), pre, weight)
    want, want_vjp = jax.vjp(plain, pre, weight)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_vjp(cotangent), want_vjp(cotangent)):
      assert np.abs(np.asarray(w)).max() > 0
      np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("lead", [(2, 3), (5,), (2, 2, 3)])  # 2-d tokens: one product; else per example
@pytest.mark.parametrize("dtype, tol", [(jnp.float64, 1e-12), (jnp.bfloat16, 3e-2)])
def test_soft_choice_bias_vjp_equals_autodiff_of_the_cumulative_bias(dtype, tol, lead):
  """The hand-written VJP of `soft_choice_bias` (matmuls) against autodiff of the choice
  expectation of the cumulative bias written out by hand (float64 reference), on random inputs."""
  with jax.enable_x64():
    b2 = jax.random.normal(jax.random.key(20), (N + 1, 6), jnp.float64)
    choice = jax.nn.softmax(jax.random.normal(jax.random.key(21), lead + (N + 1,), jnp.float64) * 2.0)
    at_least = acm.reverse_cumsum(choice)
    cotangent = jax.random.normal(jax.random.key(22), lead + (6,), jnp.float64)
    plain = lambda b, a: jnp.einsum("...k,kd->...d", -jnp.diff(a, append=0.0, axis=-1), jnp.cumsum(b, axis=0))
    want, want_vjp = jax.vjp(plain, b2, at_least)
    got, got_vjp = jax.vjp(acm.soft_choice_bias, b2.astype(dtype), at_least.astype(dtype))
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol)
    for g, w in zip(got_vjp(cotangent.astype(dtype)), want_vjp(cotangent)):
      assert g.dtype == dtype and np.abs(np.asarray(w)).max() > 0
      np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=tol, atol=tol * np.abs(np.asarray(w)).max())


def test_soft_apply_gradients_equal_autodiff_of_the_choice_expectation():
  """acm_apply_soft's gradients (learners, biases, choice) against autodiff of
  sum_k choice_k * h(x, k) written with `prefix_outputs` (no detach), float64, random inputs."""
  with jax.enable_x64():
    params = {k: v.astype(jnp.float64) for k, v in random_params(13).items()}
    x = jax.random.normal(jax.random.key(14), (6, 7, D), jnp.float64)
    choice = jax.nn.softmax(jax.random.normal(jax.random.key(15), (6, 7, N + 1), jnp.float64))
    soft = lambda p, c: acm.acm_apply_soft(p, x, c, num_learners=N)

    def expect(p, c):  # sum_k c_k h(x, k), h written out learner by learner
      learners = [jax.nn.gelu(x @ p["w1"][:, n * H:(n + 1) * H] + p["b1"][n * H:(n + 1) * H], approximate=False)
                  @ p["w2"][n * H:(n + 1) * H] for n in range(N)]
      prefix = [sum(learners[:k], jnp.zeros_like(x)) + p["b2"][:k + 1].sum(0) for k in range(N + 1)]
      return sum(c[..., k:k + 1] * prefix[k] for k in range(N + 1))

    got, got_vjp = jax.vjp(soft, params, choice)
    want, want_vjp = jax.vjp(expect, params, choice)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    cotangent = jax.random.normal(jax.random.key(16), got.shape, jnp.float64)
    (gp, gc), (wp, wc) = got_vjp(cotangent), want_vjp(cotangent)
    np.testing.assert_allclose(gc, wc, rtol=1e-9, atol=1e-10)
    for name in params:
      np.testing.assert_allclose(gp[name], wp[name], rtol=1e-9, atol=1e-10, err_msg=name)


@pytest.mark.parametrize("activation", ["identity", "gelu"])
def test_soft_group_equals_one_soft_apply_per_acm_with_gradients(activation):
  """acm_apply_soft_group (up projections as one matmul) against G acm_apply_soft calls, float64:
  outputs and the gradients of x, every parameter and every choice distribution."""
  with jax.enable_x64():
    params = [{k: v.astype(jnp.float64) for k, v in random_params(50 + g).items()} for g in range(3)]
    params[1].pop("b2")  # one ACM without output bias
    x = jax.random.normal(jax.random.key(53), (2, 5, D), jnp.float64)
    choices = [jax.nn.softmax(jax.random.normal(jax.random.key(54 + g), (2, 5, N + 1), jnp.float64)) for g in range(3)]
    grouped = lambda p, x, c: acm.acm_apply_soft_group(p, x, c, num_learners=N, activation=activation)
    separate = lambda p, x, c: [acm.acm_apply_soft(pg, x, cg, num_learners=N, activation=activation)
                                for pg, cg in zip(p, c)]
    got, got_vjp = jax.vjp(grouped, params, x, choices)
    want, want_vjp = jax.vjp(separate, params, x, choices)
    cotangent = [jax.random.normal(jax.random.key(60 + g), w.shape, jnp.float64) for g, w in enumerate(want)]
    for g, w in zip(got, want, strict=True):
      assert np.abs(np.asarray(w)).max() > 0
      np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_vjp(cotangent)),
                            jax.tree.leaves(want_vjp(cotangent)), strict=True):
      assert np.abs(np.asarray(w)).max() > 0, jax.tree_util.keystr(path)
      np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-10, err_msg=jax.tree_util.keystr(path))
  with pytest.raises(ValueError, match="3 ACMs but 2 choice distributions"):
    acm.acm_apply_soft_group(params, x, choices[:2], num_learners=N)


@pytest.mark.parametrize("lead", [(5,), (2, 3), (2, 2, 3)])
def test_per_example_dot_general_has_the_dense_layers_value_and_gradients(lead):
  """The gates' `nn.Dense` dot_general (kernel gradient one product per example) against
  jax.lax.dot_general under autodiff, float64, random inputs; a Gate built with it equals a plain
  Dense stack."""
  with jax.enable_x64():
    x = jax.random.normal(jax.random.key(70), lead + (7,), jnp.float64)
    w = jax.random.normal(jax.random.key(71), (7, 4), jnp.float64)
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    got, got_vjp = jax.vjp(lambda x, w: acm.per_example_dot_general(x, w, dims), x, w)
    want, want_vjp = jax.vjp(lambda x, w: jax.lax.dot_general(x, w, dims), x, w)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    cotangent = jax.random.normal(jax.random.key(72), want.shape, jnp.float64)
    for g, r in zip(got_vjp(cotangent), want_vjp(cotangent), strict=True):
      assert g.dtype == r.dtype and np.abs(np.asarray(r)).max() > 0
      np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)
  gate = acm.Gate(N + 1, depth=3, hidden=8)
  x = jax.random.normal(jax.random.key(73), (2, 5, D))
  params = gate.init(jax.random.key(74), x)["params"]

  def plain(p, x):
    for i in range(2):
      x = jax.nn.relu(x @ p[f"hidden_{i}"]["kernel"] + p[f"hidden_{i}"]["bias"])
    return x @ p["out"]["kernel"] + p["out"]["bias"]

  loss = lambda f: lambda p: jnp.sum(jnp.sin(f(p, x)))
  np.testing.assert_allclose(gate.apply({"params": params}, x), plain(params, x), rtol=1e-5, atol=1e-6)
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(jax.grad(loss(lambda p, x: gate.apply({"params": p}, x)))(params)),
                          jax.tree.leaves(jax.grad(loss(plain))(params)), strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


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


@pytest.mark.parametrize("depth", [1, 3])
def test_group_gate_logits_equal_each_gate_on_its_own(depth):
  x = jax.random.normal(jax.random.key(20), (2, 9, D))
  gates, want = [], []
  for seed in range(3):
    gate = acm.Gate(N + 1, depth, 8, dtype=jnp.float32)
    params = gate.init(jax.random.key(21 + seed), x)["params"]
    params = jax.tree.map(lambda p, s=seed: p + 0.1 * jax.random.normal(jax.random.key(30 + s), p.shape), params)
    gates.append(params)
    want.append(gate.apply({"params": params}, x))
  for got, w in zip(acm.group_gate_logits(gates, x), want):
    assert got.shape == (2, 9, N + 1)
    np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["gumbel", "gumbel_detached"])
def test_grouped_qkv_gates_in_training_equal_three_separate_acms(mode, monkeypatch):
  """Attention's q/k/v ACMs with one grouped gate (training modes) against the same ACMs called one
  by one: outputs, sown logits and choices, and gradients of every parameter."""
  from acm_jax import transformer
  cfg = acm.ACMConfig(num_learners=N, attention=True, gate_depth=3, gate_hidden=8, impl="xla", group_qkv_gates=True)
  attn = transformer.Attention(num_heads=2, acm=cfg, impl="xla")
  x = jax.random.normal(jax.random.key(40), (2, 7, D))
  variables = attn.init({"params": jax.random.key(41), "gumbel": jax.random.key(42)}, x, mode="gumbel")
  params = jax.tree.map(lambda p: p + 0.2 * jax.random.normal(jax.random.key(43), p.shape), variables["params"])

  def run(p):
    out, state = attn.apply({"params": p}, x, mode=mode, temperature=0.7, cost_shift=0.3,
                            rngs={"gumbel": jax.random.key(44)}, mutable=["acm"])
    return jnp.sum(out * jnp.cos(out)), (out, state["acm"])

  calls = []
  group_gate_logits = acm.group_gate_logits
  monkeypatch.setattr(acm, "group_gate_logits", lambda *a: calls.append(1) or group_gate_logits(*a))
  (grouped_loss, (grouped_out, grouped_acm)), grouped_grads = jax.value_and_grad(run, has_aux=True)(params)
  assert calls, "the training path did not group the q/k/v gates"
  monkeypatch.setattr(transformer.Attention, "_grouped_gumbel", lambda self, projections, acm_args: False)
  calls.clear()
  (loss, (out, sown)), grads = jax.value_and_grad(run, has_aux=True)(params)
  assert not calls
  np.testing.assert_allclose(grouped_loss, loss, rtol=1e-5)
  np.testing.assert_allclose(grouped_out, out, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(grouped_acm), jax.tree.leaves(sown), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert set(sown) == {"query", "key", "value", "out"}
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grouped_grads), jax.tree.leaves(grads), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  gate_grad = grads["query"]["gate"]["hidden_0"]["kernel"]
  assert (np.abs(np.asarray(gate_grad)).max() > 0) == (mode == "gumbel")
