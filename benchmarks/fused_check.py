"""GPU check of the fused ACM kernels (`pallas_kernels.acm_fused`) against the float32
reference: groups of 1 and 3, the sorted, unsorted, one-launch, two-launch and dense XLA paths, linear
gates and given logits.

    python3 -m benchmarks.fused_check

Prints one line per case and exits non-zero on a mismatch. CI runs the same cases in
interpret mode on the CPU (tests/test_acm_fused.py); this compiles them with Triton.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import acm_fused as af
from pallas_kernels.fused_testing import random_group


def main():
  rng = np.random.default_rng(0)
  failures = 0
  cases = [(197, 768, 4, 768, 1, "gelu", 0), (1576, 768, 4, 768, 1, "gelu", 0), (6304, 768, 4, 96, 3, "identity", 1),
           (197, 768, 4, 96, 3, "identity", 1), (50432, 768, 4, 768, 1, "gelu", 0), (3000, 768, 4, 96, 1, "identity", 1)]
  runs = [(case, gate, None) for case in cases for gate in ("linear", "logits")]  # the default path
  runs += [(case, "linear", "onepass") for case in cases if case[0] <= 3000]  # the one-launch path
  runs += [(case, gate, "twolaunch") for case in cases if case[0] <= 3000 for gate in ("linear", "logits")]
  runs += [(case, "linear", "xla") for case in cases[2:4]]  # the dense XLA path
  for (tokens, dim, n, width, size, act, min_choice), gate, path in runs:
    x, groups = random_group(rng, tokens, dim, n, width, size, jnp.bfloat16, gate=gate)
    fn = jax.jit(lambda x, g: af.acm_group(x, g, num_learners=n, activation=act, min_choice=min_choice,
                                            cost_shift=0.1, **({path: True} if path else {})))
    outs, k = fn(x, groups)
    _, k_ref = af.acm_group_reference(x, groups, num_learners=n, min_choice=min_choice, cost_shift=0.1)
    refs, _ = af.acm_group_reference(x, groups, num_learners=n, activation=act, k=k)
    agree = float(jnp.mean(k == k_ref))
    errs = [float(jnp.linalg.norm((o.astype(jnp.float32) - r.astype(jnp.float32))) / jnp.linalg.norm(r.astype(jnp.float32)))
            for o, r in zip(outs, refs)]
    ok = agree > 0.99 and max(errs) < 2e-2 and all(bool(jnp.isfinite(o.astype(jnp.float32)).all()) for o in outs)
    failures += not ok
    print(f"T={tokens:6d} G={size} h={width} {act:8s} gate={gate:6s}{' ' + path if path else ''} k agrees {agree:.4f} "
          f"rel err {max(errs):.2e} k hist {np.bincount(np.asarray(k).ravel(), minlength=n + 1)} "
          f"{'ok' if ok else 'BAD'}", flush=True)
  sys.exit(1 if failures else 0)


if __name__ == "__main__":
  main()
