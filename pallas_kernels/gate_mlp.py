"""A deep gate (a ReLU MLP: d -> H -> ... -> H -> C) in one launch forward and one backward.

An ACM's gate in finetuning is a small MLP over every token: its first layer reads the (tokens, d)
input, the rest are (H, H) and (H, C) products with H = 16 (48 for the q/k/v ACMs' three gates as one
block-diagonal gate) and C = N+1 choices. As XLA ops each layer is a matmul launch plus bias and
ReLU launches, forward, rematerialised forward and backward: about twenty launches per gate and
layer of the model, most of them a few microseconds of work.

Here one program per block of rows does all of it:

  forward   a_1 = x W_1 + b_1, h_l = relu(a_l), a_{l+1} = h_l W_{l+1} + b_{l+1}, logits = a_L,
            rounded to x's dtype after every layer as a Dense stack in that dtype rounds.
  backward  the forward again from x, then the chain rule down the layers: its rows of dx, and
            its block's share of every weight and bias gradient, which XLA sums over the blocks.

Widths: H and C are padded to powers of two of at least 16 (Triton's blocks and smallest matmul),
d must be a multiple of 16. Products run in x's dtype with float32 sums.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.acm_mlp import _compiler_params, _precision

MAX_WIDTH = 64  # hidden and output widths (after padding to 16) the kernels take


def _pad16(n: int) -> int:
  """The width a layer of n units takes in the kernels: a power of two, at least 16 (Triton's
  blocks are powers of two, its matmuls at least 16 wide)."""
  return max(16, 1 << (n - 1).bit_length())


def supports(dim: int, widths: Sequence[int]) -> str | None:
  """None if the kernels take a gate of input width dim and layer widths `widths` (hidden ones,
  then the output), else why not."""
  if len(widths) < 2:
    return f"it takes gates of two or more layers, got {len(widths)}"
  if dim % 16:
    return f"it needs an input width divisible by 16, got {dim}"
  if len(set(widths[:-1])) != 1:
    return f"it needs hidden layers of one width, got {list(widths[:-1])}"
  if max(_pad16(w) for w in widths) > MAX_WIDTH:
    return f"it takes layers of at most {MAX_WIDTH} units, got {list(widths)}"
  return None


def _chunk(dim: int) -> int:
  return next(c for c in (128, 64, 32, 16) if dim % c == 0)


def _forward_rows(x_load, w1_ref, b1_ref, wh_ref, bh_ref, wo_ref, bo_ref, *, depth, dim, block_cols, dtype):
  """Pre-activations of every layer for one block of rows, in dtype (a_1 .. a_{L-1}, logits)."""
  hidden = w1_ref.shape[1]

  def body(c, acc):
    cols = pl.ds(c * block_cols, block_cols)
    return acc + jnp.dot(x_load(cols), w1_ref[cols, :], precision=_precision(dtype),
                         preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, dim // block_cols, body, jnp.zeros((x_load.rows, hidden), jnp.float32))
  pre = [(acc + b1_ref[0, :].astype(jnp.float32)[None, :]).astype(dtype)]
  for layer in range(depth - 2):
    h = jnp.maximum(pre[-1], 0)
    acc = jnp.dot(h, wh_ref[layer * hidden:(layer + 1) * hidden, :], precision=_precision(dtype),
                  preferred_element_type=jnp.float32)
    pre.append((acc + bh_ref[layer, :].astype(jnp.float32)[None, :]).astype(dtype))
  h = jnp.maximum(pre[-1], 0)
  acc = jnp.dot(h, wo_ref[...], precision=_precision(dtype), preferred_element_type=jnp.float32)
  pre.append((acc + bo_ref[0, :].astype(jnp.float32)[None, :]).astype(dtype))
  return pre


class _Rows:
  """Masked loads of one block of rows of x, by column slice."""

  def __init__(self, x_ref, i, rows, tokens):
    from jax.experimental.pallas import triton as plgpu
    self._plgpu, self._ref, self.rows = plgpu, x_ref, rows
    self._slice = pl.ds(i * rows, rows)
    self.in_range = (i * rows + jnp.arange(rows, dtype=jnp.int32) < tokens)[:, None]

  def __call__(self, cols):
    return self._plgpu.load(self._ref.at[self._slice, cols], mask=self.in_range, other=0.0)


def _fwd_kernel(x_ref, w1_ref, b1_ref, wh_ref, bh_ref, wo_ref, bo_ref, out_ref, *, block_rows, block_cols, dim,
                tokens, depth):
  i = pl.program_id(0)
  x_load = _Rows(x_ref, i, block_rows, tokens)
  pre = _forward_rows(x_load, w1_ref, b1_ref, wh_ref, bh_ref, wo_ref, bo_ref, depth=depth, dim=dim,
                      block_cols=block_cols, dtype=x_ref.dtype)
  out_ref[pl.ds(i * block_rows, block_rows), :] = pre[-1].astype(out_ref.dtype)


def _bwd_kernel(x_ref, dl_ref, w1_ref, b1_ref, wh_ref, bh_ref, wo_ref, bo_ref, w1t_ref, wht_ref, wot_ref,
                dx_ref, dw1_ref, dwh_ref, dwo_ref, db_ref, *, block_rows, block_cols, dim, tokens, depth):
  from jax.experimental.pallas import triton as plgpu
  i = pl.program_id(0)
  dtype = x_ref.dtype
  hidden = w1_ref.shape[1]
  x_load = _Rows(x_ref, i, block_rows, tokens)
  pre = _forward_rows(x_load, w1_ref, b1_ref, wh_ref, bh_ref, wo_ref, bo_ref, depth=depth, dim=dim,
                      block_cols=block_cols, dtype=dtype)
  acts = [jnp.maximum(a, 0) for a in pre[:-1]]  # h_1 .. h_{L-1}
  dl = dl_ref[pl.ds(i * block_rows, block_rows), :]  # (rows, C): zero in padded rows and columns
  hi = _precision(dtype)
  dot = lambda a, b: jnp.dot(a, b, precision=hi, preferred_element_type=jnp.float32)
  # output layer
  dwo_ref[pl.ds(i * hidden, hidden), :] = dot(acts[-1].T, dl)
  _store_row(db_ref, i * depth + depth - 1, jnp.sum(dl.astype(jnp.float32), axis=0))
  grad = jnp.where(pre[-2] > 0, dot(dl, wot_ref[...]), 0.0).astype(dtype)  # d a_{L-1}
  # hidden layers, last to second
  for layer in reversed(range(depth - 2)):
    dwh_ref[pl.ds((i * (depth - 2) + layer) * hidden, hidden), :] = dot(acts[layer].T, grad)
    _store_row(db_ref, i * depth + layer + 1, jnp.sum(grad.astype(jnp.float32), axis=0))
    grad = jnp.where(pre[layer] > 0, dot(grad, wht_ref[layer * hidden:(layer + 1) * hidden, :]), 0.0).astype(dtype)
  # first layer: its bias, then x's rows chunk by chunk
  _store_row(db_ref, i * depth, jnp.sum(grad.astype(jnp.float32), axis=0))
  rows = pl.ds(i * block_rows, block_rows)

  def body(c, carry):
    cols = pl.ds(c * block_cols, block_cols)
    xc = x_load(cols)
    dw1_ref[pl.ds(i * dim + c * block_cols, block_cols), :] = dot(xc.T, grad)
    plgpu.store(dx_ref.at[rows, cols], dot(grad, w1t_ref[:, cols]).astype(dx_ref.dtype), mask=x_load.in_range)
    return carry

  jax.lax.fori_loop(0, dim // block_cols, body, 0)


def _store_row(ref, row, v):
  """v (w,) into row `row` of ref (rows, >= w), its first w columns."""
  ref[pl.ds(row, 1), pl.ds(0, v.shape[0])] = v[None, :]


def _padded_params(kernels, biases, dtype):
  """Weights in dtype padded to widths of 16: w1 (d, H), wh (L-2 stacked (H, H) as ((L-2) H, H)),
  wo (H, C), biases as rows; and the transposes the backward pass multiplies by."""
  hidden, out = _pad16(kernels[0].shape[1]), _pad16(kernels[-1].shape[1])
  pad = lambda w, r, c: jnp.zeros((r, c), dtype).at[:w.shape[0], :w.shape[1]].set(w.astype(dtype))
  w1 = pad(kernels[0], kernels[0].shape[0], hidden)
  wh = (jnp.concatenate([pad(k, hidden, hidden) for k in kernels[1:-1]]) if len(kernels) > 2
        else jnp.zeros((hidden, hidden), dtype))
  bh = (jnp.concatenate([pad(b[None, :], 1, hidden) for b in biases[1:-1]]) if len(kernels) > 2
        else jnp.zeros((1, hidden), dtype))
  wo = pad(kernels[-1], hidden, out)
  b1, bo = pad(biases[0][None, :], 1, hidden), pad(biases[-1][None, :], 1, out)
  wht = (jnp.concatenate([pad(k, hidden, hidden).T for k in kernels[1:-1]]) if len(kernels) > 2
         else jnp.zeros((hidden, hidden), dtype))
  return (w1, b1, wh, bh, wo, bo), (w1.T, wht, wo.T), hidden, out


def _block_rows(tokens):
  return 128 if tokens >= 8192 else 64


def gate_forward(x2, kernels, biases, *, interpret=False):
  """Logits (tokens, C) in x2's dtype of the ReLU MLP with these layers, for x2 (tokens, d)."""
  tokens, dim = x2.shape
  (w1, b1, wh, bh, wo, bo), _, _, out = _padded_params(kernels, biases, x2.dtype)
  rows = _block_rows(tokens)
  blocks = -(-tokens // rows)
  logits = pl.pallas_call(
      functools.partial(_fwd_kernel, block_rows=rows, block_cols=_chunk(dim), dim=dim, tokens=tokens,
                        depth=len(kernels)),
      grid=(blocks,), out_shape=jax.ShapeDtypeStruct((blocks * rows, out), x2.dtype),
      compiler_params=None if interpret else _compiler_params(4, 2), interpret=interpret,
      name="acm_gate_fwd")(x2, w1, b1, wh, bh, wo, bo)
  return logits[:tokens, :kernels[-1].shape[1]]


def gate_backward(x2, kernels, biases, d_logits, *, interpret=False):
  """(dx (tokens, d) in x2's dtype, [d kernel], [d bias] in float32) for d_logits (tokens, C)."""
  tokens, dim = x2.shape
  depth = len(kernels)
  (w1, b1, wh, bh, wo, bo), (w1t, wht, wot), hidden, out = _padded_params(kernels, biases, x2.dtype)
  rows = _block_rows(tokens)
  blocks = -(-tokens // rows)
  dl = jnp.zeros((blocks * rows, out), x2.dtype).at[:tokens, :d_logits.shape[1]].set(d_logits.astype(x2.dtype))
  width = max(hidden, out)
  f32 = jnp.float32
  dx, dw1, dwh, dwo, db = pl.pallas_call(
      functools.partial(_bwd_kernel, block_rows=rows, block_cols=_chunk(dim), dim=dim, tokens=tokens, depth=depth),
      grid=(blocks,),
      out_shape=(jax.ShapeDtypeStruct((tokens, dim), x2.dtype), jax.ShapeDtypeStruct((blocks * dim, hidden), f32),
                 jax.ShapeDtypeStruct((blocks * max(depth - 2, 1) * hidden, hidden), f32),
                 jax.ShapeDtypeStruct((blocks * hidden, out), f32), jax.ShapeDtypeStruct((blocks * depth, width), f32)),
      compiler_params=None if interpret else _compiler_params(4, 2), interpret=interpret,
      name="acm_gate_bwd")(x2, dl, w1, b1, wh, bh, wo, bo, w1t, wht, wot)
  db = jnp.sum(db.reshape(blocks, depth, width), axis=0)
  d_kernels = [jnp.sum(dw1.reshape(blocks, dim, hidden), axis=0)[:, :kernels[0].shape[1]]]
  dwh = jnp.sum(dwh.reshape(blocks, max(depth - 2, 1), hidden, hidden), axis=0)
  d_kernels += [dwh[l, :k.shape[0], :k.shape[1]] for l, k in enumerate(kernels[1:-1])]
  d_kernels.append(jnp.sum(dwo.reshape(blocks, hidden, out), axis=0)[:kernels[-1].shape[0], :kernels[-1].shape[1]])
  d_biases = [db[l, :b.shape[0]] for l, b in enumerate(biases)]
  return dx, d_kernels, d_biases


def gate_reference(x2, kernels, biases):
  """The same ReLU MLP in plain jnp, float32 throughout."""
  h = x2.astype(jnp.float32)
  for l, (k, b) in enumerate(zip(kernels, biases, strict=True)):
    h = jnp.dot(h, k.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST) + b.astype(jnp.float32)
    if l < len(kernels) - 1:
      h = jnp.maximum(h, 0)
  return h
