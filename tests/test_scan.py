"""Scanned encoder blocks (`transformer.encoder_blocks` with scan=True) against the unrolled
model as the reference: logits, sown per-layer statistics, gradients under every remat
policy, one step of every phase, acmize, --init, sharded steps on 8 simulated devices
and their compiled memory; and the bad inputs (remat policy, partial ACMs, a checkpoint
of the other layout).

The 8-device part runs in a subprocess (this file as a script), as in test_sharding.py.
"""

import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from acm_jax import acm as acm_lib
from acm_jax import transformer
from acm_jax.acmize import acmize, flatten
from acm_jax.train import optim, steps
from acm_jax.vit import model as vit
from acm_jax.vit import task as vit_task
from acm_jax.wav2vec2 import model as wav2vec2

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5
ACM = acm_lib.ACMConfig(num_learners=4, gate_hidden=8, attention=True, impl="xla")
VIT = vit.ViTConfig(image_size=16, patch_size=4, dim=32, depth=3, num_heads=2, mlp_dim=64, num_classes=5)
W2V = wav2vec2.Wav2Vec2Config(conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), conv_bias=True, dim=32,
                              depth=3, num_heads=2, mlp_dim=64, num_conv_pos_embeddings=8,
                              num_conv_pos_embedding_groups=4, vocab_size=8)


def _scanned(config, **fields):
  return dataclasses.replace(config, scan_blocks=True, **fields).validate()


def _inputs(family):
  if family == "vit":
    return vit.ViT, VIT, jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  audio = jax.random.normal(jax.random.key(1), (2, 400))
  return wav2vec2.Wav2Vec2, W2V, (audio, jnp.array([400, 250]))  # the second utterance padded: masked attention


def _init(model, sample):
  return model.init({"params": jax.random.key(0), "gumbel": jax.random.key(0)}, sample, mode="gumbel")["params"]


def _relative_difference(a, b):
  a, b = flatten(a), flatten(b)
  diff = sum(float(jnp.sum((jnp.asarray(a[k]) - jnp.asarray(b[k])) ** 2)) for k in b)
  return (diff / sum(float(jnp.sum(jnp.asarray(b[k]) ** 2)) for k in b)) ** 0.5


def _max_diff(a, b):
  a, b = flatten(a), flatten(b)
  assert set(a) == set(b), sorted(set(a) ^ set(b))[:6]
  return max(float(jnp.max(jnp.abs(jnp.asarray(a[k], jnp.float32) - jnp.asarray(b[k], jnp.float32)))) for k in a)


@pytest.mark.parametrize("family", ["vit", "wav2vec2"])
def test_scanned_logits_and_statistics_equal_the_unrolled_model(family):
  cls, config, sample = _inputs(family)
  for mode in ("dense", "full", "argmax", "gumbel"):
    cfg = config if mode == "dense" else dataclasses.replace(config, acm=ACM)
    unrolled, scanned = cls(cfg), cls(_scanned(cfg))
    params = _init(unrolled, sample)
    stacked = transformer.stack_blocks(params)
    assert jax.tree.structure(stacked) == jax.tree.structure(jax.eval_shape(lambda: _init(scanned, sample)))
    assert flatten(stacked)["blocks/ln1/scale"].shape == (3, 32)
    kwargs = dict(mode="argmax" if mode == "dense" else mode, mutable=["acm", "record"],
                  rngs={"gumbel": jax.random.key(7)})
    want, want_sown = unrolled.apply({"params": params}, sample, **kwargs)
    got, got_sown = scanned.apply({"params": stacked}, sample, **kwargs)
    assert float(jnp.max(jnp.abs(got - want))) < ATOL, mode
    # sown values come out per layer under the unrolled names (what eval statistics read)
    for collection in want_sown:
      assert _max_diff(transformer.unstack_blocks(got_sown[collection]), want_sown[collection]) < ATOL, collection
  # each layer draws its own Gumbel noise
  choices = flatten(transformer.unstack_blocks(got_sown["acm"]))
  assert not np.array_equal(choices["block_0/mlp/choice"][0], choices["block_1/mlp/choice"][0])


def test_scan_unroll_keeps_logits_statistics_and_gradients():
  """Several blocks per loop iteration (2 at depth 3: a full iteration and a remainder)
  compute the unrolled model's logits, per-layer statistics and, under remat, gradients."""
  unroll = 2
  cls, config, sample = _inputs("vit")
  config = dataclasses.replace(config, acm=ACM)
  params = _init(cls(config), sample)
  stacked = transformer.stack_blocks(params)
  kwargs = dict(mode="gumbel", mutable=["acm"], rngs={"gumbel": jax.random.key(7)})
  want, want_sown = cls(config).apply({"params": params}, sample, **kwargs)
  got, got_sown = cls(_scanned(config, scan_unroll=unroll)).apply({"params": stacked}, sample, **kwargs)
  assert float(jnp.max(jnp.abs(got - want))) < ATOL
  assert _max_diff(transformer.unstack_blocks(got_sown["acm"]), want_sown["acm"]) < ATOL

  def grads(model, p):
    loss = lambda q: jnp.sum(model.apply({"params": q}, sample, **kwargs)[0] ** 2)
    return jax.jit(jax.grad(loss))(p)

  want_grads = flatten(grads(cls(config), params))
  with transformer.small_params_packed(True):
    got_grads = flatten(transformer.unstack_blocks(grads(cls(_scanned(config, remat="dots", scan_unroll=unroll)),
                                                         stacked)))
  for key, value in want_grads.items():
    np.testing.assert_allclose(got_grads[key], value, rtol=1e-4, atol=1e-5, err_msg=key)


def test_scan_unroll_reaches_the_models_of_an_experiment():
  from benchmarks import train_bench
  exp = train_bench.experiment("tiny", "mlp", 4, True, "dots", "float32", scan_unroll=2)
  assert exp.task.dense_model.config.scan_unroll == exp.task.acm_model.config.scan_unroll == 2


def test_remat_policies_keep_the_gradients():
  cls, config, sample = _inputs("vit")
  config = dataclasses.replace(config, acm=ACM)
  params = _init(cls(config), sample)

  def grads(model, p):
    loss = lambda q: jnp.sum(model.apply({"params": q}, sample, mode="gumbel", mutable=["acm"],
                                         rngs={"gumbel": jax.random.key(2)})[0] ** 2)
    return jax.jit(jax.grad(loss))(p)

  want = flatten(grads(cls(config), params))
  for policy in ("full", "dots", "dots_no_batch"):
    with transformer.small_params_packed(policy != "full"):  # packed as on a GPU, and one stack per leaf
      got = grads(cls(_scanned(config, remat=policy)), transformer.stack_blocks(params))
    got = flatten(transformer.unstack_blocks(got))
    for key, value in want.items():
      np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-5, err_msg=f"{policy} {key}")


def test_scanned_stacks_under_remat_slice_and_update_their_small_params_as_one_array(monkeypatch):
  """`transformer.small_params_packed`: under remat the scanned loops read one packed array of the
  small parameters per layer and write one gradient stack for them; without remat nothing is packed.
  (That the packed gradients equal the unrolled model's under every remat policy is
  test_remat_policies_keep_the_gradients, which runs with packing, the default.)"""
  monkeypatch.setattr(transformer, "PACK_MAX_SIZE", 256)  # this model's matmul weights stay apart
  cls, config, sample = _inputs("wav2vec2")  # the family with masked attention and a conv stem
  config = dataclasses.replace(config, acm=ACM)
  params = transformer.stack_blocks(_init(cls(config), sample))
  small = sum(int(np.prod(np.shape(leaf)[1:])) <= transformer.PACK_MAX_SIZE
              for leaf in jax.tree.leaves(params[transformer.STACKED]))
  assert 10 < small < len(jax.tree.leaves(params[transformer.STACKED]))

  def loops(remat, packed):
    model = cls(_scanned(config, remat=remat))
    loss = lambda q: jnp.sum(model.apply({"params": q}, *sample, mode="gumbel", mutable=["acm"],
                                         rngs={"gumbel": jax.random.key(2)})[0] ** 2)
    with transformer.small_params_packed(packed):
      jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
    found = [(len(e.invars), len(e.outvars)) for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert len(found) == 2, found  # the forward loop and its transpose
    return found

  on, off = loops("dots", True), loops("dots", False)
  assert on[0][0] == off[0][0] - small + 1  # forward: one packed input instead of `small` stacked leaves
  assert on[0][1] == off[0][1]  # and no unpacked leaf saved as a residual
  assert on[1][1] == off[1][1] - small + 1  # backward: one gradient stack for them
  assert loops("none", True) == loops("none", False)


def _task(scan):
  dense = dataclasses.replace(VIT, scan_blocks=scan)
  return vit_task.vision_task(dense, dataclasses.replace(dense, acm=ACM).validate(), jnp.float32)


def _state(params, tx):
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
          "rng": jax.random.key(5)}


def test_one_step_of_every_phase_equals_the_unrolled_step():
  from acm_jax.train import phases
  batch = {"image": jax.random.normal(jax.random.key(1), (4, 16, 16, 3)), "label": jnp.array([0, 1, 2, 3])}
  tasks = {scan: _task(scan) for scan in (False, True)}
  assert steps._kinds_per_layer(tasks[True]) is not None  # the scanned distill step runs its vmapped path
  teacher = _init(tasks[False].dense_model, batch["image"])
  acm_params = acmize(teacher, _init(tasks[False].acm_model, batch["image"]), tasks[False].paths, num_learners=4)
  paths = tasks[False].paths
  phase_steps = {
      "pretrain": (teacher, {}, lambda task, tx, _: functools.partial(steps.pretrain_step, task, tx, 0.1)),
      "distill": (acm_params, {"trainable": functools.partial(phases.is_learner, paths)},
                  lambda task, tx, t: functools.partial(steps.distill_step, task, tx, "detach", t)),
      "gates": (acm_params, {"trainable": functools.partial(phases.is_gate, paths)},
                lambda task, tx, t: functools.partial(steps.gate_step, task, tx, 1.2, "ours", t)),
      "finetune": (acm_params, {"fast": functools.partial(phases.is_gate, paths), "fast_lr_scale": 30.0},
                   lambda task, tx, _: functools.partial(steps.finetune_step, task, tx, steps.FinetuneWeights())),
  }
  for phase, (params, tx_args, make_step) in phase_steps.items():
    results = {}
    for scan, task in tasks.items():
      layout = transformer.stack_blocks if scan else (lambda tree: tree)
      p = layout(params)
      tx = optim.make_optimizer(p, lr=1e-3, steps=10, warmup_fraction=0.0, **tx_args)
      step = jax.jit(make_step(task, tx, layout(teacher)))
      state, _ = step(_state(p, tx), batch)  # the schedule's first learning rate is 0
      state, metrics = step(state, batch)
      results[scan] = (transformer.unstack_blocks(state["params"]), metrics)
    (want, want_metrics), (got, got_metrics) = results[False], results[True]
    # relative over all parameters, as in test_sharding: Adam moves a near-zero gradient by about
    # +-lr whatever its size, so single leaves may flip between summation orders
    assert _relative_difference(got, want) < 1e-4, (phase, _relative_difference(got, want))
    moved = _max_diff(want, params)
    assert moved > 1e-4, (phase, moved)  # the step did train something
    for name, value in want_metrics.items():
      np.testing.assert_allclose(got_metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=f"{phase} {name}")
    if phase in ("distill", "gates"):  # the frozen half stayed frozen in the stacked layout too
      frozen = (lambda k: "/gate/" in k) if phase == "distill" else (lambda k: "/gate/" not in k)
      for key, value in flatten(got).items():
        if frozen(key):
          np.testing.assert_array_equal(value, flatten(params)[key], err_msg=f"{phase} {key}")


def test_eval_step_statistics_per_layer():
  image = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  batch = {"image": image, "label": jnp.array([0, 1, 2, 3]), "valid": jnp.array([True, True, True, False])}
  unrolled, scanned = _task(False), _task(True)
  params = _init(unrolled.acm_model, image)
  want = steps.eval_step(unrolled, "argmax", None, params, batch)
  got = steps.eval_step(scanned, "argmax", None, transformer.stack_blocks(params), batch)
  assert set(got["k_hist"]) == set(unrolled.paths) and len(unrolled.paths) == 3 * 5
  assert _max_diff(got["k_hist"], want["k_hist"]) < ATOL
  forced = lambda b: jnp.broadcast_to(jnp.arange(17) % 5, (4, 17))  # per token, every ACM alike
  with_forced = steps.eval_step(scanned, "argmax", None, transformer.stack_blocks(params), batch, forced_k=forced)
  np.testing.assert_allclose(with_forced["k_hist"]["block_2/mlp"], 3 * np.array([4, 4, 3, 3, 3]))


@pytest.mark.parametrize("family", ["vit", "wav2vec2"])
def test_per_layer_force_k_map_reaches_each_layer_of_the_scan(family):
  """One {unrolled path: (batch, tokens) k} map, different in every layer: the scanned model
  gives the unrolled model's logits and sows each layer's forced choices."""
  cls, config, sample = _inputs(family)
  cfg = dataclasses.replace(config, acm=ACM)
  unrolled, scanned = cls(cfg), cls(_scanned(cfg))
  params = _init(unrolled, sample)
  _, sown = unrolled.apply({"params": params}, sample, mutable=["acm"])
  tokens = flatten(sown["acm"])["block_0/mlp/choice"][0].shape[:2]
  paths = transformer.replaceable_paths(cfg.depth, ACM)
  keys = jax.random.split(jax.random.key(9), len(paths))
  kmap = {path: jax.random.randint(key, tokens, 0, 5) for path, key in zip(paths, keys)}
  for forced in (kmap, kmap.__getitem__):
    with acm_lib.force_k(forced):
      want, _ = unrolled.apply({"params": params}, sample, mutable=["acm"])
      got, got_sown = jax.jit(lambda p: scanned.apply({"params": p}, sample, mutable=["acm"]))(
          transformer.stack_blocks(params))
    assert float(jnp.max(jnp.abs(got - want))) < ATOL
    choices = flatten(transformer.unstack_blocks(got_sown["acm"]))
    for path, k in kmap.items():
      np.testing.assert_array_equal(np.argmax(choices[f"{path}/choice"][0], -1), k, err_msg=path)
  free, _ = unrolled.apply({"params": params}, sample, mutable=["acm"])
  assert float(jnp.max(jnp.abs(free - want))) > 1e-3  # the map did change the computation
  missing = {p: k for p, k in kmap.items() if p != "block_2/attn/key"}
  with acm_lib.force_k(missing), pytest.raises(KeyError, match="no choices for the ACM 'block_2/attn/key'"):
    scanned.apply({"params": transformer.stack_blocks(params)}, sample, mutable=["acm"])


def test_acmize_stacked_equals_stacked_acmize():
  image = jnp.zeros((1, 16, 16, 3))
  task = _task(False)
  dense, acm_init = _init(task.dense_model, image), _init(task.acm_model, image)
  want = transformer.stack_blocks(acmize(dense, acm_init, task.paths, num_learners=4))
  got = acmize(transformer.stack_blocks(dense), transformer.stack_blocks(acm_init), task.paths, num_learners=4)
  assert _max_diff(got, want) == 0.0
  # an unrolled (e.g. published) dense checkpoint into a scanned ACM model
  mixed = acmize(dense, transformer.stack_blocks(acm_init), task.paths, num_learners=4)
  assert _max_diff(mixed, want) == 0.0


def test_stack_and_unstack_are_inverse_and_refuse_unlike_blocks():
  params = _init(vit.ViT(dataclasses.replace(VIT, acm=ACM)), jnp.zeros((1, 16, 16, 3)))
  assert _max_diff(transformer.unstack_blocks(transformer.stack_blocks(params)), params) == 0.0
  partial = _init(vit.ViT(dataclasses.replace(VIT, acm=dataclasses.replace(ACM, blocks=(1,)))), jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(ValueError, match="block_1 differs from block_0"):
    transformer.stack_blocks(partial)
  with pytest.raises(ValueError, match="must be block_0 .. block_1, found indices \\[0, 2\\]"):
    transformer.stack_blocks({"block_0": {}, "block_2": {}})


def test_sharding_rules_name_the_layer_axis():
  from acm_jax import sharding
  params = jax.eval_shape(lambda: _init(vit.ViT(_scanned(dataclasses.replace(VIT, acm=ACM))), jnp.zeros((1, 16, 16, 3))))
  assert sharding.unnamed_params(params) == []
  assert sharding.logical_axes("blocks/mlp/w1", 3) == ("layers", "embed", "mlp")
  assert sharding.logical_axes("opt_state/0/mu/blocks/attn/out/dense/kernel", 3) == ("layers", "heads", "embed")
  fake = type("M", (), {"shape": {"data": 1, "fsdp": 3, "tensor": 1}})()  # 3 divides the layer axis too
  spec = sharding.spec_for((3, 48, 64), sharding.logical_axes("blocks/mlp/w1", 3), fake, sharding.STRATEGIES["fsdp"])
  assert spec == jax.sharding.PartitionSpec(None, "fsdp", None)


@pytest.mark.parametrize("fields, message", [
    ({"remat": "sometimes"}, "unknown remat policy 'sometimes'; expected one of \\('none', 'full', 'dots'"),
    ({"scan_blocks": True, "acm": dataclasses.replace(ACM, blocks=(0, 2))},
     "scan_blocks=True needs every block alike, but the ACM config makes only blocks \\[0, 2\\] of 3"),
    # the other checks both families share (`transformer.check_encoder`)
    ({"num_heads": 3}, "dim 32 is not divisible by num_heads 3"),
    ({"scan_blocks": True, "scan_unroll": 0}, "scan_unroll must be an int from 1 to the depth 3 .* got 0"),
    ({"scan_blocks": True, "scan_unroll": 4}, "scan_unroll must be an int from 1 to the depth 3 .* got 4"),
    ({"scan_unroll": 1.5}, "scan_unroll must be an int from 1 to the depth 3 .* got 1.5"),
    ({"activation": "swish"}, "unknown activation 'swish'"),
    ({"acm": dataclasses.replace(ACM, num_learners=3)}, "num_learners=3 does not divide the MLP width 64"),
    ({"acm": dataclasses.replace(ACM, blocks=(0, 5))}, "ACM blocks \\[5\\] out of range for a model of depth 3"),
])
def test_bad_model_configs(fields, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(VIT, **fields).validate()
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(W2V, **fields).validate()


def test_bad_flags():
  from acm_jax.train.config import ExperimentConfig
  with pytest.raises(ValueError, match="--scan_blocks=true needs every block alike, but --acm_blocks='0,1'"):
    ExperimentConfig(scan_blocks=True, acm_blocks="0,1").validate()
  with pytest.raises(ValueError, match="--scan_unroll must be >= 1 .* got 0"):
    ExperimentConfig(scan_blocks=True, scan_unroll=0).validate()
  with pytest.raises(ValueError, match="unknown remat policy 'sometimes'"):
    ExperimentConfig(remat="sometimes").validate()
  assert ExperimentConfig(remat=True).validate().remat is True  # a config.json written before the policies


def test_checkpoints_of_the_other_layout_stop_with_the_converter(tmp_path):
  from acm_jax.train import loop
  params = _init(vit.ViT(VIT), jnp.zeros((1, 16, 16, 3)))
  loop.save_params(tmp_path / "unrolled", params)
  loop.save_params(tmp_path / "scanned", transformer.stack_blocks(params))
  stacked = jax.eval_shape(lambda: transformer.stack_blocks(params))
  with pytest.raises(ValueError, match="unrolled blocks .* scans its blocks .*transformer.stack_blocks"):
    loop.load_params(tmp_path / "unrolled", stacked, "pretrain phase")
  with pytest.raises(ValueError, match="scanned blocks .* unrolls them: .*transformer.unstack_blocks"):
    loop.load_params(tmp_path / "scanned", params, "pretrain phase")
  assert _max_diff(loop.load_params(tmp_path / "scanned", stacked, "pretrain phase"),
                   transformer.stack_blocks(params)) == 0.0


def test_init_from_an_unrolled_checkpoint_into_a_scanned_model(tmp_path):
  from acm_jax.train import loop, phases
  from acm_jax.train.config import ExperimentConfig
  run = tmp_path / "pretrain"
  params = _init(vit.ViT(vit.get_config("tiny", depth=2)), jnp.zeros((1, 32, 32, 3)))
  loop.save_params(run, params)
  (run / "config.json").write_text(json.dumps({"model": "tiny"}))
  for scan in (False, True):
    exp = vit_task.build(ExperimentConfig(init=str(run / "params"), model="from_init", scan_blocks=scan,
                                          workdir=str(tmp_path / "w"), batch_size=8, eval_batch_size=8))
    loaded = phases.dense_params(exp)
    assert _max_diff(loaded, transformer.stack_blocks(params) if scan else params) == 0.0


# --- 8 simulated devices -----------------------------------------------------------------

# the pure data and pure FSDP meshes: the mixed one (data:2,fsdp:4) runs the scanned finetune step in
# test_kernels_on_meshes.py and every phase of the unrolled model in test_sharding.py
MESHES = ("data:8", "fsdp:8")


def worker_meshes(out_path):
  """The ACM finetune step of the unrolled model on one device against the scanned model's on
  every mesh, and the scanned step's compiled memory under dp:8 and fsdp:8."""
  from acm_jax import data as data_lib
  from acm_jax import sharding
  from acm_jax.train import phases
  from acm_jax.train.config import ExperimentConfig
  devices = jax.devices()
  info = data_lib.get_dataset_info("synthetic", image_size=16)
  config = ExperimentConfig(batch_size=16, eval_batch_size=16, image_size=16)

  def experiment(scan, mesh, strategy, devs):
    dense = dataclasses.replace(VIT, num_classes=info.num_classes, scan_blocks=scan, depth=4)
    acm = dataclasses.replace(dense, acm=ACM).validate()
    return phases.Experiment(config, vit_task.vision_task(dense, acm, jnp.float32), info,
                             sample_input=jnp.zeros((1, 16, 16, 3)), iterator=data_lib.make_iterator,
                             flops=lambda *_: {}, partitioner=sharding.Partitioner.from_flags(mesh, strategy, devs))

  def prepared(exp, params):
    tx = phases.optimizer(exp, "finetune", params, fast=functools.partial(phases.is_gate, exp.task.paths),
                          fast_lr_scale=30.0)
    step_fn = functools.partial(steps.finetune_step, exp.task, tx, steps.FinetuneWeights())
    state, step, batches = phases.prepare(exp, "finetune", params, tx, step_fn)
    return state, step, next(batches(0))

  def compiled(exp, params):
    """The step compiled once: the same executable runs and reports its memory."""
    state, step, batch = prepared(exp, params)
    return state, step.lower(state, batch).compile(), batch

  def temp_bytes(executable):
    return int(executable.memory_analysis().temp_size_in_bytes)

  def one_step(exp, params):
    state, step, batch = compiled(exp, params)
    state, _ = step(state, batch)  # the schedule's first learning rate is 0
    new, metrics = step(state, batch)
    host = transformer.unstack_blocks(jax.device_get(new["params"]))
    return host, float(metrics["loss"]), new["params"], temp_bytes(step)

  reference = experiment(False, "data:1", "dp", devices[:1])
  params = phases.init_params(reference, "acm", 0)
  want, want_loss, _, _ = one_step(reference, params)
  report = {"reference_loss": want_loss, "meshes": {}, "temp_bytes": {}}
  for mesh in MESHES:
    strategy = "fsdp" if "fsdp" in mesh else "dp"
    got, loss, placed, temp = one_step(experiment(True, mesh, strategy, devices), transformer.stack_blocks(params))
    report["temp_bytes"][f"scanned {mesh}"] = temp
    w1 = placed["blocks"]["mlp"]["w1"]
    report["meshes"][mesh] = {"loss": loss, "rel_diff": _relative_difference(got, want),
                              "moved": _max_diff(got, transformer.unstack_blocks(params)),
                              "w1_shard": list(w1.addressable_shards[0].data.shape), "w1": list(w1.shape)}
  one_layer = sum(np.asarray(v).nbytes for v in jax.tree.leaves(params["block_0"]))
  report["one_layer_param_bytes"] = int(one_layer)
  Path(out_path).write_text(json.dumps(report))


@pytest.fixture(scope="module")
def mesh_report(tmp_path_factory):
  out = tmp_path_factory.mktemp("scan_meshes") / "report.json"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": str(ROOT)}
  proc = subprocess.run([sys.executable, __file__, "meshes", str(out)], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=1500)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  return json.loads(out.read_text())


@pytest.mark.xdist_group("scan_mesh_report")  # one run of the module fixture, in one worker
@pytest.mark.parametrize("mesh", MESHES)
def test_scanned_step_on_a_mesh_equals_the_unrolled_step_on_one_device(mesh_report, mesh):
  got = mesh_report["meshes"][mesh]
  assert got["loss"] == pytest.approx(mesh_report["reference_loss"], rel=1e-5)
  assert got["rel_diff"] < 1e-5 and got["moved"] > 1e-4
  fsdp = 8 if mesh == "fsdp:8" else 1
  # the layer axis stays whole; embed (32) is split over fsdp
  assert got["w1_shard"] == [got["w1"][0], got["w1"][1] // fsdp, got["w1"][2]]


@pytest.mark.xdist_group("scan_mesh_report")  # one run of the module fixture, in one worker
def test_fsdp_temp_memory_of_the_scanned_step(mesh_report):
  """Temp bytes per device under fsdp:8 at most dp:8's plus one layer's gathered parameters."""
  temp = mesh_report["temp_bytes"]
  assert temp["scanned fsdp:8"] <= temp["scanned data:8"] + mesh_report["one_layer_param_bytes"], temp


if __name__ == "__main__":
  sys.path.insert(0, str(ROOT))
  worker_meshes(sys.argv[2])


def test_scanned_acm_argmax_forward_runs_the_kernels():
  """Inside a scanned stack the ACMs run the fused kernels (interpret mode here) and compute what the
  unrolled model computes with them. flax >= 0.12.10 checks the scan body's loop invariants by dead-code
  elimination, which never removes a bare pallas_call (`inference._removable` stages the kernels as a
  removable jit call); no warning is raised."""
  import warnings as warnings_lib

  from benchmarks import layout_bench

  unrolled, scanned = layout_bench.models("tiny", "mlp_qkvo", "pallas")
  images = jax.random.normal(jax.random.key(3), (1, unrolled.image_size, unrolled.image_size, 3))
  params = layout_bench.params_for(unrolled, images[:1], jnp.float32)
  stacked = transformer.stack_blocks(params)
  forward = lambda cfg: (lambda p, x: vit.ViT(cfg).apply({"params": p}, x))
  assert "pallas_call" in str(jax.make_jaxpr(forward(unrolled))(params, images))
  with warnings_lib.catch_warnings():
    warnings_lib.simplefilter("error")
    assert "pallas_call" in str(jax.make_jaxpr(forward(scanned))(stacked, images))
    got = forward(scanned)(stacked, images)
  np.testing.assert_allclose(got, forward(unrolled)(params, images), rtol=1e-5, atol=1e-5)
