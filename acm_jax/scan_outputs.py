"""Scans whose stacked outputs XLA allocates without filling them first (issue #22).

`lax.scan` builds each stacked output (its `ys`, and under `jax.grad` the residuals a scanned
layer saves for the backward pass) as a buffer of zeros that the loop then overwrites slice
by slice (`jax._src.lax.control_flow.loops._empty_array`, jax 0.10 to 0.12). XLA merges the
identical zero broadcasts into one and copies it into every buffer: for the scanned ViT-B/16
training step at batch 256 on an H200 that is 8 stacks of 0.9 to 3.7 GB filled with copied
zeros in every step (28 `copy` instructions in the compiled step; 150 in the ACM finetune step).

JAX has the primitive that avoids this, `lax.empty`, which lowers to XLA's `AllocateBuffer` on
GPU and TPU (memory taken, nothing written); its scan does not use it yet (a TODO in its
source waits on "AllocateBuffer issues"). `uninitialised()` makes scans lowered inside it
allocate their stacked outputs with `lax.empty`; every slice is written by the loop before
it is read, so results do not change (tested: CPU values, and the GPU step's loss bit for bit).
Measured (RESULTS.md, 2026-12-03, `benchmarks.train_bench --scan_outputs zeros|auto`, one H200):
scanned ViT-B/16 dense step 92.32 -> 89.15 ms, mlp_qkvo finetune step 128.07 -> 123.17 ms at
batch 256 (25.91 -> 24.77 and 41.16 -> 39.69 ms at 64).

It replaces a private JAX function while active, so it checks that the function is there with
the expected signature and otherwise leaves scans as they are (with a warning). Scans inside
`shard_map` with varying manual axes and outputs placed in another memory space keep JAX's
zeros. Only lowering is affected: wrap the first call (or `.lower()`) of a jitted function.
On one device only by default in the entry points (`enable_for_process`): AllocateBuffer's
placement under SPMD partitioning is not measured here.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import threading
import warnings
from typing import Iterator

import jax

try:  # private: absent or changed in some jax version -> no patch
  from jax._src.lax.control_flow import loops as _loops
except ImportError:  # pragma: no cover
  _loops = None

_ORIGINAL = getattr(_loops, "_empty_array", None)
_LOCK = threading.Lock()
_DEPTH = 0


def supported() -> bool:
  """Whether this jax has the scan helper the patch replaces, with its expected arguments."""
  if _ORIGINAL is None:
    return False
  try:
    return list(inspect.signature(_ORIGINAL).parameters) == ["prefix", "length_spec", "aval"]
  except (TypeError, ValueError):  # pragma: no cover
    return False


def _keeps_zeros(aval) -> bool:
  """Outputs JAX's zeros stay for: varying manual axes (shard_map), another memory space."""
  varying = getattr(getattr(aval, "mat", None), "varying", None) or getattr(aval, "vma", None)
  space = getattr(aval, "memory_space", None)
  return bool(varying) or (space is not None and "device" not in str(space).lower()
                           and "any" not in str(space).lower())


def _empty_array(prefix, length_spec, aval):
  zeros = _ORIGINAL(prefix, length_spec, aval)  # JAX's own buffer: its shape and dtype (dead code after)
  if _keeps_zeros(aval):
    return zeros
  return jax.lax.empty(zeros.shape, zeros.dtype)


@contextlib.contextmanager
def uninitialised() -> Iterator[bool]:
  """Within the context, scans lowered allocate their stacked outputs unfilled; yields whether
  the patch is active (False, with a warning, on a jax without the expected helper). Nests."""
  global _DEPTH
  if not supported():
    warnings.warn("this jax has no loops._empty_array(prefix, length_spec, aval); scans keep their "
                  "zero-filled outputs", stacklevel=3)
    yield False
    return
  with _LOCK:
    _DEPTH += 1
    _loops._empty_array = _empty_array
  try:
    yield True
  finally:
    with _LOCK:
      _DEPTH -= 1
      if _DEPTH == 0:
        _loops._empty_array = _ORIGINAL


_PROCESS = contextlib.ExitStack()
atexit.register(_PROCESS.close)  # restored before interpreter teardown clears this module's globals


def enable_for_process(devices: int | None = None) -> bool:
  """The entry points' default: unfilled scan outputs for the rest of the process when it runs
  on one GPU (`devices`: jax.device_count() when None); True if enabled."""
  devices = jax.device_count() if devices is None else devices
  if devices != 1 or jax.default_backend() != "gpu" or not supported():
    return False
  return _PROCESS.enter_context(uninitialised())


def active() -> bool:
  return _loops is not None and getattr(_loops, "_empty_array", None) is _empty_array
