"""XLA flags that let collectives overlap compute on GPUs (issue #22), not enabled anywhere yet;
and the entry points' host-memory default for the GPU client (`host_memory_defaults`).

`overlap_flags()` adds the flags of `GPU_OVERLAP_FLAGS` to XLA_FLAGS (latency-hiding
scheduler, pipelined all-gather / reduce-scatter / all-reduce, while-loop double
buffering), keeping every flag the user already set. It must run before JAX first
touches a device: XLA reads XLA_FLAGS once, when the backend starts.

Not called by any entry point on purpose: which of these flags help (and which this
jaxlib even knows: XLA aborts at start-up on an unknown flag) has to be measured flag
by flag on several GPUs before an entry point enables them:
`python3 -m benchmarks.scaling_bench --flag_sweep --models=acm --modes=fsdp --scan` runs that
measurement (only one-GPU machines were lent so far).
"""

from __future__ import annotations

import os
import shlex
import warnings
from typing import MutableMapping

GPU_OVERLAP_FLAGS: dict[str, str] = {
    "--xla_gpu_enable_latency_hiding_scheduler": "true",
    "--xla_gpu_enable_pipelined_all_gather": "true",
    "--xla_gpu_enable_pipelined_reduce_scatter": "true",
    "--xla_gpu_enable_pipelined_all_reduce": "true",
    "--xla_gpu_enable_while_loop_double_buffering": "true",
}


def parse_flags(text: str) -> dict[str, str | None]:
  """'--a=1 --b' -> {"--a": "1", "--b": None}."""
  flags = {}
  for item in shlex.split(text):
    name, sep, value = item.partition("=")
    flags[name] = value if sep else None
  return flags


def overlap_flags(environ: MutableMapping[str, str] = os.environ,
                  wanted: dict[str, str] = GPU_OVERLAP_FLAGS) -> list[str]:
  """Appends each flag of `wanted` that XLA_FLAGS does not set; returns the ones added.

  A flag the user set to another value keeps the user's value, with a warning that names
  the flag, the user's value and ours (a bare `--flag` counts as "true").
  """
  current = environ.get("XLA_FLAGS", "")
  user = parse_flags(current)
  added = []
  for name, value in wanted.items():
    if name not in user:
      added.append(f"{name}={value}")
      continue
    theirs = "true" if user[name] is None else user[name]
    if theirs.lower() != value.lower():
      warnings.warn(f"XLA_FLAGS sets {name}={theirs}; the collective-overlap setting is {name}={value}. "
                    "Keeping yours.", stacklevel=2)
  if added:
    environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
  return added


def host_memory_defaults(environ: MutableMapping[str, str] = os.environ) -> bool:
  """Sets XLA_PYTHON_CLIENT_PREALLOCATE=false unless the environment sets it; True if set here.

  The entry points call this before JAX starts its backend. Preallocating 75% of an H200's
  memory (about 104 GB) cost the process 3.3 GB of host RSS when the GPU client started
  (measured 2026-12-02: 0.6 -> 3.96 GB at the first array, against 0.67 GB without
  preallocation), more than the rest of a 224 px ViT-B/16 run. Growing the device pool on
  demand keeps the host side small; the step times it gives are in benchmarks/RESULTS.md.
  Set XLA_PYTHON_CLIENT_PREALLOCATE=true (or a XLA_PYTHON_CLIENT_MEM_FRACTION) to preallocate.
  """
  if "XLA_PYTHON_CLIENT_PREALLOCATE" in environ or "XLA_PYTHON_CLIENT_MEM_FRACTION" in environ:
    return False
  environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  return True
