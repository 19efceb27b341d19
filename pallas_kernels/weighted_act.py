"""The MLP ACM's weighted activation in finetuning, forward and backward each as one pass.

In finetuning an ACM's output is act(x w1 + b1), with learner n's hidden units weighted by
P(k >= n), times w2 (`acm.acm_apply_soft`). XLA evaluates exact GELU's erfc as a long float32
polynomial with two branches, in the forward pass and again in the backward loop, where it
materialises the float32 erfc and reads it from three fusions (the input gradient with the b1
reduction, the recomputed hidden units for w2's gradient, and the weights' gradient, a reduction
over each learner's units that XLA cannot fuse with the b1 reduction over tokens).

Here, for pre = x w1 (tokens, N*h) without its bias and weight = P(k >= n) (tokens, N):

  forward   hidden = act(pre + b1) * weight[:, n(col)], one program per (row block, column block)
  backward  one program per (row block, learner), over that learner's columns in chunks:
            hidden (recomputed, for w2's gradient), d_pre = g * weight * act'(pre + b1),
            d_weight[:, n] = sum_h g * act(pre + b1), and the row block's column sums of d_pre
            (its share of b1's gradient, summed by XLA over the blocks)

so the backward pass reads pre and g once and writes hidden and d_pre once. GELU comes from
Abramowitz & Stegun's fit of erfc (7.1.26), whose exp(-x^2 / 2) is also the density term of the
slope: one exp and one reciprocal per unit against XLA's two-branch erfc polynomial, with Phi's
absolute error the fit's 7.5e-8 plus float32 rounding (`gelu_value_and_slope`). On the GPU the reciprocal is the
hardware's approximate one.

Measured on an H200 (ViT-B/16 at batch 64, 12,608 x 3,072 bf16; benchmarks/RESULTS.md,
2026-12-04 (i)): forward 0.060 ms against 0.133 for XLA's weighted activation, backward 0.106 ms
against 0.311 for XLA's value and VJP; the mlp_qkvo finetune step 33.34 -> 30.69 ms at batch 64
and 110.0 -> 98.9 ms at 256.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels.acm_mlp import _activation_reference, _compiler_params, _largest_divisor

ACTIVATIONS = ("gelu", "gelu_tanh", "relu")
ROW_MULTIPLE = 16  # token counts the kernels take (a partial row block would need padded copies)
# (largest row block, largest column block, warps) of each kernel; blocks shrink to divide the shapes
# (H200, ViT-B/16 at batch 64, 12,608 x 3,072 bf16: forward 0.060 ms, backward 0.106 ms; benchmarks/RESULTS.md)
TILES = {"forward": (32, 256, 8), "backward": (16, 256, 4)}

# erfc(z) = (a1 t + ... + a5 t^5) exp(-z^2) + eps, t = 1 / (1 + p z), z >= 0, |eps| <= 1.5e-7
# (Abramowitz & Stegun 7.1.26). Its exp(-z^2) at z = |x| / sqrt(2) is also GELU's density term, so
# value and slope cost one exp and one reciprocal per unit.
_ERFC_P = 0.3275911
_ERFC_COEFFS = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)  # a1..a5


def _reciprocal(v, approx: bool):
  """1 / v; approx: the GPU's one-instruction reciprocal (rcp.approx, about 1 ulp), not in interpret mode."""
  if not approx:
    return 1.0 / v
  from jax.experimental.pallas import triton as plgpu
  return plgpu.elementwise_inline_asm("rcp.approx.ftz.f32 $0, $1;", args=[v], constraints="=r,r", pack=1,
                                      result_shape_dtypes=[jax.ShapeDtypeStruct(v.shape, v.dtype)])[0]


def gelu_value_and_slope(v, approx: bool = False):
  """x Phi(x) and Phi(x) + x phi(x) at v (float32). Phi's absolute error is the fit's 7.5e-8 plus
  float32 rounding (and on the GPU the approximate reciprocal's), so the value's is about that times
  |x| (tests: within 2.5e-7 max(|x|, 1) on [-12, 12] with an exact reciprocal); far in the negative
  tail, where x Phi(x) falls below ~1e-6, that is a large relative error of a negligible value."""
  z = jnp.abs(v) * np.float32(1 / math.sqrt(2))
  t = _reciprocal(1.0 + np.float32(_ERFC_P) * z, approx)
  poly = jnp.full_like(z, _ERFC_COEFFS[-1])
  for c in _ERFC_COEFFS[-2::-1]:
    poly = poly * t + c
  density = jnp.exp(-z * z)  # sqrt(2 pi) phi(v)
  half_tail = 0.5 * t * poly * density  # Phi(-|v|)
  cdf = jnp.where(v < 0, half_tail, 1.0 - half_tail)
  return v * cdf, cdf + v * density * np.float32(1 / math.sqrt(2 * math.pi))


def gelu_tanh_value_and_slope(v, approx: bool = False):
  c, a = np.float32(math.sqrt(2 / math.pi)), np.float32(0.044715)
  t = jnp.tanh(c * (v + a * v * v * v))
  cdf = 0.5 * (1.0 + t)
  return v * cdf, cdf + 0.5 * v * (1.0 - t * t) * c * (1.0 + 3.0 * a * v * v)


def relu_value_and_slope(v, approx: bool = False):
  return jnp.maximum(v, 0.0), jnp.where(v > 0, 1.0, 0.0).astype(v.dtype)


_VALUE_AND_SLOPE = {"gelu": gelu_value_and_slope, "gelu_tanh": gelu_tanh_value_and_slope,
                    "relu": relu_value_and_slope}


def supports(tokens: int, total: int, num_learners: int, activation: str) -> str | None:
  """None if the kernels take these shapes, else why not."""
  if activation not in ACTIVATIONS:
    return f"activation {activation!r} is not one of {ACTIVATIONS}"
  if tokens < 1 or tokens % ROW_MULTIPLE:
    return f"it needs a token count divisible by {ROW_MULTIPLE}, got {tokens}"
  if num_learners < 1 or total % num_learners:
    return f"{total} hidden units do not split into {num_learners} learners"
  if (total // num_learners) % 16:
    return f"it needs a learner width divisible by 16, got {total // num_learners}"
  return None


def _blocks(kind: str, tokens: int, width: int, block_rows: int | None, block_cols: int | None,
            num_warps: int | None) -> tuple[int, int, int]:
  max_rows, max_cols, warps = TILES[kind]
  rows = block_rows or _largest_divisor(tokens, max_rows)
  cols = block_cols or _largest_divisor(width, max_cols)
  for name, value, whole, what in (("block_rows", rows, tokens, "the token count"),
                                   ("block_cols", cols, width, "the learner width")):
    if value < 1 or value & (value - 1) or whole % value:
      raise ValueError(f"{name}={value} must be a power of two dividing {what} {whole}")
  return rows, cols, num_warps or warps


def _fwd_kernel(pre_ref, b1_ref, wt_ref, out_ref, *, block_rows, block_cols, width, act, approx):
  i, j = pl.program_id(0), pl.program_id(1)
  rows, cols = pl.ds(i * block_rows, block_rows), pl.ds(j * block_cols, block_cols)
  learner = (j * block_cols) // width
  weight = wt_ref[learner, rows].astype(jnp.float32)
  value, _ = act(pre_ref[rows, cols].astype(jnp.float32) + b1_ref[cols].astype(jnp.float32)[None, :], approx)
  out_ref[rows, cols] = (value * weight[:, None]).astype(out_ref.dtype)


def _bwd_kernel(pre_ref, b1_ref, wt_ref, g_ref, hid_ref, dpre_ref, dwt_ref, db1_ref, *, block_rows, block_cols,
                width, act, approx):
  i, n = pl.program_id(0), pl.program_id(1)
  rows = pl.ds(i * block_rows, block_rows)
  weight = wt_ref[n, rows].astype(jnp.float32)[:, None]

  def chunk(c, acc):
    cols = pl.ds(n * width + c * block_cols, block_cols)
    value, slope = act(pre_ref[rows, cols].astype(jnp.float32) + b1_ref[cols].astype(jnp.float32)[None, :],
                       approx)
    g = g_ref[rows, cols].astype(jnp.float32)
    hid_ref[rows, cols] = (value * weight).astype(hid_ref.dtype)
    d_pre = g * weight * slope
    dpre_ref[rows, cols] = d_pre.astype(dpre_ref.dtype)
    db1_ref[pl.ds(i, 1), cols] = jnp.sum(d_pre, axis=0)[None, :]
    return acc + jnp.sum(g * value, axis=1)

  acc = jax.lax.fori_loop(0, width // block_cols, chunk, jnp.zeros((block_rows,), jnp.float32))
  dwt_ref[pl.ds(n, 1), rows] = acc[None, :]


def _check(pre, b1, weight_t, activation):
  tokens, total = pre.shape
  num_learners = weight_t.shape[0]
  if b1.shape != (total,) or weight_t.shape != (num_learners, tokens):
    raise ValueError(f"weighted activation: pre {pre.shape}, b1 {b1.shape} and weight^T {weight_t.shape} do "
                     f"not fit (tokens, N*h), (N*h,) and (N, tokens)")
  why = supports(tokens, total, num_learners, activation)
  if why is not None:
    raise ValueError(f"weighted activation kernel: {why}")
  return tokens, total, num_learners


def forward(pre: jax.Array, b1: jax.Array, weight_t: jax.Array, *, activation: str = "gelu",
            block_rows: int | None = None, block_cols: int | None = None, num_warps: int | None = None,
            interpret: bool = False) -> jax.Array:
  """act(pre + b1) with learner n's units times weight_t[n]: pre (tokens, N*h), b1 (N*h,),
  weight_t (N, tokens) -> (tokens, N*h) in pre's dtype, computed in float32."""
  tokens, total, num_learners = _check(pre, b1, weight_t, activation)
  width = total // num_learners
  block_rows, block_cols, num_warps = _blocks("forward", tokens, width, block_rows, block_cols, num_warps)
  kernel = functools.partial(_fwd_kernel, block_rows=block_rows, block_cols=block_cols, width=width,
                             act=_VALUE_AND_SLOPE[activation], approx=not interpret)
  return pl.pallas_call(
      kernel, grid=(tokens // block_rows, total // block_cols),
      out_shape=jax.ShapeDtypeStruct(pre.shape, pre.dtype),
      compiler_params=None if interpret else _compiler_params(num_warps, 1), interpret=interpret,
      name="acm_weighted_act_fwd")(pre, b1, weight_t)


def backward(pre: jax.Array, b1: jax.Array, weight_t: jax.Array, grad: jax.Array, *, activation: str = "gelu",
             block_rows: int | None = None, block_cols: int | None = None, num_warps: int | None = None,
             interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(hidden (tokens, N*h) as `forward` gives it, d_pre (tokens, N*h) in pre's dtype, d_weight^T
  (N, tokens) float32, d_b1 (N*h,) float32) for the gradient `grad` (tokens, N*h) of the hidden units."""
  tokens, total, num_learners = _check(pre, b1, weight_t, activation)
  if grad.shape != pre.shape:
    raise ValueError(f"weighted activation: grad {grad.shape} does not match pre {pre.shape}")
  width = total // num_learners
  block_rows, block_cols, num_warps = _blocks("backward", tokens, width, block_rows, block_cols, num_warps)
  blocks = tokens // block_rows
  kernel = functools.partial(_bwd_kernel, block_rows=block_rows, block_cols=block_cols, width=width,
                             act=_VALUE_AND_SLOPE[activation], approx=not interpret)
  hidden, d_pre, d_wt, d_b1_parts = pl.pallas_call(
      kernel, grid=(blocks, num_learners),
      out_shape=(jax.ShapeDtypeStruct(pre.shape, pre.dtype), jax.ShapeDtypeStruct(pre.shape, pre.dtype),
                 jax.ShapeDtypeStruct((num_learners, tokens), jnp.float32),
                 jax.ShapeDtypeStruct((blocks, total), jnp.float32)),
      compiler_params=None if interpret else _compiler_params(num_warps, 1), interpret=interpret,
      name="acm_weighted_act_bwd")(pre, b1, weight_t, grad)
  return hidden, d_pre, d_wt, jnp.sum(d_b1_parts, axis=0)


def reference(pre, b1, weight_t, grad, *, activation: str = "gelu"):
  """(hidden, d_pre, d_weight^T, d_b1) in plain jnp at pre's precision or float32, whichever is wider,
  with jax.nn's activations and autodiff."""
  wide = jnp.promote_types(pre.dtype, jnp.float32)
  fn = _activation_reference(activation)
  num_learners = weight_t.shape[0]

  def hidden_of(pre, b1, weight_t):
    act = fn(pre.astype(wide) + b1.astype(wide))
    return (act.reshape(pre.shape[0], num_learners, -1) * weight_t.T.astype(wide)[:, :, None]).reshape(pre.shape)

  hidden, vjp = jax.vjp(hidden_of, pre.astype(wide), b1.astype(wide), weight_t.astype(wide))
  d_pre, d_b1, d_wt = vjp(grad.astype(wide))
  return hidden, d_pre, d_wt, d_b1
