"""The entry points' persistent compilation cache (`acm_jax.compile_cache`): a second process
reads the first one's compiled program from the directory; the settings and bad directories."""

import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest

from acm_jax import compile_cache
from acm_jax.train.config import ExperimentConfig, RESUME_FREE

ROOT = Path(__file__).resolve().parents[1]

# one process: the cache as --compilation_cache=DIR sets it, one jitted step compiled, and the
# cache hits JAX counted printed
SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp
    from acm_jax import compile_cache
    hits = []
    jax.monitoring.register_event_listener(lambda name, **_: hits.append(name) if name.endswith("cache_hits") else None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    print(compile_cache.enable(sys.argv[1]))
    step = jax.jit(lambda w, x: jnp.tanh(x @ w) @ w.T + jnp.sin(x))
    w = jax.random.normal(jax.random.key(0), (48, 96))
    x = jax.random.normal(jax.random.key(1), (16, 48))
    print(float(jnp.sum(step(w, x))))
    print(len(hits))
""")


def _run(directory: str) -> list[str]:
  out = subprocess.run([sys.executable, "-c", SCRIPT, directory], cwd=ROOT, capture_output=True, text=True,
                       check=True, env={"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  return out.stdout.split()


def test_a_second_process_reads_the_compiled_step(tmp_path):
  cache = tmp_path / "nested" / "cache"
  first = _run(str(cache))
  assert first[0] == str(cache) and first[2] == "0"
  assert any(cache.iterdir())  # the compiled programs were written
  second = _run(str(cache))
  assert int(second[2]) >= 1, second  # ... and read back by the next process
  assert second[1] == first[1]  # same result


def test_settings_and_bad_directories(tmp_path, monkeypatch):
  ours = jax.config.jax_compilation_cache_dir  # conftest's: a directory set through JAX is kept by auto
  assert ours and compile_cache.enable("auto", backend="cpu") == ours
  assert compile_cache.enable("none") is None
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  jax.config.update("jax_compilation_cache_dir", None)
  try:
    assert compile_cache.enable("auto", backend="cpu") is None
    gpu_default = tmp_path / "xdg" / "acm_jax" / "jax"
    assert compile_cache.enable("auto", backend="gpu") == str(gpu_default) and gpu_default.is_dir()
    assert jax.config.jax_compilation_cache_dir == str(gpu_default)
  finally:
    jax.config.update("jax_compilation_cache_dir", ours)
  afile = tmp_path / "file"
  afile.write_text("x")
  with pytest.raises(ValueError, match="exists and is not a directory"):
    compile_cache.enable(str(afile))
  with pytest.raises(ValueError, match="cannot create"):
    compile_cache.enable(str(afile / "below"))
  with pytest.raises(ValueError, match="must be auto, none or a directory"):
    compile_cache.enable("")


def test_the_flag_is_free_on_resume():
  assert ExperimentConfig().compilation_cache == "auto"
  assert "compilation_cache" in RESUME_FREE
