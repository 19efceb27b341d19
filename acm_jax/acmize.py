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

import concurrent.futures
import contextlib
import os
from typing import Any, Sequence

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


def _with_first_choice(bias, num_learners: int, dtype=None):
  """(N+1, d) zeros with row 1 = bias (choice 1 adds the replaced block's output bias), in dtype
  (default: the bias's); a numpy array for a numpy bias (`acmize` of numpy params), else jax."""
  dtype = bias.dtype if dtype is None else dtype
  if isinstance(bias, np.ndarray):
    out = np.zeros((num_learners + 1,) + bias.shape, dtype)
    out[1] = bias
    return out
  return jnp.zeros((num_learners + 1,) + bias.shape, dtype).at[1].set(bias)


def learners_from_mlp(fc1: dict, fc2: dict, width: int, num_learners: int,
                      output_bias: bool) -> dict[str, Any]:
  """Learners sliced from a dense MLP (module doc); numpy arrays for numpy params, jax arrays otherwise."""
  used = width * num_learners
  if used > fc1["kernel"].shape[1]:
    raise ValueError(f"{num_learners} learners of width {width} exceed the MLP width {fc1['kernel'].shape[1]}")
  out = {"w1": fc1["kernel"][:, :used], "b1": fc1["bias"][:used], "w2": fc2["kernel"][:used]}
  if output_bias:
    out["b2"] = _with_first_choice(fc2["bias"], num_learners)
  return out


def singular_factors(kernel, rank: int) -> tuple[np.ndarray, np.ndarray]:
  """(w1 (d_in, rank), w2 (rank, d_out)) in float64 with w1 @ w2 the best rank-`rank` approximation
  of `kernel`: consecutive singular directions, largest first, each scaled by the root of its
  singular value; columns past the kernel's rank are zeros."""
  kernel = np.asarray(kernel, np.float64)
  u, s, vt = np.linalg.svd(kernel, full_matrices=False)
  used = min(rank, s.shape[0])
  root = np.sqrt(s[:used])
  w1 = np.zeros((kernel.shape[0], rank))
  w2 = np.zeros((rank, kernel.shape[1]))
  w1[:, :used] = u[:, :used] * root
  w2[:used] = root[:, None] * vt[:used]
  return w1, w2


@contextlib.contextmanager
def _one_blas_thread():
  try:
    import threadpoolctl
  except ImportError:  # optional: without it each SVD may still spread over BLAS threads
    yield
    return
  with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
    yield


def many_singular_factors(kernels: Sequence[Any], ranks: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
  """`singular_factors` of several kernels, one host thread each with one BLAS thread.

  LAPACK's SVD of a 768 x 768 matrix barely gains from a second BLAS thread (0.26 against 0.24 s
  on a 2-core x86 VM), so the 48 projections of a ViT-B/16 run side by side on the host's cores
  instead (LAPACK runs without the GIL)."""
  if len(kernels) < 2:
    return [singular_factors(k, r) for k, r in zip(kernels, ranks)]
  workers = min(len(kernels), os.cpu_count() or 1)
  with _one_blas_thread(), concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(singular_factors, kernels, ranks))


def learners_from_linear(dense: dict, width: int, num_learners: int, output_bias: bool,
                         factors: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
  """Identity learners of a (d_in, d_out) projection: its singular directions (module doc), in
  the kernel's dtype; numpy arrays for a numpy kernel, jax arrays otherwise. factors: the
  kernel's `singular_factors` at rank width * num_learners, when already computed."""
  w1, w2 = factors if factors is not None else singular_factors(dense["kernel"], width * num_learners)
  dtype = dense["kernel"].dtype
  host = isinstance(dense["kernel"], np.ndarray)
  cast = (lambda a: np.asarray(a, dtype)) if host else (lambda a: jnp.asarray(a, dtype))
  out = {"w1": cast(w1), "b1": cast(np.zeros((width * num_learners,))), "w2": cast(w2)}
  if output_bias:
    out["b2"] = _with_first_choice(dense["bias"], num_learners, dtype)
  return out


def acmize(dense_params: PyTree, acm_init_params: PyTree, acm_paths: list[str], *,
           num_learners: int, init: str = "dense") -> PyTree:
  """Dense params -> ACM params with the structure of `acm_init_params`.

  init="dense": learners from the dense weights (see module doc);
  init="random": learners keep their random initialisation.
  Gates always keep their initialisation from `acm_init_params`.
  Numpy dense params give numpy learners (no jax op per leaf: `phases.acm_params` converts on the host
  that way); jax arrays give jax arrays.
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
  linear = [p for p in acm_paths if init == "dense" and "fc1" not in subtree(dense_params, p)]
  factors = dict(zip(linear, many_singular_factors(  # every projection's SVD at once, side by side
      [subtree(dense_params, p)["dense"]["kernel"] for p in linear],
      [subtree(acm_init_params, p)["w1"].shape[1] for p in linear])))
  for path in acm_paths:
    init_sub = subtree(acm_init_params, path)
    width = init_sub["w1"].shape[1] // num_learners
    learners = {name: init_sub[name] for name in ("w1", "b1", "w2", "b2") if name in init_sub}
    if init == "dense":
      dense_sub = subtree(dense_params, path)
      if path in factors:
        learners = learners_from_linear(dense_sub["dense"], width, num_learners, "b2" in init_sub, factors[path])
      else:
        learners = learners_from_mlp(dense_sub["fc1"], dense_sub["fc2"], width, num_learners, "b2" in init_sub)
    for name, value in learners.items():
      out[f"{path}/{name}"] = value
    for key, value in flatten(init_sub["gate"]).items():
      out[f"{path}/gate/{key}"] = value
  return unflatten(out)

