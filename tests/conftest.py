"""Suite-wide setup: a persistent compilation cache per test process.

Many tests run the same tiny programs again (a resumed run, the same phase in another
work dir, a restarted child process): loading a compiled program instead of compiling
it again is most of their time on a CPU (a tiny pretraining run: 41 s cold, 7.5 s
warm on a loaded 2-core machine). JAX decides on its cache at the first compile, so
this is set at import, before any test runs; child processes get CACHE_ENV.
"""

import atexit
import shutil
import tempfile

import jax

CACHE = tempfile.mkdtemp(prefix="acm_jax_test_compile_cache_")
atexit.register(shutil.rmtree, CACHE, ignore_errors=True)
CACHE_ENV = {"JAX_COMPILATION_CACHE_DIR": CACHE, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
jax.config.update("jax_compilation_cache_dir", CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
