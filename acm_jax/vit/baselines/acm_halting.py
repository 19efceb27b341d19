"""ACM and token halting composed: a finetuned ACM whose tokens also stop at their own depth.

Token halting (`token_halting`) saves a halted token's attention, projections and MLP; the
ACM thins the MLP of every token that still runs. Here the halting rule of `token_halting`
runs on the blocks of a finetuned ACM ViT (MLP-only ACMs): a running token takes the width
its gate picks (argmax), a halted one leaves attention and skips the rest. Recipe: the ACM
finetuned at one budget (--halting_acm_budget), then the whole model but its gates finetuned
with the task loss and the halting losses (the gates keep the choices the ACM's finetuning
taught them; no budget loss is needed to hold them), swept over target depths like token
halting. Params: {"acm": ACM ViT params, "halting": {"scale", "shift"}}.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from acm_jax import flops as flops_lib
from acm_jax import transformer
from acm_jax.pytree import PyTree
from acm_jax.train import steps
from acm_jax.vit import flops as vit_flops
from acm_jax.vit import model as vit
from acm_jax.vit.baselines import common, token_halting
from acm_jax.vit.baselines.token_halting import Halting
from acm_jax.vit.model import ViTConfig


def check(cfg: ViTConfig) -> ViTConfig:
  """acm_halting counts the FLOPs of MLP ACMs only: refuse a model with ACMized projections."""
  if cfg.acm is None:
    raise ValueError("acm_halting needs an ACM model config, got a dense one")
  if cfg.acm.attention:
    raise ValueError("acm_halting composes token halting with MLP ACMs only; drop --acm_attention=true")
  return cfg


def init(acm_params: PyTree) -> PyTree:
  return {"acm": acm_params, "halting": token_halting.init({})["halting"]}


def is_gate(path: str) -> bool:
  return "/gate/" in f"/{path}"


def block(cfg: ViTConfig, params: PyTree, i: int, x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """Block `i` of the ACM ViT, gates at argmax: (its output, k (batch, tokens)); k = N in a dense block."""
  acm = cfg.acm if i in cfg.acm.block_indices(cfg.depth) else None
  module = transformer.EncoderBlock(**vit.block_fields(cfg), acm=acm)
  y, state = module.apply({"params": transformer.block_params(params, i)}, x, mask, mode="argmax", mutable=["acm"])
  if acm is None:
    return y, jnp.full(x.shape[:2], cfg.acm.num_learners, jnp.int32)
  return y, jnp.argmax(state["acm"]["mlp"]["choice"][0], -1).astype(jnp.int32)


def forward(cfg: ViTConfig, halting: Halting, params: PyTree, images: jax.Array) -> tuple[jax.Array, dict]:
  """`token_halting.forward` on the ACM's blocks: (logits, aux) with its aux plus
  "k_sum" (batch, depth), the learners run summed over the tokens entering each block."""
  trunk = params["acm"]
  k_sums = []

  def run_block(i, x, mask, alive):
    y, k = block(cfg, trunk, i, x, mask)
    k_sums.append(jnp.sum(k * alive, -1))
    return y

  logits, aux = token_halting.halting_loop(cfg, halting, params["halting"], trunk, common.embed(cfg, trunk, images),
                                           run_block)
  return logits, {**aux, "k_sum": jnp.stack(k_sums, -1)}


def flops(cfg: ViTConfig, active_tokens: jax.Array, k_sum: jax.Array, halting: bool = True) -> jax.Array:
  """Per example, from the tokens entering each block and their learners run, both (..., depth):
  attention, projections and norms for the running tokens, their learners and gates, the
  halting score and ponder-weighted output."""
  acm = cfg.acm
  width = acm.mlp_learner_width(cfg.mlp_dim)
  parts = flops_lib.encoder_block_flops(active_tokens, cfg.dim, cfg.mlp_dim, cfg.num_heads, cfg.activation)
  dense_blocks = jnp.isin(jnp.arange(cfg.depth), jnp.asarray(acm.block_indices(cfg.depth)), invert=True)
  mean_k = k_sum / jnp.maximum(active_tokens, 1)
  mlp = jnp.where(dense_blocks, parts["mlp"], flops_lib.acm_block_flops(
      active_tokens, cfg.dim, width, acm.num_learners, mean_k, cfg.activation, acm.gate_depth, acm.gate_hidden))
  per_block = parts["projections"] + parts["attention"] + parts["other"] + mlp
  if halting:
    per_block = per_block + vit_flops.halting_overhead_flops(cfg, active_tokens)
  return vit_flops.embedding_flops(cfg) + vit_flops.head_flops(cfg) + per_block.sum(-1)


def halting_step(task: steps.Task, halting: Halting, label_smoothing: float, tx, state: PyTree,
                 batch: dict) -> tuple[PyTree, dict]:
  # the XLA path: the fused inference kernels that "auto" may pick on a GPU are not for training
  cfg = dataclasses.replace(task.acm_model.config, acm=dataclasses.replace(task.acm_model.config.acm, impl="xla"))
  return token_halting.train_step(lambda params, images: forward(cfg, halting, params, images), cfg.depth, task,
                                  halting, label_smoothing, tx, state, batch)


def eval_forward(cfg: ViTConfig, halting: Halting, params: PyTree, images: jax.Array) -> tuple:
  """(logits, FLOPs per example, {"blocks_per_token", "mean_k"}: mean k over running tokens and blocks)."""
  logits, aux = forward(cfg, halting, params, images)
  active = aux["active"].astype(jnp.float32)
  tokens = aux["ponder"].shape[1]
  return logits, flops(cfg, active, aux["k_sum"].astype(jnp.float32), halting.enabled), {
      "blocks_per_token": active.sum(-1) / tokens, "mean_k": aux["k_sum"].sum(-1) / jnp.maximum(active.sum(-1), 1)}
