"""`benchmarks.fused_tune`'s candidate spaces: every candidate is a configuration the kernels take."""

import pytest

from benchmarks import fused_tune
from pallas_kernels import acm_fused as af

D, N = 768, 4  # ViT-B/16: an MLP ACM of four learners of 768, the q/k/v group's learners of 96
SHAPES = {"mlp": 4 * 768, "proj": 4 * 96}


@pytest.mark.parametrize("tokens", [197, 1576, 6304, 50432])
@pytest.mark.parametrize("kind", ["mlp", "proj"])
@pytest.mark.parametrize("space", ["default", "wide"])
def test_every_candidate_resolves_to_its_own_tiles(tokens, kind, space):
  cands = list(fused_tune.SPACES[space](tokens, kind))
  assert cands, f"no candidates for {space} at {tokens} tokens"
  assert len({tuple(sorted(c.items())) for c in cands}) == len(cands), "a candidate repeats"
  for cand in cands:
    settings = {name: value for name, value in cand.items() if name != "parts"}
    cfg, path = af.resolve_config("bfloat16", D, SHAPES[kind], tokens, **settings)
    for name in ("block_rows", "block_out", "block_hidden", "num_warps"):
      if name in cand:
        assert getattr(cfg, name) == cand[name], (cand, cfg)
    expected = ("xla" if cand.get("xla") else "twolaunch" if cand.get("twolaunch") else
                "onepass" if cand.get("onepass") else "sorted" if cand.get("sort") else "unsorted")
    assert path == expected, (cand, path)


def test_the_wide_space_splits_per_learner_only_where_the_default_splits_in_pairs():
  # 1,576 tokens: above DOWN_SPLIT_PER_LEARNER_MAX_TOKENS, at most DOWN_SPLIT_MAX_TOKENS: pairs of learners
  assert af.split_parts(N, 1576) == 2 and af.split_parts(N, 197) == N
  at_1576 = list(fused_tune.wide_candidates(1576, "mlp"))
  with_parts = [c for c in at_1576 if "parts" in c]
  assert with_parts and all(c["parts"] == N and c["block_out"] >= 128 for c in with_parts)
  assert len(at_1576) - len(with_parts) == 18  # 3 row blocks x 3 output tiles x 2 hidden tiles
  assert not any("parts" in c for t in (197, 6304) for c in fused_tune.wide_candidates(t, "mlp"))
  assert {c["block_hidden"] for c in fused_tune.wide_candidates(6304, "proj")} == {128}


@pytest.mark.parametrize("kind", ["mlp", "proj"])
@pytest.mark.parametrize("r", [0.25, 0.5])
def test_the_gates_spread_k_about_as_binomial(kind, r):
  """`inputs`' gates (which `group_profile` shares) pick k with about the Binomial(4, r) spread that
  `vit_bench.set_gates` gives the whole model, not one k for every token: until 2026-12-07 (xix) their noise was
  a factor sqrt(d) too small and every token took the pmf's mode, which hid what sorting is for."""
  import math

  import numpy as np
  x, groups, _ = fused_tune.inputs(4000, kind, np.random.default_rng(1), r)
  pmf = np.array([math.comb(N, j) * r ** j * (1 - r) ** (N - j) for j in range(N + 1)])
  xs = np.asarray(x, np.float32)
  for group in groups:
    wg, bg = (np.asarray(a, np.float32) for a in group["gate"])
    k = np.argmax(xs @ wg + bg, axis=-1)
    freq = np.bincount(k, minlength=N + 1) / k.size
    assert np.abs(freq - pmf).max() < 0.04, (freq, pmf)
    assert abs(k.mean() - N * r) < 0.1
