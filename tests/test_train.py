"""Every phase end to end on tiny shapes, resume after Ctrl-C, and bad input."""

import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from acm_jax import data as data_lib
from acm_jax import transformer
from acm_jax.acmize import acmize, flatten, unflatten
from acm_jax.train import config as config_lib
from acm_jax.train import loop, phases
from acm_jax.vit import task as vit_task
from experiments import vit_imagenet

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model=tiny", "--batch_size=16", "--eval_batch_size=32", "--eval_examples=64",
        "--pretrain_steps=6", "--distill_steps=4", "--gates_steps=4", "--finetune_steps=4",
        "--log_every=2", "--checkpoint_every=3", "--gate_hidden=8"]


def run_main(workdir, *extra):
  return vit_imagenet.main([f"--workdir={workdir}", *TINY, *extra])


def test_all_phases_write_results(tmp_path, capsys):
  assert run_main(tmp_path, "--phase=all") == 0
  table = capsys.readouterr().out
  assert "acm_b0.50" in table and "static_k2" in table
  for run in ("pretrain", "distill", "gates", "finetune_b0.50", "static_k2"):
    assert (tmp_path / run / "params").is_dir()
    assert json.loads((tmp_path / run / "config.json").read_text())["budget"] == 0.5
    lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] in (4, 6)
  acm = json.loads((tmp_path / "finetune_b0.50" / "eval.json").read_text())
  for key in ("model", "top1", "gflops_per_image", "mean_k_per_layer", "k_share_per_layer"):
    assert key in acm
  assert set(acm["mean_k_per_layer"]) == {f"block_{i}/mlp" for i in range(4)}
  for share in acm["k_share_per_layer"].values():
    assert sum(share) == pytest.approx(1.0) and len(share) == 5
  assert set(acm["mean_k_per_group"]) == {"object", "background"}
  dense = json.loads((tmp_path / "pretrain" / "eval.json").read_text())
  static = json.loads((tmp_path / "static_k2" / "eval.json").read_text())
  assert static["mean_k_per_layer"] == {p: 2.0 for p in acm["mean_k_per_layer"]}
  assert static["gflops_per_image"] < dense["gflops_per_image"]
  errors = json.loads((tmp_path / "distill" / "distill_errors.json").read_text())
  assert all(len(e) == 5 for e in errors.values())
  labels = json.loads((tmp_path / "gates" / "label_distribution.json").read_text())
  assert all(sum(v) == pytest.approx(1.0) for v in labels.values())
  # a second eval of the finished runs reuses them and gives the same numbers
  assert run_main(tmp_path, "--phase=eval") == 0
  assert json.loads((tmp_path / "static_k2" / "eval.json").read_text())["top1"] == static["top1"]


def test_eval_top1_matches_direct_computation(tmp_path):
  assert run_main(tmp_path, "--phase=pretrain") == 0
  cfg = config_lib.ExperimentConfig(workdir=str(tmp_path), eval_examples=64, eval_batch_size=32,
                                    gate_hidden=8)
  exp = vit_task.build(cfg)
  params = phases.dense_params(exp)
  record = phases.evaluate(exp, params, "dense", "dense")
  batches = list(data_lib.make_iterator("synthetic", "test", 64))
  images, labels = batches[0]["image"][:64], batches[0]["label"][:64]
  logits = exp.task.dense_model.apply({"params": params}, images)
  assert record["top1"] == pytest.approx(float(np.mean(np.argmax(logits, -1) == labels)))
  assert record["examples"] == 64
  # each image's correctness, in test order, for paired comparisons; a padded last batch drops its padding
  np.testing.assert_array_equal(vit_task.decode_correct(record), np.argmax(logits, -1) == labels)
  exp40 = vit_task.build(dataclasses.replace(cfg, eval_examples=40))
  record40 = phases.evaluate(exp40, params, "dense", "dense")
  assert record40["examples"] == 40
  np.testing.assert_array_equal(vit_task.decode_correct(record40), (np.argmax(logits, -1) == labels)[:40])


def test_resume_after_interrupt_gives_identical_params(tmp_path, monkeypatch):
  args = ["--phase=pretrain", "--pretrain_steps=8", "--checkpoint_every=100"]
  assert run_main(tmp_path / "straight", *args) == 0
  # interrupt after a few steps: the data iterator raises SIGINT in this process
  original = data_lib.make_iterator

  def interrupting(*a, **kw):
    for i, batch in enumerate(original(*a, **kw)):
      if i == 5 and kw.get("start_step") == 0:
        os.kill(os.getpid(), signal.SIGINT)
      yield batch

  monkeypatch.setattr(data_lib, "make_iterator", interrupting)
  assert run_main(tmp_path / "resumed", *args) == 130
  monkeypatch.setattr(data_lib, "make_iterator", original)
  saved = sorted(p.name for p in (tmp_path / "resumed" / "pretrain" / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and int(saved[-1]) < 8
  assert run_main(tmp_path / "resumed", *args) == 0
  cfg = config_lib.ExperimentConfig(gate_hidden=8)
  expected = phases.init_params(vit_task.build(cfg), "dense", 0)
  a = flatten(loop.load_params(tmp_path / "straight" / "pretrain", expected, "pretrain"))
  b = flatten(loop.load_params(tmp_path / "resumed" / "pretrain", expected, "pretrain"))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_uint8_train_batches_train_exactly_as_float_batches(tmp_path, monkeypatch):
  """The ViT task's synthetic train batches travel as uint8 and are normalised in the step; with
  the host's float32 batches instead the trained params are the same to the bit."""
  import dataclasses
  args = ["--phase=pretrain", "--pretrain_steps=4", "--checkpoint_every=100"]
  seen = []
  original = phases.train_batches

  def recording(exp, *a, **kw):
    seen.append(exp.uint8_images)
    return original(exp, *a, **kw)

  monkeypatch.setattr(phases, "train_batches", recording)
  assert run_main(tmp_path / "uint8", *args) == 0
  monkeypatch.setattr(phases, "train_batches",
                      lambda exp, *a, **kw: recording(dataclasses.replace(exp, uint8_images=False), *a, **kw))
  assert run_main(tmp_path / "float", *args) == 0
  assert seen == [True, False]
  expected = phases.init_params(vit_task.build(config_lib.ExperimentConfig(gate_hidden=8)), "dense", 0)
  a = flatten(loop.load_params(tmp_path / "uint8" / "pretrain", expected, "pretrain"))
  b = flatten(loop.load_params(tmp_path / "float" / "pretrain", expected, "pretrain"))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_ctrl_c_in_a_real_process_leaves_a_restorable_checkpoint(tmp_path):
  cmd = [sys.executable, "-m", "experiments.vit_imagenet", "--phase=pretrain", f"--workdir={tmp_path}",
         *TINY, "--pretrain_steps=100000", "--checkpoint_every=1000000"]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = tmp_path / "pretrain" / "metrics.jsonl"
  deadline = time.time() + 120
  while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
    time.sleep(0.5)
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 130, out
  assert "SIGINT: saved step" in out
  steps_saved = [int(p.name) for p in (tmp_path / "pretrain" / "checkpoints").iterdir() if p.name.isdigit()]
  assert steps_saved and max(steps_saved) >= 4


@pytest.mark.parametrize("flags, message", [
    (["--phase=prune"], "argument --phase: 'prune' is not allowed; expected one of pretrain, distill"),
    (["--model=vit_x"], "argument --model: 'vit_x' is not allowed; expected one of tiny, vit_s16"),
    (["--budget=0"], "budget must be in"),
    (["--budget=1.5"], "budget must be in"),
    (["--image_size=30"], "not divisible by patch_size"),
    (["--num_learners=5"], "does not divide"),
    (["--learner_width=100"], "does not fit"),
    (["--dataset=nope"], "nope"),
    (["--init=/does/not/exist.npz"], "does not exist"),
    (["--phase=distill"], "run that phase first"),
    (["--phase=finetune"], "run that phase first"),
    (["--phase=eval"], "nothing to evaluate"),
])
def test_bad_input_stops_before_work_with_a_clear_message(tmp_path, capsys, flags, message):
  assert run_main(tmp_path, *flags) == 2
  assert message in capsys.readouterr().err
  assert not any(p.name == "checkpoints" for p in tmp_path.rglob("*"))


def test_checkpoint_of_another_model_shape_is_rejected(tmp_path, capsys):
  assert run_main(tmp_path, "--phase=pretrain") == 0
  assert run_main(tmp_path, "--phase=distill", "--num_classes=7") == 2
  err = capsys.readouterr().err  # config.json tells first
  assert "num_classes unset saved, 7 requested" in err and "another --workdir" in err
  (tmp_path / "pretrain" / "config.json").unlink()  # params alone: their shapes tell
  assert run_main(tmp_path, "--phase=distill", "--num_classes=7") == 2
  err = capsys.readouterr().err
  assert "head/" in err and "another model shape" in err and "(7,)" in err



def test_mixed_batches_train_and_official_switches_reach_the_steps(tmp_path):
  """Mixup / cutmix batches go through the sharded pretrain step (one step, tiny); the switches
  of the public code reach the step functions."""
  from acm_jax import cli, registry
  args, cfg = cli.parse(registry.get("vit"), [f"--workdir={tmp_path}", *TINY, "--augment=light", "--mixup=0.8",
                                              "--cutmix=1.0", "--label_smoothing=0.1", "--gate_task_gradient=false",
                                              "--label_rule=official"])
  exp = vit_task.build(cfg)
  params = phases.init_params(exp, "dense", 0)
  tx = phases.optimizer(exp, "pretrain", params)
  step = functools.partial(phases.steps.pretrain_step, exp.task, tx, cfg.label_smoothing)
  state, jitted, batches = phases.prepare(exp, "pretrain", params, tx, step)
  batch = next(batches(0))
  assert {"mix_label", "mix_weight"} <= set(batch)
  _, metrics = jitted(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  assert not cfg.gate_task_gradient and cfg.label_rule == "official"


def test_acm_params_equal_acmize_of_the_old_init_up_to_the_gates_draws():
  """`phases.acm_params` against the definition it replaces, acmize(dense, init_params(acm)):
  the same tree, shapes and dtypes, the same values everywhere but the gate kernels (random
  draws from other keys, of the same scale); scanned blocks get the unrolled model's params."""
  def experiment(scan):
    return vit_task.build(config_lib.ExperimentConfig(
        model="tiny", dataset="synthetic", acm_attention=True, gate_depth=3, gate_hidden=8, batch_size=8,
        eval_batch_size=8, budget_conditioning=True, scan_blocks=scan))

  exp = experiment(False)
  dense = phases.init_params(exp, "dense", 0)
  old = flatten(acmize(dense, phases.init_params(exp, "acm", 3), exp.task.paths, num_learners=4))
  new = flatten(phases.acm_params(exp, dense, 3))
  assert sorted(new) == sorted(old)
  drawn = [k for k in old if "/gate/" in k and k.endswith("kernel") and "budget_film" not in k]
  assert len(drawn) == 3 * len(exp.task.paths)
  for k in old:
    assert (new[k].shape, new[k].dtype) == (old[k].shape, old[k].dtype), k
    if k not in drawn:
      np.testing.assert_array_equal(new[k], old[k], err_msg=k)
  assert all(not np.array_equal(new[k], old[k]) for k in drawn)
  assert len({np.asarray(new[k]).tobytes() for k in drawn}) == len(drawn)  # every gate its own draw
  for layer in ("hidden_0", "hidden_1", "out"):
    std = lambda params: np.std(np.concatenate([np.ravel(params[k]) for k in drawn if f"/{layer}/" in k]))
    assert std(new) == pytest.approx(std(old), rel=0.1), layer

  scanned = experiment(True)
  stacked = phases.acm_params(scanned, transformer.stack_blocks(dense), 3)
  got = flatten(stacked)
  want = flatten(transformer.stack_blocks(unflatten(new)))
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # the budget conditioning added to plain stacked params: zeros, where the ACM model has it
  plain = phases.without_budget_film(stacked)
  again = flatten(phases.with_budget_film(scanned, plain))
  assert sorted(again) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(again[k], want[k], err_msg=k)


@pytest.mark.parametrize("flag, scan, grouped", [("auto", False, False), ("auto", True, True),
                                                 ("true", False, True), ("false", True, False)])
def test_group_qkv_gates_flag_reaches_the_acm_config(flag, scan, grouped):
  exp = vit_task.build(config_lib.ExperimentConfig(model="tiny", dataset="synthetic", acm_attention=True,
                                                   scan_blocks=scan, group_qkv_gates=flag))
  assert exp.task.acm_model.config.acm.group_qkv_gates is grouped
  with pytest.raises(ValueError, match="group_qkv_gates must be one of"):
    config_lib.ExperimentConfig(group_qkv_gates="sometimes").validate()


def test_eval_keeps_only_small_batch_entries_for_host_metrics():
  rng = np.random.default_rng(5)
  batch = {"image": rng.random((4, 64, 64, 3)), "label": rng.integers(0, 9, 4), "valid": np.ones(4, bool),
           "label_ids": rng.integers(0, 9, (4, 200))}
  assert set(phases._host_view(batch)) == {"label", "valid", "label_ids"}
