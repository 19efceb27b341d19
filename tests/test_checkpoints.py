"""Checkpoint import (transformers, timm, AugReg/big_vision, orbax) and our safetensors export.

The peers (torch, transformers, timm) are test-only: each test that needs one skips
when it is missing. Peer models get random weights and are saved locally; nothing
is downloaded.
"""

import dataclasses
import importlib.abc
import importlib.machinery
import importlib.util
import json
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from acm_jax import acm
from acm_jax.vit import checkpoints
from acm_jax.acmize import flatten, unflatten
from acm_jax.vit import model as vit

PEER = dict(image_size=32, patch_size=8, dim=192, depth=2, num_heads=3, mlp_dim=768, num_classes=10)
TOL = 1e-4


def images(n=3, size=32, seed=0):
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def param_shapes(cfg):
  x = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: vit.ViT(cfg).init(jax.random.key(0), x)["params"], x)


def random_params(cfg, seed):
  """Random values everywhere (biases and LayerNorms included), so a mix-up cannot hide."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.1 * rng.normal(size=s.shape)).astype(s.dtype), param_shapes(cfg))


def our_model(layer_norm_eps, **overrides):
  """(jitted apply, parameter shapes) of our ViT in the peers' configuration."""
  cfg = vit.ViTConfig(**{**PEER, **overrides}, layer_norm_eps=layer_norm_eps).validate()
  return jax.jit(vit.ViT(cfg).apply), param_shapes(cfg)


def perturb_torch(model, seed):
  """Random values in every parameter, as `random_params` does for ours."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=gen))
  return model.eval()


def torch_logits(model, x):
  import torch
  with torch.no_grad():
    out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  return getattr(out, "logits", out).numpy()


def assert_same_logits(path, reference, layer_norm_eps, x=None):
  x = images() if x is None else x
  apply, expected = our_model(layer_norm_eps)
  params = checkpoints.load_dense(path, expected)
  got = np.asarray(apply({"params": params}, x))
  assert np.max(np.abs(got - reference)) < TOL


# --- transformers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_model():
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config = transformers.ViTConfig(hidden_size=PEER["dim"], num_hidden_layers=PEER["depth"],
                                  num_attention_heads=PEER["num_heads"], intermediate_size=PEER["mlp_dim"],
                                  image_size=PEER["image_size"], patch_size=PEER["patch_size"],
                                  num_labels=PEER["num_classes"])
  return perturb_torch(transformers.ViTForImageClassification(config), 0)


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
  path = tmp_path_factory.mktemp("hf")
  hf_model.save_pretrained(path)
  return path


def test_transformers_safetensors_dir_matches_peer_logits(hf_model, hf_dir):
  x = images()
  assert_same_logits(hf_dir, torch_logits(hf_model, x), 1e-12, x)
  assert_same_logits(hf_dir / "model.safetensors", torch_logits(hf_model, x), 1e-12, x)
  arch = checkpoints.read_architecture(hf_dir)
  assert arch == {"format": "hf", **PEER, "layer_norm_eps": 1e-12, "class_token": True, "final_norm": True,
                  "acm": False}


def test_transformers_state_dict_bin_matches_peer_logits(hf_model, hf_dir, tmp_path):
  import torch
  # a torch.save of the live module: transformers 5 names (q_proj, mlp.fc1, ...) rather than the file's
  torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
  (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
  x = images()
  assert_same_logits(tmp_path, torch_logits(hf_model, x), 1e-12, x)


# --- timm --------------------------------------------------------------------------


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """timm imports torchvision at package import, for pieces a ViT never uses; the PyPI
  torchvision does not load beside the CPU torch build, so tests stand in empty modules."""

  class _Placeholder(type):
    def __getattr__(cls, name):
      if name.startswith("__"):
        raise AttributeError(name)
      return type(cls)(name, (), {})

  def find_spec(self, name, path, target=None):
    if name.split(".")[0] == "torchvision":
      return importlib.machinery.ModuleSpec(name, self, is_package=True)
    return None

  def create_module(self, spec):
    module = types.ModuleType(spec.name)
    module.__path__ = []

    def missing(attr):
      if attr.startswith("__"):
        raise AttributeError(attr)
      return self._Placeholder(attr, (), {})

    module.__getattr__ = missing
    return module

  def exec_module(self, module):
    pass


def import_timm_vit():
  pytest.importorskip("torch")
  if importlib.util.find_spec("timm") is None:
    pytest.skip("timm is not installed")
  if importlib.util.find_spec("torchvision") is not None:
    return pytest.importorskip("timm.models.vision_transformer")
  stub = _TorchvisionStub()
  sys.meta_path.insert(0, stub)
  try:
    import timm.models.vision_transformer as module
  finally:
    sys.meta_path.remove(stub)
    for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
      del sys.modules[name]
  return module


@pytest.fixture(scope="module")
def timm_model():
  vision_transformer = import_timm_vit()
  model = vision_transformer.VisionTransformer(
      img_size=PEER["image_size"], patch_size=PEER["patch_size"], embed_dim=PEER["dim"], depth=PEER["depth"],
      num_heads=PEER["num_heads"], mlp_ratio=PEER["mlp_dim"] / PEER["dim"], num_classes=PEER["num_classes"])
  return perturb_torch(model, 1)


@pytest.mark.parametrize("container", ["safetensors", "pth"])
def test_timm_matches_peer_logits(timm_model, tmp_path, container):
  import torch
  from safetensors.torch import save_file
  state = {k: v.contiguous() for k, v in timm_model.state_dict().items()}
  if container == "safetensors":
    path = tmp_path / "model.safetensors"
    save_file(state, path)
  else:  # a training checkpoint that wraps the weights
    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
  x = images()
  assert_same_logits(path, torch_logits(timm_model, x), 1e-6, x)
  arch = checkpoints.read_architecture(path)
  assert {k: arch[k] for k in PEER} == PEER and arch["format"] == "timm"


# --- AugReg / big_vision .npz ----------------------------------------------------------


def to_augreg_names(params, heads, style):
  """Our params under vision_transformer's (augreg) or big_vision's names and layouts,
  written independently of the loader's rules."""
  flat = {k: np.asarray(v) for k, v in flatten(params).items()}
  ln2, attn, mlp = ("LayerNorm_2", "MultiHeadDotProductAttention_1", "MlpBlock_3") if style == "augreg" \
      else ("LayerNorm_1", "MultiHeadDotProductAttention_0", "MlpBlock_0")
  out = {"cls": flat["cls"], "embedding/kernel": flat["embedding/kernel"], "embedding/bias": flat["embedding/bias"],
         "head/kernel": flat["head/kernel"], "head/bias": flat["head/bias"],
         "Transformer/encoder_norm/scale": flat["norm/scale"], "Transformer/encoder_norm/bias": flat["norm/bias"]}
  if style == "augreg":
    out["Transformer/posembed_input/pos_embedding"] = flat["pos_embedding"]
  else:  # big_vision adds positions to the patches only
    out["pos_embedding"] = flat["pos_embedding"][:, 1:]
  depth = 1 + max(int(k.split("/")[0][6:]) for k in flat if k.startswith("block_"))
  for i in range(depth):
    src, dst = f"block_{i}", f"Transformer/encoderblock_{i}"
    for ours, theirs in (("ln1", "LayerNorm_0"), ("ln2", ln2)):
      out[f"{dst}/{theirs}/scale"] = flat[f"{src}/{ours}/scale"]
      out[f"{dst}/{theirs}/bias"] = flat[f"{src}/{ours}/bias"]
    for name in ("query", "key", "value"):
      kernel = flat[f"{src}/attn/{name}/dense/kernel"]
      out[f"{dst}/{attn}/{name}/kernel"] = kernel.reshape(kernel.shape[0], heads, -1)
      out[f"{dst}/{attn}/{name}/bias"] = flat[f"{src}/attn/{name}/dense/bias"].reshape(heads, -1)
    kernel = flat[f"{src}/attn/out/dense/kernel"]
    out[f"{dst}/{attn}/out/kernel"] = kernel.reshape(heads, -1, kernel.shape[1])
    out[f"{dst}/{attn}/out/bias"] = flat[f"{src}/attn/out/dense/bias"]
    for ours, theirs in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
      out[f"{dst}/{mlp}/{theirs}/kernel"] = flat[f"{src}/mlp/{ours}/kernel"]
      out[f"{dst}/{mlp}/{theirs}/bias"] = flat[f"{src}/mlp/{ours}/bias"]
  if style == "big_vision":
    out = {f"params/img/{k}": v for k, v in out.items()}
  return out


@pytest.mark.parametrize("style", ["augreg", "big_vision"])
def test_npz_round_trip(tmp_path, style):
  apply, shapes = our_model(1e-6)
  params = random_params(vit.ViTConfig(**PEER), 1)
  if style == "big_vision":  # its class token has no position: the import gives it a zero one
    params["pos_embedding"][:, 0] = 0.0
  path = tmp_path / "ViT-test.npz"
  np.savez(path, **to_augreg_names(params, PEER["num_heads"], style))
  loaded = checkpoints.load_dense(path, shapes)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  x = images()
  np.testing.assert_allclose(apply({"params": loaded}, x), apply({"params": params}, x), atol=1e-6)
  arch = checkpoints.read_architecture(path)
  assert {k: arch[k] for k in PEER} == PEER and arch["format"] == "augreg"


# --- our formats ---------------------------------------------------------------------


def small_config(with_acm):
  cfg = vit.get_config("tiny", image_size=16, patch_size=4, dim=32, depth=2, num_heads=4, mlp_dim=128, num_classes=5)
  return dataclasses.replace(cfg, acm=acm.ACMConfig(num_learners=4, blocks=(1,), attention=True,
                                                    impl="xla")).validate() if with_acm else cfg


@pytest.mark.parametrize("with_acm", [False, True])
def test_safetensors_export_round_trip(tmp_path, with_acm):
  cfg = small_config(with_acm)
  params = random_params(cfg, 2)
  checkpoints.export_safetensors(params, cfg, tmp_path / "export")
  loaded, loaded_cfg = checkpoints.load_safetensors(tmp_path / "export")
  assert loaded_cfg == cfg
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  assert json.loads((tmp_path / "export" / "config.json").read_text())["vit_config"]["dim"] == 32
  if with_acm:
    with pytest.raises(checkpoints.CheckpointError, match="ACMized"):
      checkpoints.load_dense(tmp_path / "export", param_shapes(small_config(False)))
    with pytest.raises(checkpoints.CheckpointError, match="ACMized"):
      checkpoints.vit_config_for_init(tmp_path / "export", "from_init")
  else:
    loaded = checkpoints.load_dense(tmp_path / "export", param_shapes(cfg))
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    assert checkpoints.vit_config_for_init(tmp_path / "export", "from_init") == cfg


def test_export_rejects_params_of_another_config(tmp_path):
  params = random_params(small_config(False), 0)
  with pytest.raises(checkpoints.CheckpointError, match="missing"):
    checkpoints.export_safetensors(params, small_config(True), tmp_path)


def test_orbax_run_dir(tmp_path):
  from acm_jax.train import loop
  cfg = small_config(False)
  params = random_params(cfg, 3)
  loop.save_params(tmp_path / "pretrain", params)
  (tmp_path / "pretrain" / "config.json").write_text(json.dumps({"model": "tiny"}))
  for path in (tmp_path / "pretrain", tmp_path / "pretrain" / "params"):
    loaded = checkpoints.load_dense(path, params)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
  arch = checkpoints.read_architecture(tmp_path / "pretrain")
  assert (arch["format"], arch["num_heads"], arch["image_size"], arch["depth"]) == ("orbax", 4, 16, 2)


# --- position embeddings -------------------------------------------------------------


def test_position_table_resized_for_another_image_size(hf_dir):
  apply, expected = our_model(1e-12, image_size=48)  # 4x4 patch grid -> 6x6
  params = checkpoints.load_dense(hf_dir, expected)
  assert params["pos_embedding"].shape == (1, 37, PEER["dim"])
  logits = apply({"params": params}, images(2, 48))
  assert logits.shape == (2, PEER["num_classes"]) and np.all(np.isfinite(logits))
  config = checkpoints.vit_config_for_init(hf_dir, "from_init", image_size=48)
  assert config.image_size == 48 and config.layer_norm_eps == 1e-12


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_resize_pos_embedding(method):
  rng = np.random.default_rng(0)
  pos = rng.normal(size=(1, 17, 8)).astype(np.float32)
  np.testing.assert_array_equal(checkpoints.resize_pos_embedding(pos, 17, method), pos)
  # the class slot is kept; a grid constant in space stays constant
  flat = np.concatenate([pos[:, :1], np.broadcast_to(pos[:, 1:2], (1, 16, 8))], axis=1)
  out = checkpoints.resize_pos_embedding(flat, 1 + 49, method)
  assert out.shape == (1, 50, 8)
  np.testing.assert_array_equal(out[:, 0], pos[:, 0])
  np.testing.assert_allclose(out[:, 1:], np.broadcast_to(pos[:, 1:2], (1, 49, 8)), atol=1e-5)
  with pytest.raises(checkpoints.CheckpointError, match="square"):
    checkpoints.resize_pos_embedding(pos, 1 + 50, method)


# --- bad input -------------------------------------------------------------------------


def test_missing_file():
  with pytest.raises(FileNotFoundError, match="does-not-exist"):
    checkpoints.load_dense("/tmp/does-not-exist.npz", {})


def test_unknown_formats(tmp_path):
  from safetensors.numpy import save_file
  (tmp_path / "weights.txt").write_text("hello")
  with pytest.raises(checkpoints.CheckpointError, match=r"unknown checkpoint format.*weights\.txt"):
    checkpoints.read_architecture(tmp_path / "weights.txt")
  save_file({"encoder.w": np.zeros(3, np.float32)}, tmp_path / "other.safetensors")
  with pytest.raises(checkpoints.CheckpointError, match=r"unknown checkpoint format.*other\.safetensors.*encoder\.w"):
    checkpoints.load_dense(tmp_path / "other.safetensors", {})
  (tmp_path / "empty").mkdir()
  with pytest.raises(checkpoints.CheckpointError, match="unknown checkpoint format"):
    checkpoints.load_dense(tmp_path / "empty", {})
  (tmp_path / "broken.npz").write_bytes(b"not a zip")
  with pytest.raises(checkpoints.CheckpointError, match=r"broken\.npz"):
    checkpoints.load_dense(tmp_path / "broken.npz", {})


def test_shapes_that_disagree_with_the_preset(hf_dir):
  _, expected = our_model(1e-12, mlp_dim=384)
  with pytest.raises(checkpoints.CheckpointError) as err:
    checkpoints.load_dense(hf_dir, expected)
  message = str(err.value)
  assert "model.safetensors" in message and "block_0/mlp/fc1/bias" in message
  assert "intermediate.dense.bias" in message and "(768,)" in message and "(384,)" in message
  with pytest.raises(checkpoints.CheckpointError, match=r"dim: preset 64, checkpoint 192.*from_init"):
    checkpoints.vit_config_for_init(hf_dir, "tiny", num_classes=10)


def test_missing_and_unexpected_parameters(hf_dir, tmp_path):
  from safetensors.numpy import load_file, save_file
  state = load_file(hf_dir / "model.safetensors")
  (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
  _, expected = our_model(1e-12)

  save_file({**state, "vit.encoder.layer.0.extra.weight": np.zeros(2, np.float32)}, tmp_path / "model.safetensors")
  with pytest.raises(checkpoints.CheckpointError, match=r"unexpected.*vit\.encoder\.layer\.0\.extra\.weight"):
    checkpoints.load_dense(tmp_path, expected)

  del state["vit.encoder.layer.1.layernorm_after.bias"]
  save_file(state, tmp_path / "model.safetensors")
  with pytest.raises(checkpoints.CheckpointError, match=r"model\.safetensors.*missing \['block_1/ln2/bias'\]"):
    checkpoints.load_dense(tmp_path, expected)

  _, deeper = our_model(1e-12, depth=3)  # a model deeper than the checkpoint: nothing stays at init
  with pytest.raises(checkpoints.CheckpointError, match="missing.*block_2"):
    checkpoints.load_dense(hf_dir, deeper)


def test_pytorch_pickle_without_torch(tmp_path, monkeypatch):
  (tmp_path / "model.pth").write_bytes(b"\x80")
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(checkpoints.CheckpointError, match=r"model\.pth.*needs torch"):
    checkpoints.load_dense(tmp_path / "model.pth", {})


# --- the entry point ----------------------------------------------------------------------


def test_entry_point_evaluates_an_imported_model(hf_dir, tmp_path, capsys):
  from experiments import vit_imagenet
  argv = ["--phase=eval", "--eval_models=dense", f"--init={hf_dir}", "--model=from_init",
          f"--workdir={tmp_path}", "--eval_examples=64", "--eval_batch_size=64"]
  assert vit_imagenet.main(argv) == 0
  record = json.loads((tmp_path / "eval.json").read_text())["dense"]  # the work dir's summary, keyed by model
  assert record["model"] == "dense" and record["examples"] == 64 and record["gflops_per_image"] > 0
  assert "top-1" in capsys.readouterr().out
  # a preset of another shape is refused with the fields that differ
  assert vit_imagenet.main([*argv[:3], "--model=tiny", f"--workdir={tmp_path}"]) == 2
  assert "dim: preset 64, checkpoint 192" in capsys.readouterr().err
