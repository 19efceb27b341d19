"""The finetuning kernels (`pallas_kernels.weighted_act`, `pallas_kernels.soft_bias`) under meshes that
split the batch: every device runs them on its shard (`inference.per_shard`), and one finetune step of the
scanned ViT on data:8 and data:2,fsdp:4 equals the step on one device with XLA's fusions.

8 simulated CPU devices in a subprocess (this file as a script), as in test_sharding.py; the kernels run
in Pallas' interpret mode (`acm.act_kernel("interpret")`, `acm.soft_bias_kernel("interpret")`).
"""

import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MESHES = ("data:8", "data:2,fsdp:4")


def worker(out_path):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from acm_jax import acm, sharding, transformer
  from acm_jax import data as data_lib
  from acm_jax.acmize import flatten
  from acm_jax.train import phases, steps
  from acm_jax.train.config import ExperimentConfig
  from acm_jax.vit import model as vit
  from acm_jax.vit import task as vit_task
  from pallas_kernels import soft_bias, weighted_act

  calls = []  # (kernel, token count) of every kernel call traced

  def counted(name, fn):
    def wrapper(*args, **kwargs):
      calls.append((name, int(args[0].shape[0])))
      return fn(*args, **kwargs)
    return wrapper

  weighted_act.backward = counted("weighted_act.backward", weighted_act.backward)
  soft_bias.soft_bias_grads = counted("soft_bias_grads", soft_bias.soft_bias_grads)

  # 20 px images in 4 px patches: 26 tokens; 64 images = 8 per device on 8 devices, 208 tokens per shard
  info = data_lib.get_dataset_info("synthetic", image_size=20)
  config = ExperimentConfig(batch_size=64, eval_batch_size=64, image_size=20)
  dense = vit.ViTConfig(image_size=20, patch_size=4, dim=32, depth=2, num_heads=2, mlp_dim=64,
                        num_classes=info.num_classes, scan_blocks=True, remat="dots")
  model = dataclasses.replace(dense, acm=acm.ACMConfig(num_learners=4, gate_hidden=8, attention=True,
                                                       impl="xla")).validate()
  devices = jax.devices()

  def experiment(mesh, strategy, devs):
    return phases.Experiment(config, vit_task.vision_task(dense, model, jnp.float32), info,
                             sample_input=jnp.zeros((1, 20, 20, 3)), iterator=data_lib.make_iterator,
                             flops=lambda *_: {}, partitioner=sharding.Partitioner.from_flags(mesh, strategy, devs))

  def one_step(exp, params):
    tx = phases.optimizer(exp, "finetune", params, fast=functools.partial(phases.is_gate, exp.task.paths),
                          fast_lr_scale=30.0)
    step_fn = functools.partial(steps.finetune_step, exp.task, tx, steps.FinetuneWeights())
    state, step, batches = phases.prepare(exp, "finetune", params, tx, step_fn)
    batch = next(batches(0))
    state, _ = step(state, batch)  # the schedule's first learning rate is 0
    new, metrics = step(state, batch)
    return flatten(jax.device_get(new["params"])), float(metrics["loss"])

  reference = experiment("data:1", "dp", devices[:1])
  params = phases.init_params(reference, "acm", 0)
  with acm.act_kernel(False), acm.soft_bias_kernel(False):
    want, want_loss = one_step(reference, params)
  report = {"reference_loss": want_loss, "reference_calls": list(calls), "meshes": {}}
  before = flatten(jax.device_get(params))
  for mesh in MESHES:
    calls.clear()
    with acm.act_kernel("interpret"), acm.soft_bias_kernel("interpret"):
      got, loss = one_step(experiment(mesh, "fsdp" if "fsdp" in mesh else "dp", devices), params)
    diff = sum(float(np.sum((got[k] - want[k]) ** 2)) for k in want) ** 0.5
    norm = sum(float(np.sum(want[k] ** 2)) for k in want) ** 0.5
    moved = max(float(np.max(np.abs(want[k] - before[k]))) for k in want)
    report["meshes"][mesh] = {"loss": loss, "rel_diff": diff / norm, "moved": moved, "calls": sorted(set(calls))}
  Path(out_path).write_text(json.dumps(report))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp("kernel_meshes") / "report.json"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": str(ROOT)}
  proc = subprocess.run([sys.executable, __file__, str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=1500)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  return json.loads(out.read_text())


@pytest.mark.xdist_group("kernel_mesh_report")  # one run of the module fixture, in one worker
@pytest.mark.parametrize("mesh", MESHES)
def test_finetune_step_with_the_kernels_per_shard_equals_one_device(report, mesh):
  assert report["reference_calls"] == []  # the reference ran XLA's fusions
  got = report["meshes"][mesh]
  # each kernel traced on one shard's tokens: 8 images of 26 tokens
  assert got["calls"] == [["soft_bias_grads", 208], ["weighted_act.backward", 208]], got["calls"]
  assert got["loss"] == pytest.approx(report["reference_loss"], rel=1e-5)
  assert got["rel_diff"] < 1e-5 and got["moved"] > 1e-4, got


if __name__ == "__main__":
  sys.path.insert(0, str(ROOT))
  worker(sys.argv[1])
