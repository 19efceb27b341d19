"""Hard-choice ACM inference: gate -> argmax k -> sort -> kernel -> unsort.

Tokens are sorted by k in descending order so that learner n runs on one
contiguous prefix of rows (the tokens with k >= n); the kernels in
`pallas_kernels` exploit that to skip the work of unused learners.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from acm_jax import sharding

IMPLS = ("auto", "xla", "pallas", "triton")


def resolve_impl(impl: str) -> str:
  """"auto" -> the Pallas kernel on GPU, the XLA path elsewhere."""
  if impl not in IMPLS:
    raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
  if impl == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "xla"
  return impl


def acm_apply_sorted(params, x: jax.Array, k: jax.Array, bias_table: jax.Array, *, num_learners: int,
                     activation: str = "gelu", impl: str = "auto", **kernel_kwargs) -> jax.Array:
  """Same function as `acm.acm_apply`, computed by a kernel on tokens sorted by k.

  params: w1, b1, w2 as in `acm_jax.acm`; x: (..., dim), k: (...,) int in 0..N;
  bias_table: (N+1, dim) cumulative output bias per choice (`acm.choice_bias`).
  Returns (..., dim). The XLA path is `acm.acm_apply` itself (the `ACM` module
  chooses between the two), so impl must resolve to a kernel.
  """
  impl = resolve_impl(impl)
  if impl == "xla":
    raise ValueError("acm_apply_sorted runs the kernels ('pallas', 'triton'); for 'xla' call acm.acm_apply")
  if impl == "pallas":
    from pallas_kernels.acm_mlp import acm_mlp as kernel
  else:
    from pallas_kernels.triton_acm_mlp import acm_mlp_triton as kernel
  from pallas_kernels.acm_mlp import sort_order
  lead_shape, dim = x.shape[:-1], x.shape[-1]
  flat_x, flat_k = x.reshape(-1, dim), k.reshape(-1).astype(jnp.int32)
  # the kernels gather x's rows and scatter the output rows through `order`
  # themselves: no sorted copy of x, no unsort pass over the output
  out = kernel(flat_x, flat_k, params["w1"], params["b1"], params["w2"], bias_table.astype(x.dtype),
               num_learners=num_learners, activation=activation,
               order=sort_order(flat_k, num_learners), **kernel_kwargs)
  return out.reshape(*lead_shape, dim)


def acm_group_apply(x: jax.Array, groups: list[dict], *, num_learners: int, activation: str = "gelu",
                    min_choice: int = 0, cost_shift: float | jax.Array = 0.0, norm: tuple | None = None,
                    residual: jax.Array | None = None, **kernel_kwargs) -> tuple[tuple[jax.Array, ...], jax.Array]:
  """G ACMs reading the same x (..., d), gate included: (G outputs (..., d), k (G, ...)).

  groups: dicts of `pallas_kernels.acm_fused.acm_group` (learner parameters in
  x.dtype plus gate = (kernel, bias) or logits (..., N+1)), run by its fused
  kernels (`acm_fused.acm_group_reference` is the same function in plain jnp).
  norm: (scale (d,), bias (d,), eps) when the ACMs read LayerNorm(x) of this x, which the
  kernels then fuse (`acm_group`'s `norm`). residual: (..., d) like x, added to every output (a
  block's skip connection; `acm_group`'s `residual`).
  Every device works on its own batch shard under a batch-splitting mesh.
  """
  if x.ndim < 2 or x.size == 0:
    raise ValueError(f"x must be (..., d) with at least one token, got shape {x.shape}")
  kwargs = dict(num_learners=num_learners, activation=activation, min_choice=min_choice)
  eps = None if norm is None else norm[2]

  def local(x, cost_shift, groups, norm_params, residual):
    lead, dim = x.shape[:-1], x.shape[-1]
    flat = [{**g, "logits": g["logits"].reshape(-1, num_learners + 1)} if "logits" in g else g for g in groups]
    from pallas_kernels.acm_fused import acm_group
    outs, k = acm_group(x.reshape(-1, dim), flat, cost_shift=cost_shift,
                        norm=(*norm_params, eps) if norm_params else None,
                        residual=None if residual is None else residual.reshape(-1, dim), **kwargs, **kernel_kwargs)
    return tuple(o.reshape(*lead, dim) for o in outs), k.reshape(len(groups), *lead).astype(jnp.int32)

  split = batch_split(x)
  axes = () if split is None else split[0]
  group_specs = [{name: name == "logits" for name in g} for g in groups]
  return per_shard(local, axes, (True, False, group_specs, False, True), ((True,) * len(groups), P(None, axes)))(
      x, jnp.asarray(cost_shift, jnp.float32), groups, () if norm is None else tuple(norm[:2]), residual)


def batch_split(x: jax.Array) -> tuple[tuple[str, ...], int] | None:
  """(batch axes, number of shards) of the mesh current at trace time for x (batch, ..., dim):
  ((), 1) outside a mesh that splits the batch; None where the mesh cannot split x's leading axis
  evenly (e.g. the one-example `model.init`)."""
  axes = sharding.current_batch_axes()
  if not axes:
    return (), 1
  shards = math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in axes)
  return None if x.ndim < 2 or x.shape[0] % shards else (axes, shards)


def per_shard(fn, axes: tuple[str, ...], in_specs, out_specs):
  """fn staged as one call (`_removable`), run by every device on its batch shard (a `shard_map`)
  when `axes` is not empty. Specs are pytrees (prefixes) of True (split along `axes` on the
  leading dimension), False (replicated) or a PartitionSpec."""
  if not axes:
    return _removable(fn)
  specs = lambda tree: jax.tree.map(lambda s: s if isinstance(s, P) else P(axes) if s else P(), tree,
                                    is_leaf=lambda s: isinstance(s, (bool, P)))
  # the Pallas kernels carry no varying-axis annotations, hence check_vma=False
  return _removable(jax.shard_map(fn, in_specs=specs(in_specs), out_specs=specs(out_specs), check_vma=False))


def _removable(fn):
  """fn staged as one `jax.jit` call, which dead-code elimination removes where its outputs are unused.

  A `pallas_call` on its own is never removed (jax's DCE rule for it keeps every call), and flax
  >= 0.12.10 checks a scan body's loop invariants by DCE (`flax/core/axes_scan.py`: a body input
  still used after DCE raises "broadcasted variable has a data dependency on the scan body"): a
  bare kernel call inside `nn.scan` would fail that check. XLA inlines the nested jit."""
  return jax.jit(fn)


def acm_apply_sorted_per_shard(params, x: jax.Array, k: jax.Array, bias_table: jax.Array, **kwargs) -> jax.Array:
  """`acm_apply_sorted` run by every device on its own batch shard when the
  current mesh (`jax.set_mesh`, as `sharding.Partitioner.jit` sets) splits the
  batch: a global sort would gather every token onto every device. x: (batch, ..., dim).
  """
  split = batch_split(x)  # None: a batch the mesh cannot split (e.g. the 1-example model.init), one call
  return per_shard(functools.partial(acm_apply_sorted, **kwargs), () if split is None else split[0],
                   (False, True, True, False), True)(params, x, k, bias_table)
