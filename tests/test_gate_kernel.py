"""The fused deep-gate kernels (`pallas_kernels.gate_mlp`) against plain jnp, and the gates built on
them (`acm.gate_kernel`) against the gates' XLA layers.

Pallas interpret mode on the CPU fills kernel outputs with NaN before the kernels run
(`test_acm_mlp_kernel.test_interpreter_poisons_outputs`), so an element the kernels leave unwritten
fails the comparisons. The GPU run (`benchmarks/RESULTS.md`, 2026-12-04) compiles them with Triton.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from acm_jax import acm, transformer
from acm_jax.acmize import flatten
from acm_jax.vit import model as vit
from pallas_kernels import gate_mlp as gm


def rel_err(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def _layers(rng, dim, widths):
  ins = [dim] + widths[:-1]
  kernels = [jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32) for a, b in zip(ins, widths)]
  biases = [jnp.asarray(rng.normal(size=(b,)) * 0.3, jnp.float32) for b in widths]
  return kernels, biases


@pytest.mark.parametrize("tokens,dim,widths", [
    (1, 64, [16, 16, 5]),
    (197, 768, [16, 16, 5]),  # ViT-B/16's MLP and o gates, one image
    (1576, 96, [48, 48, 15]),  # the q/k/v gates as one block-diagonal gate; ends mid-block
    (70, 32, [8, 5]),  # two layers, a hidden width under 16
    (300, 64, [16, 16, 16, 5]),  # four layers
])
def test_kernels_match_the_reference_in_float32(tokens, dim, widths):
  rng = np.random.default_rng(tokens + dim)
  kernels, biases = _layers(rng, dim, widths)
  x = jnp.asarray(rng.normal(size=(tokens, dim)), jnp.float32)
  logits = gm.gate_forward(x, kernels, biases, interpret=True)
  ref = gm.gate_reference(x, kernels, biases)
  assert logits.shape == (tokens, widths[-1]) and np.all(np.isfinite(np.asarray(logits)))
  assert rel_err(logits, ref) < 1e-5
  d_logits = jnp.asarray(rng.normal(size=ref.shape), jnp.float32)
  dx, d_kernels, d_biases = gm.gate_backward(x, kernels, biases, d_logits, interpret=True)
  loss = lambda x, ks, bs: jnp.sum(gm.gate_reference(x, ks, bs) * d_logits)
  want = jax.grad(loss, (0, 1, 2))(x, kernels, biases)
  for name, got, ref in [("dx", [dx], [want[0]]), ("kernels", d_kernels, want[1]), ("biases", d_biases, want[2])]:
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
      assert g.shape == r.shape and np.all(np.isfinite(np.asarray(g))), (name, i)
      assert np.abs(np.asarray(r)).max() > 0, (name, i)
      assert rel_err(g, r) < 1e-5, (name, i, rel_err(g, r))


def test_gates_on_the_kernels_equal_their_xla_layers():
  """A Gate and grouped gate logits under gate_kernel("interpret") against gate_kernel(False):
  float32 values and every gradient to 1e-5; in bfloat16 both against the float32 gate, the
  kernels no further from it than XLA's bf16 layers (which round every layer's gradient)."""
  x = jax.random.normal(jax.random.key(80), (2, 9, 64), jnp.float32)
  keys = jax.random.split(jax.random.key(81), 3)

  def run(mode, dtype, x):
    gate = acm.Gate(5, depth=3, hidden=16, dtype=dtype)
    params = [jax.tree.map(lambda p, k=k: jax.random.normal(k, p.shape, p.dtype) * 0.5,
                           gate.init(jax.random.key(82), x)["params"]) for k in keys]
    with acm.gate_kernel(mode):
      one = lambda p, x: gate.apply({"params": p}, x)
      group = lambda ps, x: jnp.concatenate(acm.group_gate_logits(ps, x), axis=-1)
      loss = lambda f: lambda p, x: jnp.sum(jnp.sin(f(p, x).astype(jnp.float32)))
      return jax.jit(lambda p, x: (one(p[0], x), group(p, x), jax.grad(loss(one), (0, 1))(p[0], x),
                                   jax.grad(loss(group), (0, 1))(p, x)))(params, x)

  got, want = run("interpret", jnp.float32, x), run(False, jnp.float32, x)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
    assert g.dtype == w.dtype and g.shape == w.shape, jax.tree_util.keystr(path)
    assert rel_err(g, w) < 1e-5, (jax.tree_util.keystr(path), rel_err(g, w))
  x16 = x.astype(jnp.bfloat16)
  kernel, layers = run("interpret", jnp.bfloat16, x16), run(False, jnp.bfloat16, x16)
  truth = run(False, jnp.float32, x16.astype(jnp.float32))
  errors = []
  for (path, k), l, t in zip(jax.tree_util.tree_leaves_with_path(kernel), jax.tree.leaves(layers),
                             jax.tree.leaves(truth), strict=True):
    assert k.dtype == l.dtype and k.shape == l.shape, jax.tree_util.keystr(path)
    assert rel_err(k, t) < 0.15, (jax.tree_util.keystr(path), rel_err(k, t), rel_err(l, t))
    errors.append((rel_err(k, t), rel_err(l, t)))
  mean_kernel, mean_layers = np.mean(errors, axis=0)  # bf16 noise of a few %, leaf by leaf either way
  assert mean_kernel < 1.25 * mean_layers, (mean_kernel, mean_layers)


def test_scanned_vit_gradients_with_the_kernels_equal_the_unrolled_xla_model():
  """The ViT's gates (per-ACM and the q/k/v group) read their parameters through `nn.scan` and the
  packed small parameters of a remat policy: gradients of a Gumbel-mode loss equal the unrolled
  model's with XLA gates, float32."""
  config = vit.ViTConfig(image_size=16, patch_size=4, dim=32, depth=2, num_heads=2, mlp_dim=64, num_classes=5,
                         acm=acm.ACMConfig(num_learners=4, gate_hidden=16, attention=True, impl="xla"))
  sample = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  params = vit.ViT(config).init({"params": jax.random.key(0), "gumbel": jax.random.key(0)}, sample,
                                 mode="gumbel")["params"]

  def grads(model, p):
    loss = lambda q: jnp.sum(model.apply({"params": q}, sample, mode="gumbel", mutable=["acm"],
                                         rngs={"gumbel": jax.random.key(2)})[0] ** 2)
    return jax.jit(jax.grad(loss))(p)

  want = flatten(grads(vit.ViT(config), params))
  for group in (False, True):
    scanned = dataclasses.replace(config, scan_blocks=True, remat="dots",
                                  acm=dataclasses.replace(config.acm, group_qkv_gates=group)).validate()
    with acm.gate_kernel("interpret"), transformer.small_params_packed(True):
      got = flatten(transformer.unstack_blocks(grads(vit.ViT(scanned), transformer.stack_blocks(params))))
    for key, value in want.items():
      np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-5, err_msg=f"group={group} {key}")


def test_what_the_kernels_do_not_take():
  assert gm.supports(768, [16, 16, 5]) is None
  assert "divisible by 16, got 40" in gm.supports(40, [16, 5])
  assert "two or more layers" in gm.supports(64, [5])
  assert "one width" in gm.supports(64, [16, 32, 5])
  assert "at most 64 units" in gm.supports(64, [128, 5])
  with pytest.raises(ValueError, match="gate_kernel takes None, True, False or 'interpret', got 'yes'"):
    with acm.gate_kernel("yes"):
      pass
  # a gate the kernels do not take runs on XLA's layers, also when asked for the kernels
  gate = acm.Gate(5, depth=3, hidden=128)
  x = jax.random.normal(jax.random.key(3), (2, 4, 64))
  params = gate.init(jax.random.key(4), x)
  with acm.gate_kernel("interpret"):
    got = gate.apply(params, x)
  np.testing.assert_allclose(got, gate.apply(params, x), rtol=1e-6)
