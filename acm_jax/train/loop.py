"""The training loop shared by every phase: checkpoints, resume, progress, metrics.

A phase is a pure `step_fn(state, batch) -> (state, metrics)` over a state dict
{"step", "params", "opt_state", "rng"}. The loop restores the latest checkpoint
of the run directory if there is one, feeds the batches from that step on (so a
resumed run sees exactly the batches an uninterrupted one would), saves every
`checkpoint_every` steps and at the end, and finally writes the parameters alone
to `<run_dir>/params` for the next phase.

Preemption: SIGTERM (a scheduler's notice) or SIGINT (Ctrl-C) lets the current
step finish, saves that step, and raises `Stopped`; entry points exit with its
`status`, PREEMPTED_STATUS (75) after SIGTERM, INTERRUPTED_STATUS (130) after
Ctrl-C. The processes of a multi-process run agree on the step to save, so a
signal to any one of them stops all at the same step. Restarting the command
resumes there; saves that never committed (no orbax commit marker) are set aside.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import importlib
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from acm_jax import transformer
from acm_jax.acmize import flatten
from acm_jax.pytree import PyTree
from acm_jax.train.prefetch import Prefetch

# Batches the loop's background thread prepares ahead of the step (`acm_jax.train.prefetch`); 0: none,
# each batch is made when its step asks for it.
PREFETCH_DEPTH = 2

# How a save of the state reaches orbax (`save_args`; benchmarks/RESULTS.md, "Host memory of the
# loop's saves"):
#   "parts"  the state is copied on its devices (the next step may donate its buffers), and orbax's
#            write thread copies that copy to host memory and writes it, SAVE_PART_BYTES at a time
#            (`DeviceSnapshot`); where the device copy does not fit, the save takes "host" instead
#   "host"   the whole state is copied to host memory before `save` returns (`host_copy`)
#   "device" orbax is handed the device arrays and stages them itself
# None: "parts" when the state lives on accelerators of a single process, else "device" (tests
# stage CPU states to cover the other paths).
SAVE_STAGING: str | None = None
SAVE_STAGINGS = ("parts", "host", "device")
SAVE_PART_BYTES = 256 << 20

StepFn = Callable[[PyTree, dict], tuple[PyTree, dict]]


def is_main_process() -> bool:
  return jax.process_index() == 0


class MetricWriter:
  """JSON lines in `<run_dir>/metrics.jsonl`, and TensorBoard when tensorboardX is there."""

  def __init__(self, run_dir: Path, resume_step: int = 0):
    self._enabled = is_main_process()
    self._path = run_dir / "metrics.jsonl"
    self._tb = None
    if self._enabled and self._path.exists():
      self._truncate(resume_step)
    if self._enabled:
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(str(run_dir / "tb"))
      except ImportError:
        pass

  def _truncate(self, resume_step: int) -> None:
    """Drops the records of steps after `resume_step` (written before a crash or a SIGKILL
    cut the run short of its next checkpoint), which the resumed run writes again."""
    kept = []
    for line in self._path.read_text().splitlines():
      try:
        if json.loads(line)["step"] <= resume_step:
          kept.append(line + "\n")
      except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by a kill
        continue
    tmp = self._path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept))
    tmp.replace(self._path)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self._enabled:
      return
    with self._path.open("a") as f:
      f.write(json.dumps({"step": step, **metrics}) + "\n")
    if self._tb is not None:
      for name, value in metrics.items():
        self._tb.add_scalar(name, value, step)
      self._tb.flush()


# Exit statuses of a run stopped by a signal after saving its state. 75 is EX_TEMPFAIL
# (sysexits.h, "try again later"): a scheduler requeues on it (docs/cluster.md). A
# process killed outright by SIGTERM reports 143 (or -15), which is never mistaken for it.
PREEMPTED_STATUS = 75  # SIGTERM, or a peer process's signal in a multi-process run
INTERRUPTED_STATUS = 130  # Ctrl-C (SIGINT): the user stopped it; nothing to requeue
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Steps between the checks where the processes of a multi-process run agree to stop: each
# check waits for the step in flight (one collective), so not every step.
STOP_CHECK_EVERY = 10
# JAX's preemption service (on by default in jax.distributed) installs its own SIGTERM
# handler, which would take the signal from `stop_signals`; the loop agrees on the step itself.
jax.config.update("jax_enable_preemption_service", False)


class Stopped(KeyboardInterrupt):
  """Raised when SIGTERM or SIGINT stops the program; `status` is its exit status."""

  def __init__(self, signum: int, message: str = ""):
    super().__init__(message or f"stopped by {signal.Signals(signum).name}")
    self.signum = signum

  @property
  def status(self) -> int:
    return INTERRUPTED_STATUS if self.signum == signal.SIGINT else PREEMPTED_STATUS


class _StopRequest:
  """The first stop signal received, and whether a training loop defers it to the end of a step."""

  def __init__(self):
    self.signum: int | None = None
    self.deferring = 0
    self.installed = 0
    self.previous: dict[int, Any] = {}

  def handle(self, signum, frame):
    if self.signum is None:
      self.signum = signum
      if not self.deferring:  # nothing to save: stop now
        raise Stopped(signum)
    elif signum == signal.SIGINT:  # a second Ctrl-C stops at once (orbax commits a save whole or not at all)
      raise KeyboardInterrupt
    # a second SIGTERM is ignored: the save under way finishes unless the scheduler's SIGKILL comes first


_request = _StopRequest()


@contextlib.contextmanager
def stop_signals():
  """Handles SIGTERM and SIGINT while the block runs: inside `run` they stop the loop
  after the current step and a checkpoint of it, elsewhere at once, raising `Stopped`.
  Entry points wrap their whole work in it; `run` takes it too (nesting is fine).
  Off the main thread (where Python cannot handle signals) it does nothing."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  if not _request.installed:
    _request.signum = None
    _request.previous = {s: signal.signal(s, _request.handle) for s in STOP_SIGNALS}
  _request.installed += 1
  try:
    yield
  finally:
    _request.installed -= 1
    if not _request.installed:
      for s, handler in _request.previous.items():
        signal.signal(s, handler)
      _request.signum = None


@contextlib.contextmanager
def _deferred_stop():
  _request.deferring += 1
  try:
    yield
  finally:
    _request.deferring -= 1


def _agreed_stop(step: int, every: int = STOP_CHECK_EVERY) -> int | None:
  """The signal that stops every process before `step`, or None to go on. Alone, a
  process stops at the first step boundary after its signal; in a multi-process run
  they all decide together every STOP_CHECK_EVERY steps, so that every process saves
  the same step, even when only one of them received the signal."""
  if jax.process_count() == 1:
    return _request.signum
  if step % every:
    return None
  from jax.experimental import multihost_utils
  signums = multihost_utils.process_allgather(np.int32(_request.signum or 0))
  received = [int(s) for s in np.ravel(signums) if s]
  return received[0] if received else None


class HostCopy(np.ndarray):
  """A numpy array the loop copied from the device for one save and owns alone. orbax's numpy
  handler (0.12.x) deep-copies every array it is handed before writing it, which would double a
  save's host memory for nothing; the deep copy of this one is itself."""

  def __deepcopy__(self, memo):
    return self


def host_copy(tree: PyTree) -> PyTree:
  """`tree` with each jax array replaced by a numpy copy (`HostCopy`); other leaves as they are.

  How saves reach the host (benchmarks/RESULTS.md, "Host memory of the loop's saves ..."): handed
  the device arrays of the 1 GB ViT-B/16 finetune state, orbax took 4.2 GB of host memory (2 GB
  of it pinned buffers, which the runtime keeps for the rest of the process); these copies of the
  whole state take 1.4 GB, freed once written ("host" staging), and `SnapshotHandler` copies a
  device copy of the state through here a part at a time, 0.4 GB ("parts", the default on GPUs).
  Every transfer is started before the first is waited for. The shards are read through arrays
  of their own (`addressable_data`), so that the host copy numpy caches on the array it reads
  does not stay on the state's arrays. Single-process only: each array must be fully addressable.
  """
  leaves, treedef = jax.tree.flatten(tree)
  pieces = []
  for x in leaves:
    if isinstance(x, jax.Array):
      if not x.is_fully_addressable:
        raise ValueError(f"host_copy needs fully addressable arrays; got one of shape {x.shape} sharded "
                         f"over processes ({x.sharding})")
      if x.is_fully_replicated:
        own = [(tuple(slice(None) for _ in x.shape), x.addressable_data(0))]
      else:  # one shard per distinct index: replicas of it hold the same values
        own = [(s.index, x.addressable_data(i)) for i, s in enumerate(x.addressable_shards) if s.replica_id == 0]
      for _, data in own:
        data.copy_to_host_async()
      pieces.append(own)
    else:
      pieces.append(None)
  # a CPU array's numpy view aliases its buffer, which the next step may donate: copy it
  read = lambda a: np.array(a, copy=True) if next(iter(a.devices())).platform == "cpu" else np.asarray(a)
  copies = []
  for i, x in enumerate(leaves):
    own, pieces[i] = pieces[i], None  # drop each shard array once read
    if own is None:
      copies.append(x)
      continue
    if len(own) == 1:
      host = read(own[0][1])
    else:
      host = np.empty(x.shape, x.dtype)
      for index, data in own:
        host[index] = np.asarray(data)
    copies.append(host.view(HostCopy))
    del own, host
  return jax.tree.unflatten(treedef, copies)


class DeviceSnapshot:
  """A device copy of one state array, taken for one save and owned by it. orbax hands it to
  `SnapshotHandler`, which copies it to the host in its write thread and deletes it once copied."""

  def __init__(self, array: jax.Array):
    self.array: jax.Array | None = array
    self.shape, self.dtype, self.size, self.ndim = array.shape, array.dtype, array.size, array.ndim
    self.nbytes = array.nbytes

  def __deepcopy__(self, memo):  # orbax 0.12.4 deep-copies what its numpy handler writes
    return self

  def release(self) -> None:
    if self.array is not None:
      self.array.delete()
      self.array = None


def part_bounds(sizes: list[int], budget: int) -> list[tuple[int, int]]:
  """[start, stop) runs of consecutive items whose sizes add up to at most `budget`; an item larger
  than `budget` is a part of its own."""
  bounds, start, total = [], 0, 0
  for i, size in enumerate(sizes):
    if i > start and total + size > budget:
      bounds.append((start, i))
      start, total = i, 0
    total += size
  if sizes:
    bounds.append((start, len(sizes)))
  return bounds


class SnapshotHandler(ocp.type_handlers.NumpyHandler):
  """Writes `DeviceSnapshot`s as orbax's numpy handler writes numpy arrays (same files, same
  metadata: read back as any numpy leaf), at most SAVE_PART_BYTES of them in host memory at a
  time: a part is copied to the host, its device copies deleted, written, and dropped before the
  next part is copied."""

  async def _background_serialize(self, values, infos, args=None):
    args = list(args or [ocp.type_handlers.SaveArgs()] * len(values))
    for start, stop in part_bounds([v.nbytes for v in values], SAVE_PART_BYTES):
      part = values[start:stop]
      host = await asyncio.to_thread(host_copy, [v.array for v in part])
      for v in part:
        v.release()
      await super()._background_serialize(host, infos[start:stop], args[start:stop])
      del host


class _SnapshotRegistry:
  """orbax's global type registry with `DeviceSnapshot`s written by `SnapshotHandler`."""

  def __init__(self):
    self._handler = SnapshotHandler()

  def add(self, ty, handler, func=None, override=False):
    ocp.type_handlers.register_type_handler(ty, handler, func, override)

  def get(self, ty):
    if isinstance(ty, type) and issubclass(ty, DeviceSnapshot):
      return self._handler
    return ocp.type_handlers.get_type_handler(ty)

  def has(self, ty) -> bool:
    return (isinstance(ty, type) and issubclass(ty, DeviceSnapshot)) or ocp.type_handlers.has_type_handler(ty)


def device_snapshot(tree: PyTree) -> PyTree:
  """`tree` with each jax array replaced by a `DeviceSnapshot` of a copy of it on the same devices."""
  leaves, treedef = jax.tree.flatten(tree)
  arrays = [x for x in leaves if isinstance(x, jax.Array)]
  copies = iter(jax.device_put(arrays, [x.sharding for x in arrays], may_alias=False))  # one call, on the devices
  return jax.tree.unflatten(treedef, [DeviceSnapshot(next(copies)) if isinstance(x, jax.Array) else x for x in leaves])


def save_staging(state: PyTree) -> str:
  """SAVE_STAGING, or what None means for `state` (see SAVE_STAGING)."""
  if SAVE_STAGING is not None:
    if SAVE_STAGING not in SAVE_STAGINGS:
      raise ValueError(f"loop.SAVE_STAGING must be one of {SAVE_STAGINGS} or None, got {SAVE_STAGING!r}")
    return SAVE_STAGING
  arrays = [x for x in jax.tree.leaves(state) if isinstance(x, jax.Array)]
  on_accelerators = any(d.platform != "cpu" for x in arrays for d in x.devices())
  return "parts" if jax.process_count() == 1 and on_accelerators else "device"


def _staged(state: PyTree) -> PyTree:
  """What the loop hands orbax to save (see SAVE_STAGING)."""
  staging = save_staging(state)
  if staging == "parts":
    try:
      return device_snapshot(state)
    except jax.errors.JaxRuntimeError as error:  # the state's copy does not fit beside it
      if "RESOURCE_EXHAUSTED" not in str(error):
        raise
      logging.warning("save: no device memory for a copy of the state (%s); copying it all to the host", error)
      staging = "host"
  return host_copy(state) if staging == "host" else state


def checkpoint_handler() -> ocp.PyTreeCheckpointHandler:
  """How the loop writes its checkpoints and params: orbax's pytree format, uncompressed.
  Compressed, orbax holds compressed copies of the arrays until written (0.7 GB for a 1 GB
  state) and saves about 7% of the disk bytes of float weights and moments. Reads and is read
  by `ocp.StandardCheckpointer` (checkpoints written before 2026-12-02 restore as they were)."""
  return ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=_SnapshotRegistry())


def save_args(state: PyTree) -> ocp.args.PyTreeSave:
  return ocp.args.PyTreeSave(_staged(state))


def restore_args(abstract: PyTree) -> ocp.args.PyTreeRestore:
  """Restores onto the shardings of `abstract` (`jax.ShapeDtypeStruct`s)."""
  return ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


def release_freed_host_memory() -> None:
  """Hands memory the allocator keeps after large frees back to the system (glibc's
  `malloc_trim`; nothing elsewhere). Without it the host copies of a save stay resident, and so
  does the memory the compiler's threads used for the first step."""
  try:
    ctypes.CDLL(None).malloc_trim(0)
  except (OSError, AttributeError):
    pass


def params_dir(run_dir: str | Path) -> Path:
  return Path(run_dir).absolute() / "params"


def save_params(run_dir: str | Path, params: PyTree) -> None:
  path = params_dir(run_dir)
  with ocp.Checkpointer(checkpoint_handler()) as checkpointer:
    checkpointer.save(path, args=save_args(params), force=True)
  release_freed_host_memory()


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
  layout = transformer.layout_mismatch(found_flat, expected_flat) if missing or unexpected else None
  if layout is not None:
    raise ValueError(f"checkpoint {source} does not match the model: {layout}")
  if missing or unexpected:
    raise ValueError(f"checkpoint {source} does not match the model: missing {missing[:5]}"
                     f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                     f"{'...' if len(unexpected) > 5 else ''}")
  for key, shape in expected_flat.items():
    if found_flat[key] != shape:
      raise ValueError(f"checkpoint {source}: parameter {key!r} has shape {found_flat[key]}, "
                       f"the model expects {shape} (a checkpoint of another model shape?)")


def check_config(run_dir: str | Path, config_json: str, fields: Iterable[str]) -> None:
  """Stops with one message when `run_dir` holds state (checkpoints or params) of a run
  whose saved config.json differs from `config_json` in one of `fields`: resuming
  or reusing it would silently mix two configurations (or fail deep inside orbax)."""
  run_dir = Path(run_dir)
  saved_path = run_dir / "config.json"
  has_state = params_dir(run_dir).exists() or any(checkpoint_steps(run_dir / "checkpoints"))
  if not (saved_path.exists() and has_state):
    return
  try:
    saved = json.loads(saved_path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{saved_path} is not valid JSON ({e}); pass another --workdir or delete {run_dir}") from None
  requested = json.loads(config_json)
  saved = {**_class_defaults(saved.get("config_class"), fields), **saved}
  differ = [f for f in fields if f in saved and saved[f] != requested.get(f)]
  if differ:
    show = lambda v: "unset" if v is None else v
    shown = ", ".join(f"{f} {show(saved[f])} saved, {show(requested.get(f))} requested" for f in differ)
    flags = " ".join(f"--{f}={saved[f]}" for f in differ if saved[f] is not None)
    raise ValueError(f"{run_dir} holds a run of another configuration: {shown}. Pass another --workdir "
                     f"to start a new run, or the saved values to resume this one{f' ({flags})' if flags else ''}")


def _class_defaults(config_class: str | None, fields: Iterable[str]) -> dict[str, Any]:
  """JSON values of the defaults of `fields` in the dataclass named `config_class`
  ("module.Name", as `ExperimentConfig.to_json` writes it): a config.json written before a
  field existed was run with its default. Empty when the class cannot be imported."""
  if not config_class:
    return {}
  module, _, name = config_class.rpartition(".")
  try:
    cls = getattr(importlib.import_module(module), name)
    defaults = json.loads(json.dumps(dataclasses.asdict(cls())))
  except (ImportError, AttributeError, TypeError, ValueError):
    return {}
  return {f: defaults[f] for f in fields if f in defaults}


# orbax writes this file into a step directory just before it commits the step (a rename
# on local and network file systems; the file itself on object stores)
COMMIT_MARKER = "commit_success.txt"


def checkpoint_steps(directory: str | Path) -> tuple[list[int], list[Path]]:
  """The complete steps under `directory`, ascending, and the step directories of saves
  that never committed (orbax's `<step>.orbax-checkpoint-tmp*`, or a `<step>` without
  the commit marker)."""
  directory = Path(directory)
  complete, incomplete = [], []
  if directory.is_dir():
    for path in directory.iterdir():
      if path.name.isdigit() and (path / COMMIT_MARKER).exists():
        complete.append(int(path.name))
      elif path.name.split(".")[0].isdigit():
        incomplete.append(path)
  return sorted(complete), sorted(incomplete)


def _newest_complete_step(run_dir: Path, name: str) -> int | None:
  """The step to resume from. Incomplete saves move to `<run_dir>/incomplete_checkpoints/`,
  out of orbax's way (it would take an uncommitted `<step>` for a finished one)."""
  complete, incomplete = checkpoint_steps(run_dir / "checkpoints")
  newest = complete[-1] if complete else None
  if incomplete and is_main_process():
    aside = run_dir / "incomplete_checkpoints"
    aside.mkdir(exist_ok=True)
    for path in incomplete:
      target = aside / f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}"
      path.rename(target)
      step = int(path.name.split(".")[0])
      if newest is None or step > newest:
        resume = f"step {newest}" if newest is not None else "the start"
        print(f"[{name}] skipped the checkpoint of step {step} in {path.parent}: incomplete (no commit "
              f"marker, a save cut short); moved it to {target}; resuming from {resume}", file=sys.stderr)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"acm_jax set aside incomplete checkpoints of {run_dir}")
  return newest


@contextlib.contextmanager
def _quiet_orbax():
  """A failing orbax restore logs a traceback from each of its threads; the one-line error says it all."""
  loggers = [logging.getLogger(n) for n in ("absl", "asyncio", "orbax")]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


def _restore(manager: ocp.CheckpointManager, step: int, state: PyTree) -> PyTree:
  path = Path(manager.directory) / str(step)
  try:
    found = ocp.StandardCheckpointer().metadata(path / "default").item_metadata  # the optimizer state mirrors params
    check_same_structure(jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), dict(found["params"])),
                         state["params"], str(path))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    with _quiet_orbax():
      return manager.restore(step, args=restore_args(abstract))
  except ValueError:
    raise
  except Exception as e:  # orbax's errors span screens; the first line names the cause
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(f"cannot restore the checkpoint of step {step} at {path}: {first}. Move that directory "
                     "away to resume from an earlier step, or pass another --workdir") from None


def run(*, name: str, run_dir: str | Path, state: PyTree, step_fn: StepFn,
        batches: Callable[[int], Iterator[dict]], num_steps: int, checkpoint_every: int = 200,
        log_every: int = 50, config_json: str | None = None, resume_fields: Iterable[str] = ()) -> PyTree:
  """Runs `step_fn` until `state["step"] == num_steps`, resuming if possible.

  `batches(start_step)` must yield the batches of steps start_step, start_step+1, ...
  A run dir holding state of a config that differs from `config_json` in one of
  `resume_fields` is refused (`check_config`). SIGTERM or SIGINT stops the loop
  after the current step and a checkpoint of it, raising `Stopped`. Returns the final state.
  """
  run_dir = Path(run_dir).absolute()
  if config_json is not None:
    check_config(run_dir, config_json, resume_fields)
  run_dir.mkdir(parents=True, exist_ok=True)
  if config_json is not None and is_main_process():
    (run_dir / "config.json").write_text(config_json)
  with stop_signals(), _deferred_stop(), contextlib.ExitStack() as stack:
    latest = _newest_complete_step(run_dir, name)
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    with ocp.CheckpointManager(run_dir / "checkpoints", options=options,
                               item_handlers=checkpoint_handler()) as manager:
      if latest is not None:
        state = _restore(manager, latest, state)
        if is_main_process():
          print(f"[{name}] resuming from step {latest} in {run_dir}")
      start = int(state["step"])
      if start >= num_steps:
        if not params_dir(run_dir).exists():
          save_params(run_dir, state["params"])
        return state
      writer = MetricWriter(run_dir, resume_step=start)
      data = batches(start)
      if callable(getattr(data, "close", None)):  # a generator's `finally` stops its input workers
        stack.callback(data.close)
      if PREFETCH_DEPTH > 0:  # host batches assembled ahead, in a thread
        data = stack.enter_context(Prefetch(data, PREFETCH_DEPTH))
      bar = tqdm(total=num_steps, desc=name, initial=start, disable=not is_main_process(), dynamic_ncols=True)
      pending, tic, saved, written = [], time.time(), latest, True
      for step in range(start, num_steps + 1):
        signum = _agreed_stop(step, every=1 if step == num_steps else STOP_CHECK_EVERY)
        if signum is not None or step == num_steps:
          if pending:  # the steps since the last record, so that none goes unlogged
            writer.write(step, _means(pending, tic))
          # the input workers and prefetched batches go before the save needs host memory
          stack.close()
          if saved != step:
            manager.save(step, args=save_args(state), force=True)
          manager.wait_until_finished()
          release_freed_host_memory()
          bar.close()
          if step == num_steps:
            break
          message = (f"[{name}] {signal.Signals(signum).name}: saved step {step} to {run_dir / 'checkpoints'}; "
                     "run the same command again to resume")
          print(f"\n{message}" if jax.process_count() == 1 else f"\nprocess {jax.process_index()}: {message}",
                file=sys.stderr, flush=True)
          raise Stopped(signum, message)
        state, metrics = step_fn(state, next(data))
        if step == start:  # the step's compilation is over: what its compiler threads freed goes back
          release_freed_host_memory()
        pending.append(metrics)
        bar.update()
        done = step + 1
        if done % log_every == 0 and done < num_steps:
          means = _means(pending, tic)
          writer.write(done, means)
          bar.set_postfix({k: f"{v:.4g}" for k, v in means.items() if k != "steps_per_s"})
          pending, tic = [], time.time()
        if done % checkpoint_every == 0 and done < num_steps:
          manager.save(done, args=save_args(state))
          saved, written = done, False
        if not written and not manager.is_saving_in_progress():
          release_freed_host_memory()  # the save's host copies, once written
          written = True
    save_params(run_dir, state["params"])
  signum = _agreed_stop(num_steps, every=1)  # a signal during the final save stops before the next phase
  if signum is not None:
    raise Stopped(signum, f"[{name}] {signal.Signals(signum).name}: finished and saved")
  return state


def _means(pending: list[dict], tic: float) -> dict[str, float]:
  means = {k: float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]}
  means["steps_per_s"] = len(pending) / max(time.time() - tic, 1e-9)
  return means
