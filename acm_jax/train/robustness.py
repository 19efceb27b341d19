"""Top-1 under the ImageNet-C corruptions (`acm_jax.data.corruptions`) for several models, and
their mCE against the dense model. Every requested (corruption, severity) is checked for a source
before any model is evaluated."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from acm_jax.data import corruptions
from acm_jax.data import synthetic
from acm_jax.train import phases


def _prepared(exp: phases.Experiment, corruption: str, severity: int) -> str | None:
  name = corruptions.prepared_name(exp.config.dataset, corruption, severity)
  data_dir = exp.config.data_dir
  if name is None or data_dir is None or not os.path.isdir(os.path.join(data_dir, *name.split("/"))):
    return None
  return f"tfds:{name}"


def corrupted_experiment(exp: phases.Experiment, corruption: str, severity: int,
                         frost_dir: str | None = None) -> phases.Experiment:
  """`exp` whose test split is corrupted: the prepared TFDS set when --data_dir has it, else the clean
  test images corrupted on the fly (frost: with the pictures of `corruptions.frost_pictures(frost_dir)`,
  a ValueError when there are none)."""
  prepared = _prepared(exp, corruption, severity)
  if prepared is not None:
    return dataclasses.replace(exp, config=dataclasses.replace(exp.config, dataset=prepared), group_masks=False)
  if corruption == "frost":
    try:
      corruptions.frost_pictures(frost_dir)
    except ValueError as e:
      where = corruptions.prepared_name(exp.config.dataset, corruption, severity) or "a prepared corrupted set"
      raise ValueError(f"corruption 'frost' at severity {severity}: {where} is not in --data_dir "
                       f"{exp.config.data_dir!r}; on the fly, {e}") from None
  clean = exp.iterator

  def iterator(name, split, batch_size, **kwargs):
    for i, batch in enumerate(clean(name, split, batch_size, **kwargs)):
      images = np.round((np.asarray(batch["image"], np.float32) + 1.0) * 127.5).astype(np.uint8)
      images = corruptions.corrupt(images, corruption, severity, seed=exp.config.seed * 100003 + i,
                                   frost_dir=frost_dir)
      yield {**batch, "image": synthetic.normalize(images)}

  return dataclasses.replace(exp, iterator=iterator)


def evaluate(exp: phases.Experiment, models: Sequence[tuple[str, Any, str, int | None]],
             names: Sequence[str], severities: Sequence[int], evaluate_fn=phases.evaluate,
             frost_dir: str | None = None) -> dict:
  """models: (record name, params, eval mode, fixed k); `evaluate_fn` has `phases.evaluate`'s
  signature. Returns {"top1": {model: {corruption:
  {severity: top-1}}}, "mean_top1": {model: ...}, "ce": {model: {corruption: CE, "mCE": ...}}};
  "ce" only when a model is named "dense"."""
  variants = {(c, s): corrupted_experiment(exp, c, s, frost_dir) for c in names for s in severities}
  top1: dict = {name: {c: {} for c in names} for name, *_ in models}
  for (c, s), variant in variants.items():
    for name, params, mode, fixed_k in models:
      top1[name][c][s] = evaluate_fn(variant, params, name, mode, fixed_k=fixed_k)["top1"]
  out = {"corruptions": list(names), "severities": list(severities), "top1": top1,
         "mean_top1": {m: float(np.mean([v for per in t.values() for v in per.values()])) for m, t in top1.items()}}
  if "dense" in top1:
    error = {m: {c: {s: 1.0 - v for s, v in per.items()} for c, per in t.items()} for m, t in top1.items()}
    out["ce"] = {m: corruptions.mce(e, error["dense"]) for m, e in error.items()}
  return out
