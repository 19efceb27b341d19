"""Experiment configuration: one dataclass per task, flags override fields.

Every field is a flag of the same name (`--budget=0.5`, `--distill_steps=300`)
with a help line that lists its allowed values; a run writes the full config as
JSON next to its checkpoints, and `load` rebuilds it as the class it was.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

from acm_jax import acm, inference, losses, transformer
from acm_jax.data import augment as augment_lib
from acm_jax.train import steps as steps_lib
from acm_jax.sharding import STRATEGIES

GROUP_QKV_GATES = ("auto", "true", "false")
PHASES = ("pretrain", "distill", "gates", "finetune", "static", "eval", "all")
BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def flag(default: Any, help: str, choices: Sequence[str] | None = None,
         parse: Callable[[str], Any] | None = None) -> Any:
  """A config field with its flag's help text and, for strings, the allowed values;
  `parse` replaces the parser derived from the field's type."""
  return dataclasses.field(default=default, metadata={"help": help, "choices": tuple(choices) if choices else None,
                                                      "parse": parse})

# Which saved fields a run directory's state depends on, for `resume_fields`. Free to
# change on resume: where things are (paths may move), how the same arithmetic is laid
# out or run (mesh, sharding, remat, kernel impl), what is logged and how often state is
# saved. Every other field must match: model shape, data and its stream (seed,
# batch_size: another batch size feeds other examples at each step), dtype, the ACM,
# losses and the optimizer, whose schedule spans the phase's step count (so a phase is
# not extended in place: a longer run is another run, in another --workdir).
RESUME_FREE = frozenset({"workdir", "data_dir", "init", "eval_batch_size", "eval_examples", "log_every",
                         "checkpoint_every", "mesh", "sharding", "remat", "scan_unroll", "impl", "group_qkv_gates",
                         "compilation_cache", "coordinator_address",
                         "num_processes", "process_id"})
ACM_FIELDS = frozenset({"num_learners", "learner_width", "width_factor", "acm_blocks", "acm_attention",
                        "gate_depth", "gate_hidden"})
# Fields only some phases read (the ACM ones: every phase but pretrain); the rest matter to every phase.
PHASE_FIELDS = {
    "pretrain": frozenset({"pretrain_steps", "pretrain_lr", "label_smoothing"}),
    "distill": frozenset({"distill_steps", "distill_lr", "grad_mode"}) | ACM_FIELDS,
    "gates": frozenset({"gates_steps", "gates_lr", "gating_error_factor", "label_rule"}) | ACM_FIELDS,
    "finetune": frozenset({"finetune_steps", "finetune_lr", "finetune_gate_lr_scale", "label_smoothing", "budget",
                           "budget_loss", "budget_weight", "budget_weight_power", "entropy_weight", "diversity_weight",
                           "gate_temperature", "budget_conditioning", "budget_min", "budget_max", "budget_draw",
                           "budget_groups"}) | ACM_FIELDS,
    "static": frozenset({"finetune_steps", "finetune_lr", "label_smoothing", "static_k"}) | ACM_FIELDS,
}
# How a phase trains, not what its params are: a later phase or an evaluation may read
# finished params that were trained otherwise (`model_fields`).
TRAINING_FIELDS = frozenset({"seed", "dtype", "batch_size", "warmup_fraction", "weight_decay", "clip_norm"}) | frozenset(
    f for phase, fields in PHASE_FIELDS.items() for f in fields - ACM_FIELDS)


@dataclasses.dataclass
class ExperimentConfig:
  # data and model
  dataset: str = flag("synthetic", "synthetic (glyphs), synthetic_shapes, or tfds:<name> (e.g. tfds:imagenet2012)")
  data_dir: str | None = flag(None, "TFDS data dir (or the dataset folder of a speech corpus)")
  model: str = flag("tiny", "model preset, or from_init to take the architecture from --init")
  image_size: int | None = flag(None, "image side in pixels (default: the dataset's)")
  num_classes: int | None = flag(None, "classes of the head (default: the dataset's)")
  init: str | None = flag(None, "a pretrained dense checkpoint; skips pretrain")
  workdir: str = flag("runs/embedded", "directory of the run directories and the eval.json summary")
  seed: int = flag(0, "random seed of data order and initialisation")
  dtype: str = flag("float32", "compute dtype", ("float32", "bfloat16"))
  # train augmentation (acm_jax/data/augment.py, docs/recipe.md)
  augment: str | None = flag(None, "train augmentation preset (default: none for the generated sets, inception "
                             "for tfds: and folder:)", augment_lib.PRESETS)
  mixup: float = flag(0.0, "mixup alpha (>= 0; 0: off)")
  cutmix: float = flag(0.0, "cutmix alpha (>= 0; 0: off; with mixup, each batch picks one of the two)")
  # ACM
  num_learners: int = flag(4, "learners N per ACM (>= 1)")
  learner_width: int | None = flag(None, "hidden units per learner (default: width_factor x MLP width / N)")
  width_factor: float = flag(1.0, "all learners' width over the replaced MLP's, in (0, 1]")
  acm_blocks: str = flag("all", "blocks to ACMize: all, or comma-separated block indices")
  acm_attention: bool = flag(False, "ACMize the q, k, v, o projections too")
  gate_depth: int = flag(1, "gate layers (1: linear)")
  gate_hidden: int = flag(128, "hidden width of a deep gate")
  impl: str = flag("auto", "hard-choice inference path (auto: the Pallas kernel on GPU, XLA elsewhere)",
                   inference.IMPLS)
  # losses
  label_smoothing: float = flag(0.0, "label smoothing of the classification loss, in [0, 1)")
  grad_mode: str = flag("detach", "distillation gradient: detach (each prefix trains its last learner) "
                        "or no_detach (plain cumulative sum)", acm.GRAD_MODES)
  gating_error_factor: float = flag(1.2, "gate labels: smallest k after which a learner gains less than this "
                                    "factor (> 1)")
  label_rule: str = flag("ours", "gate label rule (official: the public code's, see losses.gate_labels)",
                         losses.LABEL_RULES)
  budget: float = flag(0.5, "target compute fraction of the finetuned ACM, in (0, 1]")
  budget_loss: str = flag("l1", "distance of the compute fraction to the budget", losses.BUDGET_KINDS)
  # The official ImageNet recipe uses budget 0.1 / entropy 0.05 over 97 epochs. Over a few hundred steps
  # 0.1 is outvoted by the task and entropy losses: on the shapes set, --budget=0.25 still ran at
  # compute 0.49 after 400 of 600 steps. Budget 1.0 with entropy 0.05 reached 0.26 in 75 steps but
  # collapsed the gates there (normalised per-image entropy of k 0.71 -> 0.08), where no token needs
  # more than one learner. On the glyph set (the default) the task loss separates tokens, and entropy 0.1
  # with gates at 30x the finetune learning rate gave 93.16% against 91.82% for 0.5 / 10x (400 steps at
  # 3e-4, compute 0.48 and 0.44).
  budget_weight: float = flag(1.0, "weight of the budget loss (>= 0)")
  # On the glyph set no k = 0 is labelled in phase 2 (skipping a block errs 6x more than one learner), so at
  # weight 1 the gates never skip and compute stops near 0.3 (k = 1 everywhere is 0.25) whatever the target;
  # a budget-0.125 finetuning at weight 10 does skip (mostly in blocks 2-3) and lands at 0.123.
  budget_weight_power: float = flag(0.0, "the budget loss weight rises as the target budget falls: --budget_weight "
                                    "/ budget ** this (>= 0; 0: constant). Per drawn budget under "
                                    "--budget_conditioning, so references finetuned at a fixed budget with the same "
                                    "flags train with the weight the conditioned model uses there")
  entropy_weight: float = flag(0.1, "weight of the per-image entropy-of-k loss (>= 0)")
  diversity_weight: float = flag(0.05, "weight of the between-images diversity loss (>= 0)")
  gate_temperature: float = flag(1.0, "Gumbel-Softmax temperature in finetuning (> 0)")
  gate_task_gradient: bool = flag(True, "false: the public code's phase 3, where the task loss sends no gradient "
                                  "to the gates (its gated forward uses only the argmax); the budget, entropy "
                                  "and diversity losses alone train them")
  budget_conditioning: bool = flag(False, "finetune one model for every budget: the gates read the target budget "
                                   "(FiLM on the gate input), each finetuning step draws its budget from "
                                   "[--budget_min, --budget_max] (--budget_draw) as its budget-loss target (--budget then only "
                                   "picks the budget a plain evaluation runs at)")
  budget_min: float = flag(0.125, "lowest budget a budget-conditioned finetuning draws, in (0, 1]")
  budget_max: float = flag(0.875, "highest budget a budget-conditioned finetuning draws, in [--budget_min, 1]")
  # Uniform draws give [0.0625, 0.25] less than a quarter of the steps of [0.0625, 0.875]; the glyph set's
  # conditioned model lagged its reference most at 0.125 and 0.25 (RESULTS.md, #25).
  budget_draw: str = flag("uniform", "how a budget-conditioned finetuning draws each step's budget from [--budget_min, "
                          "--budget_max]: uniform, or log_uniform (uniform in log budget: as many steps in [0.0625, "
                          "0.125] as in [0.25, 0.5])")
  # One budget per step trains the shared weights at one point of the range at a time; groups give every
  # step a spread of budgets (the "sandwich" idea of slimmable networks, here within one forward).
  budget_groups: int = flag(1, "under --budget_conditioning: split each finetuning batch into this many equal "
                            "groups, each with its own budget (one draw in each of as many equal slices of the "
                            "range, by --budget_draw), its own budget loss and diversity loss (>= 1; 1: one budget "
                            "per step; --batch_size must be divisible by it)")
  static_k: int | None = flag(None, "k of the static-width baseline, in 0..N")
  # optimisation, per phase
  batch_size: int = flag(128, "training batch size (>= 1, divisible by the batch-sharding devices)")
  eval_batch_size: int = flag(256, "evaluation batch size (>= 1)")
  pretrain_steps: int = flag(1400, "steps of dense pretraining (>= 1)")
  pretrain_lr: float = flag(1e-3, "peak learning rate of pretrain")
  distill_steps: int = flag(400, "steps of module-wise distillation (>= 1)")
  distill_lr: float = flag(1e-3, "peak learning rate of distill")
  gates_steps: int = flag(200, "steps of gate training on artificial labels (>= 1)")
  gates_lr: float = flag(1e-2, "peak learning rate of gates")
  finetune_steps: int = flag(400, "steps of end-to-end finetuning, also of the static baseline (>= 1)")
  # 5e-4 on the embedded default (same gates, budget 0.5): ACM / static k=2 top-1 93.16 / 87.76 at 3e-4,
  # 95.08 / 90.90 at 5e-4, 96.58 / 94.52 at 1e-3 (dense 95.92): the faster the finetuning, the more of
  # the glyph lookup half width relearns.
  finetune_lr: float = flag(5e-4, "peak learning rate of finetune and static")
  finetune_gate_lr_scale: float = flag(30.0, "gates' learning rate in finetune = this x finetune_lr")
  warmup_fraction: float = flag(0.05, "share of each phase's steps in linear warm-up, in [0, 1)")
  weight_decay: float = flag(1e-4, "AdamW weight decay (>= 0)")
  clip_norm: float = flag(1.0, "global gradient-norm clipping (> 0)")
  log_every: int = flag(50, "steps between metric lines (>= 1)")
  checkpoint_every: int = flag(200, "steps between checkpoints (>= 1)")
  eval_examples: int | None = flag(None, "test examples to evaluate (default: the whole test split)")
  # devices (see acm_jax/sharding.py and docs/cluster.md)
  mesh: str | None = flag(None, "device mesh, e.g. data:4,fsdp:2 (default: every device on the strategy's axis)")
  sharding: str = flag("dp", "dp (data parallel), fsdp (parameters sharded) or tp (learners and heads split too)",
                       tuple(STRATEGIES))
  remat: str = flag("none", "what encoder blocks keep for the backward pass: none (recompute nothing), full "
                    "(recompute each block), dots (keep matmul outputs), dots_no_batch (keep weight matmuls only); "
                    "true / false mean full / none", transformer.REMAT_POLICIES,
                    parse=lambda value: remat_parser(value))
  scan_blocks: bool = flag(False, "run the encoder blocks as one scanned block with parameters stacked on a "
                           "leading layer axis (one compile per block, one layer's weights gathered at a time "
                           "under fsdp); needs --acm_blocks=all")
  scan_unroll: int = flag(1, "with --scan_blocks=true: encoder blocks per iteration of the scanned loop (1 to the "
                          "depth; the parameters stay stacked per layer, so checkpoints do not change). On one H200 2 and 3 "
                          "left the training steps as they were and raised peak memory, and took 2-4% off the scanned "
                          "forward (docs/cluster.md)")
  group_qkv_gates: str = flag("auto", "in finetuning, run the q/k/v ACMs' gates as one gate (needs --acm_attention): "
                              "true, false, or auto (with --scan_blocks=true only: on one H200 it made the scanned "
                              "ViT-B/16 finetune step 6% faster and the unrolled one 17% slower)",
                              GROUP_QKV_GATES)
  compilation_cache: str = flag("auto", "directory of JAX's persistent compilation cache, so that a restarted run "
                                "reads its compiled steps instead of compiling them: auto (on a GPU "
                                "~/.cache/acm_jax/jax, none on the CPU), none, or a directory (see acm_jax/compile_cache.py)")
  coordinator_address: str | None = flag(None, "host:port of process 0, multi-process runs only")
  num_processes: int | None = flag(None, "number of processes of a multi-process run")
  process_id: int | None = flag(None, "this process's index in a multi-process run")

  def phase_steps(self, phase: str) -> int:
    return getattr(self, f"{'finetune' if phase == 'static' else phase}_steps")

  def phase_lr(self, phase: str) -> float:
    return getattr(self, f"{'finetune' if phase == 'static' else phase}_lr")

  def validate(self) -> "ExperimentConfig":
    if not 0.0 < self.budget <= 1.0:
      raise ValueError(f"--budget must be in (0, 1], got {self.budget}")
    if not 0.0 < self.budget_min <= self.budget_max <= 1.0:
      raise ValueError(f"--budget_min and --budget_max must satisfy 0 < min <= max <= 1, got "
                       f"{self.budget_min} and {self.budget_max}")
    if self.budget_draw not in steps_lib.BUDGET_DRAWS:
      raise ValueError(f"--budget_draw must be one of {steps_lib.BUDGET_DRAWS}, got {self.budget_draw!r}")
    if self.budget_groups < 1 or self.batch_size % self.budget_groups:
      raise ValueError(f"--budget_groups must be >= 1 and divide --batch_size {self.batch_size}, got "
                       f"{self.budget_groups}")
    if self.group_qkv_gates not in GROUP_QKV_GATES:
      raise ValueError(f"--group_qkv_gates must be one of {GROUP_QKV_GATES}, got {self.group_qkv_gates!r}")
    if self.batch_size < 1 or self.eval_batch_size < 1:
      raise ValueError(f"batch sizes must be positive, got {self.batch_size} / {self.eval_batch_size}")
    for phase in ("pretrain", "distill", "gates", "finetune"):
      if self.phase_steps(phase) < 1:
        raise ValueError(f"--{phase}_steps must be >= 1, got {self.phase_steps(phase)}")
    if self.static_k is not None and not 0 <= self.static_k <= self.num_learners:
      raise ValueError(f"--static_k must be in 0..{self.num_learners}, got {self.static_k}")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")
    if self.gating_error_factor <= 1.0:
      raise ValueError(f"--gating_error_factor must be > 1, got {self.gating_error_factor}")
    augment_lib.check(self.augment, self.mixup, self.cutmix, self.dataset)
    if self.label_rule not in losses.LABEL_RULES:
      raise ValueError(f"--label_rule must be one of {losses.LABEL_RULES}, got {self.label_rule!r}")
    if self.budget_weight_power < 0:
      raise ValueError(f"--budget_weight_power must be >= 0, got {self.budget_weight_power}")
    if self.gate_temperature <= 0:
      raise ValueError(f"--gate_temperature must be > 0, got {self.gate_temperature}")
    if self.sharding not in STRATEGIES:
      raise ValueError(f"--sharding must be {', '.join(list(STRATEGIES)[:-1])} or {list(STRATEGIES)[-1]}, "
                       f"got {self.sharding!r}")
    transformer.remat_policy(self.remat)
    if self.scan_unroll < 1:
      raise ValueError(f"--scan_unroll must be >= 1 (encoder blocks per scanned iteration), got {self.scan_unroll}")
    if self.scan_blocks and self.acm_blocks != "all":
      raise ValueError(f"--scan_blocks=true needs every block alike, but --acm_blocks={self.acm_blocks!r} ACMizes "
                       "some blocks only; use --acm_blocks=all or --scan_blocks=false")
    if self.init is not None and not Path(self.init).exists():
      raise FileNotFoundError(f"--init checkpoint {self.init!r} does not exist")
    return self

  @property
  def budget_range(self) -> tuple[float, float] | None:
    """The range of budgets the finetuned gates are conditioned on, None when they are not."""
    return (self.budget_min, self.budget_max) if self.budget_conditioning else None

  @property
  def resolved_static_k(self) -> int:
    return self.num_learners // 2 if self.static_k is None else self.static_k

  @property
  def resolved_group_qkv_gates(self) -> bool:
    return self.scan_blocks if self.group_qkv_gates == "auto" else self.group_qkv_gates == "true"

  def block_tuple(self) -> tuple[int, ...] | None:
    if self.acm_blocks == "all":
      return None
    try:
      return tuple(int(b) for b in self.acm_blocks.split(","))
    except ValueError:
      raise ValueError(f"--acm_blocks must be 'all' or comma-separated integers, got {self.acm_blocks!r}") from None

  def resume_fields(self, phase: str) -> list[str]:
    """The fields that must equal the saved ones to resume (or reuse) a run of `phase`;
    a run that is not one of the ACM phases (a baseline) checks the shared fields only."""
    specific = frozenset().union(*PHASE_FIELDS.values())
    own = PHASE_FIELDS.get(phase, frozenset())
    return [f.name for f in dataclasses.fields(self)
            if f.name not in RESUME_FREE and (f.name not in specific or f.name in own)]

  def model_fields(self, phase: str) -> list[str]:
    """The fields that must equal the saved ones to read the finished params of `phase`."""
    return [f for f in self.resume_fields(phase) if f not in TRAINING_FIELDS]

  def to_json(self) -> str:
    cls = type(self)
    return json.dumps({**dataclasses.asdict(self), "config_class": f"{cls.__module__}.{cls.__qualname__}"},
                      indent=2, sort_keys=True)

  def non_default(self) -> dict[str, Any]:
    """The fields that differ from the class's defaults."""
    base = type(self)()
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(base, f.name)}

  def resolved_defaults(self) -> dict[str, str]:
    """What a None default resolves to, for --help."""
    return {"static_k": f"{self.resolved_static_k} (num_learners // 2)"}


class ArgumentParser(argparse.ArgumentParser):
  """argparse with one-line errors (no usage block): `error: argument --x: why`."""

  def error(self, message: str) -> typing.NoReturn:
    self.exit(2, f"error: {message}\n")


def bool_parser(value: str) -> bool:
  try:
    return BOOLEANS[value.lower()]
  except KeyError:
    raise argparse.ArgumentTypeError(f"{value!r} is not a boolean; expected one of {', '.join(BOOLEANS)}") from None


def remat_parser(value: str) -> str:
  """--remat: a policy name, or a boolean as the flag used to be (true = full, false = none)."""
  if value.lower() in BOOLEANS:
    return transformer.remat_policy(BOOLEANS[value.lower()])
  if value not in transformer.REMAT_POLICIES:
    raise argparse.ArgumentTypeError(f"{value!r} is not a remat policy; expected one of "
                                     f"{', '.join(transformer.REMAT_POLICIES)} (or true / false)")
  return value


def choice_parser(choices: Sequence[str]):
  def parse(value: str) -> str:
    if value not in choices:
      raise argparse.ArgumentTypeError(f"{value!r} is not allowed; expected one of {', '.join(choices)}")
    return value
  return parse


def _parse_number(kind: type):
  def parse(value: str):
    try:
      return kind(value)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{value!r} is not {'an integer' if kind is int else 'a number'}") from None
  return parse


def _field_kind(config_cls: type, field: dataclasses.Field) -> tuple[type, bool]:
  """(bool, int, float or str; whether None is allowed) from the field's annotation."""
  hint = typing.get_type_hints(config_cls)[field.name]
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  if args:
    if len(args) != 1:
      raise TypeError(f"config field {field.name}: union {hint} has no flag type")
    return args[0], True
  return hint, False


def add_flags(parser: argparse.ArgumentParser, config_cls: type = ExperimentConfig,
              choices: dict[str, Sequence[str]] | None = None) -> None:
  """One flag per field of `config_cls`; `choices` adds allowed values known to the caller
  (e.g. the family's model presets)."""
  defaults = config_cls()
  resolved = defaults.resolved_defaults() if hasattr(defaults, "resolved_defaults") else {}
  for field in dataclasses.fields(config_cls):
    kind, optional = _field_kind(config_cls, field)
    allowed = (choices or {}).get(field.name) or field.metadata.get("choices")
    if field.metadata.get("parse") is not None:
      parse, metavar = field.metadata["parse"], "{" + ",".join(allowed) + "}" if allowed else "TEXT"
    elif kind is bool:
      parse, metavar = bool_parser, "{true,false,yes,no,1,0}"
    elif allowed:
      parse, metavar = choice_parser(tuple(allowed)), "{" + ",".join(allowed) + "}"
    elif kind in (int, float):
      parse, metavar = _parse_number(kind), "INT" if kind is int else "FLOAT"
    else:
      parse, metavar = str, "TEXT"
    help_text = _field_help(config_cls, field.name)
    default = resolved.get(field.name, getattr(defaults, field.name))
    if default is not None or "default" not in help_text:
      help_text = f"{help_text}; default: {default}" if help_text else f"default: {default}"
    parser.add_argument(f"--{field.name}", type=parse, default=None, metavar=metavar,
                        help=help_text.replace("%", "%%"))


def _field_help(config_cls: type, name: str) -> str:
  """The help of the nearest class in the MRO that documents the field (a subclass
  may change only a default)."""
  for cls in config_cls.__mro__:
    field = getattr(cls, "__dataclass_fields__", {}).get(name)
    if field is not None and field.metadata.get("help"):
      return field.metadata["help"]
  return ""


def from_flags(args: argparse.Namespace, base: ExperimentConfig) -> ExperimentConfig:
  overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(base)
               if getattr(args, f.name, None) is not None}
  return dataclasses.replace(base, **overrides)


def load(path: str | Path) -> ExperimentConfig:
  """A saved config.json as the config class that wrote it (`config_class`; files
  from before that key load as ExperimentConfig). Unknown keys are ignored."""
  data = json.loads(Path(path).read_text())
  cls = _config_class(data.pop("config_class", f"{__name__}.ExperimentConfig"), path)
  known = {f.name for f in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in data.items() if k in known})


def _config_class(name: str, source) -> type:
  module_name, _, class_name = name.rpartition(".")
  if not module_name.startswith("acm_jax.") and module_name not in sys.modules:
    raise ValueError(f"{source}: config_class {name!r} is outside acm_jax and not imported; import its module first")
  cls = getattr(importlib.import_module(module_name), class_name, None)
  if not (isinstance(cls, type) and issubclass(cls, ExperimentConfig)):
    raise ValueError(f"{source}: config_class {name!r} is not an ExperimentConfig")
  return cls
