"""Turn the parameters of a dense transformer into those of its ACMized twin.

Model-agnostic: it needs the dense params, freshly initialised params of the
ACM model (which fix the tree structure, gates included) and the paths of the
replaced blocks. Everything outside those paths is copied unchanged. Scanned models (parameters
stacked under `blocks`) are converted layer by layer (`transformer.unstack_blocks`).

MLP learners are slices of the dense MLP: learner n takes hidden units
[(n-1)*h, n*h) of fc1/fc2, and fc2's bias becomes choice 1's output bias, so
with k = N everywhere the ACM computes exactly the dense block. A (dim, dim)
attention projection has no hidden units to slice: its identity learners take
consecutive singular directions of the dense matrix (largest first), so each
prefix is the best low-rank approximation of its size.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from acm_jax import transformer
from acm_jax.pytree import PyTree


def flatten(params: PyTree) -> dict[str, Any]:
  return traverse_util.flatten_dict(params, sep="/")


def unflatten(flat: dict[str, Any]) -> PyTree:
  return traverse_util.unflatten_dict(flat, sep="/")


def subtree(params: PyTree, path: str) -> PyTree:
  for part in path.split("/"):
    if part not in params:
      raise KeyError(f"no parameter subtree {path!r} (missing {part!r}; found {sorted(params)})")
    params = params[part]
  return params


def learners_from_mlp(fc1: dict, fc2: dict, width: int, num_learners: int,
                      output_bias: bool) -> dict[str, jax.Array]:
  used = width * num_learners
  if used > fc1["kernel"].shape[1]:
    raise ValueError(f"{num_learners} learners of width {width} exceed the MLP width {fc1['kernel'].shape[1]}")
  out = {"w1": fc1["kernel"][:, :used], "b1": fc1["bias"][:used], "w2": fc2["kernel"][:used]}
  if output_bias:
    out["b2"] = jnp.zeros((num_learners + 1, fc2["kernel"].shape[1]), fc2["bias"].dtype).at[1].set(fc2["bias"])
  return out


def learners_from_linear(dense: dict, width: int, num_learners: int, output_bias: bool) -> dict[str, jax.Array]:
  kernel = np.asarray(dense["kernel"], np.float64)
  u, s, vt = np.linalg.svd(kernel, full_matrices=False)
  used = min(width * num_learners, s.shape[0])
  root = np.sqrt(s[:used])
  w1 = np.zeros((kernel.shape[0], width * num_learners))
  w2 = np.zeros((width * num_learners, kernel.shape[1]))
  w1[:, :used] = u[:, :used] * root
  w2[:used] = root[:, None] * vt[:used]
  dtype = dense["kernel"].dtype
  out = {"w1": jnp.asarray(w1, dtype), "b1": jnp.zeros((width * num_learners,), dtype),
         "w2": jnp.asarray(w2, dtype)}
  if output_bias:
    out["b2"] = jnp.zeros((num_learners + 1, kernel.shape[1]), dtype).at[1].set(dense["bias"])
  return out


def acmize(dense_params: PyTree, acm_init_params: PyTree, acm_paths: list[str], *,
           num_learners: int, init: str = "dense") -> PyTree:
  """Dense params -> ACM params with the structure of `acm_init_params`.

  init="dense": learners from the dense weights (see module doc);
  init="random": learners keep their random initialisation.
  Gates always keep their initialisation from `acm_init_params`.
  """
  if init not in ("dense", "random"):
    raise ValueError(f"unknown learner init {init!r}; expected 'dense' or 'random'")
  if transformer.is_stacked(acm_init_params) or transformer.is_stacked(dense_params):
    # scanned blocks: ACMized layer by layer under their unrolled names, restacked as the ACM model's
    out = acmize(transformer.unstack_blocks(dense_params), transformer.unstack_blocks(acm_init_params), acm_paths,
                 num_learners=num_learners, init=init)
    return transformer.stack_blocks(out) if transformer.is_stacked(acm_init_params) else out
  dense_flat = flatten(dense_params)
  out = {}
  for key, value in flatten(acm_init_params).items():
    owner = next((p for p in acm_paths if key.startswith(p + "/")), None)
    if owner is not None:
      continue
    if key not in dense_flat:
      raise KeyError(f"ACM model parameter {key!r} has no counterpart in the dense params")
    if dense_flat[key].shape != value.shape:
      raise ValueError(f"parameter {key!r}: dense shape {dense_flat[key].shape} != ACM model shape {value.shape}")
    out[key] = dense_flat[key]
  for path in acm_paths:
    init_sub = subtree(acm_init_params, path)
    width = init_sub["w1"].shape[1] // num_learners
    learners = {name: init_sub[name] for name in ("w1", "b1", "w2", "b2") if name in init_sub}
    if init == "dense":
      dense_sub = subtree(dense_params, path)
      if "fc1" in dense_sub:
        learners = learners_from_mlp(dense_sub["fc1"], dense_sub["fc2"], width, num_learners, "b2" in init_sub)
      else:
        learners = learners_from_linear(dense_sub["dense"], width, num_learners, "b2" in init_sub)
    for name, value in learners.items():
      out[f"{path}/{name}"] = value
    for key, value in flatten(init_sub["gate"]).items():
      out[f"{path}/gate/{key}"] = value
  return unflatten(out)

