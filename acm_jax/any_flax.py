"""ACMize a Flax Linen model this project did not write, by module paths.

    found = any_flax.find_blocks(model, variables, x, ["*/MlpBlock_*"])   # traced, checked
    acm_model = any_flax.ACMized(model, found, num_learners=4)
    params = acm_model.acmize(variables["params"], jax.random.key(0))      # exact at k = N
    y, aux = acm_model.apply({"params": params}, x, mode="argmax", mutable=["acm"])

A pattern (fnmatch per part of '/'-joined module paths such as
`Transformer/encoderblock_0/MlpBlock_0`: `Transformer/*/MlpBlock_0`) selects either MLP blocks, modules
whose call runs exactly Dense -> activation -> Dense (dropout in between is
allowed), or single `nn.Dense` projections (optional; identity learners from
the SVD of the kernel). Nothing in the model's code changes: `ACMized.apply`
intercepts the selected modules' calls and runs the ACM from the parameters
stored at their paths (w1, b1, w2, b2 and gate/), with the modes of `acm.ACM`;
`acm.force_k` sets their choices by these paths, as for this project's models.

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
from flax import nnx
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


def matches(path: str, pattern: str) -> bool:
  """fnmatch per '/'-separated part: `*` stays within one module name, as in a file path."""
  parts, wanted = path.split("/"), pattern.split("/")
  return len(parts) == len(wanted) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, wanted))


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
    matched = [p for p in calls if p and matches(p, pattern)]
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

  def specs(self) -> tuple[steps.ACMSpec, ...]:
    """The `acm_jax.train.steps.ACMSpec` of every block, for a `steps.Task`."""
    return _specs(self)

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
      forced = acm_lib.forced_choices(block.path, self.num_learners, x.shape[:-1])
      block_mode, block_k = ("fixed", forced) if forced is not None else (mode, fixed_k)
      rng = module.make_rng("gumbel") if block_mode in acm_lib.GUMBEL_MODES else None
      y, logits, choice = acm_lib.gated_apply(
          learners, x, logits, num_learners=self.num_learners, activation=block.activation,
          min_choice=1 if block.kind == "linear" else 0, mode=block_mode, fixed_k=block_k, temperature=temperature,
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


def _specs(acmized) -> tuple[steps.ACMSpec, ...]:
  return tuple(steps.ACMSpec(b.path, b.activation, 1 if b.kind == "linear" else 0,
                             float(acm_lib.learner_flops(b.dim_in, acmized.learner_width(b))), acmized.num_learners,
                             acmized.gate_depth, acmized.gate_hidden) for b in acmized.blocks)


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


# --- Flax NNX ------------------------------------------------------------------------------------
#
# NNX modules are Python objects: the selected blocks are replaced in place by `NNXACM`
# modules whose parameters carry the Linen ACM names (w1, b1, w2, b2, gate/out/...), so the
# pure parameter dict of the model (`NNXACMized.params`) is what the library's steps expect.
# The mode of a call comes from `NNXACMized.apply`, as in Linen.

_NNX_CALL: list[dict] = []  # the settings of the NNXACMized.apply in progress (a stack: apply is reentrant)


class NNXGate(nnx.Module):
  """`acm.Gate` in NNX, with the same parameter names."""

  def __init__(self, dim: int, num_choices: int, depth: int, hidden: int, rngs: nnx.Rngs):
    widths = [dim] + [hidden] * (depth - 1)
    for i in range(depth - 1):
      setattr(self, f"hidden_{i}", nnx.Linear(widths[i], widths[i + 1], rngs=rngs))
    self.out = nnx.Linear(widths[-1], num_choices, rngs=rngs)
    self.depth = depth

  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.depth - 1):
      x = jax.nn.relu(getattr(self, f"hidden_{i}")(x))
    return self.out(x)


class NNXACM(nnx.Module):
  """An ACM in place of an NNX block; runs in the mode of the enclosing `NNXACMized.apply`
  (argmax when called directly)."""

  def __init__(self, block: Block, learners: dict[str, jax.Array], num_learners: int, gate_depth: int,
               gate_hidden: int, impl: str, rngs: nnx.Rngs):
    for name, value in learners.items():
      setattr(self, name, nnx.Param(value))
    self.gate = NNXGate(block.dim_in, num_learners + 1, gate_depth, gate_hidden, rngs)
    self.block, self.num_learners, self.impl = block, num_learners, impl

  def __call__(self, x: jax.Array) -> jax.Array:
    call = _NNX_CALL[-1] if _NNX_CALL else {"mode": "argmax"}
    learners = {k: getattr(self, k)[...].astype(x.dtype) for k in ("w1", "b1", "w2", "b2") if hasattr(self, k)}
    # the teacher (`NNXACMized.dense`) is the dense model, which force_k does not touch
    forced = None if call.get("dense") else acm_lib.forced_choices(self.block.path, self.num_learners, x.shape[:-1])
    mode, fixed_k = ("fixed", forced) if forced is not None else (call["mode"], call.get("fixed_k"))
    rng = None
    if mode in acm_lib.GUMBEL_MODES:
      rng = jax.random.fold_in(call["rng"], len(call["acm"]))
    y, _, choice = acm_lib.gated_apply(
        learners, x, self.gate(x), num_learners=self.num_learners, activation=self.block.activation,
        min_choice=1 if self.block.kind == "linear" else 0, mode=mode, fixed_k=fixed_k,
        temperature=call.get("temperature", 1.0), cost_shift=call.get("cost_shift", 0.0), rng=rng, impl=self.impl)
    if "acm" in call:
      call["acm"][self.block.path] = choice
      call["record"][self.block.path] = (x, y)
    return y


def _nnx_blocks(model: nnx.Module, patterns: Sequence[str], linear: bool) -> list[tuple[str, nnx.Module, Block]]:
  modules = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(model) if p}
  mlps, linears = {}, {}
  for path, module in modules.items():
    if isinstance(module, nnx.Linear):
      if linear:
        linears[path] = Block(path, "linear", "identity", module.in_features,
                              min(module.in_features, module.out_features), module.out_features)
      continue
    block = _nnx_mlp(path, module)
    if block is not None:
      mlps[path] = block
  inside_mlp = {f"{p}/{n}" for p, b in mlps.items() for n in (b.first, b.second)}
  candidates = sorted(mlps) + sorted(p for p in linears if p not in inside_mlp)
  found = {}
  for pattern in patterns:
    matched = [p for p in modules if matches(p, pattern)]
    if not matched:
      raise ValueError(f"pattern {pattern!r} matches no module of {type(model).__name__}; "
                       f"the modules that can become ACMs: {candidates}")
    bad = [p for p in matched if p not in mlps and p not in linears]
    if bad:
      raise ValueError(f"pattern {pattern!r} matches {bad[:4]}, not "
                       f"{'Linear-activation-Linear or Linear' if linear else 'Linear-activation-Linear'}; "
                       f"the modules that can become ACMs: {candidates}")
    found.update({p: mlps.get(p) or linears[p] for p in matched})
  return [(p, modules[p], b) for p, b in found.items()]


def _nnx_mlp(path: str, module: nnx.Module) -> Block | None:
  """The Block of an NNX module that computes Linear -> activation -> Linear, checked on
  random inputs against each activation and order of its two Linear attributes."""
  linears = {name: m for name, m in vars(module).items() if isinstance(m, nnx.Linear)}
  submodules = [m for m in vars(module).values() if isinstance(m, nnx.Module) and not isinstance(m, nnx.Dropout)]
  if len(linears) != 2 or len(submodules) != 2:
    return None
  (name_a, a), (name_b, b) = linears.items()
  for (first_name, first), (second_name, second) in (((name_a, a), (name_b, b)), ((name_b, b), (name_a, a))):
    if first.out_features != second.in_features:
      continue
    z = jax.random.normal(jax.random.key(0), (4, first.in_features))
    try:
      y = np.asarray(module(z))
    except Exception:  # noqa: BLE001 - a module that does not take one array is no MLP block
      return None
    for act in ACTIVATION_ORDER:
      if np.allclose(y, np.asarray(second(acm_lib.get_activation(act)(first(z)))), rtol=1e-5, atol=1e-6):
        return Block(path, "mlp", act, first.in_features, first.out_features, second.out_features,
                     first_name, second_name)
  return None


@dataclasses.dataclass
class NNXACMized:
  """An NNX model whose selected blocks were replaced by `NNXACM` modules, with
  `apply(variables, x, mode=...)`, `dense()` and `specs()` as `ACMized` has, for `steps.Task`."""
  model: nnx.Module
  blocks: tuple[Block, ...]
  num_learners: int
  gate_depth: int
  gate_hidden: int
  full: bool = False  # dense(): the ACMs run at k = N, which is the dense model exactly

  def params(self) -> PyTree:
    """The model's parameters as a pure dict with string keys (Linen-style paths)."""
    return _string_keys(nnx.to_pure_dict(nnx.state(self.model, nnx.Param)))

  def apply(self, variables: PyTree, *args, mode: str = "argmax", fixed_k=None, temperature: float = 1.0,
            cost_shift=0.0, mutable=False, rngs=None, **kwargs):
    graphdef, state, rest = nnx.split(self.model, nnx.Param, ...)
    template = nnx.to_pure_dict(state)
    nnx.replace_by_pure_dict(state, _keys_like(template, variables["params"]))
    model = nnx.merge(graphdef, state, rest)
    call = {"mode": "full" if self.full else mode, "dense": self.full, "fixed_k": fixed_k, "temperature": temperature,
            "cost_shift": cost_shift, "rng": (rngs or {}).get("gumbel"), "acm": {}, "record": {}}
    _NNX_CALL.append(call)
    try:
      out = model(*args, **kwargs)
    finally:
      _NNX_CALL.pop()
    if not mutable:
      return out
    aux = {"acm": acmize_lib.unflatten({f"{p}/choice": (c,) for p, c in call["acm"].items()}),
           "record": acmize_lib.unflatten({f"{p}/io": xy for p, xy in call["record"].items()})}
    return out, {name: aux[name] for name in mutable if name in aux}

  def dense(self) -> "NNXACMized":
    """The teacher: this model with every ACM at k = N (exact when its learners still are the dense
    slices: pass the params from right after `acmize_nnx` as the teacher's params)."""
    return dataclasses.replace(self, full=True)

  def specs(self) -> tuple[steps.ACMSpec, ...]:
    return _specs(self)

  def learner_width(self, block: Block) -> int:
    return block.hidden // self.num_learners


def acmize_nnx(model: nnx.Module, patterns: Sequence[str], *, num_learners: int = 4, gate_depth: int = 1,
               gate_hidden: int = 128, linear: bool = False, impl: str = "xla",
               rngs: nnx.Rngs | None = None) -> NNXACMized:
  """Replaces, in place, the NNX blocks that `patterns` select (Linear -> activation -> Linear
  modules, or with `linear=True` single nnx.Linear) by ACMs initialised from their weights
  (all hidden units, so k = N is exact)."""
  if isinstance(patterns, str):
    patterns = [patterns]
  rngs = rngs or nnx.Rngs(0)
  blocks = []
  for path, module, block in _nnx_blocks(model, patterns, linear):
    if block.hidden % num_learners:
      raise ValueError(f"{path}: {num_learners} learners do not split its {block.hidden} hidden units evenly")
    width = block.hidden // num_learners
    if block.kind == "mlp":
      first, second = getattr(module, block.first), getattr(module, block.second)
      learners = acmize_lib.learners_from_mlp(_linear_params(first), _linear_params(second), width, num_learners, True)
    else:
      learners = acmize_lib.learners_from_linear(_linear_params(module), width, num_learners, True)
    parent_path, _, name = path.rpartition("/")
    parent = model
    for part in filter(None, parent_path.split("/")):
      parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
    acm = NNXACM(block, learners, num_learners, gate_depth, gate_hidden, impl, rngs)
    if name.isdigit():
      parent[int(name)] = acm
    else:
      setattr(parent, name, acm)
    blocks.append(block)
  return NNXACMized(model, tuple(blocks), num_learners, gate_depth, gate_hidden)


def _linear_params(linear: nnx.Linear) -> dict:
  return {"kernel": linear.kernel[...], "bias": linear.bias[...]}


def _string_keys(tree):
  return {str(k): _string_keys(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _keys_like(template, tree):
  return {k: _keys_like(v, tree[str(k)]) for k, v in template.items()} if isinstance(template, dict) else tree
