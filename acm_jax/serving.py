"""A serving layout for parameters: the small leaves of a tree as one flat array per dtype.

At serving batches (1 to 8 images) a jitted forward is bound by the host, and part of the host's time
grows with the number of arrays the call takes: each argument is checked, flattened and handed to the
executable one by one. A ViT-B/16 takes 200 parameter arrays dense, 224 with ACMs in its MLPs and 416
with its q/k/v/o projections ACMized as well (every ACM brings two layers, a gate and per-choice biases),
and most of them are small: LayerNorm scales, biases, gate layers. `pack` moves every leaf of at most
`max_size` elements into one 1-D array per dtype, once, when the model is loaded; `unpack`, inside the
jitted function, slices them back out. The large weights stay separate arrays, so the matmuls and the ACM
kernels read them where they are (packing them too costs copies in front of the kernels). On an H100 (jax
0.11.2) a ViT-B/16 call went from 200-416 arrays to 76-124 and waited calls at batches 1 and 8 from 0 to 13%
faster, dense and ACM models alike (`benchmarks/RESULTS.md`, 2026-12-06 (xiii)).

    packed = serving.pack(params)
    forward = jax.jit(lambda p, x: model.apply({"params": serving.unpack(p)}, x))
    logits = forward(packed, images)

`Packed` is a pytree whose layout is static, so a jitted function retraces only for another layout. The
values are unchanged bit for bit: `unpack(pack(tree))` equals `tree`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from acm_jax.pytree import PyTree

SMALL_MAX_SIZE = 16384  # elements: a ViT-B/16 ACM's gate layer (768 x 5) and per-choice biases (5 x 768) are below


@dataclasses.dataclass(frozen=True)
class Packed:
  """A tree's leaves as `large` (the leaves kept apart, in tree order) and `small` (one flat array per
  dtype, dtypes in name order). `slots[i]` says where leaf i is: ("large", index) or ("small", index into
  `small`, offset, shape)."""
  large: tuple
  small: tuple
  treedef: Any
  slots: tuple

  @property
  def num_arrays(self) -> int:
    return len(self.large) + len(self.small)


jax.tree_util.register_dataclass(Packed, data_fields=["large", "small"], meta_fields=["treedef", "slots"])


def pack(tree: PyTree, max_size: int | None = SMALL_MAX_SIZE) -> Packed:
  """`tree` with every leaf of at most `max_size` elements in one flat array per dtype (`max_size=None`:
  every leaf; 0: none). Call it once, outside the jitted function: it copies the small leaves."""
  if max_size is not None and (not isinstance(max_size, int) or max_size < 0):
    raise ValueError(f"max_size must be None or an integer >= 0, got {max_size!r}")
  items, treedef = jax.tree_util.tree_flatten_with_path(tree)
  for path, leaf in items:
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
      raise TypeError(f"pack takes a tree of arrays; the leaf at {jax.tree_util.keystr(path)} is "
                      f"{type(leaf).__name__}")
  leaves = [leaf for _, leaf in items]
  dtypes = sorted({np.dtype(leaf.dtype) for leaf in leaves
                   if max_size is None or math.prod(leaf.shape) <= max_size}, key=str)
  large, parts, offsets, slots = [], {d: [] for d in dtypes}, {d: 0 for d in dtypes}, []
  for leaf in leaves:
    dtype = np.dtype(leaf.dtype)
    size = math.prod(leaf.shape)
    if dtype in parts and (max_size is None or size <= max_size):
      slots.append(("small", dtypes.index(dtype), offsets[dtype], tuple(leaf.shape)))
      parts[dtype].append(jnp.ravel(leaf))
      offsets[dtype] += size
    else:
      slots.append(("large", len(large)))
      large.append(leaf)
  small = tuple(jnp.concatenate(parts[d]) if parts[d] else jnp.zeros((0,), d) for d in dtypes)
  return Packed(large=tuple(large), small=small, treedef=treedef, slots=tuple(slots))


def unpack(packed: Packed) -> PyTree:
  """The tree that `pack` packed (inside a jitted function: static slices of the flat arrays)."""
  if not isinstance(packed, Packed):
    raise TypeError(f"unpack takes what pack returns, got {type(packed).__name__}")
  leaves = []
  for slot in packed.slots:
    if slot[0] == "large":
      leaves.append(packed.large[slot[1]])
    else:
      _, which, offset, shape = slot
      flat = packed.small[which]
      leaves.append(jnp.reshape(jax.lax.slice_in_dim(flat, offset, offset + math.prod(shape)), shape))
  return jax.tree.unflatten(packed.treedef, leaves)

