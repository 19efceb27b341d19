"""ACMize a Flax Linen model this project did not write, by module paths.

    found = any_flax.find_blocks(model, variables, x, ["*/MlpBlock_*"])   # traced, checked
    acm_model = any_flax.ACMized(model, found, num_learners=4)
    params = acm_model.acmize(variables["params"], jax.random.key(0))      # exact at k = N
    y, aux = acm_model.apply({"params": params}, x, mode="argmax", mutable=["acm"])

A pattern (fnmatch over '/'-joined module paths such as
`Transformer/encoderblock_0/MlpBlock_0`) selects either MLP blocks, modules
whose call runs exactly Dense -> activation -> Dense (dropout in between is
allowed), or single `nn.Dense` projections (optional; identity learners from
the SVD of the kernel). Nothing in the model's code changes: `ACMized.apply`
intercepts the selected modules' calls and runs the ACM from the parameters
stored at their paths (w1, b1, w2, b2 and gate/), with the modes of `acm.ACM`.

`ACMized.dense()` records every selected block's (input, output) and
`ACMized.specs()` describes the ACMs, so `acm_jax.train.steps.Task` takes the
pair as its dense and ACM models and the library's distill, gate and finetune
steps and losses train it (docs/library.md shows it end to end).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from acm_jax import acm as acm_lib
from acm_jax import acmize as acmize_lib
from acm_jax.pytree import PyTree
from acm_jax.train import steps

# tried in this order when telling the activation of an MLP block from its traced call
ACTIVATION_ORDER = ("gelu", "gelu_tanh", "relu", "identity")


@dataclasses.dataclass(frozen=True)
class Block:
  """One module to ACMize: an MLP (Dense `first` -> activation -> Dense `second`) or a
  single projection (`kind="linear"`, identity activation)."""
  path: str
  kind: str  # "mlp" or "linear"
  activation: str
  dim_in: int
  hidden: int  # the MLP's width; for a projection min(dim_in, dim_out), its rank
  dim_out: int
  first: str = ""  # child names of the two Dense layers of an MLP
  second: str = ""


@dataclasses.dataclass
class _Call:
  path: str
  module: nn.Module
  inputs: tuple
  output: Any
  children: list[str] = dataclasses.field(default_factory=list)


def _path(module: nn.Module) -> str:
  return "/".join(module.path)


def trace_calls(model: nn.Module, variables: PyTree, *args, **kwargs) -> dict[str, _Call]:
  """Every module call of one `model.apply`: {path: inputs, output, direct children in call order}."""
  calls: dict[str, _Call] = {}

  def record(next_fun, call_args, call_kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*call_args, **call_kwargs)
    path = _path(context.module)
    parent = "/".join(context.module.path[:-1])
    if parent in calls and path not in calls[parent].children:
      calls[parent].children.append(path)
    calls.setdefault(path, _Call(path, context.module, call_args, None))
    out = next_fun(*call_args, **call_kwargs)
    calls[path].output = out
    return out

  with nn.intercept_methods(record):
    model.apply(variables, *args, **kwargs)
  return calls


def _as_mlp(call: _Call, calls: dict[str, _Call]) -> Block | None:
  """The Block of an MLP module, or None when its call is not Dense -> activation -> Dense."""
  kids = [calls[c] for c in call.children]
  dense = [c for c in kids if isinstance(c.module, nn.Dense)]
  others = [c for c in kids if not isinstance(c.module, (nn.Dense, nn.Dropout))]
  if len(dense) != 2 or others or not call.inputs:
    return None
  first, second = dense
  x, hidden, y = call.inputs[0], first.output, second.output
  if not (isinstance(x, jax.Array) and first.inputs[0] is x and call.output is y):
    return None
  for name in ACTIVATION_ORDER:
    act = acm_lib.get_activation(name)
    if np.allclose(np.asarray(act(hidden)), np.asarray(second.inputs[0]), rtol=1e-5, atol=1e-6):
      return Block(call.path, "mlp", name, x.shape[-1], hidden.shape[-1], y.shape[-1],
                   first.path.rsplit("/", 1)[-1], second.path.rsplit("/", 1)[-1])
  return None


def _as_linear(call: _Call) -> Block | None:
  if not isinstance(call.module, nn.Dense) or not call.inputs:
    return None
  d_in, d_out = call.inputs[0].shape[-1], call.output.shape[-1]
  return Block(call.path, "linear", "identity", d_in, min(d_in, d_out), d_out)


def find_blocks(model: nn.Module, variables: PyTree, *args, patterns: Sequence[str],
                linear: bool = False, **kwargs) -> list[Block]:
  """The blocks that `patterns` select, checked on one traced call of `model.apply(variables, *args, **kwargs)`.

  A pattern must match at least one module, and every module it matches must be an
  MLP block (or, with `linear=True`, an `nn.Dense`); otherwise a ValueError lists the
  paths that would qualify.
  """
  if isinstance(patterns, str):
    patterns = [patterns]
  calls = trace_calls(model, variables, *args, **kwargs)
  mlps = {p: b for p, c in calls.items() if (b := _as_mlp(c, calls)) is not None}
  linears = {p: b for p, c in calls.items() if linear and (b := _as_linear(c)) is not None}
  inside_mlp = {f"{p}/{name}" for p, b in mlps.items() for name in (b.first, b.second)}
  candidates = sorted(mlps) + sorted(p for p in linears if p not in inside_mlp)
  found: dict[str, Block] = {}
  for pattern in patterns:
    matched = [p for p in calls if p and fnmatch.fnmatchcase(p, pattern)]
    if not matched:
      raise ValueError(f"pattern {pattern!r} matches no module of {type(model).__name__}; "
                       f"the modules that can become ACMs: {candidates}")
    bad = [p for p in matched if p not in mlps and p not in linears]
    if bad:
      what = "Dense-activation-Dense or Dense" if linear else "Dense-activation-Dense"
      raise ValueError(f"pattern {pattern!r} matches {bad[:4]}{' ...' if len(bad) > 4 else ''}, which "
                       f"{'is' if len(bad) == 1 else 'are'} not {what}; "
                       f"the modules that can become ACMs: {candidates}")
    found.update({p: mlps.get(p) or linears[p] for p in matched})
  nested = sorted(p for p in found for q in found if p != q and p.startswith(q + "/"))
  if nested:
    raise ValueError(f"the patterns select {nested}, inside other selected blocks; select one level")
  return list(found.values())


@dataclasses.dataclass(frozen=True)
class ACMized:
  """`model` with `blocks` run as ACMs of `num_learners` learners.

  Learner width: width_factor x the MLP width / N (a projection: x its rank / N),
  so that learners are slices of the dense block and k = N reproduces it exactly.
  Attention-style projections never skip (min choice 1), as in `acm_jax.transformer`.
  """
  model: nn.Module
  blocks: tuple[Block, ...]
  num_learners: int = 4
  width_factor: float = 1.0
  gate_depth: int = 1
  gate_hidden: int = 128
  output_bias: bool = True
  impl: str = "xla"

  def __post_init__(self):
    object.__setattr__(self, "blocks", tuple(self.blocks))
    if not self.blocks:
      raise ValueError("ACMized needs at least one block (see find_blocks)")
    for block in self.blocks:
      self.learner_width(block)

  def learner_width(self, block: Block) -> int:
    total = self.width_factor * block.hidden
    if self.num_learners < 1 or not 0 < self.width_factor <= 1 or total % self.num_learners or total != int(total):
      raise ValueError(f"{block.path}: {self.num_learners} learners do not split width_factor "
                       f"{self.width_factor} x {block.hidden} hidden units evenly")
    return int(total) // self.num_learners

  @property
  def paths(self) -> list[str]:
    return [b.path for b in self.blocks]

  def specs(self) -> tuple:
    """The `acm_jax.train.steps.ACMSpec` of every block, for a `steps.Task`."""
    return tuple(steps.ACMSpec(b.path, b.activation, 1 if b.kind == "linear" else 0,
                               float(acm_lib.learner_flops(b.dim_in, self.learner_width(b))), self.num_learners,
                               self.gate_depth, self.gate_hidden) for b in self.blocks)

  def acmize(self, dense_params: PyTree, rng: jax.Array, init: str = "dense") -> PyTree:
    """The dense params with each block's subtree replaced by learners (sliced from the
    dense weights, or random with init="random") and a freshly initialised gate."""
    flat = acmize_lib.flatten(dense_params)
    out = {k: v for k, v in flat.items() if not any(k.startswith(b.path + "/") for b in self.blocks)}
    for block, key in zip(self.blocks, jax.random.split(rng, len(self.blocks))):
      dense = acmize_lib.subtree(dense_params, block.path)
      width, n = self.learner_width(block), self.num_learners
      if init == "dense" and block.kind == "mlp":
        learners = acmize_lib.learners_from_mlp(dense[block.first], dense[block.second], width, n, self.output_bias)
      elif init == "dense":
        learners = acmize_lib.learners_from_linear(dense, width, n, self.output_bias)
      elif init == "random":
        learners = _random_learners(key, block, width, n, self.output_bias, dense)
      else:
        raise ValueError(f"unknown learner init {init!r}; expected 'dense' or 'random'")
      gate = acm_lib.Gate(n + 1, self.gate_depth, self.gate_hidden).init(
          jax.random.fold_in(key, 1), jnp.zeros((1, block.dim_in)))["params"]
      for name, value in {**learners, **{f"gate/{k}": v for k, v in acmize_lib.flatten(gate).items()}}.items():
        out[f"{block.path}/{name}"] = value
    return acmize_lib.unflatten(out)

  def apply(self, variables: PyTree, *args, mode: str = "argmax", fixed_k: int | jax.Array | None = None,
            temperature: float = 1.0, cost_shift: float | jax.Array = 0.0, **kwargs):
    """`model.apply` with the blocks run as ACMs in `mode` (see `acm.ACM`). When mutable, each
    block sows its one-hot choices as "acm"/<path>/choice and its (input, output) as "record"/<path>/io."""
    by_path = {b.path: b for b in self.blocks}

    def run_acm(next_fun, call_args, call_kwargs, context):
      block = by_path.get(_path(context.module)) if context.method_name == "__call__" else None
      if block is None:
        return next_fun(*call_args, **call_kwargs)
      module, x = context.module, call_args[0]
      params = module.variables["params"]
      learners = {k: params[k].astype(x.dtype) for k in ("w1", "b1", "w2", "b2") if k in params}
      logits = acm_lib.Gate(self.num_learners + 1, self.gate_depth, self.gate_hidden).apply(
          {"params": params["gate"]}, x)
      rng = module.make_rng("gumbel") if mode == "gumbel" else None
      y, logits, choice = acm_lib.gated_apply(
          learners, x, logits, num_learners=self.num_learners, activation=block.activation,
          min_choice=1 if block.kind == "linear" else 0, mode=mode, fixed_k=fixed_k, temperature=temperature,
          cost_shift=cost_shift, rng=rng, impl=self.impl)
      module.sow("acm", "logits", logits)
      module.sow("acm", "choice", choice)
      module.sow("record", "io", (x, y), init_fn=tuple, reduce_fn=lambda _, new: new)
      return y

    with nn.intercept_methods(run_acm):
      return self.model.apply(variables, *args, **kwargs)

  def init(self, rngs, *args, **kwargs) -> PyTree:
    """Variables of the ACM model with random learners (for shapes; `acmize` for real use)."""
    rng = rngs["params"] if isinstance(rngs, dict) else rngs
    variables = self.model.init(rngs, *args, **{k: v for k, v in kwargs.items() if k not in _ACM_ARGS})
    return {**variables, "params": self.acmize(variables["params"], rng, init="random")}

  def dense(self) -> "Recording":
    """The dense model, recording every block's (input, output) as "record"/<path>/io."""
    return Recording(self.model, tuple(self.paths))


_ACM_ARGS = ("mode", "fixed_k", "temperature", "cost_shift")


@dataclasses.dataclass(frozen=True)
class Recording:
  """A dense model whose selected blocks sow their (input, output) pair, as
  `acm_jax.transformer`'s blocks do: what distillation and gate labels train on."""
  model: nn.Module
  paths: tuple[str, ...]

  def apply(self, variables: PyTree, *args, **kwargs):
    def record(next_fun, call_args, call_kwargs, context):
      out = next_fun(*call_args, **call_kwargs)
      if context.method_name == "__call__" and _path(context.module) in self.paths:
        context.module.sow("record", "io", (call_args[0], out), init_fn=tuple, reduce_fn=lambda _, new: new)
      return out

    with nn.intercept_methods(record):
      return self.model.apply(variables, *args, **kwargs)

  def init(self, rngs, *args, **kwargs) -> PyTree:
    return self.model.init(rngs, *args, **{k: v for k, v in kwargs.items() if k not in _ACM_ARGS})


def _random_learners(rng: jax.Array, block: Block, width: int, n: int, output_bias: bool, dense: PyTree) -> dict:
  dtype = jax.tree.leaves(dense)[0].dtype
  k1, k2 = jax.random.split(rng)
  init = nn.initializers.lecun_normal()
  out = {"w1": init(k1, (block.dim_in, n * width), dtype), "b1": jnp.zeros((n * width,), dtype),
         "w2": init(k2, (n * width, block.dim_out), dtype)}
  if output_bias:
    out["b2"] = jnp.zeros((n + 1, block.dim_out), dtype)
  return out
