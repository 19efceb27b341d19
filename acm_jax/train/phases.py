"""The phases of ACMization as functions of an `ExperimentConfig`.

Run directories under `config.workdir`:
  pretrain/            the dense model (skipped when --init gives one)
  distill/             learners distilled module-wise     (+ distill_errors.json)
  gates/               gates trained on artificial labels (+ label_distribution.json)
  finetune_b{budget}/  end-to-end finetuning at a budget
  finetune_any_b{min}-{max}/  the same with budget-conditioned gates, over budgets drawn in [min, max]
                       (suffix _log: drawn log-uniformly)
  static_k{k}/         the static-width baseline
Each holds config.json, metrics.jsonl, checkpoints/ and, once finished, params/
and eval.json; `<workdir>/eval.json` sums up every evaluated model (`acm_jax.cli`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from acm_jax import acm as acm_lib
from acm_jax import flops as flops_lib
from acm_jax import losses
from acm_jax import sharding as sharding_lib
from acm_jax import transformer
from acm_jax.acmize import acmize, flatten, unflatten
from acm_jax.data import synthetic
from acm_jax.train import loop, optim, steps
from acm_jax.train.config import ExperimentConfig
from acm_jax.pytree import PyTree


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything the phases need; a second model family (e.g. speech) builds
  one of these with its own task, data iterator and FLOP count."""
  config: ExperimentConfig
  task: steps.Task
  info: Any  # the dataset's info (num_classes, sizes, ...)
  sample_input: Any  # one example batch of model inputs, used to initialise params
  flops: Callable[[Mapping[str, float] | None, bool], dict]  # (mean k per ACM, dense?) -> counts per example
  iterator: Callable[..., Iterator[dict]]  # with `acm_jax.data.make_iterator`'s signature
  group_masks: bool = False  # ask the test iterator for masks of token groups (with_masks=True)
  # train batches come with uint8 images (`make_iterator(uint8_images=True)`), normalised in the step:
  # a 224 px batch of 128 costs the host 22 ms to normalise and a quarter of the bytes to transfer
  uint8_images: bool = False
  # metrics computed on the host from [(task.host_outputs, batch), ...] of every eval batch (e.g. WER)
  host_metrics: Callable[[list[tuple[Any, dict]]], dict] | None = None
  load_init: Callable[[str, PyTree], PyTree] | None = None  # reads --init: (path, expected params) -> params
  partitioner: sharding_lib.Partitioner | None = None  # None: from config.mesh / config.sharding

  def __post_init__(self):
    if self.partitioner is None:
      object.__setattr__(self, "partitioner", sharding_lib.Partitioner.from_flags(
          self.config.mesh, self.config.sharding))
    self.partitioner.check_batch_size(self.config.batch_size, "--batch_size")
    self.partitioner.check_batch_size(self.config.eval_batch_size, "--eval_batch_size")

  @property
  def workdir(self) -> Path:
    return Path(self.config.workdir)

  def run_dir(self, phase: str) -> Path:
    cfg = self.config
    finetune = (f"finetune_b{cfg.budget:.2f}" if not cfg.budget_conditioning
                else f"finetune_any_b{cfg.budget_min:.3f}-{cfg.budget_max:.3f}"
                + ("_log" if cfg.budget_draw == "log_uniform" else "")
                + (f"_g{cfg.budget_groups}" if cfg.budget_groups > 1 else ""))
    names = {"finetune": finetune,
             "static": f"static_k{self.config.resolved_static_k}"}
    return self.workdir / names.get(phase, phase)


def init_params(exp: Experiment, model: str, seed: int) -> PyTree:
  """Fresh params, computed on the host CPU: XLA:GPU takes minutes to compile the
  random init of a ViT-B (about 220 s on an H100, against seconds on the CPU);
  the phases then place them on the mesh. Traced in gumbel mode (same params as
  any mode) so that no GPU inference kernel is lowered for the CPU."""
  with jax.default_device(_host()):
    return jax.jit(lambda rng: init_variables(exp, model, rng)["params"])(jax.random.key(seed))


def init_variables(exp: Experiment, model: str, rng: jax.Array) -> PyTree:
  """`model.init` ("dense" or "acm") on the sample input, without kernels (`acm.init_without_kernels`)."""
  module = exp.task.dense_model if model == "dense" else exp.task.acm_model
  return acm_lib.init_without_kernels(module, rng, exp.sample_input)


def _host() -> jax.Device | None:
  try:
    return jax.local_devices(backend="cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS excludes the CPU: the default device
    return None


def acm_params(exp: Experiment, dense: PyTree, seed: int) -> PyTree:
  """The ACM model's params from the dense model's, on the host CPU: `acmize` (learners from the
  dense weights, everything outside the ACMs copied) with fresh gates (`fresh_gates`).

  What `acmize(dense, init_params(exp, "acm", seed), ...)` makes up to the gates' random draws,
  without the ACM model's init: XLA compiles every random initialiser of a model separately, so
  that init's compile grows with the ACMs' parameters (ViT-B/16 with MLP + q/k/v/o ACMs: 37.6 s
  on an H200's host, against 4.9 s for the dense model), and acmize replaces all but the gates.
  Gates include the budget conditioning when the config asks for it."""
  abstract = abstract_params(exp, "acm")
  shapes = flatten(jax.eval_shape(transformer.unstack_blocks, abstract))
  host = _host()
  with jax.default_device(host):
    gates = fresh_gates(exp, seed, shapes)
  # Built in numpy (slices, SVDs, stacking) and placed once: as jax ops, every slice, stack and
  # bias row was a dispatch and each new shape a compile (ViT-B/16 mlp_qkvo: 33 compiles, 931
  # dispatches, 2.5-4.3 s of a 2-core VM's time besides the projections' SVDs).
  as_numpy = lambda tree: jax.tree.map(np.asarray, tree)
  # the learners and the rest stay shapes: acmize fills them from the dense params
  template = unflatten({**shapes, **{f"{path}/gate/{k}": v for path, gate in as_numpy(gates).items()
                                     for k, v in flatten(gate).items()}})
  params = acmize(as_numpy(dense), template, exp.task.paths, num_learners=exp.config.num_learners)
  params = transformer.stack_blocks(params) if transformer.is_stacked(abstract) else params
  return jax.device_put(params, host)


def fresh_gates(exp: Experiment, seed: int, shapes: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, PyTree]:
  """{ACM path: freshly initialised `acm.Gate` params} for every ACM of the task (unrolled paths).

  shapes: the ACM model's flat params with unrolled blocks, as shapes. ACM m's gate is
  `Gate.init` with the key `fold_in(key(seed), m)`: one compiled init per kind of gate, called
  once per ACM (a vmap over the keys compiles several times slower), so a scanned model gets
  the unrolled model's gates, stacked."""
  key = jax.random.key(seed)
  inits = {}
  gates = {}
  for m, spec in enumerate(exp.task.acm_specs):
    dim = shapes[f"{spec.path}/w1"].shape[0]
    kind = (dim, spec.num_learners, spec.gate_depth, spec.gate_hidden)
    if kind not in inits:
      gate = acm_lib.Gate(spec.num_learners + 1, spec.gate_depth, spec.gate_hidden, exp.config.budget_conditioning)
      inits[kind] = jax.jit(lambda k, index, gate=gate, dim=dim: gate.init(
          jax.random.fold_in(k, index), jnp.zeros((1, dim)))["params"])
    gates[spec.path] = inits[kind](key, m)
  return gates


def abstract_params(exp: Experiment, model: str) -> PyTree:
  """Shapes and dtypes of the params, without running (or compiling) an init."""
  return jax.eval_shape(lambda: init_variables(exp, model, jax.random.key(0))["params"])


def new_state(params: PyTree, tx, seed: int) -> PyTree:
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
          "rng": jax.random.key_data(jax.random.key(seed))}


def train_batches(exp: Experiment, split: str = "train", with_masks: bool = False):
  cfg = exp.config
  uint8 = {"uint8_images": True} if exp.uint8_images else {}
  return lambda start: exp.iterator(cfg.dataset, split, cfg.batch_size, image_size=cfg.image_size,
                                    seed=cfg.seed, data_dir=cfg.data_dir, start_step=start, with_masks=with_masks,
                                    augment=cfg.augment, mixup=cfg.mixup, cutmix=cfg.cutmix, **uint8)


def optimizer(exp: Experiment, phase: str, params: PyTree, trainable=lambda path: True, **fast):
  cfg = exp.config
  return optim.make_optimizer(params, lr=cfg.phase_lr(phase), steps=cfg.phase_steps(phase),
                              warmup_fraction=cfg.warmup_fraction, weight_decay=cfg.weight_decay,
                              clip_norm=cfg.clip_norm, trainable=trainable, **fast)


def keyed_step(step_fn, parts: sharding_lib.Partitioner, state_shardings: PyTree, teacher: PyTree = None):
  """Adapts a step over a raw-key state to one the loop can checkpoint, jitted with
  explicit shardings and the state donated. A frozen `teacher` goes in as an
  argument (a closed-over one would be baked into the program as constants)."""
  frozen = () if teacher is None else (teacher,)

  def wrapped(state, batch, *frozen):
    if batch.get("image") is not None and batch["image"].dtype == jnp.uint8:  # `Experiment.uint8_images`
      batch = {**batch, "image": synthetic.normalize_jax(batch["image"])}
    new_state, metrics = step_fn(*frozen, {**state, "rng": jax.random.wrap_key_data(state["rng"])}, batch)
    return {**new_state, "rng": state["rng"]}, metrics

  jitted = parts.jit(wrapped, (state_shardings, parts.batch_sharding(), *map(parts.shardings, frozen)),
                     (state_shardings, parts.replicated), donate_argnums=0)
  step = lambda state, batch: jitted(state, batch, *frozen)
  step.lower = lambda state, batch: jitted.lower(state, batch, *frozen)  # for memory and cost analyses
  return step


def prepare(exp: Experiment, phase: str, params: PyTree, tx, step_fn, teacher: PyTree = None):
  """A phase's initial state placed on the mesh, its jitted step and its sharded
  batches (`batches(start_step)`). `step_fn(state, batch)`, or
  `step_fn(teacher, state, batch)` with a teacher."""
  cfg = exp.config
  parts = exp.partitioner
  seed = cfg.seed + 17 * len(phase)
  state, shardings = parts.create(lambda p: new_state(p, tx, seed), parts.put(params))
  teacher = None if teacher is None else parts.put(teacher)
  batches = lambda start: (parts.shard_batch(b, cfg.batch_size) for b in train_batches(exp)(start))
  return state, keyed_step(step_fn, parts, shardings, teacher), batches


def train(exp: Experiment, phase: str, params: PyTree, tx, step_fn, teacher: PyTree = None) -> PyTree:
  cfg = exp.config
  state, step, batches = prepare(exp, phase, params, tx, step_fn, teacher)
  final = loop.run(name=phase, run_dir=exp.run_dir(phase), state=state, step_fn=step,
                   batches=batches, num_steps=cfg.phase_steps(phase),
                   checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every, config_json=cfg.to_json(),
                   resume_fields=cfg.resume_fields(phase))
  return final["params"]


def load_phase_params(exp: Experiment, phase: str, model: str = "acm") -> PyTree:
  """The finished params of `phase` (host arrays), once its config.json agrees with this
  config on what the params are (model, data, ACM; not how they were trained)."""
  cfg = exp.config
  loop.check_config(exp.run_dir(phase), cfg.to_json(), cfg.model_fields(phase))
  hint = f"{phase} phase (or pass --init)" if phase == "pretrain" else f"{phase} phase"
  expected = abstract_params(exp, model)
  if phase != "finetune":  # only a finetuning conditions the gates on the budget
    expected = without_budget_film(expected)
  return loop.load_params(exp.run_dir(phase), expected, hint)


def _is_film(key: str) -> bool:
  return f"/gate/{acm_lib.BUDGET_FILM}/" in "/" + key


def without_budget_film(params: PyTree) -> PyTree:
  """params without the gates' budget conditioning: distill and gates train and save the plain
  model, so that their runs serve conditioned and plain finetunings alike."""
  return unflatten({k: v for k, v in flatten(params).items() if not _is_film(k)})


def with_budget_film(exp: Experiment, params: PyTree) -> PyTree:
  """Plain params plus freshly initialised (zero: the gates unchanged) budget conditioning."""
  shapes = flatten(jax.eval_shape(transformer.unstack_blocks, abstract_params(exp, "acm")))
  with jax.default_device(_host()):
    fresh = {f"{path}/gate/{k}": v for path, gate in fresh_gates(exp, exp.config.seed, shapes).items()
             for k, v in flatten(gate).items() if _is_film(f"gate/{k}")}
  if transformer.is_stacked(params):
    return transformer.stack_blocks(unflatten({**flatten(transformer.unstack_blocks(params)), **fresh}))
  return unflatten({**flatten(params), **fresh})


def dense_params(exp: Experiment) -> PyTree:
  if exp.config.init is not None:
    expected = init_params(exp, "dense", 0)
    if exp.load_init is None:
      raise ValueError(f"--init={exp.config.init}: this task has no checkpoint reader (Experiment.load_init)")
    if not transformer.is_stacked(expected):
      return exp.load_init(exp.config.init, expected)
    # the readers know the unrolled block_{i} names of every published checkpoint
    return transformer.stack_blocks(exp.load_init(exp.config.init, transformer.unstack_blocks(expected)))
  return load_phase_params(exp, "pretrain", "dense")


def pretrain(exp: Experiment) -> PyTree:
  params = init_params(exp, "dense", exp.config.seed)
  tx = optimizer(exp, "pretrain", params)
  step = functools.partial(steps.pretrain_step, exp.task, tx, exp.config.label_smoothing)
  return train(exp, "pretrain", params, tx, step)


def _owners(paths: list[str], key: str) -> list[str]:
  """The ACM paths that a flat parameter key can lie under; the key of a scanned model
  ("blocks/mlp/w1") stands for every layer's ACM ("block_{i}/mlp")."""
  if key.startswith(transformer.STACKED + "/"):
    paths = {re.sub(r"^block_\d+/", transformer.STACKED + "/", p) for p in paths}
  return [p for p in paths if key.startswith(p + "/")]


def is_learner(paths: list[str], key: str) -> bool:
  return any("/gate/" not in key[len(p):] for p in _owners(paths, key))


def is_gate(paths: list[str], key: str) -> bool:
  return any(key.startswith(p + "/gate/") for p in _owners(paths, key))


def distill(exp: Experiment) -> PyTree:
  teacher = dense_params(exp)
  params = without_budget_film(acm_params(exp, teacher, exp.config.seed))
  tx = optimizer(exp, "distill", params, functools.partial(is_learner, exp.task.paths))
  step = functools.partial(steps.distill_step, exp.task, tx, exp.config.grad_mode)
  params = train(exp, "distill", params, tx, step, teacher)
  write_json(exp.run_dir("distill") / "distill_errors.json", distill_errors(exp, teacher, params))
  return params


def gates(exp: Experiment) -> PyTree:
  teacher = dense_params(exp)
  params = load_phase_params(exp, "distill")
  tx = optimizer(exp, "gates", params, functools.partial(is_gate, exp.task.paths))
  cfg = exp.config
  step = functools.partial(steps.gate_step, exp.task, tx, cfg.gating_error_factor, cfg.label_rule)
  params = train(exp, "gates", params, tx, step, teacher)
  write_json(exp.run_dir("gates") / "label_distribution.json", label_distribution(exp, teacher, params))
  return params


def finetune(exp: Experiment) -> PyTree:
  params = load_phase_params(exp, "gates")
  cfg = exp.config
  if cfg.budget_conditioning:
    params = with_budget_film(exp, params)
  tx = optimizer(exp, "finetune", params, fast=functools.partial(is_gate, exp.task.paths),
                  fast_lr_scale=cfg.finetune_gate_lr_scale)
  weights = steps.FinetuneWeights(cfg.budget, cfg.budget_loss, cfg.budget_weight, cfg.entropy_weight,
                                  cfg.diversity_weight, cfg.gate_temperature, cfg.label_smoothing,
                                  cfg.gate_task_gradient, cfg.budget_range, cfg.budget_weight_power,
                                  cfg.budget_draw, cfg.budget_groups if cfg.budget_conditioning else 1)
  return train(exp, "finetune", params, tx, functools.partial(steps.finetune_step, exp.task, tx, weights))


def static(exp: Experiment) -> PyTree:
  """The static-width baseline, finetuned from the distilled learners like the ACM."""
  params = load_phase_params(exp, "distill")
  cfg = exp.config
  tx = optimizer(exp, "static", params, lambda key: not is_gate(exp.task.paths, key))
  step = functools.partial(steps.static_step, exp.task, tx, cfg.resolved_static_k, cfg.label_smoothing)
  return train(exp, "static", params, tx, step)


# --- evaluation ------------------------------------------------------------------


def eval_batches(exp: Experiment, with_masks: bool):
  """Test batches padded to a fixed size (with a "valid" mask) so eval compiles once."""
  cfg = exp.config
  seen = 0
  for batch in exp.iterator(cfg.dataset, "test", cfg.eval_batch_size, image_size=cfg.image_size,
                            seed=cfg.seed, data_dir=cfg.data_dir, with_masks=with_masks):
    n = len(batch["label"])
    if cfg.eval_examples is not None:
      n = min(n, cfg.eval_examples - seen)
    pad = cfg.eval_batch_size - n
    batch = {k: np.concatenate([v[:n], np.repeat(v[:1], pad, 0)]) if pad else v for k, v in batch.items()}
    batch["valid"] = np.arange(cfg.eval_batch_size) < n
    yield batch
    seen += n
    if cfg.eval_examples is not None and seen >= cfg.eval_examples:
      return


_EVAL_STEPS: dict[tuple, tuple] = {}  # the last few jitted eval steps, with the objects they were built from


def _eval_step(exp: Experiment, mode: str, fixed_k, cost_shift, forced_k, param_shardings, budget=None):
  """The jitted eval step, reused across calls with the same task, mesh and arguments (evaluating one
  model on many data sets, e.g. the 75 ImageNet-C sets, would otherwise compile it each time)."""
  parts = exp.partitioner
  shift = float(cost_shift) if isinstance(cost_shift, (int, float)) else id(cost_shift)
  key = (id(exp.task), id(parts), mode, fixed_k, shift, id(forced_k), str(param_shardings), budget)
  hit = _EVAL_STEPS.get(key)
  if hit is None or hit[0] is not exp.task or hit[1] is not parts or hit[2] is not forced_k:
    step = parts.jit(functools.partial(steps.eval_step, exp.task, mode, fixed_k, cost_shift=cost_shift,
                                       forced_k=forced_k, budget=budget),
                     (param_shardings, parts.batch_sharding()), parts.replicated)
    while len(_EVAL_STEPS) >= 8:
      _EVAL_STEPS.pop(next(iter(_EVAL_STEPS)))
    hit = _EVAL_STEPS[key] = (exp.task, parts, forced_k, step)
  return hit[3]


# per-example size (elements) above which `evaluate` does not keep a batch entry for the host metrics
HOST_VIEW_MAX_ELEMENTS = 4096


def _host_view(batch: dict) -> dict:
  """What `evaluate` keeps of an eval batch for `host_metrics`: its small per-example entries (labels,
  lengths, the valid mask), not the images or audio, which would otherwise stay in host memory for
  the whole test split (50,000 ImageNet images)."""
  return {k: v for k, v in batch.items() if np.size(v) <= HOST_VIEW_MAX_ELEMENTS * max(len(v), 1)}


def evaluate(exp: Experiment, params: PyTree, model: str, mode: str, fixed_k: int | None = None,
             cost_shift: float = 0.0, forced_k: Callable[[dict], jax.Array] | None = None,
             budget: float | None = None) -> dict:
  """Top-1, GFLOPs/image, mean k and share of each k per ACM on the test split.
  `forced_k(batch)` -> per-token k overrides the gates (see `steps.eval_step`). `budget`: the
  target of budget-conditioned gates (default: --budget for params that have them, e.g. not
  the static baseline's under a conditioned config)."""
  if budget is None and exp.config.budget_conditioning and any(map(_is_film, flatten(params))):
    budget = exp.config.budget
  parts = exp.partitioner
  params = parts.put(params)
  step = _eval_step(exp, mode, fixed_k, cost_shift, forced_k, parts.shardings(params),
                    None if budget is None else float(budget))
  totals, host = None, []
  for batch in eval_batches(exp, with_masks=exp.group_masks):
    out = jax.device_get(step(params, parts.shard_batch(batch, exp.config.eval_batch_size)))
    if "host" in out:
      host.append((out.pop("host"), _host_view(batch)))
    totals = out if totals is None else jax.tree.map(np.add, totals, out)
  if totals is None:
    raise ValueError(f"the test split of {exp.config.dataset!r} produced no examples")
  scores = totals["scores"]
  record = {"model": model, "examples": int(scores["examples"])}
  record.update({name: float(value / scores["examples"]) for name, value in scores.items() if name != "examples"})
  if exp.host_metrics is not None:
    record.update(exp.host_metrics(host))
  if mode == "dense":
    record["gflops_per_image"] = flops_lib.gflops(exp.flops(None, True)["total"])
    return record
  hist = {path: np.asarray(h) for path, h in totals["k_hist"].items()}
  mean_k = {path: float(h @ np.arange(len(h)) / h.sum()) for path, h in hist.items()}
  counts = exp.flops(mean_k, False)
  specs = exp.task.acm_specs
  record.update(
      gflops_per_image=flops_lib.gflops(counts["total"]),
      gate_gflops_per_image=flops_lib.gflops(counts["gate"]),
      compute_fraction=float(acm_lib.compute_fraction([mean_k[s.path] for s in specs],
                                                      [s.learner_cost for s in specs],
                                                      [s.num_learners for s in specs])),
      mean_k_per_layer=mean_k,
      k_share_per_layer={path: (h / h.sum()).tolist() for path, h in hist.items()},
      distinct_k_per_layer={path: int(np.sum(h > 0)) for path, h in hist.items()})
  groups = {}
  for path_groups in totals["groups"].values():
    for name, (k_sum, count) in path_groups.items():
      acc = groups.setdefault(name, [0.0, 0.0])
      acc[0] += float(k_sum)
      acc[1] += float(count)
  if groups:
    record["mean_k_per_group"] = {name: s / max(c, 1.0) for name, (s, c) in groups.items()}
  return record


def _per_acm_on_test(exp: Experiment, teacher: PyTree, params: PyTree, fn, max_batches: int) -> dict:
  """Stacks `fn(spec, prefix, y, real)` per ACM over a few test batches, where prefix
  holds the learners' outputs for every k on the dense teacher's block inputs and
  real the (batch, tokens) mask of real (unpadded) tokens."""
  @jax.jit
  def per_batch(batch):
    records = steps.teacher_records(exp.task, teacher, batch)
    learners = transformer.unstack_blocks(params)
    real = steps.real_tokens(exp.task, batch)
    out = {}
    for spec in exp.task.acm_specs:
      x, y = records[spec.path]
      prefix = acm_lib.prefix_outputs(steps.learner_params(learners, spec.path), x,
                                      num_learners=spec.num_learners, activation=spec.activation)
      out[spec.path] = fn(spec, prefix, y, jnp.ones(y.shape[:2]) if real is None else real)
    return out

  results = [jax.device_get(per_batch(b)) for _, b in zip(range(max_batches), eval_batches(exp, False))]
  return {path: np.stack([r[path] for r in results]) for path in exp.task.paths}


def distill_errors(exp: Experiment, teacher: PyTree, params: PyTree, max_batches: int = 4) -> dict:
  """Mean squared error of every choice k = 0..N per ACM on held-out tokens."""
  def mse(spec, prefix, y, real):
    return losses.token_mean(jnp.mean(jnp.square(prefix - y[..., None, :]), axis=-1), real, (0, 1))  # (N+1,)

  return {path: v.mean(0).tolist() for path, v in _per_acm_on_test(exp, teacher, params, mse, max_batches).items()}


def label_distribution(exp: Experiment, teacher: PyTree, params: PyTree, max_batches: int = 4) -> dict:
  """Share of each artificial label k per ACM on held-out tokens."""
  cfg = exp.config

  def histogram(spec, prefix, y, real):
    labels = losses.gate_labels(losses.choice_errors(prefix, y), cfg.gating_error_factor, cfg.label_rule)
    return jnp.bincount(jnp.maximum(labels, spec.min_choice).reshape(-1), weights=real.reshape(-1),
                        length=spec.num_learners + 1)

  totals = _per_acm_on_test(exp, teacher, params, histogram, max_batches)
  return {path: (t.sum(0) / t.sum()).tolist() for path, t in totals.items()}


def write_json(path: Path, payload: Any) -> None:
  """Written whole or not at all: a stop signal may land while it writes, and a rerun reuses the file."""
  if loop.is_main_process():
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    tmp.replace(path)
