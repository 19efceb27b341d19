"""cuDNN fused attention (`transformer.attend(..., "cudnn")`) against XLA's, forward and
backward, at ViT lengths (odd ones are padded), then one ACM ViT-B/16 finetune step
with the default ("auto") attention. GPU only; prints each case and exits 1 on a failure.

    python3 -m benchmarks.attention_check
"""

import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from acm_jax import transformer


def main():
  if jax.default_backend() != "gpu":
    sys.exit("attention_check needs a GPU")
  failures = []
  for tokens in (197, 198, 256, 65):
    q, k, v, g = (jax.random.normal(jax.random.key(i), (4, tokens, 12, 64), jnp.bfloat16) for i in range(4))

    def loss(q, k, v, impl):
      return (transformer.attend(q, k, v, None, impl).astype(jnp.float32) * g.astype(jnp.float32)).sum()

    try:
      outs = {impl: jax.jit(lambda q, k, v, impl=impl: (transformer.attend(q, k, v, None, impl),
                                                          jax.grad(loss, argnums=(0, 1, 2))(q, k, v, impl)))(q, k, v)
              for impl in ("xla", "cudnn")}
      errs = []
      for a, b in zip(jax.tree.leaves(outs["cudnn"]), jax.tree.leaves(outs["xla"])):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        errs.append(float(np.abs(a - b).max() / np.abs(b).max()))
      ok = max(errs) < 3e-2
      print(f"T={tokens}: output and q/k/v gradients vs XLA, max error / max = {', '.join(f'{e:.1e}' for e in errs)}"
            + ("" if ok else "  BAD"))
      if not ok:
        failures.append(f"T={tokens}")
    except Exception as err:
      print(f"T={tokens}: FAILED {type(err).__name__}: {str(err)[:1000]}")
      failures.append(f"T={tokens}")
  from benchmarks import sharding_bench
  try:
    s = sharding_bench.setup(batch_size=8, mesh="data:1", strategy="dp", devices=jax.devices()[:1], acm=True,
                             remat=False, model="vit_b16")
    state, batch = s.init_state(), s.batch()
    jax.block_until_ready(s.sharded_step()(state, batch))
    print("ACM ViT-B/16 finetune step, bf16, attention auto: ok")
  except Exception:
    print("ACM ViT-B/16 finetune step FAILED:\n" + traceback.format_exc()[-3000:])
    failures.append("finetune step")
  print(f"{len(failures)} failures {failures}")
  sys.exit(1 if failures else 0)


if __name__ == "__main__":
  main()
