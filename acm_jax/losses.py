"""Losses of the three ACMization phases, as pure functions of arrays.

Shapes: `choices` is a list (one entry per ACM) of (batch, tokens, N+1) one-hot
(or relaxed) choice arrays; `prefix` is (..., N+1, dim) from
`acm.prefix_outputs`; `errors` is (..., N+1). `mask`, where a loss takes one, is
(batch, tokens) (or the leading shape of `prefix`/`logits`): 1 for real tokens, 0 for
padding (e.g. the frames past an utterance's end in a padded speech batch); means
then run over real tokens only. None: every token is real.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from acm_jax import acm as acm_lib

LABEL_RULES = ("ours", "official")
BUDGET_KINDS = ("l1", "l2", "l2_100")


def token_mean(values: jax.Array, mask: jax.Array | None, axes: tuple[int, ...]) -> jax.Array:
  """Mean of `values` over `axes`, counting only tokens where mask (broadcast on the right) is 1."""
  if mask is None:
    return jnp.mean(values, axis=axes)
  weight = jnp.reshape(mask.astype(values.dtype), mask.shape + (1,) * (values.ndim - mask.ndim))
  weight = jnp.broadcast_to(weight, values.shape)
  return jnp.sum(values * weight, axis=axes) / jnp.maximum(jnp.sum(weight, axis=axes), 1e-9)


def distillation_loss(prefix: jax.Array, target: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean over k = 1..N of the MSE between h(x, k) and the dense block's output."""
  return token_mean(jnp.square(prefix[..., 1:, :] - target[..., None, :]), mask, tuple(range(prefix.ndim)))


def learner_distillation_loss(params: dict, x: jax.Array, target: jax.Array, mask: jax.Array | None = None, *,
                              num_learners: int, activation: str = "gelu", grad_mode: str = "detach") -> jax.Array:
  """`distillation_loss(acm.prefix_outputs(params, x, ...), target, mask)` computed with the choice
  axis leading: x (..., dim) -> scalar. Equal in float32; with bfloat16 x each learner's output is
  rounded to bfloat16 (as the ACM's learners output it) before the float32 running sums.

  The learners' outputs come out of one batched matmul as (N, ..., dim), so the running sum
  over learners, the per-choice bias and the squared error are elementwise over N slices that
  XLA fuses into one pass, instead of (..., N+1, dim) arrays built by a concatenate, a cumsum
  along an inner axis and the transposes the batched matmul needs around them (one ViT-B/16
  distillation step holds 60 such ACMs). Choice 0, which the loss skips, is never formed."""
  if grad_mode not in acm_lib.GRAD_MODES:
    raise ValueError(f"unknown grad_mode {grad_mode!r}; expected one of {acm_lib.GRAD_MODES}")
  params = acm_lib.in_input_dtype(params, x)  # matmuls in x's dtype, the running sums and errors in float32
  # (N, ..., dim) in x's dtype, as the ACM's learners output them: half the bytes of float32 for the
  # largest arrays of the distillation step (4 x tokens x dim per ACM, written once each way)
  outs = acm_lib.learner_outputs(params, x, num_learners=num_learners, activation=activation, learners_first=True,
                                 out_dtype=x.dtype).astype(jnp.float32)
  cum = jnp.cumsum(outs, axis=0)
  if grad_mode == "detach":  # the gradient of choice k reaches learner k only
    cum = outs + jax.lax.stop_gradient(cum - outs)
  bias = acm_lib.choice_bias(params, num_learners)[1:].astype(jnp.float32)
  error = (cum + jnp.reshape(bias, (num_learners,) + (1,) * (x.ndim - 1) + bias.shape[-1:])
           - target[None].astype(jnp.float32))
  per_token = jnp.sum(jnp.square(error), axis=(0, -1)) / (num_learners * error.shape[-1])
  return token_mean(per_token, mask, tuple(range(per_token.ndim)))


def choice_errors(prefix: jax.Array, target: jax.Array) -> jax.Array:
  """L2 error of every choice: (..., N+1, dim), (..., dim) -> (..., N+1)."""
  return jnp.linalg.norm(prefix - target[..., None, :], axis=-1)


def gate_labels(errors: jax.Array, factor: float, rule: str = "ours") -> jax.Array:
  """Artificial gate labels from per-choice errors e_0..e_N: (..., N+1) -> (...,) int32.

  With r_i = e_i / e_{i+1} (how much learner i+1 improves on choice i):
  - "ours": the smallest k such that no later learner improves the error by a
    factor of `factor` or more (r_j < factor for every j >= k). k = 0 is a valid
    label (a token whose block output is already small skips the block), and
    k = N is chosen when the last learner still helps.
  - "official": the public code's rule, for reproduction: the first i with
    r_i < factor gives label i + 1; no such i, or i = 0, gives N. Under it
    k = 0 is never a label. Its ratios are plain divisions: 0/0 is NaN, which
    never counts as below the factor (and x/0 is inf), so errors [1, 0, 0, 0, 0]
    and [2, 1, 0, 0, 0] both give N.
  """
  if rule not in LABEL_RULES:
    raise ValueError(f"unknown label rule {rule!r}; expected one of {LABEL_RULES}")
  num_learners = errors.shape[-1] - 1
  if rule == "official":
    first = jnp.argmax(errors[..., :-1] / errors[..., 1:] < factor, axis=-1)  # NaN < factor is False
    return jnp.where(first == 0, num_learners, first + 1).astype(jnp.int32)
  tiny = jnp.finfo(errors.dtype).tiny
  small_gain = errors[..., :-1] / jnp.maximum(errors[..., 1:], tiny) < factor
  # settled[k]: every step from k on gains less than the factor (vacuously true at k = N)
  settled = jnp.flip(jnp.cumprod(jnp.flip(small_gain, -1), axis=-1), -1).astype(bool)
  settled = jnp.concatenate([settled, jnp.ones_like(settled[..., :1])], axis=-1)
  return jnp.argmax(settled, axis=-1).astype(jnp.int32)


def gate_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Cross-entropy of the gate's N+1 logits against the artificial labels."""
  per_token = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return token_mean(per_token, mask, tuple(range(per_token.ndim)))


def compute_fraction(choices: Sequence[jax.Array], learner_costs: Sequence[float],
                     mask: jax.Array | None = None) -> jax.Array:
  """C: executed learner cost over the cost of running every learner, in [0, 1].

  Averaged over (real) tokens and samples; ACMs are weighted by their learner cost.
  """
  mean_k = [token_mean(c @ jnp.arange(c.shape[-1], dtype=c.dtype), mask, (0, 1)) for c in choices]
  return acm_lib.compute_fraction(mean_k, learner_costs, [c.shape[-1] - 1 for c in choices])


def budget_loss(choices: Sequence[jax.Array], learner_costs: Sequence[float], budget: float | jax.Array,
                kind: str = "l1", mask: jax.Array | None = None) -> jax.Array:
  """Distance of the compute fraction C to the target budget (L1, L2 or (100 x)^2)."""
  if kind not in BUDGET_KINDS:
    raise ValueError(f"unknown budget loss {kind!r}; expected one of {BUDGET_KINDS}")
  gap = compute_fraction(choices, learner_costs, mask) - budget
  if kind == "l1":
    return jnp.abs(gap)
  return jnp.square(gap) if kind == "l2" else jnp.square(100.0 * gap)


def entropy_loss(choices: Sequence[jax.Array], mask: jax.Array | None = None) -> jax.Array:
  """Minus the normalised entropy of each sample's choice histogram, averaged.

  Keeps the tokens of one sample from all taking the same k (gate collapse).
  """
  stacked = jnp.stack(choices)  # (acms, batch, tokens, N+1)
  dist = jax.vmap(lambda c: token_mean(c, mask, (1,)))(stacked)  # (acms, batch, N+1)
  entropy = -jnp.sum(jnp.where(dist > 0, dist * jnp.log(jnp.maximum(dist, 1e-30)), 0.0), axis=-1)
  return -jnp.mean(entropy / jnp.log(stacked.shape[-1]))


def diversity_loss(choices: Sequence[jax.Array], mask: jax.Array | None = None) -> jax.Array:
  """Minus twice the mean pairwise L1 distance between the samples' mean compute.

  Per sample, c = mean over ACMs, tokens and the N+1 slots of p_k * k (the mean
  chosen k divided by N+1); the mean runs over all ordered pairs, diagonal included.
  """
  stacked = jnp.stack(choices)
  k = jnp.arange(stacked.shape[-1], dtype=stacked.dtype)
  per_token = jnp.mean(stacked * k, axis=-1)  # (acms, batch, tokens)
  per_sample = jnp.mean(jax.vmap(lambda c: token_mean(c, mask, (1,)))(per_token), axis=0)  # (batch,)
  return -2.0 * jnp.mean(jnp.abs(per_sample[:, None] - per_sample[None, :]))


def classification_loss(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0,
                        mix_labels: jax.Array | None = None, mix_weight: jax.Array | None = None) -> jax.Array:
  """Mean cross-entropy against smoothed one-hot labels: logits (batch, classes), labels (batch,).
  For mixup / cutmix batches, the targets are mix_weight x labels + (1 - mix_weight) x mix_labels."""
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if mix_labels is not None:
    weight = mix_weight[:, None].astype(targets.dtype)
    targets = weight * targets + (1.0 - weight) * jax.nn.one_hot(mix_labels, logits.shape[-1])
  targets = optax.smooth_labels(targets, label_smoothing)
  return jnp.mean(optax.softmax_cross_entropy(logits, targets))
