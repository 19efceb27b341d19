"""Baselines, any-budget calibration and the comparison sweep, on tiny shapes."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from acm_jax.vit import flops
from acm_jax.vit.baselines import acm_halting, calibration, common, early_exit, moefication, token_halting
from acm_jax import acm as acm_lib
from acm_jax import transformer
from acm_jax.acmize import flatten
from acm_jax.train import config as config_lib
from acm_jax.vit import task as vit_task
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


# --- an independent float64 NumPy ViT: what the baselines' forwards must equal in either block layout ---


def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _gelu(z):
  return 0.5 * z * (1 + erf(z / np.sqrt(2)))


def _layer_norm(p, x):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + CFG.layer_norm_eps) * p["scale"] + p["bias"]


def _dense(p, x):
  return x @ p["kernel"] + p["bias"]


def _embed(params, images):
  p, grid = CFG.patch_size, CFG.image_size // CFG.patch_size
  patches = np.asarray(images, np.float64).reshape(-1, grid, p, grid, p, 3).transpose(0, 1, 3, 2, 4, 5)
  x = patches.reshape(len(images), grid * grid, -1) @ params["embedding"]["kernel"].reshape(-1, CFG.dim)
  x = x + params["embedding"]["bias"]
  cls = np.broadcast_to(params["cls"], (len(images), 1, CFG.dim))
  return np.concatenate([cls, x], 1) + params["pos_embedding"]


def _mlp(p, x):
  return _dense(p["fc2"], _gelu(_dense(p["fc1"], x)))


def _block(b, x, alive=None, mlp=None):
  """Pre-LN block; `alive` (batch, tokens) keeps only those tokens as keys."""
  heads, head_dim = CFG.num_heads, CFG.dim // CFG.num_heads
  h = _layer_norm(b["ln1"], x)
  q, k, v = (_dense(b["attn"][n]["dense"], h).reshape(*h.shape[:2], heads, head_dim)
             for n in ("query", "key", "value"))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
  if alive is not None:
    logits = np.where(alive[:, None, None, :], logits, -1e30)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  context = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x.shape)
  x = x + _dense(b["attn"]["out"]["dense"], context)
  h = _layer_norm(b["ln2"], x)
  return x + (mlp(h) if mlp is not None else _mlp(b["mlp"], h))


def _classify(norm, head, token):
  return _dense(head, _layer_norm(norm, token))


def _moe_mlp(mlp, router, x, num_experts, top_k):
  scores = _dense(router["out"], np.maximum(_dense(router["hidden_0"], x), 0))
  chosen = np.argsort(-scores, -1)[..., :top_k]
  on = (np.arange(num_experts) == chosen[..., None]).any(-2)
  hidden = _gelu(_dense(mlp["fc1"], x))
  hidden = hidden * np.repeat(on, CFG.mlp_dim // num_experts, -1)
  return _dense(mlp["fc2"], hidden)


def _halting(dense, halting, scale, shift, eps, mlp=None):
  """Token halting as its docstring states it, token by token state in NumPy; `mlp(i, h)`, when
  given, replaces block i's MLP. Returns the logits, the tokens entering each block (batch, depth)
  and which they were (batch, depth, tokens)."""
  x = _embed(dense, IMAGES)
  batch, tokens, _ = x.shape
  total = np.zeros((batch, tokens))
  alive = np.ones((batch, tokens), bool)
  pooled = np.zeros_like(x)
  active, entering = [], []
  for i in range(CFG.depth):
    active.append(alive.sum(-1))
    entering.append(alive.copy())
    stepped = _block(dense[f"block_{i}"], x, alive if halting else None,
                     None if mlp is None else lambda h, i=i: mlp(i, h))
    x = np.where(alive[..., None], stepped, x)
    last = i == CFG.depth - 1
    score = np.ones((batch, tokens)) if last else 1 / (1 + np.exp(-(scale * x[..., 0] + shift)))
    score = score if halting or last else np.zeros_like(score)
    for b in range(batch):
      for t in range(tokens):
        if not alive[b, t]:
          continue
        if total[b, t] + score[b, t] >= 1 - eps:  # halts here: the remainder weights this state
          pooled[b, t] += (1 - total[b, t]) * x[b, t]
          alive[b, t] = False
        else:
          pooled[b, t] += score[b, t] * x[b, t]
        total[b, t] += score[b, t]
  return _classify(dense["norm"], dense["head"], pooled[:, 0]), np.stack(active, -1), np.stack(entering, 1)


@pytest.fixture(scope="module", params=["unrolled", "scanned"])
def layout(request, dense):
  """(config, params of that layout) of the random dense ViT."""
  if request.param == "unrolled":
    return CFG, dense
  return vit.get_config("tiny", **SMALL, scan_blocks=True), transformer.stack_blocks(dense)


def _assert_close(got, want, tol=1e-4):
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol * np.abs(want).max())


def test_dense_pieces_and_forward_equal_the_reference(dense, layout):
  cfg, params = layout
  ref = _np(dense)
  x = common.embed(cfg, params, IMAGES)
  _assert_close(x, _embed(ref, IMAGES))
  want = _embed(ref, IMAGES)
  for i in range(cfg.depth):
    want = _block(ref[f"block_{i}"], want)
    x = common.block(cfg, params, i, x)
    _assert_close(x, want)
  _assert_close(common.classify(cfg, params["norm"], params["head"], x[:, 0]),
                _classify(ref["norm"], ref["head"], want[:, 0]))
  _assert_close(common.dense_forward(cfg, params, IMAGES), _classify(ref["norm"], ref["head"], want[:, 0]))


def test_early_exit_logits_equal_the_reference(dense, layout):
  cfg, params = layout
  model = early_exit.init(cfg, params)
  # random exit heads, not the copies of the final one that training starts from
  leaves, tree = jax.tree.flatten(model["exits"])
  keys = jax.random.split(jax.random.key(6), len(leaves))
  model["exits"] = jax.tree.unflatten(tree, [0.5 * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])
  ref, exits = _np(dense), _np(model["exits"])
  x, want = _embed(ref, IMAGES), []
  for i in range(CFG.depth):
    x = _block(ref[f"block_{i}"], x)
    head = exits[f"exit_{i}"] if i < CFG.depth - 1 else ref
    want.append(_classify(head["norm"], head["head"], x[:, 0]))
  _assert_close(early_exit.all_logits(cfg, model, IMAGES), np.stack(want))
  threshold = float(np.median(jax.nn.softmax(np.stack(want[:-1])).max(-1)))  # some samples leave early
  logits, _, extras = early_exit.forward(cfg, threshold, model, IMAGES)
  exit_at = np.argmax(extras["exit_share"], -1)
  assert 0 < exit_at.min() or exit_at.max() < CFG.depth - 1
  _assert_close(logits, np.stack(want)[exit_at, np.arange(len(IMAGES))])


def test_moefication_forward_equals_the_reference(dense, layout):
  cfg, params = layout
  model = moefication.init(cfg, params, num_experts=8, router_hidden=16, seed=0)
  unrolled = moefication.init(CFG, dense, num_experts=8, router_hidden=16, seed=0)
  assert _max_abs(transformer.unstack_blocks(model["dense"]), unrolled["dense"]) == 0  # same expert split
  ref, routers = _np(unrolled["dense"]), _np(model["routers"])
  x = _embed(ref, IMAGES)
  for i in range(CFG.depth):
    x = _block(ref[f"block_{i}"], x,
               mlp=lambda h, i=i: _moe_mlp(ref[f"block_{i}"]["mlp"], routers[f"block_{i}"], h, 8, 3))
  _assert_close(moefication.forward(cfg, 8, 3, 16, model, IMAGES), _classify(ref["norm"], ref["head"], x[:, 0]))


def test_token_halting_forward_equals_the_reference(dense, layout):
  cfg, params = layout
  scale, shift = 1.0, -0.5  # scores that halt tokens at different blocks
  model = token_halting.init(params, scale=scale, shift=shift)
  for enabled in (True, False):
    logits, aux = token_halting.forward(cfg, token_halting.Halting(enabled=enabled), model, IMAGES)
    want, active, _ = _halting(_np(dense), enabled, scale, shift, 0.01)
    _assert_close(logits, want)
    np.testing.assert_array_equal(aux["active"], active)
    if enabled:
      assert len(np.unique(active)) > 2, active  # tokens did halt at different blocks


def _acm_mlp(p, h, num_learners):
  """An ACM in NumPy from the spec: linear gate, argmax k, learners 1..k summed, output bias b2_0..b2_k."""
  k = np.argmax(_dense(p["gate"]["out"], h), -1)
  width = p["w1"].shape[1] // num_learners
  hidden = _gelu(h @ p["w1"] + p["b1"]) * (np.arange(p["w1"].shape[1]) // width < k[..., None])
  return hidden @ p["w2"] + np.cumsum(p["b2"], 0)[k], k


@pytest.fixture(scope="module", params=["every block", "blocks 0 and 2", "scanned"])
def acm_model(request):
  """(config, params of its layout, the same params unrolled) of a random MLP-ACM ViT."""
  blocks = (0, 2) if request.param == "blocks 0 and 2" else None
  acm = acm_lib.ACMConfig(num_learners=4, blocks=blocks, impl="xla")
  cfg = vit.get_config("tiny", **SMALL, acm=acm)
  params = vit.ViT(cfg).init(jax.random.key(7), IMAGES[:1])["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(8), len(leaves))
  params = jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])
  if request.param == "scanned":
    return vit.get_config("tiny", **SMALL, acm=acm, scan_blocks=True), transformer.stack_blocks(params), params
  return cfg, params, params


def test_acm_halting_forward_and_flops_equal_the_reference(acm_model):
  """Logits, tokens per block and FLOPs against the NumPy halting loop over NumPy ACMs; without
  halting the FLOPs must equal the ACM ViT's own count at each image's mean k."""
  cfg, params, unrolled = acm_model
  ref, n = _np(unrolled), cfg.acm.num_learners
  acm_blocks = cfg.acm.block_indices(cfg.depth)
  scale, shift = 1.0, -0.5
  model = {"acm": params, "halting": {"scale": jnp.float32(scale), "shift": jnp.float32(shift)}}
  width = cfg.acm.mlp_learner_width(cfg.mlp_dim)
  for enabled in (True, False):
    ks = {}

    def mlp(i, h):
      if i not in acm_blocks:
        ks[i] = np.full(h.shape[:2], n)
        return _mlp(ref[f"block_{i}"]["mlp"], h)
      out, ks[i] = _acm_mlp(ref[f"block_{i}"]["mlp"], h, n)
      return out

    want, active, entering = _halting(ref, enabled, scale, shift, 0.01, mlp)
    logits, cost, extras = acm_halting.eval_forward(cfg, token_halting.Halting(enabled=enabled), model, IMAGES)
    _assert_close(logits, want)
    k = np.stack([ks[i] for i in range(cfg.depth)], 1)  # (batch, depth, tokens)
    k_sum = (k * entering).sum(-1)
    np.testing.assert_allclose(extras["mean_k"], k_sum.sum(-1) / active.sum(-1), rtol=1e-6)
    np.testing.assert_allclose(extras["blocks_per_token"], active.sum(-1) / cfg.num_tokens, rtol=1e-6)
    assert len(np.unique(k[:, acm_blocks])) >= 3  # the random gates pick several widths
    if not enabled:
      for b in range(len(IMAGES)):
        mean_k = {f"block_{i}/mlp": k[b, i].mean() for i in acm_blocks}
        np.testing.assert_allclose(cost[b], flops.vit_flops(cfg, mean_k)["total"], rtol=1e-6)
      continue
    assert len(np.unique(active)) > 2, active  # tokens did halt at different blocks
    # by hand: a running token pays its attention share, its gate, its k learners and its halting score
    d, t = cfg.dim, active
    hand = 2 * 16 * 4 * 4 * 3 * d + 16 * d + cfg.num_tokens * d + 7 * d + 2 * d * cfg.num_classes + cfg.num_classes
    attention = 4 * (2 * t * d * d + t * d) + 4 * t * t * d + 4 * cfg.num_heads * t * t + 2 * 7 * t * d + 2 * t * d
    dense_mlp = 4 * t * d * cfg.mlp_dim + t * (cfg.mlp_dim + d) + 64 * t * cfg.mlp_dim
    acm_mlp = k_sum * (4 * d * width + width + 64 * width) + t * (2 * d * (n + 1) + d)
    is_acm = np.isin(np.arange(cfg.depth), acm_blocks)
    hand = hand + (attention + np.where(is_acm, acm_mlp, dense_mlp) + t * (4 + 2 * d)).sum(-1)
    np.testing.assert_allclose(cost, hand, rtol=1e-6)


def test_acm_halting_step_trains_all_but_the_gates(tmp_path):
  """Two steps through the optimizer the sweep uses: the gates stay, everything else moves, and the
  loss is the sum of its parts at the recipe's weights."""
  cfg = dataclasses.replace(config_lib.ExperimentConfig(), model="tiny", image_size=16, batch_size=4,
                            workdir=str(tmp_path), gate_hidden=8, warmup_fraction=0.0)
  exp = vit_task.build(cfg)
  acm = exp.task.acm_model.config
  params = acm_halting.init(vit.ViT(acm).init(jax.random.key(2), IMAGES[:1])["params"])
  params["halting"] = {"scale": jnp.float32(1.0), "shift": jnp.float32(-0.5)}
  tx = common.optimizer(exp, params, 1e-2, 10, lambda path: not acm_halting.is_gate(path))
  state = {"step": jnp.int32(5), "params": params, "opt_state": tx.init(params), "rng": jax.random.key(0)}
  rng = np.random.default_rng(3)
  batch = {"image": rng.normal(size=(4, 16, 16, 3)).astype(np.float32), "label": rng.integers(0, 10, 4)}
  halting = token_halting.Halting(ponder_weight=0.01, prior_weight=0.2, target_depth=2.0)
  step = jax.jit(lambda s, b: acm_halting.halting_step(exp.task, halting, 0.0, tx, s, b))
  new, m = step(*step(state, batch)[:1], batch)  # the schedule's first step has learning rate 0
  m = {k: np.float64(v) for k, v in m.items()}
  np.testing.assert_allclose(m["loss"], m["task_loss"] + 0.01 * m["ponder"] + 0.2 * m["prior_loss"], rtol=1e-5)
  before, after = flatten(params), flatten(new["params"])
  gates = [name for name in before if acm_halting.is_gate(name)]
  assert len(gates) == 2 * acm.depth  # a linear gate per block: kernel and bias
  for name in before:
    moved = not np.array_equal(before[name], after[name])
    assert moved != (name in gates), name


def _max_abs(a, b):
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)


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
  assert methods == {"dense", "acm", "acm_any_budget", "static", "moefication", "early_exit", "token_halting",
                     "acm_halting"}
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
    (["--methods=acm_halting", "--acm_attention=true"], "acm_halting composes token halting with MLP ACMs only"),
    (["--halting_acm_budget=0"], "--halting_acm_budget must be in (0, 1]"),
])
def test_bad_input_stops_before_work(tmp_path, capsys, flags, message):
  assert compare.main([f"--workdir={tmp_path}", *TINY, *flags]) == 2
  assert message in capsys.readouterr().err
  assert not any(p.name == "checkpoints" for p in tmp_path.rglob("*"))
