"""Sharding: rules, meshes, every phase step on 8 simulated devices against one
device, checkpoints across meshes, two processes on localhost, and bad input.

Multi-device work runs in subprocesses (this file run as a script) with
XLA_FLAGS=--xla_force_host_platform_device_count=N, so the rest of the suite keeps
its single CPU device.
"""

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# every phase on a mesh that splits both the batch and the params (data:4,fsdp:2 runs in the checkpoint and
# per-shard kernel parts of the report). Each mesh here costs its four phases' compiles, about 75 s of the CI
# machine, so the pure data mesh (data:8) runs only the finetune step, scanned, in test_scan.py and
# test_kernels_on_meshes.py
MESHES = ("data:2,fsdp:4",)
PHASES = ("pretrain", "distill", "gates", "finetune")
STEPS = 3
RTOL = 1e-5


# --- in the worker processes ----------------------------------------------------------


def _tiny_experiment(config, devices=None, mesh="data:1", strategy="fsdp"):
  """A 2-block ViT on 16x16 synthetic images: small programs, fast compiles."""
  import jax.numpy as jnp
  from acm_jax import acm as acm_lib
  from acm_jax import data as data_lib
  from acm_jax.vit import flops as vit_flops
  from acm_jax import sharding
  from acm_jax.vit import model as vit
  from acm_jax.train import phases
  from acm_jax.vit import task as vit_task
  info = data_lib.get_dataset_info("synthetic", image_size=16)
  dense = vit.ViTConfig(image_size=16, patch_size=4, dim=32, depth=2, num_heads=2, mlp_dim=64,
                        num_classes=info.num_classes)
  acm = dataclasses.replace(dense, acm=acm_lib.ACMConfig(
      num_learners=4, gate_hidden=8, impl="xla")).validate()
  return phases.Experiment(
      dataclasses.replace(config, image_size=16), vit_task.vision_task(dense, acm, jnp.float32), info,
      sample_input=jnp.zeros((1, 16, 16, 3)), iterator=data_lib.make_iterator, group_masks=True,
      flops=lambda mean_k, is_dense: vit_flops.vit_flops(dense if is_dense else acm, mean_k),
      partitioner=sharding.Partitioner.from_flags(mesh, strategy, devices))


def _phase_input(exp, phase, done):
  """(params, tx, step_fn, teacher) of a phase, starting from the finished
  phases' params in `done` (one device's, so that every mesh runs the same steps)."""
  import functools
  from acm_jax.acmize import acmize
  from acm_jax.train import phases, steps
  paths = exp.task.paths
  if phase == "pretrain":
    params = phases.init_params(exp, "dense", 0)
    tx = phases.optimizer(exp, phase, params)
    return params, tx, functools.partial(steps.pretrain_step, exp.task, tx, 0.0), None
  if phase == "distill":
    teacher = done["pretrain"]
    params = acmize(teacher, phases.init_params(exp, "acm", 0), paths, num_learners=4)
    tx = phases.optimizer(exp, phase, params, functools.partial(phases.is_learner, paths))
    return params, tx, functools.partial(steps.distill_step, exp.task, tx, "detach"), teacher
  if phase == "gates":
    teacher = done["pretrain"]
    tx = phases.optimizer(exp, phase, done["distill"], functools.partial(phases.is_gate, paths))
    return done["distill"], tx, functools.partial(steps.gate_step, exp.task, tx, 1.2, "ours"), teacher
  params = done["gates"] if "gates" in done else phases.init_params(exp, "acm", 0)
  tx = phases.optimizer(exp, phase, params)
  weights = steps.FinetuneWeights(temperature=exp.config.gate_temperature)
  return params, tx, functools.partial(steps.finetune_step, exp.task, tx, weights), None


def _run_phases(exp, ref):
  """Losses and final params of STEPS steps of every phase, and an eval record.
  Without `ref` (the one-device run) each phase starts from the previous one's result."""
  import jax
  from acm_jax.acmize import flatten
  from acm_jax.train import phases
  results = {}
  for phase in PHASES:
    done = ref or {p: r[1] for p, r in results.items()}
    state, step, batches = phases.prepare(exp, phase, *_phase_input(exp, phase, done))
    losses = []
    for _, batch in zip(range(STEPS), batches(0)):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
    results[phase] = (losses, jax.device_get(state["params"]))
    if exp.partitioner.mesh.shape["fsdp"] > 1:  # truly sharded, not replicated
      w = flatten(state["params"]).get("block_0/mlp/w1", flatten(state["params"]).get("block_0/mlp/fc1/kernel"))
      assert w.addressable_shards[0].data.shape[0] == w.shape[0] // exp.partitioner.mesh.shape["fsdp"]
  record = phases.evaluate(exp, (ref or {p: r[1] for p, r in results.items()})["finetune"], "acm", "argmax")
  return results, {k: record[k] for k in ("top1", "examples", "compute_fraction", "k_share_per_layer")}


def _relative_difference(a, b):
  """||a - b|| / ||b|| over all parameters together: Adam's first steps move a
  parameter with a near-zero gradient by about +-lr whatever the gradient's size,
  so a single small leaf can flip sign between reduction orders."""
  diff = sum(float(np.sum((a[k] - b[k]) ** 2)) for k in b)
  return (diff / sum(float(np.sum(b[k] ** 2)) for k in b)) ** 0.5


def _flat_numpy(tree):
  from acm_jax.acmize import flatten
  return {k: np.asarray(v) for k, v in flatten(tree).items()}


def worker_meshes(out_path):
  import jax
  from acm_jax.train.config import ExperimentConfig
  cfg = ExperimentConfig(batch_size=16, eval_batch_size=32, eval_examples=32, gate_temperature=1.0)
  devices = jax.devices()
  ref_exp = _tiny_experiment(cfg, devices[:1])
  ref_results, ref_eval = _run_phases(ref_exp, {})
  ref_params = {phase: params for phase, (_, params) in ref_results.items()}
  report = {"reference": {"losses": {p: r[0] for p, r in ref_results.items()}, "eval": ref_eval}}
  for mesh in MESHES:
    results, record = _run_phases(_tiny_experiment(cfg, devices, mesh), ref_params)
    report[mesh] = {"losses": {p: r[0] for p, r in results.items()}, "eval": record, "param_rel_diff": {}}
    for phase, (_, params) in results.items():
      a, b = _flat_numpy(params), _flat_numpy(ref_params[phase])
      report[mesh]["param_rel_diff"][phase] = _relative_difference(a, b)
  report["checkpoint"] = _checkpoint_across_meshes(cfg, devices, Path(out_path).parent / "ckpt")
  report["kernel_per_shard"] = _kernel_per_shard(devices)
  report["group_norm_per_shard"] = _group_norm_per_shard(devices)
  report["bad_batch"] = _bad_batch_message(cfg, devices)
  Path(out_path).write_text(json.dumps(report))


def _checkpoint_across_meshes(cfg, devices, workdir):
  """Save at step 2 on a 4x2 FSDP mesh, resume to step 4 on 2x4 and compare with a
  straight run on one device; then restore the params onto one device."""
  import jax
  import orbax.checkpoint as ocp
  from acm_jax.train import loop, phases
  cfg = dataclasses.replace(cfg, workdir=str(workdir))
  outs = {}
  for name, runs in (("resumed", [(devices, "data:4,fsdp:2", 2), (devices, "data:2,fsdp:4", 4)]),
                     ("straight", [(devices[:1], "data:1", 4)])):
    for devs, mesh, steps in runs:
      exp = _tiny_experiment(dataclasses.replace(cfg, workdir=str(workdir / name)), devs, mesh)
      state, step, batches = phases.prepare(exp, "pretrain", *_phase_input(exp, "pretrain", {}))
      final = loop.run(name="pretrain", run_dir=exp.run_dir("pretrain"), state=state, step_fn=step,
                       batches=batches, num_steps=steps, checkpoint_every=100, log_every=100)
    outs[name] = _flat_numpy(jax.device_get(final["params"]))
    if name == "resumed":
      shard_rows = {s.data.shape for s in final["params"]["block_0"]["mlp"]["fc1"]["kernel"].addressable_shards}
  one = _tiny_experiment(cfg, devices[:1])
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        phases.init_params(one, "dense", 0),
                        one.partitioner.shardings(phases.init_params(one, "dense", 0)))
  restored = ocp.StandardCheckpointer().restore(loop.params_dir(workdir / "resumed" / "pretrain"), target)
  on_one = {len(x.sharding.device_set) for x in jax.tree.leaves(restored)}
  rel = _relative_difference(outs["resumed"], outs["straight"])
  same = all(np.array_equal(np.asarray(v), outs["resumed"][k]) for k, v in _flat_numpy(restored).items())
  return {"rel_diff": rel, "restored_devices": sorted(on_one), "restored_equal": same,
          "fc1_shard_shapes_2x4": sorted(shard_rows)}


def _kernel_per_shard(devices):
  """The sorted ACM path (Pallas kernel, interpreted on CPU) inside a batch-sharded
  jit: each device sorts its own tokens (a shard_map) and the result is exact."""
  import jax
  import jax.numpy as jnp
  from acm_jax import acm, inference, sharding
  parts = sharding.Partitioner.from_flags("data:4,fsdp:2", "fsdp", devices)
  keys = jax.random.split(jax.random.key(0), 5)
  n, h, d = 4, 16, 32
  params = {"w1": jax.random.normal(keys[0], (d, n * h)) / 6, "b1": jnp.zeros(n * h),
            "w2": jax.random.normal(keys[1], (n * h, d)) / 8, "b2": jax.random.normal(keys[2], (n + 1, d))}
  x = jax.random.normal(keys[3], (8, 16, d))
  k = jax.random.randint(keys[4], (8, 16), 0, n + 1)
  fn = lambda p, x, k: inference.acm_apply_sorted_per_shard(p, x, k, acm.choice_bias(p, n), num_learners=n, impl="pallas",
                                                            block_rows=16)
  rows = parts.batch_sharding()
  jitted = parts.jit(fn, (parts.shardings(params), rows, rows), rows)
  text = jitted.lower(params, x, k).as_text()
  got = jitted(parts.put(params), jax.device_put(x, rows), jax.device_put(k, rows))
  want = acm.acm_apply(params, x, k, num_learners=n)
  return {"max_err": float(jnp.max(jnp.abs(got - want))), "shard_map": "shard_map" in text or "manual" in text}


def _group_norm_per_shard(devices):
  """The fused group with its LayerNorm and a skip connection taken into the kernels
  (`acm_group_apply(..., norm=..., residual=...)`, interpreted on CPU) inside a batch-sharded jit: the
  LayerNorm's parameters replicated, the residual split like the tokens, each device normalising its
  own; against the plain-jnp reference on the whole batch."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from acm_jax import inference, sharding
  from pallas_kernels import acm_fused
  from pallas_kernels.fused_testing import random_group
  acm_fused.NORM_MIN_TOKENS = acm_fused.RESIDUAL_MIN_TOKENS = 0
  parts = sharding.Partitioner.from_flags("data:4,fsdp:2", "fsdp", devices)
  n, d = 4, 32
  _, groups = random_group(0, 8 * 16, d, n, 16, 2, jnp.float32)
  rng = np.random.default_rng(1)
  z = jnp.asarray(rng.normal(size=(8, 16, d)) * 2 + 1, jnp.float32)
  scale, bias = jnp.asarray(1 + 0.3 * rng.normal(size=d), jnp.float32), jnp.asarray(rng.normal(size=d), jnp.float32)
  residual = jnp.asarray(rng.normal(size=(8, 16, d)), jnp.float32)
  fn = lambda g, z, s, b, r: inference.acm_group_apply(z, g, num_learners=n, norm=(s, b, 1e-6), residual=r,
                                                       block_rows=16, block_hidden=16, block_out=16, block_k_up=16,
                                                       block_k_down=16)
  rows, whole = parts.batch_sharding(), parts.replicated
  jitted = parts.jit(fn, (whole, rows, whole, whole, rows), ((rows, rows), whole))
  text = jitted.lower(groups, z, scale, bias, residual).as_text()
  outs, k = jitted(groups, jax.device_put(z, rows), scale, bias, jax.device_put(residual, rows))
  refs, k_ref = acm_fused.acm_group_reference(z.reshape(-1, d), groups, num_learners=n, norm=(scale, bias, 1e-6),
                                              residual=residual.reshape(-1, d))
  err = max(float(jnp.max(jnp.abs(o.reshape(-1, d) - r))) for o, r in zip(outs, refs))
  return {"max_err": err, "k_equal": bool(jnp.array_equal(k.reshape(2, -1), k_ref)),
          "shard_map": "shard_map" in text or "manual" in text}


def _bad_batch_message(cfg, devices):
  try:
    _tiny_experiment(dataclasses.replace(cfg, batch_size=12), devices, "data:8")
  except ValueError as e:
    return str(e)
  return ""


def worker_process(out_path, port, process_id):
  """One of two processes (2 devices each): one finetune step on a 2x2 mesh."""
  from acm_jax import sharding
  from acm_jax.train import loop, phases
  from acm_jax.train.config import ExperimentConfig
  cfg = ExperimentConfig(batch_size=16, eval_batch_size=32, coordinator_address=f"localhost:{port}",
                         num_processes=2, process_id=process_id)
  sharding.initialize_distributed(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
  import jax
  exp = _tiny_experiment(cfg, None, "data:2,fsdp:2")
  state, step, batches = phases.prepare(exp, "finetune", *_phase_input(exp, "finetune", {}))
  state, metrics = step(state, next(batches(0)))
  Path(out_path).write_text(json.dumps({"loss": float(metrics["loss"]), "processes": jax.process_count(),
                                        "devices": jax.device_count(), "main": loop.is_main_process()}))


def worker_single(out_path):
  """The same finetune step in one process on 4 devices, for comparison."""
  import jax
  from acm_jax.train import phases
  from acm_jax.train.config import ExperimentConfig
  exp = _tiny_experiment(ExperimentConfig(batch_size=16, eval_batch_size=32), jax.devices(), "data:2,fsdp:2")
  state, step, batches = phases.prepare(exp, "finetune", *_phase_input(exp, "finetune", {}))
  _, metrics = step(state, next(batches(0)))
  Path(out_path).write_text(json.dumps({"loss": float(metrics["loss"])}))


# --- the tests ------------------------------------------------------------------------


def _spawn(args, devices, extra_env=(), **kw):
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), **dict(extra_env)}
  return subprocess.Popen([sys.executable, __file__, *map(str, args)], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _finish(proc, timeout=600):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-4000:]


@pytest.fixture(scope="module")
def mesh_report(tmp_path_factory):
  from conftest import CACHE_ENV
  out = tmp_path_factory.mktemp("meshes") / "report.json"
  # with the suite's compilation cache: every experiment of the report has the same host-side inits, and
  # the checkpoint part runs the one-device and data:2,fsdp:4 pretrain steps again; those load, not compile
  _finish(_spawn(["meshes", out], 8, CACHE_ENV))
  return json.loads(out.read_text())


@pytest.mark.xdist_group("sharding_mesh_report")  # one run of the module fixture, in one worker
@pytest.mark.parametrize("mesh", MESHES)
def test_every_phase_step_on_a_mesh_matches_one_device(mesh_report, mesh):
  ref, got = mesh_report["reference"], mesh_report[mesh]
  for phase in PHASES:
    np.testing.assert_allclose(got["losses"][phase], ref["losses"][phase], rtol=RTOL, err_msg=phase)
    assert got["param_rel_diff"][phase] < RTOL, (phase, got["param_rel_diff"][phase])
  assert got["eval"]["examples"] == ref["eval"]["examples"] == 32
  assert got["eval"]["top1"] == ref["eval"]["top1"]
  assert got["eval"]["compute_fraction"] == pytest.approx(ref["eval"]["compute_fraction"], rel=RTOL)
  for path, share in ref["eval"]["k_share_per_layer"].items():
    np.testing.assert_allclose(got["eval"]["k_share_per_layer"][path], share, atol=1e-6)


@pytest.mark.xdist_group("sharding_mesh_report")  # one run of the module fixture, in one worker
def test_checkpoint_saved_on_one_mesh_restores_on_another(mesh_report):
  ckpt = mesh_report["checkpoint"]
  assert ckpt["rel_diff"] < RTOL
  assert ckpt["fc1_shard_shapes_2x4"] == [[8, 64]]  # embed 32 split over fsdp=4 after the restore
  assert ckpt["restored_devices"] == [1] and ckpt["restored_equal"]


@pytest.mark.xdist_group("sharding_mesh_report")  # one run of the module fixture, in one worker
def test_acm_kernel_runs_per_batch_shard(mesh_report):
  assert mesh_report["kernel_per_shard"]["shard_map"]
  assert mesh_report["kernel_per_shard"]["max_err"] < 1e-4
  assert mesh_report["group_norm_per_shard"] == {"max_err": pytest.approx(0, abs=1e-4), "k_equal": True,
                                                 "shard_map": True}


@pytest.mark.xdist_group("sharding_mesh_report")  # one run of the module fixture, in one worker
def test_batch_not_divisible_by_data_axes(mesh_report):
  message = mesh_report["bad_batch"]
  assert "--batch_size=12" in message and "8 batch shards" in message


def test_two_processes_agree_on_the_finetune_loss(tmp_path):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = [_spawn(["process", tmp_path / f"p{i}.json", port, i], 2) for i in range(2)]
  single = _spawn(["single", tmp_path / "single.json"], 4)
  for proc in (*procs, single):
    _finish(proc)
  p0, p1 = (json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2))
  assert p0["processes"] == p1["processes"] == 2 and p0["devices"] == 4
  assert p0["main"] and not p1["main"]
  assert p0["loss"] == p1["loss"]
  assert p0["loss"] == pytest.approx(json.loads((tmp_path / "single.json").read_text())["loss"], rel=RTOL)


# --- in this process: rules, flags and bad input --------------------------------------


def test_every_parameter_of_vit_and_wav2vec2_has_logical_axes():
  import jax
  import jax.numpy as jnp
  from acm_jax import acm as acm_lib
  from acm_jax import sharding
  from acm_jax.vit import model as vit
  from acm_jax.wav2vec2 import model as wav2vec2
  acm = acm_lib.ACMConfig(attention=True, gate_depth=2)
  for model, sample in ((vit.ViT(vit.get_config("tiny", acm=acm)), jnp.zeros((1, 32, 32, 3))),
                        (vit.ViT(vit.get_config("tiny")), jnp.zeros((1, 32, 32, 3))),
                        (wav2vec2.Wav2Vec2(wav2vec2.get_config("tiny", acm=acm)), jnp.zeros((1, 4000))),
                        (wav2vec2.Wav2Vec2(wav2vec2.get_config("base")), jnp.zeros((1, 4000)))):
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), sample)["params"])
    assert sharding.unnamed_params(params) == []


def test_rules_tables():
  import jax
  from acm_jax import sharding
  mesh = sharding.make_mesh("data:1")
  fake = lambda **sizes: type("M", (), {"shape": {"data": 1, "fsdp": 1, "tensor": 1, **sizes}})()
  spec = lambda path, shape, strategy, **sizes: sharding.spec_for(
      shape, sharding.logical_axes(path, len(shape)), fake(**sizes), sharding.STRATEGIES[strategy])
  P = jax.sharding.PartitionSpec
  assert spec("block_0/mlp/w1", (768, 3072), "dp", data=8) == P(None, None)
  assert spec("block_0/mlp/w1", (768, 3072), "fsdp", fsdp=8) == P("fsdp", None)
  assert spec("block_0/mlp/w2", (3072, 768), "tp", fsdp=2, tensor=4) == P("tensor", "fsdp")
  assert spec("block_0/attn/query/dense/kernel", (768, 768), "tp", tensor=4) == P(None, "tensor")
  assert spec("head/kernel", (768, 10), "fsdp", fsdp=4) == P("fsdp", None)
  assert spec("block_0/mlp/b2", (5, 768), "fsdp", fsdp=4) == P(None, "fsdp")
  assert spec("embedding/kernel", (16, 16, 3, 6), "fsdp", fsdp=4) == P(None, None, None, None)  # 6 % 4
  # optimizer state follows the parameter it ends with
  assert spec("opt_state/0/mu/block_0/mlp/w1", (768, 3072), "fsdp", fsdp=8) == P("fsdp", None)
  assert spec("opt_state/0/count", (), "fsdp", fsdp=8) == P()
  assert mesh.shape == {"data": 1, "fsdp": 1, "tensor": 1}
  assert sharding.parse_mesh("data:-1,fsdp:2", 8) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert sharding.parse_mesh("tensor:4", 4) == {"data": 1, "fsdp": 1, "tensor": 4}


@pytest.mark.parametrize("text, message", [
    ("data:4,fsdp:2", "has 8 devices but 1 are available"),
    ("data:2", "has 2 devices but 1"),
    ("model:1", "expected comma-separated axis:size"),
    ("data:x", "must be an integer"),
    ("data:-1,fsdp:-1", "at most one axis"),
    ("data:1,data:1", "given twice"),
    ("data:0", "must be >= 1"),
])
def test_bad_mesh_flags(text, message):
  from acm_jax import sharding
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(text)


@pytest.mark.parametrize("flags, message", [
    (["--mesh=data:2"], "has 2 devices but 1"),
    (["--sharding=zero3"], "--sharding: 'zero3' is not allowed; expected one of dp, fsdp, tp"),
    (["--num_processes=2", "--process_id=0"], "need all of --coordinator_address"),
    (["--coordinator_address=localhost", "--num_processes=2", "--process_id=0"], "must be host:port"),
    (["--coordinator_address=localhost:1", "--num_processes=2", "--process_id=2"], "--process_id must be in 0..1"),
])
def test_bad_flags_stop_before_compilation(tmp_path, capsys, flags, message):
  from experiments import vit_imagenet
  assert vit_imagenet.main([f"--workdir={tmp_path}", "--phase=pretrain", *flags]) == 2
  assert message in capsys.readouterr().err
  assert not any(tmp_path.iterdir())


def test_remat_gives_the_same_gradients():
  import jax
  import jax.numpy as jnp
  from acm_jax import acm as acm_lib
  from acm_jax.vit import model as vit
  cfg = vit.get_config("tiny", depth=2, acm=acm_lib.ACMConfig(gate_hidden=8))
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  params = vit.ViT(cfg).init(jax.random.key(0), images)["params"]

  def grads(remat):
    model = vit.ViT(dataclasses.replace(cfg, remat=remat))
    loss = lambda p: jnp.sum(model.apply({"params": p}, images, mode="gumbel", mutable=["acm"],
                                         rngs={"gumbel": jax.random.key(2)})[0] ** 2)
    return jax.jit(jax.grad(loss))(params)

  # recomputation reorders float32 sums: elements near zero differ by rounding at the scale of
  # their tensor (9e-6 seen in a tensor whose largest entry is 40), so the absolute tolerance
  # follows that scale; a wrong remat gradient differs at the scale of the values themselves
  for a, b in zip(jax.tree.leaves(grads(False)), jax.tree.leaves(grads(True))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(b).max())))


if __name__ == "__main__":
  sys.path.insert(0, str(ROOT))
  kind, out = sys.argv[1], sys.argv[2]
  if kind == "meshes":
    worker_meshes(out)
  elif kind == "process":
    worker_process(out, int(sys.argv[3]), int(sys.argv[4]))
  else:
    worker_single(out)
