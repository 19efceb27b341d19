"""One pure step function per phase, generic over the model through a `Task`.

A `Task` bundles a dense model, its ACMized twin, how a batch feeds them and
how their outputs are scored; the ViT and Wav2Vec2 differ only there, so they
share every step, the loop and the phases.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from acm_jax import acm as acm_lib
from acm_jax import flops as flops_lib
from acm_jax import losses
from acm_jax.transformer import STACKED, is_stacked, unstack_blocks
from acm_jax.acmize import flatten, subtree
from acm_jax.pytree import PyTree


@dataclasses.dataclass(frozen=True)
class ACMSpec:
  """What the steps need to know about one ACM of the model."""
  path: str
  activation: str
  min_choice: int
  learner_cost: float
  num_learners: int
  gate_depth: int
  gate_hidden: int


def acm_specs(model_config) -> list[ACMSpec]:
  """One spec per ACM of a transformer config (ViT or Wav2Vec2): MLP ACMs use the model's
  activation and may skip (min choice 0); attention projections are identity and never skip."""
  acm = model_config.acm
  specs = []
  for path, cost in zip(model_config.acm_paths(), flops_lib.learner_costs(model_config)):
    is_mlp = path.endswith("/mlp")
    specs.append(ACMSpec(path, model_config.activation if is_mlp else "identity", 0 if is_mlp else 1,
                         cost, acm.num_learners, acm.gate_depth, acm.gate_hidden))
  return specs


@dataclasses.dataclass(frozen=True)
class Task:
  """Model-specific pieces. `inputs(batch)` feeds the models; `loss(outputs, batch,
  label_smoothing)` gives the task loss; `score(outputs, batch)` gives a dict of
  sums to accumulate in eval (at least "examples"); `token_groups(batch)`
  optionally gives named (batch, tokens) boolean masks, e.g. object/background,
  on which eval reports the mean k. `host_outputs(outputs, batch)` optionally
  picks per-batch arrays that eval hands to the host unsummed (e.g. greedy CTC
  ids, decoded into transcripts for WER). `token_mask(batch)` optionally gives the
  (batch, tokens) mask of real tokens when batches are padded (speech frames past an
  utterance's end): the distillation, gate and finetuning losses, the compute
  fraction and eval's k statistics then count real tokens only."""
  dense_model: nn.Module
  acm_model: nn.Module
  acm_specs: tuple[ACMSpec, ...]
  inputs: Callable[[dict], Any]
  loss: Callable[[jax.Array, dict, float], jax.Array]
  score: Callable[[jax.Array, dict], dict[str, jax.Array]]
  token_groups: Callable[[dict], dict[str, jax.Array]] | None = None
  host_outputs: Callable[[jax.Array, dict], Any] | None = None
  token_mask: Callable[[dict], jax.Array] | None = None

  @property
  def paths(self) -> list[str]:
    return [s.path for s in self.acm_specs]


def real_tokens(task: Task, batch: dict) -> jax.Array | None:
  """(batch, tokens) float32 mask of real tokens, or None when every token is real."""
  return None if task.token_mask is None else task.token_mask(batch).astype(jnp.float32)


def step_rng(state: PyTree) -> jax.Array:
  return jax.random.fold_in(state["rng"], state["step"])


def apply_update(tx: optax.GradientTransformation, state: PyTree, grads: PyTree) -> PyTree:
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  return {**state, "params": optax.apply_updates(state["params"], updates),
          "opt_state": opt_state, "step": state["step"] + 1}


def record_state(task: Task, teacher_params: PyTree, batch: dict) -> PyTree:
  """The dense teacher's sown "record" collection: each replaceable block's (input, output),
  stacked on a leading layer axis under `blocks` when the model scans its blocks."""
  _, state = task.dense_model.apply({"params": teacher_params}, task.inputs(batch), mutable=["record"])
  return state["record"]


def records_by_path(records: PyTree) -> dict[str, tuple]:
  """{path: (x, y)} per ACM path of a `record_state` (unstacked)."""
  return {key[: -len("/io")]: value for key, value in flatten(unstack_blocks(records)).items()}


def teacher_records(task: Task, teacher_params: PyTree, batch: dict) -> dict[str, tuple]:
  """Input and output of every replaceable dense block, {path: (x, y)}."""
  return records_by_path(record_state(task, teacher_params, batch))


_IN_BLOCK = re.compile(r"block_(\d+)/(.+)$")


def _kinds_per_layer(task: Task) -> dict[str, ACMSpec] | None:
  """{path inside a block: spec} when every ACM sits in an encoder block and every block has the
  same ACMs (as a scanned model's must), else None."""
  kinds, layers = {}, set()
  for spec in task.acm_specs:
    match = _IN_BLOCK.match(spec.path)
    if match is None:
      return None
    layers.add(int(match.group(1)))
    kinds.setdefault(match.group(2), spec)
  return kinds if len(kinds) * len(layers) == len(task.acm_specs) else None


def per_acm(task: Task, params: PyTree, records: PyTree, fn: Callable, extra: jax.Array | None = None) -> jax.Array:
  """fn(spec, the ACM's params (learners and gate), x, y[, its row of extra]) -> array, for every
  ACM, stacked: (number of ACMs, ...). `extra`: an array with one row per ACM in this function's
  order (e.g. an earlier call's result), handed to fn row by row.

  A scanned model (params and records stacked on the layer axis) runs each kind of ACM (its
  path inside a block) once, vmapped over the layers: 5 traced calls instead of 60 for a
  ViT-B/16 with its attention projections ACMized, and matmuls batched over the 12 layers.
  The order of the rows is then kind by kind, not `task.acm_specs`'; callers reduce over them
  or pass them back as `extra`."""
  rows = (lambda start, count: ()) if extra is None else (lambda start, count: (extra[start:start + count],))
  kinds = _kinds_per_layer(task) if is_stacked(params) and is_stacked(records) else None
  if kinds is not None:
    flat, out = flatten(records[STACKED]), []
    layers = len(task.acm_specs) // len(kinds)
    for i, (kind, spec) in enumerate(kinds.items()):
      one = lambda p, x, y, *more, spec=spec: fn(spec, p, x, y, *more)
      out.append(jax.vmap(one)(subtree(params[STACKED], kind), *flat[f"{kind}/io"], *rows(i * layers, layers)))
    return jnp.concatenate(out)
  params, by_path = unstack_blocks(params), records_by_path(records)
  return jnp.stack([fn(spec, subtree(params, spec.path), *by_path[spec.path], *(r[0] for r in rows(i, 1)))
                    for i, spec in enumerate(task.acm_specs)])


def acm_choices(task: Task, acm_state: PyTree) -> list[jax.Array]:
  """Each ACM's sown one-hot choices, in `task.paths` order (a scanned model's per layer)."""
  flat = flatten(unstack_blocks(acm_state["acm"]))
  return [flat[f"{path}/choice"][0] for path in task.paths]


def learner_params(params: PyTree, path: str) -> dict[str, jax.Array]:
  """The learners of the ACM at `path` (e.g. "block_3/mlp"); params of a scanned model
  must be unstacked first (`transformer.unstack_blocks`, once per step)."""
  return learners_of(subtree(params, path))


def learners_of(acm_params: PyTree) -> dict[str, jax.Array]:
  """The learner weights (w1, b1, w2, b2) of one ACM's parameter subtree, without its gate."""
  return {name: acm_params[name] for name in ("w1", "b1", "w2", "b2") if name in acm_params}


def apply_gate(spec: ACMSpec, gate_params: PyTree, x: jax.Array, budget: float | jax.Array | None = None) -> jax.Array:
  """The masked float32 gate logits of one ACM from its gate's params (e.g. one layer's, inside a
  scanned stack of blocks); `budget` for a budget-conditioned gate (see `acm.Gate`)."""
  gate = acm_lib.Gate(spec.num_learners + 1, spec.gate_depth, spec.gate_hidden, budget is not None)
  logits = gate.apply({"params": gate_params}, x, budget).astype(jnp.float32)
  return acm_lib.mask_choices(logits, spec.min_choice)


def pretrain_step(task: Task, tx: optax.GradientTransformation, label_smoothing: float,
                  state: PyTree, batch: dict) -> tuple[PyTree, dict]:
  def loss_fn(params):
    outputs = task.dense_model.apply({"params": params}, task.inputs(batch))
    return task.loss(outputs, batch, label_smoothing), outputs

  (loss, outputs), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  scores = task.score(outputs, batch)
  return apply_update(tx, state, grads), {"loss": loss, **_rates(scores)}


def distill_step(task: Task, tx: optax.GradientTransformation, grad_mode: str,
                 teacher_params: PyTree, state: PyTree, batch: dict) -> tuple[PyTree, dict]:
  """Module-wise distillation of every ACM from the dense teacher's activations."""
  records = record_state(task, teacher_params, batch)
  mask = real_tokens(task, batch)

  def module_loss(spec, acm, x, y):
    return losses.learner_distillation_loss(learners_of(acm), x, y, mask, num_learners=spec.num_learners,
                                            activation=spec.activation, grad_mode=grad_mode)

  def loss_fn(params):
    return jnp.mean(per_acm(task, params, records, module_loss))

  loss, grads = jax.value_and_grad(loss_fn)(state["params"])
  return apply_update(tx, state, grads), {"loss": loss}


def gate_step(task: Task, tx: optax.GradientTransformation, factor: float, label_rule: str,
              teacher_params: PyTree, state: PyTree, batch: dict) -> tuple[PyTree, dict]:
  """Gates learn the artificial labels computed with the frozen learners."""
  records = record_state(task, teacher_params, batch)
  mask = real_tokens(task, batch)

  def labels(spec, acm, x, y):
    prefix = acm_lib.prefix_outputs(learners_of(acm), x, num_learners=spec.num_learners, activation=spec.activation)
    return jnp.maximum(losses.gate_labels(losses.choice_errors(prefix, y), factor, label_rule), spec.min_choice)

  targets = per_acm(task, jax.lax.stop_gradient(state["params"]), records, labels)  # (ACMs, batch, tokens)

  def loss_fn(params):
    def loss_and_hits(spec, acm, x, y, target):
      logits = apply_gate(spec, acm["gate"], x)
      hit = (jnp.argmax(logits, -1) == target).astype(jnp.float32)
      return jnp.stack([losses.gate_loss(logits, target, mask), losses.token_mean(hit, mask, (0, 1))])

    per_module = per_acm(task, params, records, loss_and_hits, targets)
    return jnp.mean(per_module[:, 0]), jnp.mean(per_module[:, 1])

  (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  mean_label = jnp.mean(targets.astype(jnp.float32))  # every ACM labels the same number of tokens
  return apply_update(tx, state, grads), {"loss": loss, "label_accuracy": accuracy, "mean_label": mean_label}


@dataclasses.dataclass(frozen=True)
class FinetuneWeights:
  budget: float = 0.5
  budget_kind: str = "l1"
  budget_weight: float = 1.0  # see ExperimentConfig.budget_weight
  entropy_weight: float = 0.5  # see ExperimentConfig
  diversity_weight: float = 0.05
  temperature: float = 1.0
  label_smoothing: float = 0.0
  gate_task_gradient: bool = True  # False: the task loss does not train the gates (see ExperimentConfig)
  # (low, high): budget-conditioned gates; each step draws its budget from this range (`budget_draw`), feeds
  # it to the gates and uses it as the budget loss's target (`budget` is then unused)
  budget_range: tuple[float, float] | None = None
  budget_weight_power: float = 0.0  # the budget loss weight is budget_weight / target ** this
  budget_draw: str = "uniform"  # one of BUDGET_DRAWS: how `budget_range` is sampled
  # with `budget_range`: the batch split into this many equal groups, each with its own budget, one
  # draw in each of as many equal slices of the range (in the budget or its log, by `budget_draw`)
  budget_groups: int = 1


BUDGET_DRAWS = ("uniform", "log_uniform")


def budget_loss_weight(weights: FinetuneWeights, target: jax.Array) -> jax.Array:
  """The budget loss's weight at one step's target budget: `budget_weight / target ** budget_weight_power`."""
  return weights.budget_weight * jnp.power(target, -weights.budget_weight_power)


def draw_budget(weights: FinetuneWeights, rng: jax.Array) -> jax.Array:
  """One step's target budget: `weights.budget`, or a draw from `weights.budget_range`, uniform
  in the budget or (log_uniform) in its logarithm. With `budget_groups` G > 1 a (G,) array,
  stratified: draw g falls in slice g of G equal slices of the range (of its log)."""
  if weights.budget_range is None:
    return jnp.float32(weights.budget)
  low, high = weights.budget_range
  log = weights.budget_draw == "log_uniform"
  lo, hi = (math.log(low), math.log(high)) if log else (low, high)
  groups = weights.budget_groups
  shape = (groups,) if groups > 1 else ()
  drawn = jax.random.uniform(rng, shape, jnp.float32, lo, hi)
  if groups > 1:  # the g-th draw moved into the g-th of `groups` equal slices of [lo, hi]
    drawn = lo + (jnp.arange(groups, dtype=jnp.float32) + (drawn - lo) / (hi - lo)) * ((hi - lo) / groups)
  # clipped because exp(log(high)) can round a float32 ulp past high
  return jnp.clip(jnp.exp(drawn), low, high) if log else jnp.clip(drawn, low, high)


def _budget_groups(choices: list[jax.Array], mask: jax.Array | None, groups: int):
  """The choices (and mask) of each of `groups` equal, consecutive slices of the batch."""
  size = choices[0].shape[0] // groups
  for g in range(groups):
    part = slice(g * size, (g + 1) * size)
    yield [c[part] for c in choices], None if mask is None else mask[part]


def finetune_step(task: Task, tx: optax.GradientTransformation, weights: FinetuneWeights,
                  state: PyTree, batch: dict) -> tuple[PyTree, dict]:
  """End to end: task loss + budget, entropy and diversity losses, Gumbel gates."""
  rng = step_rng(state)
  costs = [s.learner_cost for s in task.acm_specs]
  mask = real_tokens(task, batch)

  mode = "gumbel" if weights.gate_task_gradient else "gumbel_detached"
  target = draw_budget(weights, jax.random.fold_in(rng, 1))
  conditioned = weights.budget_range is not None

  if target.ndim:
    batch_size = jax.tree.leaves(task.inputs(batch))[0].shape[0]
    if batch_size % target.shape[0]:
      raise ValueError(f"budget_groups {target.shape[0]} does not divide the batch of {batch_size}")
  # each example's budget, in the groups' order (consecutive slices of the batch)
  gate_budget = jnp.repeat(target, batch_size // target.shape[0]) if target.ndim else target

  def loss_fn(params):
    with acm_lib.with_budget(gate_budget) if conditioned else contextlib.nullcontext():
      outputs, aux = task.acm_model.apply(
          {"params": params}, task.inputs(batch), mode=mode, temperature=weights.temperature,
          mutable=["acm"], rngs={"gumbel": rng})
    choices = acm_choices(task, aux)
    task_loss = task.loss(outputs, batch, weights.label_smoothing)
    entropy = losses.entropy_loss(choices, mask)
    # each group's budget and diversity losses, averaged over the groups (one group: the whole batch)
    targets = jnp.atleast_1d(target)
    parts = list(_budget_groups(choices, mask, targets.shape[0]))
    budget = jnp.stack([losses.budget_loss(c, costs, t, weights.budget_kind, m) for (c, m), t in zip(parts, targets)])
    weighted = jnp.mean(budget_loss_weight(weights, targets) * budget)
    budget = jnp.mean(budget)
    diversity = jnp.mean(jnp.stack([losses.diversity_loss(c, m) for c, m in parts]))
    total = task_loss + weighted + weights.entropy_weight * entropy + weights.diversity_weight * diversity
    metrics = {"task_loss": task_loss, "budget_loss": budget, "entropy_loss": entropy,
               "diversity_loss": diversity, "compute": losses.compute_fraction(choices, costs, mask),
               "budget": jnp.mean(target)}
    return total, (outputs, metrics)

  (loss, (outputs, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  return apply_update(tx, state, grads), {"loss": loss, **metrics, **_rates(task.score(outputs, batch))}


def static_step(task: Task, tx: optax.GradientTransformation, fixed_k: int, label_smoothing: float,
                state: PyTree, batch: dict) -> tuple[PyTree, dict]:
  """The static-width baseline: every ACM runs its first `fixed_k` learners."""
  def loss_fn(params):
    outputs, _ = task.acm_model.apply({"params": params}, task.inputs(batch), mode="fixed",
                                      fixed_k=fixed_k, mutable=["acm"])
    return task.loss(outputs, batch, label_smoothing), outputs

  (loss, outputs), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  return apply_update(tx, state, grads), {"loss": loss, **_rates(task.score(outputs, batch))}


def eval_step(task: Task, mode: str, fixed_k: int | None, params: PyTree, batch: dict,
              cost_shift: float = 0.0, forced_k: Callable[[dict], jax.Array] | None = None,
              budget: float | None = None) -> dict:
  """Sums over one batch: task scores, and per ACM a histogram of k (N+1,) and,
  for each token group, the sum of k and the token count. `cost_shift` moves the
  gates toward less compute (see `acm.ACM`), e.g. as calibrated to a budget.
  `forced_k(batch)`, when given, sets every ACM's per-token k (see `acm.force_k`).
  `budget`: the target a budget-conditioned model's gates read (see `acm.Gate`)."""
  keep = (lambda outputs: {"host": task.host_outputs(outputs, batch)}) if task.host_outputs else lambda _: {}
  if mode == "dense":
    outputs = task.dense_model.apply({"params": params}, task.inputs(batch))
    return {"scores": task.score(outputs, batch), **keep(outputs)}
  with contextlib.ExitStack() as stack:
    if forced_k is not None:
      stack.enter_context(acm_lib.force_k(forced_k(batch)))
    if budget is not None:
      stack.enter_context(acm_lib.with_budget(budget))
    outputs, aux = task.acm_model.apply({"params": params}, task.inputs(batch), mode=mode,
                                        fixed_k=fixed_k, cost_shift=cost_shift, mutable=["acm"])
  choices = acm_choices(task, aux)
  valid = batch.get("valid")
  out = {"scores": task.score(outputs, batch), "k_hist": {}, "groups": {}, **keep(outputs)}
  groups = task.token_groups(batch) if task.token_groups is not None else {}
  real = real_tokens(task, batch)
  for spec, choice in zip(task.acm_specs, choices):
    weight = jnp.ones(choice.shape[:-1]) if valid is None else jnp.broadcast_to(
        valid[:, None], choice.shape[:-1]).astype(jnp.float32)
    if real is not None:  # padding frames run no learner at inference: they count for nothing
      weight = weight * real
    out["k_hist"][spec.path] = jnp.einsum("bt,btk->k", weight, choice)
    k = jnp.argmax(choice, -1).astype(jnp.float32)
    out["groups"][spec.path] = {name: (jnp.sum(k * mask * weight), jnp.sum(mask * weight))
                                for name, mask in groups.items()}
  return out


def _rates(scores: dict[str, jax.Array]) -> dict[str, jax.Array]:
  return {name: value / scores["examples"] for name, value in scores.items() if name != "examples"}
