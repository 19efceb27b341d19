"""Both gradients of the soft choice bias from one read of the output gradient.

In finetuning an ACM's output carries sum_j P(k >= j) b2_j (`acm.soft_choice_bias`), with b2
(N+1, d) and at_least = P(k >= j) (tokens, N+1). Its backward needs two products with the output
gradient g (tokens, d):

    d_at_least = g b2^T          (tokens, N+1)
    d_b2       = at_least^T g    (N+1, d), summed over every token

As two XLA products each reads all of g (a (12,608, 768) bf16 tensor per ACM and layer at batch
64 of ViT-B/16). Here one program per block of rows reads its rows of g once, in column chunks,
and produces both: its rows of d_at_least, and its block's share of d_b2, which XLA then sums over
the blocks. The choices are padded to 16 columns, the smallest width of a Triton matmul.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.acm_mlp import _compiler_params, _largest_divisor, _precision

CHOICE_COLS = 16  # choices padded to the smallest Triton matmul width
MAX_CHOICES = CHOICE_COLS


def _kernel(g_ref, at_t_ref, b2_t_ref, d_at_ref, d_b2_ref, *, block_rows, block_cols, dim, tokens):
  from jax.experimental.pallas import triton as plgpu
  i = pl.program_id(0)
  rows = pl.ds(i * block_rows, block_rows)
  in_range = (i * block_rows + jnp.arange(block_rows, dtype=jnp.int32) < tokens)[:, None]
  at_t = at_t_ref[:, rows]  # (16, rows): zero past the last token and past the last choice

  def body(c, acc):
    cols = pl.ds(c * block_cols, block_cols)
    g = plgpu.load(g_ref.at[rows, cols], mask=in_range, other=0.0)  # (rows, cols)
    d_b2_ref[pl.ds(i * CHOICE_COLS, CHOICE_COLS), cols] = jnp.dot(
        at_t, g, precision=_precision(g.dtype), preferred_element_type=jnp.float32)
    return acc + jnp.dot(g, b2_t_ref[cols, :], precision=_precision(g.dtype), preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, dim // block_cols, body, jnp.zeros((block_rows, CHOICE_COLS), jnp.float32))
  d_at_ref[rows, :] = acc


def supports(tokens: int, dim: int, choices: int) -> str | None:
  """None if the kernel takes these shapes, else why not."""
  if tokens < 1:
    return f"it needs at least one token, got {tokens}"
  if choices > MAX_CHOICES:
    return f"it takes at most {MAX_CHOICES} choices, got {choices}"
  if dim % 16:
    return f"it needs a width divisible by 16, got {dim}"
  return None


def soft_bias_grads(g: jax.Array, at_least: jax.Array, b2: jax.Array, *, block_rows: int | None = None,
                    interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """(d_at_least (tokens, N+1) float32, d_b2 (N+1, d) float32) for g (tokens, d), at_least
  (tokens, N+1) and b2 (N+1, d); the products run in g's dtype with float32 sums."""
  tokens, dim = g.shape
  choices = b2.shape[0]
  if at_least.shape != (tokens, choices) or b2.shape != (choices, dim):
    raise ValueError(f"soft_bias_grads: g {g.shape}, at_least {at_least.shape} and b2 {b2.shape} do not "
                     f"fit (tokens, d), (tokens, N+1) and (N+1, d)")
  why = supports(tokens, dim, choices)
  if why is not None:
    raise ValueError(f"soft_bias_grads: {why}")
  if block_rows is None:
    block_rows = 128 if tokens >= 8192 else 64
  block_cols = _largest_divisor(dim, 128)  # at least 16: supports() asks for a multiple of 16
  blocks = -(-tokens // block_rows)
  padded = blocks * block_rows
  at_t = jnp.zeros((CHOICE_COLS, padded), g.dtype).at[:choices, :tokens].set(at_least.T.astype(g.dtype))
  b2_t = jnp.zeros((dim, CHOICE_COLS), g.dtype).at[:, :choices].set(b2.T.astype(g.dtype))
  kernel = functools.partial(_kernel, block_rows=block_rows, block_cols=block_cols, dim=dim, tokens=tokens)
  d_at, parts = pl.pallas_call(
      kernel, grid=(blocks,),
      out_shape=(jax.ShapeDtypeStruct((padded, CHOICE_COLS), jnp.float32),
                 jax.ShapeDtypeStruct((blocks * CHOICE_COLS, dim), jnp.float32)),
      compiler_params=None if interpret else _compiler_params(4, 2), interpret=interpret,
      name="acm_soft_bias_bwd")(g, at_t, b2_t)
  d_b2 = jnp.sum(parts.reshape(blocks, CHOICE_COLS, dim)[:, :choices], axis=0)
  return d_at[:tokens, :choices], d_b2


def soft_bias_grads_reference(g, at_least, b2):
  """The same in plain jnp, float32 products."""
  g32, at32, b32 = (a.astype(jnp.float32) for a in (g, at_least, b2))
  hi = jax.lax.Precision.HIGHEST
  return jnp.dot(g32, b32.T, precision=hi), jnp.dot(at32.T, g32, precision=hi)
