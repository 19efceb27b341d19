"""Why token halting beats the ACM on the glyph set, measured on a finished comparison.

  nice -n 10 python3 -m benchmarks.halting_analysis [--workdir=runs/baselines_bench] [--acm_budget=0.25]
      [--halting_depth=1] [experiment flags of that workdir, e.g. --dataset=...]

Reads the dense model (<workdir>/pretrain), the ACM finetuned at --acm_budget and
the token-halting model at target depth --halting_depth (both optional) and
measures on the test split:
  forced halting: top-1 of the dense model's class token when the object (or
    background, or all patch) tokens stop after block b: masked out as keys and
    frozen, as a halted token is, while the class token runs every block;
  probes: how much of the glyph each block's class token (and the mean object
    token) carries: a ridge-regression linear probe trained on a held-out train
    batch, top-1 on the test split;
  where compute goes: the ACM's mean k per layer for the class, object and
    background tokens, next to the halting model's blocks run per token group;
    and the ACM's GFLOPs with every token at k = 0..N, as a fraction of dense; and a figure
    of per-token maps: the ACM's k in every layer next to the blocks each token runs
    under halting, for a few test images.
--parts picks some of these (forced, probe, compute); a run updates its parts in the
dataset's entry of benchmarks/results/halting_analysis.json and keeps the others.
The compute maps go to docs/figures/halting_vs_acm.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from acm_jax.train import config as config_lib
from acm_jax.train import loop, phases, steps
from acm_jax.vit import task as vit_task
from acm_jax.vit.baselines import calibration, common, token_halting

HERE = Path(__file__).resolve().parent
GROUPS = ("object", "background")


def token_groups(exp: phases.Experiment, batch: dict) -> dict[str, np.ndarray]:
  """(batch, tokens) masks: "object", "background" (patch tokens) and "class"."""
  groups = {name: np.asarray(mask) for name, mask in exp.task.token_groups(batch).items()}
  cls = np.zeros_like(groups["object"])
  cls[:, 0] = True
  return {**groups, "class": cls, "patches": ~cls}


def forced_forward(cfg, dense, images, halted: jax.Array, after: int):
  """Class-token logits and every block's class token (depth + 1, batch, dim) when the
  tokens in `halted` (batch, tokens) stop after block `after` (0: before block 1)."""
  x = common.embed(cfg, dense, images)
  cls_states = [x[:, 0]]
  for i in range(cfg.depth):
    alive = ~(halted & (i >= after))
    x = jnp.where(alive[..., None], common.block(cfg, dense, i, x, alive[:, None, None, :]), x)
    cls_states.append(x[:, 0])
  return common.classify(cfg, dense["norm"], dense["head"], x[:, 0]), jnp.stack(cls_states)


def block_states(cfg, dense, images):
  """Every block's tokens, (depth + 1, batch, tokens, dim), block 0 the embedding."""
  x = common.embed(cfg, dense, images)
  states = [x]
  for i in range(cfg.depth):
    x = common.block(cfg, dense, i, x)
    states.append(x)
  return jnp.stack(states)


def ridge_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                classes: int, ridge: float = 1e-2) -> float:
  """Top-1 of a linear least-squares probe (standardised features, one-hot targets)."""
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  a = np.concatenate([(train_x - mean) / std, np.ones((len(train_x), 1))], 1)
  b = np.eye(classes)[train_y]
  w = np.linalg.solve(a.T @ a + ridge * len(a) * np.eye(a.shape[1]), a.T @ b)
  t = np.concatenate([(test_x - mean) / std, np.ones((len(test_x), 1))], 1)
  return float(np.mean(np.argmax(t @ w, -1) == test_y))


def test_batches(exp: phases.Experiment):
  return list(phases.eval_batches(exp, with_masks=True))


PARTS = ("forced", "probe", "compute")


def analyse(exp: phases.Experiment, acm_budget: float, halting_depth: float, probe_examples: int,
            parts: tuple[str, ...] = PARTS) -> dict:
  cfg = common.dense_config(exp)
  dense = phases.dense_params(exp)
  batches = test_batches(exp)
  out = {"dataset": exp.config.dataset, "depth": cfg.depth}
  if "forced" in parts:
    forced_halting(exp, cfg, dense, batches, out)
  if "probe" in parts:
    probes(exp, cfg, dense, batches, probe_examples, out)
  if "compute" in parts:
    where_compute_goes(exp, cfg, batches, acm_budget, halting_depth, out)
  return out


def forced_halting(exp, cfg, dense, batches, out):
  """Top-1 when one token group stops after block b, the class token running every block."""
  forced = jax.jit(lambda images, halted, after: forced_forward(cfg, dense, images, halted, after)[0],
                   static_argnums=2)
  table = {}
  for group in ("object", "background", "patches"):
    row = []
    for after in range(cfg.depth + 1):
      correct = total = 0.0
      for batch in batches:
        halted = jnp.asarray(token_groups(exp, batch)[group])
        logits = forced(exp.task.inputs(batch), halted, after)
        valid = batch["valid"]
        correct += float(np.sum((np.argmax(logits, -1) == batch["label"]) * valid))
        total += float(valid.sum())
      row.append(correct / total)
    table[group] = row
  out["forced_halting_top1"] = {"halted_after_block": list(range(cfg.depth + 1)), **table}


def probes(exp, cfg, dense, batches, probe_examples, out):
  """Linear probes of the glyph from each block's class token and mean object token."""
  states = jax.jit(lambda images: block_states(cfg, dense, images))

  def features(batch):
    s = np.asarray(states(exp.task.inputs(batch)))  # (depth + 1, batch, tokens, dim)
    obj = token_groups(exp, batch)["object"].astype(np.float32)
    obj_mean = np.einsum("lbtd,bt->lbd", s, obj) / np.maximum(obj.sum(-1), 1)[None, :, None]
    return s[:, :, 0], obj_mean

  c = exp.config
  train = next(exp.iterator(c.dataset, "train", probe_examples, image_size=c.image_size, seed=c.seed + 2,
                            data_dir=c.data_dir, start_step=2 * calibration.CALIBRATION_STEP // probe_examples,
                            with_masks=True))
  train_cls, train_obj = features(train)
  test_cls, test_obj, test_y = [], [], []
  for batch in batches:
    n = int(batch["valid"].sum())
    f_cls, f_obj = features(batch)
    test_cls.append(f_cls[:, :n])
    test_obj.append(f_obj[:, :n])
    test_y.append(batch["label"][:n])
  test_cls, test_obj, test_y = np.concatenate(test_cls, 1), np.concatenate(test_obj, 1), np.concatenate(test_y)
  classes = exp.info.num_classes
  out["probe_top1"] = {
      "after_block": list(range(cfg.depth + 1)),
      "class_token": [ridge_probe(train_cls[l], train["label"], test_cls[l], test_y, classes)
                      for l in range(cfg.depth + 1)],
      "mean_object_token": [ridge_probe(train_obj[l], train["label"], test_obj[l], test_y, classes)
                            for l in range(cfg.depth + 1)],
      "probe_train_examples": probe_examples}


def where_compute_goes(exp, cfg, batches, acm_budget, halting_depth, out):
  """Mean k of the ACM and blocks run under halting per token group; what the ACM can remove at all."""
  dense_flops = exp.flops(None, True)["total"]
  out["acm_flops_fraction_of_dense"] = {
      f"all_k_{k}": float(exp.flops({p: float(k) for p in exp.task.paths}, False)["total"] / dense_flops)
      for k in range(exp.config.num_learners + 1)}
  acm_run = vit_task.build(dataclasses.replace(exp.config, budget=acm_budget))
  if loop.params_dir(acm_run.run_dir("finetune")).exists():
    params = loop.load_params(acm_run.run_dir("finetune"), phases.abstract_params(acm_run, "acm"), "finetune")

    @jax.jit
    def ks(images):
      _, aux = acm_run.task.acm_model.apply({"params": params}, images, mode="argmax", mutable=["acm"])
      return jnp.stack([jnp.argmax(ch, -1) for ch in steps.acm_choices(acm_run.task, aux)])  # (acms, b, t)

    sums = {g: np.zeros(len(acm_run.task.acm_specs)) for g in ("class", *GROUPS)}
    counts = {g: 0.0 for g in sums}
    maps = []
    for batch in batches:
      k = np.asarray(ks(exp.task.inputs(batch))).astype(np.float64)
      groups, valid = token_groups(exp, batch), batch["valid"][:, None]
      for g in sums:
        mask = groups[g] & valid
        sums[g] += np.einsum("abt,bt->a", k, mask)
        counts[g] += mask.sum()
      maps.append(k[:, :, 1:])  # (acms, batch, patches)
    out["acm"] = {"budget": acm_budget, "paths": acm_run.task.paths,
                  "mean_k_per_layer": {g: (sums[g] / counts[g]).tolist() for g in sums},
                  "num_learners": acm_run.config.num_learners}
    out["_acm_maps"] = np.concatenate(maps, 1)[:, :8]
  halting_dir = exp.workdir / f"token_halting_d{halting_depth:g}"
  if loop.params_dir(halting_dir).exists():
    abstract = {"dense": phases.abstract_params(exp, "dense"),
                "halting": {"scale": jax.ShapeDtypeStruct((), jnp.float32),
                            "shift": jax.ShapeDtypeStruct((), jnp.float32)}}
    params = loop.load_params(halting_dir, abstract, "token halting")
    halting = token_halting.Halting(target_depth=halting_depth)
    blocks = jax.jit(lambda images: jnp.ceil(token_halting.forward(cfg, halting, params, images)[1]["ponder"]
                                             - 1e-4) - 1)
    sums = {g: 0.0 for g in ("class", *GROUPS)}
    counts = {g: 0.0 for g in sums}
    maps = []
    for batch in batches:
      run = np.asarray(blocks(exp.task.inputs(batch)))
      groups, valid = token_groups(exp, batch), batch["valid"][:, None]
      for g in sums:
        mask = groups[g] & valid
        sums[g] += float((run * mask).sum())
        counts[g] += float(mask.sum())
      maps.append(run[:, 1:])
    out["token_halting"] = {"target_depth": halting_depth,
                            "mean_blocks_run": {g: sums[g] / counts[g] for g in sums}}
    out["_halting_maps"] = np.concatenate(maps)[:8]
  out["_images"] = np.concatenate([b["image"] for b in batches[:1]])[:8]
  out["_objects"] = np.asarray(token_groups(exp, batches[0])["object"])[:8, 1:]


def figure(result: dict, path: Path) -> None:
  """Per image (columns): the image, its object tokens, the ACM's k in every layer and the blocks
  each token runs under token halting."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [("image", result["_images"], None), ("object tokens", result["_objects"], 1)]
  if "_acm_maps" in result:
    acm = result["acm"]
    rows += [(f"ACM b{acm['budget']:g}: k, {acm_path.split('/')[0]}", layer, acm["num_learners"])
             for acm_path, layer in zip(acm["paths"], result["_acm_maps"])]
  if "_halting_maps" in result:
    rows.append((f"halting d{result['token_halting']['target_depth']:g}: blocks run", result["_halting_maps"],
                 result["depth"]))
  cols = 6
  fig, axes = plt.subplots(len(rows), cols, figsize=(1.5 * cols + 0.6, 1.5 * len(rows)), squeeze=False)
  for r, (title, data, vmax) in enumerate(rows):
    for c in range(cols):
      ax = axes[r, c]
      ax.set_xticks([])
      ax.set_yticks([])
      if vmax is None:
        img = np.asarray(data[c], np.float32)
        ax.imshow((img - img.min()) / (img.max() - img.min() + 1e-6))
        continue
      side = int(round(np.sqrt(data.shape[1])))
      shown = ax.imshow(np.asarray(data[c], np.float32).reshape(side, side), vmin=0, vmax=vmax,
                        cmap="gray" if vmax == 1 else "viridis")
      if c == 0:
        ax.set_ylabel(title, fontsize=6)
    if vmax not in (None, 1):
      fig.colorbar(shown, ax=axes[r, :].tolist(), fraction=0.02, pad=0.01, ticks=range(vmax + 1))
  axes[0, 0].set_ylabel("image", fontsize=6)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--acm_budget", type=float, default=0.25)
  parser.add_argument("--halting_depth", type=float, default=1.0)
  parser.add_argument("--probe_examples", type=int, default=4096)
  parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
  config_lib.add_flags(parser)
  args = parser.parse_args(argv)
  cfg = config_lib.from_flags(args, config_lib.ExperimentConfig(workdir="runs/baselines_bench"))
  parts = tuple(p for p in args.parts.split(",") if p)
  if not parts or set(parts) - set(PARTS):
    print(f"error: --parts must be a comma-separated subset of {PARTS}, got {args.parts!r}", file=sys.stderr)
    return 2
  if args.probe_examples < 1:
    print(f"error: --probe_examples must be >= 1, got {args.probe_examples}", file=sys.stderr)
    return 2
  exp = vit_task.build(cfg)
  result = analyse(exp, args.acm_budget, args.halting_depth, args.probe_examples, parts)
  if "_acm_maps" in result or "_halting_maps" in result:
    figure(result, HERE.parent / "docs" / "figures" / "halting_vs_acm.png")
  # a run of some parts updates those in the dataset's record and keeps the others
  path = HERE / "results" / "halting_analysis.json"
  stored = json.loads(path.read_text()) if path.exists() else {}
  record = stored.get(cfg.dataset, {})
  record.update({k: v for k, v in result.items() if not k.startswith("_")})
  record.setdefault("commands", {}).update({p: " ".join(["python3 -m benchmarks.halting_analysis", *argv])
                                            for p in parts})
  record["date"] = datetime.date.today().isoformat()
  stored[cfg.dataset] = record
  path.parent.mkdir(exist_ok=True)
  path.write_text(json.dumps(stored, indent=2) + "\n")
  print(json.dumps(record, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
