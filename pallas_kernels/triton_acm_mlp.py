"""The ACM MLP kernel written in Triton and called through jax-triton.

Same operation, same two-launch design and same index preparation as
`pallas_kernels.acm_mlp` (see its docstring): an up-projection over the active
(row block, hidden tile) pairs only, and a down-projection whose reduction stops
at each row block's largest k. Writing it in Triton directly gives libdevice's
erf (float32; bfloat16 uses the hardware-tanh GELU as the Pallas kernel does)
and full control of pointer arithmetic; it is also the bridge the design card
asks for between hand-written Triton and XLA.

triton and jax-triton exist only on GPU machines (jax-triton 0.3.1 matches the
preinstalled triton 3.6; see requirements-gpu.txt). They are imported on first
call, and a missing one raises ImportError saying what to install.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import acm_mlp as _pallas

acm_mlp_reference = _pallas.acm_mlp_reference

# Tuned like the Pallas defaults (H100, ViT-B, T=50432, r=0.5); Triton's own
# code generation prefers wider hidden tiles in the up kernel.
_TUNED = dict(_pallas._TUNED)
_TUNED[("hopper", "bf16")] = _pallas.KernelConfig(128, 256, 256, (64, 64), (8, 8), (3, 3))


def _require_jax_triton():
  try:
    import jax_triton
    import triton
  except ImportError as err:
    raise ImportError(
        "acm_mlp_triton needs triton and jax-triton on a CUDA GPU machine: "
        "pip install -r requirements-gpu.txt (jax-triton==0.3.1 for triton 3.6); "
        f"import failed with: {err}") from err
  return jax_triton, triton


@functools.cache
def _kernels():
  """Defines the Triton kernels once triton is importable."""
  _, triton = _require_jax_triton()
  import triton.language as tl

  @triton.jit
  def activate(v, ACT: tl.constexpr, FAST: tl.constexpr):
    if FAST and (ACT == "gelu" or ACT == "gelu_tanh"):
      # tanh form on the hardware tanh (bf16 outputs): see _gelu_fast in acm_mlp.py
      inner = 0.7978845608028654 * (v + 0.044715 * v * v * v)
      t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [inner], dtype=tl.float32,
                                    is_pure=True, pack=1)
      v = 0.5 * v * (1.0 + t)
    elif ACT == "gelu":
      v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACT == "gelu_tanh":
      inner = 0.7978845608028654 * (v + 0.044715 * v * v * v)
      e = tl.exp(-2.0 * tl.abs(inner))  # tanh from exp, stable for large |inner|
      t = (1.0 - e) / (1.0 + e)
      v = 0.5 * v * (1.0 + tl.where(inner < 0, -t, t))
    elif ACT == "relu":
      v = tl.maximum(v, 0.0)
    return v

  @triton.jit
  def up_tile(i, j, rows_ptr, k_ptr, x_ptr, w1_ptr, b1_ptr, h_ptr, DIM: tl.constexpr, WIDTH: tl.constexpr,
              TOTAL: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, ACT: tl.constexpr,
              FAST: tl.constexpr, PRECISION: tl.constexpr, TOKENS: tl.constexpr):
    offs_m = i * BM + tl.arange(0, BM)
    offs_n = j * BH + tl.arange(0, BH)
    offs_k = tl.arange(0, BK)
    src = tl.minimum(tl.load(rows_ptr + offs_m), TOKENS - 1).to(tl.int64)
    x_ptrs = x_ptr + src[:, None] * DIM + offs_k[None, :]
    w_ptrs = w1_ptr + offs_k[:, None] * TOTAL + offs_n[None, :]
    acc = tl.zeros((BM, BH), dtype=tl.float32)
    for _ in range(0, DIM // BK):
      acc = tl.dot(tl.load(x_ptrs), tl.load(w_ptrs), acc, input_precision=PRECISION)
      x_ptrs += BK
      w_ptrs += BK * TOTAL
    acc += tl.load(b1_ptr + offs_n).to(tl.float32)[None, :]
    acc = activate(acc, ACT, FAST)
    k_rows = tl.load(k_ptr + offs_m)
    keep = (offs_n // WIDTH)[None, :] < k_rows[:, None]
    acc = tl.where(keep, acc, 0.0)
    h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * TOTAL + offs_n[None, :]
    tl.store(h_ptrs, acc.to(h_ptr.dtype.element_ty))

  @triton.jit
  def up_kernel(count_ptr, tiles_ptr, rows_ptr, k_ptr, x_ptr, w1_ptr, b1_ptr, h_ptr, DIM: tl.constexpr,
                WIDTH: tl.constexpr, TOTAL: tl.constexpr, PER_BLOCK: tl.constexpr, BM: tl.constexpr,
                BH: tl.constexpr, BK: tl.constexpr, ACT: tl.constexpr, FAST: tl.constexpr,
                PRECISION: tl.constexpr, PROGRAMS: tl.constexpr, TOKENS: tl.constexpr,
                PERSISTENT: tl.constexpr):
    if PERSISTENT:  # program p takes active tiles p, p + PROGRAMS, ... of the table
      for p in range(tl.program_id(0), tl.load(count_ptr), PROGRAMS):
        tile = tl.load(tiles_ptr + p)
        up_tile(tile // PER_BLOCK, tile % PER_BLOCK, rows_ptr, k_ptr, x_ptr, w1_ptr, b1_ptr, h_ptr, DIM, WIDTH,
                TOTAL, BM, BH, BK, ACT, FAST, PRECISION, TOKENS)
    else:  # one program per (row block, hidden tile); tiles past the block's largest k exit
      i = tl.program_id(0) // PER_BLOCK
      j = tl.program_id(0) % PER_BLOCK
      if j < tl.load(k_ptr + i * BM) * (WIDTH // BH):
        up_tile(i, j, rows_ptr, k_ptr, x_ptr, w1_ptr, b1_ptr, h_ptr, DIM, WIDTH, TOTAL, BM, BH, BK, ACT, FAST,
                PRECISION, TOKENS)

  @triton.jit
  def down_kernel(poison_ptr, rows_ptr, k_ptr, h_ptr, w2_ptr, bias_ptr, out_ptr, TOKENS: tl.constexpr,
                  DIM: tl.constexpr, WIDTH: tl.constexpr, TOTAL: tl.constexpr, COL_BLOCKS: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    i = pid // COL_BLOCKS
    c = pid % COL_BLOCKS
    offs_m = i * BM + tl.arange(0, BM)
    offs_n = c * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    trips = tl.load(k_ptr + i * BM) * (WIDTH // BK)
    h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * TOTAL + offs_k[None, :]
    w_ptrs = w2_ptr + offs_k[:, None] * DIM + offs_n[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, trips):
      acc = tl.dot(tl.load(h_ptrs), tl.load(w_ptrs), acc, input_precision=PRECISION)
      h_ptrs += BK
      w_ptrs += BK * DIM
    k_rows = tl.load(k_ptr + offs_m)
    acc += tl.load(bias_ptr + k_rows[:, None] * DIM + offs_n[None, :]).to(tl.float32)
    acc += tl.load(poison_ptr)
    dst = tl.load(rows_ptr + offs_m).to(tl.int64)
    tl.store(out_ptr + dst[:, None] * DIM + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m < TOKENS)[:, None])

  return up_kernel, down_kernel


def acm_mlp_triton(x, k, w1, b1, w2, bias_table, *, num_learners: int, activation: str = "gelu",
                   block_rows=None, block_hidden=None, block_out=None, num_warps=None, num_stages=None,
                   block_k=None, order=None, persistent: bool = False, fast_math: bool | None = None,
                   interpret: bool = False) -> jax.Array:
  """Same contract as `pallas_kernels.acm_mlp.acm_mlp`, as Triton kernels via jax-triton.

  `interpret` exists for signature parity only: jax-triton has no interpreter,
  so interpret=True raises. persistent / fast_math: as for the Pallas up launch
  (defaults: one program per tile; hardware-tanh GELU for bfloat16).
  """
  tokens, dim, width = _pallas.validate_inputs(x, k, w1, b1, w2, bias_table, num_learners=num_learners,
                                               activation=activation, order=order)
  if interpret:
    raise NotImplementedError("jax-triton kernels cannot run in interpret mode; use "
                              "pallas_kernels.acm_mlp.acm_mlp(..., interpret=True) on CPU")
  jt, _ = _require_jax_triton()
  up_kernel, down_kernel = _kernels()
  cfg = _pallas.resolve_config(x.dtype, dim, width, block_rows=block_rows, block_hidden=block_hidden,
                               block_out=block_out, block_k=block_k, num_warps=num_warps,
                               num_stages=num_stages, tuned=_TUNED)
  prep = _pallas.prepare(k, order, tokens=tokens, num_learners=num_learners, width=width,
                         block_rows=cfg.block_rows, block_hidden=cfg.block_hidden, tile_table=persistent)
  total = num_learners * width
  fast = x.dtype == jnp.bfloat16 if fast_math is None else fast_math
  precision = "ieee" if x.dtype == jnp.float32 else "tf32"  # ignored for bf16 operands

  programs = _pallas.up_programs(prep.num_row_blocks * (total // cfg.block_hidden), persistent)
  hidden = jt.triton_call(
      prep.count, prep.tiles, prep.rows, prep.k, x, w1, b1, kernel=up_kernel, name="acm_mlp_triton_up",
      out_shape=jax.ShapeDtypeStruct((prep.num_row_blocks * cfg.block_rows, total), x.dtype),
      grid=(programs,), num_warps=cfg.num_warps[0], num_stages=cfg.num_stages[0],
      DIM=dim, WIDTH=width, TOTAL=total, PER_BLOCK=total // cfg.block_hidden, BM=cfg.block_rows,
      BH=cfg.block_hidden, BK=cfg.block_k[0], ACT=activation, FAST=fast, PRECISION=precision,
      PROGRAMS=programs, TOKENS=tokens, PERSISTENT=persistent)
  col_blocks = dim // cfg.block_out
  return jt.triton_call(
      prep.poison, prep.rows, prep.k, hidden, w2, bias_table, kernel=down_kernel,
      name="acm_mlp_triton_down", out_shape=jax.ShapeDtypeStruct((tokens, dim), x.dtype),
      grid=(prep.num_row_blocks * col_blocks,), num_warps=cfg.num_warps[1], num_stages=cfg.num_stages[1],
      TOKENS=tokens, DIM=dim, WIDTH=width, TOTAL=total, COL_BLOCKS=col_blocks, BM=cfg.block_rows,
      BN=cfg.block_out, BK=cfg.block_k[1], PRECISION=precision)
