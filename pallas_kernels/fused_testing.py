"""Random inputs for the fused ACM group kernels (`pallas_kernels.acm_fused`), shared by
their CPU tests and the GPU check (`benchmarks.fused_check`), and argument shapes for their CUDA lowering tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def random_group(rng: np.random.Generator | int, tokens: int, dim: int, num_learners: int, width: int, size: int,
                 dtype, *, gate: str = "linear", k_kind: str = "random",
                 bias: bool = True) -> tuple[jax.Array, list[dict]]:
  """x (tokens, dim) and `size` ACMs that read it, in `acm_fused.acm_group`'s format.

  rng: a generator or a seed. Weights are scaled so that hidden units and outputs are
  about unit size, and gates spread the tokens over every choice. gate: "linear" (a
  (kernel, bias) gate the kernels run) or "logits" (given (tokens, N+1) logits);
  k_kind "zeros" / "full" steers every gate to choice 0 / N; bias: per-choice output biases.
  """
  if gate not in ("linear", "logits") or k_kind not in ("random", "zeros", "full"):
    raise ValueError(f"gate={gate!r} must be 'linear' or 'logits', k_kind={k_kind!r} 'random', 'zeros' or 'full'")
  rng = np.random.default_rng(rng)
  x = jnp.asarray(rng.normal(size=(tokens, dim)), dtype)
  total = num_learners * width
  steer = np.zeros(num_learners + 1)
  if k_kind != "random":
    steer[0 if k_kind == "zeros" else num_learners] = 100.0
  groups = []
  for _ in range(size):
    params = dict(w1=jnp.asarray(rng.normal(size=(dim, total)) / np.sqrt(dim), dtype),
                  b1=jnp.asarray(0.5 * rng.normal(size=(total,)), dtype),
                  w2=jnp.asarray(rng.normal(size=(total, dim)) / np.sqrt(width), dtype))
    if bias:
      params["b2"] = jnp.asarray(rng.normal(size=(num_learners + 1, dim)), dtype)
    if gate == "linear":
      params["gate"] = (jnp.asarray(2 * rng.normal(size=(dim, num_learners + 1)) / np.sqrt(dim), dtype),
                        jnp.asarray(0.3 * rng.normal(size=(num_learners + 1,)) + steer, dtype))
    else:
      params["logits"] = jnp.asarray(rng.normal(size=(tokens, num_learners + 1)) + steer, jnp.float32)
    groups.append(params)
  return x, groups


def bf16_group_shapes(dim: int, n: int, width: int) -> dict:
  """Shapes (no arrays) of one bf16 ACM of n learners of `width` at d = `dim` with a linear gate, for lowering."""
  shape, bf16 = jax.ShapeDtypeStruct, jnp.bfloat16
  return dict(w1=shape((dim, n * width), bf16), b1=shape((n * width,), bf16), w2=shape((n * width, dim), bf16),
              b2=shape((n + 1, dim), bf16), gate=(shape((dim, n + 1), bf16), shape((n + 1,), bf16)))
