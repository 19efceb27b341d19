"""The down projection of sorted ACM learners as a warp-specialised Mosaic GPU kernel (Hopper).

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


def check(hidden_shape, w2_shape, dtype, cfg: DownConfig) -> None:
  """Raise a ValueError naming the value when these shapes do not fit the kernel's tiles."""
  rows, total = hidden_shape
  total2, dim = w2_shape
  if total != total2:
    raise ValueError(f"hidden has {total} columns but w2 has {total2} rows")
  if jnp.dtype(dtype) != jnp.bfloat16:
    raise ValueError(f"the Mosaic GPU down kernel takes bfloat16 (float32 would run as tf32), got {dtype}")
  if cfg.split not in ("m", "n"):
    raise ValueError(f"split={cfg.split!r}; expected 'm' or 'n'")
  for name, whole, part in (("rows", rows, cfg.rows), ("d", dim, cfg.cols), ("N*h", total, cfg.block_k),
                            ("tile_m", cfg.tile_m, cfg.epi), ("tile_n", cfg.tile_n, cfg.epi)):
    if whole % part:
      raise ValueError(f"{name}={whole} is not a multiple of {part} (DownConfig {cfg})")


def _tiled(block_minor: int, dtype):
  """Shared-memory transforms for tiles whose minor dimension holds `block_minor` elements."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = plgpu.find_swizzle(block_minor * itemsize * 8)
  return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _down_kernel(steps_gmem, h_gmem, w_gmem, y_gmem, *, cfg: DownConfig, max_steps: int):
  from jax.experimental.pallas import mosaic_gpu as plgpu
  dtype = h_gmem.dtype
  rows, _ = h_gmem.shape
  _, dim = w_gmem.shape
  m_iters, n_iters = rows // cfg.rows, dim // cfg.cols
  in_tf = _tiled(cfg.block_k, dtype)
  out_tf = _tiled(cfg.epi, y_gmem.dtype)
  pieces = (cfg.tile_m // cfg.epi) * (cfg.tile_n // cfg.epi)
  slots = min(2, pieces)

  def pipeline(body, context, steps):
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(steps,), memory_registers=40, wg_axis="wg", num_compute_wgs=2,
        max_concurrent_steps=cfg.stages, compute_context=context,
        in_specs=[
            plgpu.BlockSpec((cfg.rows, cfg.block_k), lambda s: (0, s), transforms=in_tf,
                            memory_space=plgpu.SMEM),
            plgpu.BlockSpec((cfg.block_k, cfg.cols), lambda s: (s, 0), transforms=in_tf,
                            memory_space=plgpu.SMEM),
        ])

  nothing = lambda *_, **__: None

  @functools.partial(
      pl.run_scoped,
      allocs=pipeline(nothing, nothing, max_steps).get_allocations(h_gmem, w_gmem),
      out_smem=plgpu.SMEM((2, slots, cfg.epi, cfg.epi), y_gmem.dtype, transforms=out_tf),
      collective_axes="wg",
  )
  def _scope(allocs, out_smem):
    wg = lax.axis_index("wg")

    @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
    def _tile(info):
      (lin,) = info.index
      mi, ni = lin // n_iters, lin % n_iters  # row blocks in sorted order: the heavy ones first
      row_slice = pl.ds(mi * cfg.rows, cfg.rows)
      col_slice = pl.ds(ni * cfg.cols, cfg.cols)
      if cfg.split == "m":
        wg_rows, wg_cols = pl.ds(wg * cfg.tile_m, cfg.tile_m), slice(None)
      else:
        wg_rows, wg_cols = slice(None), pl.ds(wg * cfg.tile_n, cfg.tile_n)
      steps = jnp.maximum(steps_gmem[mi], 1)

      def context(run):
        @functools.partial(pl.run_scoped, acc=plgpu.ACC((cfg.tile_m, cfg.tile_n), jnp.float32))
        def _acc(acc):
          run(acc)
          out = acc[...].astype(y_gmem.dtype)
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
                  out_smem.at[wg, slot], y_gmem.at[row_slice, col_slice].at[wg_rows, wg_cols].at[ms, ns])

      def mma(_, h_smem, w_smem, acc):
        plgpu.wgmma(acc, h_smem.at[wg_rows], w_smem.at[:, wg_cols])
        plgpu.wgmma_wait(0)
        return acc

      pipeline(mma, context, steps)(h_gmem.at[row_slice, :], w_gmem.at[:, col_slice], allocations=allocs)

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


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
      grid=(num_sms(),), grid_names=("sm",), num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      **params)
  return call(steps.astype(jnp.int32), hidden, w2)


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
