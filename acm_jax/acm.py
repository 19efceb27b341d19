"""Adaptive Computation Modules: the functional core and a thin Flax shell.

An ACM holds N learners s_1..s_N whose outputs add up; choice k in 0..N runs the
first k of them: h(x, k) = sum_{n<=k} s_n(x) + bias(k). The learners are stored
as one pair of matrices so that "the first k learners" is "the first k*h hidden
units":

    w1: (dim, N*h)   b1: (N*h,)   w2: (N*h, dim)   b2: (N+1, dim) (optional)

Learner n (1-based) owns hidden columns [(n-1)*h, n*h). b2[k] is the output
bias carried by choice k on top of choice k-1, so choice k carries
b2[0] + ... + b2[k] (the public code's per-choice bias semantics).

Everything here is a pure function of arrays and parameter dicts; `ACM` and
`Gate` only create the parameters and call these functions.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import zlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.scipy.linalg  # noqa: F401  (block_diag)
import numpy as np

from acm_jax import inference

Params = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Activation:
  fn: Callable[[jax.Array], jax.Array]
  flops: int  # per element, roughly as XLA counts it (exact GELU's erf is a long polynomial)
  # (value, derivative) at x, both in x's dtype promoted to at least float32
  value_and_slope: Callable[[jax.Array], tuple[jax.Array, jax.Array]]
  # fn with a VJP that keeps one residual (`_saving_slope`), used inside scanned stacks of blocks
  in_scan: Callable[[jax.Array], jax.Array] | None = None


def _wide(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _gelu_value_and_slope(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x Phi(x) and its derivative Phi(x) + x phi(x) (Phi / phi: the standard normal cdf / pdf),
  the value written as jax.nn.gelu writes it (bit for bit the same in float32)."""
  x = _wide(x)
  erfc = jax.lax.erfc(-x * np.sqrt(0.5).astype(x.dtype))
  pdf = jnp.exp(-0.5 * x * x) * np.sqrt(0.5 / np.pi).astype(x.dtype)
  return 0.5 * x * erfc, 0.5 * erfc + x * pdf


def _gelu_tanh_value_and_slope(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x (1 + tanh u) / 2, u = c (x + a x^3), and its derivative (the value as jax.nn.gelu's)."""
  x = _wide(x)
  c, a = np.sqrt(2 / np.pi).astype(x.dtype), np.asarray(0.044715, x.dtype)
  t = jnp.tanh(c * (x + a * (x ** 3)))
  cdf = 0.5 * (1.0 + t)
  return x * cdf, cdf + 0.5 * x * (1 - t * t) * c * (1 + 3 * a * x * x)


def _saving_slope(value_and_slope: Callable[[jax.Array], tuple[jax.Array, jax.Array]]) -> Callable:
  """An activation whose VJP keeps one residual, its derivative at x, computed in the forward
  pass from the same evaluation as the value (rounded to x's dtype).

  For scanned stacks of blocks: there every residual the backward pass reads becomes a stacked
  buffer that the forward loop fills slice by slice, and autodiff of exact GELU keeps x and the
  erfc and exp terms. Measured on one H200 (2026-12-02, dense ViT-B/16 supervised step,
  bf16), against autodiff: scanned 27.63 -> 25.90 ms at batch 64 and 97.13 -> 92.70 ms at 256,
  but unrolled 20.70 -> 21.01 and 74.69 -> 76.12 (XLA's fusions of the unrolled graph keep
  fewer terms than the scan's residual stacks), so unrolled blocks keep jax.nn's activation.
  Keeping x and recomputing the derivative in the backward pass was slower still (erfc is a
  long polynomial: it made the backward pass's elementwise work compute-bound).
  """
  @jax.custom_vjp
  def activation(x):
    return value_and_slope(x)[0].astype(x.dtype)

  def forward(x):
    value, slope = value_and_slope(x)
    return value.astype(x.dtype), slope.astype(x.dtype)

  activation.defvjp(forward, lambda slope, g: ((_wide(g) * slope).astype(g.dtype),))
  return activation


# the one table of activations: learners, dense blocks and FLOP counts all read it
ACTIVATIONS: dict[str, Activation] = {
    "gelu": Activation(functools.partial(jax.nn.gelu, approximate=False), 64, _gelu_value_and_slope,
                       _saving_slope(_gelu_value_and_slope)),
    "gelu_tanh": Activation(functools.partial(jax.nn.gelu, approximate=True), 16, _gelu_tanh_value_and_slope,
                            _saving_slope(_gelu_tanh_value_and_slope)),
    "relu": Activation(jax.nn.relu, 1, lambda x: (jax.nn.relu(_wide(x)), (x > 0).astype(_wide(x).dtype))),
    "identity": Activation(lambda x: x, 0, lambda x: (_wide(x), jnp.ones_like(_wide(x)))),
}

GRAD_MODES = ("detach", "no_detach")
GUMBEL_MODES = ("gumbel", "gumbel_detached")  # training: hard straight-through Gumbel choices
# internal ACM mode: return the parameters the fused kernels take instead of an output, so
# that a caller can run several ACMs that read the same input in one group (`transformer.Attention`)
GROUP_INPUTS = "group_inputs"
# the k of the `force_k` in effect (None outside one), and inside a scanned stack of blocks the
# layer being traced (see `scanned_layer`)
_forced = contextvars.ContextVar("acm_force_k", default=None)
_scanned = contextvars.ContextVar("acm_scanned_layer", default=None)


def forcing() -> bool:
  """True inside `force_k` (grouped kernel calls must then not bypass the forced k)."""
  return _forced.get() is not None


def activation_entry(name: str) -> Activation:
  """The table's entry for activation `name`; a ValueError naming it when there is none."""
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The activation `name`; traced inside a scanned stack of blocks (`scanned_layer`), its
  variant whose VJP keeps one residual where the table has one (`_saving_slope`)."""
  act = activation_entry(name)
  return act.in_scan if act.in_scan is not None and _scanned.get() is not None else act.fn


def activation_flops(name: str) -> int:
  return activation_entry(name).flops


def num_learners_of(params: Params, learner_width: int) -> int:
  return params["w1"].shape[1] // learner_width


def choice_bias(params: Params, num_learners: int) -> jax.Array:
  """Cumulative output bias per choice, (N+1, dim); zeros without `b2`."""
  if "b2" in params:
    return jnp.cumsum(params["b2"], axis=0)
  return jnp.zeros((num_learners + 1, params["w2"].shape[1]), params["w2"].dtype)


def _hidden(params: Params, x: jax.Array, activation: str) -> jax.Array:
  return get_activation(activation)(x @ params["w1"] + params["b1"])


def in_input_dtype(params: Params, x: jax.Array) -> Params:
  """The learner parameters cast to x's dtype, as `ACM` computes: float32 master weights with
  bfloat16 activations run bfloat16 matmuls, not float32 ones."""
  return {name: value.astype(x.dtype) for name, value in params.items()}


def learner_outputs(params: Params, x: jax.Array, *, num_learners: int, activation: str = "gelu",
                    learners_first: bool = False, out_dtype=jnp.float32) -> jax.Array:
  """Every learner's output without output bias: (..., dim) -> (..., N, dim), or (N, ..., dim)
  with learners_first. The matmuls run in x's dtype (`in_input_dtype`) with float32
  accumulation; results in out_dtype (float32 by default)."""
  params = in_input_dtype(params, x)
  hidden = einops.rearrange(_hidden(params, x, activation), "... (n h) -> ... n h", n=num_learners)
  w2 = einops.rearrange(params["w2"], "(n h) d -> n h d", n=num_learners)
  spec = "...nh,nhd->n...d" if learners_first else "...nh,nhd->...nd"
  return jnp.einsum(spec, hidden, w2, preferred_element_type=out_dtype)


def prefix_outputs(params: Params, x: jax.Array, *, num_learners: int, activation: str = "gelu",
                   grad_mode: str = "detach") -> jax.Array:
  """Outputs for every choice k = 0..N in float32: (..., dim) -> (..., N+1, dim).

  grad_mode="detach": the value is the cumulative sum, but the gradient of choice
  k flows only into learner k (c_k = o_k + stop_gradient(c_k - o_k)), so learner
  k learns to correct the residual left by learners 1..k-1.
  grad_mode="no_detach": plain cumulative sum.
  """
  if grad_mode not in GRAD_MODES:
    raise ValueError(f"unknown grad_mode {grad_mode!r}; expected one of {GRAD_MODES}")
  params = in_input_dtype(params, x)
  outs = learner_outputs(params, x, num_learners=num_learners, activation=activation)
  outs = jnp.concatenate([jnp.zeros_like(outs[..., :1, :]), outs], axis=-2)
  cum = jnp.cumsum(outs, axis=-2)
  if grad_mode == "detach":
    cum = outs + jax.lax.stop_gradient(cum - outs)
  return cum + choice_bias(params, num_learners).astype(jnp.float32)


def learner_mask(k: jax.Array, num_learners: int, learner_width: int) -> jax.Array:
  """(...,) int choices -> (..., N*h) 0/1 mask of the hidden units that run."""
  on = jnp.arange(num_learners) < k[..., None]
  return jnp.repeat(on, learner_width, axis=-1)


def acm_apply(params: Params, x: jax.Array, k: jax.Array, *, num_learners: int,
              activation: str = "gelu") -> jax.Array:
  """Output for a per-token hard choice k: x (..., dim), k (...,) int -> (..., dim).

  Reference semantics (all hidden units computed, the unused ones masked); the
  fast sorted path with a kernel lives in `acm_jax.inference`.
  """
  width = params["w1"].shape[1] // num_learners
  hidden = _hidden(params, x, activation) * learner_mask(k, num_learners, width).astype(x.dtype)
  return hidden @ params["w2"] + choice_bias(params, num_learners)[k]


def _scaled_by_learner(hidden: jax.Array, weight: jax.Array) -> jax.Array:
  """hidden (..., N * width) with learner n's units multiplied by weight[..., n]."""
  split = einops.rearrange(hidden, "... (n h) -> ... n h", n=weight.shape[-1])
  return einops.rearrange(split * weight[..., None], "... n h -> ... (n h)")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def weighted_activation(pre: jax.Array, weight: jax.Array, activation: str) -> jax.Array:
  """act(pre) with learner n's hidden units scaled by weight[..., n]: pre (..., N * width),
  weight (..., N) -> (..., N * width).

  Its own VJP keeps only `pre` and `weight` and computes the activation and its derivative from
  one evaluation in the backward pass (XLA's VJP of the checkpointed formula evaluated exact
  GELU's erfc once more per ACM). The matmul that consumes the result keeps the result for its
  weight gradient, as the dense MLP keeps its activations.

  The value is the table's `value_and_slope` formula (in float32 or wider, rounded to pre's
  dtype): where the forward pass is rematerialised (`--remat=dots`, scanned blocks), its
  recomputation and the backward rule's evaluation are then one expression, which XLA computes
  once. With jax.nn.gelu's bfloat16 formula here the backward loop evaluated erfc twice per
  hidden unit (H200, 2026-12-03, benchmarks/RESULTS.md). Equal to jax.nn's activation in float32.
  """
  value = activation_entry(activation).value_and_slope(pre)[0].astype(pre.dtype)
  return _scaled_by_learner(value, weight)


def _weighted_activation_fwd(pre, weight, activation):
  return weighted_activation(pre, weight, activation), (pre, weight)


def _weighted_activation_bwd(activation, residuals, grad):
  pre, weight = residuals
  hidden, slope = ACTIVATIONS[activation].value_and_slope(pre)  # one evaluation for both
  split = lambda t: einops.rearrange(t, "... (n h) -> ... n h", n=weight.shape[-1])
  d_weight = jnp.einsum("...nh,...nh->...n", split(grad), split(hidden.astype(pre.dtype)),
                        preferred_element_type=jnp.promote_types(weight.dtype, jnp.float32))
  d_pre = (_wide(_scaled_by_learner(grad, weight)) * slope).astype(pre.dtype)
  return d_pre, d_weight.astype(weight.dtype)


weighted_activation.defvjp(_weighted_activation_fwd, _weighted_activation_bwd)


def reverse_cumsum(choice: jax.Array) -> jax.Array:
  """P(k >= j) for j = 0..N from a choice distribution (..., N+1); entry 0 is its total (1)."""
  return jnp.flip(jnp.cumsum(jnp.flip(choice, -1), -1), -1)


@jax.custom_vjp
def soft_choice_bias(b2: jax.Array, at_least: jax.Array) -> jax.Array:
  """sum_k choice_k * cumsum(b2)_k written as sum_j P(k >= j) * b2_j: b2 (N+1, dim),
  at_least (..., N+1) from `reverse_cumsum`.

  Forward: N+1 broadcast multiply-adds instead of a product with a contraction of N+1, which XLA
  runs as a skinny matmul. (Measured on an H200, 2026-12-02: appending at_least to the hidden units
  so that the second matmul adds the bias was faster at batch 64 but 6 ms slower per step at 256,
  the concatenation being a slow fusion.) Backward (its own VJP): both gradients as matmuls,
  at_least^T g over every token for b2 and g b2^T for at_least, where autodiff of the
  multiply-adds gave 2 (N+1) reductions over the (tokens, dim) gradient (H200, 2026-12-03, ViT-B/16
  mlp_qkvo finetune step, scanned, `--remat=dots`: 116.99 -> 115.76 ms at batch 256, 36.21 -> 35.65
  ms at 64; benchmarks/RESULTS.md).
  """
  total = at_least[..., :1] * b2[0]
  for j in range(1, b2.shape[0]):
    total = total + at_least[..., j:j + 1] * b2[j]
  return total


def _soft_choice_bias_fwd(b2, at_least):
  return soft_choice_bias(b2, at_least), (b2, at_least)


def over_tokens(a: jax.Array, b: jax.Array, precision=None) -> jax.Array:
  """a^T b summed over the tokens of a (..., m) and b (..., n): (m, n) in float32 or wider.

  For (batch, ..., length, .) inputs, one product per example over its length, summed over the
  examples. One product over all batch x length tokens made XLA pick a split-K Triton GEMM that
  pads the token axis (12,608 -> 12,800 at batch 64) with a copy of its operand, for every such
  weight gradient of every ACM and layer (H200, ViT-B/16 mlp_qkvo finetune step, scanned,
  --remat=dots: the choice bias' b2 gradient 34.39 -> 33.51 ms at batch 64 and 114.34 -> 111.72 at
  256, the gates' kernels 33.54 -> 33.1 at 64; benchmarks/RESULTS.md, 2026-12-03 (f))."""
  wide = jnp.promote_types(jnp.result_type(a, b), jnp.float32)
  if a.ndim < 3:
    lead = tuple(range(a.ndim - 1))
    return jax.lax.dot_general(a, b, ((lead, lead), ((), ())), precision=precision, preferred_element_type=wide)
  batch, length = tuple(range(a.ndim - 2)), a.ndim - 2
  per_example = jax.lax.dot_general(a, b, (((length,), (length,)), (batch, batch)), precision=precision,
                                    preferred_element_type=wide)
  return jnp.sum(per_example, axis=batch)


_soft_bias_kernel = contextvars.ContextVar("acm_soft_bias_kernel", default=None)


@contextlib.contextmanager
def _kernel_switch(var: contextvars.ContextVar, name: str, enabled) -> Iterator[None]:
  if enabled not in (None, True, False, "interpret"):
    raise ValueError(f"{name}({enabled!r}): expected None, True, False or 'interpret'")
  token = var.set(enabled)
  try:
    yield
  finally:
    var.reset(token)


def _kernel_placement(var: contextvars.ContextVar, x: jax.Array) -> tuple[bool, tuple[str, ...], int] | None:
  """(interpret, batch axes, tokens per shard) where a training kernel switched by `var` may run
  on x (batch, ..., dim), before its own shape checks; None: XLA's path."""
  asked = var.get()
  if asked is False or x.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32) or x.ndim < 2:
    return None
  if asked != "interpret" and jax.default_backend() != "gpu":
    return None
  split = inference.batch_split(x)  # None: a batch the mesh cannot split evenly
  return None if split is None else (asked == "interpret", split[0], x.size // x.shape[-1] // split[1])


@contextlib.contextmanager
def soft_bias_kernel(enabled: bool | str | None) -> Iterator[None]:
  """Within the context the soft choice bias' backward runs as one Pallas kernel that reads the
  output gradient once (`pallas_kernels.soft_bias`) (True) or as two XLA products (False); None:
  the default, the kernel. Either way the kernel runs only on a GPU; under a mesh that splits the
  batch every device runs it on its shard (a batch the mesh cannot split evenly takes the XLA
  products). "interpret" runs it in Pallas' interpret mode on any backend (for tests).

  Measured on an H200 (ViT-B/16 mlp_qkvo finetune step, scanned, `--remat=dots`, two pairs of
  processes, 2026-12-04): 111.38 / 111.17 -> 110.73 / 110.63 ms at batch 256, 33.26 / 33.20 ->
  33.11 / 33.17 ms at 64 (benchmarks/RESULTS.md)."""
  with _kernel_switch(_soft_bias_kernel, "soft_bias_kernel", enabled):
    yield


def _soft_bias_kernel_mode(grad: jax.Array, b2: jax.Array) -> tuple[bool, tuple[str, ...]] | None:
  """(interpret, batch axes) where the soft choice bias' backward takes the kernel, else None."""
  from pallas_kernels import soft_bias
  place = _kernel_placement(_soft_bias_kernel, grad)
  if place is None or soft_bias.supports(place[2], grad.shape[-1], b2.shape[0]) is not None:
    return None
  return place[:2]


def _soft_choice_bias_bwd(residuals, grad):
  b2, at_least = residuals
  wide = jnp.promote_types(grad.dtype, jnp.float32)
  mode = _soft_bias_kernel_mode(grad, b2)
  if mode is not None:
    from pallas_kernels import soft_bias
    interpret, axes = mode

    def local(g, at, b2):
      d_at, d_b2 = soft_bias.soft_bias_grads(g.reshape(-1, g.shape[-1]), at.reshape(-1, at.shape[-1]), b2,
                                             interpret=interpret)
      return d_at.reshape(at.shape), d_b2[None]

    d_at, d_b2 = inference.per_shard(local, axes, (True, True, False), (True, True))(grad, at_least, b2)
    return jnp.sum(d_b2, axis=0).astype(b2.dtype), d_at.astype(at_least.dtype)
  d_b2 = over_tokens(at_least.astype(grad.dtype), grad)
  d_at_least = jax.lax.dot_general(grad, b2.astype(grad.dtype), (((grad.ndim - 1,), (1,)), ((), ())),
                                   preferred_element_type=wide)
  return d_b2.astype(b2.dtype), d_at_least.astype(at_least.dtype)


soft_choice_bias.defvjp(_soft_choice_bias_fwd, _soft_choice_bias_bwd)


_act_kernel = contextvars.ContextVar("acm_act_kernel", default=None)


@contextlib.contextmanager
def act_kernel(enabled: bool | str | None) -> Iterator[None]:
  """Within the context `acm_apply_soft` runs its weighted activation (GELU, tanh GELU or ReLU
  learners) as the Pallas kernels of `pallas_kernels.weighted_act`, one pass forward and one
  backward (True), or as XLA fusions (False); None: the default, the kernels. Either way the
  kernels run only on a GPU and for token counts divisible by 16 (per batch shard: under a mesh
  that splits the batch every device runs them on its shard); elsewhere the XLA path runs.
  "interpret" runs them in Pallas' interpret mode on any backend (for tests)."""
  with _kernel_switch(_act_kernel, "act_kernel", enabled):
    yield


def _act_kernel_mode(x: jax.Array, params: Params, num_learners: int, activation: str
                     ) -> tuple[bool, tuple[str, ...]] | None:
  """(interpret, batch axes) where `acm_apply_soft` takes the kernel path, else None."""
  from pallas_kernels import weighted_act
  place = _kernel_placement(_act_kernel, x)
  if place is None or weighted_act.supports(place[2], params["w1"].shape[1], num_learners, activation) is not None:
    return None
  return place[:2]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _weighted_down(pre: jax.Array, b1: jax.Array, weight: jax.Array, w2: jax.Array, activation: str,
                   interpret: bool, axes: tuple[str, ...]) -> jax.Array:
  """(act(pre + b1) with learner n's units times weight[..., n]) @ w2 by the kernels of
  `pallas_kernels.weighted_act`: pre (..., N*h) without its bias, weight (..., N); per batch shard
  over the mesh axes `axes` (none: one call)."""
  return _weighted_down_fwd(pre, b1, weight, w2, activation, interpret, axes)[0]


def _weighted_down_fwd(pre, b1, weight, w2, activation, interpret, axes):
  from pallas_kernels import weighted_act

  def local(pre, b1, weight):
    hidden = weighted_act.forward(pre.reshape(-1, pre.shape[-1]), b1, weight.reshape(-1, weight.shape[-1]).T,
                                  activation=activation, interpret=interpret)
    return hidden.reshape(pre.shape)

  hidden = inference.per_shard(local, axes, (True, False, True), True)(pre, b1, weight)
  return hidden @ w2, (pre, b1, weight, w2)


def _weighted_down_bwd(activation, interpret, axes, residuals, grad):
  from pallas_kernels import weighted_act
  pre, b1, weight, w2 = residuals

  def local(pre, b1, weight, d_hidden):
    hidden, d_pre, d_wt, d_b1 = weighted_act.backward(
        pre.reshape(-1, pre.shape[-1]), b1, weight.reshape(-1, weight.shape[-1]).T,
        d_hidden.reshape(-1, d_hidden.shape[-1]), activation=activation, interpret=interpret)
    return hidden.reshape(pre.shape), d_pre.reshape(pre.shape), d_wt.T.reshape(weight.shape), d_b1[None]

  d_hidden = grad @ w2.T.astype(grad.dtype)
  hidden, d_pre, d_weight, d_b1 = inference.per_shard(local, axes, (True, False, True, True), (True,) * 4)(
      pre, b1, weight, d_hidden)
  d_w2 = jax.lax.dot_general(hidden.reshape(-1, hidden.shape[-1]), grad.reshape(-1, grad.shape[-1]),
                             (((0,), (0,)), ((), ())), preferred_element_type=jnp.promote_types(w2.dtype, jnp.float32))
  return d_pre, jnp.sum(d_b1, axis=0).astype(b1.dtype), d_weight.astype(weight.dtype), d_w2.astype(w2.dtype)


_weighted_down.defvjp(_weighted_down_fwd, _weighted_down_bwd)


def acm_apply_soft(params: Params, x: jax.Array, choice: jax.Array, *, num_learners: int,
                   activation: str = "gelu") -> jax.Array:
  """Output under a (relaxed or one-hot) choice distribution: choice (..., N+1).

  Equals sum_k choice_k * h(x, k) in one pass: learner n is weighted by
  P(k >= n) = sum_{k>=n} choice_k, which carries the gate's gradient. On a GPU the weighted
  activation runs as Pallas kernels (`act_kernel`).
  """
  at_least = reverse_cumsum(choice).astype(x.dtype)
  mode = _act_kernel_mode(x, params, num_learners, activation)
  if mode is not None:
    out = _weighted_down(x @ params["w1"], params["b1"], at_least[..., 1:], params["w2"], activation, *mode)
  else:
    hidden = weighted_activation(x @ params["w1"] + params["b1"], at_least[..., 1:], activation)
    out = hidden @ params["w2"]
  if "b2" in params:
    out = out + soft_choice_bias(params["b2"], at_least)
  return out


def acm_apply_soft_group(params: Sequence[Params], x: jax.Array, choices: Sequence[jax.Array], *,
                         num_learners: int, activation: str = "gelu") -> list[jax.Array]:
  """`acm_apply_soft` of G ACMs that read the same x (the q/k/v projections), their up
  projections as one matmul: x @ [w1_1 | ... | w1_G]. The backward pass then takes x's
  gradient from one matmul over the G ACMs' hidden gradients (instead of G products summed)
  and the w1 gradients from one. Each ACM's down projection and output bias stay its own.
  Equal to G `acm_apply_soft` calls up to float summation order."""
  if len(params) != len(choices):
    raise ValueError(f"{len(params)} ACMs but {len(choices)} choice distributions")
  at_least = [reverse_cumsum(c).astype(x.dtype) for c in choices]
  widths = [p["w1"].shape[1] for p in params]
  pre = x @ jnp.concatenate([p["w1"] for p in params], axis=1) + jnp.concatenate([p["b1"] for p in params])
  outs, start = [], 0
  for p, a, width in zip(params, at_least, widths):
    # the weighted activation reads its ACM's columns (a slice XLA fuses into it); the backward
    # concatenates the G hidden gradients for the two grouped products
    hidden = weighted_activation(pre[..., start:start + width], a[..., 1:], activation)
    out = hidden @ p["w2"]
    if "b2" in p:
      out = out + soft_choice_bias(p["b2"], a)
    outs.append(out)
    start += width
  return outs


def gumbel_choices(logits: jax.Array, *, mode: str, temperature: float | jax.Array, rng: jax.Array | None
                   ) -> tuple[jax.Array, jax.Array]:
  """(the choices an ACM's soft output is weighted by, the sown one-hot choices) in a Gumbel mode:
  straight-through Gumbel-Softmax of the shifted logits; mode "gumbel_detached" stops the output's
  gradient to the gate."""
  if rng is None:
    raise ValueError(f"mode={mode!r} needs an rng (a 'gumbel' rng stream in Flax)")
  choice = gumbel_softmax_st(rng, logits, temperature)
  return (jax.lax.stop_gradient(choice) if mode == "gumbel_detached" else choice), choice


def mask_choices(logits: jax.Array, min_choice: int) -> jax.Array:
  """Removes choices below `min_choice` (attention ACMs never skip)."""
  if min_choice == 0:
    return logits
  allowed = jnp.arange(logits.shape[-1]) >= min_choice
  return jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)


def init_without_kernels(module, rng: jax.Array, *inputs, **kwargs):
  """`module.init` traced in gumbel mode: the params of any mode, and no inference kernel in the trace.
  Shape-only and host-side inits use it: an init traced in argmax mode on a GPU would trace (and, on
  concrete host inputs, compile) the fused kernels only to throw their outputs away."""
  return module.init({"params": rng, "gumbel": rng}, *inputs, mode="gumbel", **kwargs)


def gumbel_softmax_st(rng: jax.Array, logits: jax.Array, temperature: float | jax.Array) -> jax.Array:
  """Hard Gumbel-Softmax, straight-through: one-hot forward, softmax gradient."""
  gumbel = jax.random.gumbel(rng, logits.shape, logits.dtype)
  soft = jax.nn.softmax((logits + gumbel) / temperature, axis=-1)
  hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), logits.shape[-1], dtype=soft.dtype)
  return soft + jax.lax.stop_gradient(hard - soft)


def learner_flops(dim: int, learner_width: int, activation: str = "gelu") -> int:
  """FLOPs per token of one learner: two matmuls and the hidden bias."""
  del activation  # activation FLOPs are not counted, as for the dense block
  return 4 * dim * learner_width + learner_width


def compute_fraction(mean_k: Sequence, learner_costs: Sequence[float], num_learners: Sequence[int]):
  """C: executed learner cost over the cost of running every learner, in [0, 1].

  One entry per ACM: its mean chosen k (a number or an array, e.g. per example),
  its learner cost and its N. ACMs are weighted by their learner cost.
  """
  spent = sum(k * c for k, c in zip(mean_k, learner_costs, strict=True))
  return spent / sum(n * c for n, c in zip(num_learners, learner_costs, strict=True))


BUDGET_FILM = "budget_film"  # name of a budget-conditioned gate's FiLM layer
BUDGET_HARMONICS = 3


def budget_features(budget: float | jax.Array) -> jax.Array:
  """A fixed embedding of a budget: (b, sin(j pi b), cos(j pi b) for j = 1..3), shape (7,) for a
  scalar, (..., 7) for an array of budgets. The sinusoids let a linear layer on top respond
  non-linearly across (0, 1]."""
  b = jnp.asarray(budget, jnp.float32)[..., None]
  j = jnp.arange(1, BUDGET_HARMONICS + 1, dtype=jnp.float32) * jnp.pi * b
  return jnp.concatenate([b, jnp.sin(j), jnp.cos(j)], axis=-1)


def budget_film(film: Params, budget: float | jax.Array, dim: int) -> tuple[jax.Array, jax.Array]:
  """(scale, shift), each (dim,) float32, that a budget-conditioned gate applies to its input:
  x -> x * (1 + scale) + shift. film: the FiLM layer's {"kernel": (7, 2 dim), "bias": (2 dim,)}."""
  out = budget_features(budget) @ film["kernel"].astype(jnp.float32) + film["bias"].astype(jnp.float32)
  return out[:dim], out[dim:]


def linear_gate_at_budget(gate: Params, budget: float | jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """A linear gate's (kernel (dim, N+1), bias (N+1,)) with its budget conditioning folded in:
  (x (1 + s) + t) W + c = x ((1 + s)[:, None] W) + (t W + c), so one budget is a plain linear gate
  (what the fused kernels take). gate: the Gate's params; budget None: the gate unconditioned."""
  kernel, bias = gate["out"]["kernel"], gate["out"]["bias"]
  if budget is None or BUDGET_FILM not in gate:
    return kernel, bias
  scale, shift = budget_film(gate[BUDGET_FILM], budget, kernel.shape[0])
  folded = (1.0 + scale)[:, None] * kernel.astype(jnp.float32)
  return folded.astype(kernel.dtype), (shift @ kernel.astype(jnp.float32) + bias).astype(bias.dtype)


def per_example_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
  """`jax.lax.dot_general` for `nn.Dense` (and `group_gate_logits`) whose kernel gradient over
  tokens (batch, ..., length, d_in) is `over_tokens`: one product per example, summed (a gate's
  kernel has a few columns, the case where one product over all tokens got its input padded).
  Other dimension numbers, and inputs of fewer than three axes, go to `jax.lax.dot_general`."""
  (contract, batch) = dimension_numbers
  as_dense = (tuple(map(tuple, contract)), tuple(map(tuple, batch))) == (((lhs.ndim - 1,), (0,)), ((), ()))
  if lhs.ndim < 3 or rhs.ndim != 2 or not as_dense or kwargs:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)
  return _dense_per_example(lhs, rhs, precision, preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense_per_example(x, w, precision, preferred_element_type):
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=preferred_element_type)


def _dense_per_example_fwd(x, w, precision, preferred_element_type):
  return _dense_per_example(x, w, precision, preferred_element_type), (x, w)


def _dense_per_example_bwd(precision, preferred_element_type, residuals, grad):
  del preferred_element_type
  x, w = residuals
  wide = jnp.promote_types(jnp.result_type(x, w), jnp.float32)
  d_x = jax.lax.dot_general(grad, w, (((grad.ndim - 1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=wide)
  return d_x.astype(x.dtype), over_tokens(x, grad.astype(x.dtype), precision).astype(w.dtype)


_dense_per_example.defvjp(_dense_per_example_fwd, _dense_per_example_bwd)


class Gate(nn.Module):
  """Token -> N+1 choice logits: linear (depth 1) or an MLP of `depth` layers.

  budget_conditioning: the gate also reads the target budget, a scalar in (0, 1], through a
  FiLM layer on its input (`budget_film`). The layer starts at zero, so a conditioned gate
  begins as the plain one; called with budget None it skips the layer (the gate as phase 2
  trained it, which needs no FiLM parameters outside `init`). A (batch,) array gives each
  example of x (batch, ..., dim) its own budget (finetuning with budget groups).
  """
  num_choices: int
  depth: int = 1
  hidden: int = 128
  budget_conditioning: bool = False
  dtype: Any = None  # computation dtype of the layers (None: promote input and float32 params)

  @nn.compact
  def __call__(self, x: jax.Array, budget: float | jax.Array | None = None) -> jax.Array:
    if budget is not None and not self.budget_conditioning:
      raise ValueError("a budget was given to a gate that is not budget-conditioned (budget_conditioning=False)")
    if self.budget_conditioning and (budget is not None or self.is_initializing()):
      film = nn.Dense(2 * x.shape[-1], kernel_init=nn.initializers.zeros, name=BUDGET_FILM)
      budget_array = jnp.asarray(0.5 if budget is None else budget)
      if budget_array.ndim > 1 or (budget_array.ndim == 1 and (x.ndim < 2 or budget_array.shape[0] != x.shape[0])):
        raise ValueError(f"a gate's budget is a scalar or one per example, shape ({x.shape[0]},) for x of shape "
                         f"{x.shape}; got shape {budget_array.shape}")
      scale, shift = jnp.split(film(budget_features(budget_array)), 2, axis=-1)
      if budget_array.ndim:  # (batch, dim) -> (batch, 1, ..., dim)
        scale, shift = (v.reshape(v.shape[:1] + (1,) * (x.ndim - 2) + v.shape[1:]) for v in (scale, shift))
      if budget is not None:
        x = x * (1.0 + scale).astype(x.dtype) + shift.astype(x.dtype)
    dense = functools.partial(nn.Dense, dtype=self.dtype, dot_general=per_example_dot_general)
    for i in range(self.depth - 1):
      x = nn.relu(dense(self.hidden, name=f"hidden_{i}")(x))
    return dense(self.num_choices, name="out")(x)


def gate_flops(dim: int, num_choices: int, depth: int, hidden: int) -> int:
  if depth == 1:
    return 2 * dim * num_choices
  return 2 * dim * hidden + 2 * hidden * hidden * (depth - 2) + 2 * hidden * num_choices


class ACM(nn.Module):
  """Flax shell: owns the learner and gate parameters, delegates the math.

  Modes (`mode` argument of __call__):
    "full":   k = N for every token (equals the replaced block after `acmize`).
    "fixed":  k = `fixed_k` for every token (the static-width baseline), or
              per token when `fixed_k` is an int array broadcastable to
              x.shape[:-1] (see `force_k`).
    "argmax": the gate's argmax (inference). With impl "pallas" (or "auto" on a
              GPU) gate, argmax, token sort and learners run in the fused
              kernels of `pallas_kernels.acm_fused`; "triton" runs the XLA gate
              and sort and the jax-triton learner kernel; "xla" masks a dense pass.
    "gumbel": hard straight-through Gumbel-Softmax (training; rng "gumbel").
    "gumbel_detached": the same choices, but the output takes no gradient to
              the gate (the public code's phase 3, where only the auxiliary
              losses on the sown choices train the gates).
  The chosen one-hot choices (batch, tokens, N+1) are sown into the "acm"
  collection as "choice", and the gate logits as "logits", when mutable.
  `cost_shift` lowers the logit of choice k by cost_shift * k * learner_width / dim
  (k learners' cost in units of a dim x dim matmul): one scalar moves every ACM
  of a model toward less (> 0) or more (< 0) compute without retraining.
  `rng`, when given, replaces the "gumbel" rng stream: the Gumbel noise then comes from
  `rng` and the module's name (a scanned stack of blocks passes each layer's key).
  `budget`: the target budget a budget-conditioned gate reads (see `Gate`; `with_budget`
  passes it to every ACM of a model without changing the model's own call).
  `group=True` (Gumbel modes): return {params, gate, rng} instead of an output, for a caller that
  runs the gates of several ACMs reading the same x as one (`group_gate_logits`,
  `transformer.Attention` under `ACMConfig.group_qkv_gates`); that caller sows logits and choices.
  `prenorm`: (z, scale, bias, eps) when x is LayerNorm(z) (a pre-LN block): mode "argmax" on the
  fused path with a linear gate then hands z and the LayerNorm to the kernels, which fuse it
  (`acm_fused.acm_group`'s `norm`), and x itself is left unused; elsewhere it is ignored.
  `residual`: an array like x added to the output (a block's skip connection): by the fused
  kernels in mode "argmax" (`acm_group`'s `residual`), else after the ACM, as the block would.
  """
  dim: int
  num_learners: int
  learner_width: int
  activation: str = "gelu"
  output_bias: bool = True
  gate_depth: int = 1
  gate_hidden: int = 128
  min_choice: int = 0
  impl: str = "xla"
  budget_conditioning: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, mode: str = "argmax", fixed_k: int | None = None,
               temperature: float = 1.0, cost_shift: float | jax.Array = 0.0,
               rng: jax.Array | None = None, budget: float | jax.Array | None = None,
               group: bool = False, prenorm: tuple | None = None,
               residual: jax.Array | None = None) -> jax.Array | dict:
    n, width = self.num_learners, self.learner_width
    forced = forced_choices("/".join(self.scope.path), n, x.shape[:-1])
    if forced is not None:
      mode, fixed_k = "fixed", forced
    params = {
        "w1": self.param("w1", nn.initializers.lecun_normal(), (self.dim, n * width)),
        "b1": self.param("b1", nn.initializers.zeros, (n * width,)),
        "w2": self.param("w2", nn.initializers.lecun_normal(), (n * width, self.dim)),
    }
    if self.output_bias:
      params["b2"] = self.param("b2", nn.initializers.zeros, (n + 1, self.dim))
    params = {name: value.astype(x.dtype) for name, value in params.items()}
    if mode in GUMBEL_MODES:
      # training: the gate computes in the activations' dtype, as the learners do (a float32 gate
      # over bfloat16 activations writes a float32 copy of x and its float32 input gradient,
      # per ACM), and keeps its few hidden activations for the backward pass
      gate = Gate(n + 1, self.gate_depth, self.gate_hidden, self.budget_conditioning, x.dtype, name="gate")
    else:
      # inference and the other modes: float32 logits, the precision the fused kernels' own gate
      # and the phase-2 gate training use; rematerialised, which spares storing the float32 copy
      # of x where a forward is differentiated (per layer, when scanned)
      gate = nn.remat(Gate, prevent_cse=False)(n + 1, self.gate_depth, self.gate_hidden, self.budget_conditioning,
                                               name="gate")
    raw_logits = gate(x, budget)  # unused (and removed by XLA) where the fused kernel computes the gate itself
    if mode == GROUP_INPUTS or (mode == "argmax" and fused_impl(self.impl)):
      # the gate, the choice and the learners in the fused kernels (`inference.acm_group_apply`)
      self.sow("acm", "logits", shifted_logits(raw_logits, n, width / self.dim, cost_shift, self.min_choice))
      spec = dict(params)
      if self.gate_depth == 1:
        spec["gate"] = linear_gate_at_budget(gate.variables["params"], budget)
      else:
        spec["logits"] = raw_logits
      if mode == GROUP_INPUTS:
        return spec
      inputs, norm = fused_inputs(x, prenorm, [spec])
      (y,), k = inference.acm_group_apply(inputs, [spec], num_learners=n, activation=self.activation,
                                          min_choice=self.min_choice, cost_shift=cost_shift, norm=norm,
                                          residual=residual)
      self.sow("acm", "choice", jax.nn.one_hot(k[0], n + 1, dtype=jnp.float32))
      return y
    if mode in GUMBEL_MODES:
      rng = self.make_rng("gumbel") if rng is None else jax.random.fold_in(rng, zlib.crc32(self.name.encode()) >> 1)
    if group:
      # what a caller running several ACMs that read x as one group needs (`transformer.Attention`):
      # the learners, the gate's parameters and this ACM's Gumbel key; its logits and choices are
      # sown by the caller
      if mode not in GUMBEL_MODES or self.budget_conditioning:
        raise ValueError(f"group=True serves the Gumbel modes of gates without budget conditioning, not "
                         f"mode={mode!r} (budget_conditioning={self.budget_conditioning})")
      return {"params": params, "gate": gate.variables["params"], "rng": rng}
    y, logits, choice = gated_apply(params, x, raw_logits, num_learners=n, activation=self.activation,
                                    min_choice=self.min_choice, mode=mode, fixed_k=fixed_k,
                                    temperature=temperature, cost_shift=cost_shift, rng=rng, impl=self.impl)
    self.sow("acm", "logits", logits)
    self.sow("acm", "choice", choice)
    return y if residual is None else residual + y


def fused_inputs(x: jax.Array, prenorm: tuple | None, specs: Sequence[dict]) -> tuple[jax.Array, tuple | None]:
  """(input, norm) for `inference.acm_group_apply` of a group reading x: the un-normalised z and its
  LayerNorm (scale, bias, eps) when the block passed `prenorm` = (z, scale, bias, eps) and every gate of
  the group is linear (a deep gate's logits come from the normalised x anyway), else (x, None)."""
  if prenorm is None or not all("gate" in spec for spec in specs):
    return x, None
  return prenorm[0], tuple(prenorm[1:])


def group_gate_logits(gates: Sequence[Params], x: jax.Array) -> list[jax.Array]:
  """The raw logits of several `Gate`s (same depth, no budget conditioning) that read the same x,
  computed as one gate in x's dtype: first layers side by side, deeper layers block-diagonal.

  Equal to calling each gate with dtype=x.dtype (zero blocks add exact zeros), in a third of the
  kernels for three gates, forward and backward: one (dim, 3 hidden) matmul and one input gradient
  instead of three of each, and a third of the small ones after them.
  """
  layers = [f"hidden_{i}" for i in range(len(gates[0]) - 1)] + ["out"]
  if any(sorted(g) != sorted(layers) for g in gates):
    raise ValueError(f"grouped gates need the same layers without budget conditioning; got "
                     f"{[sorted(g) for g in gates]}")
  h = x
  for i, name in enumerate(layers):
    kernels = [g[name]["kernel"].astype(x.dtype) for g in gates]
    kernel = jnp.concatenate(kernels, axis=1) if i == 0 else jax.scipy.linalg.block_diag(*kernels)
    h = per_example_dot_general(h, kernel, (((h.ndim - 1,), (0,)), ((), ()))) \
        + jnp.concatenate([g[name]["bias"] for g in gates]).astype(x.dtype)
    if name != "out":
      h = nn.relu(h)
  return jnp.split(h, len(gates), axis=-1)


def shifted_logits(logits: jax.Array, num_learners: int, width_over_dim: float, cost_shift: float | jax.Array,
                   min_choice: int) -> jax.Array:
  """Raw gate logits (..., N+1) -> float32, choice k lowered by cost_shift * k * h / d, choices
  below min_choice removed."""
  relative_cost = jnp.arange(num_learners + 1, dtype=jnp.float32) * width_over_dim
  return mask_choices(logits.astype(jnp.float32) - cost_shift * relative_cost, min_choice)


def gated_apply(params: Params, x: jax.Array, logits: jax.Array, *, num_learners: int, activation: str,
                min_choice: int = 0, mode: str = "argmax", fixed_k: int | jax.Array | None = None,
                temperature: float = 1.0, cost_shift: float | jax.Array = 0.0, rng: jax.Array | None = None,
                impl: str = "xla") -> tuple[jax.Array, jax.Array, jax.Array]:
  """An ACM's output under its gate in one of `ACM`'s modes, as a pure function.

  x: (..., dim); logits: the gate's raw (..., N+1) logits; rng: for mode="gumbel".
  Returns (output (..., dim_out), the shifted and masked logits, one-hot choices (..., N+1)).
  """
  n = num_learners
  width = params["w1"].shape[1] // n
  logits = shifted_logits(logits, n, width / x.shape[-1], cost_shift, min_choice)
  kwargs = dict(num_learners=n, activation=activation)
  if mode in GUMBEL_MODES:
    applied, choice = gumbel_choices(logits, mode=mode, temperature=temperature, rng=rng)
    return acm_apply_soft(params, x, applied, **kwargs), logits, choice
  if mode == "full":
    k = jnp.full(x.shape[:-1], n, jnp.int32)
  elif mode == "fixed":
    k = _fixed_choices(fixed_k, n, x.shape[:-1])
  elif mode == "argmax":
    k = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  else:
    raise ValueError(f"unknown ACM mode {mode!r}; expected gumbel, gumbel_detached, full, fixed or argmax")
  choice = jax.nn.one_hot(k, n + 1, dtype=jnp.float32)
  if mode != "argmax" or inference.resolve_impl(impl) == "xla":
    return acm_apply(params, x, k, **kwargs), logits, choice
  y = inference.acm_apply_sorted_per_shard(params, x, k, choice_bias(params, n).astype(x.dtype), impl=impl, **kwargs)
  return y, logits, choice

def fused_impl(impl: str) -> bool:
  """Whether an ACM of this impl runs mode "argmax" on the fused Pallas path (gate inside
  the kernels): impl "pallas", or "auto" on a GPU."""
  return impl == "pallas" or (impl == "auto" and jax.default_backend() == "gpu")


def _fixed_choices(fixed_k: int | jax.Array | None, num_learners: int, shape: tuple[int, ...]) -> jax.Array:
  """`fixed_k` (an int, or int array broadcastable to `shape`) as (shape) int32 choices.
  Values are checked where they are concrete; a traced map is the caller's to keep in 0..N."""
  if fixed_k is None:
    raise ValueError(f"mode='fixed' needs fixed_k in 0..{num_learners}, got None")
  k = jnp.asarray(fixed_k)
  if not jnp.issubdtype(k.dtype, jnp.integer):
    raise ValueError(f"fixed_k must be integer, got dtype {k.dtype}")
  try:
    concrete = np.asarray(fixed_k)
  except jax.errors.TracerArrayConversionError:
    concrete = None  # traced: not checkable here
  if concrete is not None and concrete.size and (concrete.min() < 0 or concrete.max() > num_learners):
    raise ValueError(f"mode='fixed' needs fixed_k in 0..{num_learners}, got values {concrete.min()}..{concrete.max()}")
  try:
    return jnp.broadcast_to(k, shape).astype(jnp.int32)
  except ValueError:
    raise ValueError(f"fixed_k of shape {k.shape} does not broadcast to the tokens' shape {shape}") from None


@contextlib.contextmanager
def force_k(k: int | jax.Array | Mapping[str, int | jax.Array] | Callable[[str], int | jax.Array]) -> Iterator[None]:
  """Within the context every ACM runs with the given choices instead of its gate.

  k: an int, or an int array broadcastable to each ACM's token shape (e.g.
  (batch, tokens)), values in 0..N; or each ACM's own, as a mapping from its '/'-joined
  module path (e.g. "block_0/mlp", as the keys of the sown "acm" collection) or a function
  of that path. Inside a scanned stack of blocks the paths are the unrolled ones
  ("block_3/mlp", not "blocks/mlp"), so one per-layer map serves both layouts. Every ACM
  obeys it: `ACM`, and those of `acm_jax.any_flax` (Linen and NNX). The calls keep their
  other arguments and sow their choices as usual, so a model's eval statistics (k
  histograms, compute) describe the forced allocation. For analysis, e.g. "the same
  learners with k from a voice-activity oracle": a model's own `__call__` needs no change.
  """
  token = _forced.set(k)
  try:
    yield
  finally:
    _forced.reset(token)


@contextlib.contextmanager
def scanned_layer(stack_path: str, layer: jax.Array, layer_paths: Sequence[str]) -> Iterator[None]:
  """Marks the trace of one layer of a scanned stack of blocks: the stack's module path,
  the traced layer index and every layer's unrolled path, so that `force_k` finds the
  per-layer choices of an ACM at `stack_path`/... under `layer_paths[i]`/..."""
  token = _scanned.set((stack_path, layer, tuple(layer_paths)))
  try:
    yield
  finally:
    _scanned.reset(token)


def unrolled_paths(path: str) -> tuple[tuple[str, ...], jax.Array | None]:
  """The unrolled module paths that the ACM at module path `path` stands for, and the traced
  layer index: ((path,), None) outside a scanned stack of blocks; inside one (`scanned_layer`),
  one module serves every layer, so every layer's path ("blocks/mlp" -> "block_0/mlp", ...)."""
  scanned = _scanned.get()
  if scanned is None or not path.startswith(scanned[0] + "/"):
    return (path,), None
  stack_path, layer, layer_paths = scanned
  return tuple(prefix + path[len(stack_path):] for prefix in layer_paths), layer


def forced_choices(path: str, num_learners: int, shape: tuple[int, ...]) -> jax.Array | None:
  """The (shape) int32 choices that `force_k` sets for the ACM at module path `path`; None
  outside `force_k`."""
  k = _forced.get()
  if k is None:
    return None
  paths, layer = unrolled_paths(path)
  if (isinstance(k, Mapping) or callable(k)) and layer is not None:
    # each layer's choices under its unrolled path, picked by the traced index
    return jnp.stack([_fixed_choices(_choice_of(k, p), num_learners, shape) for p in paths])[layer]
  return _fixed_choices(_choice_of(k, path), num_learners, shape)


def _choice_of(k, path: str):
  if isinstance(k, Mapping):
    if path not in k:
      raise KeyError(f"force_k got no choices for the ACM {path!r}; it has {sorted(k)[:8]}")
    return k[path]
  return k(path) if callable(k) else k


@contextlib.contextmanager
def with_budget(budget: float | jax.Array) -> Iterator[None]:
  """Within the context every `ACM` call gets `budget` (a scalar, traceable) for its gate.
  Only budget-conditioned ACMs accept one (see `Gate`)."""
  def intercept(next_fun, args, kwargs, context):
    if isinstance(context.module, ACM) and context.method_name == "__call__":
      kwargs = {**kwargs, "budget": budget}
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(intercept):
    yield


@dataclasses.dataclass(frozen=True)
class ACMConfig:
  """Which blocks of a transformer become ACMs, and how.

  learner_width defaults to width_factor * mlp_dim / num_learners for MLPs; an
  attention projection (dim x dim) gets width_factor * (dim^2 + dim) / (2 dim + 1)
  hidden units in total (the width whose learners cost what the projection cost),
  split evenly over the learners.
  """
  num_learners: int = 4
  learner_width: int | None = None
  width_factor: float = 1.0
  blocks: tuple[int, ...] | None = None  # None: every block
  attention: bool = False
  activation: str = "gelu"
  output_bias: bool = True
  gate_depth: int = 1
  gate_hidden: int = 128
  impl: str = "auto"
  budget_conditioning: bool = False  # gates read the target budget (see `Gate`)
  # in the Gumbel (training) modes, the q/k/v ACMs' gates run as one gate (`group_gate_logits`).
  # Measured on an H200 (ViT-B/16, MLP + q/k/v/o, 2026-12-02): finetune step 42.87 -> 40.32 ms at
  # batch 64 and 129.1 -> 125.5 ms at 256 with scanned blocks, but 36.9 -> 43.1 ms with unrolled
  # ones (not yet explained), so the tasks' --group_qkv_gates=auto turns it on for scanned blocks only
  group_qkv_gates: bool = False

  def mlp_learner_width(self, mlp_dim: int) -> int:
    if self.num_learners < 1:
      raise ValueError(f"num_learners must be >= 1, got {self.num_learners}")
    if self.learner_width is not None:
      if self.learner_width < 1 or self.learner_width * self.num_learners > mlp_dim:
        raise ValueError(
            f"learner_width={self.learner_width} does not fit: num_learners x learner_width "
            f"must be in 1..mlp_dim={mlp_dim} to initialise from the dense MLP")
      return self.learner_width
    total = self.width_factor * mlp_dim
    if total > mlp_dim:
      raise ValueError(f"width_factor={self.width_factor} gives {total:g} learner units for an MLP of width "
                       f"{mlp_dim}: learners are slices of the dense MLP, so the factor must be <= 1")
    if abs(total - round(total)) > 1e-6 or round(total) % self.num_learners:
      raise ValueError(
          f"num_learners={self.num_learners} does not divide the MLP width {mlp_dim} x "
          f"width_factor {self.width_factor}; choose num_learners dividing {round(total)} "
          "or set learner_width explicitly")
    return round(total) // self.num_learners

  def attention_learner_width(self, dim: int) -> int:
    total = round(self.width_factor * (dim * dim + dim) / (2 * dim + 1))
    return max(1, total // self.num_learners)

  def block_indices(self, depth: int) -> tuple[int, ...]:
    if self.blocks is None:
      return tuple(range(depth))
    bad = [b for b in self.blocks if not 0 <= b < depth]
    if bad:
      raise ValueError(f"ACM blocks {bad} out of range for a model of depth {depth}")
    return tuple(sorted(set(self.blocks)))
