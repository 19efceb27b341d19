"""The speech embedded default end to end (`--phase=all`, synthesis included), timed,
checked against the targets of issue #10, and recorded in
benchmarks/results/speech_embedded.json and RESULTS.md.

  python3 -m benchmarks.speech_embedded [--workdir=runs/speech_bench] [extra wav2vec2_commonvoice flags]
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax

from acm_jax.wav2vec2 import ctc
from acm_jax import cli, registry

HERE = Path(__file__).resolve().parent


def paired_differences(dense: dict, acm: dict, static: dict) -> dict:
  """Static-minus-ACM and ACM-minus-dense WER with 95% paired-bootstrap intervals over the test utterances."""
  words = acm["utterance_words"]
  if dense["utterance_words"] != words or static["utterance_words"] != words:
    raise ValueError("the three eval records are not on the same test utterances")
  return {"static_minus_acm_wer": ctc.wer_difference(static["utterance_word_errors"], acm["utterance_word_errors"], words),
          "acm_minus_dense_wer": ctc.wer_difference(acm["utterance_word_errors"], dense["utterance_word_errors"], words)}


def _interval(d: dict) -> str:
  return f"{100 * d['difference']:+.2f} (95% CI {100 * d['low']:+.2f} to {100 * d['high']:+.2f})"


def main(argv: list[str]) -> int:
  workdir = next((a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")), "runs/speech_bench")
  extra = [a for a in argv if not a.startswith("--workdir=")]
  if Path(workdir).exists():
    shutil.rmtree(workdir)  # a timing must include every phase
  # synthesis is part of the timing: a fresh cache directory
  os.environ["ACM_JAX_CACHE"] = tempfile.mkdtemp(prefix="speech_synth_")
  tic = time.time()
  args, cfg = cli.parse(registry.get("wav2vec2"), ["--phase=all", f"--workdir={workdir}", *extra])
  dense, acm, static = cli.run(registry.get("wav2vec2"), args, cfg)
  minutes = (time.time() - tic) / 60
  groups = acm.get("mean_k_per_group", {})
  record = {
      "device": f"{platform.processor() or platform.machine()} CPU x{os.cpu_count()} ({jax.default_backend()})",
      "date": datetime.date.today().isoformat(), "minutes": round(minutes, 2), "budget": cfg.budget,
      "dense_wer": dense["wer"], "acm_wer": acm["wer"], "static_width_wer": static["wer"],
      "dense_cer": dense["cer"], "acm_cer": acm["cer"], "static_width_cer": static["cer"],
      "dense_gflops_per_s": dense["gflops_per_second_of_audio"], "acm_gflops_per_s": acm["gflops_per_second_of_audio"],
      "static_width_gflops_per_s": static["gflops_per_second_of_audio"],
      "acm_compute_fraction": acm["compute_fraction"], "distinct_k_per_layer": acm["distinct_k_per_layer"],
      "mean_k_per_layer": acm["mean_k_per_layer"],
      "mean_k_speech": groups.get("speech"), "mean_k_silence": groups.get("silence"),
      "command": "python3 -m benchmarks.speech_embedded " + " ".join(extra),
      "data": {"words": cfg.synth_words, "train_utterances": cfg.synth_train_utterances,
               "test_utterances": cfg.synth_test_utterances, "max_pad_seconds": cfg.synth_max_pad_seconds,
               "min_snr_db": cfg.synth_min_snr_db},
      "recipe": {"pretrain_steps": cfg.pretrain_steps, "finetune_steps": cfg.finetune_steps,
                 "finetune_lr": cfg.finetune_lr, "entropy_weight": cfg.entropy_weight,
                 "finetune_gate_lr_scale": cfg.finetune_gate_lr_scale},
  }
  checks = {
      "finishes in < 30 min": minutes < 30,
      "dense WER < 15%": dense["wer"] < 0.15,
      "ACM within 2 WER points of dense": acm["wer"] <= dense["wer"] + 0.02,
      "ACM >= 3 WER points better than static": acm["wer"] <= static["wer"] - 0.03,
      "every ACM uses >= 3 distinct k": min(acm["distinct_k_per_layer"].values()) >= 3,
      "more compute on speech frames": (groups.get("speech") or 0) > (groups.get("silence") or 0),
  }
  record["checks"] = checks
  record.update(paired_differences(dense, acm, static))
  (HERE / "results").mkdir(exist_ok=True)
  (HERE / "results" / "speech_embedded.json").write_text(json.dumps(record, indent=2) + "\n")
  lines = [f"\n## Speech embedded default, `--phase=all` ({record['date']}, {record['device']})\n",
           f"Command: `{record['command']}`; {minutes:.1f} min including synthesis. Data: {record['data']}; "
           f"recipe: {record['recipe']}.\n",
           "| model | WER | CER | GFLOPs / s of audio |", "|---|---|---|---|",
           f"| dense | {100 * dense['wer']:.2f} | {100 * dense['cer']:.2f} | {dense['gflops_per_second_of_audio']:.4f} |",
           f"| ACM, budget {cfg.budget} (compute {acm['compute_fraction']:.2f}) | {100 * acm['wer']:.2f} | "
           f"{100 * acm['cer']:.2f} | {acm['gflops_per_second_of_audio']:.4f} |",
           f"| static width k={cfg.resolved_static_k} | {100 * static['wer']:.2f} | {100 * static['cer']:.2f} | "
           f"{static['gflops_per_second_of_audio']:.4f} |",
           "", f"Mean k on speech frames {groups.get('speech', float('nan')):.2f}, on silence/noise-only frames "
           f"{groups.get('silence', float('nan')):.2f}; distinct k per layer {acm['distinct_k_per_layer']}.",
           "", f"Paired over the {record['static_minus_acm_wer']['utterances']} test utterances (bootstrap): static "
           f"minus ACM WER {_interval(record['static_minus_acm_wer'])} points; ACM minus dense "
           f"{_interval(record['acm_minus_dense_wer'])}.",
           "", "Targets: " + "; ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in checks.items()), ""]
  with (HERE / "RESULTS.md").open("a") as f:
    f.write("\n".join(lines))
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
