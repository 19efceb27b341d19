"""GPU timing scripts; each records its results under benchmarks/results/."""


def gpu_name(device_kind: str) -> str:
  """The short name results files carry: "NVIDIA H200" -> "h200", "NVIDIA H100 80GB HBM3" -> "h100"."""
  return device_kind.lower().replace("nvidia", "").strip().split()[0]
