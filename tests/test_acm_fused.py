"""Fused ACM group kernels (gate, route, sort, learners) against the plain-jnp reference.

Pallas interpret mode on the CPU: the interpreter fills every kernel output with NaN
before the kernels run (`test_acm_mlp_kernel.test_interpreter_poisons_outputs`), so an
element no kernel writes shows up as NaN and fails `check_close`.
"""

import dataclasses
import functools
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from acm_jax import acm as acm_lib
from acm_jax import inference
from acm_jax.vit import model as vit
from pallas_kernels import acm_fused as af
from pallas_kernels.fused_testing import bf16_group_shapes, random_group

LIMITS = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 1.5e-2}


def rel_err(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)


def assert_choices_agree(k, k_ref, dtype):
  """float32 logits agree exactly; bf16 ones are rounded where Flax rounds them (a float64 share: a float32 mean
  of 41 equal choices of 41 is below 1)."""
  agree = float(np.mean(np.asarray(k) == np.asarray(k_ref)))
  assert agree == 1.0 if dtype == jnp.float32 else agree >= 0.99, agree


def check_group(x, groups, *, n, act="gelu", min_choice=0, cost_shift=0.0, **kw):
  outs, k = af.acm_group(x, groups, num_learners=n, activation=act, min_choice=min_choice, cost_shift=cost_shift,
                         interpret=True, **kw)
  _, k_ref = af.acm_group_reference(x, groups, num_learners=n, min_choice=min_choice, cost_shift=cost_shift)
  refs, _ = af.acm_group_reference(x, groups, num_learners=n, activation=act, k=k)
  assert_choices_agree(k, k_ref, x.dtype)
  assert int(k.min()) >= min_choice and int(k.max()) <= n
  for out, ref in zip(outs, refs):
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert np.isfinite(np.asarray(out, np.float32)).all(), "unwritten or NaN output elements"
    assert rel_err(out, ref) < LIMITS[x.dtype]
  return k


SMALL = dict(block_rows=16, block_hidden=32, block_out=32, block_k_up=16, block_k_down=16)

CASES = [
    # (tokens, dim, N, width, group size, activation, min_choice, dtype, k_kind, tiles)
    (1, 64, 4, 32, 1, "gelu", 0, jnp.float32, "random", SMALL),
    (197, 64, 4, 32, 1, "gelu", 0, jnp.bfloat16, "random", SMALL),
    (197, 64, 4, 32, 1, "gelu", 0, jnp.float32, "zeros", SMALL),
    (197, 64, 4, 32, 3, "identity", 1, jnp.float32, "zeros", SMALL),  # min choice 1 overrides the gate
    (197, 64, 4, 32, 3, "identity", 1, jnp.bfloat16, "full", SMALL),
    (1576, 32, 4, 16, 3, "identity", 1, jnp.float32, "random", dict(SMALL, block_hidden=64)),
    (1576, 32, 4, 16, 1, "gelu", 0, jnp.bfloat16, "random", dict(SMALL, block_rows=64)),
    (50432, 16, 4, 16, 1, "relu", 0, jnp.float32, "random", dict(SMALL, block_rows=128, block_hidden=64,
                                                                 block_out=16)),
    # ViT-B widths: an MLP ACM (4 learners of 768, GELU) and the q/k/v group (4 learners of 96)
    (1, 768, 4, 768, 1, "gelu", 0, jnp.bfloat16, "random", {}),
    (197, 768, 4, 768, 1, "gelu", 0, jnp.float32, "full", dict(block_rows=64, block_out=256)),
    (197, 768, 4, 96, 3, "identity", 1, jnp.bfloat16, "random", {}),
    (50432, 16, 4, 8, 1, "identity", 1, jnp.float32, "random", dict(SMALL, block_rows=128, block_hidden=32,
                                                                     block_out=16)),
]


# the routed paths with the whole down launch (the split one runs by default up to 1,024 tokens)
# (the sorted paths keep their scatter launch: the inline sort, the default up to 2,048 tokens, has paths of its own)
PATHS = {"unsorted": dict(sort=False, split_down=False), "sorted": dict(sort=True, split_down=False, inline_sort=False),
         "onepass": dict(onepass=True), "twolaunch": dict(twolaunch=True, split_down=False), "xla": dict(xla=True),
         # linear learners through their merged matrices (`af.merge_linear_learners`)
         "merged_sorted": dict(sort=True, merged=True, inline_sort=False),
         "merged_unsorted": dict(sort=False, merged=True),
         "merged_one_launch": dict(twolaunch=True, merged=True),
         # the down launch's reduction split per learner (`af.DOWN_SPLIT_MAX_TOKENS`)
         "split_sorted": dict(sort=True, split_down=True, inline_sort=False),
         "split_unsorted": dict(sort=False, split_down=True),
         "split_twolaunch": dict(twolaunch=True, split_down=True),
         # the sorted path without its scatter launch (`af.INLINE_SORT_MAX_TOKENS`), whole and split down launch
         "inline_sorted": dict(sort=True, inline_sort="chunks", split_down=False),
         "inline_split": dict(sort=True, inline_sort="chunks", split_down=True),
         # the same with the tokens placed by atomic counters in the route launch (`af.INLINE_SORT_PLACE`)
         "inline_atomic_sorted": dict(sort=True, inline_sort="atomic", split_down=False),
         "inline_atomic_split": dict(sort=True, inline_sort="atomic", split_down=True)}


def split_tiles(path, width, tiles):
  """The tiles for `path`: a split down launch needs learners a whole number of block_k_down wide
  (the default block_k_down 64 does not divide the projections' 96)."""
  if PATHS[path].get("split_down") and "block_k_down" not in tiles and width % 64:
    return dict(tiles, block_k_down=32)
  return tiles


@pytest.mark.parametrize("tokens,dim,n,width,size,act,min_choice,dtype,k_kind,tiles", CASES)
@pytest.mark.parametrize("path", list(PATHS))
def test_group_matches_reference(tokens, dim, n, width, size, act, min_choice, dtype, k_kind, tiles, path):
  one_or_two_launches = path in ("onepass", "twolaunch", "split_twolaunch")
  if one_or_two_launches and tokens * dim > 20_000 and dim > 64 and dtype == jnp.float32:
    pytest.skip("this path's ViT-B width is covered in bfloat16")
  merged = PATHS[path].get("merged", False)
  if merged and act != "identity":
    pytest.skip("merged matrices stand for linear learners only")
  if tokens * dim > 200_000 and path not in ("sorted", "merged_sorted", "split_sorted", "inline_sorted",
                                             "inline_atomic_sorted"):
    pytest.skip("the unsorted paths at this size add nothing the sorted one does not test")
  if PATHS[path].get("split_down") and width < 16:
    pytest.skip("learners narrower than the smallest block_k_down (16) cannot split")
  x, groups = random_group(tokens + dim, tokens, dim, n, width, size, dtype, k_kind=k_kind)
  if merged:
    groups = [{**grp, **af.merge_linear_learners(grp, n)} for grp in groups]
  k = check_group(x, groups, n=n, act=act, min_choice=min_choice, **PATHS[path], **split_tiles(path, width, tiles))
  if k_kind == "full" or (k_kind == "zeros" and min_choice == 0):
    assert (np.asarray(k) == (0 if k_kind == "zeros" else n)).all()
  elif tokens > 10:
    assert len(np.unique(np.asarray(k))) > 1


def norm_inputs(seed, tokens, dim, dtype):
  """A residual stream as a pre-LN block sees it (rows with their own offset and spread, a few large
  channels) and a LayerNorm's scale and bias."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(tokens, dim)) * rng.uniform(0.5, 4, size=(tokens, 1)) + rng.normal(size=(tokens, 1)) * 3
  z[:, :2] *= 8
  scale = jnp.asarray(1 + 0.3 * rng.normal(size=dim), jnp.float32)
  bias = jnp.asarray(0.2 * rng.normal(size=dim), jnp.float32)
  return jnp.asarray(z, dtype), (scale, bias, 1e-6)


NORM_CASES = [
    # (tokens, dim, N, width, group size, activation, min_choice, dtype, gate, k_kind, tiles)
    (1, 64, 4, 32, 1, "gelu", 0, jnp.float32, "linear", "random", SMALL),
    (197, 64, 4, 32, 1, "gelu", 0, jnp.float32, "linear", "random", SMALL),
    (197, 64, 4, 32, 1, "gelu", 0, jnp.float32, "linear", "zeros", SMALL),
    (197, 64, 4, 32, 3, "identity", 1, jnp.bfloat16, "linear", "random", SMALL),
    (197, 64, 4, 32, 3, "identity", 1, jnp.bfloat16, "linear", "full", SMALL),
    (300, 64, 4, 32, 2, "gelu", 0, jnp.float32, "logits", "random", SMALL),  # a deep gate's logits, given
    (1576, 32, 4, 16, 1, "gelu", 0, jnp.bfloat16, "linear", "random", dict(SMALL, block_rows=64)),
    (50432, 16, 4, 16, 1, "relu", 0, jnp.float32, "linear", "random", dict(SMALL, block_rows=128, block_hidden=64,
                                                                            block_out=16)),
    # ViT-B widths: the MLP ACM and the q/k/v group
    (197, 768, 4, 768, 1, "gelu", 0, jnp.bfloat16, "linear", "random", {}),
    (197, 768, 4, 768, 1, "gelu", 0, jnp.float32, "linear", "full", dict(block_rows=64, block_out=256)),
    (197, 768, 4, 96, 3, "identity", 1, jnp.bfloat16, "linear", "random", {}),
]


@pytest.mark.parametrize("tokens,dim,n,width,size,act,min_choice,dtype,gate,k_kind,tiles", NORM_CASES)
@pytest.mark.parametrize("path,mode", [("sorted", "fold"), ("sorted", "prologue"), ("unsorted", "fold"),
                                       ("unsorted", "prologue"), ("xla", None), ("twolaunch", None),
                                       ("inline_sorted", "fold")])
def test_group_through_a_layer_norm_matches_reference(tokens, dim, n, width, size, act, min_choice, dtype, gate,
                                                      k_kind, tiles, path, mode, monkeypatch):
  """`norm`: the ACMs read LayerNorm(z). The routed paths fuse it (statistics in the route launch; the
  scale and bias folded into w1 and b1, or z normalised in the up launch's loop); the others normalise
  first. Both against the reference on LayerNorm(z), and k against the reference's gates."""
  if (dim > 64 or tokens > 10_000) and path != "sorted":
    pytest.skip("the largest shapes are covered on the sorted path")
  monkeypatch.setattr(af, "NORM_MIN_TOKENS", 0)
  z, norm = norm_inputs(tokens, tokens, dim, dtype)
  _, groups = random_group(tokens + 1, tokens, dim, n, width, size, dtype, gate=gate, k_kind=k_kind)
  outs, k = af.acm_group(z, groups, num_learners=n, activation=act, min_choice=min_choice, norm=norm,
                         norm_mode=mode, interpret=True, **PATHS[path], **tiles)
  _, k_ref = af.acm_group_reference(z, groups, num_learners=n, min_choice=min_choice, norm=norm)
  refs, _ = af.acm_group_reference(z, groups, num_learners=n, activation=act, k=k, norm=norm)
  assert_choices_agree(k, k_ref, dtype)
  if k_kind != "random":
    assert (np.asarray(k) == (0 if k_kind == "zeros" else n)).all()
  elif tokens > 10:
    assert len(np.unique(np.asarray(k))) > 1
  for out, ref in zip(outs, refs):
    assert out.dtype == dtype and np.isfinite(np.asarray(out, np.float32)).all()
    assert rel_err(out, ref) < LIMITS[jnp.dtype(dtype)]


RESIDUAL_CASES = [
    # (tokens, dim, N, width, group size, activation, min_choice, dtype, k_kind, tiles)
    (1, 64, 4, 32, 1, "gelu", 0, jnp.float32, "random", SMALL),
    (197, 64, 4, 32, 1, "gelu", 0, jnp.bfloat16, "random", SMALL),
    (197, 64, 4, 32, 2, "identity", 1, jnp.float32, "full", SMALL),
    (197, 64, 4, 32, 1, "gelu", 0, jnp.float32, "zeros", SMALL),
    (1576, 32, 4, 16, 1, "gelu", 0, jnp.bfloat16, "random", dict(SMALL, block_rows=64)),
    (50432, 16, 4, 8, 1, "identity", 1, jnp.float32, "random", dict(SMALL, block_rows=128, block_hidden=32,
                                                                     block_out=16)),
    (197, 768, 4, 768, 1, "gelu", 0, jnp.bfloat16, "random", {}),  # the ViT-B MLP ACM
    (197, 768, 4, 768, 1, "gelu", 0, jnp.float32, "full", dict(block_rows=64, block_out=256)),
    (197, 768, 4, 96, 1, "identity", 1, jnp.bfloat16, "random", {}),  # the ViT-B output projection's
]


@pytest.mark.parametrize("tokens,dim,n,width,size,act,min_choice,dtype,k_kind,tiles", RESIDUAL_CASES)
@pytest.mark.parametrize("path", ["sorted", "unsorted", "twolaunch", "onepass", "xla", "split_sorted",
                                  "split_twolaunch"])
def test_group_with_a_residual_matches_reference(tokens, dim, n, width, size, act, min_choice, dtype, k_kind, tiles,
                                                 path, monkeypatch):
  """`residual`: added to every output, by the down launch on the routed paths (`RESIDUAL_MIN_TOKENS`
  = 0) and by XLA elsewhere; against the reference with the residual added before its one rounding."""
  if (dim > 64 or tokens > 10_000) and path not in ("sorted", "unsorted"):
    pytest.skip("the largest shapes are covered on the routed paths")
  if tokens > 10_000 and path == "unsorted":
    pytest.skip("the unsorted path at this size adds nothing the sorted one does not test")
  monkeypatch.setattr(af, "RESIDUAL_MIN_TOKENS", 0)
  x, groups = random_group(tokens + 2, tokens, dim, n, width, size, dtype, k_kind=k_kind)
  residual = jnp.asarray(np.random.default_rng(tokens).normal(size=(tokens, dim)) * 4, dtype)
  if PATHS[path].get("split_down") and width < 16:
    pytest.skip("learners narrower than the smallest block_k_down (16) cannot split")
  outs, k = af.acm_group(x, groups, num_learners=n, activation=act, min_choice=min_choice, residual=residual,
                         interpret=True, **PATHS[path], **split_tiles(path, width, tiles))
  _, k_ref = af.acm_group_reference(x, groups, num_learners=n, min_choice=min_choice)
  refs, _ = af.acm_group_reference(x, groups, num_learners=n, activation=act, k=k, residual=residual)
  assert float(jnp.mean(k == k_ref)) >= (1.0 if dtype == jnp.float32 else 0.99)
  for out, ref in zip(outs, refs):
    assert out.dtype == dtype and np.isfinite(np.asarray(out, np.float32)).all()
    assert rel_err(out, ref) < LIMITS[jnp.dtype(dtype)]
    # and the ACM's own part, so that a residual much larger than it cannot hide an error
    assert rel_err(np.asarray(out, np.float64) - np.asarray(residual, np.float64),
                   np.asarray(ref, np.float64) - np.asarray(residual, np.float64)) < 3 * LIMITS[jnp.dtype(dtype)]


def test_the_residual_is_added_by_the_down_launch_only_above_its_threshold(monkeypatch):
  n = 4
  x, groups = random_group(5, 150, 64, n, 32, 1, jnp.float32)
  residual = jnp.asarray(np.random.default_rng(6).normal(size=(150, 64)), jnp.float32)
  seen = []
  real = af._down_kernel
  monkeypatch.setattr(af, "_down_kernel", lambda *a, **kw: seen.append(kw["has_residual"]) or real(*a, **kw))
  results = []
  for threshold in (0, 151, None):
    monkeypatch.setattr(af, "RESIDUAL_MIN_TOKENS", threshold)
    results.append(af.acm_group(x, groups, num_learners=n, residual=residual, interpret=True, sort=True,
                                split_down=False, **SMALL))
  assert seen == [True, False, False]
  for outs, k in results[1:]:
    np.testing.assert_array_equal(k, results[0][1])
    assert rel_err(outs[0], results[0][0][0]) < 1e-6


def test_the_down_launch_splits_only_up_to_its_threshold(monkeypatch):
  """`DOWN_SPLIT_MAX_TOKENS`: the split down launch runs up to that many tokens (and where the learners
  are a whole number of block_k_down wide), the whole one above it; both give the same outputs."""
  n = 4
  x, groups = random_group(7, 150, 64, n, 32, 1, jnp.float32)
  seen = []
  real = af._down_split_kernel
  monkeypatch.setattr(af, "_down_split_kernel", lambda *a, **kw: seen.append(True) or real(*a, **kw))
  results = []
  for threshold in (150, 149, None):
    monkeypatch.setattr(af, "DOWN_SPLIT_MAX_TOKENS", threshold)
    results.append(af.acm_group(x, groups, num_learners=n, interpret=True, sort=True, **SMALL))
  assert seen == [True]
  monkeypatch.setattr(af, "DOWN_SPLIT_MAX_TOKENS", 10_000)
  af.acm_group(x, groups, num_learners=n, interpret=True, sort=True, **dict(SMALL, block_k_down=64, block_hidden=64))
  assert seen == [True]  # learners of 32 cannot split into reduction chunks of 64: the whole launch ran
  for outs, k in results[1:]:
    np.testing.assert_array_equal(k, results[0][1])
    assert rel_err(outs[0], results[0][0][0]) < 1e-6


def check_split_launch(tokens, dim, n, width, size, act, min_choice, dtype, k_kind, tiles, sort, *, seed):
  """The split down launch (with acm_fused's split settings as they are) against the reference, without and with
  a skip connection (outputs poisoned as in `check_group`). Returns the group's x, its ACMs and the tiles used."""
  x, groups = random_group(seed, tokens, dim, n, width, size, dtype, k_kind=k_kind)
  tiles = split_tiles("split_sorted", width, tiles)
  check_group(x, groups, n=n, act=act, min_choice=min_choice, sort=sort, split_down=True, **tiles)
  residual = jnp.asarray(np.random.default_rng(seed + 1).normal(size=(tokens, dim)) * 4, dtype)
  outs, k = af.acm_group(x, groups, num_learners=n, activation=act, min_choice=min_choice, residual=residual,
                         interpret=True, sort=sort, split_down=True, **tiles)
  refs, _ = af.acm_group_reference(x, groups, num_learners=n, activation=act, k=k, residual=residual)
  for out, ref in zip(outs, refs):
    assert rel_err(out, ref) < LIMITS[jnp.dtype(dtype)]
  return x, groups, tiles


@pytest.mark.parametrize("sort", [True, False])
@pytest.mark.parametrize("tokens,dim,n,width,size,act,min_choice,dtype,k_kind,tiles",
                         [case for case in CASES if case[0] <= 1576 and case[3] >= 16])
def test_split_down_launch_with_atomic_sums_matches_reference(tokens, dim, n, width, size, act, min_choice, dtype,
                                                              k_kind, tiles, sort, monkeypatch):
  """`DOWN_SPLIT_SUM = "atomic"`: the split launch's learners added into one float32 buffer per ACM, against the
  reference, with and without a skip connection (outputs poisoned as in `check_group`)."""
  monkeypatch.setattr(af, "DOWN_SPLIT_SUM", "atomic")
  seen = []
  real = af._down_split_kernel
  monkeypatch.setattr(af, "_down_split_kernel", lambda *a, **kw: seen.append(kw["atomic"]) or real(*a, **kw))
  x, groups, tiles = check_split_launch(tokens, dim, n, width, size, act, min_choice, dtype, k_kind, tiles, sort,
                                       seed=tokens + 5)
  assert seen == [True, True]
  monkeypatch.setattr(af, "DOWN_SPLIT_SUM", "scatter")
  with pytest.raises(ValueError, match="DOWN_SPLIT_SUM .*'scatter'"):
    af.acm_group(x, groups, num_learners=n, activation=act, min_choice=min_choice, interpret=True, sort=sort,
                 split_down=True, **tiles)


@pytest.mark.parametrize("sort", [True, False])
@pytest.mark.parametrize("tokens,dim,n,width,size,act,min_choice,dtype,k_kind,tiles", [CASES[i] for i in (0, 1, 3, 4, 5)])
def test_down_launch_adding_the_bias_by_a_loop_matches_reference(tokens, dim, n, width, size, act, min_choice, dtype,
                                                                 k_kind, tiles, sort, monkeypatch):
  """`DOWN_BIAS_LOOP_MAX_TOKENS`: up to that many tokens the whole down launch adds b2[0] + ... + b2[k] from b2 by a
  loop over the choices instead of a gather from the cumulative table; against the reference (k all 0 and all N,
  random k, the forced minimum choice, groups of 3), in float32 to the last bit of the table's form; above the
  bound the table is used."""
  seen = []
  real = af._down_kernel
  monkeypatch.setattr(af, "_down_kernel", lambda *a, **kw: seen.append(kw["bias_loop"]) or real(*a, **kw))
  x, groups = random_group(tokens + 41, tokens, dim, n, width, size, dtype, k_kind=k_kind)
  outs = {}
  for bound in (tokens, tokens - 1):
    monkeypatch.setattr(af, "DOWN_BIAS_LOOP_MAX_TOKENS", bound)
    check_group(x, groups, n=n, act=act, min_choice=min_choice, sort=sort, split_down=False, **tiles)
    outs[bound], _ = af.acm_group(x, groups, num_learners=n, activation=act, min_choice=min_choice, interpret=True,
                                  sort=sort, split_down=False, **tiles)
  assert seen == [True, True, False, False]
  for loop, table in zip(outs[tokens], outs[tokens - 1]):
    if dtype == jnp.float32:
      np.testing.assert_array_equal(np.asarray(loop), np.asarray(table))
    else:
      assert rel_err(loop, table) < 1e-2


@pytest.mark.parametrize("sums", af.DOWN_SPLIT_SUMS)
def test_split_sum_rounded_in_its_fusion_gives_the_same_outputs(sums, monkeypatch):
  """`DOWN_SPLIT_ROUNDING = "sum"` puts an optimization barrier on the split sum rounded to x's dtype, so XLA writes
  the rounded output instead of the float32 sum. The outputs returned are the same bits as with XLA's own placement
  ("consumers"; inside a model, readers that convert back to float32 may skip the rounding there) and match the
  reference, with a skip connection and random k in bfloat16; a bad setting is named."""
  monkeypatch.setattr(af, "DOWN_SPLIT_SUM", sums)
  tokens, dim, n, width = 197, 64, 4, 32
  x, groups = random_group(23, tokens, dim, n, width, 1, jnp.bfloat16)
  residual = jnp.asarray(np.random.default_rng(24).normal(size=(tokens, dim)) * 4, jnp.bfloat16)
  tiles = split_tiles("split_sorted", width, SMALL)
  # a new function per setting: jax caches a trace by function, and the setting is read while tracing
  new_run = lambda: lambda x, groups, residual: af.acm_group(x, groups, num_learners=n, residual=residual,
                                                             interpret=True, sort=True, split_down=True, **tiles)
  results = {}
  for rounding in af.DOWN_SPLIT_ROUNDINGS:
    monkeypatch.setattr(af, "DOWN_SPLIT_ROUNDING", rounding)
    text = str(jax.make_jaxpr(new_run())(x, groups, residual))
    assert ("optimization_barrier" in text) == (rounding == "sum")
    results[rounding] = jax.jit(new_run())(x, groups, residual)
  (out_sum,), k_sum = results["sum"]
  (out_xla,), k_xla = results["consumers"]
  assert out_sum.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(k_sum), np.asarray(k_xla))
  np.testing.assert_array_equal(np.asarray(out_sum, np.float32), np.asarray(out_xla, np.float32))
  refs, _ = af.acm_group_reference(x, groups, num_learners=n, activation="gelu", k=k_sum, residual=residual)
  assert rel_err(out_sum, refs[0]) < LIMITS[jnp.dtype(jnp.bfloat16)]
  monkeypatch.setattr(af, "DOWN_SPLIT_ROUNDING", "reader")
  with pytest.raises(ValueError, match="DOWN_SPLIT_ROUNDING must be one of .*'reader'"):
    new_run()(x, groups, residual)


@pytest.mark.parametrize("sums", af.DOWN_SPLIT_SUMS)
@pytest.mark.parametrize("sort", [True, False])
@pytest.mark.parametrize("tokens,dim,n,width,size,act,min_choice,dtype,k_kind,tiles",
                         [CASES[i] for i in (0, 1, 4, 6)] + [(197, 64, 4, 32, 1, "gelu", 0, jnp.float32, "full", SMALL)])
def test_split_down_launch_in_parts_of_two_learners_matches_reference(tokens, dim, n, width, size, act, min_choice,
                                                                      dtype, k_kind, tiles, sort, sums, monkeypatch):
  """`DOWN_SPLIT_PARTS = 2`: each program of the split launch reduces over two consecutive learners (stopping at its
  block's largest k), and a token's parts are summed while their first learner lies below its k; against the
  reference with and without a skip connection, both sums, random k, k all N and the forced minimum choice."""
  monkeypatch.setattr(af, "DOWN_SPLIT_PARTS", 2)
  monkeypatch.setattr(af, "DOWN_SPLIT_SUM", sums)
  seen = []
  real = af._down_split_kernel
  monkeypatch.setattr(af, "_down_split_kernel", lambda *a, **kw: seen.append(kw["num_parts"]) or real(*a, **kw))
  check_split_launch(tokens, dim, n, width, size, act, min_choice, dtype, k_kind, tiles, sort, seed=tokens + 9)
  assert seen == [2, 2]


@pytest.mark.parametrize("parts", [3, 0, 8, 2.0])
def test_split_parts_that_do_not_divide_the_learners_are_refused(parts, monkeypatch):
  monkeypatch.setattr(af, "DOWN_SPLIT_PARTS", parts)
  x, groups = random_group(5, 40, 64, 4, 32, 1, jnp.float32)
  with pytest.raises(ValueError, match=f"DOWN_SPLIT_PARTS must be None or a positive divisor .*\\(4\\), got {parts!r}"):
    af.acm_group(x, groups, num_learners=4, interpret=True, sort=True, split_down=True, **SMALL)


def test_split_parts_follow_the_token_count(monkeypatch):
  """`DOWN_SPLIT_PARTS` None: one part per learner up to `DOWN_SPLIT_PER_LEARNER_MAX_TOKENS` tokens, pairs of
  learners above it where N is even; a set `DOWN_SPLIT_PARTS` wins at every count; the launch gets that count."""
  monkeypatch.setattr(af, "DOWN_SPLIT_PARTS", None)
  monkeypatch.setattr(af, "DOWN_SPLIT_PER_LEARNER_MAX_TOKENS", 100)
  assert [af.split_parts(n, t) for n, t in [(4, 100), (4, 101), (6, 1576), (3, 1576), (1, 1576)]] == [4, 2, 3, 3, 1]
  monkeypatch.setattr(af, "DOWN_SPLIT_PER_LEARNER_MAX_TOKENS", None)
  assert af.split_parts(4, 10_000) == 4
  monkeypatch.setattr(af, "DOWN_SPLIT_PARTS", 1)
  assert af.split_parts(4, 5) == 1
  monkeypatch.setattr(af, "DOWN_SPLIT_PARTS", None)
  monkeypatch.setattr(af, "DOWN_SPLIT_PER_LEARNER_MAX_TOKENS", 149)
  seen = []
  real = af._down_split_kernel
  monkeypatch.setattr(af, "_down_split_kernel", lambda *a, **kw: seen.append(kw["num_parts"]) or real(*a, **kw))
  for tokens, seed in ((149, 3), (150, 4)):
    x, groups = random_group(seed, tokens, 64, 4, 32, 1, jnp.float32)
    outs, k = af.acm_group(x, groups, num_learners=4, interpret=True, sort=True, split_down=True, **SMALL)
    refs, _ = af.acm_group_reference(x, groups, num_learners=4, activation="gelu", k=k)
    assert rel_err(outs[0], refs[0]) < 1e-5
  assert seen == [4, 2]


@pytest.mark.parametrize("parts,sums,sort", [(None, "parts", True), (4, "parts", True), (None, "atomic", True),
                                             (4, "atomic", True), (4, "parts", False)])
def test_split_down_launch_lowers_for_cuda_at_vit_b_shapes(sums, parts, sort, monkeypatch):
  """The Triton lowering of the split launch and its sum at batch 8's shapes (1,576 tokens, an MLP ACM of 4
  learners of 768), with the tiles the tuned table gives that bucket; partial outputs or atomic adds, two learners
  per part (the default at that count) or one part per learner; the row blocks sorted, or in token order (the
  unsorted and two-launch paths)."""
  monkeypatch.setattr(af, "DOWN_SPLIT_SUM", sums)
  monkeypatch.setattr(af, "DOWN_SPLIT_PARTS", parts)
  tokens, dim, n, width = 1576, 768, 4, 768
  cfg, path = af.resolve_config(jnp.bfloat16, dim, n * width, tokens, sort=True, block_rows=64, block_out=64,
                                block_hidden=128, num_warps=4)
  padded = -(-tokens // 128) * 128
  shape = jax.ShapeDtypeStruct
  args = ((shape((padded, n * width), jnp.bfloat16),), [dict(w2=shape((n * width, dim), jnp.bfloat16),
                                                            b2=shape((n + 1, dim), jnp.bfloat16))],
          shape((padded,), jnp.int32), shape((padded,), jnp.int32), shape((padded,), jnp.int32),
          shape((tokens, dim), jnp.bfloat16))
  split = functools.partial(af._down_split, cfg=cfg, tokens=tokens, padded=padded, width=width, sort=sort,
                            num_learners=n, dtype=jnp.bfloat16, compiler_params=af._compiler_params(4, 3),
                            interpret=False)
  lowered = jax.jit(split).trace(*args).lower(lowering_platforms=("cuda",))
  assert path == "sorted" and "acm_group_down_split" in lowered.as_text()
  assert ("atomic_rmw" in lowered.as_text()) is (sums == "atomic")


def test_route_settings_follow_the_token_count(monkeypatch):
  """`ROUTE_SMALL_MAX_TOKENS` / `ROUTE_SMALL` up to the first threshold, `ROUTE_MEDIUM_MAX_TOKENS` / `ROUTE_MEDIUM`
  above it up to the second; ROUTE_CHUNK, 64-column steps and the up launch's stages above both or when off."""
  monkeypatch.setattr(af, "ROUTE_SMALL_MAX_TOKENS", 100)
  monkeypatch.setattr(af, "ROUTE_SMALL", {"chunk": 32, "block_k": 256, "num_stages": 1})
  monkeypatch.setattr(af, "ROUTE_MEDIUM_MAX_TOKENS", 200)
  monkeypatch.setattr(af, "ROUTE_MEDIUM", {"chunk": 64, "block_k": 128, "num_stages": 2})
  assert af.route_settings(100, 768, 3) == (32, 256, 1)
  assert af.route_settings(100, 96, 3) == (32, 32, 1)  # the largest power of two up to 256 dividing 96
  assert af.route_settings(101, 768, 3) == (64, 128, 2)
  assert af.route_settings(200, 96, 3) == (64, 32, 2)
  assert af.route_settings(201, 768, 3) == (af.ROUTE_CHUNK, 64, 3)
  monkeypatch.setattr(af, "ROUTE_SMALL_MAX_TOKENS", None)
  assert af.route_settings(1, 768, 2) == (64, 128, 2)
  monkeypatch.setattr(af, "ROUTE_MEDIUM_MAX_TOKENS", None)
  assert af.route_settings(1, 768, 2) == (af.ROUTE_CHUNK, 64, 2)
  monkeypatch.setattr(af, "ROUTE_SMALL_MAX_TOKENS", 100)
  assert af.route_settings(101, 768, 2) == (af.ROUTE_CHUNK, 64, 2)


@pytest.mark.parametrize("bad", [{"chunk": 24, "block_k": 256, "num_stages": 1},
                                 {"chunk": 8, "block_k": 256, "num_stages": 1},
                                 {"chunk": 256, "block_k": 256, "num_stages": 1},
                                 {"chunk": 32, "block_k": 100, "num_stages": 1},
                                 {"chunk": 32, "block_k": 256, "num_stages": 0},
                                 {"chunk": 32, "block_k": 256}, (32, 256, 1)])
@pytest.mark.parametrize("name", ["ROUTE_SMALL", "ROUTE_MEDIUM"])
def test_bad_route_settings_are_refused_naming_them(bad, name, monkeypatch):
  if name == "ROUTE_MEDIUM":  # 40 tokens take the medium settings
    monkeypatch.setattr(af, "ROUTE_SMALL_MAX_TOKENS", 20)
    monkeypatch.setattr(af, "ROUTE_MEDIUM_MAX_TOKENS", 40)
  monkeypatch.setattr(af, name, bad)
  x, groups = random_group(5, 40, 64, 4, 32, 1, jnp.float32)
  with pytest.raises(ValueError, match=f"{name} must be .*got {re.escape(repr(bad))}"):
    af.acm_group(x, groups, num_learners=4, interpret=True, sort=True, **SMALL)


@pytest.mark.parametrize("sort", [True, False])
@pytest.mark.parametrize("chunk,fused_norm,setting", [(16, False, "ROUTE_SMALL"), (32, True, "ROUTE_SMALL"),
                                                      (64, False, "ROUTE_SMALL"), (64, True, "ROUTE_MEDIUM")])
def test_small_route_chunks_give_the_128_token_route_results(chunk, fused_norm, setting, sort, monkeypatch):
  """A q/k/v-like group of 3 ACMs at 300 tokens (three chunks of 128, the last one ragged) routed in chunks of
  16 / 32 / 64 tokens with 64-column gate steps (by ROUTE_SMALL, or ROUTE_MEDIUM above ROUTE_SMALL_MAX_TOKENS)
  against the 128-token route: the same k and outputs (the fused LayerNorm's statistics summed in those steps
  too), and both against the reference."""
  monkeypatch.setattr(af, "NORM_MIN_TOKENS", 0 if fused_norm else None)
  z, norm = norm_inputs(11, 300, 128, jnp.float32)
  _, groups = random_group(12, 300, 128, 4, 32, 3, jnp.float32)
  results = []
  monkeypatch.setattr(af, "ROUTE_SMALL_MAX_TOKENS", None)
  for limit in (None, 10_000):
    monkeypatch.setattr(af, "ROUTE_MEDIUM_MAX_TOKENS", None)
    monkeypatch.setattr(af, setting + "_MAX_TOKENS", limit)
    monkeypatch.setattr(af, setting, {"chunk": chunk, "block_k": 64, "num_stages": 1})
    results.append(af.acm_group(z, groups, num_learners=4, activation="identity", min_choice=1, norm=norm,
                                interpret=True, sort=sort, **SMALL))
  (outs_big, k_big), (outs_small, k_small) = results
  np.testing.assert_array_equal(k_small, k_big)
  assert len(np.unique(np.asarray(k_small))) > 1
  refs, _ = af.acm_group_reference(z, groups, num_learners=4, activation="identity", k=k_small, norm=norm)
  for small, big, ref in zip(outs_small, outs_big, refs):
    assert rel_err(small, big) < 1e-6 and rel_err(small, ref) < LIMITS[jnp.dtype(jnp.float32)]


@pytest.mark.parametrize("chunk,tokens,padded", [(16, 197, 256), (32, 197, 256), (None, 6304, 6400)])
def test_small_route_lowers_for_cuda_at_vit_b_shapes(chunk, tokens, padded, monkeypatch):
  """The Triton lowering of the route and scatter launches at batch 1's shapes (197 tokens, d = 768, an MLP ACM's
  linear gate) in chunks of `chunk` tokens with 256-column gate steps, and at batch 32's (6,304 tokens) with the
  default ROUTE_MEDIUM: one route and one scatter program per chunk."""
  if chunk:
    monkeypatch.setattr(af, "ROUTE_SMALL", {"chunk": chunk, "block_k": 256, "num_stages": 1})
  dim, n = 768, 4
  chunk = af.route_settings(tokens, dim, 3)[0]
  shape = jax.ShapeDtypeStruct
  settings = dict(num_learners=n, min_choice=0, relative_cost=1.0, gate_dtype=jnp.dtype(jnp.bfloat16), block_k=64)
  route = functools.partial(af._route, num_groups=1, padded=padded, linear_gate=True, sort=True, positions=False,
                            gate_settings=settings, num_stages=3, interpret=False)
  lowered = jax.jit(lambda s, x, wg, bg: route(s, x, [wg, bg])).trace(
      shape((1,), jnp.float32), shape((tokens, dim), jnp.bfloat16), shape((dim, n + 1), jnp.bfloat16),
      shape((n + 1,), jnp.bfloat16)).lower(lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert "acm_route" in text and "acm_scatter" in text
  assert re.findall(r"grid_x = (\d+)", text) == [str(padded // chunk)] * 2


# the q/k/v-like groups of CASES, plus 1 and 50,432 tokens
SHARED_CASES = [case for case in CASES if case[4] == 3] + [
    (1, 64, 4, 32, 3, "identity", 1, jnp.float32, "random", SMALL),
    (50432, 16, 4, 8, 3, "identity", 1, jnp.bfloat16, "random", dict(SMALL, block_rows=128, block_hidden=32,
                                                                      block_out=16))]


@pytest.mark.parametrize("tokens,dim,n,width,size,act,min_choice,dtype,k_kind,tiles", SHARED_CASES)
@pytest.mark.parametrize("sort", [True, False])
def test_group_with_a_shared_route_matches_reference(tokens, dim, n, width, size, act, min_choice, dtype, k_kind,
                                                     tiles, sort, monkeypatch):
  """Groups of 3 ACMs whose gates share one route program per chunk (`ROUTE_SHARED_MIN_TOKENS` 0) against the
  reference: gates steered to 0 (which min choice 1 overrides), all-N and random k, 1 to 50,432 tokens, float32
  and bfloat16."""
  if tokens * dim > 200_000 and not sort:
    pytest.skip("the unsorted path at this size adds nothing the sorted one does not test")
  monkeypatch.setattr(af, "ROUTE_SHARED_MIN_TOKENS", 0)
  routes = []
  real = af._route_kernel
  monkeypatch.setattr(af, "_route_kernel", lambda *a, **kw: routes.append(kw["shared"]) or real(*a, **kw))
  x, groups = random_group(tokens + dim + 1, tokens, dim, n, width, size, dtype, k_kind=k_kind)
  k = check_group(x, groups, n=n, act=act, min_choice=min_choice, sort=sort, split_down=False, **tiles)
  assert routes == [True]
  if k_kind == "full":
    assert (np.asarray(k) == n).all()
  elif tokens > 10:  # random gates, or gates steered to 0 that min choice 1 overrides: each ACM spreads over k
    assert all(len(np.unique(np.asarray(row))) > 1 for row in k)


def test_route_shared_follows_the_group_its_gates_and_the_token_count(monkeypatch):
  """`ROUTE_SHARED_MIN_TOKENS`: only groups of several ACMs with linear gates, from that many tokens on."""
  monkeypatch.setattr(af, "ROUTE_SHARED_MIN_TOKENS", 1000)
  assert af.route_shared(3, True, 1000) and not af.route_shared(3, True, 999)
  assert not af.route_shared(1, True, 5000) and not af.route_shared(3, False, 5000)
  monkeypatch.setattr(af, "ROUTE_SHARED_MIN_TOKENS", None)
  assert not af.route_shared(3, True, 10 ** 6)


@pytest.mark.parametrize("sort", [True, False])
@pytest.mark.parametrize("tokens,dtype,fused_norm,gate", [(300, jnp.float32, False, "linear"),
                                                          (300, jnp.float32, True, "linear"),
                                                          (300, jnp.bfloat16, False, "logits"),
                                                          (2500, jnp.bfloat16, True, "linear"),
                                                          (2500, jnp.float32, False, "linear")])
def test_shared_route_gives_the_per_acm_route_results(tokens, dtype, fused_norm, gate, sort, monkeypatch):
  """A q/k/v-like group of 3 ACMs routed with one program per chunk for all three gates (`route_shared`) against
  one program per (ACM, chunk): the same k and outputs, in the small route's chunks (300 tokens) and the 128-token
  ones (2,500, the medium route off), with and without the fused LayerNorm's statistics, and both against the
  reference; sorted, the shared route also files the tokens for the inline sort (`INLINE_SORT_MAX_TOKENS`), with
  the same results. Precomputed logits (a deep gate) keep the per-ACM programs and the same results."""
  monkeypatch.setattr(af, "ROUTE_MEDIUM_MAX_TOKENS", None)
  monkeypatch.setattr(af, "NORM_MIN_TOKENS", 0 if fused_norm else None)
  z, norm = norm_inputs(21, tokens, 128, dtype)
  _, groups = random_group(22, tokens, 128, 4, 32, 3, dtype, gate=gate)
  results = []
  for limit, inline in ((None, False), (0, False)) + (((0, True),) if sort else ()):
    monkeypatch.setattr(af, "ROUTE_SHARED_MIN_TOKENS", limit)
    results.append(af.acm_group(z, groups, num_learners=4, activation="identity", min_choice=1, norm=norm,
                                interpret=True, sort=sort, inline_sort=inline, **SMALL))
  (outs_apart, k_apart), (outs_shared, k_shared) = results[:2]
  for outs_inline, k_inline in results[2:]:
    np.testing.assert_array_equal(k_inline, k_shared)
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(outs_inline, outs_shared))
  np.testing.assert_array_equal(k_shared, k_apart)
  assert all(len(np.unique(np.asarray(k))) > 1 for k in k_shared)
  refs, _ = af.acm_group_reference(z, groups, num_learners=4, activation="identity", k=k_shared, norm=norm)
  for shared, apart, ref in zip(outs_shared, outs_apart, refs):
    assert np.isfinite(np.asarray(shared, np.float32)).all(), "unwritten or NaN output elements"
    assert rel_err(shared, apart) < 1e-6 and rel_err(shared, ref) < LIMITS[jnp.dtype(dtype)]


@pytest.mark.parametrize("tokens,padded", [(197, 256), (6304, 6400)])
def test_shared_route_lowers_for_cuda_at_vit_b_shapes(tokens, padded, monkeypatch):
  """The Triton lowering of the shared route (the q/k/v group's three linear gates, d = 768, bf16) at batch 1's
  and batch 32's token counts: one program per chunk (8 of 32 tokens; 100 of 64), the scatter still one per
  (ACM, chunk)."""
  monkeypatch.setattr(af, "ROUTE_SHARED_MIN_TOKENS", 0)
  dim, n, groups = 768, 4, 3
  shape = jax.ShapeDtypeStruct
  settings = dict(num_learners=n, min_choice=1, relative_cost=0.125, gate_dtype=jnp.dtype(jnp.bfloat16), block_k=64)
  route = functools.partial(af._route, num_groups=groups, padded=padded, linear_gate=True, sort=True,
                            positions=False, gate_settings=settings, num_stages=3, interpret=False)
  gates = [shape((dim, n + 1), jnp.bfloat16), shape((n + 1,), jnp.bfloat16)] * groups
  text = jax.jit(lambda s, x, *g: route(s, x, list(g))).trace(
      shape((1,), jnp.float32), shape((tokens, dim), jnp.bfloat16), *gates).lower(
          lowering_platforms=("cuda",)).as_text()
  chunk = af.route_settings(tokens, dim, 3)[0]
  assert "acm_route" in text and "acm_scatter" in text
  assert re.findall(r"grid_x = (\d+)", text) == [str(padded // chunk), str(groups * padded // chunk)]


@pytest.mark.parametrize("place", af.INLINE_SORT_PLACES)
@pytest.mark.parametrize("tokens,split", [(197, True), (1576, True), (1576, False)])
def test_inline_sort_lowers_for_cuda_at_vit_b_shapes(tokens, split, place, monkeypatch, capsys):
  """The Triton lowering of the sorted path without its scatter launch (`inline_sort`) at batch 1's and 8's shapes
  (an MLP ACM of 4 learners of 768, bf16, the tuned table's tiles): route, up and (split) down launches and no
  scatter launch, one route program per chunk and one up program per (row block, hidden tile); placed by atomic
  counters, the route kernel holds an atomic add and its counts output is the zeroed counters' buffer. Those
  counters are float32: jax's Pallas Triton lowering picks an atomic add's op from the value's type and takes every
  tensor for a float, so an int32 vector add became `fadd` on the integers' bits (on an H100 no count rose and the
  up launch read out of bounds, 2026-12-07 (xx)). In the Triton IR the kernels print (`debug`), every atomic add is
  `fadd` on f32 tensors."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # lowered for CUDA, never run
  monkeypatch.setattr(af.pl, "pallas_call", functools.partial(af.pl.pallas_call, debug=True))
  dim, n, width = 768, 4, 768
  shape, bf16 = jax.ShapeDtypeStruct, jnp.bfloat16
  group = bf16_group_shapes(dim, n, width)
  call = lambda x, g: af.acm_group(x, [g], num_learners=n, sort=True, inline_sort=place, split_down=split,
                                   interpret=False, block_rows=64, block_out=64, block_hidden=128, num_warps=4)
  text = jax.jit(call).trace(shape((tokens, dim), bf16), group).lower(lowering_platforms=("cuda",)).as_text()
  names = re.findall(r'name = "(acm_[a-z_]+)"', text)
  assert names == ["acm_route", "acm_group_up", "acm_group_down_split" if split else "acm_group_down"]
  atomic = place == "atomic"
  assert ("atomic_rmw" in text) == atomic  # the op's name in the serialised Triton IR
  adds = [line for line in capsys.readouterr().out.splitlines() if "tt.atomic_rmw" in line]
  assert bool(adds) == atomic and all(re.search(r"atomic_rmw fadd.*tensor<16xf32>", line) for line in adds), adds
  assert re.findall(r"output_operand_alias<output_tuple_indices = \[(\d+)\]", text) == (["1"] if atomic else [])
  padded = -(-tokens // 128) * 128
  chunk = af.route_settings(tokens, dim, 3)[0]
  assert re.findall(r"grid_x = (\d+)", text)[:2] == [str(padded // chunk), str(padded // 64 * n * width // 128)]


@pytest.mark.parametrize("tokens", [197, 1576])
def test_down_launch_with_the_bias_loop_lowers_for_cuda_at_vit_b_shapes(tokens, monkeypatch):
  """The Triton lowering of the whole down launch adding b2 by a loop over the choices (`DOWN_BIAS_LOOP_MAX_TOKENS`)
  for the q/k/v group (3 ACMs of 4 learners of 96, identity, min choice 1) at batch 1's and 8's token counts: no
  cumulative table (cumsum) left in the program, b2 passed to the launch."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # lowered for CUDA, never run
  dim, n, width = 768, 4, 96
  shape, bf16 = jax.ShapeDtypeStruct, jnp.bfloat16
  group = bf16_group_shapes(dim, n, width)
  call = lambda x, g: af.acm_group(x, [g] * 3, num_learners=n, activation="identity", min_choice=1, sort=True,
                                   split_down=False, interpret=False)
  texts = {}
  for bound in (None, 2048):
    monkeypatch.setattr(af, "DOWN_BIAS_LOOP_MAX_TOKENS", bound)
    run = lambda x, g: call(x, g)  # a new function per setting: no cached trace
    texts[bound] = jax.jit(run).trace(shape((tokens, dim), bf16), group).lower(lowering_platforms=("cuda",)).as_text()
  assert re.findall(r'name = "(acm_[a-z_]+)"', texts[2048])[-1] == "acm_group_down"
  assert "reduce_window" in texts[None] and "reduce_window" not in texts[2048]


def test_asking_for_inline_sort_where_it_cannot_run_names_the_reason():
  x, groups = random_group(9, 40, 64, 4, 32, 1, jnp.float32)
  for kwargs, message in [(dict(sort=False), "'unsorted'"), (dict(twolaunch=True), "'twolaunch'"),
                          (dict(xla=True), "'xla'")]:
    with pytest.raises(ValueError, match=f"inline_sort=True: it runs on the sorted path only .* {message}"):
      af.acm_group(x, groups, num_learners=4, interpret=True, inline_sort=True, **{**SMALL, **kwargs})


def test_an_unknown_inline_sort_placement_is_refused_with_its_name(monkeypatch):
  x, groups = random_group(9, 40, 64, 4, 32, 1, jnp.float32)
  with pytest.raises(ValueError, match=r"inline_sort must be one of \('chunks', 'atomic'\), got 'atomics'"):
    af.acm_group(x, groups, num_learners=4, interpret=True, sort=True, inline_sort="atomics", **SMALL)
  monkeypatch.setattr(af, "INLINE_SORT_PLACE", "ranks")
  with pytest.raises(ValueError, match=r"acm_fused.INLINE_SORT_PLACE must be one of .* got 'ranks'"):
    af.acm_group(x, groups, num_learners=4, interpret=True, sort=True, inline_sort=True, **SMALL)


def test_inline_sort_runs_only_up_to_its_threshold(monkeypatch):
  """`INLINE_SORT_MIN_TOKENS` / `INLINE_SORT_MAX_TOKENS`: the sorted path skips its scatter launch from the one to
  the other token count, and the result is the reference's on both sides of each bound."""
  seen = []
  real = af._route_kernel
  monkeypatch.setattr(af, "_route_kernel", lambda *a, **kw: seen.append(kw["inline"]) or real(*a, **kw))
  monkeypatch.setattr(af, "INLINE_SORT_MIN_TOKENS", 41)
  monkeypatch.setattr(af, "INLINE_SORT_MAX_TOKENS", 149)
  for tokens, seed in ((40, 7), (41, 8), (149, 5), (150, 6)):
    x, groups = random_group(seed, tokens, 64, 4, 32, 1, jnp.float32)
    check_group(x, groups, n=4, sort=True, **SMALL)
  monkeypatch.setattr(af, "INLINE_SORT_MAX_TOKENS", None)
  check_group(x, groups, n=4, sort=True, **SMALL)
  assert seen == [False, True, True, False, False]


def test_inline_sort_reaches_its_wide_bound_for_the_listed_kinds_only(monkeypatch):
  """`INLINE_SORT_WIDE_KINDS` / `INLINE_SORT_WIDE_MAX_TOKENS`: between the two bounds an MLP-shaped group (4
  learners of 32 at d = 64) skips its scatter launch when "mlp" is listed and a projection-shaped one (4 of 16,
  identity, min choice 1) keeps it; both agree with the reference either way, and an unlisted kind, or a wide bound
  below the common one, changes nothing."""
  seen = []
  real = af._route_kernel
  monkeypatch.setattr(af, "_route_kernel", lambda *a, **kw: seen.append(kw["inline"]) or real(*a, **kw))
  monkeypatch.setattr(af, "INLINE_SORT_MIN_TOKENS", 0)
  monkeypatch.setattr(af, "INLINE_SORT_MAX_TOKENS", 60)
  monkeypatch.setattr(af, "INLINE_SORT_WIDE_MAX_TOKENS", 149)
  mlp = random_group(3, 100, 64, 4, 32, 1, jnp.float32)
  proj = random_group(4, 100, 64, 4, 16, 1, jnp.float32)
  assert af.shape_kind(64, 4 * 32) == "mlp" and af.shape_kind(64, 4 * 16) == "proj"
  for kinds in ((), ("mlp",), ("proj",)):
    monkeypatch.setattr(af, "INLINE_SORT_WIDE_KINDS", kinds)
    check_group(*mlp, n=4, sort=True, **SMALL)
    check_group(*proj, n=4, act="identity", min_choice=1, sort=True, **SMALL)
  monkeypatch.setattr(af, "INLINE_SORT_WIDE_KINDS", ("mlp",))
  monkeypatch.setattr(af, "INLINE_SORT_WIDE_MAX_TOKENS", 30)  # below INLINE_SORT_MAX_TOKENS: the larger bound wins
  check_group(*random_group(5, 50, 64, 4, 32, 1, jnp.float32), n=4, sort=True, **SMALL)
  assert seen == [False, False, True, False, False, True, True]


def test_asking_for_a_split_down_launch_where_it_cannot_run_names_the_reason():
  x, groups = random_group(8, 40, 64, 4, 32, 1, jnp.float32)
  cases = [(dict(onepass=True), "it runs on the sorted, unsorted, twolaunch paths only .* 'onepass'"),
           (dict(sort=True, block_k_down=64, block_hidden=64), "the learner width 32 must be a multiple of block_k_down=64")]
  for kwargs, message in cases:
    with pytest.raises(ValueError, match=f"split_down=True: {message}"):
      af.acm_group(x, groups, num_learners=4, interpret=True, split_down=True, **{**SMALL, **kwargs})


def test_layer_norm_below_the_token_threshold_runs_first_and_agrees(monkeypatch):
  """Below `NORM_MIN_TOKENS` (or with it None, the default), above `NORM_MAX_TOKENS` and for a shape kind
  outside `NORM_KINDS` the LayerNorm runs as XLA before unfused kernels: the same function."""
  n = 4
  z, norm = norm_inputs(0, 150, 64, jnp.float32)
  _, groups = random_group(1, 150, 64, n, 32, 1, jnp.float32)  # 4 x 32 hidden units over d = 64: "mlp"
  folds = []
  monkeypatch.setattr(af, "fold_norm", lambda *a, real=af.fold_norm: folds.append(1) or real(*a))
  call = functools.partial(af.acm_group, z, groups, num_learners=n, norm=norm, interpret=True, sort=True, **SMALL)
  # (NORM_MIN_TOKENS, NORM_MAX_TOKENS, NORM_KINDS, whether the group fuses the LayerNorm)
  settings = [(0, None, ("mlp", "proj"), True), (0, 150, ("mlp",), True), (151, None, ("mlp", "proj"), False),
              (None, None, ("mlp", "proj"), False), (0, 149, ("mlp", "proj"), False), (0, None, ("proj",), False)]
  results = []
  for low, high, kinds, fused in settings:
    for name, value in zip(("NORM_MIN_TOKENS", "NORM_MAX_TOKENS", "NORM_KINDS"), (low, high, kinds)):
      monkeypatch.setattr(af, name, value)
    before = len(folds)
    results.append(call())
    assert len(folds) - before == int(fused), (low, high, kinds)
  for got in results[1:]:
    np.testing.assert_array_equal(results[0][1], got[1])
    assert rel_err(results[0][0][0], got[0][0]) < 1e-5


def test_layer_norm_equals_flax_and_the_fold_is_exact():
  """`layer_norm` against flax's LayerNorm, and the folded up projection against LN(z) @ w1 + b1, in
  float64 arithmetic on float32 inputs."""
  z, (scale, bias, eps) = norm_inputs(2, 50, 48, jnp.float32)
  ln = flax.linen.LayerNorm(epsilon=eps, dtype=jnp.float32)
  want = ln.apply({"params": {"scale": scale, "bias": bias}}, z)
  np.testing.assert_allclose(af.layer_norm(z, scale, bias, eps), want, rtol=1e-6, atol=1e-6)
  zb = z.astype(jnp.bfloat16)
  np.testing.assert_array_equal(af.layer_norm(zb, scale, bias, eps),
                                flax.linen.LayerNorm(epsilon=eps, dtype=jnp.bfloat16).apply(
                                    {"params": {"scale": scale, "bias": bias}}, zb))
  rng = np.random.default_rng(3)
  w1 = jnp.asarray(rng.normal(size=(48, 40)), jnp.float32)
  b1 = jnp.asarray(rng.normal(size=40), jnp.float32)
  scaled, folded, colsum = (np.asarray(a, np.float64) for a in af.fold_norm(w1, b1, scale, bias))
  z64 = np.asarray(z, np.float64)
  mean = z64.mean(1, keepdims=True)
  rstd = 1 / np.sqrt(z64.var(1, keepdims=True) + eps)
  f64 = lambda a: np.asarray(a, np.float64)
  direct = ((z64 - mean) * rstd * f64(scale) + f64(bias)) @ f64(w1) + f64(b1)
  np.testing.assert_allclose(rstd * (z64 @ scaled) - mean * rstd * colsum + folded, direct, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["sorted", "onepass", "twolaunch", "split_twolaunch", "xla"])
def test_given_logits_cost_shift_and_no_bias_under_jit(path):
  """Deep gates hand in logits; a traced cost shift lowers k as the XLA gate's does."""
  n = 4
  x, groups = random_group(1, 300, 64, n, 32, 2, jnp.float32, gate="logits", bias=False)
  fn = jax.jit(lambda x, g, shift: af.acm_group(x, g, num_learners=n, cost_shift=shift, interpret=True,
                                                 **PATHS[path], **SMALL))
  means = []
  for shift in (0.0, 4.0):
    outs, k = fn(x, groups, jnp.float32(shift))
    refs, k_ref = af.acm_group_reference(x, groups, num_learners=n, cost_shift=shift)
    np.testing.assert_array_equal(k, k_ref)
    for out, ref in zip(outs, refs):
      assert rel_err(out, ref) < 1e-5
    means.append(float(k.mean()))
  assert means[1] < means[0]


def test_group_apply_on_batched_tokens_equals_the_flat_reference():
  n = 4
  x, groups = random_group(2, 2 * 40, 64, n, 32, 3, jnp.float32)
  kw = dict(num_learners=n, activation="identity", min_choice=1, cost_shift=0.5)
  outs, k = inference.acm_group_apply(x.reshape(2, 40, 64), groups, **kw)
  refs, k_ref = af.acm_group_reference(x, groups, **kw)
  assert k.shape == (3, 2, 40)
  np.testing.assert_array_equal(k.reshape(3, 80), k_ref)
  for out, ref in zip(outs, refs):
    assert out.shape == (2, 40, 64) and rel_err(out.reshape(80, 64), ref) < 1e-5


def test_a_tuned_path_is_followed_unless_a_path_is_asked_for(monkeypatch):
  monkeypatch.setattr(af, "gpu_family", lambda: "hopper")
  monkeypatch.setattr(af, "TUNED", {(af.token_bucket(197), "proj"): dict(xla=True)})
  assert af.resolve_config(jnp.bfloat16, 768, 384, 197)[1] == "xla"
  assert af.resolve_config(jnp.bfloat16, 768, 384, 197, sort=True)[1] == "sorted"
  assert af.resolve_config(jnp.bfloat16, 768, 384, 197, onepass=True)[1] == "onepass"
  assert af.resolve_config(jnp.bfloat16, 768, 3072, 197)[1] == "unsorted"  # the MLP's entry is not tuned
  assert af.resolve_config(jnp.float32, 768, 384, 197)[1] == "unsorted"  # the table is for bf16


def test_a_tuned_entry_that_turns_a_switch_off_is_followed(monkeypatch):
  """An entry may set a path switch to False (`{"sort": False}`, as `switch_ab`'s TUNED@ variants write it):
  only tile sizes are checked against the shapes (a False once went into that check as a divisor)."""
  monkeypatch.setattr(af, "gpu_family", lambda: "hopper")
  monkeypatch.setattr(af, "TUNED", {(af.token_bucket(197), "mlp"): dict(block_rows=64, sort=False, xla=False)})
  cfg, path = af.resolve_config(jnp.bfloat16, 768, 3072, 197)
  assert (cfg.block_rows, path) == (64, "unsorted")
  monkeypatch.setattr(af, "TUNED", {(af.token_bucket(4096), "mlp"): dict(sort=False)})
  assert af.resolve_config(jnp.bfloat16, 768, 3072, 4096)[1] == "unsorted"  # the heuristic sorts there
  assert af.default_settings(jnp.bfloat16, 768, 3072, 4096)["sort"] is False


def test_tuned_tiles_that_do_not_fit_a_smaller_model_keep_the_heuristic(monkeypatch):
  """The Hopper table's tiles were tuned at d = 768; at d = 64 its block_out = 128 would not divide d
  (found on an H200 with the tiny ViT): that field keeps the heuristic's value, the rest applies."""
  monkeypatch.setattr(af, "gpu_family", lambda: "hopper")
  tuned = dict(block_rows=64, block_out=128, block_hidden=128, num_warps=4, sort=True)
  monkeypatch.setattr(af, "TUNED", {(af.token_bucket(197), "mlp"): tuned})
  cfg, path = af.resolve_config(jnp.bfloat16, 64, 256, 197)
  heuristic = af._largest_divisor(64, 64)
  assert (cfg.block_out, cfg.block_hidden, cfg.block_rows, path) == (heuristic, 128, 64, "sorted")
  cfg, _ = af.resolve_config(jnp.bfloat16, 768, 3072, 197)
  assert (cfg.block_out, cfg.block_hidden) == (128, 128)  # where it fits, the table's values
  x, groups = random_group(0, 197, 64, 4, 64, 1, jnp.bfloat16)
  check_group(x, groups, n=4)  # the call those tiles would have stopped, against the reference


def test_a_tuned_reduction_step_follows_the_hidden_tile_in_use(monkeypatch):
  """The table's block_k_down (128 at batch 32's MLP, 2026-12-07 (xxii)) was tuned beside a hidden tile of 128:
  where N*h = 192 keeps the heuristic's tile of 64, or the caller asks for 64, the step follows that tile instead
  of failing validation; asked for explicitly, a step that does not divide still raises."""
  monkeypatch.setattr(af, "gpu_family", lambda: "hopper")
  tuned = dict(block_rows=64, block_hidden=128, block_k_down=128, num_warps=4, sort=True)
  monkeypatch.setattr(af, "TUNED", {(af.token_bucket(4096), "mlp"): tuned})
  assert af.resolve_config(jnp.bfloat16, 768, 3072, 4096)[0].block_k_down == 128  # where it fits, the table's
  cfg, path = af.resolve_config(jnp.bfloat16, 64, 192, 4096)
  assert (cfg.block_hidden, cfg.block_k_down, path) == (64, 64, "sorted")
  cfg, _ = af.resolve_config(jnp.bfloat16, 768, 3072, 4096, block_hidden=64)
  assert (cfg.block_hidden, cfg.block_k_down) == (64, 64)
  with pytest.raises(ValueError, match="block_k_down=128 does not divide block_hidden=64"):
    af.resolve_config(jnp.bfloat16, 768, 3072, 4096, block_hidden=64, block_k_down=128)
  # the call such an entry would have stopped (N*h = 192 at the entry's bucket), against the reference
  monkeypatch.setattr(af, "TUNED", {(af.token_bucket(197), "mlp"): tuned})
  x, groups = random_group(3, 197, 64, 4, 48, 1, jnp.bfloat16)
  check_group(x, groups, n=4)


@pytest.mark.parametrize("path", ["sorted", "unsorted", "split_sorted", "inline_atomic_sorted", "inline_atomic_split"])
def test_down_launch_row_blocks_of_its_own_agree_with_the_reference(path):
  """`block_rows_down` / `num_warps_down`: the down launch (whole or split) walks row blocks of 16 under the up
  launch's 32, sorted or in token order, with or without the scatter launch; random k, the outputs the reference's
  (each down block reads only hidden tiles below its own largest k, which its up block wrote)."""
  x, groups = random_group(11, 150, 64, 4, 32, 2, jnp.float32)
  tiles = dict(SMALL, block_rows=32, block_rows_down=16, num_warps_down=8)
  k = check_group(x, groups, n=4, **PATHS[path], **tiles)
  assert len(np.unique(np.asarray(k))) > 2  # several choices in play


def test_down_row_blocks_that_do_not_divide_the_up_launchs_are_refused_or_dropped(monkeypatch):
  """Asked for, down row blocks larger than the up launch's (they would read hidden tiles no up program wrote)
  raise naming both; a table's down row blocks fall back to the up launch's where the caller asks for smaller up
  row blocks; odd warps raise."""
  with pytest.raises(ValueError, match="block_rows_down=64 does not divide the up launch's block_rows=32"):
    af.resolve_config(jnp.float32, 64, 128, 150, block_rows=32, block_rows_down=64)
  with pytest.raises(ValueError, match="block_rows_down=48 must be a power of two"):
    af.resolve_config(jnp.float32, 64, 128, 150, block_rows=64, block_rows_down=48)
  with pytest.raises(ValueError, match="num_warps_down=3 must be one of"):
    af.resolve_config(jnp.float32, 64, 128, 150, num_warps_down=3)
  monkeypatch.setattr(af, "gpu_family", lambda: "hopper")
  tuned = dict(block_rows=128, block_rows_down=64, num_warps=8, num_warps_down=4, sort=True)
  monkeypatch.setattr(af, "TUNED", {(af.token_bucket(1576), "mlp"): tuned})
  cfg, _ = af.resolve_config(jnp.bfloat16, 768, 3072, 1576)
  assert (cfg.block_rows, cfg.down_rows, cfg.num_warps, cfg.down_warps) == (128, 64, 8, 4)
  cfg, _ = af.resolve_config(jnp.bfloat16, 768, 3072, 1576, block_rows=32)
  assert (cfg.block_rows, cfg.down_rows) == (32, 32)
  assert af.resolve_config(jnp.bfloat16, 768, 3072, 50432)[0].down_rows == 128  # no entry: the up launch's


@pytest.mark.parametrize("split", [False, True])
def test_down_launch_row_blocks_of_its_own_lower_for_cuda(split, monkeypatch):
  """At batch 8's shape (1,576 tokens, padded to 1,664; an MLP ACM of 4 learners of 768, bf16) the up launch runs
  13 row blocks of 128 x 24 hidden tiles on 8 warps and the down launch 26 row blocks of 64 x 12 output tiles (x 2
  parts when split) on 4 warps."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # lowered for CUDA, never run
  dim, n, width = 768, 4, 768
  shape, bf16 = jax.ShapeDtypeStruct, jnp.bfloat16
  group = bf16_group_shapes(dim, n, width)
  call = lambda x, g: af.acm_group(x, [g], num_learners=n, sort=True, inline_sort=False, split_down=split,
                                   interpret=False, block_rows=128, block_rows_down=64, num_warps=8, num_warps_down=4,
                                   block_out=64, block_hidden=128)
  text = jax.jit(call).trace(shape((1576, dim), bf16), group).lower(lowering_platforms=("cuda",)).as_text()
  assert re.findall(r'name = "(acm_[a-z_]+)"', text)[2:] == ["acm_group_up",
                                                            "acm_group_down_split" if split else "acm_group_down"]
  assert re.findall(r"grid_x = (\d+)", text)[2:] == ["312", str(26 * 12 * (2 if split else 1))]
  assert re.findall(r"num_warps = (\d+)", text)[2:] == ["8", "4"]

@pytest.mark.parametrize("dim,total", [(768, 3072), (768, 384), (384, 1536), (1024, 4096)])
def test_the_committed_tile_table_resolves_at_vit_shapes(dim, total, monkeypatch):
  """Each entry of the committed Hopper table, at the largest token count of its bucket (50,432 for the last), gives
  a config `resolve_config` accepts (ViT-B/16's MLP and q/k/v widths, ViT-S/16's and ViT-L/16's MLPs), with the
  table's tiles wherever they divide the model's sizes and the table's path."""
  monkeypatch.setattr(af, "gpu_family", lambda: "hopper")
  fields = {f.name for f in dataclasses.fields(af.FusedConfig)}
  wholes = {"block_out": dim, "block_k_up": dim, "block_hidden": total}
  entries = [(bucket, entry) for (bucket, kind), entry in af.TUNED.items() if kind == af.shape_kind(dim, total)]
  assert entries
  for bucket, entry in entries:
    tokens = bucket or 50432
    assert af.token_bucket(tokens) == bucket
    cfg, path = af.resolve_config(jnp.bfloat16, dim, total, tokens)
    for name, value in entry.items():
      if name in fields and wholes.get(name, value) % value == 0:
        assert getattr(cfg, name) == value, (bucket, name)
    assert path == ("xla" if entry.get("xla") else "sorted" if entry.get("sort") else "unsorted")
  if dim == 768:  # one image unsorted (2026-12-07 (xix)), two images and more sorted
    assert [af.resolve_config(jnp.bfloat16, dim, total, t)[1] for t in (197, 256, 257, 1576)] == [
        "unsorted", "unsorted", "sorted", "sorted"]
  if (dim, total) == (768, 3072):  # batch 32's MLP entry (2026-12-06 (xv)) against the heuristic's 64 rows, 4 warps
    cfg, _ = af.resolve_config(jnp.bfloat16, dim, total, 6304)
    assert (cfg.block_rows, cfg.num_warps) == (128, 8)
    # one image's MLP on a 6-stage pipeline (2026-12-07 (xviii)), two images' on the heuristic's 3
    assert [af.resolve_config(jnp.bfloat16, dim, total, t)[0].num_stages for t in (197, 256, 257, 394)] == [6, 6, 3, 3]
    monkeypatch.setattr(af, "gpu_family", lambda: "other")
    cfg, _ = af.resolve_config(jnp.bfloat16, dim, total, 6304)
    assert (cfg.block_rows, cfg.num_warps) == (64, 4)
  if (dim, total) == (768, 384):  # the q/k/v group keeps its batch-1 tiles in the one-image bucket
    assert af.resolve_config(jnp.bfloat16, dim, total, 197)[0] == af.resolve_config(jnp.bfloat16, dim, total, 394)[0]


@pytest.mark.parametrize("path", ["default", "layer_norm_fold", "layer_norm_prologue", "residual_in_kernel",
                                  "onepass", "twolaunch", "xla", "shared_route", "shared_route_layer_norm_fold",
                                  "inline_sort", "inline_sort_atomic"])
def test_vit_fused_path_equals_xla_path_at_its_choices(path, monkeypatch, attention=True):
  """The whole model: fused kernels (q/k/v as one group) against the XLA path forced to
  the same per-ACM choices, and the block-0 gates against the XLA gates; with the
  default paths, with the LayerNorms before the MLP and q/k/v groups fused into their kernels
  (both forms), with the skip connections added by the down launches, with every ACM on the
  one-launch path, with every group on the dense XLA path of `acm_group` (as the tuned table
  may pick it), with the q/k/v group's gates in one route program per chunk (`ROUTE_SHARED_MIN_TOKENS`),
  alone and with the fused LayerNorm, and with every group sorted without its scatter launch
  (`INLINE_SORT_MAX_TOKENS`), its tokens placed by per-chunk counts or by atomic counters (`INLINE_SORT_PLACE`)."""
  folds, stats = [], []
  monkeypatch.setattr(af, "fold_norm", lambda *a, real=af.fold_norm: folds.append(1) or real(*a))
  monkeypatch.setattr(af, "_row_stats", lambda *a, real=af._row_stats, **kw: stats.append(1) or real(*a, **kw))
  residuals = []
  real_down = af._down_kernel
  monkeypatch.setattr(af, "_down_kernel",
                      lambda *a, **kw: residuals.append(kw.get("has_residual")) or real_down(*a, **kw))
  routes = []
  real_route = af._route_kernel
  monkeypatch.setattr(af, "_route_kernel",
                      lambda *a, **kw: routes.append((kw["shared"], kw["inline"], kw["atomic"]))
                      or real_route(*a, **kw))
  shared = path.startswith("shared_route")  # the tiny model's few tokens are below the default threshold
  if shared:
    monkeypatch.setattr(af, "ROUTE_SHARED_MIN_TOKENS", 0)
    path = path[len("shared_route_"):] or "default"
  if path.startswith("layer_norm"):
    monkeypatch.setattr(af, "NORM_MIN_TOKENS", 0)
    monkeypatch.setattr(af, "NORM_MODE", path.split("_")[-1])
  if path == "residual_in_kernel":  # the whole down launch adds it (the split one leaves the sum to XLA)
    monkeypatch.setattr(af, "RESIDUAL_MIN_TOKENS", 0)
    monkeypatch.setattr(af, "DOWN_SPLIT_MAX_TOKENS", None)
  if path == "onepass":
    monkeypatch.setattr(af, "ONEPASS_MAX_TOKENS", 1 << 20)
  if path == "twolaunch":
    monkeypatch.setattr(af, "TWOLAUNCH_MAX_TOKENS", 1 << 20)
  if path.startswith("inline_sort"):  # the tiny model's few tokens sort only when asked to
    monkeypatch.setattr(af, "SORT_MIN_TOKENS", 0)
    monkeypatch.setattr(af, "INLINE_SORT_MIN_TOKENS", 0)
    monkeypatch.setattr(af, "INLINE_SORT_MAX_TOKENS", 1 << 20)
    monkeypatch.setattr(af, "INLINE_SORT_PLACE", "atomic" if path.endswith("atomic") else "chunks")
  if path == "xla":
    real = af.default_settings
    monkeypatch.setattr(af, "default_settings", lambda *a: {**real(*a), "xla": True})
  cfg = vit.get_config("tiny", depth=2, acm=acm_lib.ACMConfig(num_learners=4, attention=attention, impl="pallas"))
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  model = vit.ViT(cfg)
  params = model.init(jax.random.key(1), images[:1])["params"]
  for calls in (folds, stats, residuals, routes):  # those of the forward, not of init's
    calls.clear()
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  rng = np.random.default_rng(0)
  for name in flat:  # gates that spread over k
    if name.endswith("gate/out/kernel"):
      flat[name] = jnp.asarray(rng.normal(size=flat[name].shape) * 2 / np.sqrt(cfg.dim), jnp.float32)
  params = flax.traverse_util.unflatten_dict(flat, sep="/")
  logits, state = model.apply({"params": params}, images, mutable=["acm"])
  choices = flax.traverse_util.flatten_dict(state["acm"], sep="/")
  kmap = {name[:-len("/choice")]: jnp.argmax(v[0], -1) for name, v in choices.items() if name.endswith("/choice")}
  assert len(kmap) == cfg.depth * (5 if attention else 1)
  # fused, every pre-LN group (the MLP, and q/k/v when ACMized) takes its LayerNorm into its kernels
  assert len(folds) == (cfg.depth * (4 if attention else 1) if path == "layer_norm_fold" else 0)
  assert bool(stats) == path.startswith("layer_norm")
  # the MLP and the output projection take the skip connection, the q/k/v group does not
  fused = path == "residual_in_kernel"
  assert residuals.count(True) == (cfg.depth * (2 if attention else 1) if fused else 0)
  # routed paths: a route launch per group and layer (q/k/v, out, MLP), the q/k/v group's shared when asked for
  if path in ("default", "layer_norm_fold", "inline_sort", "inline_sort_atomic"):
    assert len(routes) == cfg.depth * (3 if attention else 1)
    assert [r[0] for r in routes].count(True) == (cfg.depth if shared and attention else 0)
    assert all(inline == path.startswith("inline_sort") for _, inline, _ in routes)
    assert all(atomic == (path == "inline_sort_atomic") for _, _, atomic in routes)
  xla_model = vit.ViT(dataclasses.replace(cfg, acm=dataclasses.replace(cfg.acm, impl="xla")))
  with acm_lib.force_k(kmap):
    ref, ref_state = xla_model.apply({"params": params}, images, mutable=["acm"])
  assert rel_err(logits, ref) < 1e-5
  ref_flat = flax.traverse_util.flatten_dict(ref_state["acm"], sep="/")
  for name, k in kmap.items():
    if name.startswith("block_0/"):
      np.testing.assert_array_equal(jnp.argmax(ref_flat[f"{name}/logits"][0], -1), k)
  # and without statistics collected (the serving path) the same logits
  np.testing.assert_allclose(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images), logits,
                             rtol=1e-6, atol=1e-6)


def test_shapes_the_kernels_cannot_tile_take_the_xla_path_unless_a_kernel_is_asked_for():
  n = 4
  x, groups = random_group(3, 50, 40, n, 6, 2, jnp.float32)  # d = 40, N*h = 24: no 16-wide tiles
  outs, k = af.acm_group(x, groups, num_learners=n, activation="gelu", interpret=True)
  refs, k_ref = af.acm_group_reference(x, groups, num_learners=n, activation="gelu")
  np.testing.assert_array_equal(k, k_ref)
  for out, ref in zip(outs, refs):
    assert rel_err(out, ref) < 1e-5
  with pytest.raises(ValueError, match="must be a power of two >= 16"):
    af.acm_group(x, groups, num_learners=n, sort=True, interpret=True)


def test_bad_inputs_name_the_problem():
  n = 4
  x, groups = random_group(0, 20, 64, n, 32, 1, jnp.float32)
  call = functools.partial(af.acm_group, num_learners=n, interpret=True)
  with pytest.raises(ValueError, match="at least one token"):
    call(x[:0], groups)
  with pytest.raises(ValueError, match="exactly one of 'gate'"):
    call(x, [{**groups[0], "logits": jnp.zeros((20, n + 1))}])
  with pytest.raises(ValueError, match="w2 must have shape"):
    call(x, [{**groups[0], "w2": groups[0]["w2"][:, :32]}])
  with pytest.raises(ValueError, match="1..4 ACMs"):
    call(x, groups * 5)
  with pytest.raises(ValueError, match="block_hidden=48 must be a power of two"):
    call(x, groups, block_hidden=48)
  with pytest.raises(ValueError, match="block_out=128 does not divide d=64"):
    call(x, groups, block_out=128)
  with pytest.raises(ValueError, match="unknown kernel settings"):
    call(x, groups, block_cols=32)
  with pytest.raises(ValueError, match="block_out=128 does not divide d=64"):
    call(x, groups, onepass=True, block_out=128)
  with pytest.raises(ValueError, match="GPUs only"):
    af.acm_group(x, groups, num_learners=n, interpret=False)
  with pytest.raises(ValueError, match="at least one token"):
    inference.acm_group_apply(jnp.zeros((0, 5, 64)), groups, num_learners=n)
  merged = [{**groups[0], **af.merge_linear_learners(groups[0], n)}]
  with pytest.raises(ValueError, match="merged=True needs every ACM of the group to carry 'merged'"):
    call(x, groups, activation="identity", merged=True)
  with pytest.raises(ValueError, match="linear learners .*got 'gelu'"):
    call(x, merged, activation="gelu")
  with pytest.raises(ValueError, match=r"ACM 0: merged must have shape \(320, 64\)"):
    call(x, [{**merged[0], "merged": merged[0]["merged"][:64]}], activation="identity")
  with pytest.raises(ValueError, match="do not hold 3 learners"):
    af.merge_linear_learners(groups[0], 3)
  ones = jnp.ones((64,))
  with pytest.raises(ValueError, match=r"norm scale must have shape \(64,\)"):
    call(x, groups, norm=(ones[:32], ones, 1e-6))
  with pytest.raises(ValueError, match="norm eps must be a positive Python float, got -1"):
    call(x, groups, norm=(ones, ones, -1.0))
  with pytest.raises(ValueError, match=r"norm must be \(scale, bias, eps\)"):
    call(x, groups, norm=ones)
  with pytest.raises(ValueError, match=r"residual must match x: shape \(20, 64\) and dtype float32, got \(20, 32\)"):
    call(x, groups, residual=x[:, :32])
  with pytest.raises(ValueError, match="norm_mode must be one of .*got 'epilogue'"):
    call(x, groups, norm=(ones, ones, 1e-6), norm_mode="epilogue")


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_a_batch_of_no_images_is_refused_with_its_shape(impl):
  cfg = vit.get_config("tiny", depth=1, acm=acm_lib.ACMConfig(num_learners=4, attention=True, impl=impl))
  model = vit.ViT(cfg)
  params = model.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)))["params"]
  with pytest.raises(ValueError, match=r"at least one image.*got shape \(0, 32, 32, 3\)"):
    model.apply({"params": params}, jnp.ones((0, 32, 32, 3)))
