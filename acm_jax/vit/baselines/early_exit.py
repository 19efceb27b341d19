"""Early exit (SDN-style, as in the ZTW baseline of the paper): classifier heads
on the class token after blocks 0..depth-2, the model's own head after the last.

Recipe: the dense backbone and its head are frozen; each exit head (a layer
norm and a linear classifier, initialised as copies of the final norm and head)
is trained with the sum of the heads' cross-entropies. At inference a sample
leaves at the first head whose confidence (maximum softmax probability) reaches
the threshold, and pays for the blocks and heads it ran. ZTW's cascading
connections and ensembling of earlier heads are not used.
Params: {"dense": dense ViT params, "exits": {"exit_i": {"norm", "head"}}}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from acm_jax.vit import flops as flops_lib
from acm_jax.vit.baselines import common
from acm_jax.vit.model import ViTConfig
from acm_jax.train import steps
from acm_jax.pytree import PyTree


def init(cfg: ViTConfig, dense: PyTree) -> PyTree:
  exits = {f"exit_{i}": {"norm": dense["norm"], "head": dense["head"]} for i in range(cfg.depth - 1)}
  return {"dense": dense, "exits": jax.tree.map(jnp.array, exits)}


def all_logits(cfg: ViTConfig, params: PyTree, images: jax.Array) -> jax.Array:
  """Logits of every exit, the model's own head last: (depth, batch, classes)."""
  dense = params["dense"]
  x = common.embed(cfg, dense, images)
  out = []
  for i in range(cfg.depth):
    x = common.block(cfg, dense, i, x)
    head = params["exits"][f"exit_{i}"] if i < cfg.depth - 1 else dense
    out.append(common.classify(cfg, head["norm"], head["head"], x[:, 0]))
  return jnp.stack(out)


def exit_index(logits: jax.Array, threshold: float | jax.Array) -> jax.Array:
  """(depth, batch, classes) -> (batch,) the first exit whose confidence reaches
  `threshold`; the last one when none does."""
  confidence = jnp.max(jax.nn.softmax(logits.astype(jnp.float32), -1), -1)
  passes = (confidence >= threshold).at[-1].set(True)
  return jnp.argmax(passes, axis=0)


def forward(cfg: ViTConfig, threshold: float, params: PyTree, images: jax.Array) -> tuple:
  """(logits (batch, classes), FLOPs per example (batch,), {"exit_share": one-hot
  exit (batch, depth)}). A threshold above 1 disables the exits: no head but the
  last one runs, as in the dense model."""
  if threshold > 1.0:
    logits = common.dense_forward(cfg, params["dense"], images)
    exit_at = jnp.full(logits.shape[:1], cfg.depth - 1)
    heads_run = 0
  else:
    all_exits = all_logits(cfg, params, images)
    exit_at = exit_index(all_exits, threshold)
    logits = jnp.take_along_axis(all_exits, exit_at[None, :, None], axis=0)[0]
    heads_run = jnp.minimum(exit_at + 1, cfg.depth - 1)
  flops = flops_lib.early_exit_flops(cfg, exit_at, heads_run)
  return logits, flops, {"exit_share": jax.nn.one_hot(exit_at, cfg.depth)}


def exit_step(task: steps.Task, label_smoothing: float, tx, state: PyTree, batch: dict) -> tuple[PyTree, dict]:
  """Exit heads learn the task on the frozen backbone's class tokens."""
  cfg = task.dense_model.config

  def loss_fn(params):
    logits = all_logits(cfg, {"dense": jax.lax.stop_gradient(params["dense"]), "exits": params["exits"]},
                        task.inputs(batch))
    per_exit = jnp.stack([task.loss(l, batch, label_smoothing) for l in logits[:-1]])
    return jnp.sum(per_exit), per_exit

  (loss, per_exit), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  return steps.apply_update(tx, state, grads), {"loss": loss, "first_exit_loss": per_exit[0]}
