"""Hugging Face Wav2Vec2 / Wav2Vec2ForCTC checkpoint directories -> our Flax Wav2Vec2.

A directory holds config.json and model.safetensors (or pytorch_model.bin, read
with torch). The position convolution's weight norm (weight_g / weight_v, or
torch's parametrizations original0 / original1) is folded into one kernel.
Pretraining-only tensors (quantizer, masked_spec_embed, ...) are ignored; every
parameter of our model must come from the checkpoint with the right shape, and a
model without a CTC head (Wav2Vec2Model), or whose head does not fit our
vocabulary, keeps the freshly initialised head.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import numpy as np

from acm_jax.acmize import flatten, unflatten
from acm_jax.checkpoint_io import CheckpointError, read_json, read_safetensors, read_torch
from acm_jax.wav2vec2 import model as wav2vec2
from acm_jax.pytree import PyTree


# pretraining heads and buffers that a CTC model has no use for
IGNORED = ("masked_spec_embed", "quantizer.", "project_q.", "project_hid.", "dropout_features")

STRUCTURAL_FIELDS = ("conv_dim", "conv_kernel", "conv_stride", "conv_bias", "feat_extract_norm",
                     "stable_layer_norm", "dim", "depth", "num_heads", "mlp_dim", "num_conv_pos_embeddings",
                     "num_conv_pos_embedding_groups")

_LINEAR = {"attention.q_proj": "attn/query/dense", "attention.k_proj": "attn/key/dense",
           "attention.v_proj": "attn/value/dense", "attention.out_proj": "attn/out/dense",
           "feed_forward.intermediate_dense": "mlp/fc1", "feed_forward.output_dense": "mlp/fc2"}
_NORM = {"layer_norm": "ln1", "final_layer_norm": "ln2"}


def config_fields(hf: dict, source: str) -> dict:
  """Our Wav2Vec2Config fields from a transformers config.json."""
  if hf.get("model_type", "wav2vec2") not in ("wav2vec2",):
    raise CheckpointError(f"{source}: model_type {hf.get('model_type')!r} is not wav2vec2")
  if hf.get("add_adapter"):
    raise CheckpointError(f"{source}: checkpoints with an adapter (add_adapter=true) are not supported")
  for key in ("hidden_act", "feat_extract_activation"):
    if hf.get(key, "gelu") != "gelu":
      raise CheckpointError(f"{source}: {key}={hf[key]!r}; only 'gelu' is supported")
  try:
    return dict(
        conv_dim=tuple(hf["conv_dim"]), conv_kernel=tuple(hf["conv_kernel"]), conv_stride=tuple(hf["conv_stride"]),
        conv_bias=bool(hf.get("conv_bias", False)), feat_extract_norm=hf.get("feat_extract_norm", "group"),
        stable_layer_norm=bool(hf.get("do_stable_layer_norm", False)), dim=hf["hidden_size"],
        depth=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
        num_conv_pos_embeddings=hf["num_conv_pos_embeddings"],
        num_conv_pos_embedding_groups=hf["num_conv_pos_embedding_groups"], vocab_size=hf.get("vocab_size", 32),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-5))
  except KeyError as e:
    raise CheckpointError(f"{source}: config.json lacks {e.args[0]!r}") from None


def _weights_file(directory: Path) -> Path:
  for name in ("model.safetensors", "pytorch_model.bin"):
    if (directory / name).is_file():
      return directory / name
  raise CheckpointError(f"{directory} holds neither model.safetensors nor pytorch_model.bin")


def _fold_weight_norm(raw: dict[str, np.ndarray], prefix: str) -> np.ndarray | None:
  """w = g * v / ||v||, the norm over every axis but the kernel axis (weight norm with dim=2)."""
  for g_name, v_name in (("weight_g", "weight_v"), ("parametrizations.weight.original0",
                                                    "parametrizations.weight.original1")):
    if prefix + g_name in raw:
      g, v = raw.pop(prefix + g_name).astype(np.float64), raw.pop(prefix + v_name).astype(np.float64)
      return (g * v / np.sqrt(np.sum(v * v, axis=(0, 1), keepdims=True))).astype(np.float32)
  return raw.pop(prefix + "weight", None)


def _our_name(name: str) -> tuple[str, str] | None:
  """HF name (without the 'wav2vec2.' prefix) -> (our path, kind), kind in linear/conv/norm."""
  rules = [
      (r"feature_extractor\.conv_layers\.(\d+)\.conv\.(weight|bias)", "conv", "feature_encoder/conv_{0}"),
      (r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.(weight|bias)", "norm", "feature_encoder/conv_norm_{0}"),
      (r"feature_projection\.layer_norm\.(weight|bias)", "norm", "projection_norm"),
      (r"feature_projection\.projection\.(weight|bias)", "linear", "projection"),
      (r"encoder\.layer_norm\.(weight|bias)", "norm", "encoder_norm"),
      (r"encoder\.pos_conv_embed\.conv\.(weight|bias)", "conv", "pos_conv/conv"),
      (r"lm_head\.(weight|bias)", "linear", "head"),
  ]
  for pattern, kind, target in rules:
    m = re.fullmatch(pattern, name)
    if m:
      *groups, leaf = m.groups()
      return f"{target.format(*groups)}/{leaf}", kind
  m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
  if m:
    layer, module, leaf = m.groups()
    if module in _LINEAR:
      return f"block_{layer}/{_LINEAR[module]}/{leaf}", "linear"
    if module in _NORM:
      return f"block_{layer}/{_NORM[module]}/{leaf}", "norm"
  return None


def _convert(kind: str, path: str, array: np.ndarray) -> tuple[str, np.ndarray]:
  base, leaf = path.rsplit("/", 1)
  if leaf == "bias":
    return path, array
  if kind == "linear":
    return f"{base}/kernel", array.T
  if kind == "conv":  # (out, in / groups, width) -> (width, in / groups, out)
    return f"{base}/kernel", array.transpose(2, 1, 0)
  return f"{base}/scale", array


def read(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
  """A checkpoint directory -> (our config fields, our flat params)."""
  directory = Path(path)
  if not directory.is_dir():
    raise CheckpointError(f"{directory} is not a directory holding a Hugging Face Wav2Vec2 checkpoint")
  if not (directory / "config.json").is_file():
    raise CheckpointError(f"{directory} has no config.json")
  fields = config_fields(read_json(directory / "config.json"), str(directory))
  weights = _weights_file(directory)
  raw = read_safetensors(weights)[0] if weights.suffix == ".safetensors" else read_torch(weights)
  raw = {k.removeprefix("wav2vec2."): np.asarray(v, np.float32) for k, v in raw.items()}
  pos_kernel = _fold_weight_norm(raw, "encoder.pos_conv_embed.conv.")
  if pos_kernel is not None:
    raw["encoder.pos_conv_embed.conv.weight"] = pos_kernel
  params, unmapped = {}, []
  for name, array in raw.items():
    target = _our_name(name)
    if target is None:
      if not name.startswith(IGNORED):
        unmapped.append(name)
      continue
    key, value = _convert(target[1], target[0], array)
    params[key] = value
  if unmapped:
    raise CheckpointError(f"{weights}: tensors with no counterpart in our Wav2Vec2: {sorted(unmapped)[:8]}")
  return fields, params


def config_for_init(path: str | Path, preset: str, **overrides) -> wav2vec2.Wav2Vec2Config:
  """The config to build for a checkpoint: its own (preset "from_init") or a preset it must agree with."""
  fields, _ = read(path)
  fields.update(overrides)
  if preset == "from_init":
    return wav2vec2.Wav2Vec2Config(**fields).validate()
  config = wav2vec2.get_config(preset, **overrides)
  wrong = {f: (getattr(config, f), fields[f]) for f in STRUCTURAL_FIELDS if getattr(config, f) != fields[f]}
  if wrong:
    detail = ", ".join(f"{f}: preset {a!r} vs checkpoint {b!r}" for f, (a, b) in wrong.items())
    raise CheckpointError(f"{path} does not match --model={preset} ({detail}); use --model=from_init to take "
                          "the checkpoint's architecture")
  return dataclasses.replace(config, vocab_size=fields["vocab_size"], layer_norm_eps=fields["layer_norm_eps"])


def load(path: str | Path, expected: PyTree) -> PyTree:
  """Params shaped like `expected` (a dense Wav2Vec2's) from a checkpoint directory."""
  _, params = read(path)
  want = flatten(expected)
  missing = sorted(set(want) - set(params))
  if missing and missing != ["head/bias", "head/kernel"]:
    raise CheckpointError(f"{path}: the model needs {missing[:6]}, which the checkpoint lacks")
  out = {}
  for key, value in want.items():
    if key not in params:  # a checkpoint without CTC head: keep the initialised one
      out[key] = np.asarray(value)
      continue
    if params[key].shape != value.shape and key.startswith("head/"):
      print(f"{path}: CTC head of {params[key].shape} does not fit the vocabulary ({value.shape}); "
            "it starts from scratch", file=sys.stderr)
      out[key] = np.asarray(value)
      continue
    if params[key].shape != value.shape:
      raise CheckpointError(f"{path}: parameter {key!r} has shape {params[key].shape} in the checkpoint, "
                            f"the model expects {value.shape}")
    out[key] = params[key].astype(value.dtype)
  extra = sorted(set(params) - set(want))
  if extra:
    raise CheckpointError(f"{path}: checkpoint parameters {extra[:6]} have no place in the model")
  return unflatten(out)
