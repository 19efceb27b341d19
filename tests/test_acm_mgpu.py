"""The Mosaic GPU down kernel (`pallas_kernels.acm_mgpu`) and the sorted path that runs it.

Three layers of checks, none needing a GPU:
- the kernel in Mosaic GPU's interpret mode (threads, barriers, TMA and wgmma simulated on the
  CPU) against its plain-jnp contract, with row blocks of different reduction lengths;
- the kernel lowered for CUDA at the ViT-B/16 shapes it serves (the lowering that would run on an
  H100 / H200), which catches tiling and layout errors;
- `acm_group`'s sorted path with the Mosaic GPU down launch (its positions, the gather back, the
  choice bias, k = 0 rows) in Pallas interpret mode, the kernel replaced by its contract so the
  whole path runs in seconds, against the group's plain-jnp reference.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import acm_fused as af
from pallas_kernels import acm_mgpu
from pallas_kernels.fused_testing import bf16_group_shapes, random_group


def rel_err(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)


def test_block_steps_is_the_first_rows_k_in_block_k_steps():
  rng = np.random.default_rng(3)
  for _ in range(5):
    tokens, rows, block = int(rng.integers(1, 700)), 64, int(rng.choice([16, 64]))
    padded = -(-tokens // 128) * 128
    k = np.sort(rng.integers(0, 5, tokens))[::-1]
    sorted_k = np.concatenate([k, rng.integers(-9, 99, padded - tokens)])  # garbage past the tokens
    got = acm_mgpu.block_steps(jnp.asarray(sorted_k, jnp.int32), rows=padded, block_rows=rows, width=96,
                               block_k=block, tokens=tokens)
    want = [(-(-(int(k[s]) * 96) // block) if s < tokens else 0) for s in range(0, padded, rows)]
    np.testing.assert_array_equal(got, want)


def test_reference_contract_reduces_each_block_over_its_steps():
  rng = np.random.default_rng(4)
  h = rng.normal(size=(128, 256)).astype(np.float32)
  w = rng.normal(size=(256, 32)).astype(np.float32)
  got = acm_mgpu.down_projection_reference(jnp.asarray(h), jnp.asarray(w), jnp.asarray([3, 0]), rows=64, block_k=64)
  want = np.concatenate([h[:64, :192] @ w[:192], h[64:, :64] @ w[:64]])  # steps 0 runs one step
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_kernel_in_interpret_mode_matches_its_contract():
  """Two row blocks with reductions of 3 and 1 steps, two output tiles per warpgroup split; the
  simulation takes a few minutes on two cores (it compiles every simulated thread's program)."""
  cfg = acm_mgpu.DownConfig(tile_m=64, tile_n=64, block_k=64, stages=2, split="n", epi=64)
  rng = np.random.default_rng(5)
  hidden = jnp.asarray(rng.normal(size=(128, 192)), jnp.bfloat16)
  w2 = jnp.asarray(rng.normal(size=(192, 128)) / np.sqrt(192), jnp.bfloat16)
  steps = jnp.asarray([3, 1], jnp.int32)
  out = acm_mgpu.down_projection(hidden, w2, steps, cfg=cfg, interpret=True)
  ref = acm_mgpu.down_projection_reference(hidden, w2, steps, rows=64, block_k=64, out_dtype=jnp.float32)
  assert out.shape == (128, 128) and out.dtype == jnp.bfloat16
  assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("total,cfg", [
    (3072, acm_mgpu.DownConfig(tile_m=128, tile_n=128)),  # the MLP ACM at batch 256: 4 learners of 768
    (3072, acm_mgpu.DownConfig(tile_m=64, tile_n=128)),
    (384, acm_mgpu.DownConfig(tile_m=128, tile_n=128)),  # a projection ACM: 4 learners of 96
])
def test_kernel_lowers_for_cuda_at_vit_b_shapes(total, cfg):
  rows = 50432
  args = (jax.ShapeDtypeStruct((rows, total), jnp.bfloat16), jax.ShapeDtypeStruct((total, 768), jnp.bfloat16),
          jax.ShapeDtypeStruct((rows // cfg.rows,), jnp.int32))
  lowered = jax.jit(lambda h, w, s: acm_mgpu.down_projection(h, w, s, cfg=cfg)).trace(*args).lower(
      lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


def _contract(hidden, w2, steps, *, cfg, interpret):
  del interpret
  return acm_mgpu.down_projection_reference(hidden, w2, steps, rows=cfg.rows, block_k=cfg.block_k)


@pytest.mark.parametrize("unsort", af.MGPU_DOWN_UNSORTS)
@pytest.mark.parametrize("tokens,width,size,act,min_choice,k_kind,residual,bias", [
    (1, 64, 1, "gelu", 0, "random", True, True),
    (197, 64, 1, "gelu", 0, "random", True, True),
    (197, 64, 1, "gelu", 0, "random", False, False),
    (197, 64, 1, "gelu", 0, "zeros", True, True),
    (197, 64, 1, "gelu", 0, "full", False, True),
    (300, 16, 3, "identity", 1, "random", True, True),  # a q/k/v group: min_choice 1, learners narrower than a block_k
])
def test_sorted_path_with_the_mosaic_down_launch_matches_the_reference(tokens, width, size, act, min_choice,
                                                                        k_kind, residual, bias, unsort, monkeypatch):
  """Both ways back to token order (XLA's gather, or the unsort launch adding the bias and the residual)
  against the reference, with and without output biases and a skip connection."""
  monkeypatch.setattr(acm_mgpu, "down_projection", _contract)
  monkeypatch.setattr(af, "MGPU_DOWN_UNSORT", unsort)
  monkeypatch.setitem(af.MGPU_DOWN_TILES, "tile_n", 32)
  monkeypatch.setitem(af.MGPU_DOWN_TILES, "block_k", 16)
  monkeypatch.setitem(af.MGPU_DOWN_TILES, "epi", 32)
  n, dim = 4, 64
  x, groups = random_group(tokens + width, tokens, dim, n, width, size, jnp.bfloat16, k_kind=k_kind, bias=bias)
  skip = jnp.asarray(np.random.default_rng(tokens).normal(size=(tokens, dim)), jnp.bfloat16) if residual else None
  tiles = dict(block_rows=64, block_hidden=64, block_out=32, block_k_up=16, block_k_down=16)
  outs, k = af.acm_group(x, groups, num_learners=n, activation=act, min_choice=min_choice, interpret=True,
                         sort=True, mgpu_down=True, residual=skip, **tiles)
  plain, _ = af.acm_group(x, groups, num_learners=n, activation=act, min_choice=min_choice, interpret=True,
                          sort=True, mgpu_down=False, residual=skip, **tiles)
  refs, _ = af.acm_group_reference(x, groups, num_learners=n, activation=act, k=k)
  if residual:
    refs = [ref + skip.astype(jnp.float32) for ref in refs]
  for out, ref, triton in zip(outs, refs, plain):
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert rel_err(out, ref) < 1.5e-2
    assert rel_err(out, triton) < 1.5e-2
  if k_kind != "random":
    assert (np.asarray(k) == (0 if k_kind == "zeros" else n)).all()


def test_unsort_kernel_matches_a_gather_in_numpy():
  """The unsort launch alone, on random rows, places, choices (zeros among them), bias table and residual,
  with a ragged last block of tokens: out[t] = y[pos[t]] (0 where k = 0) + table[k[t]] + residual[t]."""
  rng = np.random.default_rng(11)
  tokens, padded, dim = 77, 128, 48
  y = jnp.asarray(rng.normal(size=(padded, dim)), jnp.bfloat16)
  pos = jnp.asarray(rng.permutation(padded)[:tokens], jnp.int32)
  k = jnp.asarray(rng.integers(0, 5, tokens), jnp.int32)
  table = jnp.asarray(rng.normal(size=(5, dim)), jnp.float32)
  skip = jnp.asarray(rng.normal(size=(tokens, dim)), jnp.bfloat16)
  got = af._unsort(y, pos, k, table, skip, tokens=tokens, padded=padded, dtype=jnp.bfloat16, interpret=True)
  f32 = lambda a: np.asarray(a, np.float32)
  want = np.where(f32(k)[:, None] > 0, f32(y)[np.asarray(pos)], 0) + f32(table)[np.asarray(k)] + f32(skip)
  assert got.shape == (tokens, dim) and got.dtype == jnp.bfloat16
  np.testing.assert_allclose(f32(got), want, rtol=1e-2, atol=1e-2)
  bare = af._unsort(y, pos, k, None, None, tokens=tokens, padded=padded, dtype=jnp.float32, interpret=True)
  np.testing.assert_array_equal(np.asarray(bare), np.where(f32(k)[:, None] > 0, f32(y)[np.asarray(pos)], 0))


def test_unsort_kernel_lowers_for_cuda_at_vit_b_shapes():
  """The Triton lowering at batch 256's shapes (50,432 tokens, 768 columns, bias table and residual)."""
  tokens, padded, dim = 50432, 50560, 768
  args = (jax.ShapeDtypeStruct((padded, dim), jnp.bfloat16), jax.ShapeDtypeStruct((tokens,), jnp.int32),
          jax.ShapeDtypeStruct((tokens,), jnp.int32), jax.ShapeDtypeStruct((5, dim), jnp.float32),
          jax.ShapeDtypeStruct((tokens, dim), jnp.bfloat16))
  unsort = functools.partial(af._unsort, tokens=tokens, padded=padded, dtype=jnp.bfloat16, interpret=False)
  lowered = jax.jit(unsort).trace(*args).lower(lowering_platforms=("cuda",))
  assert "acm_unsort" in lowered.as_text()


def test_the_split_down_launch_and_the_mosaic_one_exclude_each_other(monkeypatch):
  for name, value in dict(tile_n=32, block_k=16, epi=32).items():
    monkeypatch.setitem(af.MGPU_DOWN_TILES, name, value)
  x, groups = random_group(0, 100, 64, 4, 64, 1, jnp.bfloat16)
  with pytest.raises(ValueError, match="split_down=True: the Mosaic GPU down launch .* replaces"):
    af.acm_group(x, groups, num_learners=4, interpret=True, sort=True, mgpu_down=True, split_down=True,
                 block_rows=64, block_hidden=64, block_out=32, block_k_up=16, block_k_down=16)


def test_an_unknown_unsort_switch_is_named(monkeypatch):
  monkeypatch.setattr(acm_mgpu, "down_projection", _contract)
  monkeypatch.setattr(af, "MGPU_DOWN_UNSORT", "scatter")
  for name, value in dict(tile_n=32, block_k=16, epi=32).items():
    monkeypatch.setitem(af.MGPU_DOWN_TILES, name, value)
  x, groups = random_group(0, 64, 64, 4, 64, 1, jnp.bfloat16)
  with pytest.raises(ValueError, match="MGPU_DOWN_UNSORT must be one of .* got 'scatter'"):
    af.acm_group(x, groups, num_learners=4, interpret=True, sort=True, mgpu_down=True, block_rows=64,
                 block_hidden=64, block_out=32, block_k_up=16, block_k_down=16)


def test_asking_for_the_mosaic_down_launch_where_it_cannot_run_names_the_reason():
  n, dim = 4, 64
  x, groups = random_group(0, 100, dim, n, 64, 1, jnp.bfloat16)
  with pytest.raises(ValueError, match="sorted path only"):
    af.acm_group(x, groups, num_learners=n, interpret=True, sort=False, mgpu_down=True)
  x32, groups32 = random_group(0, 100, dim, n, 64, 1, jnp.float32)
  with pytest.raises(ValueError, match="bfloat16"):
    af.acm_group(x32, groups32, num_learners=n, interpret=True, sort=True, mgpu_down=True, block_rows=64)
  with pytest.raises(ValueError, match="must divide the up launch's block_rows=32"):
    af.acm_group(x, groups, num_learners=n, interpret=True, sort=True, mgpu_down=True, block_rows=32)
  with pytest.raises(ValueError, match="not a multiple"):
    acm_mgpu.check((128, 100), (100, 256), jnp.bfloat16, acm_mgpu.DownConfig())
  with pytest.raises(ValueError, match="steps has shape"):
    acm_mgpu.down_projection(jnp.zeros((128, 128), jnp.bfloat16), jnp.zeros((128, 256), jnp.bfloat16),
                             jnp.zeros((3,), jnp.int32), cfg=acm_mgpu.DownConfig(tile_m=64, tile_n=128))


# ----------------------------------------------------------------------------
# The Mosaic GPU up kernel


def test_up_kernel_in_interpret_mode_matches_its_contract():
  """Two row blocks (largest k 4 and 2 of 4 learners of 64): the written tiles equal the plain-jnp
  contract (GELU, bias), rows past each learner's count are zero, and block 1 leaves its last two
  learners' tiles unwritten."""
  cfg = acm_mgpu.DownConfig(tile_m=64, tile_n=64, block_k=64, stages=2, split="n", epi=64)
  rng = np.random.default_rng(6)
  k = np.array([4] * 10 + [3] * 30 + [2] * 40 + [1] * 20 + [0] * 28)
  maxk = jnp.asarray(k[::64], jnp.int32)
  thresholds = jnp.asarray([(k > n).sum() for n in range(4)], jnp.int32)
  x = jnp.asarray(rng.normal(size=(128, 128)), jnp.bfloat16)
  w1 = jnp.asarray(rng.normal(size=(128, 256)) / np.sqrt(128), jnp.bfloat16)
  b1 = jnp.asarray(0.5 * rng.normal(size=(256,)), jnp.bfloat16)
  out = acm_mgpu.up_projection(x, w1, b1, maxk, thresholds, width=64, activation="gelu", cfg=cfg, interpret=True)
  ref = np.asarray(acm_mgpu.up_projection_reference(x, w1, b1, thresholds, width=64, activation="gelu"))
  # the tanh form stays within bfloat16 rounding of the erf form
  erf = np.asarray(jax.nn.gelu(jnp.dot(x.astype(jnp.float32), w1.astype(jnp.float32)) + b1, approximate=False))
  assert np.abs(np.where(ref != 0, ref - erf, 0)).max() < 1e-3
  assert out.shape == (128, 256) and out.dtype == jnp.bfloat16
  out = np.asarray(out, np.float32)
  written = np.arange(256)[None, :] < np.repeat(np.asarray(maxk), 64)[:, None] * 64
  assert rel_err(np.where(written, out, 0), np.where(written, ref, 0)) < 1e-2
  keep = (np.arange(256) // 64)[None, :] < k[:, None]
  assert (out[written & ~keep] == 0).all()  # units past a row's own k are zero where written
  assert written[:64, 192:].all() and not written[64:, 128:].any()  # block 1 (largest k 2) stops at learner 2


@pytest.mark.parametrize("tile_m", [128, 64])
def test_up_kernel_lowers_for_cuda_at_vit_b_shapes(tile_m):
  cfg = acm_mgpu.DownConfig(tile_m=tile_m, tile_n=128)
  rows = 50432
  args = (jax.ShapeDtypeStruct((rows, 768), jnp.bfloat16), jax.ShapeDtypeStruct((768, 3072), jnp.bfloat16),
          jax.ShapeDtypeStruct((3072,), jnp.bfloat16), jax.ShapeDtypeStruct((rows // cfg.rows,), jnp.int32),
          jax.ShapeDtypeStruct((4,), jnp.int32))
  lowered = jax.jit(lambda *a: acm_mgpu.up_projection(*a, width=768, cfg=cfg)).trace(*args).lower(
      lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


def _up_contract(x, w1, b1, block_maxk, thresholds, *, width, activation, cfg, interpret):
  """The up kernel's contract, with the tiles it skips poisoned (NaN) as its unwritten memory would be."""
  del interpret
  ref = acm_mgpu.up_projection_reference(x, w1, b1, thresholds, width=width, activation=activation)
  limit = jnp.repeat(block_maxk, cfg.rows)[:, None] * width
  return jnp.where(jnp.arange(w1.shape[1])[None, :] < limit, ref, jnp.nan).astype(x.dtype)


@pytest.mark.parametrize("tokens,k_kind,down", [
    (1, "random", False), (197, "random", False), (197, "zeros", False), (197, "full", False),
    (300, "random", True),  # with the Mosaic down launch after it
])
def test_sorted_path_with_the_mosaic_up_launch_matches_the_reference(tokens, k_kind, down, monkeypatch):
  monkeypatch.setattr(acm_mgpu, "up_projection", _up_contract)
  monkeypatch.setattr(acm_mgpu, "down_projection", _contract)
  for table, tiles in ((af.MGPU_UP_TILES, dict(tile_m=64, tile_n=32, block_k=16, epi=32)),
                       (af.MGPU_DOWN_TILES, dict(tile_n=32, block_k=16, epi=32))):
    for name, value in tiles.items():
      monkeypatch.setitem(table, name, value)
  n, dim, width = 4, 64, 64
  x, groups = random_group(tokens + 11, tokens, dim, n, width, 1, jnp.bfloat16, k_kind=k_kind)
  tiles = dict(block_rows=64, block_hidden=64, block_out=32, block_k_up=16, block_k_down=16)
  outs, k = af.acm_group(x, groups, num_learners=n, activation="gelu", interpret=True, sort=True, mgpu_up=True,
                         mgpu_down=down, **tiles)
  plain, k_plain = af.acm_group(x, groups, num_learners=n, activation="gelu", interpret=True, sort=True,
                                mgpu_up=False, **tiles)
  refs, _ = af.acm_group_reference(x, groups, num_learners=n, activation="gelu", k=k)
  np.testing.assert_array_equal(k, k_plain)
  for out, ref, triton in zip(outs, refs, plain):
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert np.isfinite(np.asarray(out, np.float32)).all()  # no skipped (NaN) tile was read
    assert rel_err(out, ref) < 1.5e-2
    assert rel_err(out, triton) < 1.5e-2


def test_asking_for_the_mosaic_up_launch_where_it_cannot_run_names_the_reason():
  n, dim = 4, 64
  x, groups = random_group(0, 100, dim, n, 64, 1, jnp.bfloat16)
  with pytest.raises(ValueError, match="mgpu_up=True: it runs on the sorted path only"):
    af.acm_group(x, groups, num_learners=n, interpret=True, sort=False, mgpu_up=True)
  with pytest.raises(ValueError, match="learner width h=64 is not a multiple of 128"):
    af.acm_group(x, groups, num_learners=n, interpret=True, sort=True, mgpu_up=True, block_rows=64)
  x32, groups32 = random_group(0, 100, dim, n, 128, 1, jnp.float32)
  with pytest.raises(ValueError, match="bfloat16"):
    af.acm_group(x32, groups32, num_learners=n, interpret=True, sort=True, mgpu_up=True, block_rows=64)
  with pytest.raises(ValueError, match="thresholds has shape"):
    acm_mgpu.up_projection(jnp.zeros((128, 128), jnp.bfloat16), jnp.zeros((128, 256), jnp.bfloat16),
                           jnp.zeros((256,), jnp.bfloat16), jnp.zeros((1,), jnp.int32), jnp.zeros((3,), jnp.int32),
                           width=64, cfg=acm_mgpu.DownConfig(tile_m=128, tile_n=64, epi=64))
  with pytest.raises(ValueError, match="activation 'swish'"):
    acm_mgpu.up_projection(jnp.zeros((128, 128), jnp.bfloat16), jnp.zeros((128, 256), jnp.bfloat16),
                           jnp.zeros((256,), jnp.bfloat16), jnp.zeros((1,), jnp.int32), jnp.zeros((4,), jnp.int32),
                           width=64, activation="swish")


def test_active_tiles_lists_each_row_blocks_needed_tiles_in_row_major_order():
  rng = np.random.default_rng(7)
  for _ in range(5):
    m_iters, n_iters, width, cols = int(rng.integers(1, 40)), int(rng.choice([3, 6, 12])), 768, 256
    maxk = np.sort(rng.integers(0, 5, m_iters))[::-1]
    count, tiles = acm_mgpu.active_tiles(jnp.asarray(maxk, jnp.int32), width=width, cols=cols, n_iters=n_iters)
    want = [b * n_iters + c for b in range(m_iters) for c in range(n_iters) if c * cols < maxk[b] * width]
    assert int(count[0]) == len(want)
    np.testing.assert_array_equal(np.asarray(tiles)[:len(want)], want)


def test_mosaic_up_launch_needs_row_blocks_the_down_launch_can_read(monkeypatch):
  """Up row blocks of 64 under down row blocks of 128: the down launch would read tiles of the second
  up block that were never written."""
  monkeypatch.setitem(af.MGPU_UP_TILES, "tile_m", 64)
  n, dim = 4, 64
  x, groups = random_group(0, 300, dim, n, 128, 1, jnp.bfloat16)
  with pytest.raises(ValueError, match="row blocks of 64 must be a multiple of the down launch's row blocks of 128"):
    af.acm_group(x, groups, num_learners=n, interpret=True, sort=True, mgpu_up=True, block_rows=128)


# ----------------------------------------------------------------------------
# The regions path: the route files each token's x row by k, the Mosaic up kernel reads them by TMA


def _regions_input(rng, counts, region, dim):
  """x filed in regions of `region` rows (k = N .. 0), rows past each count and region N (k = 0, never read)
  poisoned (NaN): the kernel must never let them reach a written row."""
  n = len(counts)
  x = rng.normal(size=((n + 1) * region, dim))
  x[n * region:] = np.nan
  for r, count in enumerate(counts):
    x[r * region + count:(r + 1) * region] = np.nan
  return jnp.asarray(x, jnp.bfloat16)


def test_region_tiles_walk_each_regions_row_blocks_up_to_its_k():
  rng = np.random.default_rng(8)
  for _ in range(5):
    n, rows, width, cols = 4, 64, 768, 256
    region = rows * int(rng.integers(1, 6))
    counts = [int(c) for c in rng.integers(0, region + 1, n)]
    num, tile_of = acm_mgpu.region_tiles(counts, rows=rows, region_rows=region, cols=cols, width=width)
    want = [(r * region // rows + b, c) for r in range(n) for b in range(-(-counts[r] // rows))
            for c in range(-(-(n - r) * width // cols))]
    assert num == len(want)
    assert [tuple(int(v) for v in tile_of(lin)) for lin in range(num)] == want


def test_up_regions_kernel_in_interpret_mode_matches_its_contract():
  """Four regions of 128 rows (k = 4 .. 1) holding 70, 0, 128 and 5 tokens: the written tiles equal the contract
  (GELU, bias) and the poisoned rows past each count stay out of every written row."""
  cfg = acm_mgpu.DownConfig(tile_m=64, tile_n=64, block_k=64, stages=2, split="n", epi=64)
  rng = np.random.default_rng(9)
  counts, region, dim, width = [70, 0, 128, 5], 128, 128, 64
  x = _regions_input(rng, counts, region, dim)
  w1 = jnp.asarray(rng.normal(size=(dim, 4 * width)) / np.sqrt(dim), jnp.bfloat16)
  b1 = jnp.asarray(0.5 * rng.normal(size=(4 * width,)), jnp.bfloat16)
  totals = jnp.asarray(counts + [9] * 12, jnp.float32)  # the route's counters: N + 1 used, GATE_COLS long
  out = np.asarray(acm_mgpu.up_regions(x, w1, b1, totals, width=width, activation="gelu", cfg=cfg, interpret=True),
                   np.float32)
  ref = np.asarray(acm_mgpu.up_regions_reference(x, w1, b1, totals, width=width, rows=cfg.rows, cols=cfg.cols))
  assert out.shape == ref.shape == (4 * region, 4 * width)
  real = np.zeros(4 * region, bool)
  for r, count in enumerate(counts):
    real[r * region:r * region + count] = True
  keep = real[:, None] & ~np.isnan(ref)
  # each region's first k * width units, in whole tiles of 128 columns
  assert keep.sum() == sum(c * -(-(4 - r) * width // cfg.cols) * cfg.cols for r, c in enumerate(counts))
  assert np.isfinite(out[keep]).all()
  assert rel_err(out[keep], ref[keep]) < 1e-2


def test_up_regions_kernel_lowers_for_cuda_at_vit_b_shapes():
  cfg = acm_mgpu.DownConfig(tile_m=128, tile_n=128)
  padded = 6400  # batch 32 of ViT-B/16: 6,304 tokens
  args = (jax.ShapeDtypeStruct((5 * padded, 768), jnp.bfloat16), jax.ShapeDtypeStruct((768, 3072), jnp.bfloat16),
          jax.ShapeDtypeStruct((3072,), jnp.bfloat16), jax.ShapeDtypeStruct((16,), jnp.float32))
  lowered = jax.jit(lambda *a: acm_mgpu.up_regions(*a, width=768, cfg=cfg)).trace(*args).lower(
      lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


def test_regions_path_lowers_for_cuda_at_batch_32s_shape(monkeypatch):
  """The whole regions path at 6,304 tokens (padded to 6,400; an MLP ACM of 4 learners of 768, bf16, the tuned
  table's tiles): the route with its copy of x and its atomic counters, the Mosaic up kernel and the Triton down
  launch over the regions' row blocks (6,400 / 64 + 5 row programs x the output tiles); no scatter, no gather."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # lowered for CUDA, never run
  monkeypatch.setattr(af, "gpu_family", lambda: "hopper")
  dim, n, width = 768, 4, 768
  bf16 = jnp.bfloat16
  group = bf16_group_shapes(dim, n, width)
  call = lambda x, g: af.acm_group(x, [g], num_learners=n, mgpu_regions=True, interpret=False)
  text = jax.jit(call).trace(jax.ShapeDtypeStruct((6304, dim), bf16), group).lower(
      lowering_platforms=("cuda",)).as_text()
  assert re.findall(r'name = "(acm_[a-z_]+)"', text) == ["acm_route", "acm_group_down"]
  assert "mosaic_gpu" in text and "gather" not in text
  assert "atomic_rmw" in text
  cfg, _ = af.resolve_config(bf16, dim, n * width, 6304)
  assert re.findall(r"grid_x = (\d+)", text)[-1] == str((6400 // cfg.down_rows + n + 1) * (dim // cfg.block_out))


def _up_regions_contract(x_regions, w1, b1, counts, *, width, activation, cfg, interpret):
  del interpret
  return acm_mgpu.up_regions_reference(x_regions, w1, b1, counts, width=width, rows=cfg.rows, cols=cfg.cols,
                                       activation=activation).astype(x_regions.dtype)


@pytest.mark.parametrize("tokens,k_kind,residual,bias", [
    (1, "random", True, True), (197, "random", True, True), (197, "random", False, False),
    (197, "zeros", True, True), (197, "full", False, True), (300, "random", True, True),
])
def test_regions_path_matches_the_reference(tokens, k_kind, residual, bias, monkeypatch):
  """The route's regions of x, the up launch's contract (what it leaves unwritten poisoned) and the down launch
  over the regions' row blocks, against the group's plain-jnp reference."""
  monkeypatch.setattr(acm_mgpu, "up_regions", _up_regions_contract)
  for name, value in dict(tile_m=64, tile_n=32, block_k=16, epi=32).items():
    monkeypatch.setitem(af.MGPU_UP_TILES, name, value)
  monkeypatch.setattr(af, "RESIDUAL_MIN_TOKENS", 0)
  n, dim, width = 4, 64, 64
  x, groups = random_group(tokens + 13, tokens, dim, n, width, 1, jnp.bfloat16, k_kind=k_kind, bias=bias)
  skip = jnp.asarray(np.random.default_rng(tokens).normal(size=x.shape), x.dtype) if residual else None
  tiles = dict(block_rows=64, block_hidden=64, block_out=32, block_k_up=16, block_k_down=16)
  outs, k = af.acm_group(x, groups, num_learners=n, activation="gelu", interpret=True, sort=True, mgpu_regions=True,
                         residual=skip, **tiles)
  _, k_ref = af.acm_group_reference(x, groups, num_learners=n, activation="gelu")
  assert float(np.mean(np.asarray(k) == np.asarray(k_ref))) >= 0.99  # bf16 gates: a near tie may flip
  refs, _ = af.acm_group_reference(x, groups, num_learners=n, activation="gelu", k=k, residual=skip)
  if k_kind != "random":
    assert (np.asarray(k) == (0 if k_kind == "zeros" else n)).all()
  elif tokens > 100:
    assert len(np.unique(np.asarray(k))) == n + 1  # every region and k = 0 in use
  for out, ref in zip(outs, refs):
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert np.isfinite(np.asarray(out, np.float32)).all()  # no poisoned row or tile reached an output
    assert rel_err(out, ref) < 1.5e-2


def test_asking_for_the_regions_path_where_it_cannot_run_names_the_reason(monkeypatch):
  n, dim = 4, 64
  x, groups = random_group(0, 100, dim, n, 64, 1, jnp.bfloat16)
  with pytest.raises(ValueError, match="mgpu_regions=True: it runs on the sorted path only"):
    af.acm_group(x, groups, num_learners=n, interpret=True, sort=False, mgpu_regions=True)
  _, three = random_group(0, 100, dim, n, 64, 3, jnp.bfloat16)
  with pytest.raises(ValueError, match="one ACM \\(this group has 3\\)"):
    af.acm_group(x, three, num_learners=n, interpret=True, sort=True, mgpu_regions=True, block_rows=64)
  with pytest.raises(ValueError, match="learner width h=64 is not a multiple of 128"):
    af.acm_group(x, groups, num_learners=n, interpret=True, sort=True, mgpu_regions=True, block_rows=64)
  monkeypatch.setitem(af.MGPU_UP_TILES, "tile_n", 64)
  with pytest.raises(ValueError, match="cannot run with split_down=True"):
    af.acm_group(x, groups, num_learners=n, interpret=True, sort=True, mgpu_regions=True, split_down=True,
                 block_rows=64)
  with pytest.raises(ValueError, match="counts has shape"):
    acm_mgpu.up_regions(jnp.zeros((640, 64), jnp.bfloat16), jnp.zeros((64, 256), jnp.bfloat16),
                        jnp.zeros((256,), jnp.bfloat16), jnp.zeros((3,), jnp.float32), width=64,
                        cfg=acm_mgpu.DownConfig(tile_m=64, tile_n=64, block_k=64, epi=64))
  with pytest.raises(ValueError, match="expected 5 regions"):
    acm_mgpu.up_regions(jnp.zeros((192, 64), jnp.bfloat16), jnp.zeros((64, 256), jnp.bfloat16),
                        jnp.zeros((256,), jnp.bfloat16), jnp.zeros((5,), jnp.float32), width=64,
                        cfg=acm_mgpu.DownConfig(tile_m=64, tile_n=64, block_k=64, epi=64))
