"""Analytic FLOP counts per image, dense and ACM (multiply-add = 2 FLOPs).

Matmuls dominate; layer norms, softmax, activations and residual adds are
counted approximately (a few FLOPs per element) so that the dense total tracks
XLA's own cost analysis (checked in tests within 5%).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from acm_jax import acm as acm_lib
from acm_jax import transformer
from acm_jax.vit.model import ViTConfig

# elementwise work per element, roughly as XLA counts it
_LAYER_NORM = 7
_SOFTMAX = 4
_ACTIVATION = {"gelu": 64, "gelu_tanh": 16, "relu": 1, "identity": 0}  # exact GELU's erf is a long polynomial


def encoder_block_flops(tokens: int, dim: int, mlp_dim: int, num_heads: int,
                        activation: str = "gelu") -> dict[str, float]:
  """Dense FLOPs of one transformer block, split by part."""
  projection = 2 * tokens * dim * dim + tokens * dim
  return {
      "projections": 4 * projection,
      "attention": 4 * tokens * tokens * dim + _SOFTMAX * num_heads * tokens * tokens,
      "mlp": 4 * tokens * dim * mlp_dim + tokens * (mlp_dim + dim) + _ACTIVATION[activation] * tokens * mlp_dim,
      "other": 2 * _LAYER_NORM * tokens * dim + 2 * tokens * dim,
  }


def _acm_block_flops(tokens: int, dim: int, width: int, num_learners: int, mean_k: float,
                     activation: str, gate_depth: int, gate_hidden: int) -> float:
  learner = acm_lib.learner_flops(dim, width)
  act = _ACTIVATION[activation] * width
  gate = acm_lib.gate_flops(dim, num_learners + 1, gate_depth, gate_hidden)
  return tokens * (mean_k * (learner + act) + gate + dim)


def embedding_flops(config: ViTConfig) -> float:
  """Patch embedding, class token and position embedding, per image."""
  p, d = config.patch_size, config.dim
  return float(2 * config.num_patches * p * p * 3 * d + config.num_patches * d + config.num_tokens * d)


def head_flops(config: ViTConfig) -> float:
  """Final layer norm and linear classifier on one token."""
  return float(_LAYER_NORM * config.dim + 2 * config.dim * config.num_classes + config.num_classes)


def vit_flops(config: ViTConfig, mean_k: Mapping[str, float] | None = None) -> dict[str, float]:
  """FLOPs per image: {"total", "acm", "gate"} (acm includes gates).

  `mean_k` maps each ACM path (`config.acm_paths()`) to its mean chosen k; a
  missing path counts as k = N. A dense config ignores it.
  """
  t, d = config.num_tokens, config.dim
  total = embedding_flops(config) + head_flops(config)
  acm_total = gate_total = 0.0
  acm_cfg = config.acm
  acm_paths = set(config.acm_paths())
  mean_k = dict(mean_k or {})
  for b in range(config.depth):
    parts = encoder_block_flops(t, d, config.mlp_dim, config.num_heads, config.activation)
    total += parts["attention"] + parts["other"]
    for name, dense_part, width, activation in (
        ("mlp", parts["mlp"], None, config.activation),
        ("attn/projections", parts["projections"], None, "identity")):
      paths = ([f"block_{b}/mlp"] if name == "mlp"
               else [f"block_{b}/attn/{p}" for p in transformer.PROJECTIONS])
      if not acm_paths.intersection(paths):
        total += dense_part
        continue
      for path in paths:
        n = acm_cfg.num_learners
        w = (acm_cfg.mlp_learner_width(config.mlp_dim) if name == "mlp"
             else acm_cfg.attention_learner_width(d))
        cost = _acm_block_flops(t, d, w, n, mean_k.get(path, n), activation,
                                acm_cfg.gate_depth, acm_cfg.gate_hidden)
        gate = t * acm_lib.gate_flops(d, n + 1, acm_cfg.gate_depth, acm_cfg.gate_hidden)
        total += cost
        acm_total += cost
        gate_total += gate
  return {"total": float(total), "acm": float(acm_total), "gate": float(gate_total)}


def learner_costs(config: ViTConfig) -> list[float]:
  """FLOPs per token of one learner, for each ACM path in `config.acm_paths()` order."""
  costs = []
  for path in config.acm_paths():
    if path.endswith("/mlp"):
      costs.append(float(acm_lib.learner_flops(config.dim, config.acm.mlp_learner_width(config.mlp_dim))))
    else:
      costs.append(float(acm_lib.learner_flops(config.dim, config.acm.attention_learner_width(config.dim))))
  return costs


def gflops(flops: float) -> float:
  return flops / 1e9


def mean_compute_fraction(config: ViTConfig, mean_k: Mapping[str, float]) -> float:
  """Executed learner cost over all-learner cost, from per-ACM mean k."""
  costs = learner_costs(config)
  paths: Sequence[str] = config.acm_paths()
  n = config.acm.num_learners
  return sum(mean_k[p] * c for p, c in zip(paths, costs)) / sum(n * c for c in costs)


# --- baselines (acm_jax/vit/baselines); token counts may be arrays (per example) -------


def dense_block_flops(config: ViTConfig, tokens):
  """One dense block on `tokens` tokens (a number or an array of them)."""
  return sum(encoder_block_flops(tokens, config.dim, config.mlp_dim, config.num_heads, config.activation).values())


def moefication_flops(config: ViTConfig, num_experts: int, top_k: int, router_hidden: int) -> dict[str, float]:
  """Every MLP split into `num_experts` experts, `top_k` of them run per token,
  chosen by a 2-layer router (d -> router_hidden -> E) plus a top-k over E scores."""
  t, d = config.num_tokens, config.dim
  width = config.mlp_dim // num_experts
  parts = encoder_block_flops(t, d, config.mlp_dim, config.num_heads, config.activation)
  experts = t * (top_k * (4 * d * width + width + _ACTIVATION[config.activation] * width) + d)
  router = t * (acm_lib.gate_flops(d, num_experts, 2, router_hidden) + num_experts)
  block = parts["projections"] + parts["attention"] + parts["other"] + experts + router
  total = embedding_flops(config) + head_flops(config) + config.depth * block
  return {"total": float(total), "router": float(config.depth * router)}


def early_exit_flops(config: ViTConfig, exit_block, heads_run):
  """Per example: left after block `exit_block` (0-based; depth - 1 means it ran the
  whole model and its head) having evaluated `heads_run` exit heads (a layer norm,
  a linear classifier and a softmax confidence each)."""
  t, c = config.num_tokens, config.num_classes
  exit_head = head_flops(config) + _SOFTMAX * c
  final = (exit_block == config.depth - 1) * head_flops(config)
  return embedding_flops(config) + (exit_block + 1) * dense_block_flops(config, t) + heads_run * exit_head + final


_HALTING = 4  # per token and block: scale, shift, sigmoid


def token_halting_flops(config: ViTConfig, active_tokens, halting: bool = True):
  """Per example, from the number of tokens entering each block, (..., depth):
  halted tokens leave attention (as queries and keys) and the MLP; a running token
  pays its halting score and its share of the ponder-weighted output."""
  per_block = dense_block_flops(config, active_tokens)
  if halting:
    per_block = per_block + active_tokens * (_HALTING + 2 * config.dim)
  return embedding_flops(config) + head_flops(config) + per_block.sum(-1)
