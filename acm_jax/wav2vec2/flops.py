"""Analytic FLOPs of Wav2Vec2, dense or ACMized, per second of audio.

Same conventions as `acm_jax.flops` (multiply-add = 2 FLOPs, elementwise work
approximated); the encoder blocks and ACMs are counted by the same helpers.
"""

from __future__ import annotations

from typing import Mapping

from acm_jax import acm as acm_lib
from acm_jax import flops as flops_lib
from acm_jax.flops import LAYER_NORM
from acm_jax.wav2vec2.model import Wav2Vec2Config

_GELU = acm_lib.activation_flops("gelu")


def feature_encoder_flops(config: Wav2Vec2Config, num_samples: int) -> float:
  total, length, channels = 0.0, num_samples, 1
  for i, (dim, k, s) in enumerate(zip(config.conv_dim, config.conv_kernel, config.conv_stride)):
    length = (length - k) // s + 1
    total += 2 * length * k * channels * dim + config.conv_bias * length * dim + _GELU * length * dim
    if config.feat_extract_norm == "layer" or i == 0:
      total += LAYER_NORM * length * dim
    channels = dim
  return float(total)


def wav2vec2_flops(config: Wav2Vec2Config, mean_k: Mapping[str, float] | None = None,
                   seconds: float = 1.0) -> dict[str, float]:
  """FLOPs for `seconds` of audio: {"total", "acm", "gate"} (acm includes gates).

  `mean_k` maps each ACM path (`config.acm_paths()`) to its mean chosen k; a
  missing path counts as k = N.
  """
  samples = int(round(seconds * config.sample_rate))
  t, d = config.num_frames(samples), config.dim
  groups, kpos = config.num_conv_pos_embedding_groups, config.num_conv_pos_embeddings
  total = feature_encoder_flops(config, samples)
  total += LAYER_NORM * t * config.conv_dim[-1] + 2 * t * config.conv_dim[-1] * d + t * d  # projection
  total += 2 * t * kpos * d * d / groups + t * d + _GELU * t * d + t * d  # position conv, residual add
  total += LAYER_NORM * t * d + 2 * t * d * config.vocab_size + t * config.vocab_size  # encoder norm, head
  blocks = flops_lib.encoder_flops(config, t, mean_k)
  return {**blocks, "total": float(total + blocks["total"])}
