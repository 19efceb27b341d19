"""Transformer encoder pieces shared by the ViT and Wav2Vec2 models.

Each replaceable block (the MLP, and the q/k/v/o projections) is either a dense
layer or an `acm.ACM`, chosen by the `acm` config. Dense replaceable blocks sow
their (input, output) pair into the "record" collection when it is mutable: that
is what module-wise distillation and gate labelling train on.

`encoder_blocks` runs a model's stack of encoder blocks in one of two layouts:
unrolled, each block its own module `block_{i}`, or scanned (`nn.scan`), one
module `blocks` whose parameters and sown values carry a leading layer axis
(depth, ...). XLA compiles the scanned block once, and under FSDP gathers one
layer's weights per iteration (`unroll` blocks per iteration: the loop runs that many
blocks in its body, the parameters stay stacked per layer). `stack_blocks` / `unstack_blocks` convert
parameter trees (or sown collections) between the two layouts: checkpoint
readers, `acmize` and the per-ACM statistics work on the unrolled names.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from typing import Any, Iterator, Mapping

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from acm_jax import acm as acm_lib
from acm_jax import inference
from acm_jax.sharding import current_batch_axes

PROJECTIONS = ("query", "key", "value", "out")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
_HALF = (jnp.bfloat16, jnp.float16)
# cuDNN's fused attention refuses odd lengths when differentiated (jax 0.11: "Unsupported
# sequence length Q 197, KV 197" in a ViT-B/16 training step), so under differentiation
# `attend` pads to a multiple of this
CUDNN_LENGTH_MULTIPLE = 2


def check_attention_impl(impl: str) -> str:
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention implementation {impl!r}; expected one of {ATTENTION_IMPLS}")
  return impl


def resolve_attention_impl(impl: str, dtype, head_dim: int, masked: bool) -> str:
  """"auto": cuDNN's fused (flash) attention where it applies (a GPU, bfloat16 or
  float16, head_dim a multiple of 8 up to 128, no mask), else XLA's softmax(q k^T) v."""
  check_attention_impl(impl)
  if impl != "auto":
    return impl
  fits = (jax.default_backend() == "gpu" and jnp.dtype(dtype) in _HALF and head_dim % 8 == 0
          and head_dim <= 128 and not masked)
  return "cudnn" if fits else "xla"


def _cudnn_padded(q, k, v):
  """cuDNN attention on lengths padded to CUDNN_LENGTH_MULTIPLE: padded keys are cut off
  by the sequence lengths, padded queries sliced away."""
  tokens = q.shape[1]
  pad = -tokens % CUDNN_LENGTH_MULTIPLE
  q, k, v = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (q, k, v))
  lengths = jnp.full((q.shape[0],), tokens, jnp.int32)
  out = jax.nn.dot_product_attention(q, k, v, implementation="cudnn", query_seq_lengths=lengths,
                                     key_value_seq_lengths=lengths)
  return out[:, :tokens]


@jax.custom_vjp
def _cudnn_odd_length(q, k, v):
  # not differentiated (inference): cuDNN runs odd lengths as they are, which measured
  # ~10% faster for a whole ViT-B/16 than the padded, length-masked call
  return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


def _cudnn_odd_length_fwd(q, k, v):
  return jax.vjp(_cudnn_padded, q, k, v)


def _cudnn_odd_length_bwd(vjp, grad):
  return vjp(grad)


_cudnn_odd_length.defvjp(_cudnn_odd_length_fwd, _cudnn_odd_length_bwd)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
           impl: str = "auto") -> jax.Array:
  """softmax(q k^T / sqrt(head_dim)) v over (batch, length, heads, head_dim) arrays."""
  impl = resolve_attention_impl(impl, q.dtype, q.shape[-1], mask is not None)
  if impl == "cudnn":
    if jnp.dtype(q.dtype) not in _HALF:
      raise ValueError(f"attention 'cudnn' needs bfloat16 or float16 inputs, got {q.dtype}")
    if q.shape[1] % CUDNN_LENGTH_MULTIPLE == 0:
      return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    if mask is not None:
      raise ValueError(f"attention 'cudnn' with a mask needs a length divisible by {CUDNN_LENGTH_MULTIPLE}, "
                       f"got {q.shape[1]}; use 'xla'")
    return _cudnn_odd_length(q, k, v)
  return nn.dot_product_attention(q, k, v, mask=mask)


def _record(module: nn.Module, x: jax.Array, y: jax.Array) -> None:
  module.sow("record", "io", (x, y), init_fn=tuple, reduce_fn=lambda _, new: new)


class Linear(nn.Module):
  """A dense projection that records its input/output for distillation."""
  features: int

  @nn.compact
  def __call__(self, x: jax.Array, **_) -> jax.Array:
    y = nn.Dense(self.features, name="dense", dtype=x.dtype)(x)
    _record(self, x, y)
    return y


class Mlp(nn.Module):
  """The dense block an ACM replaces: fc2(act(fc1(x)))."""
  mlp_dim: int
  activation: str = "gelu"

  @nn.compact
  def __call__(self, x: jax.Array, **_) -> jax.Array:
    hidden = nn.Dense(self.mlp_dim, name="fc1", dtype=x.dtype)(x)
    y = nn.Dense(x.shape[-1], name="fc2", dtype=x.dtype)(acm_lib.get_activation(self.activation)(hidden))
    _record(self, x, y)
    return y


def make_mlp(dim: int, mlp_dim: int, activation: str, acm: acm_lib.ACMConfig | None,
             name: str) -> nn.Module:
  if acm is None:
    return Mlp(mlp_dim, activation, name=name)
  return acm_lib.ACM(dim, acm.num_learners, acm.mlp_learner_width(mlp_dim), activation,
                     acm.output_bias, acm.gate_depth, acm.gate_hidden, 0, acm.impl, acm.budget_conditioning,
                     name=name)


def make_projection(dim: int, acm: acm_lib.ACMConfig | None, name: str) -> nn.Module:
  if acm is None or not acm.attention:
    return Linear(dim, name=name)
  # attention projections are linear: identity learners, and they never skip (min choice 1)
  return acm_lib.ACM(dim, acm.num_learners, acm.attention_learner_width(dim), "identity",
                     acm.output_bias, acm.gate_depth, acm.gate_hidden, 1, acm.impl, acm.budget_conditioning,
                     name=name)


class Attention(nn.Module):
  """Multi-head self-attention with separate (dim, dim) q, k, v, o projections."""
  num_heads: int
  acm: acm_lib.ACMConfig | None = None
  impl: str = "auto"  # see `attend`

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, prenorm: tuple | None = None,
               residual: jax.Array | None = None, **acm_args) -> jax.Array:
    """prenorm: (z, scale, bias, eps) when x is LayerNorm(z), for the q/k/v group to fuse; residual: added
    to the output (the block's skip connection), by the output projection's kernels where it is an ACM
    (see `acm.ACM`)."""
    dim = x.shape[-1]
    if dim % self.num_heads:
      raise ValueError(f"dim {dim} is not divisible by num_heads {self.num_heads}")
    qkv = [make_projection(dim, self.acm, name) for name in PROJECTIONS[:3]]
    if self._grouped(qkv, acm_args):
      # one fused launch sequence for the three ACMs that read x (see `inference.acm_group_apply`)
      specs = [proj(x, **{**acm_args, "mode": acm_lib.GROUP_INPUTS}) for proj in qkv]
      inputs, norm = acm_lib.fused_inputs(x, prenorm, specs)
      (q, k, v), choices = inference.acm_group_apply(
          inputs, specs, num_learners=self.acm.num_learners, activation="identity", min_choice=qkv[0].min_choice,
          cost_shift=acm_args.get("cost_shift", 0.0), norm=norm)
      for proj, choice in zip(qkv, choices):  # each ACM's statistics, as its own call would sow them
        proj.sow("acm", "choice", jax.nn.one_hot(choice, self.acm.num_learners + 1, dtype=jnp.float32))
    elif self._grouped_gumbel(qkv, acm_args):
      q, k, v = self._gumbel_group(qkv, x, acm_args)
    else:
      q, k, v = (proj(x, **acm_args) for proj in qkv)
    split = lambda t: t.reshape(*t.shape[:-1], self.num_heads, dim // self.num_heads)
    context = attend(split(q), split(k), split(v), mask, self.impl)
    context = context.reshape(*x.shape[:-1], dim)
    out = make_projection(dim, self.acm, "out")
    if residual is not None and isinstance(out, acm_lib.ACM):
      return out(context, residual=residual, **acm_args)
    y = out(context, **acm_args)
    return y if residual is None else residual + y

  def _grouped_gumbel(self, projections: list[nn.Module], acm_args: dict) -> bool:
    """q/k/v gates run as one gate in training (Gumbel modes) when the config asks for it
    (`ACMConfig.group_qkv_gates`): every projection an ACM, no forced k, no budget conditioning."""
    return (all(isinstance(p, acm_lib.ACM) for p in projections) and self.acm.group_qkv_gates
            and not self.acm.budget_conditioning
            and acm_args.get("mode", "argmax") in acm_lib.GUMBEL_MODES and not acm_lib.forcing()
            and not self.is_initializing())

  def _gumbel_group(self, projections: list[nn.Module], x: jax.Array, acm_args: dict) -> list[jax.Array]:
    """The q/k/v ACMs in a Gumbel mode as one group: their gates as one gate
    (`acm.group_gate_logits`) and their up projections as one matmul (`acm.acm_apply_soft_group`);
    each ACM's output, logits and choices as its own call gives them."""
    specs = [proj(x, **acm_args, group=True) for proj in projections]
    raw = acm_lib.group_gate_logits([spec["gate"] for spec in specs], x)
    applied = []
    for proj, spec, logits in zip(projections, specs, raw):
      width = spec["params"]["w1"].shape[1] // proj.num_learners
      logits = acm_lib.shifted_logits(logits, proj.num_learners, width / x.shape[-1],
                                      acm_args.get("cost_shift", 0.0), proj.min_choice)
      weights, choice = acm_lib.gumbel_choices(logits, mode=acm_args["mode"],
                                               temperature=acm_args.get("temperature", 1.0), rng=spec["rng"])
      proj.sow("acm", "logits", logits)
      proj.sow("acm", "choice", choice)
      applied.append(weights)
    first = projections[0]
    return acm_lib.acm_apply_soft_group([spec["params"] for spec in specs], x, applied,
                                        num_learners=first.num_learners, activation=first.activation)

  def _grouped(self, projections: list[nn.Module], acm_args: dict) -> bool:
    """q/k/v run as one group at inference: ACMs on the fused path, gate argmax, no forced k."""
    return (all(isinstance(p, acm_lib.ACM) for p in projections)
            and acm_args.get("mode", "argmax") == "argmax" and not acm_lib.forcing() and not self.is_initializing()
            and acm_lib.fused_impl(self.acm.impl))


class EncoderBlock(nn.Module):
  """Pre-LN (x + f(LN(x))) or post-LN (LN(x + f(x))) transformer block."""
  num_heads: int
  mlp_dim: int
  activation: str = "gelu"
  layer_norm_eps: float = 1e-6
  pre_norm: bool = True
  acm: acm_lib.ACMConfig | None = None
  attention: str = "auto"  # attention implementation, see `attend`

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, **acm_args) -> jax.Array:
    norm = lambda name: nn.remat(nn.LayerNorm, prevent_cse=False)(self.layer_norm_eps, name=name, dtype=x.dtype)
    attn = Attention(self.num_heads, self.acm, self.attention, name="attn")
    mlp = make_mlp(x.shape[-1], self.mlp_dim, self.activation, self.acm, "mlp")
    if self.pre_norm:
      # the skip connections go in as `residual`: an ACM's fused kernels add them in their epilogue
      h = norm("ln1")(x)
      x = attn(h, mask, residual=x, **self._prenorm("ln1", x, self.acm is not None and self.acm.attention),
               **acm_args)
      h = norm("ln2")(x)
      if isinstance(mlp, acm_lib.ACM):
        return mlp(h, residual=x, **self._prenorm("ln2", x, True), **acm_args)
      return x + mlp(h, **acm_args)
    x = norm("ln1")(x + attn(x, mask, **acm_args))
    return norm("ln2")(x + mlp(x, **acm_args))

  def _prenorm(self, name: str, z: jax.Array, acm_reads: bool) -> dict:
    """{"prenorm": (z, scale, bias, eps)} of LayerNorm `name` (already applied to z) for an ACM that
    reads its output, so that the fused kernels can take z and normalise it themselves; {} else."""
    if not acm_reads or self.is_initializing():
      return {}
    params = self.variables["params"][name]
    return {"prenorm": (z, params["scale"], params["bias"], self.layer_norm_eps)}


def replaceable_paths(depth: int, acm: acm_lib.ACMConfig | None, with_attention: bool | None = None,
                      prefix: str = "") -> list[str]:
  """'/'-joined parameter paths of the blocks that are (or become) ACMs."""
  if acm is None:
    return []
  attention = acm.attention if with_attention is None else with_attention
  paths = []
  for b in acm.block_indices(depth):
    paths.append(f"{prefix}block_{b}/mlp")
    if attention:
      paths.extend(f"{prefix}block_{b}/attn/{p}" for p in PROJECTIONS)
  return paths


# --- the stack of blocks: unrolled or scanned, with rematerialisation -------------------

STACKED = "blocks"  # the scanned stack's module name; its leaves have a leading layer axis
_UNROLLED = re.compile(r"block_(\d+)$")
# none: store every activation; full: recompute each block in the backward pass; dots: keep
# the matmul outputs and recompute the rest (elementwise work, norms); dots_no_batch: keep only
# matmuls without batch dimensions (the projections, not attention's q k^T and p v)
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
_CHECKPOINT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_saveable,
                        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def remat_policy(value: bool | str) -> str:
  """A remat setting as one of REMAT_POLICIES; booleans (the old flag) mean "full" / "none"."""
  if isinstance(value, (bool, np.bool_)):
    return "full" if value else "none"
  if value not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {value!r}; expected one of {REMAT_POLICIES} (or a boolean: "
                     "true = full, false = none)")
  return value


def check_scannable(depth: int, acm, scan_blocks: bool) -> None:
  """Scanned blocks share one definition: every block dense, or every block ACMized alike."""
  if scan_blocks and acm is not None and acm.block_indices(depth) != tuple(range(depth)):
    raise ValueError(f"scan_blocks=True needs every block alike, but the ACM config makes only blocks "
                     f"{list(acm.block_indices(depth))} of {depth} ACMs; ACMize every block or set scan_blocks=False")


def check_encoder(cfg: Any) -> None:
  """The checks every family's config shares, on its fields dim, num_heads, depth, mlp_dim,
  activation, remat, acm and scan_blocks: each raises ValueError naming the bad value."""
  if cfg.dim % cfg.num_heads:
    raise ValueError(f"dim {cfg.dim} is not divisible by num_heads {cfg.num_heads}")
  acm_lib.get_activation(cfg.activation)
  remat_policy(cfg.remat)
  if cfg.acm is not None:
    cfg.acm.mlp_learner_width(cfg.mlp_dim)
    cfg.acm.block_indices(cfg.depth)
  check_scannable(cfg.depth, cfg.acm, cfg.scan_blocks)
  check_unroll(cfg.depth, cfg.scan_unroll)


def check_unroll(depth: int, unroll) -> None:
  """scan_unroll: an int from 1 (one block per loop iteration) to depth (the whole stack in one)."""
  if isinstance(unroll, (bool, np.bool_)) or not isinstance(unroll, (int, np.integer)) or not 1 <= unroll <= depth:
    raise ValueError(f"scan_unroll must be an int from 1 to the depth {depth} (encoder blocks per scanned "
                     f"iteration), got {unroll!r}")


class _Block(EncoderBlock):
  """An encoder block with positional arguments (what nn.remat and nn.scan lift), the
  string `mode` and an int `fixed_k` held static as fields. Parameters as EncoderBlock's."""
  mode: str = "argmax"
  static_k: int | None = None

  def __call__(self, x, layer, mask, fixed_k, temperature, cost_shift, gumbel_key):
    # each layer's Gumbel noise from the layer index, so that both layouts draw the same noise
    key = None if gumbel_key is None else jax.random.fold_in(gumbel_key, layer)
    return super().__call__(x, mask, mode=self.mode, fixed_k=self.static_k if fixed_k is None else fixed_k,
                            temperature=temperature, cost_shift=cost_shift, rng=key)


class _ScanBlock(_Block):
  num_layers: int = 0

  def __call__(self, x, layer, *args):
    # force_k's per-layer maps use the unrolled paths: tell the ACMs which layer this trace is
    parent = self.scope.path[:-1]
    layer_paths = ["/".join((*parent, f"block_{i}")) for i in range(self.num_layers)]
    with acm_lib.scanned_layer("/".join(self.scope.path), layer, layer_paths):
      return _batch_sharded(super().__call__(_batch_sharded(x), layer, *args)), None


def _batch_sharded(x: jax.Array) -> jax.Array:
  """x with its batch axis pinned to the mesh's batch axes (when traced under a mesh): the
  loop carry of a scan otherwise lets the partitioner pick a layout from the stacked weights."""
  axes = current_batch_axes()
  if not axes:
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(axes if len(axes) > 1 else axes[0]))


# a stacked parameter whose per-layer slice has at most this many elements goes into the packed array
PACK_MAX_SIZE = 16384
PACKED = "__small_params__"
_packing = contextvars.ContextVar("acm_pack_small_params", default=None)


@contextlib.contextmanager
def small_params_packed(enabled: bool | None) -> Iterator[None]:
  """Within the context scanned stacks under remat pack (True) or do not pack (False) their small
  parameters into one array per layer (`_SmallParamPacking`); None: the default, packed on a GPU
  only. Measured: on an H200 the ViT-B/16 finetune step gains 1.0 ms (35.69 -> 34.66 at batch 64);
  on a CPU the tiny ViT's finetune step compiles 32% slower and runs 56% slower packed (XLA's CPU
  backend, 2026-12-03)."""
  token = _packing.set(enabled)
  try:
    yield
  finally:
    _packing.reset(token)


def _packs_small_params() -> bool:
  enabled = _packing.get()
  return jax.default_backend() == "gpu" if enabled is None else enabled


class _SmallParamPacking:
  """The small parameters of a scanned stack as one (depth, P) array while it runs.

  A scanned loop takes each stacked parameter's layer slice by its own dynamic slice and, in the
  backward loop, writes each one's gradient into its stacked gradient by its own
  dynamic-update-slice: an ACM layer has ~40 such small leaves (LayerNorms, biases, per-choice
  biases, gate layers), so ~40 tiny launches per layer and direction. `pack` (outside the loop)
  concatenates every leaf of at most PACK_MAX_SIZE elements per layer into one array, `unpack`
  (inside the loop body) slices the layer's vector back into the leaves, so the loop slices and
  updates one array. The stored parameter tree, its values and its gradients do not change.
  """

  def __init__(self):
    self.layout: list[tuple[tuple[str, ...], tuple[int, ...]]] = []  # (path, per-layer shape), packed order

  def pack(self, variables: Mapping) -> dict:
    # map_variables hands over {collection: tree}
    return {**variables, "params": self._pack(variables["params"])}

  def unpack(self, variables: Mapping) -> dict:
    return {**variables, "params": self._unpack(variables["params"])}

  def _pack(self, params: Mapping) -> dict:
    flat = traverse_util.flatten_dict(dict(params))
    small = sorted(path for path, leaf in flat.items()
                   if int(np.prod(np.shape(leaf)[1:])) <= PACK_MAX_SIZE)
    if len(small) < 2 or len({flat[path].dtype for path in small}) != 1:
      self.layout = []
      return params
    self.layout = [(path, np.shape(flat[path])[1:]) for path in small]
    depth = np.shape(flat[small[0]])[0]
    packed = jnp.concatenate([jnp.reshape(flat.pop(path), (depth, -1)) for path in small], axis=1)
    out = traverse_util.unflatten_dict(flat)
    out[PACKED] = packed
    return out

  def _unpack(self, params: Mapping) -> dict:
    if not self.layout:
      return params
    params = dict(params)
    packed = params.pop(PACKED)
    flat = traverse_util.flatten_dict(params)
    start = 0
    for path, shape in self.layout:
      size = int(np.prod(shape))
      flat[path] = jnp.reshape(jax.lax.slice_in_dim(packed, start, start + size), shape)
      start += size
    return traverse_util.unflatten_dict(flat)


def encoder_blocks(module: nn.Module, x: jax.Array, mask: jax.Array | None, *, depth: int, block: dict,
                   acm, scan: bool, remat: bool | str, mode: str, fixed_k, temperature, cost_shift,
                   unroll: int = 1) -> jax.Array:
  """`depth` encoder blocks over x (batch, tokens, dim), from inside `module`'s compact call.

  block: EncoderBlock's fields other than `acm`; acm: the ACM config, or None; scan: one
  scanned module `blocks` (see the module doc) instead of `block_{i}`; unroll: with scan, blocks
  per loop iteration (the parameters stay stacked per layer); remat: a REMAT_POLICIES name (or a
  boolean). The remaining arguments are the ACM arguments (see `acm.ACM`).
  """
  policy = remat_policy(remat)
  static = fixed_k is None or isinstance(fixed_k, int)
  fields = dict(block, mode=mode, static_k=fixed_k if static else None)
  traced_k = None if static else fixed_k
  gumbel_key = module.make_rng("gumbel") if mode in acm_lib.GUMBEL_MODES else None
  args = (mask, traced_k, temperature, cost_shift, gumbel_key)
  if scan:
    check_scannable(depth, acm, True)
    check_unroll(depth, unroll)
    # small parameters packed under remat only: there the leaves are recomputed from the packed
    # slice in the backward loop; without remat autodiff would stack each unpacked leaf as a residual
    packing = (None if policy == "none" or module.is_initializing() or not _packs_small_params()
               else _SmallParamPacking())
    body = _ScanBlock if packing is None else nn.map_variables(_ScanBlock, "params", trans_in_fn=packing.unpack)
    if policy != "none":
      body = nn.remat(body, policy=_CHECKPOINT_POLICIES[policy], prevent_cse=False)
    stack = nn.scan(body, variable_axes={"params": 0, "acm": 0, "record": 0, "intermediates": 0},
                    split_rngs={"params": True}, in_axes=(0, *[nn.broadcast] * len(args)), length=depth,
                    unroll=unroll)
    if packing is not None:
      stack = nn.map_variables(stack, "params", trans_in_fn=packing.pack)
    x, _ = stack(**fields, acm=acm, num_layers=depth, name=STACKED)(x, jnp.arange(depth), *args)
    return x
  cls = _Block if policy == "none" else nn.remat(_Block, policy=_CHECKPOINT_POLICIES[policy])
  acm_blocks = set(acm.block_indices(depth)) if acm is not None else set()
  for i in range(depth):
    x = cls(**fields, acm=acm if i in acm_blocks else None, name=f"block_{i}")(x, i, *args)
  return x


def is_stacked(tree: Any) -> bool:
  return isinstance(tree, Mapping) and STACKED in tree


def unstack_blocks(tree: Any) -> Any:
  """A tree with a scanned `blocks` entry (leaves (depth, ...)) -> `block_0` .. `block_{depth-1}`;
  other entries unchanged, a tree without `blocks` returned as it is. Works on parameters,
  optimizer-state-like trees and sown collections (their tuples are split leaf by leaf)."""
  if not is_stacked(tree):
    return tree
  clash = sorted(k for k in tree if _UNROLLED.match(k))
  if clash:
    raise ValueError(f"tree has both a stacked {STACKED!r} entry and unrolled blocks {clash[:3]}")
  leaves = jax.tree.leaves(tree[STACKED])
  if not leaves:
    return {k: v for k, v in tree.items() if k != STACKED}
  depth = np.shape(leaves[0])[0]
  out = {k: v for k, v in tree.items() if k != STACKED}
  for i in range(depth):
    out[f"block_{i}"] = jax.tree.map(lambda a, i=i: a[i], tree[STACKED])
  return out


def block_params(tree: Mapping, index: int) -> Any:
  """Block `index`'s subtree (EncoderBlock's names) of a tree in either layout."""
  if is_stacked(tree):
    return jax.tree.map(lambda a: a[index], tree[STACKED])
  return tree[f"block_{index}"]


def stack_blocks(tree: Mapping) -> dict:
  """The inverse of `unstack_blocks`: `block_0` .. `block_{n-1}` -> one `blocks` entry whose leaves
  gain a leading layer axis. Every block must have the same names and shapes (a model whose
  ACMs sit in some blocks only cannot be scanned)."""
  indices = sorted(int(_UNROLLED.match(k).group(1)) for k in tree if _UNROLLED.match(k))
  if not indices:
    raise ValueError(f"no unrolled blocks (block_0, block_1, ...) to stack; found {sorted(tree)[:8]}")
  if indices != list(range(len(indices))):
    raise ValueError(f"blocks to stack must be block_0 .. block_{len(indices) - 1}, found indices {indices}")
  shapes = lambda sub: {k: np.shape(v) for k, v in traverse_util.flatten_dict(sub, sep="/").items()}
  first = shapes(tree["block_0"])
  for i in indices[1:]:
    other = shapes(tree[f"block_{i}"])
    if other != first:
      diff = sorted(set(first.items()) ^ set(other.items()))[:4]
      raise ValueError(f"block_{i} differs from block_0 ({diff}): only identical blocks can be stacked")
  blocks = [tree[f"block_{i}"] for i in indices]
  stack = lambda *xs: (np.stack(xs) if all(isinstance(a, np.ndarray) for a in xs) else jnp.stack(xs))
  out = {k: v for k, v in tree.items() if not _UNROLLED.match(k)}
  out[STACKED] = jax.tree.map(stack, *blocks)
  return out


def layout_mismatch(found_keys, expected_keys) -> str | None:
  """When a checkpoint and a model differ only in block layout, what to do about it; else None."""
  found_stacked = any(k.startswith(STACKED + "/") for k in found_keys)
  expected_stacked = any(k.startswith(STACKED + "/") for k in expected_keys)
  found_unrolled = any(k.startswith("block_") for k in found_keys)
  expected_unrolled = any(k.startswith("block_") for k in expected_keys)
  if expected_stacked and found_unrolled and not found_stacked:
    return ("the checkpoint has unrolled blocks (block_0, block_1, ...) but the model scans its blocks "
            "(scan_blocks=True): convert the params with acm_jax.transformer.stack_blocks, or run with "
            "--scan_blocks=false")
  if expected_unrolled and found_stacked and not found_unrolled:
    return ("the checkpoint has scanned blocks ('blocks', one leading layer axis) but the model unrolls them: "
            "convert the params with acm_jax.transformer.unstack_blocks, or run with --scan_blocks=true")
  return None
