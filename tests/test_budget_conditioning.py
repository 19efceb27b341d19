"""Budget-conditioned gates: the gate against plain-numpy references, the finetuning step's
drawn budget, the conditioned model in the comparison sweep, and bad input."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from acm_jax import acm
from acm_jax.acmize import flatten, unflatten
from acm_jax.train import config as config_lib
from acm_jax.train import phases, steps
from acm_jax.vit import model as vit
from acm_jax.vit import task as vit_task
from acm_jax.vit.baselines import calibration
from experiments import compare, vit_imagenet

N, H, D = 4, 8, 16


def numpy_features(b):
  j = np.arange(1, 4) * np.pi * b
  return np.concatenate([[b], np.sin(j), np.cos(j)])


def numpy_gate(params, x, budget):
  """The conditioned gate in float64: FiLM on the input, then the linear or ReLU-MLP gate."""
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  x = np.asarray(x, np.float64)
  film = numpy_features(budget) @ p["budget_film"]["kernel"] + p["budget_film"]["bias"]
  x = x * (1 + film[:D]) + film[D:]
  for i in range(sum(k.startswith("hidden_") for k in p)):
    x = np.maximum(x @ p[f"hidden_{i}"]["kernel"] + p[f"hidden_{i}"]["bias"], 0)
  return x @ p["out"]["kernel"] + p["out"]["bias"]


def random_gate(seed, depth):
  """A conditioned gate's params with every entry random (the FiLM layer's too: it starts at zero)."""
  gate = acm.Gate(N + 1, depth, 6, budget_conditioning=True)
  params = gate.init(jax.random.key(seed), jnp.ones((1, D)))["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return gate, jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, v.shape) for k, v in zip(keys, leaves)])


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("budget", [0.125, 0.37, 0.9])
def test_conditioned_gate_is_film_then_the_gate(depth, budget):
  gate, params = random_gate(depth, depth)
  assert set(params) >= {acm.BUDGET_FILM, "out"} and params[acm.BUDGET_FILM]["kernel"].shape == (7, 2 * D)
  x = jax.random.normal(jax.random.key(3), (2, 5, D))
  got = gate.apply({"params": params}, x, budget)
  np.testing.assert_allclose(got, numpy_gate(params, x, budget), rtol=1e-5, atol=1e-5)
  # budget None: the gate without its conditioning, as phase 2 trained it
  plain = {k: v for k, v in params.items() if k != acm.BUDGET_FILM}
  np.testing.assert_allclose(gate.apply({"params": plain}, x), acm.Gate(N + 1, depth, 6).apply({"params": plain}, x),
                             rtol=1e-6)
  if depth == 1:  # one budget folds into a plain linear gate (what the fused kernels take)
    kernel, bias = acm.linear_gate_at_budget(params, budget)
    np.testing.assert_allclose(np.asarray(x) @ np.asarray(kernel) + np.asarray(bias), got, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(acm.linear_gate_at_budget(params, None)[0], params["out"]["kernel"])


def test_fresh_conditioning_leaves_the_gate_unchanged_and_the_budget_moves_it():
  gate = acm.Gate(N + 1, 1, budget_conditioning=True)
  x = jax.random.normal(jax.random.key(4), (3, D))
  params = gate.init(jax.random.key(5), x)["params"]
  for budget in (0.2, 0.8):
    np.testing.assert_array_equal(gate.apply({"params": params}, x, budget), gate.apply({"params": params}, x))
  _, trained = random_gate(6, 1)
  assert not np.allclose(gate.apply({"params": trained}, x, 0.2), gate.apply({"params": trained}, x, 0.8))


def test_conditioned_acm_argmax_and_with_budget_match_the_reference():
  module = acm.ACM(D, N, H, impl="xla", budget_conditioning=True)
  x = jax.random.normal(jax.random.key(7), (2, 5, D))
  params = module.init(jax.random.key(8), x)["params"]
  _, gate = random_gate(9, 1)
  params = {**params, "gate": gate, "b2": jax.random.normal(jax.random.key(10), (N + 1, D))}
  learners = {k: v for k, v in params.items() if k != "gate"}
  for budget in (0.2, 0.7):
    k = np.argmax(numpy_gate(gate, x, budget), -1)
    want = acm.acm_apply(learners, x, jnp.asarray(k), num_learners=N)
    out, state = module.apply({"params": params}, x, budget=budget, mutable=["acm"])
    np.testing.assert_array_equal(np.argmax(state["acm"]["choice"][0], -1), k)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    with acm.with_budget(budget):
      np.testing.assert_array_equal(module.apply({"params": params}, x), out)
  with pytest.raises(ValueError, match="not budget-conditioned"):
    plain = acm.ACM(D, N, H, impl="xla")
    plain.apply({"params": learners | {"gate": {"out": gate["out"]}}}, x, budget=0.5)


@pytest.mark.parametrize("depth", [1, 2])
def test_gate_reads_one_budget_per_example(depth):
  """A (batch,) budget array: each example's logits are the float64 reference at its own budget."""
  gate, params = random_gate(20 + depth, depth)
  x = jax.random.normal(jax.random.key(21), (3, 5, D))
  budgets = np.array([0.1, 0.45, 0.8], np.float32)
  got = gate.apply({"params": params}, x, jnp.asarray(budgets))
  for i, b in enumerate(budgets):
    np.testing.assert_allclose(got[i], numpy_gate(params, x[i], float(b)), rtol=1e-5, atol=1e-5)
  for bad in (np.full((2,), 0.5, np.float32), np.full((3, 1), 0.5, np.float32)):
    with pytest.raises(ValueError, match=r"one per example, shape \(3,\).*got shape"):
      gate.apply({"params": params}, x, jnp.asarray(bad))


@pytest.mark.parametrize("draw", steps.BUDGET_DRAWS)
def test_grouped_budget_draws_are_stratified(draw):
  """G groups: draw g lies in slice g of the range (of its log) and is uniform there (KS distance
  over 4000 keys against the slice's CDF); G = 1 draws exactly what one budget per step drew."""
  low, high, groups = 0.0625, 0.875, 4
  log = draw == "log_uniform"
  t = (lambda b: np.log(b)) if log else (lambda b: b)
  edges = np.linspace(t(low), t(high), groups + 1)
  weights = steps.FinetuneWeights(budget_range=(low, high), budget_draw=draw, budget_groups=groups)
  keys = jax.random.split(jax.random.key(22), 4000)
  drawn = np.asarray(jax.jit(jax.vmap(functools.partial(steps.draw_budget, weights)))(keys), np.float64)
  assert drawn.shape == (4000, groups)
  for g in range(groups):
    u = np.sort((t(drawn[:, g]) - edges[g]) / (edges[g + 1] - edges[g]))
    assert -1e-5 <= u[0] and u[-1] <= 1 + 1e-5
    ranks = np.arange(1, len(u) + 1) / len(u)
    assert max(np.max(ranks - u), np.max(u - ranks + 1 / len(u))) < 0.035
  one = steps.FinetuneWeights(budget_range=(low, high), budget_draw=draw)
  lo, hi = (np.log(low), np.log(high)) if log else (low, high)
  for key in keys[:5]:
    raw = jax.random.uniform(key, (), jnp.float32, lo, hi)
    want = jnp.clip(jnp.exp(raw), low, high) if log else raw
    assert float(steps.draw_budget(one, key)) == float(want)


def test_finetune_step_with_budget_groups(tmp_path):
  """Two budget groups of two images: each image's gates read its group's budget (the model's
  logits equal those of each half at its scalar budget), and the step's losses are the per-group
  budget and diversity losses, recomputed here in float64 from the sown choices."""
  conditioned = vit_experiment(tmp_path, budget_conditioning=True, budget_groups=2)
  assert conditioned.run_dir("finetune").name == "finetune_any_b0.125-0.875_g2"
  plain = vit_experiment(tmp_path)
  params = phases.with_budget_film(conditioned, phases.without_budget_film(phases.init_params(plain, "acm", 0)))
  flat = flatten(params)
  keys = jax.random.split(jax.random.key(23), len(flat))
  params = unflatten({k: (0.3 * jax.random.normal(key, v.shape) if acm.BUDGET_FILM in k else v)
                      for (k, v), key in zip(flat.items(), keys)})
  rng = np.random.default_rng(24)
  batch = {"image": rng.normal(size=(4, 16, 16, 3)).astype(np.float32), "label": rng.integers(0, 10, 4)}
  model = conditioned.task.acm_model
  with acm.with_budget(jnp.asarray([0.2, 0.2, 0.7, 0.7])):
    both = model.apply({"params": params}, batch["image"])
  for half, budget in ((slice(0, 2), 0.2), (slice(2, 4), 0.7)):
    with acm.with_budget(budget):
      np.testing.assert_allclose(both[half], model.apply({"params": params}, batch["image"][half]),
                                 rtol=1e-5, atol=1e-5)
  weights = steps.FinetuneWeights(budget_weight=2.0, entropy_weight=0.1, diversity_weight=0.05,
                                  budget_range=(0.125, 0.875), budget_weight_power=1.5, budget_groups=2)
  tx = optax.sgd(0.0)
  state = {"step": jnp.int32(3), "params": params, "opt_state": tx.init(params), "rng": jax.random.key(25)}
  _, m = jax.jit(functools.partial(steps.finetune_step, conditioned.task, tx, weights))(state, batch)
  target = np.asarray(steps.draw_budget(weights, jax.random.fold_in(steps.step_rng(state), 1)), np.float64)
  assert target.shape == (2,) and 0.125 <= target[0] <= 0.5 <= target[1] <= 0.875
  with acm.with_budget(jnp.repeat(jnp.asarray(target, jnp.float32), 2)):
    outputs, aux = model.apply({"params": params}, conditioned.task.inputs(batch), mode="gumbel",
                               mutable=["acm"], rngs={"gumbel": steps.step_rng(state)})
  choices = [np.asarray(c, np.float64) for c in steps.acm_choices(conditioned.task, aux)]
  costs = np.array([s.learner_cost for s in conditioned.task.acm_specs], np.float64)
  mean_k = np.stack([c @ np.arange(c.shape[-1]) for c in choices])  # (acms, batch, tokens)
  num = np.array([c.shape[-1] - 1 for c in choices], np.float64)
  per_image = np.einsum("a,abt->b", costs, mean_k / num[:, None, None]) / mean_k.shape[-1] / costs.sum()
  compute = per_image.reshape(2, 2).mean(1)
  budget_losses = np.abs(compute - target)
  c_sample = mean_k.mean(-1) / np.array([c.shape[-1] for c in choices])[:, None]  # (acms, batch)
  c_sample = c_sample.mean(0).reshape(2, 2)
  diversity = np.mean([-2 * np.mean(np.abs(c[:, None] - c[None, :])) for c in c_sample])
  np.testing.assert_allclose(m["budget_loss"], budget_losses.mean(), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(m["diversity_loss"], diversity, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(m["budget"], target.mean(), rtol=1e-6)
  want = (m["task_loss"] + np.mean(2.0 * target ** -1.5 * budget_losses) + 0.1 * np.float64(m["entropy_loss"])
          + 0.05 * diversity)
  np.testing.assert_allclose(m["loss"], want, rtol=1e-5)
  with pytest.raises(ValueError, match="--budget_groups must be >= 1 and divide --batch_size 4, got 3"):
    vit_experiment(tmp_path, budget_conditioning=True, budget_groups=3)


def vit_experiment(tmp_path, **overrides):
  cfg = dataclasses.replace(config_lib.ExperimentConfig(), model="tiny", image_size=16, batch_size=4,
                            workdir=str(tmp_path), gate_hidden=8, **overrides)
  return vit_task.build(cfg)


def finetune_once(exp, params, weights, batch, step=0, lr=0.0):
  tx = optax.sgd(lr)
  state = {"step": jnp.int32(step), "params": params, "opt_state": tx.init(params), "rng": jax.random.key(11)}
  return jax.jit(functools.partial(steps.finetune_step, exp.task, tx, weights))(state, batch)


def test_finetune_step_draws_its_budget_and_targets_it(tmp_path):
  plain = vit_experiment(tmp_path)
  conditioned = vit_experiment(tmp_path, budget_conditioning=True)
  gates = phases.without_budget_film(phases.init_params(plain, "acm", 0))
  params = phases.with_budget_film(conditioned, gates)
  film = [k for k in flatten(params) if acm.BUDGET_FILM in k]
  assert len(film) == 8 and all(not np.any(flatten(params)[k]) for k in film)  # 4 ACMs x kernel, bias; zero
  rng = np.random.default_rng(12)
  batch = {"image": rng.normal(size=(4, 16, 16, 3)).astype(np.float32), "label": rng.integers(0, 10, 4)}
  drawn = []
  for step in range(3):
    weights = steps.FinetuneWeights(budget_range=(0.2, 0.6))
    _, m = finetune_once(conditioned, params, weights, batch, step)
    assert 0.2 <= m["budget"] <= 0.6
    np.testing.assert_allclose(m["budget_loss"], abs(float(m["compute"]) - float(m["budget"])), rtol=1e-5, atol=1e-7)
    drawn.append(float(m["budget"]))
    # the same step with the drawn budget as a fixed target: the zero FiLM leaves every choice alike
    _, fixed = finetune_once(plain, gates, steps.FinetuneWeights(budget=drawn[-1]), batch, step)
    for name in ("loss", "budget_loss", "compute", "task_loss"):
      np.testing.assert_allclose(m[name], fixed[name], rtol=1e-5, atol=1e-6)
  assert len(set(drawn)) == 3


@pytest.mark.parametrize("draw", steps.BUDGET_DRAWS)
def test_budget_draws_follow_their_distributions(draw):
  """20000 drawn budgets against the closed-form CDF of each draw (Kolmogorov-Smirnov distance; its
  0.1% critical value at this sample size is about 0.014), and against the other draw's, which they
  must fail: the test tells the two apart."""
  low, high = 0.0625, 0.875
  weights = steps.FinetuneWeights(budget_range=(low, high), budget_draw=draw)
  keys = jax.random.split(jax.random.key(5), 20000)
  drawn = np.sort(np.asarray(jax.jit(jax.vmap(functools.partial(steps.draw_budget, weights)))(keys), np.float64))
  assert low <= drawn[0] and drawn[-1] <= high
  cdfs = {"uniform": lambda b: (b - low) / (high - low), "log_uniform": lambda b: np.log(b / low) / np.log(high / low)}
  empirical_hi = np.arange(1, len(drawn) + 1) / len(drawn)
  distance = {name: max(np.max(empirical_hi - cdf(drawn)), np.max(cdf(drawn) - empirical_hi + 1 / len(drawn)))
              for name, cdf in cdfs.items()}
  assert distance[draw] < 0.02
  assert min(d for name, d in distance.items() if name != draw) > 0.1
  # a fixed budget is not drawn
  assert float(steps.draw_budget(steps.FinetuneWeights(budget=0.3, budget_draw=draw), keys[0])) == np.float32(0.3)


def test_log_uniform_draw_is_its_own_run(tmp_path):
  """A log-uniform conditioned finetuning gets its own run directory: a uniform one is not reused for it."""
  uniform = vit_experiment(tmp_path, budget_conditioning=True, budget_min=0.0625)
  log = vit_experiment(tmp_path, budget_conditioning=True, budget_min=0.0625, budget_draw="log_uniform")
  assert uniform.run_dir("finetune").name == "finetune_any_b0.062-0.875"
  assert log.run_dir("finetune").name == "finetune_any_b0.062-0.875_log"
  assert vit_experiment(tmp_path, budget_draw="log_uniform").run_dir("finetune").name == "finetune_b0.50"


def test_budget_weight_rises_as_the_budget_falls(tmp_path):
  """--budget_weight_power: the step's total loss against one summed in float64 from its parts at the
  drawn budget; at a fixed budget b, weight w and power p train exactly as weight w / b ** p with none."""
  plain = vit_experiment(tmp_path)
  conditioned = vit_experiment(tmp_path, budget_conditioning=True)
  gates = phases.without_budget_film(phases.init_params(plain, "acm", 0))
  params = phases.with_budget_film(conditioned, gates)
  rng = np.random.default_rng(16)
  batch = {"image": rng.normal(size=(4, 16, 16, 3)).astype(np.float32), "label": rng.integers(0, 10, 4)}
  for power in (0.0, 1.5):
    weights = steps.FinetuneWeights(budget_weight=2.0, entropy_weight=0.1, diversity_weight=0.05,
                                    budget_range=(0.125, 0.6), budget_weight_power=power)
    for step in range(2):
      _, m = finetune_once(conditioned, params, weights, batch, step)
      m = {k: np.float64(v) for k, v in m.items()}
      want = (m["task_loss"] + 2.0 * m["budget"] ** -power * m["budget_loss"] + 0.1 * m["entropy_loss"]
              + 0.05 * m["diversity_loss"])
      np.testing.assert_allclose(m["loss"], want, rtol=1e-5)
  rising, _ = finetune_once(plain, gates, steps.FinetuneWeights(budget=0.25, budget_weight_power=1.0), batch,
                            lr=0.5)
  constant, _ = finetune_once(plain, gates, steps.FinetuneWeights(budget=0.25, budget_weight=4.0), batch, lr=0.5)
  flat, ref = flatten(rising["params"]), flatten(constant["params"])
  for name in flat:
    np.testing.assert_allclose(flat[name], ref[name], rtol=1e-5, atol=1e-6)
  moved = flatten(finetune_once(plain, gates, steps.FinetuneWeights(budget=0.25), batch, lr=0.5)[0]["params"])
  assert any(not np.allclose(moved[n], ref[n], atol=1e-6) for n in ref if "/gate/" in n)


TINY = ["--model=tiny", "--image_size=16", "--batch_size=8", "--eval_batch_size=32", "--eval_examples=32",
        "--pretrain_steps=3", "--distill_steps=2", "--gates_steps=2", "--finetune_steps=2", "--log_every=1",
        "--checkpoint_every=100", "--gate_hidden=8", "--budgets=0.5", "--any_budgets=0.25,0.75",
        "--calibration_examples=64", "--methods=acm", "--budget_conditioning=true"]


def test_conditioned_model_in_the_sweep(tmp_path, capsys):
  assert compare.main([f"--workdir={tmp_path}", *TINY, "--calibration=none"]) == 0
  records = json.loads((tmp_path / "curves.json").read_text())
  any_budget = [r for r in records if r["method"] == "acm_any_budget"]
  assert [r["eval_budget"] for r in any_budget] == [0.25, 0.75]
  assert all(r["rule"] == "none" and r["budget_conditioning"] == [0.125, 0.875] for r in any_budget)
  run = tmp_path / "finetune_any_b0.125-0.875"
  saved = config_lib.load(run / "config.json")
  assert saved.budget_conditioning and (saved.budget_min, saved.budget_max) == (0.125, 0.875)
  assert (tmp_path / "finetune_b0.50" / "eval.json").exists()  # the reference is a plain model
  # global calibration on top of the conditioned gates, saved with the model; then served without fitting
  assert compare.main([f"--workdir={tmp_path}", *TINY, "--calibration=global"]) == 0
  assert sorted(calibration.load(run)["global"]) == ["0.2500", "0.7500"]
  assert compare.main([f"--workdir={tmp_path}", *TINY, "--calibration=global", "--calibrate=false"]) == 0
  capsys.readouterr()
  # nested: one chain over both budgets, saved with the model, each level holding the ones below
  assert compare.main([f"--workdir={tmp_path}", *TINY, "--calibration=nested"]) == 0
  nested = calibration.load(run)["nested"]
  assert nested["0.7500"]["budgets"] == [0.25, 0.75] and nested["0.2500"]["chain"] == [0.25, 0.75]
  assert nested["0.7500"]["level_offsets"][0] == nested["0.2500"]["offsets"]
  records = json.loads((tmp_path / "curves.json").read_text())
  nested_records = [r for r in records if r["method"] == "acm_any_budget"]
  assert [r["rule"] for r in nested_records] == ["nested", "nested"]
  assert nested_records[0]["compute_fraction"] <= nested_records[1]["compute_fraction"]
  # the second level runs every gate twice: its GFLOPs count the second pass
  assert nested_records[0]["nested_extra_gate_gflops_per_image"] == 0
  extra = nested_records[1]["nested_extra_gate_gflops_per_image"]
  assert extra > 0 and extra == pytest.approx(nested_records[1]["gate_gflops_per_image"] / 2)
  assert compare.main([f"--workdir={tmp_path}", *TINY, "--calibration=nested", "--calibrate=false"]) == 0
  capsys.readouterr()
  # another chain of budgets is not the saved one
  assert compare.main([f"--workdir={tmp_path}", *TINY, "--calibration=nested", "--calibrate=false",
                       "--any_budgets=0.25,0.5,0.75"]) == 2
  assert "no saved nested calibration" in capsys.readouterr().err
  # empty --budgets: the any-budget model alone (halting methods need the budgets as depths)
  assert compare.main([f"--workdir={tmp_path}", *TINY, "--calibration=none", "--budgets="]) == 0
  records = json.loads((tmp_path / "curves.json").read_text())
  assert sorted({r["method"] for r in records}) == ["acm_any_budget", "dense"]
  assert compare.main([f"--workdir={tmp_path}", *TINY, "--calibration=none", "--budgets=",
                       "--methods=acm,token_halting"]) == 2
  assert "--budgets must be" in capsys.readouterr().err
  # outside the trained range: refused before any work
  assert compare.main([f"--workdir={tmp_path}", *TINY, "--calibration=none", "--eval_budget=0.95"]) == 2
  assert "outside the range" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--budget_min=0"], "--budget_min and --budget_max must satisfy"),
    (["--budget_min=0.6", "--budget_max=0.4"], "--budget_min and --budget_max must satisfy"),
    (["--budget_max=1.5"], "--budget_min and --budget_max must satisfy"),
    (["--eval_budget=1.2"], "--eval_budget must be"),
    (["--eval_budget=0.9"], "outside the range"),
    (["--budget_conditioning=false", "--calibration=none"], "serves budget-conditioned models only"),
    (["--budget_conditioning=false", "--calibrate=false"], "no saved per_acm calibration"),
    (["--calibration=per_acm", "--calibrate=false"], "no saved per_acm calibration"),
    (["--budget_weight_power=-1"], "--budget_weight_power must be >= 0"),
    (["--budget_draw=normal"], "--budget_draw must be one of"),
])
def test_bad_input_stops_before_work(tmp_path, capsys, flags, message):
  assert compare.main([f"--workdir={tmp_path}", *TINY, *flags]) == 2
  assert message in capsys.readouterr().err
  assert not any(p.name == "checkpoints" for p in tmp_path.rglob("*"))


def test_fused_path_reads_the_budget_like_the_xla_path():
  """The fused kernels take each gate folded at the budget (`linear_gate_at_budget`); the XLA
  path applies the FiLM layer: same choices, same logits (q/k/v grouped, MLP alone)."""
  cfg = vit.get_config("tiny", depth=2, acm=acm.ACMConfig(num_learners=4, attention=True, impl="pallas",
                                                           budget_conditioning=True))
  images = jax.random.normal(jax.random.key(13), (2, 32, 32, 3))
  model = vit.ViT(cfg)
  flat = flatten(model.init(jax.random.key(14), images[:1])["params"])
  rng = np.random.default_rng(15)
  for name, value in flat.items():  # gates that spread over k, and a FiLM layer that matters
    if name.endswith("gate/out/kernel") or acm.BUDGET_FILM in name:
      flat[name] = jnp.asarray(rng.normal(size=value.shape) * 2 / np.sqrt(cfg.dim), jnp.float32)
  params = unflatten(flat)
  xla = vit.ViT(dataclasses.replace(cfg, acm=dataclasses.replace(cfg.acm, impl="xla")))
  for budget in (0.2, 0.8):
    with acm.with_budget(budget):
      logits, state = model.apply({"params": params}, images, mutable=["acm"])
      ref, ref_state = xla.apply({"params": params}, images, mutable=["acm"])
    choices, ref_choices = flatten(state["acm"]), flatten(ref_state["acm"])
    names = [n for n in choices if n.endswith("/choice")]
    assert len(names) == 2 * 5
    for name in names:
      np.testing.assert_array_equal(np.argmax(choices[name][0], -1), np.argmax(ref_choices[name][0], -1))
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)


def test_all_phases_with_conditioning(tmp_path, capsys):
  """The single-model driver: distill and gates stay plain (shared with plain finetunings), the
  conditioned finetuning evaluates at --budget, the static baseline has no FiLM layer to read."""
  flags = ["--model=tiny", "--batch_size=16", "--eval_batch_size=32", "--eval_examples=64", "--pretrain_steps=3",
           "--distill_steps=2", "--gates_steps=2", "--finetune_steps=2", "--log_every=1", "--checkpoint_every=100",
           "--gate_hidden=8", "--budget_conditioning=true", "--budget=0.3"]
  assert vit_imagenet.main([f"--workdir={tmp_path}", "--phase=all", *flags]) == 0
  exp = vit_task.build(config_lib.load(tmp_path / "finetune_any_b0.125-0.875" / "config.json"))
  assert not any(acm.BUDGET_FILM in k for k in flatten(phases.load_phase_params(exp, "gates")))
  assert sum(acm.BUDGET_FILM in k for k in flatten(phases.load_phase_params(exp, "finetune"))) == 8
  record = json.loads((tmp_path / "finetune_any_b0.125-0.875" / "eval.json").read_text())
  assert record["model"] == "acm_b0.30" and 0 <= record["compute_fraction"] <= 1
  assert (tmp_path / "static_k2" / "eval.json").exists()
