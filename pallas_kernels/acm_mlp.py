"""Gated-learner ACM MLP as a Pallas kernel (Triton lowering), and its reference.

The operation, for tokens whose choices k are sorted in descending order:

    out_t = sum_{n < k_t} act(x_t @ w1[:, n] + b1[n]) @ w2[n] + bias_table[k_t]

where learner n (0-based) owns hidden units [n*h, (n+1)*h) of w1 (d, N*h),
b1 (N*h,) and w2 (N*h, d), and bias_table (N+1, d) holds the cumulative output
bias of each choice.

Why sorting helps: learner n then runs on one contiguous prefix of the tokens,
so a block of `block_rows` tokens needs only the hidden units of its largest k.
The kernel is two launches, each shaped like an ordinary tiled matmul:

  up:   hidden[rows, tile] = act(x[rows] @ w1[:, tile] + b1[tile]), masked to
        the units each row's k allows. One program per (row block, hidden
        tile); a program whose tile lies past its row block's largest k
        returns at once. (A persistent variant, `persistent=True`, walks a
        table of the active pairs with ~2 programs per SM instead; on an H100
        it measured 1.5x slower at full k, and no faster at mean k/N = 0.25,
        see benchmarks/results/kernel_profile_h100.json.) For bfloat16 the
        GELU uses the hardware tanh (`fast_math`): with the erf polynomial
        the up launch took ~1.3x as long as with relu.
  down: out[rows, cols] = hidden[rows, :K] @ w2[:K, cols] + bias_table[k], with
        K = the row block's largest k times h: a reduction loop of dynamic
        trip count, so row blocks of small k cost little.

Both accumulate in float32. The hidden buffer has the layout of the dense MLP's
(which XLA also writes to memory between its two matmuls), in x.dtype.

Unsorted tokens: pass `order`, a permutation with k[order] descending. The
kernels then gather x's rows and scatter the output rows themselves, so the
caller never materialises sorted copies of x or the output (that saves two full
passes over the activations, the largest part of the sort/unsort overhead).
`sort_order` computes such a permutation with a counting sort.

Validation: shapes, dtypes, block sizes and the range/order of a concrete k are
checked eagerly with clear errors. Under `jit` k is a tracer and cannot be
checked before launch; then an invalid k (outside 0..N, or not descending after
`order`) turns the whole output into NaN instead of silent garbage: the check is
a tiny XLA reduction whose result (0 or NaN) the kernel adds to every output, and k is clamped so the
kernel never reads out of bounds. No checkify needed.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "identity")


# ----------------------------------------------------------------------------
# Reference


def acm_mlp_reference(x, k, w1, b1, w2, bias_table, *, num_learners: int,
                      activation: str = "gelu") -> jax.Array:
  """Plain-jnp semantics in float32: every hidden unit computed, unused ones masked.

  x (T, d), k (T,) int in 0..N (any order), w1 (d, N*h), b1 (N*h,), w2 (N*h, d),
  bias_table (N+1, d). Returns (T, d) in x.dtype.
  """
  f32 = jnp.float32
  width = w1.shape[1] // num_learners
  pre = jnp.dot(x.astype(f32), w1.astype(f32), precision="highest") + b1.astype(f32)
  hidden = _activation_reference(activation)(pre)
  learner = jnp.arange(w1.shape[1]) // width
  hidden = jnp.where(learner[None, :] < k[:, None], hidden, 0.0)
  out = jnp.dot(hidden, w2.astype(f32), precision="highest") + bias_table.astype(f32)[k]
  return out.astype(x.dtype)


def _activation_reference(name):
  return {
      "gelu": functools.partial(jax.nn.gelu, approximate=False),
      "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
      "relu": jax.nn.relu,
      "identity": lambda z: z,
  }[name]


# ----------------------------------------------------------------------------
# Activations inside the kernel (float32 in, float32 out)

# Abramowitz & Stegun 7.1.28: erf(z) = 1 - (1 + a1 z + ... + a6 z^6)^-16 for
# z >= 0, absolute error <= 3e-7. The Triton lowering has no erf; this form
# needs one reciprocal and no exp, which keeps the epilogue cheap.
_ERF_COEFFS = (0.0000430638, 0.0002765672, 0.0001520143, 0.0092705272, 0.0422820123,
               0.0705230784)


def _erf_nonneg(z):
  poly = jnp.full_like(z, _ERF_COEFFS[0])
  for c in _ERF_COEFFS[1:]:
    poly = poly * z + c
  t = 1.0 / (poly * z + 1.0)
  for _ in range(4):  # t^16
    t = t * t
  return 1.0 - t


def _gelu_erf(v):
  z = jnp.minimum(jnp.abs(v) * np.float32(1 / math.sqrt(2)), 8.0)
  erf_abs = _erf_nonneg(z)
  erf = jnp.where(v < 0, -erf_abs, erf_abs)
  return 0.5 * v * (1.0 + erf)


def _gelu_tanh(v):
  inner = np.float32(math.sqrt(2 / math.pi)) * (v + 0.044715 * v * v * v)
  return 0.5 * v * (1.0 + jnp.tanh(inner))


def _tanh_approx(v):
  """The GPU's one-instruction tanh (MUFU, max relative error ~2^-11)."""
  from jax.experimental.pallas import triton as plgpu
  return plgpu.elementwise_inline_asm("tanh.approx.f32 $0, $1;", args=[v], constraints="=r,r", pack=1,
                                      result_shape_dtypes=[jax.ShapeDtypeStruct(v.shape, v.dtype)])[0]


def _gelu_fast(v):
  # tanh form of GELU on the hardware tanh: |error| <= 5e-4 absolute against the
  # erf form (at v ~ 2.7, i.e. 2e-4 relative), below bfloat16's rounding
  inner = np.float32(math.sqrt(2 / math.pi)) * (v + 0.044715 * v * v * v)
  return 0.5 * v * (1.0 + _tanh_approx(inner))


def _kernel_activation(name, fast: bool = False):
  """fast: bf16 outputs on a GPU; both GELUs use the hardware tanh (see _gelu_fast)."""
  if fast and name in ("gelu", "gelu_tanh"):
    return _gelu_fast
  return {"gelu": _gelu_erf, "gelu_tanh": _gelu_tanh, "relu": lambda v: jnp.maximum(v, 0.0),
          "identity": lambda v: v}[name]


# ----------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Tile sizes and launch settings; pairs are (up kernel, down kernel).

  block_k is the reduction chunk: over d in the up kernel, over hidden units in
  the down kernel.
  """
  block_rows: int
  block_hidden: int
  block_out: int
  block_k: tuple[int, int]
  num_warps: tuple[int, int]
  num_stages: tuple[int, int]


# Tuned on an H100 (benchmarks/kernel_bench.py --tune: ViT-B shapes, T=50432,
# bf16, mean k/N = 0.5); the H200 is the same chip with faster memory. A100 and
# unknown GPUs get smaller tiles that fit any recent GPU's shared memory (not
# measured here).
_TUNED = {
    ("hopper", "bf16"): KernelConfig(128, 128, 256, (64, 64), (8, 8), (3, 3)),
    ("hopper", "f32"): KernelConfig(64, 128, 128, (32, 32), (4, 4), (3, 3)),
    ("other", "bf16"): KernelConfig(128, 128, 128, (32, 32), (4, 4), (3, 3)),
    ("other", "f32"): KernelConfig(64, 64, 64, (32, 32), (4, 4), (2, 2)),
}


def gpu_family() -> str:
  try:
    kind = jax.devices()[0].device_kind.upper()
  except RuntimeError:
    return "other"
  return "hopper" if ("H100" in kind or "H200" in kind or "H800" in kind or "GH200" in kind) else "other"


def _largest_divisor(n: int, cap: int) -> int:
  """Largest power of two <= cap dividing n (Triton tiles are powers of two)."""
  b = 1
  while b * 2 <= cap and n % (b * 2) == 0:
    b *= 2
  return b


def _pair(value, name):
  if isinstance(value, int):
    return (value, value)
  value = tuple(value)
  if len(value) != 2 or not all(isinstance(v, int) and v > 0 for v in value):
    raise ValueError(f"{name} must be an int or a pair (up kernel, down kernel) of ints, got {value}")
  return value


def resolve_config(dtype, dim: int, width: int, *, block_rows=None, block_hidden=None,
                   block_out=None, block_k=None, num_warps=None, num_stages=None,
                   tuned=None) -> KernelConfig:
  """Tuned defaults for this GPU and dtype, with user overrides, fitted to the shapes.

  tuned: the table of defaults ((family, dtype) -> KernelConfig); this module's by default.
  """
  base = (tuned or _TUNED)[(gpu_family(), "f32" if jnp.dtype(dtype) == jnp.float32 else "bf16")]
  cfg = KernelConfig(
      block_rows=block_rows or base.block_rows,
      # defaults shrink to a power of two dividing the width; explicit values are validated
      block_hidden=block_hidden or _largest_divisor(width, base.block_hidden),
      block_out=block_out or _largest_divisor(dim, base.block_out),
      block_k=_pair(block_k, "block_k") if block_k else (_largest_divisor(dim, base.block_k[0]),
                                                         _largest_divisor(width, base.block_k[1])),
      num_warps=_pair(num_warps or base.num_warps, "num_warps"),
      num_stages=_pair(num_stages or base.num_stages, "num_stages"),
  )
  sizes = {"block_rows": cfg.block_rows, "block_hidden": cfg.block_hidden, "block_out": cfg.block_out,
           "block_k (up)": cfg.block_k[0], "block_k (down)": cfg.block_k[1]}
  for name, v in sizes.items():
    if v < 1 or v & (v - 1):
      raise ValueError(f"{name}={v} must be a power of two (Triton tile sizes)")
  if width % cfg.block_hidden:
    raise ValueError(f"block_hidden={cfg.block_hidden} does not divide the learner width h={width}")
  if dim % cfg.block_k[0]:
    raise ValueError(f"block_k (up)={cfg.block_k[0]} does not divide d={dim}")
  if width % cfg.block_k[1]:
    raise ValueError(f"block_k (down)={cfg.block_k[1]} does not divide the learner width h={width}")
  if dim % cfg.block_out:
    raise ValueError(f"block_out={cfg.block_out} does not divide d={dim}")
  return cfg


# ----------------------------------------------------------------------------
# Validation and index preparation (shared with the jax-triton kernel)


def validate_inputs(x, k, w1, b1, w2, bias_table, *, num_learners: int, activation: str,
                    order=None) -> tuple[int, int, int]:
  """Checks shapes, dtypes and (when concrete) k; returns (T, d, h)."""
  if activation not in ACTIVATIONS:
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
  if not isinstance(num_learners, int) or num_learners < 1:
    raise ValueError(f"num_learners must be a positive int, got {num_learners!r}")
  if x.ndim != 2:
    raise ValueError(f"x must be (tokens, d), got shape {x.shape}")
  tokens, dim = x.shape
  if tokens < 1:
    raise ValueError("x has no tokens")
  if x.dtype not in (jnp.bfloat16, jnp.float32):
    raise ValueError(f"x must be bfloat16 or float32, got {x.dtype}")
  if k.shape != (tokens,):
    raise ValueError(f"k must have shape ({tokens},) to match x {x.shape}, got {k.shape}")
  if not jnp.issubdtype(k.dtype, jnp.integer):
    raise ValueError(f"k must be an integer array, got {k.dtype}")
  if w1.ndim != 2 or w1.shape[0] != dim or w1.shape[1] % num_learners:
    raise ValueError(f"w1 must be (d={dim}, num_learners*h) with num_learners={num_learners}, got {w1.shape}")
  total = w1.shape[1]
  expected = {"b1": (b1, (total,)), "w2": (w2, (total, dim)), "bias_table": (bias_table, (num_learners + 1, dim))}
  for name, (arr, shape) in expected.items():
    if arr.shape != shape:
      raise ValueError(f"{name} must have shape {shape} for x {x.shape} and w1 {w1.shape}, got {arr.shape}")
  for name, arr in {"w1": w1, **{n: a for n, (a, _) in expected.items()}}.items():
    if arr.dtype != x.dtype:
      raise ValueError(f"{name} has dtype {arr.dtype} but x has {x.dtype}; cast the parameters to x.dtype")
  if order is not None:
    if order.shape != (tokens,) or not jnp.issubdtype(order.dtype, jnp.integer):
      raise ValueError(f"order must be an int permutation of shape ({tokens},), got {order.shape} {order.dtype}")
  if not isinstance(k, jax.core.Tracer) and (order is None or not isinstance(order, jax.core.Tracer)):
    k_np = np.asarray(k)
    bad = (k_np < 0) | (k_np > num_learners)
    if bad.any():
      raise ValueError(f"k must lie in 0..{num_learners}; found {k_np[bad][:5].tolist()} "
                       f"at positions {np.nonzero(bad)[0][:5].tolist()}")
    if order is not None:
      order_np = np.asarray(order)
      if not np.array_equal(np.sort(order_np), np.arange(tokens)):
        raise ValueError("order must be a permutation of 0..T-1")
      k_np = k_np[order_np]
    rises = np.nonzero(k_np[1:] > k_np[:-1])[0]
    if rises.size:
      i = int(rises[0])
      raise ValueError(f"k must be sorted in descending order{' after order' if order is not None else ''}: "
                       f"k[{i}]={k_np[i]} < k[{i + 1}]={k_np[i + 1]}; sort the tokens (see sort_order)")
  return tokens, dim, total // num_learners


# Persistent up launch: two resident programs per SM let one's epilogue
# (activation, store) overlap the other's matmul.
PROGRAMS_PER_SM = 2


def up_programs(num_tiles: int, persistent: bool, interpret: bool = False) -> int:
  """Grid size of the up launch over `num_tiles` (row block, hidden tile) pairs:
  one program per tile, or a persistent grid of ~PROGRAMS_PER_SM per SM."""
  if not persistent:
    return num_tiles
  if interpret:
    return min(num_tiles, 4)
  sms = getattr(jax.devices()[0], "core_count", None) or 132
  return min(num_tiles, PROGRAMS_PER_SM * sms)


SORT_METHODS = ("blocked", "count", "argsort")


def sort_order(k: jax.Array, num_learners: int, method: str = "blocked") -> jax.Array:
  """Permutation sorting k (T,) in descending order, stable.

  k has only N+1 values, so a counting sort suffices: each token's destination
  is (tokens with a larger k) + (earlier tokens with the same k).
  "blocked": the running counts come from a lower-triangular matmul inside
  blocks of ~sqrt(T) tokens plus a second one over the block totals: a handful
  of fusions, where a length-T cumsum lowers on the GPU to a log-depth chain of
  small kernels. "count": the same with jnp.cumsum. "argsort": XLA's sort.
  """
  if method not in SORT_METHODS:
    raise ValueError(f"unknown sort method {method!r}; expected one of {SORT_METHODS}")
  k = k.astype(jnp.int32)
  if method == "argsort":
    return jnp.argsort(-k, stable=True).astype(jnp.int32)
  if method == "blocked" and k.shape[0] < 2 ** 24:  # float32 counts stay exact below 2^24
    return _sort_blocked(k, num_learners)
  choices = jnp.arange(num_learners, -1, -1, dtype=jnp.int32)  # descending
  onehot = (k[:, None] == choices[None, :]).astype(jnp.int32)  # (T, N+1)
  counts = onehot.sum(0)
  starts = jnp.cumsum(counts) - counts
  rank = jnp.cumsum(onehot, axis=0) - 1
  dest = jnp.sum(onehot * (starts[None, :] + rank), axis=1)
  return jnp.zeros_like(k).at[dest].set(jnp.arange(k.shape[0], dtype=jnp.int32), unique_indices=True)


# Above this many blocks (T > 2M tokens) the block totals are scanned with cumsum
# instead of a (blocks, blocks) matmul, which would pass 16 MiB.
MATMUL_SCAN_BLOCKS = 2048


def _sort_blocked(k: jax.Array, num_learners: int) -> jax.Array:
  tokens = k.shape[0]
  block = 128
  while block * block < tokens and block < 1024:
    block *= 2
  blocks = -(-tokens // block)
  # category 0 is k = N (sorted first) ... N is k = 0; padding and out-of-range k get
  # category N + 1 and land after every valid token, past the end or (invalid k) in
  # the tail, where the kernels' own range check catches them
  valid = (k >= 0) & (k <= num_learners)
  cat = jnp.where(valid, num_learners - k, num_learners + 1)
  cat = jnp.pad(cat, (0, blocks * block - tokens), constant_values=num_learners + 1)
  onehot = jax.nn.one_hot(cat.reshape(blocks, block), num_learners + 2, dtype=jnp.bfloat16)
  lower = jnp.tril(jnp.ones((block, block), jnp.bfloat16))
  # inclusive running count of each category inside each block: 0/1 products summed
  # in float32, exact up to the block size
  within = jnp.einsum("ij,bjc->bic", lower, onehot, preferred_element_type=jnp.float32)
  totals = within[:, -1, :]  # (blocks, C)
  if blocks <= MATMUL_SCAN_BLOCKS:  # same category in earlier blocks
    strict = jnp.tril(jnp.ones((blocks, blocks), jnp.float32), -1)
    before = jnp.dot(strict, totals, precision=jax.lax.Precision.HIGHEST)
  else:
    before = jnp.cumsum(totals, axis=0) - totals
  counts = totals.sum(0)
  starts = jnp.cumsum(counts) - counts  # C entries
  dest = jnp.sum(onehot * (starts + before[:, None, :] + within - 1.0), axis=-1)
  dest = dest.reshape(-1).astype(jnp.int32)
  padded = blocks * block
  order = jnp.zeros((padded,), jnp.int32).at[dest].set(jnp.arange(padded, dtype=jnp.int32),
                                                      unique_indices=True)
  return order[:tokens]


@dataclasses.dataclass(frozen=True)
class Prepared:
  """Padded per-row arrays and the active-tile table the kernels read."""
  rows: jax.Array      # (T_pad,) int32: source/destination row of each sorted row (>= T: padding)
  k: jax.Array         # (T_pad,) int32: k of each sorted row, clamped, 0 in the padding
  tiles: jax.Array     # (num_row_blocks * tiles_per_row_block,) int32 tile ids, -1 past the end
  count: jax.Array     # (1,) int32: number of active tiles (the table's used length)
  poison: jax.Array    # (1,) float32: NaN when k was out of range or unsorted, else 0
  num_row_blocks: int


def prepare(k, order, *, tokens: int, num_learners: int, width: int, block_rows: int,
            block_hidden: int, tile_table: bool = True) -> Prepared:
  """Sorted, clamped, padded k; row indices; the active (row block, hidden tile) table
  (only read by a persistent up kernel; with tile_table=False, a 1-entry placeholder).

  Tiles are listed row block by row block (consecutive programs share an x
  block in L2), hidden tiles of one block in order. Row block i has
  ceil(maxk_i * h / block_hidden) active tiles, maxk_i = k of its first row.
  """
  nb = -(-tokens // block_rows)
  pad = nb * block_rows - tokens
  k = k.astype(jnp.int32)
  if order is None:
    rows = jnp.arange(tokens, dtype=jnp.int32)
  else:
    rows = order.astype(jnp.int32)
    k = k[rows]
  invalid = jnp.any((k < 0) | (k > num_learners)) | jnp.any(k[1:] > k[:-1])
  k = jnp.clip(k, 0, num_learners)
  k_pad = jnp.pad(k, (0, pad))
  # padding rows get distinct indices past the end: the up kernel clamps them to a
  # real row for reading, the down kernel masks their stores
  rows = jnp.concatenate([rows, jnp.arange(tokens, tokens + pad, dtype=jnp.int32)])

  poison = jnp.where(invalid, jnp.nan, 0.0).astype(jnp.float32)[None]  # added to every output
  if not tile_table:
    placeholder = jnp.zeros((1,), jnp.int32)
    return Prepared(rows, k_pad, placeholder, placeholder, poison, nb)
  per_learner = width // block_hidden
  per_block = num_learners * per_learner
  active = k_pad[::block_rows] * per_learner  # (nb,) tiles of each row block
  ends = jnp.cumsum(active)
  p = jnp.arange(nb * per_block, dtype=jnp.int32)
  block = jnp.sum(ends[None, :] <= p[:, None], axis=1).astype(jnp.int32)
  # compare_all above is nb x P booleans: tiny next to the matmuls, one fusion
  block_c = jnp.minimum(block, nb - 1)
  tile = p - (ends[block_c] - active[block_c])
  tiles = jnp.where(block < nb, block_c * per_block + tile, -1)
  return Prepared(rows, k_pad, tiles, ends[-1:].astype(jnp.int32), poison, nb)


# ----------------------------------------------------------------------------
# Pallas kernels


def _precision(dtype):
  # float32 operands: full-precision products (the default would be TF32 on the GPU)
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _up_tile(i, j, rows_ref, k_ref, x_ref, w1_ref, b1_ref, h_ref, *, block_rows, block_hidden, block_k, dim,
             width, activation, tokens, gather, fast_math):
  """One (row block i, hidden tile j) of the hidden buffer."""
  row_slice = pl.ds(i * block_rows, block_rows)
  col_slice = pl.ds(j * block_hidden, block_hidden)
  if gather:  # rows of x picked through `rows` (tokens in their original order)
    src = jnp.minimum(rows_ref[row_slice], tokens - 1)[:, None]
    chunk = jnp.arange(block_k, dtype=jnp.int32)[None, :]
    load = lambda s: x_ref[src, s * block_k + chunk]  # int-array indexing
  else:  # x already sorted: plain block loads, padding rows masked
    from jax.experimental.pallas import triton as plgpu
    in_range = (i * block_rows + jnp.arange(block_rows, dtype=jnp.int32) < tokens)[:, None]
    load = lambda s: plgpu.load(x_ref.at[row_slice, pl.ds(s * block_k, block_k)], mask=in_range, other=0.0)

  def body(s, acc):
    xs = load(s)
    ws = w1_ref[pl.ds(s * block_k, block_k), col_slice]
    return acc + jnp.dot(xs, ws, precision=_precision(xs.dtype), preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, dim // block_k, body, jnp.zeros((block_rows, block_hidden), jnp.float32))
  acc = _kernel_activation(activation, fast_math)(acc + b1_ref[col_slice].astype(jnp.float32)[None, :])
  learner = (j * block_hidden + jnp.arange(block_hidden, dtype=jnp.int32)) // width
  keep = learner[None, :] < k_ref[row_slice][:, None]
  h_ref[row_slice, col_slice] = jnp.where(keep, acc, 0.0).astype(h_ref.dtype)


def _up_kernel(count_ref, tiles_ref, rows_ref, k_ref, x_ref, w1_ref, b1_ref, h_ref, *, per_block, programs,
               persistent, per_learner, **tile_kwargs):
  pid = pl.program_id(0)
  refs = (rows_ref, k_ref, x_ref, w1_ref, b1_ref, h_ref)
  if not persistent:  # one program per (row block, hidden tile); idle ones exit at once
    i, j = pid // per_block, pid % per_block
    block_rows = tile_kwargs["block_rows"]

    @pl.when(j < k_ref[i * block_rows] * per_learner)
    def _():
      _up_tile(i, j, *refs, **tile_kwargs)
    return
  mine = jnp.maximum(count_ref[0] - pid + programs - 1, 0) // programs

  def tile_body(t, carry):
    tile = tiles_ref[pid + t * programs]
    _up_tile(tile // per_block, tile % per_block, *refs, **tile_kwargs)
    return carry

  jax.lax.fori_loop(0, mine, tile_body, 0)


def _down_kernel(poison_ref, rows_ref, k_ref, h_ref, w2_ref, bias_ref, out_ref, *, block_rows,
                 block_out, block_k, width, tokens, col_blocks):
  p = pl.program_id(0)
  i, c = p // col_blocks, p % col_blocks
  row_slice = pl.ds(i * block_rows, block_rows)
  col_slice = pl.ds(c * block_out, block_out)
  k_rows = k_ref[row_slice]
  trips = k_ref[i * block_rows] * (width // block_k)

  def body(s, acc):
    hs = h_ref[row_slice, pl.ds(s * block_k, block_k)]
    ws = w2_ref[pl.ds(s * block_k, block_k), col_slice]
    return acc + jnp.dot(hs, ws, precision=_precision(hs.dtype), preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, trips, body, jnp.zeros((block_rows, block_out), jnp.float32))
  cols = (c * block_out + jnp.arange(block_out, dtype=jnp.int32))[None, :]
  acc = acc + bias_ref[k_rows[:, None], cols].astype(jnp.float32)
  acc = acc + poison_ref[0]
  in_range = (i * block_rows + jnp.arange(block_rows, dtype=jnp.int32)) < tokens
  dst = rows_ref[row_slice][:, None]
  from jax.experimental.pallas import triton as plgpu
  plgpu.store(out_ref.at[dst, cols], acc.astype(out_ref.dtype), mask=in_range[:, None])


def _compiler_params(num_warps, num_stages):
  from jax.experimental.pallas import triton as plgpu
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def acm_mlp(x, k, w1, b1, w2, bias_table, *, num_learners: int, activation: str = "gelu",
            block_rows=None, block_hidden=None, block_out=None, num_warps=None, num_stages=None,
            block_k=None, order=None, x_gather: str = "kernel", persistent: bool = False,
            fast_math: bool | None = None, interpret: bool | None = None) -> jax.Array:
  """ACM MLP for tokens sorted by k (descending), skipping unused learners.

  x (T, d) bf16/f32, k (T,) int in 0..N, w1 (d, N*h), b1 (N*h,), w2 (N*h, d),
  bias_table (N+1, d) (cumulative per-choice bias), all in x.dtype. Returns
  (T, d) in x.dtype, accumulated in float32.

  block_rows: tokens per row block (both kernels); block_hidden: hidden units per
  up-kernel tile (must divide h); block_out: output columns per down-kernel
  tile; block_k: reduction chunk (over d in the up kernel, over hidden units
  in the down kernel). block_k, num_warps and num_stages take an int for both
  kernels or a pair (up, down). Unset values take the tuned
  defaults of this GPU (`resolve_config`).
  order: optional (T,) permutation with k[order] descending; x and k are then
  in their original token order, and so is the output (gather and scatter
  happen inside the kernels).
  x_gather: with `order`, "kernel" gathers x's rows inside the up kernel;
  "xla" gathers them first with an XLA gather and lets the kernel use block
  loads. persistent: see `up_projection`.
  interpret: run the kernels in the Pallas interpreter; None means "when the
  default backend is not a GPU", so the same call works on CPU (slowly).
  """
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  tokens, dim, width = validate_inputs(x, k, w1, b1, w2, bias_table, num_learners=num_learners,
                                       activation=activation, order=order)
  cfg = resolve_config(x.dtype, dim, width, block_rows=block_rows, block_hidden=block_hidden,
                       block_out=block_out, block_k=block_k, num_warps=num_warps, num_stages=num_stages)
  if x_gather not in ("kernel", "xla"):
    raise ValueError(f"x_gather must be 'kernel' or 'xla', got {x_gather!r}")
  prep = prepare(k, order, tokens=tokens, num_learners=num_learners, width=width,
                 block_rows=cfg.block_rows, block_hidden=cfg.block_hidden, tile_table=persistent)
  gather = order is not None and x_gather == "kernel"
  if order is not None and not gather:
    x = jnp.take(x, prep.rows[:tokens], axis=0)
  hidden = up_projection(prep, x, w1, b1, cfg=cfg, num_learners=num_learners, activation=activation,
                         interpret=interpret, gather=gather, persistent=persistent, fast_math=fast_math)
  return down_projection(prep, hidden, w2, bias_table, cfg=cfg, tokens=tokens, interpret=interpret)


def up_projection(prep: Prepared, x, w1, b1, *, cfg: KernelConfig, num_learners: int, activation: str,
                  interpret: bool = False, gather: bool = True, persistent: bool = False,
                  fast_math: bool | None = None) -> jax.Array:
  """First launch: the (T_pad, N*h) hidden buffer, written only on active tiles.

  gather: read x's rows through prep.rows (x in token order); False: x is
  already in sorted order and is read with block loads. persistent: walk the
  active-tile table with ~2 programs per SM; False: one program per (row
  block, hidden tile), idle ones returning at once. fast_math: GELU on the
  hardware tanh (default: for bfloat16 x on a GPU, where its error is below
  bfloat16 rounding; float32 keeps the erf polynomial).
  """
  if fast_math is None:
    fast_math = x.dtype == jnp.bfloat16
  fast_math = fast_math and not interpret  # the interpreter cannot run PTX
  tokens, dim = x.shape
  width = w1.shape[1] // num_learners
  t_pad = prep.num_row_blocks * cfg.block_rows
  per_block = num_learners * width // cfg.block_hidden
  programs = up_programs(prep.num_row_blocks * per_block, persistent, interpret)
  return pl.pallas_call(
      functools.partial(_up_kernel, block_rows=cfg.block_rows, block_hidden=cfg.block_hidden,
                        block_k=cfg.block_k[0], dim=dim, width=width, per_block=per_block,
                        activation=activation, programs=programs, tokens=tokens, gather=gather,
                        persistent=persistent, per_learner=width // cfg.block_hidden,
                        fast_math=fast_math),
      out_shape=jax.ShapeDtypeStruct((t_pad, num_learners * width), x.dtype),
      grid=(programs,),
      compiler_params=None if interpret else _compiler_params(cfg.num_warps[0], cfg.num_stages[0]),
      interpret=interpret,
      name="acm_mlp_up",
  )(prep.count, prep.tiles, prep.rows, prep.k, x, w1, b1)


def down_projection(prep: Prepared, hidden, w2, bias_table, *, cfg: KernelConfig, tokens: int,
                    interpret: bool = False) -> jax.Array:
  """Second launch: (T, d) output rows, scattered to their tokens' places."""
  dim = w2.shape[1]
  width = w2.shape[0] // (bias_table.shape[0] - 1)
  col_blocks = dim // cfg.block_out
  return pl.pallas_call(
      functools.partial(_down_kernel, block_rows=cfg.block_rows, block_out=cfg.block_out,
                        block_k=cfg.block_k[1], width=width, tokens=tokens, col_blocks=col_blocks),
      out_shape=jax.ShapeDtypeStruct((tokens, dim), hidden.dtype),
      grid=(prep.num_row_blocks * col_blocks,),
      compiler_params=None if interpret else _compiler_params(cfg.num_warps[1], cfg.num_stages[1]),
      interpret=interpret,
      name="acm_mlp_down",
  )(prep.poison, prep.rows, prep.k, hidden, w2, bias_table)
