"""Speech recognition as a `phases.Experiment`: Wav2Vec2 + CTC on speech batches.

The phases (pretrain, distill, gates, finetune, static) are the shared ones; this
module only supplies the task (CTC loss, loss sums as scores, speech/silence
frame groups, greedy ids for the host), the data iterator, the FLOP count per
second of audio and the WER/CER computed on the host after decoding.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from acm_jax import acm as acm_lib
from acm_jax import registry
from acm_jax.wav2vec2 import data as speech_data, synth as speech_synth
from acm_jax.wav2vec2 import model as wav2vec2
from acm_jax.wav2vec2 import ctc
from acm_jax.wav2vec2 import flops as speech_flops
from acm_jax.train import phases, steps
from acm_jax.train.config import ExperimentConfig, flag


@dataclasses.dataclass
class SpeechConfig(ExperimentConfig):
  """`ExperimentConfig` with speech defaults and the speech fields (language, audio length, synthesis)."""
  dataset: str = flag("speech_synth", "speech_synth (offline eSpeak NG), or commonvoice with "
                      "--data_dir=<language folder>", speech_data.DATASETS)
  workdir: str = "runs/speech_embedded"
  language: str = flag("es", "language of the vocabulary and the synthesised sentences", tuple(ctc.ALPHABETS))
  max_audio_seconds: float = flag(3.0, "batch shape in seconds (> 0); longer clips are skipped and counted")
  # 12,000 train utterances over a 100-word vocabulary, 600 test ones (benchmarks/RESULTS.md: on the earlier
  # 2,400 / 48 words / 240 the WER of one model moved by ~3 points between two syntheses of the test set)
  synth_train_utterances: int = flag(12000, "synthesised train utterances (>= 1)")
  synth_test_utterances: int = flag(600, "synthesised test utterances (>= 1)")
  synth_max_pad_seconds: float = flag(0.5, "silence before and after each synthesised utterance: 0.05 s to "
                                      "this, in [0.05, max_audio_seconds / 2)")
  synth_words: int = flag(100, "vocabulary of the synthesised sentences (first words of the built-in list)")
  synth_min_snr_db: float = flag(10.0, "white noise is mixed in at an SNR drawn from [this, 40] dB, in [-20, 40)")
  batch_size: int = 16
  eval_batch_size: int = 48
  pretrain_steps: int = 1500
  pretrain_lr: float = 2e-3
  distill_steps: int = 200
  gates_steps: int = 150
  finetune_steps: int = 300
  finetune_lr: float = 3e-4
  warmup_fraction: float = 0.1
  gate_hidden: int = 32

  def validate(self) -> "SpeechConfig":
    super().validate()
    if self.augment not in (None, "none") or self.mixup or self.cutmix:
      raise ValueError(f"--augment, --mixup and --cutmix are for images; speech takes none of them "
                       f"(got {self.augment!r}, {self.mixup}, {self.cutmix})")
    if self.max_audio_seconds <= 0:
      raise ValueError(f"--max_audio_seconds must be > 0, got {self.max_audio_seconds}")
    if self.synth_test_utterances < 1:
      raise ValueError(f"--synth_test_utterances must be >= 1, got {self.synth_test_utterances}")
    if not 0.05 <= self.synth_max_pad_seconds < self.max_audio_seconds / 2:
      raise ValueError(f"--synth_max_pad_seconds must be in [0.05, max_audio_seconds / 2), "
                       f"got {self.synth_max_pad_seconds}")
    max_snr = speech_synth.SpeechSynthConfig.snr_db[1]
    if not -20.0 <= self.synth_min_snr_db < max_snr:
      raise ValueError(f"--synth_min_snr_db must be in [-20, {max_snr:g}), got {self.synth_min_snr_db}")
    if self.dataset == "speech_synth":
      available = len(speech_synth.WORDS.get(self.language, ()))
      if available and not 1 <= self.synth_words <= available:
        raise ValueError(f"--synth_words must be in 1..{available} for --language={self.language}, "
                         f"got {self.synth_words}")
    if self.synth_train_utterances < 1:
      raise ValueError(f"--synth_train_utterances must be >= 1, got {self.synth_train_utterances}")
    return self


def synth_config(config: SpeechConfig) -> speech_synth.SpeechSynthConfig:
  """The `speech_synth.SpeechSynthConfig` that the --synth_* flags describe."""
  return speech_synth.SpeechSynthConfig(language=config.language, num_train=config.synth_train_utterances,
                                        num_test=config.synth_test_utterances, num_words=config.synth_words,
                                        pad_seconds=(0.05, config.synth_max_pad_seconds),
                                        snr_db=(config.synth_min_snr_db, speech_synth.SpeechSynthConfig.snr_db[1]),
                                        max_seconds=config.max_audio_seconds, seed=config.seed)


def _model_config(config: SpeechConfig, vocab_size: int) -> wav2vec2.Wav2Vec2Config:
  if config.init is not None:
    from acm_jax.wav2vec2 import hf as wav2vec2_hf
    return wav2vec2_hf.config_for_init(config.init, config.model, vocab_size=vocab_size)
  if config.model == "from_init":
    raise ValueError("--model=from_init needs --init=<Hugging Face Wav2Vec2 checkpoint directory>")
  return wav2vec2.get_config(config.model, vocab_size=vocab_size)


def speech_task(dense: wav2vec2.Wav2Vec2Config, acm_config: wav2vec2.Wav2Vec2Config, dtype) -> steps.Task:
  specs = steps.acm_specs(acm_config)

  def per_utterance(logits, batch):
    frames = wav2vec2.frame_lengths(dense, batch["audio_length"])
    return ctc.ctc_losses(logits, frames, batch["label"], batch["label_length"])

  def loss(logits, batch, label_smoothing):
    del label_smoothing  # not defined for CTC
    return jnp.sum(per_utterance(logits, batch)) / jnp.maximum(jnp.sum(batch["label_length"]), 1)

  def score(logits, batch):
    valid = batch.get("valid", jnp.ones(logits.shape[0], bool)).astype(jnp.float32)
    return {"examples": jnp.sum(valid), "ctc_loss": jnp.sum(per_utterance(logits, batch) * valid)}

  def groups(batch):
    if "speech_frames" not in batch:
      return {}
    return {"speech": batch["speech_frames"], "silence": batch["silence_frames"]}

  def token_mask(batch):  # encoder frames inside each utterance; the rest is batch padding
    frames = wav2vec2.frame_lengths(dense, batch["audio_length"])
    return jnp.arange(dense.num_frames(batch["audio"].shape[-1]))[None, :] < frames[:, None]

  def host_outputs(logits, batch):
    return {"ids": jnp.argmax(logits, -1).astype(jnp.int32),
            "frames": wav2vec2.frame_lengths(dense, batch["audio_length"])}

  return steps.Task(
      dense_model=wav2vec2.Wav2Vec2(dense), acm_model=wav2vec2.Wav2Vec2(acm_config), acm_specs=tuple(specs),
      inputs=lambda batch: (batch["audio"].astype(dtype), batch["audio_length"]), loss=loss, score=score,
      token_groups=groups, host_outputs=host_outputs, token_mask=token_mask)


def error_rates(vocab: ctc.Vocabulary, host: list[tuple[Any, dict]]) -> dict:
  """WER and CER over every valid utterance from the eval batches' greedy ids."""
  refs, hyps = [], []
  for out, batch in host:
    valid = batch.get("valid", np.ones(len(batch["label"]), bool))
    hyps += [h for h, v in zip(ctc.greedy_decode(vocab, out["ids"], out["frames"]), valid) if v]
    refs += [vocab.decode(ids[:n]) for ids, n, v in zip(batch["label"], batch["label_length"], valid) if v]
  counts = ctc.error_counts(refs, hyps, per_utterance=True)  # in test-set order: paired comparisons across models
  return {"wer": counts["word_errors"] / max(counts["words"], 1), "cer": counts["char_errors"] / max(counts["chars"], 1),
          "examples_decoded": len(refs), "example_transcripts": [[r, h] for r, h in zip(refs[:3], hyps[:3])],
          "utterance_word_errors": counts["utterance_word_errors"].tolist(),
          "utterance_words": counts["utterance_words"].tolist()}


def build_speech(config: SpeechConfig) -> phases.Experiment:
  """Validates config, checkpoint and data before any work starts."""
  config.validate()
  vocab = ctc.Vocabulary.for_language(config.language)
  dense = dataclasses.replace(_model_config(config, vocab.size), remat=config.remat,
                              scan_blocks=config.scan_blocks, scan_unroll=config.scan_unroll).validate()
  acm = acm_lib.ACMConfig(
      num_learners=config.num_learners, learner_width=config.learner_width, width_factor=config.width_factor,
      blocks=config.block_tuple(), attention=config.acm_attention, activation=dense.activation,
      gate_depth=config.gate_depth, gate_hidden=config.gate_hidden, impl=config.impl,
      budget_conditioning=config.budget_conditioning, group_qkv_gates=config.resolved_group_qkv_gates)
  acm_config = dataclasses.replace(dense, acm=acm).validate()
  synth = synth_config(config) if config.dataset == "speech_synth" else None
  data = speech_data.load(config.dataset, language=config.language, data_dir=config.data_dir,
                          max_seconds=config.max_audio_seconds, seed=config.seed, synth=synth,
                          geometry=speech_data.FrameGeometry(dense.frame_stride, dense.receptive_field))
  dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32

  def count(mean_k, is_dense):
    return speech_flops.wav2vec2_flops(dense if is_dense else acm_config, mean_k)

  def iterator(name, split, batch_size, **kwargs):
    return data.iterator(split, batch_size, **kwargs)

  def host_metrics(host):
    out = error_rates(vocab, host)
    skipped = {k: v for split in data.splits.values() for k, v in getattr(split, "skipped", {}).items()}
    if skipped:
      out["skipped_clips"] = skipped
    return out

  def load_init(path, expected):
    from acm_jax.wav2vec2 import hf as wav2vec2_hf
    return wav2vec2_hf.load(path, expected)

  info = {"dataset": config.dataset, "language": config.language, "vocab": vocab.symbols,
          "max_samples": data.max_samples, "max_label": data.max_label,
          "num_train": len(data.splits["train"]), "num_test": len(data.splits["test"])}
  sample = (jnp.zeros((1, data.max_samples), dtype), jnp.full((1,), data.max_samples, jnp.int32))
  return phases.Experiment(config, speech_task(dense, acm_config, dtype), info, sample_input=sample, flops=count,
                           iterator=iterator, group_masks=config.dataset == "speech_synth",
                           host_metrics=host_metrics, load_init=load_init)


UNTRAINED_WER = 0.9


def untrained_warning(dense_record: dict, config: SpeechConfig) -> str | None:
  """A warning when the dense model has not learned to transcribe (test WER >= 90%), None otherwise.
  From scratch, CTC pretraining can stay on the plateau where the model emits (almost) only blanks:
  3 of the 8 seeds 0-7 of the embedded default do at 1,500 steps (benchmarks/RESULTS.md)."""
  if dense_record["wer"] < UNTRAINED_WER:
    return None
  source = f"--init={config.init}" if config.init else f"{config.pretrain_steps} pretraining steps (--seed={config.seed})"
  return (f"warning: the dense model's test WER is {100 * dense_record['wer']:.1f}% after {source}: it has not "
          "learned to transcribe (likely the CTC blank plateau), and the ACM phases would distil that. Pretrain "
          "longer (--pretrain_steps), or try another --seed or --pretrain_lr=0.004.")


def evaluate(exp: phases.Experiment, params, model: str, mode: str, fixed_k: int | None = None, **kwargs) -> dict:
  """`phases.evaluate` (and its keyword arguments) with speech units: GFLOPs per second of audio, WER, CER."""
  record = phases.evaluate(exp, params, model, mode, fixed_k, **kwargs)
  record["gflops_per_second_of_audio"] = record.pop("gflops_per_image")
  if "gate_gflops_per_image" in record:
    record["gate_gflops_per_second_of_audio"] = record.pop("gate_gflops_per_image")
  return record


def check_dense(dense_record: dict, config: SpeechConfig) -> str | None:
  return untrained_warning(dense_record, config) if "wer" in dense_record else None


FAMILY = registry.register(registry.Family(
    name="wav2vec2",
    description=__doc__ + """
Embedded default (speech synthesised offline with eSpeak NG, CPU, no download):
    python -m experiments.wav2vec2_commonvoice --phase=all
Common Voice Spanish from a local release, starting from a Hugging Face XLS-R checkpoint directory:
    python -m experiments.wav2vec2_commonvoice --phase=all --dataset=commonvoice \\
        --data_dir=cv-corpus-17.0/es --language=es --model=xls_r_300m --init=path/to/wav2vec2-xls-r-300m \\
        --max_audio_seconds=10 --batch_size=32 --dtype=bfloat16 ...
--init takes the checkpoint directory (config.json + model.safetensors). eval.json per model holds
wer, cer, gflops_per_second_of_audio, mean_k_per_layer, k_share_per_layer (and mean k on speech vs
silence frames).
""",
    config_class=SpeechConfig, build=build_speech, model_presets=wav2vec2.PRESETS,
    columns=(registry.Column("WER", "wer", 100.0, "%", 7), registry.Column("CER", "cer", 100.0, "%", 7),
             registry.Column("GFLOPs/s audio", "gflops_per_second_of_audio", width=15, digits=4)),
    token_word="frames", evaluate=evaluate, check_dense=check_dense, checkpoint_formats=("hf (config.json + model.safetensors or pytorch_model.bin)",)))
