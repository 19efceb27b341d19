"""Analytic FLOP counts of transformer encoder blocks, dense and ACM (multiply-add = 2 FLOPs).

Matmuls dominate; layer norms, softmax, activations and residual adds are
counted approximately (a few FLOPs per element) so that the dense total tracks
XLA's own cost analysis (checked in tests within 5%). The model families add
their own embeddings and heads (`acm_jax.vit.flops`, `acm_jax.wav2vec2.flops`).
"""

from __future__ import annotations

from typing import Mapping

from acm_jax import acm as acm_lib
from acm_jax import transformer

# elementwise work per element, roughly as XLA counts it
LAYER_NORM = 7
SOFTMAX = 4


def encoder_block_flops(tokens: int, dim: int, mlp_dim: int, num_heads: int,
                        activation: str = "gelu") -> dict[str, float]:
  """Dense FLOPs of one transformer block, split by part."""
  projection = 2 * tokens * dim * dim + tokens * dim
  return {
      "projections": 4 * projection,
      "attention": 4 * tokens * tokens * dim + SOFTMAX * num_heads * tokens * tokens,
      "mlp": (4 * tokens * dim * mlp_dim + tokens * (mlp_dim + dim)
              + acm_lib.activation_flops(activation) * tokens * mlp_dim),
      "other": 2 * LAYER_NORM * tokens * dim + 2 * tokens * dim,
  }


def acm_block_flops(tokens: int, dim: int, width: int, num_learners: int, mean_k: float,
                    activation: str, gate_depth: int, gate_hidden: int) -> float:
  """One ACM on `tokens` tokens running `mean_k` learners on average, gate included."""
  learner = acm_lib.learner_flops(dim, width)
  act = acm_lib.activation_flops(activation) * width
  gate = acm_lib.gate_flops(dim, num_learners + 1, gate_depth, gate_hidden)
  return tokens * (mean_k * (learner + act) + gate + dim)


def encoder_flops(config, tokens: int, mean_k: Mapping[str, float] | None = None) -> dict[str, float]:
  """The encoder blocks of a ViT or Wav2Vec2 config on `tokens` tokens: {"total", "acm", "gate"}.

  `config` has depth, dim, mlp_dim, num_heads, activation, acm and acm_paths();
  `mean_k` maps each ACM path to its mean chosen k, a missing path counts as k = N.
  """
  t, d = tokens, config.dim
  total = acm_total = gate_total = 0.0
  acm = config.acm
  acm_paths = set(config.acm_paths())
  mean_k = dict(mean_k or {})
  for b in range(config.depth):
    parts = encoder_block_flops(t, d, config.mlp_dim, config.num_heads, config.activation)
    total += parts["attention"] + parts["other"]
    for name, paths in (("mlp", [f"block_{b}/mlp"]),
                        ("projections", [f"block_{b}/attn/{p}" for p in transformer.PROJECTIONS])):
      if not acm_paths.intersection(paths):
        total += parts[name]
        continue
      width = acm.mlp_learner_width(config.mlp_dim) if name == "mlp" else acm.attention_learner_width(d)
      activation = config.activation if name == "mlp" else "identity"
      n = acm.num_learners
      for path in paths:
        cost = acm_block_flops(t, d, width, n, mean_k.get(path, n), activation, acm.gate_depth, acm.gate_hidden)
        total += cost
        acm_total += cost
        gate_total += t * acm_lib.gate_flops(d, n + 1, acm.gate_depth, acm.gate_hidden)
  return {"total": float(total), "acm": float(acm_total), "gate": float(gate_total)}


def learner_costs(config) -> list[float]:
  """FLOPs per token of one learner, for each ACM path in `config.acm_paths()` order
  (a ViT or Wav2Vec2 config: dim, mlp_dim, acm, acm_paths())."""
  costs = []
  for path in config.acm_paths():
    if path.endswith("/mlp"):
      costs.append(float(acm_lib.learner_flops(config.dim, config.acm.mlp_learner_width(config.mlp_dim))))
    else:
      costs.append(float(acm_lib.learner_flops(config.dim, config.acm.attention_learner_width(config.dim))))
  return costs


def gflops(flops: float) -> float:
  return flops / 1e9
