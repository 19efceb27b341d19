"""JAX's persistent compilation cache for the entry points: a restarted run (after a preemption, or
the next phase of the same model) reads its compiled steps from disk instead of compiling them again.

`--compilation_cache` of the experiments:
  auto   (default) on a GPU, `$XDG_CACHE_HOME/acm_jax/jax` (~/.cache/acm_jax/jax); nothing on the CPU,
         where the embedded runs' steps compile in seconds. A cache directory the user set through
         JAX (JAX_COMPILATION_CACHE_DIR or jax.config) is kept.
  none   no cache.
  PATH   that directory (created if missing), on any backend.
JAX keys each entry by the program, the compile options, the XLA flags and the device, so runs of
different models, machines or jax versions can share one directory; with jax's default settings,
XLA's per-fusion autotuning results are kept in it too.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

AUTO, NONE = "auto", "none"


def default_dir() -> Path:
  return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "acm_jax" / "jax"


def enable(setting: str, backend: str | None = None) -> str | None:
  """Turns the cache on as `setting` asks (see the module doc); returns its directory, or None when
  off. Must run before the first compile of the process: JAX reads the setting once."""
  if not setting:
    raise ValueError(f"--compilation_cache must be {AUTO}, {NONE} or a directory, got {setting!r}")
  if setting == NONE:
    return None
  if setting == AUTO:
    already = jax.config.jax_compilation_cache_dir
    if already:
      return already
    if (backend or jax.default_backend()) != "gpu":
      return None
    path = default_dir()
  else:
    path = Path(setting).expanduser()
  if path.exists() and not path.is_dir():
    raise ValueError(f"--compilation_cache={setting}: {path} exists and is not a directory")
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ValueError(f"--compilation_cache={setting}: cannot create {path} ({e.strerror}); "
                     f"pass another directory or --compilation_cache={NONE}") from e
  jax.config.update("jax_compilation_cache_dir", str(path))
  return str(path)
