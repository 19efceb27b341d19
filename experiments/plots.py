"""Figures and a Markdown summary of the runs in a work directory.

Reads the run directories written by `acm_jax.train.phases` (`config.json`,
`eval.json`, `distill/distill_errors.json`, `gates/label_distribution.json`),
the baselines' `<workdir>/curves.json` and the GPU timings in
`benchmarks/results/{kernel,vit}_<gpu>.json`, and, for the maps and the shift
diagnostics, runs the finished models on (corrupted) test images. Each figure
is drawn on its own: a missing input skips that figure with a printed reason
and the others are still written.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402

from acm_jax import acm as acm_lib  # noqa: E402

DPI = 100
CORRUPTIONS = ("noise", "blur", "contrast")
# a layer whose most frequent k takes this share of its tokens counts as collapsed
COLLAPSE_SHARE = 0.95
OVERLAY_ALPHA = 0.6  # weight of the compute colour over the image in the maps
# the fields that make two runs the same model (the curve compares one model's variants)
MODEL_FIELDS = ("model", "dataset", "image_size", "num_classes", "num_learners", "acm_attention", "acm_blocks")


class Skip(Exception):
  """A figure cannot be drawn; the message says why."""


@dataclasses.dataclass
class Run:
  name: str  # the run directory's name: pretrain, finetune_b0.50, static_k2, ...
  path: Path
  config: dict
  eval: dict | None

  @property
  def kind(self) -> str:
    return self.name.split("_")[0]


@dataclasses.dataclass
class Report:
  """Collects what was written and what was skipped; prints each skip at once."""
  out: Path
  written: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (file, caption)
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (figure, reason)
  notes: list[str] = dataclasses.field(default_factory=list)
  sections: list[str] = dataclasses.field(default_factory=list)

  def skip(self, figure: str, reason: str) -> None:
    print(f"skipped {figure}: {reason}")
    self.skipped.append((figure, reason))

  def note(self, message: str) -> None:
    print(message)
    self.notes.append(message)

  def save(self, fig, name: str, caption: str) -> None:
    self.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(self.out / name, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    self.written.append((name, caption))

  def draw(self, name: str, fn: Callable[[], None]) -> None:
    try:
      fn()
    except Skip as e:
      plt.close("all")
      self.skip(name, str(e))


# --- reading runs --------------------------------------------------------------------


def _read_json(path: Path, what: str) -> Any:
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise Skip(f"no {what} at {path}") from None
  except json.JSONDecodeError as e:
    raise Skip(f"{what} at {path} is not valid JSON ({e})") from None


RUN_NAME = re.compile(r"^(pretrain|distill|gates|finetune_b\d+(\.\d+)?|static_k\d+)$")


def find_runs(workdir: Path, report: Report) -> list[Run]:
  """Every run directory (one holding config.json) directly under `workdir`."""
  runs = []
  for path in sorted(p for p in workdir.iterdir() if (p / "config.json").is_file()):
    if not RUN_NAME.match(path.name):
      report.note(f"{path} is not a run directory of experiments.vit_imagenet (pretrain, distill, gates, "
                  "finetune_b<budget>, static_k<k>): left out")
      continue
    try:
      config = _read_json(path / "config.json", "run config")
      record = _read_json(path / "eval.json", "evaluation") if (path / "eval.json").is_file() else None
    except Skip as e:
      report.note(f"run {path.name} left out: {e}")
      continue
    runs.append(Run(path.name, path, config, record))
  return runs


def model_key(run: Run) -> tuple:
  return tuple(run.config.get(f) for f in MODEL_FIELDS)


def describe_key(key: tuple) -> str:
  return ", ".join(f"{f}={v}" for f, v in zip(MODEL_FIELDS, key))


def one_model(runs: list[Run], report: Report) -> list[Run]:
  """Keeps the runs of one model: the one the gates (else most runs) belong to."""
  groups: dict[tuple, list[Run]] = {}
  for run in runs:
    groups.setdefault(model_key(run), []).append(run)
  if len(groups) <= 1:
    return runs
  gates = [r for r in runs if r.name == "gates"]
  keep = model_key(gates[0]) if gates else max(groups, key=lambda k: len(groups[k]))
  dropped = {k: v for k, v in groups.items() if k != keep}
  report.note("runs of different models are mixed in this work directory; the figures use only the runs of "
              f"[{describe_key(keep)}] ({', '.join(r.name for r in groups[keep])}) and leave out "
              + "; ".join(f"{', '.join(r.name for r in v)} ([{describe_key(k)}])" for k, v in dropped.items()))
  return groups[keep]


def budget_of(run: Run) -> float:
  return float(run.name[len("finetune_b"):])


def acm_runs(runs: list[Run], evaluated: bool = True) -> list[Run]:
  found = [r for r in runs if r.kind == "finetune" and (r.eval is not None or not evaluated)]
  return sorted(found, key=budget_of)


def by_name(runs: list[Run], name: str) -> Run | None:
  return next((r for r in runs if r.name == name), None)


# --- accuracy vs compute --------------------------------------------------------------


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
  """Indices of the points no other point beats: none has fewer or equal GFLOPs and a
  higher top-1 (or equal top-1 and fewer GFLOPs). Sorted by GFLOPs."""
  order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
  front, best = [], -math.inf
  for i in order:
    if points[i][1] > best:
      front.append(i)
      best = points[i][1]
  return front


# experiments/compare.py's method names -> the figure's
METHOD_NAMES = {"acm": "ACM (ours)", "static": "static width", "dense": "dense",
                "acm_any_budget": "ACM, one model for any budget", "moefication": "MoEfication",
                "early_exit": "early exit (ZTW)", "token_halting": "token halting (A-ViT)",
                "acm_halting": "ACM + token halting"}


def accuracy_points(runs: list[Run], curves: list[dict]) -> list[dict]:
  """Every (method, label, gflops, top1) the accuracy-compute figure draws."""
  points = []
  for run in runs:
    if run.eval is None or "top1" not in run.eval:
      continue
    if run.kind == "pretrain":
      method, label = "dense", "dense"
    elif run.kind == "finetune":
      method, label = "ACM (ours)", f"β={budget_of(run):.2f}"
    elif run.kind == "static":
      method, label = "static width", run.name.split("_")[1]
    else:
      continue
    points.append({"method": method, "label": label, "gflops": run.eval["gflops_per_image"],
                   "top1": run.eval["top1"]})
  from_runs = {p["method"] for p in points}
  for c in curves:
    method = METHOD_NAMES.get(str(c["method"]), str(c["method"]))
    if method in from_runs:  # experiments/compare.py evaluates the same run directories
      continue
    points.append({"method": method, "label": str(c.get("setting", c.get("budget_or_threshold", ""))),
                   "gflops": float(c["gflops_per_image"]), "top1": float(c["top1"])})
  return points


def read_curves(workdir: Path, report: Report) -> list[dict]:
  path = workdir / "curves.json"
  if not path.is_file():
    report.note(f"no baselines curve file at {path} (experiments/compare.py writes it): the accuracy-vs-GFLOPs "
                "figure shows only this work directory's runs")
    return []
  try:
    curves = _read_json(path, "baselines curve file")
    if not isinstance(curves, list) or any(not {"method", "gflops_per_image", "top1"} <= set(c) for c in curves):
      raise Skip(f"{path} is not a list of {{method, setting, gflops_per_image, top1, budget_or_threshold}}")
  except Skip as e:
    report.note(f"baselines left out of the accuracy-vs-GFLOPs figure: {e}")
    return []
  return curves


_STYLE = {"dense": dict(marker="*", ms=14, color="black", ls="none"),
          "ACM (ours)": dict(marker="o", ms=7, color="tab:red", ls="-", lw=2),
          "static width": dict(marker="s", ms=7, color="tab:blue", ls="none")}


def plot_accuracy(report: Report, runs: list[Run], curves: list[dict]) -> None:
  points = accuracy_points(runs, curves)
  if not points:
    raise Skip("no evaluated run (no eval.json in pretrain/, finetune_b*/ or static_k*/): run "
               "`python -m experiments.vit_imagenet --phase=sweep` (or --phase=eval) first")
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  methods = list(dict.fromkeys(p["method"] for p in points))
  for m in methods:
    mine = sorted((p for p in points if p["method"] == m), key=lambda p: p["gflops"])
    style = _STYLE.get(m, dict(marker="^", ms=6, ls="--"))
    ax.plot([p["gflops"] for p in mine], [100 * p["top1"] for p in mine], label=m, **style)
    if m in ("ACM (ours)", "static width"):
      for i, p in enumerate(mine):
        ax.annotate(p["label"], (p["gflops"], 100 * p["top1"]), textcoords="offset points",
                    xytext=(6, -12 if i % 2 == 0 else 5), fontsize=8)
  front = [points[i] for i in pareto_front([(p["gflops"], p["top1"]) for p in points])]
  ax.plot([p["gflops"] for p in front], [100 * p["top1"] for p in front], ls=":", color="grey", lw=1.5,
          drawstyle="steps-post", zorder=0)
  ax.plot([p["gflops"] for p in front], [100 * p["top1"] for p in front], ls="none", marker="o", ms=14,
          mfc="none", mec="grey", label="Pareto front")
  ax.set_xlabel("GFLOPs per image")
  ax.set_ylabel("top-1 accuracy (%)")
  ax.set_title("Accuracy vs compute")
  ax.grid(alpha=0.3)
  ax.margins(x=0.08, y=0.12)
  ax.legend(fontsize=8, loc="best")
  report.save(fig, "accuracy_vs_gflops.png", "Top-1 accuracy vs GFLOPs per image: dense model, ACMs finetuned "
              "at several budgets β, the static-width baseline and any baselines from curves.json; ringed "
              "points form the Pareto front.")


def plot_any_budget(report: Report, curves_by_name: dict[str, list[dict]], title: str) -> None:
  """The any-budget curves of several recipes (each a list of compare records, e.g. the "curves"
  of the records in benchmarks/results/baselines_embedded.json): per recipe, its one model's
  points ("acm_any_budget") joined in order of target budget, so a fall in accuracy as compute
  rises shows as a dip, and its separately finetuned references ("acm") as open squares."""
  drawn = {name: curves for name, curves in curves_by_name.items()
           if any(c["method"] == "acm_any_budget" for c in curves)}
  if not drawn:
    raise Skip("no any-budget curve (method acm_any_budget) in the records given")
  fig, ax = plt.subplots(figsize=(7.2, 4.8))
  colours = plt.get_cmap("tab10")
  for i, (name, curves) in enumerate(drawn.items()):
    colour = colours(i % 10)
    any_budget = sorted((c for c in curves if c["method"] == "acm_any_budget"), key=lambda c: c["budget_or_threshold"])
    ax.plot([c["gflops_per_image"] for c in any_budget], [100 * c["top1"] for c in any_budget], marker="o", ms=5,
            color=colour, lw=1.5, label=name)
    references = sorted((c for c in curves if c["method"] == "acm"), key=lambda c: c["gflops_per_image"])
    ax.plot([c["gflops_per_image"] for c in references], [100 * c["top1"] for c in references], marker="s", ms=8,
            mfc="none", mec=colour, color=colour, ls=":", lw=1)
  first = next(iter(drawn.values()))
  for c in (c for c in first if c["method"] == "acm_any_budget"):  # the target budgets, on the first recipe
    ax.annotate(f"{c['budget_or_threshold']:g}", (c["gflops_per_image"], 100 * c["top1"]),
                textcoords="offset points", xytext=(4, -11), fontsize=8)
  dense = [c for c in first if c["method"] == "dense"]
  if dense:
    ax.plot([dense[0]["gflops_per_image"]], [100 * dense[0]["top1"]], label="dense", **_STYLE["dense"])
  ax.set_xlabel("GFLOPs per image")
  ax.set_ylabel("top-1 accuracy (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="lower right", title="one model, any budget (open squares: finetuned per budget)",
            title_fontsize=7)
  report.save(fig, "any_budget_vs_gflops.png", "Top-1 vs GFLOPs of one model served at budgets 0.125 to 0.875 "
              "(points joined in order of budget), per recipe, beside that recipe's models finetuned at one "
              "budget each (open squares).")


# --- latency ------------------------------------------------------------------------------


# what identifies one measurement; the benchmarks append, so a key may recur over runs
_BENCH_KEYS = {"kernel": ("device", "d", "tokens", "r", "impl"), "vit": ("device", "model", "r", "impl", "attention")}


def _load_benchmarks(bench_dir: Path, prefix: str) -> list[dict]:
  """Rows of every {prefix}_*.json, the newest per measurement key (later files and rows win
  among equal dates). Rows without "impl" (kernel_profile's per-piece rows) are not
  implementations and are left out; ViT rows from before the attention option ran XLA's."""
  rows = []
  for path in sorted(bench_dir.glob(f"{prefix}_*.json")):
    data = _read_json(path, "benchmark file")
    rows += [row for row in (data if isinstance(data, list) else [data]) if "impl" in row or "part" not in row]
  if prefix == "vit":
    rows = [{"attention": "xla", **row} for row in rows]
  newest: dict[tuple, dict] = {}
  for row in rows:
    key = tuple(row.get(field) for field in _BENCH_KEYS.get(prefix, ()))
    if key not in newest or str(row.get("date", "")) >= str(newest[key].get("date", "")):
      newest[key] = row
  rows = list(newest.values())
  if prefix == "vit" and len({row["attention"] for row in rows}) > 1:
    # one attention setting per panel: the default ("auto") where measured
    chosen = "auto" if any(row["attention"] == "auto" for row in rows) else rows[-1]["attention"]
    rows = [row for row in rows if row["attention"] == chosen]
  return rows


def _fraction(rows: list[dict]) -> np.ndarray:
  """The mean executed learners over N (measured when the file has it; files may give r as mean k)."""
  r = np.array([float(row.get("r_measured", row["r"])) for row in rows])
  if r.max(initial=0) > 1.0:
    r = r / np.array([float(row.get("num_learners", 4)) for row in rows])
  return r


# rows of the kernel benchmark that are references or parts, not implementations to compare
_KERNEL_REFERENCES = ("dense_xla", "ideal", "gate", "overhead", "overhead_argsort", "overhead_unfused")


def _series(rows: list[dict], key: Callable[[dict], str]) -> dict[str, list[int]]:
  out: dict[str, list[int]] = {}
  for i, row in enumerate(rows):
    out.setdefault(key(row), []).append(i)
  return out


def _kernel_panel(ax, rows: list[dict], grid: np.ndarray) -> None:
  """One layer shape (the widest, at the most tokens): every implementation's time over the dense block's."""
  setting = max({(row.get("d", 0), row.get("tokens", 0)) for row in rows})
  rows = [row for row in rows if (row.get("d", 0), row.get("tokens", 0)) == setting]
  devices = {row["device"] for row in rows}
  r_all = _fraction(rows)
  shown = [row for row in rows if row["impl"] not in _KERNEL_REFERENCES]
  for label, idx in _series(rows, lambda row: row["impl"] + (f" ({row['device']})" if len(devices) > 1 else "")).items():
    if rows[idx[0]]["impl"] in _KERNEL_REFERENCES:
      continue
    order = sorted(idx, key=lambda i: r_all[i])
    ax.plot(r_all[order], [rows[i]["ratio_to_dense"] for i in order], marker="o", ms=4, label=label)
  if not shown:
    raise Skip("the kernel benchmark holds only reference rows (dense_xla, ideal, overhead)")
  ax.axhline(1.0, ls=":", color="grey", label="dense block")
  ax.plot(grid, grid, ls="--", color="black", label="ideal (time ∝ k/N)")
  ax.set_ylabel("time relative to the dense block")
  shape = f"d={setting[0]}, {setting[1]} tokens, " if setting != (0, 0) else ""
  ax.set_title(f"ACM layer latency ({shape}{', '.join(sorted(devices))})", fontsize=10)


def _vit_panel(ax, rows: list[dict], grid: np.ndarray, acm_share: float | None) -> None:
  r_all = _fraction(rows)
  devices = {row["device"] for row in rows}
  for label, idx in _series(rows, lambda row: row["impl"] + (f" ({row['device']})" if len(devices) > 1 else "")).items():
    order = sorted(idx, key=lambda i: r_all[i])
    style = dict(marker="*", ms=12, color="black", ls="none") if rows[idx[0]]["impl"] == "dense" else dict(
        marker="o", ms=4)
    ax.plot(r_all[order], [rows[i]["images_per_s"] for i in order], label=label, **style)
  full = [i for i in range(len(rows)) if abs(r_all[i] - 1.0) < 1e-6]
  if full and acm_share is not None:
    base = rows[full[0]]["images_per_s"]
    ax.plot(grid[1:], base / (1 - acm_share + acm_share * grid[1:]), ls="--", color="black",
            label=f"ideal (∝ FLOPs; MLPs {100 * acm_share:.0f}% of the dense model)")
  ax.set_ylabel("images / s")
  model = str(rows[0].get("model", "ViT")).removesuffix("_acm")
  ax.set_title(f"{model} throughput ({', '.join(sorted(devices))})", fontsize=10)


def plot_latency(report: Report, bench_dir: Path, acm_share: float | None) -> None:
  if not bench_dir.is_dir():
    raise Skip(f"no benchmark directory {bench_dir} (the GPU benchmarks write kernel_<gpu>.json and "
               "vit_<gpu>.json there)")
  kernel, vit = _load_benchmarks(bench_dir, "kernel"), _load_benchmarks(bench_dir, "vit")
  if not kernel and not vit:
    raise Skip(f"no kernel_<gpu>.json or vit_<gpu>.json in {bench_dir}: run the GPU benchmarks first")
  for name, rows, needed in (("kernel", kernel, {"r", "impl", "ratio_to_dense", "device"}),
                             ("vit", vit, {"r", "impl", "images_per_s", "device"})):
    bad = [row for row in rows if not needed <= set(row)]
    if bad:
      raise Skip(f"{name}_<gpu>.json rows lack {sorted(needed - set(bad[0]))} (got keys {sorted(bad[0])})")
  panels = [p for p in (("kernel", kernel), ("vit", vit)) if p[1]]
  fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 4.2), squeeze=False, layout="constrained")
  grid = np.linspace(0.0, 1.0, 21)
  for ax, (name, rows) in zip(axes[0], panels):
    if name == "kernel":
      _kernel_panel(ax, rows, grid)
    else:
      _vit_panel(ax, rows, grid, acm_share)
    ax.set_xlabel("mean executed learners k / N")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  report.save(fig, "latency_vs_k.png", "Latency of an ACM layer (relative to the dense block it replaces) and "
              "throughput of the whole ViT vs the mean number of executed learners k/N, with the ideal line.")


# --- phase 1 and 2 ----------------------------------------------------------------------------


def _layer_colours(n: int):
  return plt.get_cmap("viridis")(np.linspace(0, 0.9, max(n, 1)))


def plot_imagenet_c(report: Report, workdir: Path) -> None:
  path = workdir / "imagenet_c.json"
  if not path.is_file():
    raise Skip("no imagenet_c.json: run --phase=eval --corruptions=all (acm_jax/train/robustness.py)")
  result = _read_json(path, "ImageNet-C evaluation")
  names, severities = result["corruptions"], [str(s) for s in result["severities"]]
  fig, (left, right) = plt.subplots(1, 2, figsize=(11.5, 4.0), gridspec_kw={"width_ratios": [2.2, 1]})
  width = 0.8 / len(result["top1"])
  for i, (model, per) in enumerate(result["top1"].items()):
    mce = result.get("ce", {}).get(model, {}).get("mCE")
    label = model if mce is None else f"{model} (mCE {100 * mce:.1f})"
    means = [100 * np.mean([per[c][s] for s in severities]) for c in names]
    left.bar(np.arange(len(names)) + i * width, means, width, label=label)
    right.plot([int(s) for s in severities], [100 * np.mean([per[c][s] for c in names]) for s in severities],
               marker="o", label=model)
  left.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=45, ha="right", fontsize=7)
  left.set_ylabel("top-1 (%), mean over severities")
  left.legend(fontsize=7)
  right.set_xlabel("severity")
  right.set_ylabel("top-1 (%), mean over corruptions")
  for ax in (left, right):
    ax.grid(alpha=0.3, axis="y")
  fig.suptitle("Corruption robustness (ImageNet-C corruptions)")
  report.save(fig, "imagenet_c.png", "Top-1 under each corruption (mean over severities; mCE against the dense "
              "model in the legend) and under each severity (mean over corruptions).")


def plot_distillation(report: Report, workdir: Path) -> None:
  errors = _read_json(workdir / "distill" / "distill_errors.json", "distillation errors (written by the distill phase)")
  fig, ax = plt.subplots(figsize=(5.6, 4.0))
  for colour, (path, mse) in zip(_layer_colours(len(errors)), errors.items()):
    ax.plot(range(len(mse)), mse, marker="o", color=colour, label=path)
  ax.set_yscale("log")
  ax.set_xlabel("executed learners k")
  ax.set_ylabel("MSE to the dense block (held-out tokens)")
  ax.set_xticks(range(len(next(iter(errors.values())))))
  ax.set_title("Phase 1: distillation error vs k")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7, ncol=2 if len(errors) > 6 else 1)
  report.save(fig, "distillation_error.png", "Distillation MSE of every ACM for each number of learners k "
              "(held-out tokens after phase 1); it should fall with k.")


def _stacked_shares(ax, shares: dict[str, list[float]], title: str, mark_collapse: bool = True) -> None:
  """Horizontal stacked bars: one per layer, one segment per k."""
  paths = list(shares)
  values = np.array([shares[p] for p in paths])
  colours = plt.get_cmap("plasma")(np.linspace(0.05, 0.9, values.shape[1]))
  left = np.zeros(len(paths))
  for k in range(values.shape[1]):
    ax.barh(range(len(paths)), values[:, k], left=left, color=colours[k], label=f"k={k}")
    left += values[:, k]
  for i, row in enumerate(values):
    if mark_collapse and row.max() >= COLLAPSE_SHARE:
      ax.text(1.01, i, "collapsed", va="center", fontsize=7, color="tab:red")
  ax.set_yticks(range(len(paths)))
  ax.set_yticklabels(paths, fontsize=7)
  ax.set_ylim(len(paths) - 0.5, -0.5)  # first layer on top; idempotent on axes that share y
  ax.set_xlim(0, 1)
  ax.set_xlabel("share of tokens")
  ax.set_title(title, fontsize=9)


def _k_legend(fig, ax) -> None:
  handles, labels = ax.get_legend_handles_labels()
  fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8, title="executed learners",
             title_fontsize=8)


def plot_gate_labels(report: Report, workdir: Path) -> None:
  labels = _read_json(workdir / "gates" / "label_distribution.json", "gate-label distribution (written by the "
                      "gates phase)")
  fig, ax = plt.subplots(figsize=(6.0, 1.9 + 0.28 * len(labels)), layout="constrained")
  _stacked_shares(ax, labels, "Phase 2: artificial gate labels per layer", mark_collapse=False)
  _k_legend(fig, ax)
  report.save(fig, "gate_labels.png", "Share of tokens per artificial gate label k in every ACM (phase 2, "
              "held-out tokens).")


def plot_collapse(report: Report, runs: list[Run]) -> None:
  evaluated = acm_runs(runs)
  if not evaluated:
    raise Skip("no evaluated ACM run (finetune_b*/eval.json)")
  n = len(evaluated)
  layers = len(evaluated[0].eval["k_share_per_layer"])
  fig, axes = plt.subplots(1, n, figsize=(3.4 * n + 1.4, 2.2 + 0.28 * layers), squeeze=False, sharey=True,
                           layout="constrained")
  for ax, run in zip(axes[0], evaluated):
    _stacked_shares(ax, run.eval["k_share_per_layer"],
                    f"β={budget_of(run):.2f}: compute {run.eval['compute_fraction']:.2f}, "
                    f"top-1 {100 * run.eval['top1']:.1f}%")
  _k_legend(fig, axes[0][0])
  fig.suptitle("Collapse check: share of tokens per k in every ACM (test set)")
  report.save(fig, "collapse.png", f"Share of tokens per k in every ACM of each finetuned model; a layer where "
              f"one k takes ≥ {COLLAPSE_SHARE:.0%} of the tokens is marked collapsed.")
  collapsed = [f"{run.name}: {path}" for run in evaluated for path, s in run.eval["k_share_per_layer"].items()
               if max(s) >= COLLAPSE_SHARE]
  report.sections.append("## Gate collapse\n\n" + (
      f"Layers where one k takes ≥ {COLLAPSE_SHARE:.0%} of the tokens: " + "; ".join(collapsed) if collapsed
      else f"No layer of any finetuned model sends ≥ {COLLAPSE_SHARE:.0%} of its tokens to one k."))


def plot_k_histograms(report: Report, runs: list[Run]) -> None:
  evaluated = acm_runs(runs)
  if not evaluated:
    raise Skip("no evaluated ACM run (finetune_b*/eval.json)")
  paths = list(evaluated[0].eval["k_share_per_layer"])
  cols = min(4, len(paths))
  rows = -(-len(paths) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.1 * rows + 0.5), squeeze=False, sharey=True)
  width = 0.8 / len(evaluated)
  colours = plt.get_cmap("coolwarm")(np.linspace(0.0, 1.0, len(evaluated)))
  for ax, path in zip(axes.flat, paths):
    for j, (run, colour) in enumerate(zip(evaluated, colours)):
      share = run.eval["k_share_per_layer"][path]
      ax.bar(np.arange(len(share)) + (j - (len(evaluated) - 1) / 2) * width, share, width, color=colour,
             label=f"β={budget_of(run):.2f}")
    ax.set_title(path, fontsize=8)
    ax.set_xticks(range(len(share)))
    ax.set_xlabel("k", fontsize=8)
  for ax in axes[:, 0]:
    ax.set_ylabel("share of tokens", fontsize=8)
  for ax in axes.flat[len(paths):]:
    ax.set_visible(False)
  axes.flat[0].legend(fontsize=7)
  fig.suptitle("Histogram of k per ACM layer (test set)")
  fig.tight_layout()
  report.save(fig, "k_histograms.png", "Histogram of the chosen k in every ACM layer, one bar colour per budget β.")


# --- models on images ------------------------------------------------------------------------


@dataclasses.dataclass
class Models:
  """A built experiment and jitted predictions shared by every run of one model."""
  exp: Any
  predict: Callable  # (params, images, mode, fixed_k) -> (logits, k per ACM (acms, batch, tokens) or None)
  batch_size: int
  _shapes: dict = dataclasses.field(default_factory=dict)

  def shapes(self, model: str):
    """The parameter tree's shapes and dtypes, without running (or compiling) an init."""
    from acm_jax.train import phases

    if model not in self._shapes:
      self._shapes[model] = phases.abstract_params(self.exp, model)
    return self._shapes[model]

  def load(self, run: Run):
    from acm_jax.train import loop
    try:
      return loop.load_params(run.path, self.shapes("acm"), f"{run.name} run")
    except (ValueError, FileNotFoundError) as e:
      raise Skip(f"cannot load {run.path / 'params'}: {e}") from None

  def load_dense(self):
    from acm_jax.train import loop, phases
    pretrain = self.exp.run_dir("pretrain")
    try:
      if loop.params_dir(pretrain).exists() or self.exp.config.init is None:
        return loop.load_params(pretrain, self.shapes("dense"), "pretrain phase (or --init)")
      return phases.dense_params(self.exp)
    except (ValueError, FileNotFoundError) as e:
      raise Skip(f"cannot load the dense model: {e}") from None

  def run(self, params, images: np.ndarray, mode: str, fixed_k: int | None = None):
    """Predictions in fixed-size batches (one compilation): logits (n, classes), k (acms, n, tokens)."""
    logits, ks = [], []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      pad = self.batch_size - len(chunk)
      padded = np.concatenate([chunk, np.repeat(chunk[:1], pad, 0)]) if pad else chunk
      out, k = self.predict(params, padded, mode, fixed_k)
      logits.append(np.asarray(out)[:len(chunk)])
      if k is not None:
        ks.append(np.asarray(k)[:, :len(chunk)])
    return np.concatenate(logits), (np.concatenate(ks, 1) if ks else None)


def _forward(task, mode: str, fixed_k: int | None, params, images):
  import jax.numpy as jnp

  from acm_jax.train import steps

  inputs = task.inputs({"image": images})
  if mode == "dense":
    return task.dense_model.apply({"params": params}, inputs), None
  logits, aux = task.acm_model.apply({"params": params}, inputs, mode=mode, fixed_k=fixed_k, mutable=["acm"])
  return logits, jnp.stack([jnp.argmax(c, -1) for c in steps.acm_choices(task, aux)])


def build_models(workdir: Path, reference: Run, batch_size: int) -> Models:
  """Rebuilds the experiment of `reference` (its config.json) for inference."""
  import jax

  from acm_jax.train import config as config_lib
  from acm_jax.vit import task as vit_task

  cfg = config_lib.load(reference.path / "config.json")
  # the dense model comes from pretrain/ or from the --init checkpoint, when that is still there
  cfg = dataclasses.replace(cfg, workdir=str(workdir), init=cfg.init if cfg.init and Path(cfg.init).exists() else None)
  try:
    exp = vit_task.build(cfg)
  except (ValueError, FileNotFoundError, ImportError) as e:
    raise Skip(f"cannot rebuild the model of {reference.name} from its config.json: {e}") from None
  compiled: dict = {}

  def predict(params, images, mode, fixed_k):
    if (mode, fixed_k) not in compiled:
      compiled[(mode, fixed_k)] = jax.jit(functools.partial(_forward, exp.task, mode, fixed_k))
    return compiled[(mode, fixed_k)](params, images)

  return Models(exp, predict, batch_size)


def test_images(models: Models, count: int) -> dict[str, np.ndarray]:
  cfg = models.exp.config
  try:
    batches = models.exp.iterator(cfg.dataset, "test", max(count, 1), image_size=cfg.image_size, seed=cfg.seed,
                                  data_dir=cfg.data_dir, with_masks=models.exp.group_masks)
    batch = next(iter(batches))
  except (ValueError, FileNotFoundError, ImportError, StopIteration) as e:
    raise Skip(f"cannot read the test split of {cfg.dataset!r}: {e or 'it is empty'}") from None
  return {k: np.asarray(v[:count]) for k, v in batch.items()}


def _show(images: np.ndarray) -> np.ndarray:
  """Model inputs -> [0, 1] RGB for display ([-1, 1] inputs map exactly; others are stretched)."""
  if images.min() >= -1.0 - 1e-3 and images.max() <= 1.0 + 1e-3:
    return (images + 1.0) / 2.0
  low, high = images.min(axis=(1, 2, 3), keepdims=True), images.max(axis=(1, 2, 3), keepdims=True)
  return (images - low) / np.maximum(high - low, 1e-6)


def k_maps(k: np.ndarray) -> np.ndarray:
  """k per ACM (acms, batch, 1 + g*g) -> per-patch sum over ACMs (batch, g, g); drops the class token."""
  total = k.sum(0)[:, 1:]
  side = math.isqrt(total.shape[1])
  if side * side != total.shape[1]:
    raise Skip(f"the {total.shape[1]} patch tokens do not form a square grid")
  return total.reshape(len(total), side, side)


def plot_token_maps(report: Report, models: Models, runs: list[Run], images: dict[str, np.ndarray]) -> None:
  acms = acm_runs(runs, evaluated=False)
  acms = [r for r in acms if (r.path / "params").is_dir()]
  if not acms:
    raise Skip("no finished ACM run (finetune_b*/params)")
  pictures = _show(images["image"])
  specs = models.exp.task.acm_specs
  max_total = sum(s.num_learners for s in specs)
  n = len(pictures)
  fig, axes = plt.subplots(1 + len(acms), n, figsize=(1.25 * n + 1.2, 1.3 * (1 + len(acms)) + 0.4), squeeze=False)
  for j in range(n):
    axes[0, j].imshow(pictures[j], interpolation="nearest")
  axes[0, 0].set_ylabel("image", fontsize=8)
  colours = plt.get_cmap("inferno")
  for i, run in enumerate(acms, start=1):
    _, k = models.run(models.load(run), images["image"], "argmax")
    maps = k_maps(k)
    scale = pictures.shape[1] // maps.shape[1]
    heat = colours(np.kron(maps, np.ones((1, scale, scale))) / max_total)[..., :3]
    # blended here rather than with an alpha layer: flat patches keep the PNG small
    blended = (1.0 - OVERLAY_ALPHA) * pictures + OVERLAY_ALPHA * heat
    fraction = float(np.mean(k.sum(0)[:, 1:])) / max_total
    for j in range(n):
      axes[i, j].imshow(blended[j], interpolation="nearest")
    axes[i, 0].set_ylabel(f"β={budget_of(run):.2f}\nk/N={fraction:.2f}", fontsize=8)
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  shown = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, max_total), colours)
  bar = fig.colorbar(shown, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01)
  bar.set_label(f"Σ k over the {len(specs)} ACM layers", fontsize=8)
  fig.suptitle("Where the compute goes: executed learners per patch", fontsize=10)
  report.save(fig, "token_compute_maps.png", "Test images (top row) and, for each budget β, every patch coloured "
              f"by the sum of its k over all ACM layers (0 to {max_total}); k/N is the images' mean compute.")


def _compute_fraction(k: np.ndarray, specs) -> float:
  """Mean executed learner cost over the full cost, from k per ACM (acms, batch, tokens)."""
  mean_k = k.reshape(len(specs), -1).mean(1)
  return float(acm_lib.compute_fraction(mean_k, [s.learner_cost for s in specs], [s.num_learners for s in specs]))


def _k_shares(k: np.ndarray, specs) -> dict[str, list[float]]:
  return {s.path: (np.bincount(k[i].reshape(-1), minlength=s.num_learners + 1) / k[i].size).tolist()
          for i, s in enumerate(specs)}


def shift_results(models: Models, runs: list[Run], images: dict[str, np.ndarray], report: Report,
                  severity: int = 3) -> list[dict]:
  """Top-1 (and compute and k shares for ACMs) of every finished model on clean and corrupted images."""
  try:
    from acm_jax.data.synthetic import corrupt
  except ImportError as e:
    raise Skip(f"acm_jax.data.synthetic.corrupt is not available ({e})") from None
  conditions = {"clean": images["image"]}
  conditions.update({kind: corrupt(images["image"], kind, severity, seed=0) for kind in CORRUPTIONS})
  labels = images["label"]
  candidates: list[tuple[str, Callable]] = []
  try:
    dense = models.load_dense()
    candidates.append(("dense", lambda x: models.run(dense, x, "dense")))
  except Skip as e:
    report.note(f"dense model left out of shift.png: {e}")
  finished = [r for r in runs if r.kind == "static"] + acm_runs(runs, evaluated=False)
  for run in (r for r in finished if (r.path / "params").is_dir()):
    try:
      params = models.load(run)
    except Skip as e:
      report.note(f"{run.name} left out of shift.png: {e}")
      continue
    if run.kind == "static":
      k = int(run.name[len("static_k"):])
      candidates.append((f"static k={k}", lambda x, p=params, k=k: models.run(p, x, "fixed", k)))
    else:
      candidates.append((f"ACM β={budget_of(run):.2f}", lambda x, p=params: models.run(p, x, "argmax")))
  if not candidates:
    raise Skip("no finished model to run (no params/ in pretrain, static_k* or finetune_b*)")
  specs = models.exp.task.acm_specs
  results = []
  for name, predict in candidates:
    row = {"model": name, "top1": {}, "compute_fraction": {}, "k_share_per_layer": {}}
    for condition, x in conditions.items():
      logits, k = predict(x)
      row["top1"][condition] = float(np.mean(np.argmax(logits, -1) == labels))
      if k is not None and name.startswith("ACM"):
        row["compute_fraction"][condition] = _compute_fraction(k, specs)
        row["k_share_per_layer"][condition] = _k_shares(k, specs)
    results.append(row)
  return results


def plot_shift(report: Report, results: list[dict], examples: int, severity: int = 3) -> None:
  conditions = ["clean", *CORRUPTIONS]
  acm = [r for r in results if r["compute_fraction"]]
  reference = min(acm, key=lambda r: abs(float(r["model"].split("=")[1]) - 0.5)) if acm else None
  layers = len(reference["k_share_per_layer"]["clean"]) if reference else 0
  fig = plt.figure(figsize=(10.0, 3.2 + (1.6 + 0.28 * layers if reference else 0)), layout="constrained")
  rows = fig.subfigures(2 if reference else 1, 1, height_ratios=[3.2, 1.6 + 0.28 * layers] if reference else None)
  ax = (rows[0] if reference else rows).subplots()
  width = 0.8 / len(results)
  colours = plt.get_cmap("tab10")(np.arange(len(results)))
  for j, (row, colour) in enumerate(zip(results, colours)):
    x = np.arange(len(conditions)) + (j - (len(results) - 1) / 2) * width
    ax.bar(x, [100 * row["top1"][c] for c in conditions], width, color=colour, label=row["model"])
  ax.set_xticks(range(len(conditions)))
  ax.set_xticklabels(conditions)
  ax.set_ylabel("top-1 accuracy (%)")
  ax.set_title(f"Accuracy on clean and corrupted test images (severity {severity}, {examples} images)", fontsize=10)
  ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
  ax.grid(alpha=0.3, axis="y")
  if reference:
    share_axes = rows[1].subplots(1, len(conditions), sharey=True)
    for sax, condition in zip(share_axes, conditions):
      _stacked_shares(sax, reference["k_share_per_layer"][condition],
                      f"{condition}: k/N={reference['compute_fraction'][condition]:.2f}")
    rows[1].suptitle(f"Share of tokens per k in every layer of {reference['model']}", fontsize=10)
    _k_legend(rows[1], share_axes[0])
  report.save(fig, "shift.png", "Distribution shift: top-1 of every model on clean and corrupted test images "
              "(Gaussian noise, blur, contrast), and the share of tokens per k in every layer of the ACM "
              "under each corruption (collapse check).")
  lines = ["## Distribution shift", "",
           f"First {examples} test images, corruptions at severity {severity}; top-1 in %, drop from clean in "
           "points, and the compute fraction k/N the ACMs spend.", "",
           "| model | " + " | ".join(conditions) + " |", "|---|" + "---|" * len(conditions)]
  for row in results:
    cells = []
    for c in conditions:
      top1 = 100 * row["top1"][c]
      drop = 100 * (row["top1"][c] - row["top1"]["clean"])
      cell = f"{top1:.2f}" if c == "clean" else f"{top1:.2f} ({drop:+.2f})"
      if c in row["compute_fraction"]:
        cell += f", k/N {row['compute_fraction'][c]:.2f}"
      cells.append(cell)
    lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
  report.sections.append("\n".join(lines))


def mlp_share(model: str) -> float | None:
  """Share of a dense ViT preset's FLOPs in its MLPs (what MLP-only ACMs scale), or None."""
  from acm_jax import flops as flops_lib
  from acm_jax.vit import flops as vit_flops
  from acm_jax.vit import model as vit

  try:
    cfg = vit.get_config(model)
  except ValueError:
    return None
  mlp = cfg.depth * flops_lib.encoder_block_flops(cfg.num_tokens, cfg.dim, cfg.mlp_dim, cfg.num_heads,
                                                  cfg.activation)["mlp"]
  return mlp / vit_flops.vit_flops(cfg)["total"]


# --- the report ---------------------------------------------------------------------------------

FIGURES = ("accuracy_vs_gflops.png", "latency_vs_k.png", "token_compute_maps.png", "k_histograms.png",
           "distillation_error.png", "gate_labels.png", "collapse.png", "shift.png", "imagenet_c.png")


def _fmt(value: float | None, spec: str) -> str:
  return "" if value is None else format(value, spec)


def results_table(runs: list[Run]) -> str:
  """The eval.json numbers of every evaluated run, in the order dense, ACMs, static."""
  order = {"pretrain": 0, "finetune": 1, "static": 2}
  rows = sorted((r for r in runs if r.eval is not None and r.kind in order),
                key=lambda r: (order[r.kind], r.name))
  lines = ["| run | model | top-1 (%) | GFLOPs/image | compute k/N | mean k, object tokens | "
           "mean k, background tokens | test images |", "|---|---|---|---|---|---|---|---|"]
  for run in rows:
    e, groups = run.eval, run.eval.get("mean_k_per_group", {})
    lines.append(f"| {run.name} | {e.get('model', '')} | {_fmt(100 * e['top1'], '.2f')} | "
                 f"{_fmt(e['gflops_per_image'], '.4g')} | {_fmt(e.get('compute_fraction', 1.0), '.3f')} | "
                 f"{_fmt(groups.get('object'), '.2f')} | {_fmt(groups.get('background'), '.2f')} | "
                 f"{e.get('examples', '')} |")
  return "\n".join(lines)


def write_report(workdir: str | Path, out: str | Path | None = None, bench_dir: str | Path = "benchmarks/results",
                 examples: int = 256, map_images: int = 8) -> Report:
  """Draws every figure it can into `out` (default `<workdir>/report`) and writes summary.md."""
  workdir = Path(workdir)
  report = Report(Path(out) if out is not None else workdir / "report")
  runs: list[Run] = []
  if not workdir.is_dir():
    why = f"the work directory {workdir} does not exist"
  else:
    runs = find_runs(workdir, report)
    why = (f"the work directory {workdir} holds no run (no */config.json); run "
           "`python -m experiments.vit_imagenet --phase=sweep` first")
  if runs:
    runs = one_model(runs, report)
  report.draw("latency_vs_k.png", lambda: plot_latency(report, Path(bench_dir), _vit_share(Path(bench_dir))))
  if not runs:
    for name in FIGURES:
      if name != "latency_vs_k.png":
        report.skip(name, why)
    write_summary(report, workdir, runs)
    return report
  report.draw("accuracy_vs_gflops.png", lambda: plot_accuracy(report, runs, read_curves(workdir, report)))
  report.draw("distillation_error.png", lambda: plot_distillation(report, workdir))
  report.draw("gate_labels.png", lambda: plot_gate_labels(report, workdir))
  report.draw("k_histograms.png", lambda: plot_k_histograms(report, runs))
  report.draw("collapse.png", lambda: plot_collapse(report, runs))
  report.draw("imagenet_c.png", lambda: plot_imagenet_c(report, workdir))
  try:
    reference = by_name(runs, "gates") or runs[0]
    models = build_models(workdir, reference, batch_size=min(examples, 128))
    images = test_images(models, examples)
  except Skip as e:
    report.skip("token_compute_maps.png", str(e))
    report.skip("shift.png", str(e))
  else:
    count = min(map_images, len(images["label"]))
    report.draw("token_compute_maps.png", lambda: plot_token_maps(
        report, models, runs, {k: v[:count] for k, v in images.items()}))
    report.draw("shift.png", lambda: plot_shift(report, shift_results(models, runs, images, report),
                                                len(images["label"])))
  write_summary(report, workdir, runs)
  return report


def _vit_share(bench_dir: Path) -> float | None:
  if not bench_dir.is_dir():
    return None
  try:
    models = [row.get("model") for row in _load_benchmarks(bench_dir, "vit")]
  except Skip:
    return None
  return mlp_share(models[0].removesuffix("_acm")) if models and models[0] else None


def write_summary(report: Report, workdir: Path, runs: list[Run]) -> None:
  lines = ["# ACM report", ""]
  if runs:
    cfg = runs[0].config
    lines += [f"Work directory `{workdir}`: model `{cfg.get('model')}` on `{cfg.get('dataset')}`, "
              f"N = {cfg.get('num_learners')} learners, runs {', '.join(r.name for r in runs)}.", ""]
    lines += ["## Accuracy and compute", "", "From each run's eval.json.", "", results_table(runs), ""]
  else:
    lines += [f"Work directory `{workdir}`: no runs.", ""]
  captions = dict(report.written)
  if report.written:
    lines += ["## Figures", ""]
    for name in FIGURES:
      if name in captions:
        lines += [f"![{name}]({name})", "", captions[name], ""]
  for section in report.sections:
    lines += [section, ""]
  if report.notes or report.skipped:
    lines += ["## Notes and skipped figures", ""]
    lines += [f"- {n}" for n in report.notes]
    lines += [f"- `{name}` skipped: {why}" for name, why in report.skipped]
    lines.append("")
  report.out.mkdir(parents=True, exist_ok=True)
  (report.out / "summary.md").write_text("\n".join(lines))
  print(f"wrote {len(report.written)} figures and summary.md to {report.out}"
        + (f"; skipped {len(report.skipped)}" if report.skipped else ""))
