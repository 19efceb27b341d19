"""Pieces every baseline shares: the dense ViT's own forward cut into embedding, blocks
and head, training through the shared loop, and evaluation on the shared test batches.

The pieces run `acm_jax.vit.model`'s and `acm_jax.transformer`'s modules on the dense
ViT's parameter tree, unrolled (`block_{i}`) or scanned (`blocks`, one leading layer
axis), so a baseline is the dense params plus a few extra parameters (routers, exit
heads, halting scalars) and a forward that steps through the blocks itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from acm_jax import transformer
from acm_jax.vit import model as vit
from acm_jax.vit.model import ViTConfig
from acm_jax.train import loop, optim, phases
from acm_jax.pytree import PyTree


def embed(cfg: ViTConfig, params: PyTree, images: jax.Array) -> jax.Array:
  """(batch, H, W, 3) -> tokens (batch, 1 + patches, dim), class token first."""
  return vit.Embedding(cfg).apply({"params": params}, images)


def block(cfg: ViTConfig, params: PyTree, i: int, x: jax.Array, mask: jax.Array | None = None,
          mlp_fn: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
  """The dense model's block `i` (either layout); `mask` (batch, 1, q, k) drops keys;
  `mlp_fn(ln2(x))`, when given, replaces the dense MLP."""
  module = transformer.EncoderBlock(**vit.block_fields(cfg))
  variables = {"params": transformer.block_params(params, i)}
  if mlp_fn is None:
    return module.apply(variables, x, mask)

  def swap_mlp(next_fun, args, kwargs, context):
    if isinstance(context.module, transformer.Mlp) and context.method_name == "__call__":
      return mlp_fn(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(swap_mlp):
    return module.apply(variables, x, mask)


def classify(cfg: ViTConfig, norm: PyTree, head: PyTree, token: jax.Array) -> jax.Array:
  """A class token (batch, dim) -> logits, with the given norm and head params."""
  return vit.Head(cfg).apply({"params": {"norm": norm, "head": head}}, token)


def dense_forward(cfg: ViTConfig, params: PyTree, images: jax.Array) -> jax.Array:
  return vit.ViT(cfg).apply({"params": params}, images)


def dense_config(exp: phases.Experiment) -> ViTConfig:
  return exp.task.dense_model.config


def run_config(exp: phases.Experiment, run_dir: Path, settings: dict[str, Any]) -> tuple[str, list[str]]:
  """A baseline run's config.json, the experiment's config plus `settings` (what the baseline reads beyond
  the fields every run shares: its own flags, resolved), and the fields a resume must match."""
  cfg = exp.config
  config_json = json.dumps({**json.loads(cfg.to_json()), **settings}, indent=2, sort_keys=True)
  return config_json, [*cfg.resume_fields(run_dir.name), *settings]


def check_settings(exp: phases.Experiment, run_dir: Path, settings: dict[str, Any]) -> None:
  """Stops when `run_dir` holds a run of other settings, before its state or cached evaluations are reused."""
  loop.check_config(run_dir, *run_config(exp, run_dir, settings))


def train(exp: phases.Experiment, run_dir: Path, params: PyTree, tx, step_fn, num_steps: int,
          settings: dict[str, Any]) -> PyTree:
  """The shared loop (checkpoints, resume) on the train split, like `phases.train`; `settings` as in
  `run_config`."""
  cfg = exp.config
  state, step, batches = phases.prepare(exp, run_dir.name, params, tx, step_fn)
  config_json, resume_fields = run_config(exp, run_dir, settings)
  final = loop.run(name=run_dir.name, run_dir=run_dir, state=state, step_fn=step, batches=batches,
                   num_steps=num_steps, checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every,
                   config_json=config_json, resume_fields=resume_fields)
  return final["params"]


def evaluate(exp: phases.Experiment, forward: Callable[[PyTree, dict], tuple], params: PyTree) -> dict:
  """Top-1 and mean GFLOPs/image on the shared test batches.

  `forward(params, batch)` gives (logits, FLOPs per example (batch,), extras),
  extras a dict of per-example arrays (batch, ...) whose means are reported too.
  """
  @jax.jit
  def per_batch(params, batch):
    logits, flops, extras = forward(params, batch)
    valid = batch["valid"].astype(jnp.float32)
    out = {**exp.task.score(logits, batch), "flops": jnp.sum(flops * valid)}
    out.update({k: jnp.tensordot(valid, v.astype(jnp.float32), axes=1) for k, v in extras.items()})
    return out

  totals = None
  for batch in phases.eval_batches(exp, with_masks=False):
    out = jax.device_get(per_batch(params, batch))
    totals = out if totals is None else jax.tree.map(np.add, totals, out)
  if totals is None:
    raise ValueError(f"the test split of {exp.config.dataset!r} produced no examples")
  n = totals.pop("examples")
  record = {name: (np.asarray(v) / n).tolist() for name, v in totals.items()}
  record["gflops_per_image"] = record.pop("flops") / 1e9
  record["examples"] = int(n)
  return record


def frozen_except(prefixes: tuple[str, ...]) -> Callable[[str], bool]:
  """A `trainable(path)` for the optimizer: only parameters under `prefixes`."""
  return lambda path: path.startswith(prefixes)


def optimizer(exp: phases.Experiment, params: PyTree, lr: float, steps: int, trainable=lambda path: True):
  cfg = exp.config
  return optim.make_optimizer(params, lr=lr, steps=steps, warmup_fraction=cfg.warmup_fraction,
                              weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm, trainable=trainable)

