"""ACMizing Flax models this project did not write: a big_vision-style ViT (Linen) and an NNX MLP,
both defined here; exact at k = N, every mode against a NumPy reference, the library's steps train them,
bad patterns name the candidates, and docs/library.md runs as written."""

import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from acm_jax import acm as acm_lib
from acm_jax import any_flax
from acm_jax.train import steps

ROOT = Path(__file__).resolve().parents[1]


# --- a big_vision-style ViT: module names as in big_vision/models/vit.py -----------------------


class MlpBlock(nn.Module):
  mlp_dim: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic=True):
    d = x.shape[-1]
    x = nn.Dense(self.mlp_dim)(x)
    x = nn.gelu(x)  # flax's default: the tanh approximation
    x = nn.Dropout(rate=self.dropout)(x, deterministic)
    return nn.Dense(d)(x)


class Encoder1DBlock(nn.Module):
  mlp_dim: int
  num_heads: int

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm()(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(y, y)
    x = x + nn.Dense(x.shape[-1], name="proj")(y)  # a plain projection (big_vision has none)
    return x + MlpBlock(self.mlp_dim)(nn.LayerNorm()(x))


class Encoder(nn.Module):
  depth: int
  mlp_dim: int
  num_heads: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      x = Encoder1DBlock(self.mlp_dim, self.num_heads, name=f"encoderblock_{i}")(x)
    return nn.LayerNorm(name="encoder_norm")(x)


class BigVisionViT(nn.Module):
  num_classes: int = 5
  width: int = 16
  depth: int = 2

  @nn.compact
  def __call__(self, image):
    x = nn.Conv(self.width, (4, 4), strides=(4, 4), padding="VALID", name="embedding")(image)
    x = x.reshape(x.shape[0], -1, self.width)
    x = Encoder(self.depth, 4 * self.width, 2, name="Transformer")(x)
    return nn.Dense(self.num_classes, name="head")(x.mean(1))


@pytest.fixture(scope="module")
def vit():
  model = BigVisionViT()
  images = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
  variables = model.init(jax.random.key(1), images)
  return model, variables, images


def _reference_acm(params, x, k, n, act):
  """Independent NumPy forward of an ACM with per-token k (float64)."""
  w1, b1, w2 = (np.asarray(params[name], np.float64) for name in ("w1", "b1", "w2"))
  width = w1.shape[1] // n
  hidden = act(np.asarray(x, np.float64) @ w1 + b1)
  hidden = hidden * (np.arange(n * width) // width < np.asarray(k)[..., None])
  return hidden @ w2 + np.cumsum(np.asarray(params["b2"], np.float64), 0)[np.asarray(k)]


def _gelu_tanh(z):
  return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))


def _at(tree, path):
  for part in path.split("/"):
    tree = tree[part]
  return tree


def test_big_vision_mlps_become_exact_acms_in_every_mode(vit):
  model, variables, images = vit
  blocks = any_flax.find_blocks(model, variables, images, patterns=["Transformer/*/MlpBlock_0"])
  assert [b.path for b in blocks] == [f"Transformer/encoderblock_{i}/MlpBlock_0" for i in range(2)]
  assert {(b.activation, b.dim_in, b.hidden, b.first, b.second) for b in blocks} == {
      ("gelu_tanh", 16, 64, "Dense_0", "Dense_1")}
  acm_model = any_flax.ACMized(model, blocks, num_learners=4)
  params = acm_model.acmize(variables["params"], jax.random.key(2))
  full, _ = acm_model.apply({"params": params}, images, mode="full", mutable=["acm"])
  np.testing.assert_allclose(full, model.apply(variables, images), rtol=1e-5, atol=1e-5)
  for mode, kwargs in (("fixed", {"fixed_k": 1}), ("argmax", {}),
                       ("gumbel", {"rngs": {"gumbel": jax.random.key(3)}})):
    _, aux = acm_model.apply({"params": params}, images, mode=mode, mutable=["acm", "record"], **kwargs)
    for block in blocks:
      x, y = _at(aux["record"], block.path)["io"]
      k = np.argmax(_at(aux["acm"], block.path)["choice"][0], -1)
      assert k.shape == (3, 16) and (mode != "fixed" or (k == 1).all())
      np.testing.assert_allclose(y, _reference_acm(_at(params, block.path), x, k, 4, _gelu_tanh),
                                 rtol=1e-4, atol=1e-4, err_msg=f"{mode} {block.path}")


def test_kernel_path_equals_the_xla_path(vit):
  model, variables, images = vit
  blocks = any_flax.find_blocks(model, variables, images, patterns=["Transformer/*/MlpBlock_0"])
  xla = any_flax.ACMized(model, blocks, num_learners=4)
  params = xla.acmize(variables["params"], jax.random.key(2))
  kernel = any_flax.ACMized(model, blocks, num_learners=4, impl="pallas")  # interpreted on the CPU
  np.testing.assert_allclose(kernel.apply({"params": params}, images), xla.apply({"params": params}, images),
                             rtol=1e-4, atol=1e-4)


def test_projections_become_acms_too(vit):
  model, variables, images = vit
  blocks = any_flax.find_blocks(model, variables, images, linear=True,
                                patterns=["Transformer/*/MlpBlock_0", "Transformer/*/proj"])
  assert sorted(b.kind for b in blocks) == ["linear", "linear", "mlp", "mlp"]
  acm_model = any_flax.ACMized(model, blocks, num_learners=4)
  params = acm_model.acmize(variables["params"], jax.random.key(2))
  proj = _at(params, "Transformer/encoderblock_0/proj")
  assert proj["w1"].shape == (16, 16) and set(proj) == {"w1", "b1", "w2", "b2", "gate"}  # rank 16: 4 x 4
  full = acm_model.apply({"params": params}, images, mode="full")
  np.testing.assert_allclose(full, model.apply(variables, images), rtol=1e-4, atol=1e-4)


def test_bad_patterns_list_the_candidates(vit):
  model, variables, images = vit
  with pytest.raises(ValueError, match=re.escape("matches no module")) as e:
    any_flax.find_blocks(model, variables, images, patterns=["Transformer/*/Mlp_9"])
  assert "Transformer/encoderblock_0/MlpBlock_0" in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(ValueError, match="not Dense-activation-Dense") as e:
    any_flax.find_blocks(model, variables, images, patterns=["Transformer/encoderblock_0"])
  assert "Transformer/encoderblock_1/MlpBlock_0" in str(e.value)
  with pytest.raises(ValueError, match="not Dense-activation-Dense"):
    any_flax.find_blocks(model, variables, images, patterns=["head"])  # a Dense, without linear=True


def test_force_k_reaches_linen_acms_by_path_or_function(vit):
  model, variables, images = vit
  blocks = any_flax.find_blocks(model, variables, images, linear=True,
                                patterns=["Transformer/*/MlpBlock_0", "Transformer/*/proj"])
  acm_model = any_flax.ACMized(model, blocks, num_learners=4)
  params = acm_model.acmize(variables["params"], jax.random.key(2))
  keys = jax.random.split(jax.random.key(4), len(blocks))
  # per-token maps; projections never skip on their own, but a forced k = 0 is obeyed too
  kmap = {b.path: np.asarray(jax.random.randint(key, (3, 16), 0, 5)) for b, key in zip(blocks, keys)}
  for forced in (kmap, kmap.__getitem__):
    with acm_lib.force_k(forced):
      out, aux = jax.jit(lambda p: acm_model.apply({"params": p}, images, mode="argmax",
                                                   mutable=["acm", "record"]))(params)
    for block in blocks:
      np.testing.assert_array_equal(np.argmax(_at(aux["acm"], block.path)["choice"][0], -1), kmap[block.path])
      x, y = _at(aux["record"], block.path)["io"]
      act = _gelu_tanh if block.kind == "mlp" else (lambda z: z)
      np.testing.assert_allclose(y, _reference_acm(_at(params, block.path), x, kmap[block.path], 4, act),
                                 rtol=1e-4, atol=1e-4, err_msg=block.path)
  unforced = acm_model.apply({"params": params}, images, mode="argmax")  # outside the context, the gates again
  assert float(jnp.max(jnp.abs(unforced - out))) > 1e-3
  missing = {**kmap}
  del missing[blocks[1].path]
  with acm_lib.force_k(missing), pytest.raises(KeyError, match=re.escape(f"no choices for the ACM '{blocks[1].path}'")):
    acm_model.apply({"params": params}, images)


# --- a Flax NNX model ------------------------------------------------------------------------------


class NNXMlp(nnx.Module):
  def __init__(self, dim: int, hidden: int, rngs: nnx.Rngs):
    self.up = nnx.Linear(dim, hidden, rngs=rngs)
    self.down = nnx.Linear(hidden, dim, rngs=rngs)

  def __call__(self, x):
    return self.down(nnx.gelu(self.up(x), approximate=False))


class NNXNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Linear(6, 8, rngs=rngs)
    self.block_0 = NNXMlp(8, 32, rngs)
    self.block_1 = NNXMlp(8, 32, rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    x = self.embed(x)
    x = x + self.block_0(x)
    x = x + self.block_1(x)
    return self.head(x.mean(1))


def _gelu(z):
  from scipy.special import erf
  return 0.5 * z * (1 + erf(z / np.sqrt(2)))


def test_nnx_mlps_become_exact_acms_that_the_library_trains():
  import functools

  from acm_jax import losses
  model = NNXNet(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 5, 6))
  dense_out = model(x)
  acmized = any_flax.acmize_nnx(model, ["block_*"], num_learners=4, gate_hidden=8, rngs=nnx.Rngs(1))
  assert [(b.path, b.activation, b.first, b.second) for b in acmized.blocks] == [
      ("block_0", "gelu", "up", "down"), ("block_1", "gelu", "up", "down")]
  params = acmized.params()
  assert set(params["block_0"]) == {"w1", "b1", "w2", "b2", "gate"}
  np.testing.assert_allclose(acmized.apply({"params": params}, x, mode="full"), dense_out, rtol=1e-5, atol=1e-5)
  for mode, kwargs in (("fixed", {"fixed_k": 3}), ("argmax", {}), ("gumbel", {"rngs": {"gumbel": jax.random.key(2)}})):
    _, aux = acmized.apply({"params": params}, x, mode=mode, mutable=["acm", "record"], **kwargs)
    for block in acmized.blocks:
      xb, yb = aux["record"][block.path]["io"]
      k = np.argmax(aux["acm"][block.path]["choice"][0], -1)
      assert mode != "fixed" or (k == 3).all()
      np.testing.assert_allclose(yb, _reference_acm(params[block.path], xb, k, 4, _gelu), rtol=1e-4, atol=1e-4)

  labels = jnp.arange(4) % 3
  task = steps.Task(dense_model=acmized.dense(), acm_model=acmized, acm_specs=acmized.specs(),
                    inputs=lambda b: b["x"], loss=lambda out, b, ls: losses.classification_loss(out, b["label"], ls),
                    score=lambda out, b: {"examples": jnp.float32(4), "top1": jnp.sum(jnp.argmax(out, -1) == b["label"])})
  batch = {"x": x, "label": labels}
  teacher = params  # k = N of the freshly ACMized model is the dense model
  student = jax.tree.map(lambda p: p * 0.5, params)
  tx = optax.adam(1e-2)
  state = {"step": jnp.zeros((), jnp.int32), "params": student, "opt_state": tx.init(student),
           "rng": jax.random.key(3)}
  distill = jax.jit(functools.partial(steps.distill_step, task, tx, "detach", teacher))
  state, first = distill(state, batch)
  for _ in range(20):
    state, metrics = distill(state, batch)
  assert metrics["loss"] < 0.5 * first["loss"]
  state, metrics = jax.jit(functools.partial(steps.gate_step, task, tx, 1.2, "ours", teacher))(state, batch)
  state, metrics = jax.jit(functools.partial(steps.finetune_step, task, tx, steps.FinetuneWeights()))(state, batch)
  assert np.isfinite(metrics["loss"]) and 0 <= metrics["compute"] <= 1


def test_force_k_reaches_nnx_acms_but_not_their_dense_teacher():
  model = NNXNet(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 5, 6))
  dense_out = model(x)
  acmized = any_flax.acmize_nnx(model, ["block_*"], num_learners=4, gate_hidden=8, rngs=nnx.Rngs(1))
  params = acmized.params()
  kmap = {"block_0": np.asarray(jax.random.randint(jax.random.key(2), (4, 5), 0, 5)), "block_1": 1}
  for forced in (kmap, kmap.__getitem__):
    with acm_lib.force_k(forced):
      _, aux = acmized.apply({"params": params}, x, mode="gumbel", mutable=["acm", "record"],
                             rngs={"gumbel": jax.random.key(3)})
      teacher = acmized.dense().apply({"params": params}, x)
    for block in acmized.blocks:
      want = np.broadcast_to(kmap[block.path], (4, 5))
      np.testing.assert_array_equal(np.argmax(aux["acm"][block.path]["choice"][0], -1), want)
      xb, yb = aux["record"][block.path]["io"]
      np.testing.assert_allclose(yb, _reference_acm(params[block.path], xb, want, 4, _gelu), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(teacher, dense_out, rtol=1e-5, atol=1e-5)
  with acm_lib.force_k({"block_0": 1}), pytest.raises(KeyError, match="no choices for the ACM 'block_1'"):
    acmized.apply({"params": params}, x)


def test_nnx_projection_becomes_an_acm_of_its_singular_directions():
  """linear=True: a single nnx.Linear becomes identity learners; choice k keeps the top k
  quarters of the kernel's singular directions (a NumPy SVD as the reference), plus the bias."""
  model = NNXNet(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 5, 6))
  dense_out = model(x)
  kernel, bias = (np.asarray(v[...], np.float64) for v in (model.embed.kernel, model.embed.bias))
  acmized = any_flax.acmize_nnx(model, ["embed"], num_learners=2, gate_hidden=8, linear=True, rngs=nnx.Rngs(1))
  assert [(b.path, b.kind, b.activation, b.hidden) for b in acmized.blocks] == [("embed", "linear", "identity", 6)]
  params = acmized.params()
  np.testing.assert_allclose(acmized.apply({"params": params}, x, mode="full"), dense_out, rtol=1e-5, atol=1e-5)
  u, s, vt = np.linalg.svd(kernel, full_matrices=False)

  def reference(z, k):
    """(..., 6) inputs, (...) choices -> the rank-3k part of the projection (bias from k = 1 on)."""
    z = np.asarray(z, np.float64)
    out = np.zeros(z.shape[:-1] + (8,))
    for choice in range(3):
      rank = 3 * choice
      part = z @ (u[:, :rank] * s[:rank]) @ vt[:rank] + (bias if choice else 0)
      out = np.where((np.asarray(k) == choice)[..., None], part, out)
    return out

  for mode, kwargs in (("fixed", {"fixed_k": 1}), ("argmax", {}), ("gumbel", {"rngs": {"gumbel": jax.random.key(2)}})):
    _, aux = acmized.apply({"params": params}, x, mode=mode, mutable=["acm", "record"], **kwargs)
    xb, yb = aux["record"]["embed"]["io"]
    k = np.argmax(aux["acm"]["embed"]["choice"][0], -1)
    assert k.min() >= 1 and (mode != "fixed" or (k == 1).all())  # a projection never skips
    np.testing.assert_allclose(yb, reference(xb, k), rtol=1e-4, atol=1e-4, err_msg=mode)


def test_nnx_bad_patterns_list_the_candidates():
  model = NNXNet(nnx.Rngs(0))
  with pytest.raises(ValueError, match="matches no module") as e:
    any_flax.acmize_nnx(model, ["mlp_*"])
  assert "block_0" in str(e.value) and "block_1" in str(e.value)
  with pytest.raises(ValueError, match="not Linear-activation-Linear"):
    any_flax.acmize_nnx(model, ["head"])


def _python_blocks(path: Path) -> str:
  return "\n".join(re.findall(r"```python\n(.*?)```", path.read_text(), re.S))


def test_docs_library_runs_as_written():
  """Also the Linen case of "the library's steps train a foreign model": distill, gates, finetune."""
  namespace = {}
  exec(compile(_python_blocks(ROOT / "docs" / "library.md"), "docs/library.md", "exec"), namespace)
  assert [b.path for b in namespace["blocks"]] == ["mlp_0", "mlp_1"]
  assert np.isfinite(namespace["metrics"]["loss"])
  assert namespace["served"].num_arrays < len(jax.tree.leaves(namespace["state"]["params"]))


def test_readme_library_snippet_runs_as_written(capsys):
  exec(compile(_python_blocks(ROOT / "README.md"), "README.md", "exec"), {})
  assert capsys.readouterr().out.split("\n")[0] == "(2, 10, 32) (2, 10, 5)"
