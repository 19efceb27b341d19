"""Device meshes, logical parameter axes and their mapping to mesh axes.

One mesh with three named axes, always all present (size 1 when unused):
  data    pure data parallelism: the batch is split, parameters are replicated
  fsdp    the batch is split too, and under --sharding=fsdp/tp every parameter's
          `embed` axis (and optimizer state with it) is sharded over it
  tensor  under --sharding=tp the learner hidden axis `mlp` (hidden units of
          ACM learners and of dense MLPs) and the attention `heads` axis are
          split over it; the batch is replicated across it

Parameters get logical axis names from their '/'-joined paths (MaxText style),
so a model needs no annotations and the ViT and Wav2Vec2 share the rules; a
strategy is a table from logical names to mesh axes. Optimizer state follows
the parameters: its leaves end in the parameter's path and get the same names.
A dimension that a mesh axis does not divide stays replicated (e.g. a head of
10 classes, or the N+1 per-choice biases).

Scanned encoder blocks (`transformer.encoder_blocks`) stack each block parameter
on a leading axis under `blocks/`: that axis is the logical axis `layers`, which
no strategy shards, so under FSDP each scan iteration gathers one layer's slice.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from acm_jax.pytree import PyTree

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (pattern searched in the path, logical axes of the array), first match wins.
# ACM learners are stored as w1 (dim, N*h), b1 (N*h,), w2 (N*h, dim), b2 (N+1, dim)
# wherever they sit (MLP or attention projection); learner n owns a contiguous
# block of the hidden axis, so splitting `mlp` over `tensor` with size N gives
# every device whole learners.
PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"/gate/[^/]+/kernel$", ("gate_in", "gate_out")),
    (r"/gate/[^/]+/bias$", ("gate_out",)),
    (r"(^|/)w1$", ("embed", "mlp")),
    (r"(^|/)b1$", ("mlp",)),
    (r"(^|/)w2$", ("mlp", "embed")),
    (r"(^|/)b2$", ("choice", "embed")),
    (r"(^|/)(query|key|value)/dense/kernel$", ("embed", "heads")),
    (r"(^|/)(query|key|value)/dense/bias$", ("heads",)),
    (r"(^|/)out/dense/kernel$", ("heads", "embed")),
    (r"(^|/)out/dense/bias$", ("embed",)),
    (r"(^|/)fc1/kernel$", ("embed", "mlp")),
    (r"(^|/)fc1/bias$", ("mlp",)),
    (r"(^|/)fc2/kernel$", ("mlp", "embed")),
    (r"(^|/)fc2/bias$", ("embed",)),
    (r"(^|/)(ln\d+|\w*norm\w*)/(scale|bias)$", ("norm",)),
    (r"(^|/)head/kernel$", ("embed", "vocab")),
    (r"(^|/)head/bias$", ("vocab",)),
)
# The leading axis of every parameter under a scanned stack of blocks; never sharded.
LAYER_AXIS = "layers"
_STACKED = re.compile(r"(^|/)blocks/")
# The model families' own parameters (patch embedding, feature encoder, ...), added by
# `register_param_rules` when a family package is imported.
FAMILY_RULES: list[tuple[str, tuple[str | None, ...]]] = []


def register_param_rules(rules: Sequence[tuple[str, tuple[str | None, ...]]]) -> None:
  """Adds a model family's (pattern, logical axes) rules, after the shared ones."""
  FAMILY_RULES.extend(rule for rule in rules if rule not in FAMILY_RULES)

# Logical axis -> mesh axis (or axes). Names absent from a table are replicated;
# gates and norms are never sharded (a few thousand values per layer).
STRATEGIES: dict[str, dict[str, str | tuple[str, ...]]] = {
    "dp": {"batch": BATCH_AXES},
    "fsdp": {"batch": BATCH_AXES, "embed": "fsdp", "conv_out": "fsdp"},
    "tp": {"batch": BATCH_AXES, "embed": "fsdp", "conv_out": "fsdp", "mlp": "tensor", "heads": "tensor"},
}
# Where the devices go when --mesh is not given.
DEFAULT_MESH = {"dp": "data:-1", "fsdp": "fsdp:-1", "tp": "tensor:-1"}


def path_string(path: Sequence[Any]) -> str:
  """A jax key path as 'a/b/c' (dict keys, attribute names and indices alike)."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...] | None:
  """Logical axis names of the array at `path`, or None when no rule names it. Under a
  scanned stack (`blocks/`) the first axis is LAYER_AXIS and the rules name the rest."""
  if _STACKED.search(path):
    inner = logical_axes(_STACKED.sub(r"\1", path, count=1), ndim - 1)
    return None if inner is None else (LAYER_AXIS, *inner)
  for pattern, axes in (*PARAM_RULES, *FAMILY_RULES):
    if re.search(pattern, path):
      if len(axes) != ndim:
        raise ValueError(f"sharding rule {pattern!r} names {len(axes)} axes {axes} but {path!r} has {ndim}")
      return axes
  return None


def unnamed_params(params: PyTree) -> list[str]:
  """Paths of parameters that no rule names (they would stay replicated)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return [path_string(p) for p, leaf in flat if np.ndim(leaf) and logical_axes(path_string(p), np.ndim(leaf)) is None]


def parse_mesh(text: str, num_devices: int) -> dict[str, int]:
  """'data:4,fsdp:2' -> {"data": 4, "fsdp": 2, "tensor": 1}; one size may be -1 (the rest)."""
  sizes: dict[str, int] = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, sep, size = item.partition(":")
    if not sep or name not in MESH_AXES:
      raise ValueError(f"--mesh={text!r}: expected comma-separated axis:size with axes from {MESH_AXES}, "
                       f"e.g. 'data:4,fsdp:2'; got {item!r}")
    if name in sizes:
      raise ValueError(f"--mesh={text!r}: axis {name!r} given twice")
    try:
      sizes[name] = int(size)
    except ValueError:
      raise ValueError(f"--mesh={text!r}: size of {name!r} must be an integer, got {size!r}") from None
    if sizes[name] < 1 and sizes[name] != -1:
      raise ValueError(f"--mesh={text!r}: size of {name!r} must be >= 1 (or -1 for the remaining devices)")
  if not sizes:
    raise ValueError(f"--mesh={text!r} names no axis")
  free = [n for n, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f"--mesh={text!r}: at most one axis may be -1")
  known = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % known:
      raise ValueError(f"--mesh={text!r}: the fixed axes ({known} devices) do not divide the {num_devices} devices")
    sizes[free[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"--mesh={text!r} has {math.prod(sizes.values())} devices but {num_devices} are available "
                     f"({jax.process_count()} process(es) x {jax.local_device_count()} local); "
                     "make the product of the sizes match, or use -1 for one axis")
  return {name: sizes.get(name, 1) for name in MESH_AXES}


def make_mesh(text: str | None = None, strategy: str = "dp", devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: every device of every process).

  Devices keep jax's order (process-major), so with `tensor` and `fsdp` innermost
  they stay within a host where possible and the batch rows of a host are contiguous.
  """
  check_strategy(strategy)
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh(text or DEFAULT_MESH[strategy], len(devices))
  return Mesh(np.asarray(devices, dtype=object).reshape(tuple(sizes.values())), MESH_AXES)


def check_strategy(strategy: str) -> None:
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown --sharding={strategy!r}; expected one of {sorted(STRATEGIES)}")


def _mesh_axes_of(logical: str | None, rules: dict, mesh: Mesh) -> tuple[str, ...]:
  target = rules.get(logical) if logical is not None else None
  axes = (target,) if isinstance(target, str) else tuple(target or ())
  return tuple(a for a in axes if mesh.shape[a] > 1)


def spec_for(shape: Sequence[int], logical: Sequence[str | None] | None, mesh: Mesh, rules: dict) -> P:
  """PartitionSpec of an array; mesh axes that do not divide a dimension, or that an
  earlier dimension already uses, leave that dimension replicated."""
  if logical is None:
    return P()
  used: set[str] = set()
  spec = []
  for size, name in zip(shape, logical):
    axes = _mesh_axes_of(name, rules, mesh)
    if not axes or used & set(axes) or size % math.prod(mesh.shape[a] for a in axes):
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return P(*spec)


@dataclasses.dataclass(frozen=True)
class Partitioner:
  """A mesh and a strategy: shardings for any state pytree, batches and jitted steps."""
  mesh: Mesh
  strategy: str = "dp"

  def __post_init__(self):
    check_strategy(self.strategy)

  @classmethod
  def from_flags(cls, mesh: str | None = None, strategy: str = "dp",
                 devices: Sequence[jax.Device] | None = None) -> "Partitioner":
    return cls(make_mesh(mesh, strategy, devices), strategy)

  @property
  def rules(self) -> dict:
    return STRATEGIES[self.strategy]

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def batch_axes(self) -> tuple[str, ...]:
    return _mesh_axes_of("batch", self.rules, self.mesh)

  @property
  def batch_shards(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.batch_axes)

  def batch_sharding(self) -> NamedSharding:
    """Leading (batch) axis over the data axes; a prefix for any batch dict."""
    axes = self.batch_axes
    return NamedSharding(self.mesh, P(axes if len(axes) > 1 else (axes[0] if axes else None)))

  def check_batch_size(self, batch_size: int, flag: str = "--batch_size") -> None:
    if batch_size % self.batch_shards:
      raise ValueError(f"{flag}={batch_size} is not divisible by the {self.batch_shards} batch shards of the "
                       f"mesh {dict(self.mesh.shape)} (axes {self.batch_axes}); use a multiple of {self.batch_shards}")
    if batch_size % jax.process_count():
      raise ValueError(f"{flag}={batch_size} is not divisible by the {jax.process_count()} processes")

  def shardings(self, tree: PyTree) -> PyTree:
    """NamedSharding of every leaf (arrays or ShapeDtypeStructs), from its path."""
    def one(path, leaf):
      shape = np.shape(leaf)
      return NamedSharding(self.mesh, spec_for(shape, logical_axes(path_string(path), len(shape)),
                                               self.mesh, self.rules))
    return jax.tree_util.tree_map_with_path(one, tree)

  def put(self, tree: PyTree) -> PyTree:
    """Places arrays on the mesh: host arrays (every process passing the full
    values) and device arrays, including global ones from another mesh."""
    def one(x, sharding):
      if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
      host = np.asarray(x)
      return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return jax.tree.map(one, tree, self.shardings(tree))

  def create(self, fn: Callable[..., PyTree], *args) -> tuple[PyTree, PyTree]:
    """Runs `fn(*args)` (e.g. a state constructor) so that its outputs are born
    sharded, never whole on one device. Returns (outputs, their shardings)."""
    shardings = self.shardings(jax.eval_shape(fn, *args))
    with self.context():
      return jax.jit(fn, out_shardings=shardings)(*args), shardings

  def shard_batch(self, batch: dict, global_batch_size: int | None = None) -> dict:
    """Numpy batch -> global jax.Arrays split over the data axes.

    A process may pass its own rows only (global/processes of them) or, as the
    loaders do when every host reads the same stream, the whole global batch, of
    which it keeps its rows. Either way only local rows are copied to devices.
    """
    sharding = self.batch_sharding()
    out = {}
    for name, value in batch.items():
      value = np.asarray(value)
      rows = value.shape[0]
      total = global_batch_size or rows * jax.process_count()
      if rows == total and jax.process_count() > 1:
        value = value[self._local_rows(total)]
      elif rows * jax.process_count() != total:
        raise ValueError(f"batch[{name!r}] has {rows} rows; expected the global batch {total} or this process's "
                         f"share {total // jax.process_count()}")
      out[name] = jax.make_array_from_process_local_data(sharding, value, (total, *value.shape[1:]))
    return out

  def _local_rows(self, total: int) -> slice:
    index = self.batch_sharding().addressable_devices_indices_map((total,))
    starts = sorted({idx[0].start or 0 for idx in index.values()})
    stops = sorted({idx[0].stop if idx[0].stop is not None else total for idx in index.values()})
    if stops[-1] - starts[0] != total // jax.process_count():
      raise ValueError(f"this process's batch rows are not contiguous in the mesh {dict(self.mesh.shape)}")
    return slice(starts[0], stops[-1])

  def jit(self, fn: Callable, in_shardings, out_shardings, donate_argnums=()) -> Callable:
    """jax.jit with explicit shardings, traced and run with this mesh current (so
    code inside, e.g. the ACM kernels' shard_map, can find the batch axes)."""
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate_argnums)

    def call(*args):
      with self.context():
        return jitted(*args)
    call.lower = lambda *args: _with(self.context(), jitted.lower, *args)
    return call

  def context(self):
    return jax.set_mesh(self.mesh)


def _with(ctx, fn, *args):
  with ctx:
    return fn(*args)


def current_batch_axes() -> tuple[str, ...]:
  """Batch axes (size > 1) of the mesh current at trace time; () outside a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return ()
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)


# --- multi-process -------------------------------------------------------------------


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Starts jax.distributed from explicit flags, or from SLURM when launched by srun
  with more than one task. Returns whether this is a multi-process run. Must run
  before anything touches a device; a second call is a no-op."""
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if None in explicit:
      raise ValueError("multi-process runs need all of --coordinator_address (host:port), --num_processes and "
                       f"--process_id; got {coordinator_address!r}, {num_processes!r}, {process_id!r}")
    if ":" not in coordinator_address:
      raise ValueError(f"--coordinator_address must be host:port, got {coordinator_address!r}")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id must be in 0..{num_processes - 1} for --num_processes={num_processes}, "
                       f"got {process_id}")
    if num_processes == 1:
      return False
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in os.environ:
    jax.distributed.initialize()  # jax reads the coordinator, size and rank from SLURM
    return True
  return False
