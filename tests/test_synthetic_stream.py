"""The streamed generated sets: the same examples as the whole-set generator, exact resume, bounded chunks,
worker processes that import no JAX and leave nothing behind."""

import concurrent.futures
import gc
import hashlib
import multiprocessing
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from acm_jax import data
from acm_jax.data import synthetic, synthetic_stream

CONFIG = synthetic.SyntheticConfig(image_size=16, num_train=150, num_test=70, chunk_size=32)


def test_chunks_equal_the_seed_tree_of_the_whole_set_generator():
  """generate_chunk derives each chunk's seed directly; the generator before streaming spawned them."""
  root = np.random.SeedSequence([CONFIG.seed, 20261124]).spawn(2)
  for split, child in zip(("train", "test"), root):
    seeds = child.spawn(synthetic.num_chunks(CONFIG, split))
    for index in (0, synthetic.num_chunks(CONFIG, split) - 1):
      count = min(32, synthetic.split_size(CONFIG, split) - 32 * index)
      expect = synthetic._generate_chunk(CONFIG, seeds[index], count)
      got = synthetic.generate_chunk(CONFIG, split, index)
      for key in expect:
        np.testing.assert_array_equal(got[key], expect[key])


def stream(split, batch_size, start_step, shuffle, repeat, workers=2):
  n = synthetic.split_size(CONFIG, split)
  bounds = data.batch_bounds(n, batch_size, start_step, repeat, drop_remainder=False)
  batches = synthetic_stream.iterate(CONFIG, split, bounds, seed=3, shuffle=shuffle, with_masks=True, workers=workers)
  return (batch for _, batch in batches)


def test_stream_serves_the_whole_set_generator_examples_bit_for_bit():
  whole = synthetic._generate(CONFIG)
  ordered = list(stream("test", 16, 0, shuffle=False, repeat=False))
  for key in ("image", "label", "object_mask"):
    np.testing.assert_array_equal(np.concatenate([b[key] for b in ordered]), whole["test"][key])
  # shuffled: three epochs of train, each a permutation of the set, different orders
  train = whole["train"]
  flat = train["image"].reshape(150, -1)
  lookup = {row.tobytes(): i for i, row in enumerate(flat)}
  seen = []
  for _, b in zip(range(9), stream("train", 50, 0, shuffle=True, repeat=True)):
    idx = [lookup[row.tobytes()] for row in b["image"].reshape(len(b["image"]), -1)]
    np.testing.assert_array_equal(b["label"], train["label"][idx])
    seen += idx
  epochs = np.reshape(seen, (3, 150))
  assert all(sorted(e) == list(range(150)) for e in epochs)
  assert not np.array_equal(epochs[0], epochs[1])


@pytest.mark.parametrize("start_step", [1, 4, 7])  # inside the first epoch, across its end, in the third
def test_stream_resumes_exactly(start_step):
  full = [b for _, b in zip(range(start_step + 2), stream("train", 40, 0, shuffle=True, repeat=True))]
  resumed = [b for _, b in zip(range(2), stream("train", 40, start_step, shuffle=True, repeat=True, workers=1))]
  for got, expect in zip(resumed, full[start_step:]):
    for key in expect:
      np.testing.assert_array_equal(got[key], expect[key])


def test_large_generated_sets_stream_through_make_iterator():
  assert data.streams(data._synthetic_config("synthetic", 72))
  assert not data.streams(data._synthetic_config("synthetic", 64))
  first = next(data.make_iterator("synthetic", "train", 4, image_size=72, seed=1))
  again = next(data.make_iterator("synthetic", "train", 4, image_size=72, seed=1))
  assert first["image"].shape == (4, 72, 72, 3) and first["image"].dtype == np.float32
  np.testing.assert_array_equal(first["image"], again["image"])


# sha256 over the sorted keys and bytes of train chunk 1, computed with the generator of 2026-12-01
# (whole-chunk arrays), before it composited images block by block: the data must not move
GOLDEN_CHUNKS = [
    (dict(image_size=16, task="glyphs", chunk_size=70), "1505ed169963e78c97366fa376d18a6ea453d8b906f77a890130a76e3239c533"),
    (dict(image_size=40, task="shapes", num_classes=20, chunk_size=70),
     "0d040249d75c4641e801547919f6b3e58ad154321d2b64cacbed942fee8e8ae2"),
    (dict(image_size=32, task="glyphs", chunk_size=1000), "728dc3ba608d19ac05d21a3bd0bb1ea40debfbc607fb39470643001c13b0b7cf"),
] + [  # above synthetic.QUANTILE_NOISE_ABOVE pixels: the images since the noise became 16-bit quantile draws
    # (2026-12-02) and the background's upsampling elementwise arithmetic instead of BLAS matmuls, whose
    # rounding depended on the CPU (2026-12-03: one uint8 in 10^7 moved by 1 at 224 px; 97 px did not move)
    (dict(image_size=224, task="glyphs", chunk_size=64), "372209c7d2712aac5489584343741b096c264a0a3a5aea84b1495c8d5177a58d"),
    (dict(image_size=224, task="shapes", chunk_size=64), "bcc87b927a477535837d431a4027a636af3f2667a4631e1138d07513b451e9aa"),
    (dict(image_size=97, task="shapes", num_classes=15, chunk_size=37),
     "b098e41423eb6190e999f213fee8cd50c5cc8c2d0bb919186f669b07c576f6ec"),
]


@pytest.mark.parametrize("kept_bytes", [0, synthetic.FINE_NOISE_KEPT_BYTES], ids=["fine-noise-drawn-twice", "kept"])
@pytest.mark.parametrize("fields,digest", GOLDEN_CHUNKS)
def test_block_compositing_keeps_the_generated_data_bit_for_bit(fields, digest, kept_bytes, monkeypatch):
  monkeypatch.setattr(synthetic, "FINE_NOISE_KEPT_BYTES", kept_bytes)
  chunk = synthetic.generate_chunk(synthetic.SyntheticConfig(**fields), "train", 1)
  h = hashlib.sha256()
  for key in sorted(chunk):
    h.update(key.encode())
    h.update(np.ascontiguousarray(chunk[key]).tobytes())
  assert h.hexdigest() == digest


def test_blas_limit_is_lifted_when_the_last_generator_leaves():
  threadpoolctl = pytest.importorskip("threadpoolctl")
  blas = lambda: [info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]
  before = blas()
  with synthetic.single_threaded_blas():
    with synthetic.single_threaded_blas():  # a second generator thread
      assert all(n == 1 for n in blas())
    assert all(n == 1 for n in blas())  # the first is still inside
  assert blas() == before


def test_chunk_stream_keeps_only_the_arrays_asked_for():
  full = synthetic.generate_chunk(CONFIG, "train", 2)
  stream = synthetic_stream.ChunkStream(CONFIG, "train", seed=0, shuffle=False, workers=1, keys=("image", "label"))
  try:
    kept = stream.chunk(2)
  finally:
    stream.close()
  assert sorted(kept) == ["image", "label"]
  for key in kept:
    np.testing.assert_array_equal(kept[key], full[key])


def test_kept_fine_noise_gives_the_chunks_of_the_two_pass_generator(monkeypatch):
  rng = np.random.default_rng(0)
  for _ in range(6):
    config = synthetic.SyntheticConfig(
        image_size=int(rng.integers(16, 41)), chunk_size=int(rng.integers(1, 3 * synthetic.BLOCK)),
        task=str(rng.choice(synthetic.TASKS)), seed=int(rng.integers(100)),
        distractor_probability=float(rng.uniform()))
    n, size = config.chunk_size, config.image_size
    drawn = synthetic._background_params(np.random.default_rng(1), n, size)
    assert drawn["fine"] is not None and sum(len(b) for b in drawn["fine"]) == n  # the kept path is the one tested
    kept = synthetic.generate_chunk(config, "test", 0)
    monkeypatch.setattr(synthetic, "FINE_NOISE_KEPT_BYTES", n * size * size * 12 - 1)  # one byte short: two passes
    assert synthetic._background_params(np.random.default_rng(1), n, size)["fine"] is None
    twice = synthetic.generate_chunk(config, "test", 0)
    monkeypatch.undo()
    assert sorted(kept) == sorted(twice)
    for key in twice:
      np.testing.assert_array_equal(kept[key], twice[key], err_msg=f"{key} of {config}")


@pytest.mark.parametrize("cores,workers", [(1, 1), (2, 2), (3, 2), (4, 2), (16, 8), (200, synthetic_stream.MAX_WORKERS)])
def test_default_workers_leave_the_consumer_room(cores, workers, monkeypatch):
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
  assert synthetic_stream.default_workers() == workers


def in_worker(pool, expression):
  """`expression` evaluated in a worker (eval, a builtin, pickles by name: this file stays unimported there)."""
  return pool.submit(eval, expression).result()


def test_workers_are_processes_that_import_no_jax_and_use_one_blas_thread():
  assert "jax" in sys.modules  # the parent has it (conftest), so its absence below means something
  stream = synthetic_stream.ChunkStream(CONFIG, "train", seed=0, shuffle=False, workers=2)
  try:
    assert isinstance(stream._pool, concurrent.futures.ProcessPoolExecutor)
    pool = stream._pool
    pids = {in_worker(pool, "__import__('os').getpid()") for _ in range(8)}
    assert os.getpid() not in pids and len(pids) <= 2
    assert not in_worker(pool, "'jax' in __import__('sys').modules")
    assert in_worker(pool, "__import__('signal').getsignal(2) == __import__('signal').SIG_IGN")
    if synthetic.threadpoolctl is not None:
      blas = in_worker(pool, "[i['num_threads'] for i in __import__('threadpoolctl').threadpool_info() "
                             "if i['user_api'] == 'blas']")
      assert blas and all(n == 1 for n in blas)
  finally:
    stream.close()


def children():
  return {p.pid for p in multiprocessing.active_children()}


@pytest.mark.parametrize("how", ["close", "garbage-collected"])
def test_no_worker_outlives_the_stream(how):
  before = children()
  n = synthetic.split_size(CONFIG, "train")
  batches = synthetic_stream.iterate(CONFIG, "train", data.batch_bounds(n, 16, 0, True, False), seed=0, shuffle=True,
                                     with_masks=False, workers=2)
  next(batches)
  next(batches)
  assert len(children() - before) == 2
  if how == "close":
    batches.close()
  else:
    del batches
    gc.collect()
  assert children() == before


@pytest.mark.parametrize("run_as", ["path", "module"])  # python3 train_like.py, python3 -m train_like
def test_workers_do_not_import_the_parents_main_module(tmp_path, run_as):
  """spawn would run the main script again in each worker; a script that imports JAX shows whether it did."""
  script = tmp_path / "train_like.py"
  script.write_text(textwrap.dedent("""
      import sys
      import jax  # a training script's main module: the workers must not import it
      from acm_jax.data import synthetic_stream
      if __name__ == "__main__":
        main, spec = sys.modules["__main__"], __spec__
        pool = synthetic_stream.start_pool(1)
        ran_main = "'synthetic_stream' in vars(__import__('sys').modules['__main__'])"  # a name this script defines
        print(pool.submit(eval, f"('jax' in __import__('sys').modules, {ran_main})").result())
        pool.shutdown()
        print(sys.modules["__main__"] is main and __spec__ is spec and __file__.endswith("train_like.py"))
  """))
  root = str(Path(__file__).resolve().parents[1])
  command = [sys.executable, str(script)] if run_as == "path" else [sys.executable, "-m", "train_like"]
  out = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=root,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([root, str(tmp_path)]), "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines() == ["(False, False)", "True"], out.stdout


def test_stream_falls_back_to_threads_where_processes_cannot_start(monkeypatch):
  class NoProcesses(synthetic_stream._SpawnContext):
    class Process(synthetic_stream._WorkerProcess):
      @staticmethod
      def _Popen(process_obj):
        raise PermissionError("processes are not allowed here")

  monkeypatch.setattr(synthetic_stream, "_SpawnContext", NoProcesses)
  with pytest.warns(RuntimeWarning, match="threads"):
    stream = synthetic_stream.ChunkStream(CONFIG, "train", seed=0, shuffle=False, workers=2)
  try:
    assert isinstance(stream._pool, concurrent.futures.ThreadPoolExecutor)
    got, expect = stream.chunk(1), synthetic.generate_chunk(CONFIG, "train", 1)
    for key in expect:
      np.testing.assert_array_equal(got[key], expect[key])
  finally:
    stream.close()


# A child Python keeps SIGINT ignored when it starts with it ignored, and a test runner started in the background
# of a shell without job control (`bash .ci/run &`, nohup) ignores it: the ctrl-c tests' children would then sleep
# through their ctrl-c (the local CI hangs of 2026-12-06 and 12-07, whose parents were found simply looping). They
# put back Python's default handler first, as a program started from a terminal has it.


def signal_states(pids) -> str:
  """Each thread's state, kernel wait channel and signal masks (pending, blocked, ignored, caught) of the processes
  `pids`, from /proc: what a stop that did not take needs to be explained."""
  lines = []
  for pid in pids:
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
      try:
        status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines() if ":" in line)
        wchan = (task / "wchan").read_text()
      except OSError:
        continue
      keys = ("State", "SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")
      lines.append(f"{pid}/{task.name} {status.get('Name', '').strip()}: wchan {wchan or '-'}; "
                   + ", ".join(f"{k} {status.get(k, '').strip()}" for k in keys))
  return "\n".join(lines)


def running(pid):
  """Whether `pid` is a live process (not gone, not a zombie waiting to be reaped)."""
  try:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def test_an_interrupted_stream_frees_a_pool_caught_mid_message():
  """An interrupt can stop a worker while it sends a chunk, which leaves part of a message in the results pipe;
  the pool's manager thread (joined by the interpreter at exit) then waits for the rest. Here the partial message
  is written by hand: a header for 1,000 bytes and 10 of them. After the interrupted stream's close, the manager
  thread must end, as it would not if the parent kept its write end of the pipe open."""
  stream = synthetic_stream.ChunkStream(CONFIG, "train", 0, True, 2, ("image",))
  assert stream.chunk(0)["image"].shape[0] == CONFIG.chunk_size  # the pool runs, its manager thread started
  pool = stream._pool
  manager, workers = pool._executor_manager_thread, list(pool._processes.values())
  assert len(workers) == 2 and all(worker.is_alive() for worker in workers)
  os.write(pool._result_queue._writer.fileno(), struct.pack("!i", 1000) + b"x" * 10)
  time.sleep(0.5)  # the manager reads the header and waits for the rest
  assert manager.is_alive()
  stream.close(wait=False)  # what an interrupt does
  manager.join(timeout=20)
  assert not manager.is_alive(), "the pool's manager thread still waits for the rest of the message"
  assert not any(worker.is_alive() for worker in workers)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
@pytest.mark.parametrize("stop", ["ctrl-c", "parent-killed"])
def test_workers_end_with_the_interrupted_or_killed_parent(tmp_path, stop):
  script = tmp_path / "endless.py"
  script.write_text(textwrap.dedent("""
      import faulthandler, multiprocessing, signal
      from acm_jax import data
      from acm_jax.data import synthetic, synthetic_stream
      faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for every thread's stack if it hangs
      signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal (note above signal_states)
      config = synthetic.SyntheticConfig(image_size=16, num_train=150, num_test=70, chunk_size=32)
      bounds = data.batch_bounds(150, 16, 0, True, False)  # repeats forever
      for step, _ in enumerate(synthetic_stream.iterate(config, "train", bounds, 0, True, False, workers=2)):
        if step == 1:
          print(*[p.pid for p in multiprocessing.active_children()], flush=True)
  """))
  root = str(Path(__file__).resolve().parents[1])

  child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           cwd=root, env={**os.environ, "PYTHONPATH": root}, start_new_session=True)
  try:
    workers = [int(pid) for pid in child.stdout.readline().split()]
    assert len(workers) == 2 and all(running(pid) for pid in workers)
    if stop == "ctrl-c":
      os.killpg(child.pid, signal.SIGINT)  # what a terminal does: the whole process group
    else:
      os.kill(child.pid, signal.SIGKILL)  # the parent alone, with no chance to stop its pool
    try:
      _, err = child.communicate(timeout=60)  # reads both pipes while waiting: a full pipe cannot stall the child
    except subprocess.TimeoutExpired:  # still alive: every thread's stack (faulthandler) and signal masks, then fail
      states = signal_states([child.pid, *workers])
      os.kill(child.pid, signal.SIGUSR1)
      time.sleep(2)
      os.killpg(child.pid, signal.SIGKILL)
      err = child.communicate(timeout=30)[1]
      pytest.fail(f"the stopped parent outlived its stop by 60 s; its threads:\n{err[-8000:]}\n"
                  f"in the kernel (SIGINT is bit 2):\n{states}")
  finally:
    if child.poll() is None:
      os.killpg(child.pid, signal.SIGKILL)
  if stop == "ctrl-c":
    assert "KeyboardInterrupt" in err
  deadline = time.monotonic() + 10
  while any(running(pid) for pid in workers) and time.monotonic() < deadline:
    time.sleep(0.1)
  left = [pid for pid in workers if running(pid)]
  for pid in left:
    os.kill(pid, signal.SIGKILL)
  assert not left


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="needs per-thread signal masks")
@pytest.mark.parametrize("wait_slice", [synthetic_stream.WAIT_SLICE_S, None])
def test_ctrl_c_taken_by_a_pool_thread_stops_a_consumer_waiting_for_a_chunk(tmp_path, wait_slice):
  """The kernel may hand a process's SIGINT to any thread that does not block it, and Python runs the handler only
  in the main thread, between bytecodes: a main thread in an unbounded wait would sleep through it. Here the main
  thread blocks SIGINT (so the pool's threads take it) and waits for a chunk that the one worker, busy for 60 s,
  cannot start. Waiting in slices, it stops within seconds; waiting unbounded (None, the control), it does not."""
  script = tmp_path / "waiting.py"
  script.write_text(textwrap.dedent(f"""
      import signal, sys, time
      from acm_jax.data import synthetic, synthetic_stream
      signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal (note above signal_states)
      synthetic_stream.WAIT_SLICE_S = {wait_slice!r}
      config = synthetic.SyntheticConfig(image_size=16, num_train=150, num_test=70, chunk_size=32)
      stream = synthetic_stream.ChunkStream(config, "train", 0, False, workers=1)  # the pool's threads start here
      stream._pool.submit(time.sleep, 60)  # the one worker is busy: chunk 0 cannot start
      signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGINT}})  # this thread only: the kernel picks another
      print("waiting", flush=True)
      try:
        stream.chunk(0)
      except KeyboardInterrupt:
        print("interrupted", flush=True)
      finally:
        stream.close(wait=False)
  """))
  root = str(Path(__file__).resolve().parents[1])
  child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           cwd=root, env={**os.environ, "PYTHONPATH": root}, start_new_session=True)
  try:
    assert child.stdout.readline().strip() == "waiting"
    time.sleep(0.5)
    os.kill(child.pid, signal.SIGINT)
    try:
      out, err = child.communicate(timeout=15)
      stopped = True
    except subprocess.TimeoutExpired:
      stopped = False
  finally:
    if child.poll() is None:
      os.killpg(child.pid, signal.SIGKILL)
      child.communicate()
  if wait_slice is None:
    assert not stopped, "the unbounded wait was expected to sleep through the signal: the control shows nothing"
  else:
    assert stopped and "interrupted" in out, err
