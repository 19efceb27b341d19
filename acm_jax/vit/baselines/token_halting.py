"""Token halting (A-ViT-style, Yin et al., 2022): tokens stop at their own depth.

After block l, token t gets a halting score h = sigmoid(scale * x_t[0] + shift)
from its first embedding channel (h = 1 after the last block). A token halts at
the first block where the cumulative score reaches 1 - eps; from then on it is
masked out of attention (as a key) and skips every later block, keeping its
state. The class token fed to the head is the ponder-weighted mean of its
states: h at each block it ran and the remainder 1 - sum(h) at its last.
Recipe: the whole model is finetuned with the task loss plus
  ponder_weight * mean over tokens of (blocks run + remainder), and
  prior_weight * KL(target || mean halting distribution over blocks), the target a
  Gaussian (std 1) over blocks centred at the target depth,
swept over target depths. Params: {"dense": ViT params, "halting": {"scale", "shift"}}.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from acm_jax.vit import flops as flops_lib
from acm_jax.vit.baselines import common
from acm_jax.vit.model import ViTConfig
from acm_jax.train import steps
from acm_jax.pytree import PyTree


@dataclasses.dataclass(frozen=True)
class Halting:
  eps: float = 0.01
  ponder_weight: float = 5e-3
  prior_weight: float = 0.1
  target_depth: float = 2.0  # blocks
  enabled: bool = True


def init(dense: PyTree, scale: float = 5.0, shift: float = -10.0) -> PyTree:
  """Scores start near 0 (the residual stream's channel 0 is about N(0, 1.5) in a
  trained tiny ViT): at first almost every token runs the full depth, and the
  large scale lets the finetuned backbone move a token's score quickly."""
  return {"dense": dense, "halting": {"scale": jnp.float32(scale), "shift": jnp.float32(shift)}}


def forward(cfg: ViTConfig, halting: Halting, params: PyTree, images: jax.Array) -> tuple[jax.Array, dict]:
  """(logits (batch, classes), aux) with aux: "active" (batch, depth) tokens entering
  each block, "ponder" (batch, tokens) blocks run + remainder, "halt_share" (depth,)
  the mean halting weight of each block."""
  dense = params["dense"]
  return halting_loop(cfg, halting, params["halting"], dense, common.embed(cfg, dense, images),
                      lambda i, x, mask, alive: common.block(cfg, dense, i, x, mask))


def halting_loop(cfg: ViTConfig, halting: Halting, scores: PyTree, trunk: PyTree, x: jax.Array,
                 run_block: Callable) -> tuple[jax.Array, dict]:
  """The halting rule over the blocks of any ViT whose tree `trunk` holds "norm" and "head":
  x (batch, tokens, dim) the embedded tokens, scores {"scale", "shift"}, and
  run_block(i, x, mask, alive) -> block i's output (mask (batch, 1, 1, tokens) of the keys,
  None without halting; alive (batch, tokens) the tokens entering it). Returns `forward`'s pair."""
  batch, tokens, _ = x.shape
  cumulative = jnp.zeros((batch, tokens), jnp.float32)
  alive = jnp.ones((batch, tokens), bool)
  out = jnp.zeros_like(x)
  ponder = jnp.zeros((batch, tokens), jnp.float32)
  active, share = [], []
  for i in range(cfg.depth):
    active.append(alive.sum(-1))
    mask = None if not halting.enabled else alive[:, None, None, :]
    x = jnp.where(alive[..., None], run_block(i, x, mask, alive), x)
    if i == cfg.depth - 1:
      score = jnp.ones((batch, tokens), jnp.float32)
    elif halting.enabled:
      score = jax.nn.sigmoid(scores["scale"] * x[..., 0].astype(jnp.float32) + scores["shift"])
    else:
      score = jnp.zeros((batch, tokens), jnp.float32)
    score = score * alive
    stops = alive & (cumulative + score >= 1.0 - halting.eps)
    weight = jnp.where(stops, 1.0 - cumulative, score)
    out = out + weight[..., None].astype(x.dtype) * x
    ponder = ponder + alive + jnp.where(stops, 1.0 - cumulative, 0.0)
    share.append(jnp.mean(weight))
    cumulative = cumulative + score
    alive = alive & ~stops
  logits = common.classify(cfg, trunk["norm"], trunk["head"], out[:, 0])
  return logits, {"active": jnp.stack(active, -1), "ponder": ponder, "halt_share": jnp.stack(share)}


def depth_prior(depth: int, target: float) -> jax.Array:
  """Gaussian over blocks 1..depth centred at `target`, std 1, normalised."""
  blocks = jnp.arange(1, depth + 1, dtype=jnp.float32)
  p = jnp.exp(-0.5 * jnp.square(blocks - target))
  return p / p.sum()


def halting_step(task: steps.Task, halting: Halting, label_smoothing: float, tx, state: PyTree,
                 batch: dict) -> tuple[PyTree, dict]:
  cfg = task.dense_model.config
  return train_step(functools.partial(forward, cfg, halting), cfg.depth, task, halting, label_smoothing, tx, state,
                    batch)


def train_step(forward_fn: Callable, depth: int, task: steps.Task, halting: Halting, label_smoothing: float, tx,
               state: PyTree, batch: dict) -> tuple[PyTree, dict]:
  """One step of the halting recipe for any `forward_fn(params, images) -> (logits, aux)` with
  `forward`'s aux: task loss + ponder loss + depth-prior loss."""
  prior = depth_prior(depth, halting.target_depth)

  def loss_fn(params):
    logits, aux = forward_fn(params, task.inputs(batch))
    task_loss = task.loss(logits, batch, label_smoothing)
    ponder = jnp.mean(aux["ponder"])
    share = jnp.maximum(aux["halt_share"] / jnp.sum(aux["halt_share"]), 1e-8)
    prior_loss = jnp.sum(prior * (jnp.log(prior) - jnp.log(share)))
    total = task_loss + halting.ponder_weight * ponder + halting.prior_weight * prior_loss
    return total, (logits, {"task_loss": task_loss, "ponder": ponder, "prior_loss": prior_loss,
                            "mean_depth": jnp.mean(aux["active"]) * depth / aux["ponder"].shape[1]})

  (loss, (logits, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  top1 = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
  return steps.apply_update(tx, state, grads), {"loss": loss, **metrics, "top1": top1}


def eval_forward(cfg: ViTConfig, halting: Halting, params: PyTree, images: jax.Array) -> tuple:
  """(logits, FLOPs per example, {"blocks_per_token": (batch,)})."""
  logits, aux = forward(cfg, halting, params, images)
  active = aux["active"].astype(jnp.float32)
  flops = flops_lib.token_halting_flops(cfg, active, halting.enabled)
  return logits, flops, {"blocks_per_token": active.sum(-1) / aux["ponder"].shape[1]}
