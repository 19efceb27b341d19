"""The one `PyTree` alias: nested dicts (or lists, tuples) of arrays, as parameters,
optimizer states and batches are throughout acm_jax."""

from typing import Any

PyTree = Any
