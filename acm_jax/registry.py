"""Model families: what the CLI driver needs from a family folder.

A family (`acm_jax/vit`, `acm_jax/wav2vec2`, or a user's own package) registers a
`Family` naming its config class, its `build(config) -> phases.Experiment` (model,
task, data, FLOP count, checkpoint reader) and how its evaluation records read.
Its parameter names reach the sharding rules through
`acm_jax.sharding.register_param_rules`, when its package is imported.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Collection, Sequence

# the families of this repository, imported on first use
BUILTIN = {"vit": "acm_jax.vit.task", "wav2vec2": "acm_jax.wav2vec2.task"}


@dataclasses.dataclass(frozen=True)
class Column:
  header: str
  key: str
  scale: float = 1.0  # e.g. 100 for a percentage
  unit: str = ""
  width: int = 8
  digits: int = 2


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  description: str  # the CLI's --help text
  config_class: type  # an acm_jax.train.config.ExperimentConfig subclass with the family's defaults
  build: Callable[[Any], Any]  # config -> phases.Experiment, validating everything first
  model_presets: Collection[str]  # allowed --model values (read when the flags are parsed)
  columns: Sequence[Column]  # the eval table's columns after the model name
  token_word: str = "tokens"  # what the family's tokens are called in the eval table
  # (exp, params, model name, mode, fixed_k) -> eval record; None: phases.evaluate
  evaluate: Callable[..., dict] | None = None
  check_dense: Callable[[dict, Any], str | None] | None = None  # a warning about the evaluated dense model
  checkpoint_formats: Sequence[str] = ()  # what --init reads


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
  _FAMILIES[family.name] = family
  return family


def get(name: str) -> Family:
  if name not in _FAMILIES and name in BUILTIN:
    importlib.import_module(BUILTIN[name])
  if name not in _FAMILIES:
    raise ValueError(f"unknown model family {name!r}; expected one of {sorted({*_FAMILIES, *BUILTIN})}")
  return _FAMILIES[name]
