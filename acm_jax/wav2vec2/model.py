"""Wav2Vec2 for CTC speech recognition, dense or ACMized.

audio (batch, samples) at 16 kHz -> a stack of 1-D convolutions (the feature
encoder, 20 ms frames) -> feature projection -> convolutional position
embedding -> transformer encoder -> per-frame character logits (CTC head).

Two normalisation layouts, as in the published checkpoints (the two switches
are independent fields, as in the Hugging Face config):
  "base": feat_extract_norm="group", one group norm (a group per channel) after
      the first convolution; stable_layer_norm=False, the encoder applies LN
      after the position embedding, then post-LN blocks.
  XLS-R: feat_extract_norm="layer", a layer norm after every convolution;
      stable_layer_norm=True, pre-LN blocks, then a final LN.

Parameter names (used by `acmize`, the Hugging Face import and sharding rules):
  conv_{i}/{kernel,bias}, conv_norm_{i}/{scale,bias}    feature encoder
  projection_norm, projection                           feature projection
  pos_conv/conv/{kernel,bias}                           grouped conv, weight norm folded in
  encoder_norm                                          see the layouts above
  block_{i}/ln1, attn/{query,key,value,out}, ln2, mlp/{fc1,fc2} or mlp/{w1,b1,w2,b2,gate}
  head                                                  CTC head, vocab_size outputs (blank = 0)
With scan_blocks=True the blocks are one scanned module: blocks/... with a leading
layer axis on every leaf (see `transformer.stack_blocks`).

Padded batches: `lengths` (batch,) gives each utterance's number of samples;
padded frames are zeroed before the encoder and masked out of attention. The
group norm of the post-LN layout normalises over the whole (padded) utterance,
as the original does; the pre-LN layout is exact under padding.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from acm_jax import acm as acm_lib
from acm_jax import transformer

NORMS = ("group", "layer")


@dataclasses.dataclass(frozen=True)
class Wav2Vec2Config:
  conv_dim: tuple[int, ...] = (512,) * 7
  conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
  conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
  conv_bias: bool = False
  feat_extract_norm: str = "group"  # "group" or "layer", see the module doc
  stable_layer_norm: bool = False  # pre-LN encoder blocks and a final LN
  dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  num_conv_pos_embeddings: int = 128
  num_conv_pos_embedding_groups: int = 16
  vocab_size: int = 32
  layer_norm_eps: float = 1e-5
  conv_norm_eps: float = 1e-5
  activation: str = "gelu"
  sample_rate: int = 16000
  acm: acm_lib.ACMConfig | None = None
  remat: bool | str = False  # one of transformer.REMAT_POLICIES, see ViTConfig
  scan_blocks: bool = False  # one scanned block with stacked parameters (every block must be alike)
  scan_unroll: int = 1  # scanned blocks: layers per loop iteration (nn.scan's unroll; 1 to depth)

  @property
  def receptive_field(self) -> int:
    """Samples seen by one frame: the shortest audio that yields a frame."""
    field, jump = 1, 1
    for k, s in zip(self.conv_kernel, self.conv_stride):
      field += (k - 1) * jump
      jump *= s
    return field

  @property
  def frame_stride(self) -> int:
    return int(np.prod(self.conv_stride))

  def num_frames(self, num_samples):
    """Frames out of the feature encoder for `num_samples` (int or int array)."""
    length = np.asarray(num_samples, np.int64)
    for k, s in zip(self.conv_kernel, self.conv_stride):
      length = np.maximum((length - k) // s + 1, 0)
    return int(length) if length.ndim == 0 else length

  def validate(self) -> "Wav2Vec2Config":
    if not len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride):
      raise ValueError(f"conv_dim, conv_kernel and conv_stride must have one entry per layer, got "
                       f"{len(self.conv_dim)}, {len(self.conv_kernel)}, {len(self.conv_stride)}")
    if self.feat_extract_norm not in NORMS:
      raise ValueError(f"feat_extract_norm must be one of {NORMS}, got {self.feat_extract_norm!r}")
    if self.dim % self.num_conv_pos_embedding_groups:
      raise ValueError(f"dim {self.dim} is not divisible by num_conv_pos_embedding_groups "
                       f"{self.num_conv_pos_embedding_groups}")
    if self.vocab_size < 2:
      raise ValueError(f"vocab_size must be >= 2 (blank and one symbol), got {self.vocab_size}")
    transformer.check_encoder(self)
    return self

  def acm_paths(self) -> list[str]:
    return transformer.replaceable_paths(self.depth, self.acm)

  def dense(self) -> "Wav2Vec2Config":
    return dataclasses.replace(self, acm=None)


PRESETS: dict[str, Wav2Vec2Config] = {
    # the embedded default: 20 ms frames as in the full models, narrow early convolutions, a small encoder
    "tiny": Wav2Vec2Config(conv_dim=(32,) * 4 + (64,) * 3, conv_bias=True, feat_extract_norm="layer", stable_layer_norm=True,
                           dim=128, depth=4, num_heads=4, mlp_dim=512, num_conv_pos_embeddings=32,
                           num_conv_pos_embedding_groups=8),
    "base": Wav2Vec2Config(),
    "xls_r_300m": Wav2Vec2Config(conv_bias=True, feat_extract_norm="layer", stable_layer_norm=True, dim=1024,
                                 depth=24, num_heads=16, mlp_dim=4096),
}


def get_config(preset: str, **overrides) -> Wav2Vec2Config:
  if preset not in PRESETS:
    raise ValueError(f"unknown model preset {preset!r}; expected one of {sorted(PRESETS)}")
  return dataclasses.replace(PRESETS[preset], **overrides).validate()


class FeatureEncoder(nn.Module):
  """audio (batch, samples) -> features (batch, frames, conv_dim[-1])."""
  config: Wav2Vec2Config

  @nn.compact
  def __call__(self, audio: jax.Array) -> jax.Array:
    cfg = self.config
    gelu = acm_lib.get_activation("gelu")
    x = audio[..., None]
    for i, (dim, kernel, stride) in enumerate(zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride)):
      x = nn.Conv(dim, (kernel,), strides=(stride,), padding="VALID", use_bias=cfg.conv_bias,
                  name=f"conv_{i}", dtype=x.dtype)(x)
      if cfg.feat_extract_norm == "layer":
        x = nn.LayerNorm(cfg.conv_norm_eps, name=f"conv_norm_{i}", dtype=x.dtype)(x)
      elif i == 0:  # one group per channel: each channel normalised over time
        x = nn.GroupNorm(num_groups=dim, epsilon=cfg.conv_norm_eps, name="conv_norm_0", dtype=x.dtype)(x)
      x = gelu(x)
    return x


class Wav2Vec2(nn.Module):
  """audio (batch, samples) [, lengths (batch,)] -> CTC logits (batch, frames, vocab_size).

  `audio` may also be an (audio, lengths) pair, the single input the shared train steps pass.
  `mode`, `fixed_k`, `temperature` and `cost_shift` go to every ACM (see `acm.ACM`).
  """
  config: Wav2Vec2Config

  @nn.compact
  def __call__(self, audio: jax.Array | tuple[jax.Array, jax.Array], lengths: jax.Array | None = None, *, mode: str = "argmax",
               fixed_k: int | None = None, temperature: float = 1.0,
               cost_shift: float | jax.Array = 0.0) -> jax.Array:
    cfg = self.config
    if isinstance(audio, (tuple, list)):
      audio, lengths = audio
    if audio.ndim != 2:
      raise ValueError(f"expected audio of shape (batch, samples), got {audio.shape}")
    if audio.shape[1] < cfg.receptive_field:
      raise ValueError(f"audio of {audio.shape[1]} samples is shorter than the feature encoder's receptive "
                       f"field of {cfg.receptive_field} samples ({1000 * cfg.receptive_field / cfg.sample_rate:.0f} ms)")
    x = FeatureEncoder(cfg, name="feature_encoder")(audio)
    x = nn.LayerNorm(cfg.layer_norm_eps, name="projection_norm", dtype=x.dtype)(x)
    x = nn.Dense(cfg.dim, name="projection", dtype=x.dtype)(x)
    mask = None
    if lengths is not None:
      frames = frame_lengths(cfg, lengths)
      valid = jnp.arange(x.shape[1])[None, :] < frames[:, None]
      x = x * valid[..., None].astype(x.dtype)
      mask = valid[:, None, None, :]  # (batch, heads, queries, keys)
    x = x + PositionalConv(cfg, name="pos_conv")(x)
    encoder_norm = nn.LayerNorm(cfg.layer_norm_eps, name="encoder_norm", dtype=x.dtype)
    if not cfg.stable_layer_norm:
      x = encoder_norm(x)
    block = dict(num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim, activation=cfg.activation,
                 layer_norm_eps=cfg.layer_norm_eps, pre_norm=cfg.stable_layer_norm)
    x = transformer.encoder_blocks(self, x, mask, depth=cfg.depth, block=block, acm=cfg.acm, scan=cfg.scan_blocks,
                                   unroll=cfg.scan_unroll, remat=cfg.remat, mode=mode, fixed_k=fixed_k,
                                   temperature=temperature, cost_shift=cost_shift)
    if cfg.stable_layer_norm:
      x = encoder_norm(x)
    return nn.Dense(cfg.vocab_size, name="head", dtype=x.dtype)(x)


class PositionalConv(nn.Module):
  """Grouped 1-D convolution over time, "same" length (an even kernel drops its last frame), GELU."""
  config: Wav2Vec2Config

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    k = cfg.num_conv_pos_embeddings
    y = nn.Conv(cfg.dim, (k,), padding=[(k // 2, k // 2)], feature_group_count=cfg.num_conv_pos_embedding_groups,
                name="conv", dtype=x.dtype)(x)
    if k % 2 == 0:
      y = y[:, :-1]
    return acm_lib.get_activation("gelu")(y)


def frame_lengths(config: Wav2Vec2Config, lengths: jax.Array) -> jax.Array:
  """Valid frames per utterance from valid samples, (batch,) int32 (traceable)."""
  length = lengths.astype(jnp.int32)
  for k, s in zip(config.conv_kernel, config.conv_stride):
    length = jnp.maximum((length - k) // s + 1, 0)
  return length

