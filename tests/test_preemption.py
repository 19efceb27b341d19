"""SIGTERM at any step of any phase: the step finishes and is saved, the run exits 75 and
resumes exactly; saves cut short are skipped; two processes save the same step."""

import dataclasses
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from acm_jax import data as data_lib  # noqa: E402
from acm_jax.acmize import flatten  # noqa: E402
from acm_jax.train import config as config_lib  # noqa: E402
from acm_jax.train import loop, phases  # noqa: E402
from acm_jax.vit import task as vit_task  # noqa: E402
from conftest import CACHE_ENV  # noqa: E402
from experiments import vit_imagenet  # noqa: E402

TINY = ["--model=tiny", "--batch_size=16", "--eval_batch_size=32", "--eval_examples=64",
        "--pretrain_steps=6", "--distill_steps=4", "--gates_steps=4", "--finetune_steps=4",
        "--log_every=1", "--checkpoint_every=3", "--gate_hidden=8"]
RUNS = {"pretrain": 6, "distill": 4, "gates": 4, "finetune_b0.50": 4, "static_k2": 4}  # run dir: steps


def run_main(workdir, *extra):
  return vit_imagenet.main([f"--workdir={workdir}", *TINY, *extra])


@functools.cache
def expected_params(model: str) -> dict:
  """The shapes a run of TINY saves: the same for every run here, so traced once per model."""
  exp = vit_task.build(config_lib.ExperimentConfig(gate_hidden=8))
  return phases.abstract_params(exp, model)


def final_params(run_dir: Path, model: str) -> dict:
  return flatten(loop.load_params(run_dir, expected_params(model), run_dir.name))


def assert_same_params(a_dir: Path, b_dir: Path, model: str) -> None:
  a, b = final_params(a_dir, model), final_params(b_dir, model)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=f"{b_dir.name}: {key}")


def logged_steps(run_dir: Path) -> list[int]:
  return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def complete_steps(run_dir: Path) -> list[int]:
  return loop.checkpoint_steps(run_dir / "checkpoints")[0]


def signal_at(batch_index: int, signum: int, start_step: int = 0, nth: int = 0, original=data_lib.make_iterator):
  """`make_iterator` that sends `signum` to this process when the `nth` train iterator
  starting at `start_step` yields its `batch_index`-th batch (a resumed phase starts later)."""
  fired, started = [], []

  def iterator(*args, **kwargs):
    fire = not fired and args[1] == "train" and kwargs.get("start_step", 0) == start_step
    if fire:
      started.append(None)
      fire = len(started) == nth + 1
    for i, batch in enumerate(original(*args, **kwargs)):
      if fire and i == batch_index:
        fired.append(i)
        os.kill(os.getpid(), signum)
      yield batch

  return iterator


def test_sigterm_in_every_phase_resumes_exactly(tmp_path, monkeypatch, capsys):
  # batches made when their step asks for them, so that the signal at batch `at` lands in step `at` of
  # the phase under test (with the prefetch thread a phase may stop at step 0, and the next restart's
  # resumed iterator of that phase would then take the signal meant for the next phase)
  monkeypatch.setattr(loop, "PREFETCH_DEPTH", 0)
  assert run_main(tmp_path / "straight", "--phase=all") == 0
  rng = np.random.default_rng()
  stops = {}
  for run, steps in RUNS.items():  # each restart finishes the phase stopped before, then stops the next
    at = int(rng.integers(0, steps - 1))  # the signal lands while step `at` is being prepared
    monkeypatch.setattr(data_lib, "make_iterator", signal_at(at, signal.SIGTERM))
    assert run_main(tmp_path / "resumed", "--phase=all") == loop.PREEMPTED_STATUS, (run, at)
    stops[run] = at + 1
    assert complete_steps(tmp_path / "resumed" / run)[-1] == at + 1, (run, at)
    assert f"SIGTERM: saved step {at + 1}" in capsys.readouterr().err
  monkeypatch.undo()
  assert run_main(tmp_path / "resumed", "--phase=all") == 0, stops
  for run, steps in RUNS.items():
    assert_same_params(tmp_path / "straight" / run, tmp_path / "resumed" / run, "dense" if run == "pretrain" else "acm")
    assert logged_steps(tmp_path / "resumed" / run) == list(range(1, steps + 1)), (run, stops)


def test_sigterm_with_the_prefetch_thread_resumes_exactly(tmp_path, monkeypatch, capsys):
  """The loop's prefetch thread makes batch `at` while the loop runs one of the PREFETCH_DEPTH + 1
  steps before it; the loop stops after the step it is at, and the resumed run equals the straight one.
  The interrupted run saves its state in parts from a device copy (`loop.SAVE_STAGING`, as on a GPU)
  and resumes from them: equal to the straight run, which saves the CPU arrays themselves."""
  assert loop.PREFETCH_DEPTH > 0
  assert run_main(tmp_path / "straight", "--phase=pretrain") == 0
  at = 4
  monkeypatch.setattr(data_lib, "make_iterator", signal_at(at, signal.SIGTERM))
  monkeypatch.setattr(loop, "SAVE_STAGING", "parts")
  assert run_main(tmp_path / "resumed", "--phase=pretrain") == loop.PREEMPTED_STATUS
  saved = complete_steps(tmp_path / "resumed" / "pretrain")[-1]
  assert at - loop.PREFETCH_DEPTH <= saved <= at + 1, saved
  assert f"SIGTERM: saved step {saved}" in capsys.readouterr().err
  monkeypatch.undo()
  monkeypatch.setattr(loop, "SAVE_STAGING", "parts")
  assert run_main(tmp_path / "resumed", "--phase=pretrain") == 0
  assert_same_params(tmp_path / "straight" / "pretrain", tmp_path / "resumed" / "pretrain", "dense")
  assert logged_steps(tmp_path / "resumed" / "pretrain") == list(range(1, RUNS["pretrain"] + 1))


HOST_COPY_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from acm_jax.train import loop
mesh = jax.make_mesh((2, 2), ("data", "model"))
rng = np.random.default_rng(0)
values = {"split": rng.standard_normal((6, 8), np.float32), "rows": rng.standard_normal((4, 3)).astype(jnp.bfloat16),
          "replicated": rng.standard_normal((5,), np.float32), "step": np.int32(7)}
specs = {"split": P("data", "model"), "rows": P("model"), "replicated": P(), "step": P()}
tree = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in values.items()}
values["one_device"] = rng.standard_normal((3, 2), np.float32)
tree["one_device"] = jax.device_put(values["one_device"], jax.devices()[1])
tree["plain"] = 3.5
copies = loop.host_copy(tree)
assert all(x._npy_value is None for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)), "host copy cached"
for k, v in values.items():
  copy = copies[k]
  assert isinstance(copy, np.ndarray) and copy.dtype == v.dtype, (k, type(copy), copy.dtype)
  np.testing.assert_array_equal(copy, v, err_msg=k)
  assert not any(np.shares_memory(copy, np.asarray(s.data)) for s in tree[k].addressable_shards), k
assert copies["plain"] == 3.5
import copy as copy_lib  # orbax deep-copies numpy arrays it saves; the loop's own copies are not copied again
assert copy_lib.deepcopy(copies["split"]) is copies["split"]
snaps = loop.device_snapshot(tree)
for k, v in tree.items():
  if isinstance(v, jax.Array):
    s = snaps[k].array
    assert s.sharding.is_equivalent_to(v.sharding, v.ndim), (k, s.sharding, v.sharding)
    assert not any(a.data.unsafe_buffer_pointer() == b.data.unsafe_buffer_pointer()
                   for a, b in zip(s.addressable_shards, v.addressable_shards)), k
import orbax.checkpoint as ocp, tempfile
loop.SAVE_PART_BYTES = 100  # every array a part of its own
with ocp.CheckpointManager(tempfile.mkdtemp(), item_handlers=loop.checkpoint_handler()) as manager:
  manager.save(1, args=ocp.args.PyTreeSave(snaps))
  manager.wait_until_finished()
  assert all(snaps[k].array is None for k, v in tree.items() if isinstance(v, jax.Array)), "device copies kept"
  abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) if isinstance(v, jax.Array) else v
              for k, v in tree.items()}
  restored = manager.restore(1, args=loop.restore_args(abstract))
for k, v in values.items():
  assert restored[k].sharding.is_equivalent_to(tree[k].sharding, tree[k].ndim), k
  np.testing.assert_array_equal(np.asarray(restored[k]), v, err_msg=k)
print("host copies equal")
"""


def test_host_copy_of_sharded_arrays():
  """`loop.host_copy` on arrays split, partly replicated and replicated over 4 devices: numpy
  copies equal to the values put there, sharing no memory with the devices' buffers (the next
  step may donate those), no host copy cached on the arrays. `loop.device_snapshot` of them: copies
  on the same shardings in buffers of their own, saved in parts, deleted once written, and
  restored onto the shardings with the values put there."""
  env = {**os.environ, **CACHE_ENV, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "PYTHONPATH": str(ROOT)}
  out = subprocess.run([sys.executable, "-c", HOST_COPY_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and "host copies equal" in out.stdout, out.stderr[-3000:]


def test_sigterm_in_a_baseline_of_the_sweep_resumes_exactly(tmp_path, monkeypatch):
  from experiments import compare
  import orbax.checkpoint as ocp
  flags = ["--model=tiny", "--image_size=16", "--batch_size=8", "--eval_batch_size=32", "--eval_examples=32",
           "--pretrain_steps=3", "--finetune_steps=3", "--log_every=1", "--checkpoint_every=100",
           "--methods=early_exit", "--thresholds=0.5"]
  assert compare.main([f"--workdir={tmp_path / 'straight'}", *flags]) == 0
  monkeypatch.setattr(loop, "PREFETCH_DEPTH", 0)  # batch 1 made while step 1 is prepared: the stop is exact
  monkeypatch.setattr(data_lib, "make_iterator", signal_at(1, signal.SIGTERM, nth=1))  # nth 0: pretrain
  assert compare.main([f"--workdir={tmp_path / 'resumed'}", *flags]) == loop.PREEMPTED_STATUS
  assert complete_steps(tmp_path / "resumed" / "early_exit") == [2]
  monkeypatch.undo()
  assert compare.main([f"--workdir={tmp_path / 'resumed'}", *flags]) == 0
  a, b = (flatten(ocp.StandardCheckpointer().restore(loop.params_dir(tmp_path / run / "early_exit")))
          for run in ("straight", "resumed"))
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert logged_steps(tmp_path / "resumed" / "early_exit") == [1, 2, 3]


# --- a second signal during the save, a kill during the save, bad work dirs ----------


def child(mode: str, workdir: str, start: str, at: str) -> None:
  """Pretraining (from step `start`) that signals itself at batch `at` of its train iterator;
  when orbax is about to commit a step, `second` sends SIGTERM again and `kill` SIGKILL."""
  from orbax.checkpoint._src.path import atomicity
  data_lib.make_iterator = signal_at(int(at), signal.SIGTERM, int(start))
  loop.PREFETCH_DEPTH = 0  # the signal at batch `at` lands while step `at` is prepared
  commit = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM if mode == "second" else signal.SIGKILL)
    time.sleep(0.5)  # the main thread handles the signal while the commit waits
    return await commit(self, *args, **kwargs)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize
  sys.exit(run_main(workdir, "--phase=pretrain", "--pretrain_steps=12", "--checkpoint_every=1000"))


def _child(mode, workdir, start, at):
  env = {**os.environ, **CACHE_ENV, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  return subprocess.run([sys.executable, __file__, mode, str(workdir), str(start), str(at)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_saves_survive_a_second_signal_and_a_kill(tmp_path, capsys):
  args = ("--phase=pretrain", "--pretrain_steps=12", "--checkpoint_every=1000")
  assert run_main(tmp_path / "straight", *args) == 0
  work = tmp_path / "resumed"
  first = _child("second", work, 0, 3)  # SIGTERM before step 3, SIGTERM again while step 4 commits
  assert first.returncode == loop.PREEMPTED_STATUS, first.stderr[-3000:]
  assert complete_steps(work / "pretrain") == [4] and loop.checkpoint_steps(work / "pretrain" / "checkpoints")[1] == []
  killed = _child("kill", work, 4, 2)  # resumes at 4, SIGTERM before step 6, SIGKILL while step 7 commits
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert complete_steps(work / "pretrain") == [4] and loop.checkpoint_steps(work / "pretrain" / "checkpoints")[1]
  shutil.copytree(work, tmp_path / "corrupt")
  capsys.readouterr()
  assert run_main(work, *args) == 0
  err = capsys.readouterr().err
  assert "skipped the checkpoint of step 7" in err and "resuming from step 4" in err, err
  assert_same_params(tmp_path / "straight" / "pretrain", work / "pretrain", "dense")
  assert logged_steps(work / "pretrain") == list(range(1, 13))

  # a work dir of another configuration: one message, before any restore
  assert run_main(work, *args, "--image_size=16", "--seed=3") == 2
  err = capsys.readouterr().err
  assert "image_size unset saved, 16 requested, seed 0 saved, 3 requested" in err, err
  assert "another --workdir" in err and "--seed=0" in err
  # a committed step whose files are damaged: one line, no orbax traceback
  corrupt = tmp_path / "corrupt" / "pretrain" / "checkpoints" / "4" / "default"
  for path in corrupt.rglob("*"):
    if path.is_file() and path.parent.name == "d":
      path.write_bytes(b"")
  assert run_main(tmp_path / "corrupt", *args) == 2
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "cannot restore the checkpoint of step 4" in lines[0], err
  assert "Traceback" not in err


# --- two processes: one is signalled, both save the same step ------------------------


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _pair(workdir: Path, steps: int) -> list[subprocess.Popen]:
  port = _free_port()
  env = {**os.environ, **CACHE_ENV, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  logs = [open(workdir.parent / f"{workdir.name}_{i}.log", "w") for i in range(2)]
  return [subprocess.Popen([sys.executable, "-m", "experiments.vit_imagenet", "--phase=pretrain", f"--workdir={workdir}",
                            *TINY, f"--pretrain_steps={steps}", "--checkpoint_every=1000",
                            "--coordinator_address=127.0.0.1:%d" % port, "--num_processes=2", f"--process_id={i}"],
                           cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
          for i, log in enumerate(logs)]


def _wait(procs, timeout=300) -> list[int]:
  return [p.wait(timeout=timeout) for p in procs]


def test_two_processes_save_the_same_step_when_one_is_signalled(tmp_path):
  steps = 60
  straight = _pair(tmp_path / "straight", steps)
  resumed = _pair(tmp_path / "resumed", steps)
  metrics = tmp_path / "resumed" / "pretrain" / "metrics.jsonl"
  deadline = time.time() + 240
  while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
    time.sleep(0.05)
  resumed[1].send_signal(signal.SIGTERM)  # process 1 only
  codes = _wait(resumed)
  logs = [(tmp_path / f"resumed_{i}.log").read_text() for i in range(2)]
  assert codes == [loop.PREEMPTED_STATUS] * 2, logs[0][-3000:] + logs[1][-3000:]
  saved = [int(log.split("SIGTERM: saved step ")[1].split()[0]) for log in logs]
  assert saved[0] == saved[1] < steps and saved[0] % loop.STOP_CHECK_EVERY == 0, saved
  assert complete_steps(tmp_path / "resumed" / "pretrain")[-1] == saved[0]
  assert _wait(_pair(tmp_path / "resumed", steps)) == [0, 0]
  assert _wait(straight) == [0, 0]
  assert_same_params(tmp_path / "straight" / "pretrain", tmp_path / "resumed" / "pretrain", "dense")
  assert logged_steps(tmp_path / "resumed" / "pretrain") == list(range(1, steps + 1))


if __name__ == "__main__":
  child(*sys.argv[1:])


def test_a_saved_config_without_a_newer_field_counts_as_its_default(tmp_path):
  """A run saved before a field existed ran with the field's default: asking for another value
  is refused, asking for the default resumes."""
  from acm_jax.train.config import ExperimentConfig
  default = ExperimentConfig()
  saved = json.loads(default.to_json())
  del saved["budget_weight_power"]  # as written before the flag existed
  run_dir = tmp_path / "finetune"
  loop.params_dir(run_dir).mkdir(parents=True)
  (run_dir / "config.json").write_text(json.dumps(saved))
  fields = ["budget_weight_power", "seed"]
  loop.check_config(run_dir, default.to_json(), fields)  # the default: no complaint
  other = dataclasses.replace(default, budget_weight_power=1.5)
  with pytest.raises(ValueError, match=r"budget_weight_power 0(\.0)? saved, 1\.5 requested"):
    loop.check_config(run_dir, other.to_json(), fields)
