"""Checks on a GPU that a checkpoint saved in parts (`loop.SAVE_STAGING = "parts"`) holds the state of
its step while donated steps keep running: the device copy is taken before the next step may donate
the state's buffers, and orbax's write thread copies it to the host while those steps run.

    python3 -m benchmarks.save_race_check [--staging=parts]

A 1 GiB state of 64 float32 arrays and a step counter is advanced 60 times by a jitted step that
donates it; steps 10 and 30 are saved with the loop's `save_args` and checkpoint handler, and their
host copies taken before the save are compared with the restored checkpoints, bit for bit. Prints
"OK" or the arrays that differ, and exits 1 on a difference.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from acm_jax.train import loop


@functools.partial(jax.jit, donate_argnums=0)
def _step(state: dict) -> dict:
  return {k: (v + 1 if k == "step" else v * 1.0001 + 0.5) for k, v in state.items()}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--staging", default="parts", choices=loop.SAVE_STAGINGS, help="loop.SAVE_STAGING")
  loop.SAVE_STAGING = parser.parse_args(argv).staging
  keys = jax.random.split(jax.random.key(0), 64)
  state = {f"w{i}": jax.random.normal(k, (2048, 2048), jnp.float32) for i, k in enumerate(keys)}
  state["step"] = jnp.int32(0)
  print(f"staging: {loop.save_staging(state)} on {jax.devices()[0].device_kind}", flush=True)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  bad = {}
  with tempfile.TemporaryDirectory() as directory, ocp.CheckpointManager(
      directory, item_handlers=loop.checkpoint_handler(), options=ocp.CheckpointManagerOptions(max_to_keep=5)) as manager:
    expected = {}
    for i in range(1, 61):
      state = _step(state)
      if i in (10, 30):
        expected[i] = {k: np.asarray(v).copy() for k, v in state.items()}
        tic = time.perf_counter()
        manager.save(i, args=loop.save_args(state))
        print(f"save {i} returned after {time.perf_counter() - tic:.3f} s", flush=True)
    jax.block_until_ready(state)
    manager.wait_until_finished()
    for i, want in expected.items():
      got = manager.restore(i, args=loop.restore_args(abstract))
      bad[i] = [k for k in want if not np.array_equal(np.asarray(got[k]), want[k])]
      print(f"step {i}: {len(want) - len(bad[i])} of {len(want)} arrays equal {bad[i][:5] or ''}", flush=True)
  ok = not any(bad.values())
  print("OK" if ok else "MISMATCH")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
