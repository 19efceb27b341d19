"""Let XLA capture the ACM kernels in CUDA graphs (command buffers).

XLA records a custom call into a command buffer only when its FFI handler declares the
"command buffer compatible" trait. jaxlib registers the handler behind Pallas-Triton
calls (`triton_kernel_call_ffi`) without it, so every ACM kernel splits the forward's
graphs and is launched one by one from the host: at batch 1-8, where a ViT-B forward
is launch-bound, that cost more than the ACM saves (`benchmarks.graph_probe`).

`enable()` registers jaxlib's own Triton handler (the same instantiate / initialize /
execute stages) a second time, under `TARGET`, with that trait, and wraps the Pallas
GPU lowering so that kernels whose name starts with one of `PREFIXES` call `TARGET`.
The kernels, their arguments and their results do not change; only XLA's scheduling
of the launch does. Once initialized, the Triton handler's execute stage does nothing
but launch the kernel on XLA's stream, which is what stream capture records.

Anything missing on this jax (no registrations, no traits argument, a changed
lowering registry) leaves the standard path in place and `enable()` returns False.
`ACM_JAX_CUDA_GRAPHS=0` in the environment turns it off.

Inert on the GPU stack measured on 2026-12-06 (H100, jax 0.11.2): there the optimised HLO of the ACM
ViT holds 48 `__gpu$xla.gpu.triton` calls (XLA's own Triton kernels, which it schedules as it schedules
its fusions) and no `triton_kernel_call_ffi` call, so `enable()` returns True but retargets nothing
(`benchmarks/RESULTS.md`, 2026-12-06 (xii)). Which call a Pallas kernel lowers to depends on the jax /
jaxlib pair (`jax._src.pallas.triton.pallas_call_registration`); the module stays for stacks that use
jaxlib's FFI target.
"""

from __future__ import annotations

import logging
import os

TARGET = "acm_jax_triton_call"
PREFIXES = ("acm_",)
_JAXLIB_TARGET = "triton_kernel_call_ffi"
_COMMAND_BUFFER_COMPATIBLE = 1  # XLA_FFI_HANDLER_TRAITS_COMMAND_BUFFER_COMPATIBLE

_state: dict[str, object] = {}
log = logging.getLogger(__name__)


def _register_target() -> None:
  from jax._src.lib import gpu_triton

  stages = gpu_triton._cuda_triton.registrations()[_JAXLIB_TARGET]
  import jax
  jax.ffi.register_ffi_target(TARGET, stages, platform="CUDA", api_version=1, traits=_COMMAND_BUFFER_COMPATIBLE)


def _retarget(results) -> None:
  """Points the custom call behind `results` at TARGET if it is one of our kernels."""
  from jax._src.lib.mlir import ir

  if not results:
    return
  op = results[0].owner
  op = getattr(op, "operation", op)
  if ir.StringAttr(op.attributes["call_target_name"]).value != _JAXLIB_TARGET:
    return
  name = ir.StringAttr(ir.DictAttr(op.attributes["backend_config"])["name"]).value
  if name.startswith(PREFIXES):
    op.attributes["call_target_name"] = ir.StringAttr.get(TARGET)


def _wrap_lowering() -> None:
  from jax._src.pallas import core as pallas_core
  from jax.experimental.pallas import triton as plgpu

  params_cls = plgpu.CompilerParams
  rule = pallas_core.get_lowering_rule(params_cls, "gpu")
  if rule is None:
    raise RuntimeError("no Pallas-Triton lowering rule registered")
  if getattr(rule, "_acm_retargets", False):
    return

  def lowering(ctx, *args, **kwargs):
    results = rule(ctx, *args, **kwargs)
    try:
      _retarget(results)
    except Exception as err:  # an unexpected op layout: keep jaxlib's target
      log.debug("cuda_graphs: kept the standard target (%s)", err)
    return results

  lowering._acm_retargets = True
  pallas_core.register_lowering_rule(params_cls, lowering, "gpu")


def enable() -> bool:
  """Idempotent. True when our Pallas kernels will be recorded into command buffers."""
  if "enabled" in _state:
    return bool(_state["enabled"])
  enabled = False
  if os.environ.get("ACM_JAX_CUDA_GRAPHS", "1").lower() not in ("0", "false", "no"):
    try:
      import jax
      from jax._src.lib import gpu_triton
      if jax.default_backend() == "gpu" and getattr(gpu_triton, "_cuda_triton", None) is not None:
        _register_target()
        _wrap_lowering()
        enabled = True
    except Exception as err:
      log.info("cuda_graphs: ACM kernels stay outside CUDA graphs (%s: %s)", type(err).__name__, err)
      _state["error"] = f"{type(err).__name__}: {err}"
  _state["enabled"] = enabled
  return enabled
