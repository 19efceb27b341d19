"""Training-step cost of every phase, dense and ACM, unrolled and scanned blocks (issue #22).

    python3 -m benchmarks.train_bench                                  # one H200, defaults below
    python3 -m benchmarks.train_bench --acm=mlp,mlp_qkvo --phases=distill,gates --batches=64
    python3 -m benchmarks.train_bench --model=tiny --steps=2 --out=/tmp/train.json   # CPU smoke run

For each batch and block layout the dense ViT's supervised step ("pretrain") is measured
first: it is the yardstick of `ratio_to_dense_step`. Then, for each ACMized configuration
(mlp: every MLP; mlp_qkvo: every MLP and q/k/v/o projection; N=4, gates of 3 layers of
width 16), each requested ACM phase's step (distill, gates, finetune, static). Per step:
  init_s      host-side parameter initialisation (`phases.init_params` for the dense model; ACM
              phases time `phases.acm_params` from the dense params, as the distill phase runs it)
  compile_s   lowering + compilation of the sharded, donated step (one device)
  step_ms     mean step of --steps steps queued back to back (one wait at the end, as the
              training loop waits only every log_every steps), median of 3 such runs, after 2
              warm-up steps, state threaded through (until 2026-12-02: median of single waited
              steps, which adds the host's dispatch of each step: 44.8 against 36.0 ms for the
              ViT-B/16 mlp_qkvo finetune step on an H200)
  peak_bytes  the compiled program's own footprint: arguments + temps + outputs - aliased
Random device-resident batches; input loading is not measured. Records are appended to
benchmarks/results/train_<gpu>.json (or --out). The defaults fit one 10-minute call on an
H200; the whole matrix (both ACM configurations, every phase) takes several calls, each
appending its records.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from acm_jax import acm as acm_lib
from acm_jax import compile_cache, scan_outputs, transformer
from acm_jax.train import phases, steps
from acm_jax.train import config as config_lib
from acm_jax.train.config import ExperimentConfig
from acm_jax.vit import task as vit_task

RESULTS = Path(__file__).resolve().parent / "results"
ACM_PHASES = ("distill", "gates", "finetune", "static")
ACM_KINDS = ("mlp", "mlp_qkvo")
LAYOUTS = ("unrolled", "scanned")


def experiment(model: str, acm: str, batch: int, scanned: bool, remat: str, dtype: str,
               group_qkv_gates: str = "auto", scan_unroll: int = 1) -> phases.Experiment:
  """The ViT experiment on one device; vit presets at 224 px and 1000 classes, tiny at its 32 px."""
  sizes = {} if model == "tiny" else {"image_size": 224, "num_classes": 1000}
  cfg = ExperimentConfig(model=model, dataset="synthetic", batch_size=batch, eval_batch_size=batch, remat=remat,
                         dtype=dtype, acm_attention=acm == "mlp_qkvo", gate_depth=3, gate_hidden=16,
                         scan_blocks=scanned, scan_unroll=scan_unroll, group_qkv_gates=group_qkv_gates, **sizes)
  exp = vit_task.build(cfg)
  return dataclasses.replace(exp, partitioner=type(exp.partitioner).from_flags("data:1", "dp", jax.devices()[:1]))


def phase_step(exp: phases.Experiment, phase: str, params, teacher):
  """(tx, step_fn(state, batch) or step_fn(teacher, state, batch)) as the phases build them."""
  paths, cfg = exp.task.paths, exp.config
  if phase == "pretrain":
    tx = phases.optimizer(exp, phase, params)
    return tx, functools.partial(steps.pretrain_step, exp.task, tx, 0.0)
  if phase == "distill":
    tx = phases.optimizer(exp, phase, params, functools.partial(phases.is_learner, paths))
    return tx, functools.partial(steps.distill_step, exp.task, tx, cfg.grad_mode)
  if phase == "gates":
    tx = phases.optimizer(exp, phase, params, functools.partial(phases.is_gate, paths))
    return tx, functools.partial(steps.gate_step, exp.task, tx, cfg.gating_error_factor, cfg.label_rule)
  if phase == "finetune":
    tx = phases.optimizer(exp, phase, params, fast=functools.partial(phases.is_gate, paths),
                          fast_lr_scale=cfg.finetune_gate_lr_scale)
    weights = steps.FinetuneWeights(cfg.budget, cfg.budget_loss, cfg.budget_weight, cfg.entropy_weight,
                                    cfg.diversity_weight, cfg.gate_temperature, cfg.label_smoothing)
    return tx, functools.partial(steps.finetune_step, exp.task, tx, weights)
  tx = phases.optimizer(exp, phase, params, lambda key: not phases.is_gate(paths, key))
  return tx, functools.partial(steps.static_step, exp.task, tx, cfg.resolved_static_k, cfg.label_smoothing)


def random_batch(exp: phases.Experiment, batch: int) -> dict:
  rng = np.random.default_rng(0)
  size = exp.info.image_size
  host = {"image": rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32),
          "label": rng.integers(0, exp.info.num_classes, batch).astype(np.int32)}
  return exp.partitioner.shard_batch(host, batch)


def compiled_step(exp: phases.Experiment, phase: str, dense_params):
  """One phase's step as the phases build it, compiled for a random batch: (run: state ->
  (state, metrics), initial state, compiled executable, init seconds, compile seconds)."""
  tic = time.perf_counter()
  if phase == "pretrain":
    params, teacher = dense_params, None
  else:
    params = phases.acm_params(exp, dense_params, 0)
    teacher = dense_params if phase in ("distill", "gates") else None
  jax.block_until_ready(params)
  init_s = time.perf_counter() - tic
  tx, step_fn = phase_step(exp, phase, params, teacher)
  state, step, _ = phases.prepare(exp, phase, params, tx, step_fn, teacher)
  batch = random_batch(exp, exp.config.batch_size)
  tic = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - tic
  frozen = () if teacher is None else (exp.partitioner.put(teacher),)
  return lambda s: compiled(s, batch, *frozen), state, compiled, init_s, compile_s


REPEATS = 3  # timed runs of --steps queued steps; the median run's mean step is reported


def measure(exp: phases.Experiment, phase: str, dense_params, steps_timed: int) -> dict:
  """One phase's step: init, compile and step times and the compiled footprint."""
  run, state, compiled, init_s, compile_s = compiled_step(exp, phase, dense_params)
  for _ in range(2):
    state, metrics = run(state)
  jax.block_until_ready((state, metrics))
  times = []
  for _ in range(REPEATS):  # steps queued back to back, as the training loop runs them (it waits
    tic = time.perf_counter()  # only every log_every steps): device time once dispatch runs ahead
    for _ in range(steps_timed):
      state, metrics = run(state)
    jax.block_until_ready((state, metrics))
    times.append((time.perf_counter() - tic) / steps_timed)
  stats = compiled.memory_analysis()
  peak = None if stats is None else int(stats.argument_size_in_bytes + stats.temp_size_in_bytes
                                        + stats.output_size_in_bytes - stats.alias_size_in_bytes)
  step_s = float(np.median(times))
  return {"init_s": round(init_s, 2), "compile_s": round(compile_s, 2), "step_ms": step_s * 1e3,
          "images_per_s": exp.config.batch_size / step_s, "peak_bytes": peak}


def run(args) -> list[dict]:
  device = jax.devices()[0]
  records = []
  base = {"device": device.device_kind, "date": datetime.date.today().isoformat(), "jax_version": jax.__version__,
          "model": args.model, "remat": args.remat}
  if jax.config.jax_compilation_cache_dir:  # on (by --compilation_cache or the user's JAX setting): compile_s
    base["compilation_cache"] = True        # may be a read from the persistent cache
  layouts = [(layout, unroll) for layout in args.layouts
             for unroll in (args.scan_unroll if layout == "scanned" else [1])]
  for batch in args.batches:
    for layout, unroll in layouts:
      scanned = layout == "scanned"
      exp = experiment(args.model, "none", batch, scanned, args.remat, args.dtype, scan_unroll=unroll)
      tic = time.perf_counter()
      dense_params = phases.init_params(exp, "dense", 0)
      jax.block_until_ready(dense_params)
      dense_init_s = time.perf_counter() - tic
      dense = {**measure(exp, "pretrain", dense_params, args.steps), "init_s": round(dense_init_s, 2)}
      dense_step = dense["step_ms"]
      todo = [("none", "pretrain")] * ("pretrain" in args.phases) + [
          (acm, phase) for acm in args.acm for phase in args.phases if phase != "pretrain"]
      for acm, phase in todo:
        if phase == "pretrain":
          result = dense
        else:
          acm_exp = experiment(args.model, acm, batch, scanned, args.remat, args.dtype, args.group_qkv_gates,
                               scan_unroll=unroll)
          result = measure(acm_exp, phase, dense_params, args.steps)
        record = {**base, "acm": acm, "phase": phase, "batch": batch, "scanned": scanned,
                  **({"scan_unroll": unroll} if scanned else {}), **result,
                  "ratio_to_dense_step": result["step_ms"] / dense_step}
        notes = [f"--group_qkv_gates={args.group_qkv_gates}"] * (args.group_qkv_gates != "auto" and phase != "pretrain")
        notes += [f"--pack_small_params={args.pack_small_params}"] * (
            args.pack_small_params != "auto" and scanned and args.remat != "none")
        notes += [f"--soft_bias_kernel={args.soft_bias_kernel}"] * (args.soft_bias_kernel != "auto" and phase != "pretrain")
        notes += [f"--act_kernel={args.act_kernel}"] * (args.act_kernel != "auto" and phase != "pretrain")
        if notes:
          record["note"] = " ".join(notes)
        records.append(record)
        print(json.dumps(record), flush=True)
  return records


def append(path: Path, records: list[dict]) -> None:
  old = json.loads(path.read_text()) if path.exists() else []
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(old + records, indent=1) + "\n")
  print(f"appended {len(records)} records to {path}")


def _slug(kind: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in kind.lower()).strip("_")


def _list(allowed):
  def parse(text: str) -> list[str]:
    items = [s for s in text.split(",") if s]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
      raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated subset of {', '.join(allowed)}")
    return items
  return parse


def _ints(text: str) -> list[int]:
  """A comma-separated list of positive integers."""
  try:
    values = [int(s) for s in text.split(",")]
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated positive integers") from None
  if min(values) < 1:
    raise argparse.ArgumentTypeError(f"{text!r}: every value must be >= 1")
  return values


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="vit_b16", choices=("tiny", "vit_s16", "vit_b16", "vit_l16"))
  parser.add_argument("--acm", type=_list(ACM_KINDS), default=["mlp_qkvo"], help="ACM configurations: mlp, mlp_qkvo")
  parser.add_argument("--phases", type=_list(("pretrain", *ACM_PHASES)), default=["pretrain", "finetune"],
                      help="pretrain (dense), distill, gates, finetune, static")
  parser.add_argument("--batches", type=_ints, default=[64, 256])
  parser.add_argument("--layouts", type=_list(LAYOUTS), default=list(LAYOUTS), help="unrolled, scanned")
  parser.add_argument("--scan_unroll", type=_ints, default=[1],
                      help="scanned layout: blocks per loop iteration (the experiments' --scan_unroll); a "
                      "comma-separated list measures each, one scanned layout per value")
  parser.add_argument("--remat", default="none", choices=transformer.REMAT_POLICIES)
  parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  parser.add_argument("--group_qkv_gates", default="auto", choices=config_lib.GROUP_QKV_GATES,
                      help="the q/k/v gates as one gate in finetuning (auto: with scanned blocks), as the experiments' flag")
  parser.add_argument("--steps", type=int, default=20, help="steps per timed run (3 runs of queued steps; the median run's mean step)")
  parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/train_<gpu>.json")
  parser.add_argument("--scan_outputs", default="auto", choices=("auto", "zeros"),
                      help="auto: as the entry points (on one GPU, scans' stacked outputs allocated unfilled, "
                      "acm_jax.scan_outputs); zeros: JAX's zero-filled stacks")
  parser.add_argument("--pack_small_params", default="auto", choices=("auto", "on", "off"),
                      help="on: scanned stacks under remat slice and update their small parameters as one array per "
                      "layer (transformer.small_params_packed); off: one per leaf; auto: as the models run by "
                      "default, on a GPU only")
  parser.add_argument("--soft_bias_kernel", default="auto", choices=("auto", "on", "off"),
                      help="on: the soft choice bias' backward as one Pallas kernel (acm.soft_bias_kernel); off: two "
                      "XLA products; auto: as the models run by default")
  parser.add_argument("--act_kernel", default="auto", choices=("auto", "on", "off"),
                      help="on: the MLP ACMs' weighted activation in finetuning as Pallas kernels, one pass forward "
                      "and one backward (acm.act_kernel); off: XLA fusions; auto: as the models run by default")
  parser.add_argument("--compilation_cache", default="none",
                      help="none (default: every compile_s is a cold compile), or a directory of JAX's persistent "
                      "cache as the experiments' flag: a second run with the same directory measures a restart")
  args = parser.parse_args(argv)
  try:
    cache = compile_cache.enable(args.compilation_cache)
  except ValueError as e:
    parser.error(str(e))
  if cache:
    print(f"compilation cache: {cache}", file=sys.stderr)
  if args.steps < 1:
    parser.error(f"--steps must be >= 1, got {args.steps}")
  if args.scan_outputs == "auto" and scan_outputs.enable_for_process():
    print("scan outputs: allocated unfilled (acm_jax.scan_outputs)", file=sys.stderr)
  if args.model != "tiny" and jax.default_backend() != "gpu":
    print(f"warning: {args.model} on {jax.default_backend()}: this benchmark is meant for one GPU", file=sys.stderr)
  out = args.out or RESULTS / f"train_{_slug(jax.devices()[0].device_kind)}.json"
  switch = {"auto": None, "on": True, "off": False}
  with transformer.small_params_packed(switch[args.pack_small_params]), \
       acm_lib.soft_bias_kernel(switch[args.soft_bias_kernel]), acm_lib.act_kernel(switch[args.act_kernel]):
    append(out, run(args))


if __name__ == "__main__":
  main()
