"""Baselines, any-budget calibration and the comparison sweep, on tiny shapes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from acm_jax.vit import flops
from acm_jax.vit.baselines import calibration, common, early_exit, moefication, token_halting
from acm_jax import transformer
from acm_jax.vit import model as vit
from experiments import compare

SMALL = dict(image_size=16, patch_size=4, dim=32, depth=3, num_heads=4, mlp_dim=64, num_classes=5)
CFG = vit.get_config("tiny", **SMALL)
IMAGES = jax.random.normal(jax.random.key(3), (4, 16, 16, 3))


@pytest.fixture(scope="module")
def dense():
  params = vit.ViT(CFG).init(jax.random.key(0), IMAGES[:1])["params"]
  leaves, tree = jax.tree.flatten(params)  # random biases and norms too, not the zero init
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])


def close(a, b, tol=1e-5):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < tol


def test_functional_dense_forward_is_the_vit(dense):
  assert close(common.dense_forward(CFG, dense, IMAGES), vit.ViT(CFG).apply({"params": dense}, IMAGES))


def test_balanced_kmeans_gives_equal_clusters():
  vectors = np.random.default_rng(0).normal(size=(64, 8))
  assign = moefication.balanced_kmeans(vectors, 8)
  assert np.bincount(assign, minlength=8).tolist() == [8] * 8


def test_moefication_with_all_experts_is_the_dense_mlp(dense):
  params = moefication.init(CFG, dense, num_experts=8, router_hidden=16, seed=0)
  x = jax.random.normal(jax.random.key(4), (4, 17, CFG.dim))
  mlp = dense["block_1"]["mlp"]
  expected = transformer.Mlp(CFG.mlp_dim, CFG.activation).apply({"params": mlp}, x)
  got = moefication.moe_mlp(CFG, params["dense"]["block_1"]["mlp"], params["routers"]["block_1"], x, 8, 8, 16)
  assert close(got, expected)
  assert close(moefication.forward(CFG, 8, 8, 16, params, IMAGES), common.dense_forward(CFG, dense, IMAGES))
  fewer = moefication.moe_mlp(CFG, params["dense"]["block_1"]["mlp"], params["routers"]["block_1"], x, 8, 2, 16)
  assert not close(fewer, expected, 1e-2)


def test_early_exit_above_one_is_dense_in_logits_and_cost(dense):
  params = early_exit.init(CFG, dense)
  logits, cost, extras = early_exit.forward(CFG, 1.01, params, IMAGES)
  assert close(logits, vit.ViT(CFG).apply({"params": dense}, IMAGES))
  np.testing.assert_allclose(cost, flops.vit_flops(CFG)["total"], rtol=1e-6)
  assert extras["exit_share"][:, -1].tolist() == [1.0] * 4
  # threshold 0 leaves at the first head, which starts as a copy of the final one
  logits, cost, extras = early_exit.forward(CFG, 0.0, params, IMAGES)
  assert extras["exit_share"][:, 0].tolist() == [1.0] * 4
  assert float(cost[0]) < flops.vit_flops(CFG)["total"] / 2


def test_token_halting_disabled_is_dense(dense):
  params = token_halting.init(dense)
  off = token_halting.Halting(enabled=False)
  logits, cost, extras = token_halting.eval_forward(CFG, off, params, IMAGES)
  assert close(logits, vit.ViT(CFG).apply({"params": dense}, IMAGES))
  np.testing.assert_allclose(cost, flops.vit_flops(CFG)["total"], rtol=1e-6)
  # a shift that halts every token after the first block: one block each, cheaper
  eager = token_halting.init(dense, scale=0.0, shift=10.0)
  _, cost, extras = token_halting.eval_forward(CFG, token_halting.Halting(), eager, IMAGES)
  np.testing.assert_allclose(extras["blocks_per_token"], 1.0)
  assert float(cost[0]) < flops.vit_flops(CFG)["total"] / 2


def test_flops_match_hand_counts():
  t, d, m, c, L = CFG.num_tokens, CFG.dim, CFG.mlp_dim, CFG.num_classes, CFG.depth
  embed = 2 * 16 * 4 * 4 * 3 * d + 16 * d + t * d
  head = 7 * d + 2 * d * c + c
  proj, attn = 4 * (2 * t * d * d + t * d), 4 * t * t * d + 4 * 4 * t * t
  other = 2 * 7 * t * d + 2 * t * d
  mlp = 4 * t * d * m + t * (m + d) + 64 * t * m
  block = proj + attn + other + mlp
  assert flops.vit_flops(CFG)["total"] == pytest.approx(embed + L * block + head)
  # MoEfication: 2 of 8 experts of width 8, a router 32 -> 16 -> 8 and a top-k over 8 scores
  experts = t * (2 * (4 * d * 8 + 8 + 64 * 8) + d)
  router = t * (2 * d * 16 + 2 * 16 * 8 + 8)
  got = flops.moefication_flops(CFG, 8, 2, 16)
  assert got["total"] == pytest.approx(embed + head + L * (proj + attn + other + experts + router))
  assert got["router"] == pytest.approx(L * router)
  # early exit after block 1 having run 2 exit heads (norm, classifier, softmax each)
  assert float(flops.early_exit_flops(CFG, 1, 2)) == pytest.approx(embed + 2 * block + 2 * (head + 4 * c))
  assert float(flops.early_exit_flops(CFG, L - 1, L - 1)) == pytest.approx(embed + L * block + head + (L - 1) * (head + 4 * c))
  # token halting: 17, 9 and 3 tokens enter the three blocks
  def block_at(n):
    return (4 * (2 * n * d * d + n * d) + 4 * n * n * d + 16 * n * n + 2 * 7 * n * d + 2 * n * d
            + 4 * n * d * m + n * (m + d) + 64 * n * m + n * (4 + 2 * d))
  got = flops.token_halting_flops(CFG, np.array([17.0, 9.0, 3.0]))
  assert float(got) == pytest.approx(embed + head + block_at(17) + block_at(9) + block_at(3))


def test_bisection_hits_targets_on_random_gates_and_is_monotone():
  logits = np.random.default_rng(0).normal(size=(4096, 5))
  cost = np.arange(5) * 0.25

  def fraction(shift):
    return float(np.mean(np.argmax(logits - shift * cost, -1)) / 4)

  values = [fraction(s) for s in np.linspace(-20, 20, 81)]
  assert all(a >= b for a, b in zip(values, values[1:]))
  assert values[0] == 1.0 and values[-1] == 0.0
  for target in (0.1, 0.25, 0.375, 0.5, 0.625, 0.75, 0.95):
    shift, reached = calibration.bisect(fraction, target, 0.01)
    assert abs(reached - target) <= 0.01 and fraction(shift) == reached
  with pytest.raises(ValueError, match="budget must be in"):
    calibration.bisect(fraction, 0.0)


TINY = ["--model=tiny", "--image_size=16", "--batch_size=8", "--eval_batch_size=32", "--eval_examples=32",
        "--pretrain_steps=3", "--distill_steps=2", "--gates_steps=2", "--finetune_steps=2", "--log_every=1",
        "--checkpoint_every=100", "--gate_hidden=8", "--router_hidden=8", "--num_experts=8",
        "--budgets=0.5", "--any_budgets=0.25,0.75", "--thresholds=0.5", "--moe_top_k=2,8", "--static_ks=2",
        "--calibration_examples=64"]


def test_short_sweep_end_to_end_and_resumed(tmp_path, capsys):
  assert compare.main([f"--workdir={tmp_path}", *TINY]) == 0
  out = capsys.readouterr().out
  records = json.loads((tmp_path / "curves.json").read_text())
  methods = {r["method"] for r in records}
  assert methods == {"dense", "acm", "acm_any_budget", "static", "moefication", "early_exit", "token_halting"}
  for r in records:
    assert {"method", "setting", "gflops_per_image", "top1", "budget_or_threshold"} <= set(r)
    assert r["setting"] in out
  gflops = [r["gflops_per_image"] for r in records]
  dense = next(r for r in records if r["method"] == "dense")
  assert min(gflops) < dense["gflops_per_image"]
  lines = [l for l in out.splitlines() if "%" in l]
  printed = [float(l.split()[-2]) for l in lines]
  assert printed == sorted(printed)
  # the calibration is saved with the any-budget model, one entry per budget
  saved = json.loads((tmp_path / "finetune_b0.50" / "calibration.json").read_text())
  assert sorted(saved["per_acm"]) == ["0.2500", "0.7500"]
  for found in saved["per_acm"].values():
    assert set(found["offsets"]) == set(found["targets"]) and found["calibration_examples"] == 64
  # a second run reuses every finished run and evaluation, and serves the saved calibration only
  assert compare.main([f"--workdir={tmp_path}", *TINY, "--calibrate=false"]) == 0
  assert json.loads((tmp_path / "curves.json").read_text()) == records


def test_baseline_flags_are_saved_and_must_match_on_resume(tmp_path, capsys):
  flags = [f"--workdir={tmp_path}", *TINY, "--methods=early_exit,token_halting", "--exit_lr=0.0021",
           "--ponder_weight=0.007", "--finetune_lr=0.0004"]
  assert compare.main(flags) == 0
  early = json.loads((tmp_path / "early_exit" / "config.json").read_text())
  assert (early["exit_lr"], early["baseline_steps"], early["label_smoothing"]) == (0.0021, 2, 0.0)
  (halting_dir,) = tmp_path.glob("token_halting_d*")
  halting = json.loads((halting_dir / "config.json").read_text())
  assert (halting["ponder_weight"], halting["halting_lr"], halting["baseline_steps"]) == (0.007, 0.0004, 2)
  assert "router_lr" not in halting and "exit_lr" not in halting
  records = json.loads((tmp_path / "curves.json").read_text())
  for changed, message in (("--exit_lr=0.003", "exit_lr 0.0021 saved, 0.003 requested"),
                           ("--baseline_steps=3", "baseline_steps 2 saved, 3 requested"),
                           ("--label_smoothing=0.1", "label_smoothing 0.0 saved, 0.1 requested")):
    assert compare.main([*flags, changed]) == 2
    assert message in capsys.readouterr().err
  assert compare.main([*flags, "--methods=token_halting", "--ponder_weight=0.008"]) == 2
  assert f"{halting_dir} holds a run of another configuration: ponder_weight 0.007 saved" in capsys.readouterr().err
  # the same flags, spelled as the resolved values, reuse the finished runs
  assert compare.main([*flags, "--baseline_steps=2", "--halting_lr=0.0004"]) == 0
  assert json.loads((tmp_path / "curves.json").read_text()) == records


@pytest.mark.parametrize("flags, message", [
    (["--methods=acm,pruning"], "unknown ['pruning']"),
    (["--budgets=0"], "--budgets must be"),
    (["--budgets=0.5,1.5"], "--budgets must be"),
    (["--eval_budget=1.2"], "--eval_budget must be"),
    (["--thresholds=0.5,1.5"], "--thresholds must be"),
    (["--thresholds=-0.1"], "--thresholds must be"),
    (["--pretrain=false"], "convert a dense ViT, but there is none"),
    (["--init=/does/not/exist.npz"], "does not exist"),
    (["--calibration_examples=0"], "calibration batch has no tokens"),
    (["--calibrate=false"], "no saved per_acm calibration"),
    (["--calibration=median"], "--calibration='median': expected one of"),
    (["--eval_budget=0"], "--eval_budget must be"),
    (["--num_experts=7"], "must divide the MLP width"),
])
def test_bad_input_stops_before_work(tmp_path, capsys, flags, message):
  assert compare.main([f"--workdir={tmp_path}", *TINY, *flags]) == 2
  assert message in capsys.readouterr().err
  assert not any(p.name == "checkpoints" for p in tmp_path.rglob("*"))
