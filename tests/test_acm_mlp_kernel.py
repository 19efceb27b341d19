"""ACM MLP kernels against the plain-jnp reference (Pallas interpret mode on CPU).

The interpreter fills every kernel output (the hidden buffer between the two
launches too) with NaN before the kernels run, so an element a kernel forgets
to write, or a hidden tile read before it was written, shows up as NaN and
fails the finiteness checks below; `test_interpreter_poisons_outputs` pins that
behaviour down. The jax-triton kernel only runs on a CUDA GPU: its tests skip
elsewhere (benchmarks/kernel_bench.py checks both kernels on the GPU).
"""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels import acm_mlp as pk
from pallas_kernels import triton_acm_mlp

LIMITS = {jnp.float32: 1e-5, jnp.bfloat16: 1.5e-2}  # relative L2 error vs the float32 reference
SMALL = dict(block_rows=16, block_hidden=16, block_out=32, block_k=16)


def make_inputs(seed, tokens, dim, num_learners, width, dtype, k_kind="random", sort=True):
  rng = np.random.default_rng(seed)
  total = num_learners * width
  k = {"random": rng.integers(0, num_learners + 1, tokens), "zeros": np.zeros(tokens, int),
       "full": np.full(tokens, num_learners)}[k_kind]
  if sort:
    k = np.sort(k)[::-1]
  arrays = dict(
      x=rng.normal(size=(tokens, dim)),
      w1=rng.normal(size=(dim, total)) / np.sqrt(dim),
      b1=0.5 * rng.normal(size=(total,)),
      w2=rng.normal(size=(total, dim)) / np.sqrt(width),
      bias_table=rng.normal(size=(num_learners + 1, dim)),
  )
  arrays = {name: jnp.asarray(v, dtype) for name, v in arrays.items()}
  return arrays["x"], jnp.asarray(k.copy(), jnp.int32), arrays["w1"], arrays["b1"], arrays["w2"], \
      arrays["bias_table"]


def rel_err(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def check_close(out, ref, dtype):
  assert out.dtype == dtype and out.shape == ref.shape
  assert np.isfinite(np.asarray(out, np.float32)).all(), "unwritten or NaN output elements"
  assert rel_err(out, ref) < LIMITS[dtype]


CASES = [
    # (tokens, dim, num_learners, width, dtype, k_kind, activation, blocks)
    (1, 64, 4, 32, jnp.float32, "random", "gelu", SMALL),
    (127, 64, 4, 32, jnp.float32, "random", "gelu", SMALL),
    (1000, 64, 4, 32, jnp.bfloat16, "random", "gelu", dict(SMALL, block_rows=64)),
    (127, 64, 4, 32, jnp.bfloat16, "zeros", "gelu", SMALL),
    (127, 64, 4, 32, jnp.float32, "full", "gelu", SMALL),
    (127, 64, 3, 16, jnp.float32, "random", "gelu_tanh", SMALL),
    (127, 64, 2, 32, jnp.float32, "random", "relu", SMALL),
    (127, 64, 4, 32, jnp.float32, "random", "identity", SMALL),
    # ViT-S and ViT-B widths with few tokens (the interpreter is slow)
    (37, 384, 4, 384, jnp.bfloat16, "random", "gelu", dict(block_rows=16, block_hidden=128, block_out=128,
                                                            block_k=128)),
    (20, 384, 4, 384, jnp.float32, "full", "gelu", dict(block_rows=16, block_hidden=128, block_out=128,
                                                         block_k=128)),
    (21, 768, 4, 768, jnp.bfloat16, "random", "gelu", dict(block_rows=16, block_hidden=256, block_out=256,
                                                            block_k=256)),
]


@pytest.mark.parametrize("tokens,dim,n,width,dtype,k_kind,activation,blocks", CASES)
def test_sorted_tokens_match_reference(tokens, dim, n, width, dtype, k_kind, activation, blocks):
  args = make_inputs(tokens * 7 + dim, tokens, dim, n, width, dtype, k_kind)
  ref = pk.acm_mlp_reference(*args, num_learners=n, activation=activation)
  out = pk.acm_mlp(*args, num_learners=n, activation=activation, interpret=True, **blocks)
  check_close(out, ref, dtype)


@pytest.mark.parametrize("method", pk.SORT_METHODS)
def test_unsorted_tokens_with_order_match_reference(method):
  n = 4
  args = make_inputs(3, 300, 64, n, 32, jnp.bfloat16, sort=False)
  x, k = args[:2]
  order = pk.sort_order(k, n, method)
  ref = pk.acm_mlp_reference(*args, num_learners=n)
  out = pk.acm_mlp(*args, num_learners=n, order=order, interpret=True, **SMALL)
  check_close(out, ref, jnp.bfloat16)


@pytest.mark.parametrize("x_gather,persistent", [("kernel", True), ("xla", False), ("xla", True)])
def test_launch_variants_match_reference(x_gather, persistent):
  """The non-default up launches: persistent tile walk, x gathered by XLA (block loads)."""
  n = 4
  args = make_inputs(7, 203, 64, n, 32, jnp.float32, sort=False)
  order = pk.sort_order(args[1], n)
  ref = pk.acm_mlp_reference(*args, num_learners=n)
  out = pk.acm_mlp(*args, num_learners=n, order=order, x_gather=x_gather, persistent=persistent,
                   interpret=True, **SMALL)
  check_close(out, ref, jnp.float32)


def test_bad_x_gather_is_rejected():
  args = make_inputs(0, 16, 64, 2, 32, jnp.float32)
  with pytest.raises(ValueError, match="x_gather"):
    pk.acm_mlp(*args, num_learners=2, order=jnp.arange(16), x_gather="numpy", interpret=True, **SMALL)


def test_jitted_kernel_matches_reference():
  n = 4
  args = make_inputs(5, 200, 64, n, 32, jnp.float32)
  f = jax.jit(functools.partial(pk.acm_mlp, num_learners=n, interpret=True, **SMALL))
  check_close(f(*args), pk.acm_mlp_reference(*args, num_learners=n), jnp.float32)


@pytest.mark.parametrize("method", pk.SORT_METHODS)
def test_sort_order_is_stable_descending(method):
  k = jnp.asarray(np.random.default_rng(1).integers(0, 5, 1000), jnp.int32)
  order = np.asarray(pk.sort_order(k, 4, method))
  np.testing.assert_array_equal(order, np.argsort(-np.asarray(k), kind="stable"))


@pytest.mark.parametrize("tokens,n,scan_blocks", [(1, 4, 2048), (129, 1, 2048), (20000, 4, 2048),
                                                   (1000, 8, 2)])
def test_blocked_sort_across_block_sizes(tokens, n, scan_blocks, monkeypatch):
  """Partial last block, >128^2 tokens (256-token blocks), and the cumsum scan of block totals."""
  monkeypatch.setattr(pk, "MATMUL_SCAN_BLOCKS", scan_blocks)
  k = np.random.default_rng(tokens).integers(0, n + 1, tokens).astype(np.int32)
  order = np.asarray(pk.sort_order(jnp.asarray(k), n, "blocked"))
  np.testing.assert_array_equal(order, np.argsort(-k, kind="stable"))


def test_blocked_sort_puts_out_of_range_k_last():
  """Still a permutation, with the invalid tokens at the tail, where `prepare` flags them."""
  k = np.random.default_rng(2).integers(0, 5, 300).astype(np.int32)
  k[[3, 77, 250]] = [-1, 9, 5]
  order = np.asarray(pk.sort_order(jnp.asarray(k), 4, "blocked"))
  np.testing.assert_array_equal(np.sort(order), np.arange(300))
  np.testing.assert_array_equal(order[-3:], [3, 77, 250])
  np.testing.assert_array_equal(order[:-3], np.argsort(-np.where(k > 4, -10, k), kind="stable")[:-3])


def test_reference_skips_learners_beyond_k():
  """The reference itself against an explicit sum over learners in float64."""
  n, width = 3, 8
  x, k, w1, b1, w2, bias = make_inputs(2, 50, 16, n, width, jnp.float32, sort=False)
  xs, w1s, b1s, w2s = (np.asarray(a, np.float64) for a in (x, w1, b1, w2))
  want = np.asarray(bias, np.float64)[np.asarray(k)]
  for t, kt in enumerate(np.asarray(k)):
    for learner in range(kt):
      cols = slice(learner * width, (learner + 1) * width)
      pre = xs[t] @ w1s[:, cols] + b1s[cols]
      hidden = 0.5 * pre * (1 + np.vectorize(__import__("math").erf)(pre / np.sqrt(2)))
      want[t] += hidden @ w2s[cols]
  assert rel_err(pk.acm_mlp_reference(x, k, w1, b1, w2, bias, num_learners=n), want) < 1e-5


def test_kernel_gelu_matches_exact_erf_gelu():
  z = jnp.linspace(-12, 12, 100_001, dtype=jnp.float32)
  err = jnp.abs(pk._gelu_erf(z) - jax.nn.gelu(z, approximate=False))
  assert float(jnp.max(err)) < 2e-6


def test_kernel_activations_are_the_library_table():
  """The kernels keep Triton-lowerable forms of the activations (no erf in Triton); each must
  be the function `acm.ACTIVATIONS` names, and the two tables must name the same ones."""
  from acm_jax import acm as acm_lib
  assert set(pk.ACTIVATIONS) == set(acm_lib.ACTIVATIONS)
  z = jnp.asarray(np.random.default_rng(0).normal(scale=4.0, size=50_000), jnp.float32)
  for name in pk.ACTIVATIONS:
    err = jnp.abs(pk._kernel_activation(name)(z) - acm_lib.get_activation(name)(z))
    assert float(jnp.max(err)) < 2e-6, name


def test_interpreter_poisons_outputs():
  """Unwritten output elements come back as NaN in interpret mode (what the checks above rely on)."""
  def kernel(o_ref):
    o_ref[0:8, :] = jnp.ones((8, 8), jnp.float32)

  out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((16, 8), jnp.float32), interpret=True)()
  assert np.isnan(np.asarray(out[8:])).all() and (np.asarray(out[:8]) == 1).all()


def test_invalid_k_under_jit_gives_nan_not_garbage():
  n = 4
  x, _, w1, b1, w2, bias = make_inputs(4, 40, 64, n, 32, jnp.float32)
  f = jax.jit(functools.partial(pk.acm_mlp, num_learners=n, interpret=True, **SMALL))
  unsorted = jnp.asarray(np.arange(40) % (n + 1), jnp.int32)
  too_big = jnp.full((40,), n + 1, jnp.int32)
  for k in (unsorted, too_big):
    assert np.isnan(np.asarray(f(x, k, w1, b1, w2, bias))).all()


def _bad(args, **overrides):
  kwargs = dict(num_learners=4, interpret=True, **SMALL)
  kwargs.update(overrides)
  return lambda: pk.acm_mlp(*args, **kwargs)


def test_bad_inputs_raise_before_launch():
  args = make_inputs(6, 40, 64, 4, 32, jnp.float32)
  x, k, w1, b1, w2, bias = args
  cases = {
      "x must be": _bad((x[0], k, w1, b1, w2, bias)),
      "k must have shape": _bad((x, k[:-1], w1, b1, w2, bias)),
      "w1 must be": _bad((x, k, w1[:-1], b1, w2, bias)),
      "b1 must have shape": _bad((x, k, w1, b1[:-1], w2, bias)),
      "w2 must have shape": _bad((x, k, w1, b1, w2[:, :-1], bias)),
      "bias_table must have shape": _bad((x, k, w1, b1, w2, bias[:-1])),
      "has dtype": _bad((x, k, w1.astype(jnp.bfloat16), b1, w2, bias)),
      "bfloat16 or float32": _bad((x.astype(jnp.float16), k, w1, b1, w2, bias)),
      "integer array": _bad((x, k.astype(jnp.float32), w1, b1, w2, bias)),
      "does not divide the learner width": _bad(args, block_hidden=64),
      "power of two": _bad(args, block_rows=24),
      "block_out": _bad(args, block_out=128),
      "lie in 0..4": _bad((x, k.at[0].set(5), w1, b1, w2, bias)),
      "sorted in descending order": _bad((x, k[::-1], w1, b1, w2, bias)),
      "permutation": _bad(args, order=jnp.zeros(40, jnp.int32)),
      "unknown activation": _bad(args, activation="swish"),
      "num_learners": _bad(args, num_learners=0),
  }
  for message, call in cases.items():
    with pytest.raises(ValueError, match=message):
      call()


def test_defaults_fit_vit_shapes():
  for family in ("hopper", "other"):
    for dtype in ("bf16", "f32"):
      base = pk._TUNED[(family, dtype)]
      assert base.block_rows >= 16 and base.num_warps[0] in (4, 8)
  for dim, width in ((384, 384), (768, 768), (1024, 1024), (192, 48)):
    cfg = pk.resolve_config(jnp.bfloat16, dim, width)
    assert width % cfg.block_hidden == 0 and dim % cfg.block_out == 0
    assert dim % cfg.block_k[0] == 0 and width % cfg.block_k[1] == 0
  assert pk.gpu_family() in ("hopper", "other")


def _has_cuda():
  try:
    return jax.default_backend() == "gpu"
  except RuntimeError:
    return False


@pytest.mark.skipif(importlib.util.find_spec("jax_triton") is not None, reason="jax-triton installed")
def test_triton_route_says_what_is_missing():
  args = make_inputs(7, 16, 64, 4, 32, jnp.bfloat16)
  with pytest.raises(ImportError, match="jax-triton"):
    triton_acm_mlp.acm_mlp_triton(*args, num_learners=4)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_triton_kernel_on_gpu(dtype):
  pytest.importorskip("jax_triton")
  if not _has_cuda():
    pytest.skip("the jax-triton kernel needs a CUDA GPU")
  n = 4
  args = make_inputs(8, 1000, 256, n, 128, dtype, sort=False)
  order = pk.sort_order(args[1], n)
  out = triton_acm_mlp.acm_mlp_triton(*args, num_learners=n, order=order)
  check_close(out, pk.acm_mlp_reference(*args, num_learners=n), dtype)


@pytest.mark.parametrize("fusions", ["none", "norm_residual", "split_down"])
def test_acm_vit_pallas_path_matches_xla_and_exports(fusions, monkeypatch):
  """Whole ACM-ViT forward: impl="pallas" (interpreted here) equals impl="xla", and the
  jitted forward survives a jax.export serialise/deserialise round trip; also with the pre-LN
  LayerNorms and skip connections taken into the kernels (`acm_fused.NORM_MIN_TOKENS`,
  `RESIDUAL_MIN_TOKENS`), and with the down launches split per learner (`DOWN_SPLIT_MAX_TOKENS`)."""
  import dataclasses

  from jax import export

  from acm_jax import acm as acm_lib
  from acm_jax.vit import model as vit
  from pallas_kernels import acm_fused

  if fusions == "norm_residual":
    monkeypatch.setattr(acm_fused, "NORM_MIN_TOKENS", 0)
    monkeypatch.setattr(acm_fused, "RESIDUAL_MIN_TOKENS", 0)
  if fusions == "split_down":
    monkeypatch.setattr(acm_fused, "DOWN_SPLIT_MAX_TOKENS", 10_000)
    seen = []
    real = acm_fused._down_split_kernel
    monkeypatch.setattr(acm_fused, "_down_split_kernel", lambda *a, **kw: seen.append(True) or real(*a, **kw))

  base = vit.get_config("tiny")
  images = jax.random.normal(jax.random.key(0), (2, base.image_size, base.image_size, 3))
  outputs = {}
  for impl in ("xla", "pallas"):
    cfg = dataclasses.replace(base, acm=acm_lib.ACMConfig(num_learners=4, impl=impl)).validate()
    model = vit.ViT(cfg)
    params = model.init(jax.random.key(1), images)["params"]
    forward = jax.jit(lambda p, x, model=model: model.apply({"params": p}, x))
    outputs[impl] = forward(params, images)
  np.testing.assert_allclose(outputs["pallas"], outputs["xla"], rtol=2e-4, atol=2e-4)
  if fusions == "split_down":
    assert seen, "the split down launch did not run"

  exported = export.deserialize(export.export(forward)(params, images).serialize())
  np.testing.assert_allclose(exported.call(params, images), outputs["pallas"], rtol=1e-6, atol=1e-6)
