"""A linear gate and its argmax as one Pallas kernel (Triton lowering), and its reference.

    k_t = argmax_c (x_t @ w + b)_c      x (T, d), w (d, C), b (C,), C = N + 1 choices

Through XLA this is a matmul with ~5 output columns (too narrow for a
tensor-core tile, so cuBLAS runs it far below the memory bandwidth), a (T, C)
float32 logits buffer, and a second pass for the argmax: on an H100 at ViT-B
shapes it took ~0.05 of the dense MLP's time, more than the whole sort. Here
each program reads one block of x once, multiplies it by w padded to 16
columns (the smallest tensor-core tile; padding columns get a -inf bias), and
keeps the first maximum, as jnp.argmax does. One read of x, one (T,) int32
write.

Logits accumulate in float32 and are not rounded to x.dtype, so a token whose
two best logits lie within bfloat16 rounding of each other may pick
differently from an XLA gate that rounds its output. Cost shifts and masked
choices fold into `b` (a -inf entry is never chosen). A NaN logit row yields
k = C, outside 0..N, which the ACM kernels turn into a NaN output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

MIN_TILE = 16  # tensor-core tiles are at least 16 wide


def gate_reference(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """Plain-jnp semantics in float32: (T,) int32 first argmax of x @ w + b."""
  logits = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest") + b.astype(jnp.float32)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _gate_kernel(x_ref, w_ref, b_ref, k_ref, *, block_rows, block_k, dim, tokens, cols):
  from jax.experimental.pallas import triton as plgpu
  i = pl.program_id(0)
  rows = pl.ds(i * block_rows, block_rows)
  in_range = i * block_rows + jnp.arange(block_rows, dtype=jnp.int32) < tokens
  precision = jax.lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None

  def body(s, acc):
    xs = plgpu.load(x_ref.at[rows, pl.ds(s * block_k, block_k)], mask=in_range[:, None], other=0.0)
    ws = w_ref[pl.ds(s * block_k, block_k), :]
    return acc + jnp.dot(xs, ws, precision=precision, preferred_element_type=jnp.float32)

  logits = jax.lax.fori_loop(0, dim // block_k, body, jnp.zeros((block_rows, cols), jnp.float32))
  logits = logits + b_ref[...][None, :]
  best = jnp.max(logits, axis=1, keepdims=True)
  choice = jnp.arange(cols, dtype=jnp.int32)[None, :]
  first = jnp.min(jnp.where(logits == best, choice, cols), axis=1)
  plgpu.store(k_ref.at[rows], first.astype(jnp.int32), mask=in_range)


def gate_argmax(x: jax.Array, w: jax.Array, b: jax.Array, *, block_rows: int = 128, block_k: int | None = None,
                num_warps: int = 4, num_stages: int = 3, interpret: bool | None = None) -> jax.Array:
  """(T,) int32 first argmax over the C columns of x @ w + b.

  x (T, d) bfloat16/float32, w (d, C) (cast to x.dtype), b (C,) (float32;
  -inf marks a choice never to take). d must be a multiple of 16. block_k:
  reduction chunk over d (default: the largest power of two up to 128
  dividing d). interpret: None means "when the default backend is not a GPU".
  """
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  if x.ndim != 2 or x.shape[0] < 1:
    raise ValueError(f"x must be (tokens, d) with tokens >= 1, got shape {x.shape}")
  if x.dtype not in (jnp.bfloat16, jnp.float32):
    raise ValueError(f"x must be bfloat16 or float32, got {x.dtype}")
  tokens, dim = x.shape
  if w.ndim != 2 or w.shape[0] != dim:
    raise ValueError(f"w must be (d={dim}, choices), got shape {w.shape}")
  num_choices = w.shape[1]
  if b.shape != (num_choices,):
    raise ValueError(f"b must have shape ({num_choices},) to match w {w.shape}, got {b.shape}")
  if dim % MIN_TILE:
    raise ValueError(f"gate_argmax needs d divisible by {MIN_TILE}, got d={dim}")
  if block_k is None:
    block_k = MIN_TILE
    while block_k < 128 and dim % (2 * block_k) == 0:
      block_k *= 2
  if dim % block_k or block_k < MIN_TILE or block_k & (block_k - 1):
    raise ValueError(f"block_k={block_k} must be a power of two >= {MIN_TILE} dividing d={dim}")
  if block_rows < MIN_TILE or block_rows & (block_rows - 1):
    raise ValueError(f"block_rows={block_rows} must be a power of two >= {MIN_TILE}")
  cols = max(MIN_TILE, 1 << (num_choices - 1).bit_length())
  w_pad = jnp.pad(w.astype(x.dtype), ((0, 0), (0, cols - num_choices)))
  b_pad = jnp.pad(b.astype(jnp.float32), (0, cols - num_choices), constant_values=-jnp.inf)
  from jax.experimental.pallas import triton as plgpu
  params = None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  return pl.pallas_call(
      functools.partial(_gate_kernel, block_rows=block_rows, block_k=block_k, dim=dim, tokens=tokens, cols=cols),
      out_shape=jax.ShapeDtypeStruct((tokens,), jnp.int32),
      grid=(pl.cdiv(tokens, block_rows),),
      compiler_params=params,
      interpret=interpret,
      name="acm_gate_argmax",
  )(x, w_pad, b_pad)
