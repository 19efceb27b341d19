"""How the loop stages its saves (`loop.SAVE_STAGING`): every staging writes checkpoints that restore
to the saved values, in each other's format and in orbax's standard one; "parts" holds at most
`SAVE_PART_BYTES` of host copies at a time and deletes its device copies once copied."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acm_jax.train import loop  # noqa: E402


def random_state(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {"params": {f"w{i}": jnp.asarray(rng.standard_normal((16, 9 + i), np.float32)) for i in range(6)},
          "half": jnp.asarray(rng.standard_normal((5, 3)), jnp.bfloat16),
          "step": jnp.int32(int(rng.integers(1, 1000))), "count": 7}


def abstract(state: dict) -> dict:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def assert_same(restored: dict, state: dict) -> None:
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(restored)):
    assert np.asarray(got).dtype == np.asarray(want).dtype, path
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(path))


def save(directory: Path, state: dict, staging: str) -> dict:
  """Saves `state` as the loop does under `staging`; returns what was handed to orbax."""
  loop.SAVE_STAGING = staging
  try:
    with ocp.CheckpointManager(directory, item_handlers=loop.checkpoint_handler()) as manager:
      args = loop.save_args(state)
      manager.save(1, args=args)
      manager.wait_until_finished()
  finally:
    loop.SAVE_STAGING = None
  return args.item


@pytest.mark.parametrize("staging", loop.SAVE_STAGINGS)
def test_every_staging_restores_the_saved_values(tmp_path, staging):
  state = random_state()
  handed = save(tmp_path, state, staging)
  kinds = {type(x) for x in jax.tree.leaves(handed) if not isinstance(x, int)}
  assert kinds == {"parts": {loop.DeviceSnapshot}, "host": {loop.HostCopy}, "device": {type(state["step"])}}[staging]
  with ocp.CheckpointManager(tmp_path, item_handlers=loop.checkpoint_handler()) as manager:
    restored = manager.restore(1, args=loop.restore_args(abstract(state)))
  assert_same(restored, state)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored["params"]))
  # orbax's own reader, without the loop's handler, reads the same files
  assert_same(ocp.StandardCheckpointer().restore(tmp_path / "1" / "default"), state)


def test_checkpoints_of_orbaxs_standard_save_still_restore(tmp_path):
  state = random_state(1)
  with ocp.CheckpointManager(tmp_path) as manager:
    manager.save(1, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
  with ocp.CheckpointManager(tmp_path, item_handlers=loop.checkpoint_handler()) as manager:
    assert_same(manager.restore(1, args=loop.restore_args(abstract(state))), state)


def test_parts_hold_at_most_the_budget_and_release_the_device_copies(tmp_path, monkeypatch):
  state = random_state(2)
  sizes = [x.nbytes for x in jax.tree.leaves(state) if isinstance(x, jax.Array)]
  budget = 2 * max(sizes) - 1  # never two of the largest arrays together
  monkeypatch.setattr(loop, "SAVE_PART_BYTES", budget)
  parts = []
  real = loop.host_copy
  monkeypatch.setattr(loop, "host_copy", lambda arrays: parts.append([a.nbytes for a in arrays]) or real(arrays))
  handed = save(tmp_path, state, "parts")
  assert sorted(n for part in parts for n in part) == sorted(sizes)
  assert len(parts) > 1 and all(sum(part) <= budget or len(part) == 1 for part in parts), parts
  snapshots = [x for x in jax.tree.leaves(handed) if isinstance(x, loop.DeviceSnapshot)]
  assert len(snapshots) == len(sizes) and all(s.array is None for s in snapshots)
  # the state's own arrays are untouched by the deleted copies
  with ocp.CheckpointManager(tmp_path, item_handlers=loop.checkpoint_handler()) as manager:
    assert_same(manager.restore(1, args=loop.restore_args(abstract(state))), state)
  assert_same(state, random_state(2))


def test_part_bounds_are_greedy_runs_under_the_budget():
  rng = np.random.default_rng(3)
  for _ in range(200):
    sizes = rng.integers(1, 50, rng.integers(0, 12)).tolist()
    budget = int(rng.integers(1, 80))
    bounds = loop.part_bounds(sizes, budget)
    assert [i for a, b in bounds for i in range(a, b)] == list(range(len(sizes)))
    for j, (a, b) in enumerate(bounds):
      assert b > a
      assert sum(sizes[a:b]) <= budget or b - a == 1
      if j + 1 < len(bounds):  # the next item would not have fitted
        assert sum(sizes[a:b + 1]) > budget


def test_a_device_copy_that_does_not_fit_falls_back_to_host_copies(monkeypatch, caplog):
  state = random_state(4)

  def exhausted(tree):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1024 bytes.")

  monkeypatch.setattr(loop, "device_snapshot", exhausted)
  monkeypatch.setattr(loop, "SAVE_STAGING", "parts")
  staged = loop.save_args(state).item
  assert isinstance(staged["params"]["w0"], loop.HostCopy)
  assert_same(staged, state)
  assert "no device memory for a copy of the state" in caplog.text


def test_an_unknown_staging_is_refused(monkeypatch):
  monkeypatch.setattr(loop, "SAVE_STAGING", "disk")
  with pytest.raises(ValueError, match="SAVE_STAGING must be one of .*'disk'"):
    loop.save_args(random_state())


def test_cpu_states_of_one_process_are_handed_over_as_they_are():
  assert loop.save_staging(random_state()) == "device"
