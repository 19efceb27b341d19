"""benchmarks/route_bench.py: a CPU smoke run in interpret mode (k checked against the 128-token route, records
written), refusals of bad flags, and a setting whose k differs stops the run naming it."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import route_bench
from pallas_kernels import acm_fused

FLAGS = ["--tokens", "40,150", "--dim", "64", "--chunks", "32,16", "--block-k", "64,16", "--stages", "1",
         "--calls", "2", "--interpret"]


def test_smoke_run_records_every_setting_and_restores_the_route_settings(tmp_path):
  before = acm_fused.ROUTE_SMALL_MAX_TOKENS, dict(acm_fused.ROUTE_SMALL)
  out = tmp_path / "route.json"
  out.write_text(json.dumps([{"earlier": True}]))
  records = route_bench.main(FLAGS + ["--out", str(out)])
  assert [(r["tokens"], r["chunk"], r["block_k"]) for r in records] == [
      (t, c, b) for t in (40, 150) for c in (32, 16) for b in (64, 16)]
  assert all(r["k_agrees"] and r["route_us"] is None and r["scatter_us"] is None and r["dim"] == 64
             and r["num_stages"] == 1 and r["groups"] == 1 and r["shared"] is False for r in records)
  assert json.loads(out.read_text()) == [{"earlier": True}] + records
  assert (acm_fused.ROUTE_SMALL_MAX_TOKENS, acm_fused.ROUTE_SMALL) == before


def test_a_group_smoke_run_records_both_forms_of_its_route(tmp_path):
  """--groups 3 --shared 0,1: a record per form, both with the per-ACM route's k."""
  records = route_bench.main(["--tokens", "40", "--dim", "64", "--chunks", "16", "--block-k", "64", "--stages", "1",
                              "--calls", "2", "--interpret", "--groups", "3", "--shared", "0,1",
                              "--out", str(tmp_path / "r.json")])
  assert [(r["groups"], r["shared"], r["k_agrees"]) for r in records] == [(3, False, True), (3, True, True)]


@pytest.mark.parametrize("groups,shared", [(1, False), (3, False), (3, True)])
def test_the_route_function_gives_the_reference_gates_k(groups, shared):
  """The benchmarked launches compute each gate's argmax, one gate or a group's three apart or shared: against
  `gate_logits_reference` on random inputs."""
  rng = np.random.default_rng(3)
  xs = jnp.asarray(rng.normal(size=(2, 70, 64)), jnp.bfloat16)
  wg = jnp.asarray(rng.normal(size=(groups, 64, 5)) * 0.2, jnp.bfloat16)
  bg = jnp.asarray(rng.normal(size=(groups, 5)) * 0.1, jnp.bfloat16)
  k = np.asarray(route_bench.route_fn(70, 64, 4, 2, 16, 32, 1, True, groups, shared)(xs, wg, bg))
  assert k.shape == (2, groups, 70)
  for i in range(2):
    for g in range(groups):
      # w1 only gives the cost shift's relative cost, which a zero shift (the benchmark's) leaves out
      logits = acm_fused.gate_logits_reference(xs[i], {"gate": (wg[g], bg[g]), "w1": jnp.zeros((64, 64))},
                                               num_learners=4)
      want = np.asarray(jnp.argmax(logits, axis=1))
      assert np.mean(k[i, g] == want) >= 0.97 and len(np.unique(k[i, g])) > 1


def test_a_setting_whose_k_differs_stops_the_run_naming_it(tmp_path, monkeypatch):
  real = route_bench.route_fn

  def skewed(tokens, dim, n, calls, chunk, block_k, stages, interpret, *group):
    fn = real(tokens, dim, n, calls, chunk, block_k, stages, interpret, *group)
    return fn if chunk != 16 else (lambda *a: fn(*a) + 1)

  monkeypatch.setattr(route_bench, "route_fn", skewed)
  with pytest.raises(SystemExit, match="chunk 16, block_k 64, 1 stages at 40 tokens: k differs .* on 80 tokens"):
    route_bench.main(FLAGS + ["--out", str(tmp_path / "r.json")])
  assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("flags, named", [(["--chunks", "24"], "--chunks must be powers of two"),
                                          (["--chunks", "256"], "--chunks must be at most ROUTE_CHUNK=128"),
                                          (["--block-k", "8"], "--block-k must be powers of two"),
                                          (["--stages", "0"], "--stages: '0': every value must be >= 1"),
                                          (["--calls", "0"], "--calls must be positive, got 0"),
                                          (["--groups", "5"], "--groups must be in 1..4"),
                                          (["--shared", "1"], "--shared 1 needs --groups > 1; got --groups 1"),
                                          (["--groups", "3", "--shared", "0,2"], "'0,2': expected 0, 1 or 0,1"),
                                          ([], "needs a GPU")])
def test_bad_flags_are_refused_naming_them(flags, named, capsys):
  with pytest.raises(SystemExit):
    route_bench.main(flags if not flags else flags + ["--interpret"])
  assert named in capsys.readouterr().err
