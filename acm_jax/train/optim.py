"""Optimizers: AdamW with warm-up + cosine decay and gradient clipping, applied
only to the parameters a phase trains (the others get zero updates)."""

from __future__ import annotations

from typing import Callable

import optax
from flax import traverse_util

from acm_jax.pytree import PyTree


def make_optimizer(params: PyTree, *, lr: float, steps: int, warmup_fraction: float = 0.05,
                   weight_decay: float = 1e-4, clip_norm: float = 1.0,
                   trainable: Callable[[str], bool] = lambda path: True,
                   fast: Callable[[str], bool] = lambda path: False,
                   fast_lr_scale: float = 1.0) -> optax.GradientTransformation:
  """`trainable(path)` says, per '/'-joined parameter path, whether it is updated;
  `fast(path)` marks parameters trained at `fast_lr_scale` x the learning rate
  (the gates in finetuning: a short finetune otherwise barely moves them)."""
  warmup = max(1, int(round(warmup_fraction * steps)))
  def schedule(scale):
    return optax.warmup_cosine_decay_schedule(0.0, lr * scale, warmup, max(steps, warmup + 1),
                                              end_value=lr * scale * 1e-3)

  flat = traverse_util.flatten_dict(params, sep="/")
  # weight decay on matrices only: not on biases, norms, tokens or position embeddings
  decay = traverse_util.unflatten_dict(
      {k: k.rsplit("/", 1)[-1] in ("kernel", "w1", "w2") for k in flat}, sep="/")
  labels = traverse_util.unflatten_dict(
      {k: ("fast" if fast(k) else "train") if trainable(k) else "frozen" for k in flat}, sep="/")
  # one clipping over every trained parameter, then Adam at two learning rates
  adam = {name: optax.adamw(schedule(scale), weight_decay=weight_decay, mask=decay)
          for name, scale in (("train", 1.0), ("fast", fast_lr_scale))}
  return optax.chain(
      optax.multi_transform({"train": optax.identity(), "fast": optax.identity(), "frozen": optax.set_to_zero()},
                            labels),
      optax.clip_by_global_norm(clip_norm),
      optax.multi_transform({**adam, "frozen": optax.set_to_zero()}, labels))
