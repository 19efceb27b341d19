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

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import acm_fused as af
from pallas_kernels import acm_mgpu
from pallas_kernels.fused_testing import random_group


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


@pytest.mark.parametrize("tokens,width,size,act,min_choice,k_kind", [
    (1, 64, 1, "gelu", 0, "random"),
    (197, 64, 1, "gelu", 0, "random"),
    (197, 64, 1, "gelu", 0, "zeros"),
    (197, 64, 1, "gelu", 0, "full"),
    (300, 16, 3, "identity", 1, "random"),  # a q/k/v group: min_choice 1, learners narrower than a block_k
])
def test_sorted_path_with_the_mosaic_down_launch_matches_the_reference(tokens, width, size, act, min_choice,
                                                                        k_kind, monkeypatch):
  monkeypatch.setattr(acm_mgpu, "down_projection", _contract)
  monkeypatch.setitem(af.MGPU_DOWN_TILES, "tile_n", 32)
  monkeypatch.setitem(af.MGPU_DOWN_TILES, "block_k", 16)
  monkeypatch.setitem(af.MGPU_DOWN_TILES, "epi", 32)
  n, dim = 4, 64
  x, groups = random_group(tokens + width, tokens, dim, n, width, size, jnp.bfloat16, k_kind=k_kind)
  tiles = dict(block_rows=64, block_hidden=64, block_out=32, block_k_up=16, block_k_down=16)
  outs, k = af.acm_group(x, groups, num_learners=n, activation=act, min_choice=min_choice, interpret=True,
                         sort=True, mgpu_down=True, **tiles)
  plain, _ = af.acm_group(x, groups, num_learners=n, activation=act, min_choice=min_choice, interpret=True,
                          sort=True, mgpu_down=False, **tiles)
  refs, _ = af.acm_group_reference(x, groups, num_learners=n, activation=act, k=k)
  for out, ref, triton in zip(outs, refs, plain):
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert rel_err(out, ref) < 1.5e-2
    assert rel_err(out, triton) < 1.5e-2
  if k_kind != "random":
    assert (np.asarray(k) == (0 if k_kind == "zeros" else n)).all()


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
