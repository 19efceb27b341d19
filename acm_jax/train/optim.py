"""Optimizers: AdamW with warm-up + cosine decay and gradient clipping, applied
only to the parameters a phase trains (the others get zero updates)."""

from __future__ import annotations

from typing import Any, Callable

import optax
from flax import traverse_util

PyTree = Any


def make_optimizer(params: PyTree, *, lr: float, steps: int, warmup_fraction: float = 0.05,
                   weight_decay: float = 1e-4, clip_norm: float = 1.0,
                   trainable: Callable[[str], bool] = lambda path: True) -> optax.GradientTransformation:
  """`trainable(path)` says, per '/'-joined parameter path, whether it is updated."""
  warmup = max(1, int(round(warmup_fraction * steps)))
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=lr * 1e-3)
  flat = traverse_util.flatten_dict(params, sep="/")
  # weight decay on matrices only: not on biases, norms, tokens or position embeddings
  decay = traverse_util.unflatten_dict(
      {k: k.rsplit("/", 1)[-1] in ("kernel", "w1", "w2") for k in flat}, sep="/")
  labels = traverse_util.unflatten_dict({k: "train" if trainable(k) else "frozen" for k in flat}, sep="/")
  train = optax.chain(optax.clip_by_global_norm(clip_norm),
                      optax.adamw(schedule, weight_decay=weight_decay, mask=decay))
  return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)
