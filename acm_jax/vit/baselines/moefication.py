"""MoEfication: each dense MLP's hidden units split into experts, a router per layer.

Recipe (after Zhang et al., 2022, adapted to a GELU ViT without ReLU-fication):
1. Split: the hidden units of every MLP are clustered into `num_experts` groups of
   equal size by balanced k-means on their normalised input weights (the columns
   of fc1). The units are permuted so expert e owns the contiguous slice
   [e*w, (e+1)*w); the permutation leaves the dense function unchanged.
2. Routers: one 2-layer router per layer (dim -> router_hidden -> E, ReLU) trained
   with the backbone frozen on the dense model's recorded MLP inputs. Its target
   is each expert's share of the layer output: the norm of act(x W1_e + b1_e) W2_e,
   normalised over experts; the loss is cross-entropy against those shares, so
   the router ranks experts by how much they matter for the token.
3. Inference: each token runs its top-k experts by router score; sweep k.
Params: {"dense": permuted dense ViT params, "routers": {"block_i": router params}}.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from acm_jax import acm as acm_lib
from acm_jax import transformer
from acm_jax.vit import flops as flops_lib
from acm_jax.vit.baselines import common
from acm_jax.vit.model import ViTConfig
from acm_jax.train import steps
from acm_jax.pytree import PyTree


def balanced_kmeans(vectors: np.ndarray, num_clusters: int, iterations: int = 20, seed: int = 0) -> np.ndarray:
  """(n, d) -> (n,) cluster ids, every cluster of exactly n / num_clusters members.

  Lloyd iterations whose assignment step is greedy under a capacity: all
  (point, centre) pairs in order of distance, each point to the nearest centre
  that still has room.
  """
  n = len(vectors)
  if n % num_clusters:
    raise ValueError(f"{n} hidden units cannot be split into {num_clusters} experts of equal size")
  size = n // num_clusters
  rng = np.random.default_rng(seed)
  centres = vectors[rng.choice(n, num_clusters, replace=False)]
  assign = np.zeros(n, np.int64)
  for _ in range(iterations):
    dist = ((vectors[:, None, :] - centres[None]) ** 2).sum(-1)
    order = np.argsort(dist, axis=None, kind="stable")
    assign.fill(-1)
    room = np.full(num_clusters, size)
    for flat in order:
      point, centre = divmod(int(flat), num_clusters)
      if assign[point] < 0 and room[centre] > 0:
        assign[point] = centre
        room[centre] -= 1
    new = np.stack([vectors[assign == c].mean(0) for c in range(num_clusters)])
    if np.allclose(new, centres):
      break
    centres = new
  return assign


def split_experts(dense: PyTree, depth: int, num_experts: int, seed: int = 0) -> PyTree:
  """Permutes every MLP's hidden units so that expert e owns a contiguous slice (params in
  either block layout, returned in the same)."""
  if transformer.is_stacked(dense):
    return transformer.stack_blocks(split_experts(transformer.unstack_blocks(dense), depth, num_experts, seed))
  out = jax.tree.map(np.asarray, dense)
  for i in range(depth):
    mlp = out[f"block_{i}"]["mlp"]
    w1 = mlp["fc1"]["kernel"].T
    assign = balanced_kmeans(w1 / np.linalg.norm(w1, axis=1, keepdims=True).clip(1e-12), num_experts, seed=seed + i)
    perm = np.argsort(assign, kind="stable")
    mlp["fc1"] = {"kernel": mlp["fc1"]["kernel"][:, perm], "bias": mlp["fc1"]["bias"][perm]}
    mlp["fc2"] = {"kernel": mlp["fc2"]["kernel"][perm], "bias": mlp["fc2"]["bias"]}
  return out


def router(num_experts: int, hidden: int) -> acm_lib.Gate:
  return acm_lib.Gate(num_experts, depth=2, hidden=hidden)


def expert_hidden(cfg: ViTConfig, mlp: PyTree, x: jax.Array, num_experts: int) -> jax.Array:
  """Hidden activations grouped by expert: (..., dim) -> (..., E, width)."""
  hidden = acm_lib.get_activation(cfg.activation)(x @ mlp["fc1"]["kernel"] + mlp["fc1"]["bias"])
  return hidden.reshape(*hidden.shape[:-1], num_experts, -1)


def expert_importance(cfg: ViTConfig, mlp: PyTree, x: jax.Array, num_experts: int) -> jax.Array:
  """Norm of each expert's contribution to the MLP output: (..., dim) -> (..., E)."""
  hidden = expert_hidden(cfg, mlp, x, num_experts)
  w2 = mlp["fc2"]["kernel"].reshape(num_experts, -1, cfg.dim)
  return jnp.linalg.norm(jnp.einsum("...ew,ewd->...ed", hidden, w2), axis=-1)


def moe_mlp(cfg: ViTConfig, mlp: PyTree, router_params: PyTree, x: jax.Array, num_experts: int, top_k: int,
            router_hidden: int) -> jax.Array:
  """The MLP with only each token's `top_k` experts (by router score) running."""
  scores = router(num_experts, router_hidden).apply({"params": router_params}, x)
  _, chosen = jax.lax.top_k(scores, top_k)
  on = jnp.sum(jax.nn.one_hot(chosen, num_experts, dtype=x.dtype), axis=-2)
  hidden = expert_hidden(cfg, mlp, x, num_experts) * on[..., None]
  return hidden.reshape(*x.shape[:-1], cfg.mlp_dim) @ mlp["fc2"]["kernel"] + mlp["fc2"]["bias"]


def forward(cfg: ViTConfig, num_experts: int, top_k: int, router_hidden: int, params: PyTree,
            images: jax.Array) -> jax.Array:
  dense = params["dense"]
  x = common.embed(cfg, dense, images)
  for i in range(cfg.depth):
    mlp_fn = functools.partial(moe_mlp, cfg, transformer.block_params(dense, i)["mlp"],
                               params["routers"][f"block_{i}"], num_experts=num_experts, top_k=top_k,
                               router_hidden=router_hidden)
    x = common.block(cfg, dense, i, x, mlp_fn=mlp_fn)
  return common.classify(cfg, dense["norm"], dense["head"], x[:, 0])


def init(cfg: ViTConfig, dense: PyTree, num_experts: int, router_hidden: int, seed: int) -> PyTree:
  keys = jax.random.split(jax.random.key(seed), cfg.depth)
  r = router(num_experts, router_hidden)
  routers = {f"block_{i}": r.init(k, jnp.zeros((1, cfg.dim)))["params"] for i, k in enumerate(keys)}
  return {"dense": split_experts(dense, cfg.depth, num_experts, seed), "routers": routers}


def router_step(task: steps.Task, num_experts: int, router_hidden: int, tx, state: PyTree,
                batch: dict) -> tuple[PyTree, dict]:
  """Routers learn each expert's share of the output on the frozen dense model's MLP inputs."""
  cfg = task.dense_model.config
  dense = state["params"]["dense"]
  records = steps.teacher_records(task, dense, batch)
  inputs, shares = [], []
  for i in range(cfg.depth):
    x = records[f"block_{i}/mlp"][0]
    importance = expert_importance(cfg, transformer.block_params(dense, i)["mlp"], x, num_experts)
    inputs.append(x)
    shares.append(importance / jnp.maximum(importance.sum(-1, keepdims=True), 1e-12))

  def loss_fn(params):
    per_layer, hits = [], []
    for i, (x, share) in enumerate(zip(inputs, shares)):
      scores = router(num_experts, router_hidden).apply({"params": params["routers"][f"block_{i}"]}, x)
      per_layer.append(jnp.mean(optax.softmax_cross_entropy(scores, share)))
      hits.append(jnp.mean(jnp.argmax(scores, -1) == jnp.argmax(share, -1)))
    return jnp.mean(jnp.stack(per_layer)), jnp.mean(jnp.stack(hits))

  (loss, hit), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  return steps.apply_update(tx, state, grads), {"loss": loss, "top1_expert_hit": hit}


def eval_forward(cfg: ViTConfig, num_experts: int, top_k: int, router_hidden: int, params: PyTree,
                 images: jax.Array) -> tuple:
  logits = forward(cfg, num_experts, top_k, router_hidden, params, images)
  flops = flops_lib.moefication_flops(cfg, num_experts, top_k, router_hidden)["total"]
  return logits, jnp.full(logits.shape[:1], flops, jnp.float32), {}
