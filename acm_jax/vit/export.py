"""Our own interchange format: `model.safetensors` (parameters under our '/'-joined
names) and `config.json` (the full ViTConfig, ACM settings included), for dense
and ACMized models alike."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from acm_jax import acm as acm_lib
from acm_jax.acmize import flatten, unflatten
from acm_jax.vit import formats
from acm_jax.vit import model as vit
from acm_jax.pytree import PyTree


def config_to_dict(config: vit.ViTConfig) -> dict:
  return dataclasses.asdict(config)


def config_from_dict(data: dict) -> vit.ViTConfig:
  data = dict(data)
  acm = data.pop("acm", None)
  if acm is not None:
    blocks = acm.get("blocks")
    acm = acm_lib.ACMConfig(**{**acm, "blocks": tuple(blocks) if blocks is not None else None})
  return vit.ViTConfig(**data, acm=acm).validate()


def expected_shapes(config: vit.ViTConfig) -> dict[str, jax.ShapeDtypeStruct]:
  """The parameter shapes of `ViT(config)`, without computing anything."""
  images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: acm_lib.init_without_kernels(vit.ViT(config), jax.random.key(0), x)["params"],
                          images)
  return flatten(shapes)


def check_against_config(flat: dict[str, Any], config: vit.ViTConfig, source: str) -> None:
  expected = expected_shapes(config)
  missing, unexpected = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
  if missing or unexpected:
    raise formats.CheckpointError(f"{source}: parameters do not match its ViTConfig: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
  for key, struct in expected.items():
    if tuple(np.shape(flat[key])) != struct.shape:
      raise formats.CheckpointError(f"{source}: parameter {key!r} has shape {tuple(np.shape(flat[key]))}, "
                                    f"its ViTConfig expects {struct.shape}")


def export_safetensors(params: PyTree, config: vit.ViTConfig, path: str | Path) -> Path:
  """Writes `<path>/model.safetensors` and `<path>/config.json`; returns the directory."""
  from safetensors.numpy import save_file
  path = Path(path)
  flat = {k: np.asarray(jax.device_get(v)) for k, v in flatten(params).items()}
  check_against_config(flat, config, "export_safetensors")
  path.mkdir(parents=True, exist_ok=True)
  save_file(flat, str(path / "model.safetensors"), metadata={"format": formats.SAFETENSORS_MARKER})
  payload = {"format": formats.SAFETENSORS_MARKER, "model": "vit", "vit_config": config_to_dict(config)}
  (path / "config.json").write_text(json.dumps(payload, indent=2, sort_keys=True))
  return path


def load_safetensors(path: str | Path) -> tuple[PyTree, vit.ViTConfig]:
  """(params, config) from a directory written by `export_safetensors` (or its model.safetensors)."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  weights = path / "model.safetensors" if path.is_dir() else path
  config_path = weights.parent / "config.json"
  if not weights.exists() or not config_path.exists():
    raise FileNotFoundError(f"{path}: expected model.safetensors and config.json (as written by export_safetensors)")
  meta = formats.read_json(config_path)
  if meta.get("format") != formats.SAFETENSORS_MARKER or "vit_config" not in meta:
    raise formats.CheckpointError(f"{config_path} is not an acm_jax export (no format={formats.SAFETENSORS_MARKER!r} "
                                  "and vit_config); use load_dense for other checkpoints")
  config = config_from_dict(meta["vit_config"])
  flat, _ = formats.read_safetensors(weights)
  check_against_config(flat, config, str(weights))
  return unflatten(flat), config
