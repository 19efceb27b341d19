"""Reading checkpoint files of any model family: PyTorch pickles, safetensors, .npz,
orbax directories and JSON, as flat {name: numpy array} dicts. The families map
the names to their own (`acm_jax.vit.formats`, `acm_jax.wav2vec2.hf`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class CheckpointError(ValueError):
  """A checkpoint that cannot become a model's parameters; the message names file and key."""



def _torch_to_numpy(tensor) -> np.ndarray:
  import torch
  tensor = tensor.detach().cpu()
  if tensor.dtype == torch.bfloat16:
    tensor = tensor.float()
  return tensor.numpy()


def read_torch(path: Path) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise CheckpointError(f"{path} is a PyTorch pickle; reading it needs torch, which is not installed "
                          "(pip install torch, or convert the file to .safetensors)") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickles of arbitrary training state are refused by weights_only
    raise CheckpointError(f"cannot read {path} as a PyTorch state dict: {e}") from None
  # training checkpoints wrap the weights; DataParallel prefixes every name with "module."
  for wrapper in ("state_dict_ema", "model_ema", "state_dict", "model", "module"):
    if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
      state = state[wrapper]
      break
  if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
    raise CheckpointError(f"{path} holds no state dict of tensors (found {type(state).__name__})")
  return {k.removeprefix("module."): _torch_to_numpy(v) for k, v in state.items()}


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  from safetensors import safe_open
  try:
    with safe_open(str(path), framework="numpy") as f:
      return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
  except Exception as e:
    raise CheckpointError(f"cannot read {path} as safetensors: {e}") from None


def read_npz(path: Path) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except Exception as e:
    raise CheckpointError(f"cannot read {path} as .npz: {e}") from None


def read_orbax(path: Path) -> dict[str, np.ndarray]:
  import orbax.checkpoint as ocp
  from acm_jax.acmize import flatten
  try:
    restored = ocp.StandardCheckpointer().restore(path.absolute())
  except Exception as e:
    raise CheckpointError(f"cannot restore the orbax checkpoint {path}: {e}") from None
  return {k: np.asarray(v) for k, v in flatten(restored).items()}


def read_json(path: Path) -> dict:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot read {path} as JSON: {e}") from None
