"""The training loop shared by every phase: checkpoints, resume, progress, metrics.

A phase is a pure `step_fn(state, batch) -> (state, metrics)` over a state dict
{"step", "params", "opt_state", "rng"}. The loop restores the latest checkpoint
of the run directory if there is one, feeds the batches from that step on (so a
resumed run sees exactly the batches an uninterrupted one would), saves every
`checkpoint_every` steps, on Ctrl-C and at the end, and finally writes the
parameters alone to `<run_dir>/params` for the next phase.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from acm_jax.acmize import flatten
from acm_jax.pytree import PyTree

StepFn = Callable[[PyTree, dict], tuple[PyTree, dict]]


def is_main_process() -> bool:
  return jax.process_index() == 0


class MetricWriter:
  """JSON lines in `<run_dir>/metrics.jsonl`, and TensorBoard when tensorboardX is there."""

  def __init__(self, run_dir: Path):
    self._enabled = is_main_process()
    self._path = run_dir / "metrics.jsonl"
    self._tb = None
    if self._enabled:
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(str(run_dir / "tb"))
      except ImportError:
        pass

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self._enabled:
      return
    with self._path.open("a") as f:
      f.write(json.dumps({"step": step, **metrics}) + "\n")
    if self._tb is not None:
      for name, value in metrics.items():
        self._tb.add_scalar(name, value, step)
      self._tb.flush()


@contextlib.contextmanager
def deferred_interrupt():
  """Turns Ctrl-C into a flag checked between steps, so a step is never cut in half
  (its input state is donated, so only a finished step's state can be saved)."""
  requested = threading.Event()
  if threading.current_thread() is not threading.main_thread():
    yield requested
    return
  previous = signal.getsignal(signal.SIGINT)

  def handler(signum, frame):
    if requested.is_set():  # a second Ctrl-C stops at once
      signal.signal(signal.SIGINT, previous)
      raise KeyboardInterrupt
    requested.set()

  signal.signal(signal.SIGINT, handler)
  try:
    yield requested
  finally:
    signal.signal(signal.SIGINT, previous)


def params_dir(run_dir: str | Path) -> Path:
  return Path(run_dir).absolute() / "params"


def save_params(run_dir: str | Path, params: PyTree) -> None:
  path = params_dir(run_dir)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, params, force=True)
  checkpointer.wait_until_finished()


def load_params(run_dir: str | Path, expected: PyTree, what: str) -> PyTree:
  """Restores `<run_dir>/params`, checking every name and shape against `expected`
  (arrays or `jax.ShapeDtypeStruct`s; only shapes and dtypes are used).

  `what` names the producing phase in the error ("the distill phase"). Returns
  numpy arrays, whatever the topology the params were saved from (a run
  trained on a GPU evaluates on a CPU).
  """
  path = params_dir(run_dir)
  if not path.exists():
    raise FileNotFoundError(f"no finished {what} checkpoint at {path}; run that phase first")
  checkpointer = ocp.StandardCheckpointer()
  found = checkpointer.metadata(path).item_metadata
  check_same_structure(jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), dict(found)),
                       expected, str(path))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda e: jax.ShapeDtypeStruct(np.shape(e), e.dtype, sharding=device), expected)
  # host arrays: the caller places them (and a donated train state never aliases them)
  return jax.tree.map(np.asarray, checkpointer.restore(path, target))


def check_same_structure(found: PyTree, expected: PyTree, source: str) -> None:
  found_flat = {k: np.shape(v) for k, v in flatten(found).items()}
  expected_flat = {k: np.shape(v) for k, v in flatten(expected).items()}
  missing = sorted(set(expected_flat) - set(found_flat))
  unexpected = sorted(set(found_flat) - set(expected_flat))
  if missing or unexpected:
    raise ValueError(f"checkpoint {source} does not match the model: missing {missing[:5]}"
                     f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                     f"{'...' if len(unexpected) > 5 else ''}")
  for key, shape in expected_flat.items():
    if found_flat[key] != shape:
      raise ValueError(f"checkpoint {source}: parameter {key!r} has shape {found_flat[key]}, "
                       f"the model expects {shape} (a checkpoint of another model shape?)")


def run(*, name: str, run_dir: str | Path, state: PyTree, step_fn: StepFn,
        batches: Callable[[int], Iterator[dict]], num_steps: int, checkpoint_every: int = 200,
        log_every: int = 50, config_json: str | None = None) -> PyTree:
  """Runs `step_fn` until `state["step"] == num_steps`, resuming if possible.

  `batches(start_step)` must yield the batches of steps start_step, start_step+1, ...
  Returns the final state.
  """
  run_dir = Path(run_dir).absolute()
  run_dir.mkdir(parents=True, exist_ok=True)
  if config_json is not None and is_main_process():
    (run_dir / "config.json").write_text(config_json)
  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
  with ocp.CheckpointManager(run_dir / "checkpoints", options=options) as manager:
    latest = manager.latest_step()
    if latest is not None:
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
      state = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
      if is_main_process():
        print(f"[{name}] resuming from step {latest} in {run_dir}")
    start = int(state["step"])
    if start >= num_steps:
      if not params_dir(run_dir).exists():
        save_params(run_dir, state["params"])
      return state
    writer = MetricWriter(run_dir)
    data = batches(start)
    bar = tqdm(range(start, num_steps), desc=name, initial=start, total=num_steps,
               disable=not is_main_process(), dynamic_ncols=True)
    pending, tic = [], time.time()
    with deferred_interrupt() as interrupted:
      for step in bar:
        if interrupted.is_set():
          manager.save(step, args=ocp.args.StandardSave(state), force=True)
          manager.wait_until_finished()
          bar.close()
          print(f"\n[{name}] interrupted: saved step {step} to {run_dir / 'checkpoints'}; "
                "run the same command again to resume")
          raise KeyboardInterrupt
        state, metrics = step_fn(state, next(data))
        pending.append(metrics)
        done = step + 1
        if done % log_every == 0 or done == num_steps:
          means = {k: float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]}
          means["steps_per_s"] = len(pending) / max(time.time() - tic, 1e-9)
          writer.write(done, means)
          bar.set_postfix({k: f"{v:.4g}" for k, v in means.items() if k != "steps_per_s"})
          pending, tic = [], time.time()
        if done % checkpoint_every == 0 and done < num_steps:
          manager.save(done, args=ocp.args.StandardSave(state))
    manager.save(num_steps, args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()
  save_params(run_dir, state["params"])
  return state
