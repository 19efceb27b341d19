"""ACMize a Wav2Vec2 CTC model: pretrain (or --init), distill, gates, finetune, static, eval.

Embedded default (speech synthesised offline with eSpeak NG, CPU, no download):
    python -m experiments.wav2vec2_commonvoice --phase=all
Common Voice Spanish from a local release, starting from a Hugging Face XLS-R checkpoint directory:
    python -m experiments.wav2vec2_commonvoice --phase=all --dataset=commonvoice \
        --data_dir=cv-corpus-17.0/es --language=es --model=xls_r_300m --init=path/to/wav2vec2-xls-r-300m \
        --max_audio_seconds=10 --batch_size=32 --dtype=bfloat16 ...
The flags are those of experiments.vit_imagenet plus --language, --max_audio_seconds and
--synth_train_utterances; --init takes the checkpoint (config.json + model.safetensors).
`eval` writes eval.json per model with wer, cer, gflops_per_second_of_audio,
mean_k_per_layer, k_share_per_layer (and mean k on speech vs silence frames).
"""

from __future__ import annotations

import argparse
import sys
import time

from acm_jax.vit.formats import CheckpointError
from acm_jax.train import config as config_lib
from acm_jax.train import phases
from acm_jax.wav2vec2 import task as speech
from experiments import vit_imagenet

EVAL_MODELS = vit_imagenet.EVAL_MODELS


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, speech.SpeechConfig]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--phase", default="all", choices=config_lib.PHASES)
  parser.add_argument("--eval_models", default=None,
                      help=f"comma-separated subset of {EVAL_MODELS} for --phase=eval (default: every finished one)")
  config_lib.add_flags(parser, speech.SpeechConfig)
  args = parser.parse_args(argv)
  return args, config_lib.from_flags(args, speech.SpeechConfig())


def format_table(records: list[dict]) -> str:
  lines = [f"{'model':<16} {'WER':>7} {'CER':>7} {'GFLOPs/s audio':>15} {'compute':>8}  mean k per layer / share of k"]
  for r in records:
    compute = f"{r['compute_fraction']:.3f}" if "compute_fraction" in r else "1.000"
    lines.append(f"{r['model']:<16} {100 * r['wer']:>6.2f}% {100 * r['cer']:>6.2f}% "
                 f"{r['gflops_per_second_of_audio']:>15.4f} {compute:>8}")
    for path, mean_k in r.get("mean_k_per_layer", {}).items():
      share = " ".join(f"{s:.2f}" for s in r["k_share_per_layer"][path])
      lines.append(f"{'':<16}   {path:<24} k={mean_k:.2f}  [{share}]")
    for name, value in r.get("mean_k_per_group", {}).items():
      lines.append(f"{'':<16}   mean k on {name} frames: {value:.2f}")
  return "\n".join(lines)


def evaluate_models(exp: phases.Experiment, models: list[str]) -> list[dict]:
  records = []
  for model in models:
    if model == "dense":
      record = speech.evaluate(exp, phases.dense_params(exp), "dense", "dense")
      run_dir = exp.run_dir("pretrain")
    else:
      phase = "finetune" if model == "acm" else "static"
      params = phases.loop.load_params(exp.run_dir(phase), phases.init_params(exp, "acm", 0), f"{phase} phase")
      if model == "acm":
        record = speech.evaluate(exp, params, f"acm_b{exp.config.budget:.2f}", "argmax")
      else:
        k = exp.config.resolved_static_k
        record = speech.evaluate(exp, params, f"static_k{k}", "fixed", fixed_k=k)
      run_dir = exp.run_dir(phase)
    phases.write_json(run_dir / "eval.json", record)
    phases.write_json(exp.workdir / "eval.json", record)
    records.append(record)
  return records


def warn_if_untrained(dense_record: dict, cfg: speech.SpeechConfig) -> None:
  message = speech.untrained_warning(dense_record, cfg)
  if message and phases.loop.is_main_process():
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace, cfg: speech.SpeechConfig) -> list[dict]:
  exp = speech.build_speech(cfg)  # validates config, checkpoint and data before any work
  if args.eval_models is not None:
    bad = [m for m in args.eval_models.split(",") if m not in EVAL_MODELS]
    if bad:
      raise ValueError(f"--eval_models: unknown {bad}; expected a subset of {EVAL_MODELS}")
  tic = time.time()
  records: list[dict] = []
  if args.phase == "all":
    if cfg.init is None:
      phases.pretrain(exp)
    records = evaluate_models(exp, ["dense"])  # first: a model that has not learned is worth a warning now
    warn_if_untrained(records[0], cfg)
    for phase in (phases.distill, phases.gates, phases.finetune, phases.static):
      phase(exp)
    records += evaluate_models(exp, ["acm", "static"])
  elif args.phase == "eval":
    models = args.eval_models.split(",") if args.eval_models else vit_imagenet.finished_models(exp)
    if not models:
      raise FileNotFoundError(f"nothing to evaluate in {exp.workdir}: no finished pretrain, finetune or "
                              "static run (and no --init)")
    records = evaluate_models(exp, models)
    for record in records:
      if record["model"] == "dense":
        warn_if_untrained(record, cfg)
  else:
    if args.phase == "pretrain" and cfg.init is not None:
      raise ValueError("--phase=pretrain trains a dense model from scratch; drop --init or start at distill")
    getattr(phases, args.phase)(exp)
  if records and phases.loop.is_main_process():
    print(format_table(records))
    print(f"done in {(time.time() - tic) / 60:.1f} min; results in {exp.workdir}")
  return records


def main(argv: list[str] | None = None) -> int:
  args, cfg = parse(argv)
  try:
    run(args, cfg)
  except (ValueError, FileNotFoundError, KeyError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
