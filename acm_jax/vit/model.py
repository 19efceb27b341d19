"""Pre-LN Vision Transformer with a class token, dense or ACMized.

Parameter names (used by `acmize`, the checkpoint loaders and sharding rules):
  embedding/{kernel,bias}      patch embedding, a (p, p, 3, dim) convolution's (`PatchEmbed`)
  cls, pos_embedding           (1, 1, dim), (1, 1 + num_patches, dim)
  block_{i}/ln1, attn/{query,key,value,out}, ln2, mlp/{fc1,fc2} or mlp/{w1,b1,w2,b2,gate}
  norm, head
With scan_blocks=True the blocks are one scanned module: blocks/... with a leading
layer axis on every leaf (see `transformer.stack_blocks`).
"""

from __future__ import annotations

import dataclasses

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from acm_jax import acm as acm_lib
from acm_jax import transformer


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  image_size: int = 224
  patch_size: int = 16
  dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  num_classes: int = 1000
  layer_norm_eps: float = 1e-6
  activation: str = "gelu"
  acm: acm_lib.ACMConfig | None = None
  # what each encoder block stores for the backward pass: one of transformer.REMAT_POLICIES
  # ("none", "full", "dots", "dots_no_batch"); True / False mean "full" / "none"
  remat: bool | str = False
  scan_blocks: bool = False  # one scanned block with stacked parameters (every block must be alike)
  scan_unroll: int = 1  # scanned blocks: layers per loop iteration (nn.scan's unroll; 1 to depth)
  attention: str = "auto"  # "xla", "cudnn" (fused, GPU, bf16/f16) or "auto" (cudnn where it applies)

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_tokens(self) -> int:
    return self.num_patches + 1

  def validate(self) -> "ViTConfig":
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
    transformer.check_encoder(self)
    transformer.check_attention_impl(self.attention)
    return self

  def acm_paths(self) -> list[str]:
    return transformer.replaceable_paths(self.depth, self.acm)

  def dense(self) -> "ViTConfig":
    return dataclasses.replace(self, acm=None)


PRESETS: dict[str, ViTConfig] = {
    # the embedded default: 32x32 images, 4x4 patches, 65 tokens
    "tiny": ViTConfig(image_size=32, patch_size=4, dim=64, depth=4, num_heads=4, mlp_dim=256, num_classes=10),
    "vit_s16": ViTConfig(dim=384, depth=12, num_heads=6, mlp_dim=1536),
    "vit_b16": ViTConfig(dim=768, depth=12, num_heads=12, mlp_dim=3072),
    "vit_l16": ViTConfig(dim=1024, depth=24, num_heads=16, mlp_dim=4096),
}


def get_config(preset: str, **overrides) -> ViTConfig:
  if preset not in PRESETS:
    raise ValueError(f"unknown model preset {preset!r}; expected one of {sorted(PRESETS)}")
  return dataclasses.replace(PRESETS[preset], **overrides).validate()


def block_fields(cfg: ViTConfig) -> dict:
  """`transformer.EncoderBlock`'s fields (other than `acm`) for the ViT's blocks."""
  return dict(num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim, activation=cfg.activation,
              layer_norm_eps=cfg.layer_norm_eps, pre_norm=True, attention=cfg.attention)


def embed(module: nn.Module, cfg: ViTConfig, images: jax.Array) -> jax.Array:
  """images (batch, H, W, 3) -> tokens (batch, 1 + patches, dim), class token first.

  Runs inside a compact call of `module`, whose scope holds `embedding`, `cls` and
  `pos_embedding` (the ViT's own, or `Embedding`'s when the pieces run alone).
  """
  if images.ndim != 4 or images.shape[0] == 0:
    raise ValueError(f"expected a batch of at least one image, (batch >= 1, {cfg.image_size}, {cfg.image_size}, 3), "
                     f"got shape {images.shape}")
  if images.shape[1:3] != (cfg.image_size, cfg.image_size):
    raise ValueError(f"expected images of {cfg.image_size}x{cfg.image_size}, got shape {images.shape}")
  x = PatchEmbed(cfg.dim, cfg.patch_size, name="embedding")(images)
  cls = module.param("cls", nn.initializers.zeros, (1, 1, cfg.dim)).astype(x.dtype)
  x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, cfg.dim)), x], axis=1)
  pos = module.param("pos_embedding", nn.initializers.normal(0.02), (1, cfg.num_tokens, cfg.dim))
  return x + pos.astype(x.dtype)


def classify(cfg: ViTConfig, token: jax.Array) -> jax.Array:
  """The class token (batch, dim) -> logits (batch, num_classes), inside a compact call whose
  scope holds `norm` and `head` (as `embed`)."""
  token = nn.LayerNorm(cfg.layer_norm_eps, name="norm", dtype=token.dtype)(token)
  return nn.Dense(cfg.num_classes, name="head", dtype=token.dtype)(token)


PATCH_EMBED_MODES = ("conv", "matmul")
# how `PatchEmbed` computes, read when a forward is traced (jit a new function to change it: jax caches a trace by
# the Python function): "conv" runs XLA's stride-p convolution; "matmul" cuts the images into patches (a reshape and
# transpose behind an optimisation barrier, so they become one array) and multiplies them by the kernel as one
# (p*p*3, dim) matrix. Same parameters; the values differ by the accumulation order. The profile of the dense
# ViT-B/16 on an H100 (jax 0.11.2, bf16) shows cuDNN running the 3-channel convolution in its generic float engine,
# 0.050 ms at batch 1 and 0.116 ms at batch 8 (6.6% and 8% of the forward's device time). Timed in one process
# (`benchmarks.embed_ab`, H100, 2026-12-06), "matmul" took 1.036 / 0.990 / 0.969 / 0.950 of "conv"'s time for the
# dense model at batches 1 / 8 / 32 / 256 and did not raise the ACM model's ratio to dense at any batch beyond the
# rounds' spread, so "conv" stays the default.
PATCH_EMBED = "conv"


class PatchEmbed(nn.Module):
  """Non-overlapping p x p patches of (batch, H, W, C) images -> (batch, patches, features): a stride-p
  convolution with a (p, p, C, features) kernel and a bias, the parameters and initialisers of `nn.Conv`'s,
  computed as `PATCH_EMBED` says."""
  features: int
  patch_size: int

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    p, channels = self.patch_size, images.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, channels, self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    dtype = images.dtype
    if PATCH_EMBED not in PATCH_EMBED_MODES:
      raise ValueError(f"vit.model.PATCH_EMBED must be one of {PATCH_EMBED_MODES}, got {PATCH_EMBED!r}")
    if PATCH_EMBED == "conv":
      y = jax.lax.conv_general_dilated(images, kernel.astype(dtype), (p, p), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      y = y.reshape(y.shape[0], -1, self.features)
    else:
      # (kh, kw, c) order on both sides: a patch's pixels row by row, each pixel's channels last, as HWIO flattens
      patches = einops.rearrange(images, "b (h p) (w q) c -> b (h w) (p q c)", p=p, q=p)
      # the barrier keeps the patches one array and the product a plain matmul (the form timed; whether XLA would
      # fold transpose and dot back into its convolution without it was not checked)
      patches = jax.lax.optimization_barrier(patches)
      y = jnp.dot(patches, kernel.reshape(p * p * channels, self.features).astype(dtype))
    return y + bias.astype(dtype)


class Embedding(nn.Module):
  """`embed` on its own, over the ViT's top-level params (for forwards built block by block)."""
  config: ViTConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    return embed(self, self.config, images)


class Head(nn.Module):
  """`classify` on its own, over params {"norm", "head"}."""
  config: ViTConfig

  @nn.compact
  def __call__(self, token: jax.Array) -> jax.Array:
    return classify(self.config, token)


class ViT(nn.Module):
  """images (batch, H, W, 3) -> logits (batch, num_classes).

  `mode`, `fixed_k`, `temperature` and `cost_shift` go to every ACM (see `acm.ACM`).
  """
  config: ViTConfig

  @nn.compact
  def __call__(self, images: jax.Array, *, mode: str = "argmax", fixed_k: int | None = None,
               temperature: float = 1.0, cost_shift: float | jax.Array = 0.0) -> jax.Array:
    cfg = self.config
    x = embed(self, cfg, images)
    x = transformer.encoder_blocks(self, x, None, depth=cfg.depth, block=block_fields(cfg), acm=cfg.acm,
                                   scan=cfg.scan_blocks, unroll=cfg.scan_unroll, remat=cfg.remat, mode=mode,
                                   fixed_k=fixed_k, temperature=temperature, cost_shift=cost_shift)
    return classify(cfg, x[:, 0])
