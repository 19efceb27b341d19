"""The image classification task of the ViT family, as a `phases.Experiment`.

`build(config)` validates the config against data and model, then supplies the
phases with the ViT (dense and ACMized), the classification loss and top-1 score,
object/background token groups on the synthetic sets, the data iterator and the
FLOP count per image.
"""

from __future__ import annotations

import base64
import dataclasses
import functools

import einops
import jax
import jax.numpy as jnp
import numpy as np

from acm_jax import acm as acm_lib
from acm_jax import data as data_lib
from acm_jax import losses, registry
from acm_jax import sharding as sharding_lib
from acm_jax.train import steps
from acm_jax.train.config import ExperimentConfig
from acm_jax.train.phases import Experiment
from acm_jax.vit import flops as vit_flops
from acm_jax.vit import formats
from acm_jax.vit import model as vit


def _object_groups(patch_size: int, batch: dict) -> dict[str, jax.Array]:
  if "object_mask" not in batch:
    return {}
  frac = einops.reduce(batch["object_mask"].astype(jnp.float32), "b (h p) (w q) -> b (h w)", "mean",
                       p=patch_size, q=patch_size)
  no_cls = jnp.zeros((frac.shape[0], 1), bool)
  return {"object": jnp.concatenate([no_cls, frac >= 0.25], 1),
          "background": jnp.concatenate([no_cls, frac == 0.0], 1)}


def vision_task(dense_config: vit.ViTConfig, acm_config: vit.ViTConfig, dtype) -> steps.Task:
  specs = steps.acm_specs(acm_config)

  def score(logits, batch):
    valid = batch.get("valid", jnp.ones(logits.shape[0], bool)).astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"examples": jnp.sum(valid), "top1": jnp.sum(correct * valid)}

  def host_outputs(logits, batch):  # each test image's correctness, for paired comparisons of two models
    return jnp.argmax(logits, -1) == batch["label"]

  return steps.Task(
      dense_model=vit.ViT(dense_config), acm_model=vit.ViT(acm_config), acm_specs=tuple(specs),
      inputs=lambda batch: batch["image"].astype(dtype),
      loss=lambda logits, batch, ls: losses.classification_loss(
          logits.astype(jnp.float32), batch["label"], ls, batch.get("mix_label"), batch.get("mix_weight")),
      score=score, token_groups=functools.partial(_object_groups, dense_config.patch_size),
      host_outputs=host_outputs)


def correct_bits(host: list) -> dict:
  """Eval host metrics: which test images the model classified correctly, in test order (padding
  dropped), as {"correct_bits": base64 of the packed bits}; `decode_correct` reads them back."""
  bits = []
  for correct, batch in host:
    correct = np.asarray(correct, bool)
    valid = np.asarray(batch.get("valid", np.ones(len(correct), bool)), bool)
    if valid.shape != correct.shape:  # a process handed only its own rows: no per-image record
      return {}
    bits.append(correct[valid])
  packed = np.packbits(np.concatenate(bits) if bits else np.zeros(0, bool))
  return {"correct_bits": base64.b64encode(packed.tobytes()).decode("ascii")}


def decode_correct(record: dict) -> np.ndarray | None:
  """The per-image correctness of an eval record (bool, `examples` long), None if it has none."""
  if "correct_bits" not in record:
    return None
  packed = np.frombuffer(base64.b64decode(record["correct_bits"]), np.uint8)
  return np.unpackbits(packed)[:record["examples"]].astype(bool)


def build(config: ExperimentConfig) -> Experiment:
  """Validates the config against data and model before any work starts."""
  config.validate()
  sharding_lib.initialize_distributed(config.coordinator_address, config.num_processes, config.process_id)
  info = data_lib.get_dataset_info(config.dataset, image_size=config.image_size, data_dir=config.data_dir)
  overrides = {"image_size": info.image_size, "num_classes": config.num_classes or info.num_classes,
               "remat": config.remat, "scan_blocks": config.scan_blocks,
               "scan_unroll": config.scan_unroll}
  if config.init is not None:  # the checkpoint's architecture ("--model=from_init") or a preset that agrees
    from acm_jax.vit import checkpoints
    dense_config = checkpoints.vit_config_for_init(config.init, config.model, **overrides)
  elif config.model == "from_init":
    raise ValueError("--model=from_init needs --init=PATH")
  else:
    dense_config = vit.get_config(config.model, **overrides)
  acm = acm_lib.ACMConfig(
      num_learners=config.num_learners, learner_width=config.learner_width, width_factor=config.width_factor,
      blocks=config.block_tuple(), attention=config.acm_attention, activation=dense_config.activation,
      gate_depth=config.gate_depth, gate_hidden=config.gate_hidden, impl=config.impl,
      budget_conditioning=config.budget_conditioning, group_qkv_gates=config.resolved_group_qkv_gates)
  acm_config = dataclasses.replace(dense_config, acm=acm).validate()
  dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32

  def count(mean_k, dense):
    return vit_flops.vit_flops(dense_config if dense else acm_config, mean_k)

  return Experiment(config, vision_task(dense_config, acm_config, dtype), info,
                    sample_input=jnp.zeros((1, info.image_size, info.image_size, 3), dtype), flops=count,
                    iterator=data_lib.make_iterator, group_masks=data_lib.is_synthetic(config.dataset),
                    uint8_images=data_lib.is_synthetic(config.dataset) and not (config.mixup or config.cutmix),
                    host_metrics=correct_bits, load_init=_load_dense)


def _load_dense(path: str, expected):
  from acm_jax.vit import checkpoints  # reading PyTorch files needs torch: only when --init is given
  return checkpoints.load_dense(path, expected)




FAMILY = registry.register(registry.Family(
    name="vit",
    description=__doc__ + """
Embedded default (no download, CPU):  python -m experiments.vit_imagenet --phase=all
Accuracy-compute curve (one ACM per budget from the same gates checkpoint):
                                      python -m experiments.vit_imagenet --phase=sweep --budgets=0.25,0.5,0.75
ImageNet with a pretrained ViT-B/16:  python -m experiments.vit_imagenet --phase=all \\
    --dataset=tfds:imagenet2012 --data_dir=$TFDS_DIR --model=vit_b16 --init=ckpt.npz ...
""",
    config_class=ExperimentConfig, build=build, model_presets=vit.PRESETS,
    columns=(registry.Column("top-1", "top1", 100.0, "%", 8), registry.Column("GFLOPs/img", "gflops_per_image",
                                                                              width=11, digits=4)),
    checkpoint_formats=formats.FORMATS))
