"""The down and up projections of sorted ACM learners as warp-specialised Mosaic GPU kernels (Hopper).

Of the sorted path of `acm_fused` (route, scatter, up, down), the down launch is a plain
matmul with a reduction of dynamic length: for the tokens in sorted order (k descending),

    y[rows] = hidden[rows, :K(rows)] @ w2[:K(rows), :],   K(rows) = k(first row) * h,

where the up launch has already zeroed every hidden unit past each row's own k, so the
row block's largest k bounds the reduction for all of its rows. This kernel has the structure of a fast Hopper
matmul in Pallas' Mosaic GPU dialect: one program per SM walking the output tiles
(persistent), a memory warpgroup that streams (rows, block_k) and (block_k, cols) tiles
through shared memory with TMA, and two compute warpgroups issuing wgmma into float32
accumulators, each on half of the tile. What is specific to ACMs is the pipeline's trip
count: read per row block from `steps`, so a block of tokens with k = 1 costs a quarter
of a block with k = 4.

TMA copies whole rectangles, so the kernel cannot gather or scatter rows: it reads the
hidden buffer in sorted order (which is how the up launch writes it) and writes y in
sorted order; `acm_fused` gathers y back to token order and adds the output bias of each
token's k in one XLA fusion. Rows with k = 0 are never read from y (their blocks' hidden
units were never written).

Measured on an H200 (benchmarks/RESULTS.md, 2026-12-03; one ViT-B MLP ACM at 50,432 tokens, k/N
0.5): this kernel 0.169 ms, the Triton down launch 0.210 ms, but the gather back 0.058 ms, so
`acm_fused` leaves it off (`MGPU_DOWN_MIN_TOKENS = None`). Moving the scatter into the epilogue
(one single-row TMA store per sorted row to its token's row, output bias and k = 0 rows handled
there) was tried on 2026-12-04 and was slower still: +0.07-0.09 ms per call at 50,432 tokens, the
whole ViT-B/16 1.31 instead of 1.39x dense at batch 256 (benchmarks/RESULTS.md, 2026-12-04 (iii)).

`up_projection` is the same structure for the sorted path's up launch: x gathered into sorted
order by XLA first (TMA cannot gather rows), act(x @ w1 + b1) per tile, each row's hidden units past
its own k zeroed in the epilogue (a tile belongs to one learner n when h is a multiple of the tile's
width, and sorted row p keeps learner n exactly while p < #tokens with k > n), tiles past their row
block's largest k skipped. The kernel walks only the tiles some row needs (`active_tiles`, listed by
XLA row block by row block, a dynamic `nd_loop` count): a static walk over every tile handed each SM
the same column tile (132 SMs, 12 column tiles) and left most SMs idle. On an H200 (2026-12-05) it
took 207 us against the Triton up launch's 253 at 50,432 tokens and k/N 0.5. The XLA gather of x
into sorted order took another 54 us, so `acm_fused` leaves it off (`MGPU_UP_MIN_TOKENS = None`).
It would pay where TMA can gather rows.

Lowering needs a Hopper GPU (sm_90a). On other backends the kernel runs in Mosaic GPU's
interpret mode (`interpret=True`: threads, barriers, TMA and wgmma simulated on the CPU,
slow; for tests).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


@dataclasses.dataclass(frozen=True)
class DownConfig:
  """Tiles of one compute warpgroup (tile_m x tile_n); the two warpgroups of a program
  split the program's tile along `split` ("m": a program covers 2*tile_m rows; "n": 2*tile_n
  columns). block_k: the reduction step; stages: tiles in flight per input."""
  tile_m: int = 64
  tile_n: int = 128
  block_k: int = 64
  stages: int = 4
  split: str = "n"
  epi: int = 64  # the epilogue stores the tile in (epi x epi) pieces
  # 1: each step's wgmma stays in flight while the next one is issued (its input slots are released a
  # step later); 0: every step waits for its wgmma
  delay_release: int = 0

  @property
  def rows(self) -> int:  # rows of one program's tile
    return self.tile_m * (2 if self.split == "m" else 1)

  @property
  def cols(self) -> int:
    return self.tile_n * (2 if self.split == "n" else 1)


HOPPER_SMS = 132  # H100 / H200 SXM


def num_sms() -> int:
  dev = jax.devices()[0]
  if dev.platform != "gpu":
    return HOPPER_SMS
  return getattr(dev, "core_count", None) or HOPPER_SMS


def persistent_grid(max_tiles: int) -> int:
  """Programs of a persistent launch over at most `max_tiles` output tiles: one per SM, or one per tile where
  there are fewer (a program without a tile would only start and stop; in interpret mode each one is simulated)."""
  return max(1, min(num_sms(), max_tiles))


def _check_tiles(kernel: str, dtype, cfg: DownConfig, multiples) -> None:
  """The checks both kernels share: bfloat16, the config's switches, and each (name, whole, part) of
  `multiples` a multiple."""
  if jnp.dtype(dtype) != jnp.bfloat16:
    raise ValueError(f"the Mosaic GPU {kernel} kernel takes bfloat16 (float32 would run as tf32), got {dtype}")
  if cfg.delay_release not in (0, 1):
    raise ValueError(f"delay_release={cfg.delay_release}; expected 0 or 1")
  if cfg.split not in ("m", "n"):
    raise ValueError(f"split={cfg.split!r}; expected 'm' or 'n'")
  for name, whole, part in (*multiples, ("tile_m", cfg.tile_m, cfg.epi), ("tile_n", cfg.tile_n, cfg.epi)):
    if whole % part:
      raise ValueError(f"{name}={whole} is not a multiple of {part} (DownConfig {cfg})")


def check(hidden_shape, w2_shape, dtype, cfg: DownConfig) -> None:
  """Raise a ValueError naming the value when these shapes do not fit the down kernel's tiles."""
  rows, total = hidden_shape
  total2, dim = w2_shape
  if total != total2:
    raise ValueError(f"hidden has {total} columns but w2 has {total2} rows")
  _check_tiles("down", dtype, cfg, (("rows", rows, cfg.rows), ("d", dim, cfg.cols), ("N*h", total, cfg.block_k)))


def _tiled(block_minor: int, dtype):
  """Shared-memory transforms for tiles whose minor dimension holds `block_minor` elements."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = plgpu.find_swizzle(block_minor * itemsize * 8)
  return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _tiled_matmul(a_gmem, b_gmem, out_gmem, *, cfg: DownConfig, num_tiles, tile_of, steps_of, max_steps: int,
                  epilogue):
  """The body both kernels share: for each of `num_tiles` tiles (an int, or a traced count) spread over
  the SMs, (mi, ni) = tile_of(lin) names a (cfg.rows, cfg.cols) tile of out; a memory warpgroup streams
  (rows, block_k) tiles of a and (block_k, cols) tiles of b through shared memory with TMA for
  steps_of(mi) reduction steps (at most max_steps), two compute warpgroups issue wgmma into float32
  accumulators, each on half of the tile, and epilogue(acc, first_row, first_col) -> the half tile in
  out's dtype (first_*: its offsets in out) is stored in (epi x epi) pieces with TMA."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  in_tf = _tiled(cfg.block_k, a_gmem.dtype)
  out_tf = _tiled(cfg.epi, out_gmem.dtype)
  slots = min(2, (cfg.tile_m // cfg.epi) * (cfg.tile_n // cfg.epi))

  def pipeline(body, context, steps):
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(steps,), memory_registers=40, wg_axis="wg", num_compute_wgs=2,
        max_concurrent_steps=cfg.stages, compute_context=context,
        in_specs=[
            plgpu.BlockSpec((cfg.rows, cfg.block_k), lambda s: (0, s), transforms=in_tf, memory_space=plgpu.SMEM,
                            delay_release=cfg.delay_release),
            plgpu.BlockSpec((cfg.block_k, cfg.cols), lambda s: (s, 0), transforms=in_tf, memory_space=plgpu.SMEM,
                            delay_release=cfg.delay_release),
        ])

  nothing = lambda *_, **__: None

  @functools.partial(
      pl.run_scoped,
      allocs=pipeline(nothing, nothing, max_steps).get_allocations(a_gmem, b_gmem),
      out_smem=plgpu.SMEM((2, slots, cfg.epi, cfg.epi), out_gmem.dtype, transforms=out_tf),
      collective_axes="wg",
  )
  def _scope(allocs, out_smem):
    wg = lax.axis_index("wg")

    @plgpu.nd_loop((num_tiles,), collective_axes="sm")
    def _tile(info):
      (lin,) = info.index
      mi, ni = tile_of(lin)
      row_slice = pl.ds(mi * cfg.rows, cfg.rows)
      col_slice = pl.ds(ni * cfg.cols, cfg.cols)
      if cfg.split == "m":
        wg_rows, wg_cols = pl.ds(wg * cfg.tile_m, cfg.tile_m), slice(None)
      else:
        wg_rows, wg_cols = slice(None), pl.ds(wg * cfg.tile_n, cfg.tile_n)

      def context(run):
        @functools.partial(pl.run_scoped, acc=plgpu.ACC((cfg.tile_m, cfg.tile_n), jnp.float32))
        def _acc(acc):
          run(acc)
          first_row = mi * cfg.rows + (wg * cfg.tile_m if cfg.split == "m" else 0)
          first_col = ni * cfg.cols + (wg * cfg.tile_n if cfg.split == "n" else 0)
          out = epilogue(acc[...], first_row, first_col)
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          piece = 0
          for pm in range(cfg.tile_m // cfg.epi):
            for pn in range(cfg.tile_n // cfg.epi):
              ms, ns = slice(pm * cfg.epi, (pm + 1) * cfg.epi), slice(pn * cfg.epi, (pn + 1) * cfg.epi)
              slot = piece % slots
              piece += 1
              plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)
              out_smem[wg, slot] = out[ms, ns]
              plgpu.commit_smem()
              plgpu.copy_smem_to_gmem(
                  out_smem.at[wg, slot], out_gmem.at[row_slice, col_slice].at[wg_rows, wg_cols].at[ms, ns])

      def mma(_, a_smem, b_smem, acc):
        plgpu.wgmma(acc, a_smem.at[wg_rows], b_smem.at[:, wg_cols])
        plgpu.wgmma_wait(cfg.delay_release)
        return acc

      pipeline(mma, context, steps_of(mi))(a_gmem.at[row_slice, :], b_gmem.at[:, col_slice], allocations=allocs)

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _down_kernel(steps_gmem, h_gmem, w_gmem, y_gmem, *, cfg: DownConfig, max_steps: int):
  n_iters = w_gmem.shape[1] // cfg.cols
  _tiled_matmul(h_gmem, w_gmem, y_gmem, cfg=cfg, num_tiles=(h_gmem.shape[0] // cfg.rows) * n_iters,
                # row blocks in sorted order: the heavy ones first
                tile_of=lambda lin: (lin // n_iters, lin % n_iters),
                steps_of=lambda mi: jnp.maximum(steps_gmem[mi], 1), max_steps=max_steps,
                epilogue=lambda acc, row, col: acc.astype(y_gmem.dtype))


def down_projection(hidden: jax.Array, w2: jax.Array, steps: jax.Array, *, cfg: DownConfig = DownConfig(),
                    out_dtype=None, interpret: bool = False) -> jax.Array:
  """y (R, d) = hidden[rows, :steps[b] * block_k] @ w2[:steps[b] * block_k] for each row block b of
  cfg.rows rows. hidden (R, N*h) and w2 (N*h, d) bfloat16; steps (R // cfg.rows,) int32, clamped to
  [1, N*h / block_k] by the caller's construction (values < 1 run one step)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  check(hidden.shape, w2.shape, hidden.dtype, cfg)
  rows, total = hidden.shape
  if steps.shape != (rows // cfg.rows,):
    raise ValueError(f"steps has shape {steps.shape}; expected ({rows // cfg.rows},), one per block of {cfg.rows} rows")
  out_dtype = jnp.dtype(out_dtype or hidden.dtype)
  params = {}
  if interpret:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    params["interpret"] = InterpretGPUParams()
  call = plgpu.kernel(
      functools.partial(_down_kernel, cfg=cfg, max_steps=total // cfg.block_k),
      out_type=jax.ShapeDtypeStruct((rows, w2.shape[1]), out_dtype),
      grid=(persistent_grid((rows // cfg.rows) * (w2.shape[1] // cfg.cols)),), grid_names=("sm",),
      num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      **params)
  return call(steps.astype(jnp.int32), hidden, w2)


UP_ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "identity")
_SQRT_2_OVER_PI = 0.7978845608028654


def _up_activation(v, activation):
  """The epilogue's activation on float32; both GELUs in their tanh form (as the Triton kernels'
  bfloat16 path, `acm_mlp._gelu_fast`), tanh lowered to the hardware's approximate tanh by the
  kernel's `approx_math`."""
  if activation in ("gelu", "gelu_tanh"):
    return 0.5 * v * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (v + 0.044715 * v * v * v)))
  if activation == "relu":
    return jnp.maximum(v, 0.0)
  return v


def check_up(x_shape, w1_shape, dtype, cfg: DownConfig, width: int) -> None:
  """Raise a ValueError naming the value when these shapes do not fit the up kernel's tiles."""
  rows, dim = x_shape
  dim2, total = w1_shape
  if dim != dim2:
    raise ValueError(f"x has {dim} columns but w1 has {dim2} rows")
  _check_tiles("up", dtype, cfg, (("rows", rows, cfg.rows), ("N*h", total, cfg.cols), ("d", dim, cfg.block_k),
                                  ("learner width h", width, cfg.tile_n)))


def _biased_activation(acc, b1_gmem, col, *, cfg: DownConfig, activation: str, interpret: bool):
  """act(acc + b1[col:col + tile_n]) in float32: the up kernels' epilogue before any masking."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  if interpret:
    bias = b1_gmem[pl.ds(col, cfg.tile_n)]
  else:
    bias = plgpu.load(b1_gmem.at[pl.ds(col, cfg.tile_n)], (), optimized=False)
  return _up_activation(acc + lax.broadcast_in_dim(bias, (cfg.tile_m, cfg.tile_n), (1,)), activation)


def _up_kernel(count_gmem, tiles_gmem, thr_gmem, b1_gmem, x_gmem, w_gmem, h_gmem, *, cfg: DownConfig, width: int,
               activation: str, interpret: bool):
  n_iters = w_gmem.shape[1] // cfg.cols
  steps = x_gmem.shape[1] // cfg.block_k

  def tile_of(lin):
    tile = tiles_gmem[lin]
    return tile // n_iters, tile % n_iters

  def epilogue(acc, row, col):
    v = _biased_activation(acc, b1_gmem, col, cfg=cfg, activation=activation, interpret=interpret)
    pos = row + lax.broadcasted_iota(jnp.int32, (cfg.tile_m, cfg.tile_n), 0)
    return jnp.where(pos < thr_gmem[col // width], v, 0.0).astype(h_gmem.dtype)

  # only the active tiles, in row-major order: the SMs share each row block's x through L2, and
  # every SM gets its share of the work whatever the staircase of k looks like
  _tiled_matmul(x_gmem, w_gmem, h_gmem, cfg=cfg, num_tiles=count_gmem[0], tile_of=tile_of,
                steps_of=lambda mi: steps, max_steps=steps, epilogue=epilogue)


def active_tiles(block_maxk: jax.Array, *, width: int, cols: int, n_iters: int) -> tuple[jax.Array, jax.Array]:
  """(count (1,), tiles (m_iters * n_iters,)) int32: the up kernel's tiles that some row of their
  block needs (column tile < the block's largest k * width), row block by row block, each as
  row block * n_iters + column tile; entries from `count` on are not read."""
  m_iters = block_maxk.shape[0]
  per_block = jnp.minimum((block_maxk.astype(jnp.int32) * width + cols - 1) // cols, n_iters)
  ends = jnp.cumsum(per_block)
  lin = jnp.arange(m_iters * n_iters, dtype=jnp.int32)
  block = jnp.minimum(jnp.sum((ends[None, :] <= lin[:, None]).astype(jnp.int32), axis=1), m_iters - 1)
  col = lin - (ends[block] - per_block[block])
  return ends[-1:], block * n_iters + col


def up_projection(x_sorted: jax.Array, w1: jax.Array, b1: jax.Array, block_maxk: jax.Array, thresholds: jax.Array,
                  *, width: int, activation: str = "gelu", cfg: DownConfig = DownConfig(tile_m=128),
                  interpret: bool = False) -> jax.Array:
  """hidden (R, N*h) = act(x_sorted @ w1 + b1) for rows in sorted order (k descending), where
  sorted row p keeps learner n's units only while p < thresholds[n] (#tokens with k > n) and is
  zero elsewhere; the tiles of row block b (cfg.rows rows) at or past block_maxk[b] * width are
  not written. x_sorted (R, d) and w1 (d, N*h) bfloat16; b1 (N*h,); block_maxk (R // cfg.rows,)
  and thresholds (N,) int32. Both GELUs run in their tanh form."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  if activation not in UP_ACTIVATIONS:
    raise ValueError(f"activation {activation!r}; the Mosaic GPU up kernel takes one of {UP_ACTIVATIONS}")
  check_up(x_sorted.shape, w1.shape, x_sorted.dtype, cfg, width)
  rows, total = x_sorted.shape[0], w1.shape[1]
  if block_maxk.shape != (rows // cfg.rows,):
    raise ValueError(f"block_maxk has shape {block_maxk.shape}; expected ({rows // cfg.rows},), one per block of "
                     f"{cfg.rows} rows")
  if thresholds.shape != (total // width,):
    raise ValueError(f"thresholds has shape {thresholds.shape}; expected ({total // width},), one per learner")
  params = {}
  if interpret:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    params["interpret"] = InterpretGPUParams()
  call = plgpu.kernel(
      functools.partial(_up_kernel, cfg=cfg, width=width, activation=activation, interpret=interpret),
      out_type=jax.ShapeDtypeStruct((rows, total), x_sorted.dtype),
      grid=(persistent_grid((rows // cfg.rows) * (total // cfg.cols)),), grid_names=("sm",),
      num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
                                           approx_math=not interpret),
      **params)
  count, tiles = active_tiles(block_maxk, width=width, cols=cfg.cols, n_iters=total // cfg.cols)
  return call(count, tiles, thresholds.astype(jnp.int32), b1.astype(jnp.float32), x_sorted, w1)


def region_tiles(counts, *, rows: int, region_rows: int, cols: int, width: int):
  """The region up kernel's walk as a function of the token counts of categories n = 0 .. N-1 (k = N - n), each
  a scalar (traced inside the kernel, or a Python int): (number of tiles, tile_of) where tile_of(lin) = (row
  block, column tile) of hidden, region by region (k descending), row block by row block, column tile by column
  tile. Region n starts at row n * region_rows and holds ceil(count / rows) row blocks of k * width / cols
  column tiles (rounded up)."""
  num_learners = len(counts)
  per_block = [-(-(num_learners - n) * width // cols) for n in range(num_learners)]
  blocks = [(c + rows - 1) // rows for c in counts]
  ends, end = [], 0
  for n in range(num_learners):
    end = end + blocks[n] * per_block[n]
    ends.append(end)

  def tile_of(lin):
    mi = ni = lin * 0
    start = 0
    for n in range(num_learners):
      inside = (lin >= start) & (lin < ends[n])
      local = lin - start
      mi = jnp.where(inside, n * (region_rows // rows) + local // per_block[n], mi)
      ni = jnp.where(inside, local % per_block[n], ni)
      start = ends[n]
    return mi, ni

  return ends[-1], tile_of


def _up_regions_kernel(counts_gmem, b1_gmem, x_gmem, w_gmem, h_gmem, *, cfg: DownConfig, width: int,
                       num_learners: int, region_rows: int, activation: str, interpret: bool):
  counts = [counts_gmem[n].astype(jnp.int32) for n in range(num_learners)]
  num_tiles, tile_of = region_tiles(counts, rows=cfg.rows, region_rows=region_rows, cols=cfg.cols, width=width)
  steps = x_gmem.shape[1] // cfg.block_k
  _tiled_matmul(x_gmem, w_gmem, h_gmem, cfg=cfg, num_tiles=num_tiles, tile_of=tile_of,
                steps_of=lambda mi: steps, max_steps=steps,
                epilogue=lambda acc, row, col: _biased_activation(
                    acc, b1_gmem, col, cfg=cfg, activation=activation, interpret=interpret).astype(h_gmem.dtype))


def up_regions(x_regions: jax.Array, w1: jax.Array, b1: jax.Array, counts: jax.Array, *, width: int,
               activation: str = "gelu", cfg: DownConfig = DownConfig(tile_m=128), interpret: bool = False
               ) -> jax.Array:
  """The up projection over tokens filed by k in regions: region n (k = N - n, n < N) holds rows n * R ...
  n * R + counts[n] - 1 of x_regions ((N + 1) * R, d), R = x_regions.shape[0] // (N + 1), a multiple of cfg.rows
  (region N, k = 0, is not read: the route's masked lanes address it). Writes
  hidden (N * R, N*h) = act(x_regions @ w1 + b1) for those rows' row blocks and only their first k * h units
  (rounded up to whole column tiles); every row of a region has the same k, so nothing is masked, and the
  tiles are derived from `counts` inside the kernel (`region_tiles`): no tile list to build first. Rows of a
  block past its region's count and tiles it skips are left unwritten. counts (at least N,) float32 or int32
  (the route's atomic counters); both GELUs run in their tanh form."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  if activation not in UP_ACTIVATIONS:
    raise ValueError(f"activation {activation!r}; the Mosaic GPU up kernel takes one of {UP_ACTIVATIONS}")
  check_up(x_regions.shape, w1.shape, x_regions.dtype, cfg, width)
  rows, total = x_regions.shape[0], w1.shape[1]
  num_learners = total // width
  if rows % (num_learners + 1) or (rows // (num_learners + 1)) % cfg.rows:
    raise ValueError(f"x_regions has {rows} rows: expected {num_learners + 1} regions (one per k = {num_learners} .. "
                     f"0) of a multiple of {cfg.rows} rows each")
  region = rows // (num_learners + 1)
  if counts.ndim != 1 or counts.shape[0] < num_learners:
    raise ValueError(f"counts has shape {counts.shape}; expected at least ({num_learners},), one per region")
  params = {}
  if interpret:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    params["interpret"] = InterpretGPUParams()
  call = plgpu.kernel(
      functools.partial(_up_regions_kernel, cfg=cfg, width=width, num_learners=num_learners,
                        region_rows=region, activation=activation, interpret=interpret),
      out_type=jax.ShapeDtypeStruct((num_learners * region, total), x_regions.dtype),
      grid=(persistent_grid((region // cfg.rows + 1) * (total // cfg.cols)),), grid_names=("sm",),
      num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
                                           approx_math=not interpret),
      **params)
  return call(counts, b1.astype(jnp.float32), x_regions, w1)


def up_regions_reference(x_regions, w1, b1, counts, *, width: int, rows: int, cols: int, activation: str = "gelu"):
  """`up_regions`' contract in plain jnp (float32), with what it leaves unwritten poisoned (NaN): rows of
  region n's row blocks (`rows` each) up to its count, units below k * width rounded up to `cols`."""
  f32 = jnp.float32
  total = w1.shape[1]
  num_learners = total // width
  region = x_regions.shape[0] // (num_learners + 1)
  x_regions = x_regions[:num_learners * region]
  v = _up_activation(jnp.dot(x_regions.astype(f32), w1.astype(f32), precision="highest") + b1.astype(f32),
                     activation)
  r = jnp.arange(x_regions.shape[0])
  n, j = r // region, r % region
  count = jnp.asarray(counts, jnp.int32)[:num_learners][n]
  written_rows = j < -(-count // rows) * rows
  units = -(-(num_learners - n) * width // cols) * cols
  written = written_rows[:, None] & (jnp.arange(total)[None, :] < units[:, None])
  return jnp.where(written, v, jnp.nan)


def up_projection_reference(x_sorted, w1, b1, thresholds, *, width: int, activation: str = "gelu") -> jax.Array:
  """`up_projection`'s contract in plain jnp (float32), every tile written: rows past a learner's
  threshold zero."""
  f32 = jnp.float32
  v = jnp.dot(x_sorted.astype(f32), w1.astype(f32), precision="highest") + b1.astype(f32)
  v = _up_activation(v, activation)
  learner = jnp.arange(w1.shape[1]) // width
  keep = jnp.arange(x_sorted.shape[0])[:, None] < thresholds[learner][None, :]
  return jnp.where(keep, v, 0.0)


def down_projection_reference(hidden, w2, steps, *, rows: int, block_k: int, out_dtype=None) -> jax.Array:
  """`down_projection`'s contract in plain jnp (float32 accumulation): each block of `rows`
  rows reduces over its first max(steps[b], 1) * block_k hidden units."""
  f32 = jnp.float32
  cols = jnp.arange(hidden.shape[1])
  limit = jnp.repeat(jnp.maximum(steps, 1) * block_k, rows)[:, None]
  masked = jnp.where(cols[None, :] < limit, hidden.astype(f32), 0.0)
  y = jnp.dot(masked, w2.astype(f32), precision="highest")
  return y.astype(out_dtype or hidden.dtype)


def block_steps(sorted_k: jax.Array, *, rows: int, block_rows: int, width: int, block_k: int,
                tokens: int) -> jax.Array:
  """Reduction steps of each block of `block_rows` sorted rows: its first (largest) k times the
  learner width, in block_k steps. sorted_k (rows,), entries past `tokens` ignored."""
  first = sorted_k[:rows:block_rows]
  starts = jnp.arange(0, rows, block_rows)
  first = jnp.where(starts < tokens, first, 0)
  return (first * width + block_k - 1) // block_k
