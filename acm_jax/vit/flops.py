"""FLOPs of the ViT per image, and of the ViT baselines (MoEfication, early exits,
token halting); the encoder blocks are counted by `acm_jax.flops`."""

from __future__ import annotations

from typing import Mapping

from acm_jax import acm as acm_lib
from acm_jax import flops as flops_lib
from acm_jax.flops import LAYER_NORM, SOFTMAX
from acm_jax.vit.model import ViTConfig


def embedding_flops(config: ViTConfig) -> float:
  """Patch embedding, class token and position embedding, per image."""
  p, d = config.patch_size, config.dim
  return float(2 * config.num_patches * p * p * 3 * d + config.num_patches * d + config.num_tokens * d)


def head_flops(config: ViTConfig) -> float:
  """Final layer norm and linear classifier on one token."""
  return float(LAYER_NORM * config.dim + 2 * config.dim * config.num_classes + config.num_classes)


def vit_flops(config: ViTConfig, mean_k: Mapping[str, float] | None = None) -> dict[str, float]:
  """FLOPs per image: {"total", "acm", "gate"} (acm includes gates).

  `mean_k` maps each ACM path (`config.acm_paths()`) to its mean chosen k; a
  missing path counts as k = N. A dense config ignores it.
  """
  blocks = flops_lib.encoder_flops(config, config.num_tokens, mean_k)
  return {**blocks, "total": embedding_flops(config) + head_flops(config) + blocks["total"]}


# --- baselines (acm_jax/vit/baselines); token counts may be arrays (per example) -------


def dense_block_flops(config: ViTConfig, tokens):
  """One dense block on `tokens` tokens (a number or an array of them)."""
  parts = flops_lib.encoder_block_flops(tokens, config.dim, config.mlp_dim, config.num_heads, config.activation)
  return sum(parts.values())


def moefication_flops(config: ViTConfig, num_experts: int, top_k: int, router_hidden: int) -> dict[str, float]:
  """Every MLP split into `num_experts` experts, `top_k` of them run per token,
  chosen by a 2-layer router (d -> router_hidden -> E) plus a top-k over E scores."""
  t, d = config.num_tokens, config.dim
  width = config.mlp_dim // num_experts
  parts = flops_lib.encoder_block_flops(t, d, config.mlp_dim, config.num_heads, config.activation)
  experts = t * (top_k * (4 * d * width + width + acm_lib.activation_flops(config.activation) * width) + d)
  router = t * (acm_lib.gate_flops(d, num_experts, 2, router_hidden) + num_experts)
  block = parts["projections"] + parts["attention"] + parts["other"] + experts + router
  total = embedding_flops(config) + head_flops(config) + config.depth * block
  return {"total": float(total), "router": float(config.depth * router)}


def early_exit_flops(config: ViTConfig, exit_block, heads_run):
  """Per example: left after block `exit_block` (0-based; depth - 1 means it ran the
  whole model and its head) having evaluated `heads_run` exit heads (a layer norm,
  a linear classifier and a softmax confidence each)."""
  t, c = config.num_tokens, config.num_classes
  exit_head = head_flops(config) + SOFTMAX * c
  final = (exit_block == config.depth - 1) * head_flops(config)
  return embedding_flops(config) + (exit_block + 1) * dense_block_flops(config, t) + heads_run * exit_head + final


_HALTING = 4  # per token and block: scale, shift, sigmoid


def halting_overhead_flops(config: ViTConfig, active_tokens):
  """Per block, from the tokens entering it: each running token's halting score and its
  share of the ponder-weighted output."""
  return active_tokens * (_HALTING + 2 * config.dim)


def token_halting_flops(config: ViTConfig, active_tokens, halting: bool = True):
  """Per example, from the number of tokens entering each block, (..., depth):
  halted tokens leave attention (as queries and keys) and the MLP; a running token
  pays its halting score and its share of the ponder-weighted output."""
  per_block = dense_block_flops(config, active_tokens)
  if halting:
    per_block = per_block + halting_overhead_flops(config, active_tokens)
  return embedding_flops(config) + head_flops(config) + per_block.sum(-1)
