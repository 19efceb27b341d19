"""Pretrained ViT checkpoints in, our params out (and back).

  load_dense(path, expected)   any supported checkpoint -> params shaped like `expected`
  read_architecture(path)      what the checkpoint says about the model (dim, depth, heads, ...)
  vit_config_for_init(path, preset, **overrides)   the ViTConfig to build for it
  export_safetensors / load_safetensors            our own format, dense or ACM

Formats, detected from the path and the parameter names: our orbax params dir
(or a run dir holding one), our safetensors export, transformers ViT
(model.safetensors or pytorch_model.bin, with config.json), timm ViT
(.safetensors or a PyTorch state dict), AugReg / big_vision .npz. Reading
PyTorch pickles needs torch; nothing else here does.

Every parameter of the model must come from the checkpoint with the right shape
and every checkpoint parameter must be used; otherwise a CheckpointError names
the file, the parameter and both shapes. The one shape that may differ is the
position table: it is resized on the patch grid (class slot kept) when the image
size differs.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from acm_jax.acmize import flatten, unflatten
from acm_jax.vit.export import export_safetensors, load_safetensors
from acm_jax.vit.formats import HEADS_BY_DIM, CheckpointError, Converted, read
from acm_jax.pytree import PyTree


__all__ = ["CheckpointError", "export_safetensors", "load_dense", "load_safetensors", "read_architecture",
           "resize_pos_embedding", "vit_config_for_init"]

STRUCTURAL_FIELDS = ("dim", "depth", "num_heads", "mlp_dim", "patch_size")


def _grid(num_positions: int, source: str) -> int:
  side = math.isqrt(num_positions)
  if side * side != num_positions:
    raise CheckpointError(f"{source}: {num_positions} patch positions do not form a square grid")
  return side


def resize_pos_embedding(pos: np.ndarray, num_tokens: int, method: str = "bicubic",
                         source: str = "pos_embedding") -> np.ndarray:
  """(1, 1 + g*g, dim) -> (1, num_tokens, dim): the class slot is kept, the g x g
  patch grid is resized (bilinear or bicubic) to the new square grid."""
  if method not in ("bilinear", "bicubic"):
    raise ValueError(f"unknown position interpolation {method!r}; expected 'bilinear' or 'bicubic'")
  old, new = _grid(pos.shape[1] - 1, source), _grid(num_tokens - 1, f"the model's {num_tokens} tokens")
  if old == new:
    return pos
  grid = jnp.asarray(pos[0, 1:], jnp.float32).reshape(old, old, -1)
  resized = jax.image.resize(grid, (new, new, grid.shape[-1]), "cubic" if method == "bicubic" else "linear")
  out = np.concatenate([np.asarray(pos[0, :1], np.float32), np.asarray(resized).reshape(new * new, -1)])
  return out[None].astype(pos.dtype)


def _with_class_slot(pos: np.ndarray) -> np.ndarray:
  """Checkpoints whose class token gets no position (big_vision, timm no_embed_class) store
  only the patch grid; a zero row for the class slot is exactly equivalent."""
  if math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:
    return np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
  return pos


def _describe(conv: Converted, key: str) -> str:
  source = conv.origin.get(key, key)
  return repr(key) if source == key else f"{key!r} (from {source!r})"


def match(conv: Converted, expected: PyTree, pos_method: str = "bicubic") -> PyTree:
  """The converted parameters checked name by name and shape by shape against
  `expected` (a pytree of arrays or ShapeDtypeStructs) and cast to its dtypes."""
  expected_flat = flatten(expected)
  where = f"checkpoint {conv.path} ({conv.format})"
  if conv.unmapped:
    raise CheckpointError(f"{where}: unexpected parameters with no counterpart in our ViT: "
                          f"{conv.unmapped[:8]}{' ...' if len(conv.unmapped) > 8 else ''}")
  if any(k.endswith("/w1") for k in conv.params) and not any(k.endswith("/w1") for k in expected_flat):
    raise CheckpointError(f"{where} holds an ACMized model; a dense ViT was expected (export or keep its "
                          "dense parent for --init)")
  if conv.activation != "gelu":
    raise CheckpointError(f"{where}: activation {conv.activation!r}; our ViT uses exact (erf) 'gelu'")
  missing = sorted(set(expected_flat) - set(conv.params))
  unexpected = sorted(set(conv.params) - set(expected_flat))
  if missing or unexpected:
    raise CheckpointError(f"{where} does not match the model: missing {missing[:8]}"
                          f"{' ...' if len(missing) > 8 else ''}, unexpected {[_describe(conv, k) for k in unexpected[:8]]}"
                          f"{' ...' if len(unexpected) > 8 else ''}")
  out = {}
  for key, want in expected_flat.items():
    value = conv.params[key]
    if key == "pos_embedding" and value.ndim == 3 and value.shape[2] == want.shape[2]:
      value = _with_class_slot(value)
      if value.shape != want.shape:
        value = resize_pos_embedding(value, want.shape[1], pos_method, f"{where}: {_describe(conv, key)}")
    if tuple(value.shape) != tuple(want.shape):
      raise CheckpointError(f"{where}: parameter {_describe(conv, key)} has shape {tuple(value.shape)}, "
                            f"the model expects {tuple(want.shape)}")
    out[key] = np.asarray(value, dtype=want.dtype)
  return unflatten(out)


def load_dense(path: str | Path, expected: PyTree, *, pos_method: str = "bicubic") -> PyTree:
  """A pretrained dense ViT's params, shaped and typed like `expected` (e.g. freshly
  initialised params of the model to run)."""
  return match(read(path), expected, pos_method)


def _architecture(conv: Converted) -> dict:
  if conv.vit_config is not None:
    cfg = conv.vit_config
    return {"format": conv.format, **{k: cfg[k] for k in ("dim", "depth", "num_heads", "mlp_dim", "patch_size",
                                                            "image_size", "num_classes", "layer_norm_eps")},
            "class_token": True, "final_norm": True, "acm": cfg.get("acm") is not None}
  p, where = conv.params, f"checkpoint {conv.path} ({conv.format})"
  for key in ("embedding/kernel", "pos_embedding", "block_0/mlp/fc1/kernel"):
    if key not in p:
      raise CheckpointError(f"{where}: cannot read the architecture, no {key!r} (is it a dense ViT?)")
  patch, _, _, dim = p["embedding/kernel"].shape
  class_token = "cls" in p
  positions = p["pos_embedding"].shape[-2]
  if class_token and math.isqrt(positions) ** 2 != positions:
    positions -= 1
  heads = conv.num_heads or HEADS_BY_DIM.get(dim)
  if heads is None:
    raise CheckpointError(f"{where}: the file does not give the number of attention heads and dim {dim} is no "
                          f"standard ViT width {sorted(HEADS_BY_DIM)}")
  return {"format": conv.format, "dim": int(dim),
          "depth": 1 + max(int(k.split("/")[0][len("block_"):]) for k in p if k.startswith("block_")),
          "num_heads": int(heads), "mlp_dim": int(p["block_0/mlp/fc1/kernel"].shape[1]), "patch_size": int(patch),
          "image_size": _grid(positions, where) * int(patch),
          "num_classes": int(p["head/kernel"].shape[1]) if "head/kernel" in p else None,
          "layer_norm_eps": float(conv.layer_norm_eps or 1e-6), "class_token": class_token,
          "final_norm": "norm/scale" in p, "acm": False}


def read_architecture(path: str | Path) -> dict:
  """format, dim, depth, num_heads, mlp_dim, patch_size, image_size, num_classes,
  layer_norm_eps, class_token, final_norm and acm (ACMized or not) of a checkpoint."""
  return _architecture(read(path))


def vit_config_for_init(path: str | Path, preset: str, **overrides):
  """The dense ViTConfig for running the checkpoint at `path`.

  preset="from_init" adopts the checkpoint's architecture; a named preset must agree
  with it in every shape-defining field. Either way the checkpoint's LayerNorm epsilon
  is used (transformers ViTs use 1e-12, the others 1e-6) and `overrides` (e.g. the
  data's image size) apply on top; the position table is resized to the image size.
  """
  from acm_jax.vit import model as vit
  arch = read_architecture(path)
  if arch["acm"]:
    raise CheckpointError(f"checkpoint {path} holds an ACMized model; --init takes a dense ViT")
  if not arch["class_token"] or not arch["final_norm"]:
    raise CheckpointError(f"checkpoint {path}: our ViT classifies the class token after a final LayerNorm; "
                          f"this one has class_token={arch['class_token']}, final_norm={arch['final_norm']}")
  fields = {k: arch[k] for k in (*STRUCTURAL_FIELDS, "image_size", "num_classes", "layer_norm_eps")}
  if fields["num_classes"] is None:
    raise CheckpointError(f"checkpoint {path} has no classification head")
  if preset == "from_init":
    return dataclasses.replace(vit.ViTConfig(**fields), **overrides).validate()
  config = vit.get_config(preset, **overrides)
  wrong = [f"{k}: preset {getattr(config, k)}, checkpoint {fields[k]}" for k in (*STRUCTURAL_FIELDS, "num_classes")
           if getattr(config, k) != fields[k]]
  if wrong:
    raise CheckpointError(f"--model={preset} does not match the checkpoint {path} ({'; '.join(wrong)}); "
                          "use --model=from_init to adopt the checkpoint's architecture")
  return dataclasses.replace(config, layer_norm_eps=fields["layer_norm_eps"]).validate()
