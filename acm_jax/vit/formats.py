"""Reading checkpoints of other ViT implementations and renaming them to ours.

Every reader returns a `Converted`: flat parameters under our names (see
`acm_jax.vit.model`), where each came from (for error messages), the source
names that have no counterpart in our ViT, and what the file says about the
architecture beyond shapes (heads, LayerNorm epsilon, activation).

Naming conventions handled:
  hf      transformers ViTModel / ViTForImageClassification (`vit.encoder.layer.{i}...`,
          and the `vit.layers.{i}.attention.q_proj` names of transformers 5 state dicts)
  timm    timm VisionTransformer (`blocks.{i}.attn.qkv` with q, k, v stacked in one matrix)
  augreg  vision_transformer / big_vision .npz (`Transformer/encoderblock_{i}/...`)
  ours    our own parameter names (orbax params dirs, our safetensors export)
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from acm_jax import transformer
from acm_jax.acmize import flatten, unflatten
from acm_jax.checkpoint_io import (CheckpointError, read_json, read_npz, read_orbax, read_safetensors,  # noqa: F401
                                  read_torch)

FORMATS = ("orbax", "acm_jax", "hf", "timm", "augreg")
SAFETENSORS_MARKER = "acm_jax"  # `format` entry of our safetensors metadata and config.json

# ViT sizes whose head count the shapes do not reveal (timm and bare HF files carry no config);
# all use 64-dimensional heads except ViT-H (80) and ViT-g (88).
HEADS_BY_DIM = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16}


@dataclasses.dataclass
class Converted:
  path: str
  format: str
  params: dict[str, np.ndarray]  # our flat '/'-joined names
  origin: dict[str, str]  # our name -> the source name it came from
  unmapped: list[str]  # source names with no counterpart in our ViT
  num_heads: int | None = None
  layer_norm_eps: float | None = None
  activation: str = "gelu"
  vit_config: dict | None = None  # our own exports carry the whole ViTConfig


# --- renaming ------------------------------------------------------------------------

# A rule maps a source name (full match) to {our name: array}; `kind` says how arrays change:
#   tensor: unchanged; flax: a kernel/scale/bias leaf already in our layout;
#   linear: torch (out, in) weight -> (in, out) kernel; norm: weight -> scale;
#   conv: torch (out, in, p, p) -> (p, p, in, out); qkv: timm's stacked (3 dim, dim) split in three;
#   heads_in / heads_out: flax (dim, heads, head_dim) / (heads, head_dim, dim) kernels merged to 2-D.
Rule = tuple[str, str, str]


def _convert(kind: str, suffix: str, target: str, array: np.ndarray) -> dict[str, np.ndarray]:
  if kind == "tensor":
    return {target: array}
  if kind == "flax":  # already our layout
    return {f"{target}/{suffix}": array}
  if kind in ("linear", "norm", "conv"):
    if suffix == "bias":
      return {f"{target}/bias": array}
    if kind == "norm":
      return {f"{target}/scale": array}
    return {f"{target}/kernel": array.T if kind == "linear" else array.transpose(2, 3, 1, 0)}
  if kind == "qkv":
    parts = np.split(array, 3, axis=0)
    return {f"{target}/{name}/dense/{'bias' if suffix == 'bias' else 'kernel'}":
            part if suffix == "bias" else part.T for name, part in zip(("query", "key", "value"), parts)}
  if kind == "heads_in":  # kernel (dim, heads, head_dim) or bias (heads, head_dim)
    return {f"{target}/{suffix}": array.reshape(array.shape[0], -1) if suffix == "kernel" else array.reshape(-1)}
  if kind == "heads_out":  # kernel (heads, head_dim, dim), bias (dim,)
    return {f"{target}/{suffix}": array.reshape(-1, array.shape[-1]) if suffix == "kernel" else array}
  raise AssertionError(kind)


def rename(raw: dict[str, np.ndarray], rules: list[Rule], ignored: tuple[str, ...] = ()
           ) -> tuple[dict[str, np.ndarray], dict[str, str], list[str]]:
  """Applies the first matching rule to every source name. A pattern of a module
  (kind linear/norm/conv/qkv) is followed by a `.weight`/`.bias` or `/kernel`,
  `/scale`, `/bias` suffix, captured as the last group."""
  compiled = [(re.compile(pattern), target, kind) for pattern, target, kind in rules]
  ignored_res = [re.compile(p) for p in ignored]
  params, origin, unmapped = {}, {}, []
  for name, array in raw.items():
    for regex, target, kind in compiled:
      m = regex.fullmatch(name)
      if m:
        suffix = m.group(m.re.groups) if kind != "tensor" else ""
        for ours, value in _convert(kind, suffix, m.expand(target), np.asarray(array)).items():
          if ours in params:
            raise CheckpointError(f"two source parameters map to {ours!r}: {origin[ours]!r} and {name!r}")
          params[ours], origin[ours] = value, name
        break
    else:
      if not any(r.fullmatch(name) for r in ignored_res):
        unmapped.append(name)
  return params, origin, sorted(unmapped)


_W = r"\.(weight|bias)"
HF_RULES: list[Rule] = [
    (r"(?:vit\.)?embeddings\.cls_token", "cls", "tensor"),
    (r"(?:vit\.)?embeddings\.position_embeddings", "pos_embedding", "tensor"),
    (r"(?:vit\.)?embeddings\.patch_embeddings\.projection" + _W, "embedding", "conv"),
    # names in checkpoint files
    (r"(?:vit\.)?encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)" + _W, r"block_\1/attn/\2/dense", "linear"),
    (r"(?:vit\.)?encoder\.layer\.(\d+)\.attention\.output\.dense" + _W, r"block_\1/attn/out/dense", "linear"),
    (r"(?:vit\.)?encoder\.layer\.(\d+)\.intermediate\.dense" + _W, r"block_\1/mlp/fc1", "linear"),
    (r"(?:vit\.)?encoder\.layer\.(\d+)\.output\.dense" + _W, r"block_\1/mlp/fc2", "linear"),
    (r"(?:vit\.)?encoder\.layer\.(\d+)\.layernorm_before" + _W, r"block_\1/ln1", "norm"),
    (r"(?:vit\.)?encoder\.layer\.(\d+)\.layernorm_after" + _W, r"block_\1/ln2", "norm"),
    # names of transformers 5 modules (a torch.save of model.state_dict())
    (r"(?:vit\.)?layers\.(\d+)\.attention\.q_proj" + _W, r"block_\1/attn/query/dense", "linear"),
    (r"(?:vit\.)?layers\.(\d+)\.attention\.k_proj" + _W, r"block_\1/attn/key/dense", "linear"),
    (r"(?:vit\.)?layers\.(\d+)\.attention\.v_proj" + _W, r"block_\1/attn/value/dense", "linear"),
    (r"(?:vit\.)?layers\.(\d+)\.attention\.o_proj" + _W, r"block_\1/attn/out/dense", "linear"),
    (r"(?:vit\.)?layers\.(\d+)\.mlp\.fc(1|2)" + _W, r"block_\1/mlp/fc\2", "linear"),
    (r"(?:vit\.)?layers\.(\d+)\.layernorm_before" + _W, r"block_\1/ln1", "norm"),
    (r"(?:vit\.)?layers\.(\d+)\.layernorm_after" + _W, r"block_\1/ln2", "norm"),
    (r"(?:vit\.)?layernorm" + _W, "norm", "norm"),
    (r"classifier" + _W, "head", "linear"),
]
# ViTModel's tanh pooler feeds nothing in image classification (the classifier reads the class token)
HF_IGNORED = (r"(?:vit\.)?pooler\.dense\.(weight|bias)",)

TIMM_RULES: list[Rule] = [
    (r"cls_token", "cls", "tensor"),
    (r"pos_embed", "pos_embedding", "tensor"),
    (r"patch_embed\.proj" + _W, "embedding", "conv"),
    (r"blocks\.(\d+)\.norm1" + _W, r"block_\1/ln1", "norm"),
    (r"blocks\.(\d+)\.attn\.qkv" + _W, r"block_\1/attn", "qkv"),
    (r"blocks\.(\d+)\.attn\.proj" + _W, r"block_\1/attn/out/dense", "linear"),
    (r"blocks\.(\d+)\.norm2" + _W, r"block_\1/ln2", "norm"),
    (r"blocks\.(\d+)\.mlp\.fc(1|2)" + _W, r"block_\1/mlp/fc\2", "linear"),
    (r"norm" + _W, "norm", "norm"),
    (r"head" + _W, "head", "linear"),
]

_F = r"/(kernel|scale|bias)"
_BLOCK = r"Transformer/encoderblock_(\d+)/"
# vision_transformer (AugReg) numbers a block's submodules LayerNorm_0, MultiHeadDotProductAttention_1,
# LayerNorm_2, MlpBlock_3; big_vision numbers them 0, 0, 1, 0
AUGREG_RULES: list[Rule] = [
    (r"embedding" + _F, "embedding", "flax"),
    (r"cls", "cls", "tensor"),
    (r"(?:Transformer/posembed_input/)?pos_embedding", "pos_embedding", "tensor"),
    (_BLOCK + r"LayerNorm_0" + _F, r"block_\1/ln1", "flax"),
    (_BLOCK + r"LayerNorm_[12]" + _F, r"block_\1/ln2", "flax"),
    (_BLOCK + r"MultiHeadDotProductAttention_[01]/(query|key|value)" + _F, r"block_\1/attn/\2/dense", "heads_in"),
    (_BLOCK + r"MultiHeadDotProductAttention_[01]/out" + _F, r"block_\1/attn/out/dense", "heads_out"),
    (_BLOCK + r"MlpBlock_[03]/Dense_0" + _F, r"block_\1/mlp/fc1", "flax"),
    (_BLOCK + r"MlpBlock_[03]/Dense_1" + _F, r"block_\1/mlp/fc2", "flax"),
    (r"Transformer/encoder_norm" + _F, "norm", "flax"),
    (r"head" + _F, "head", "flax"),
]


# --- detection -------------------------------------------------------------------------


def naming_of(names: list[str]) -> str | None:
  """Which naming convention a list of parameter names follows, if any."""
  names = set(names)
  if any(n.startswith(("vit.embeddings.", "embeddings.patch_embeddings.")) for n in names):
    return "hf"
  if "patch_embed.proj.weight" in names:
    return "timm"
  if any(re.match(r"(?:params/)?(?:img/)?Transformer/encoderblock_\d+/", n) for n in names):
    return "augreg"
  if "embedding/kernel" in names and any(n.startswith(("block_", "blocks/")) for n in names):
    return "ours"
  return None


def _is_orbax_dir(path: Path) -> bool:
  return (path / "_CHECKPOINT_METADATA").exists() or (path / "_METADATA").exists()


def locate(path: str | Path) -> tuple[Path, str]:
  """(the file or directory holding the weights, its container: orbax/safetensors/torch/npz)."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  if path.is_dir():
    if _is_orbax_dir(path):
      return path, "orbax"
    if _is_orbax_dir(path / "params"):  # a run directory of our trainer
      return path / "params", "orbax"
    for name, container in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "torch")):
      if (path / name).exists():
        return path / name, container
    raise CheckpointError(f"unknown checkpoint format: directory {path} holds no orbax checkpoint, "
                          f"model.safetensors or pytorch_model.bin (found {sorted(p.name for p in path.iterdir())[:10]})")
  suffix = path.suffix.lower()
  containers = {".safetensors": "safetensors", ".npz": "npz", ".pth": "torch", ".pt": "torch", ".bin": "torch"}
  if suffix not in containers:
    raise CheckpointError(f"unknown checkpoint format: {path} (expected a directory, .safetensors, .npz, "
                          ".pth, .pt or .bin)")
  return path, containers[suffix]


def _config_next_to(weights: Path) -> dict | None:
  config = weights.parent / "config.json"
  return read_json(config) if config.exists() else None


def read(path: str | Path) -> Converted:
  """Any supported checkpoint -> our flat names (shapes are not checked here)."""
  weights, container = locate(path)
  metadata: dict[str, str] = {}
  if container == "orbax":
    raw = read_orbax(weights)
  elif container == "safetensors":
    raw, metadata = read_safetensors(weights)
  elif container == "npz":
    raw = {re.sub(r"^(?:params/)?(?:img/)?", "", k): v for k, v in read_npz(weights).items()}
  else:
    raw = read_torch(weights)
  naming = "ours" if metadata.get("format") == SAFETENSORS_MARKER else naming_of(list(raw))
  if naming is None:
    raise CheckpointError(f"unknown checkpoint format: the parameter names of {weights} follow none of "
                          f"transformers ViT, timm ViT, AugReg/big_vision or acm_jax (first names: {sorted(raw)[:6]})")
  config = _config_next_to(weights) if container != "orbax" else None
  if naming == "ours":
    return _ours(weights, container, raw, config)
  if naming == "hf":
    params, origin, unmapped = rename(raw, HF_RULES, HF_IGNORED)
    config = config or {}
    activation = config.get("hidden_act", "gelu")
    return Converted(str(weights), "hf", params, origin, unmapped, config.get("num_attention_heads"),
                     config.get("layer_norm_eps", 1e-12), "gelu" if activation == "gelu" else activation)
  if naming == "timm":
    params, origin, unmapped = rename(raw, TIMM_RULES)
    # timm's hub config.json names the architecture; explicit model_args may give the heads
    heads = ((config or {}).get("model_args") or {}).get("num_heads")
    return Converted(str(weights), "timm", params, origin, unmapped, heads, 1e-6)
  params, origin, unmapped = rename(raw, AUGREG_RULES)
  query = params.get("block_0/attn/query/dense/kernel")
  heads = raw[origin["block_0/attn/query/dense/kernel"]].shape[1] if query is not None else None
  return Converted(str(weights), "augreg", params, origin, unmapped, heads, 1e-6)


def _ours(weights: Path, container: str, raw: dict, config: dict | None) -> Converted:
  if any(k.startswith(transformer.STACKED + "/") for k in raw):  # a scanned model's: to the unrolled names
    raw = {k: np.asarray(v) for k, v in flatten(transformer.unstack_blocks(unflatten(raw))).items()}
  origin = {k: k for k in raw}
  if container == "orbax":
    # a run directory's config.json names the preset the params were trained with
    run_config = weights.parent / "config.json"
    preset = read_json(run_config).get("model") if run_config.exists() else None
    from acm_jax.vit import model as vit
    base = vit.PRESETS.get(preset)
    return Converted(str(weights), "orbax", raw, origin, [], base.num_heads if base else None,
                     base.layer_norm_eps if base else None)
  vit_config = (config or {}).get("vit_config")
  if vit_config is None:
    raise CheckpointError(f"{weights} has acm_jax names but no config.json with a 'vit_config' beside it")
  return Converted(str(weights), "acm_jax", raw, origin, [], vit_config["num_heads"],
                   vit_config["layer_norm_eps"], vit_config["activation"], vit_config)
