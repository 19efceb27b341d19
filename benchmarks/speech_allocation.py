"""Where the speech ACM's lead over static width comes from: the finetuned ACM's own
learners run under other allocations of (about) the same compute, on the test set
of a finished `--phase=all` workdir. Recorded in benchmarks/results/speech_allocation.json
and RESULTS.md.

  python3 -m benchmarks.speech_allocation [--workdir=runs/speech_bench] [that run's wav2vec2_commonvoice flags]
      [--results_dir=benchmarks]

Rows (every row but "static" runs the finetuned ACM's parameters):
  gates             the gates' argmax: the ACM as `--phase=eval` reports it
  full              k = N on every frame
  fixed N/2         k = N/2 on every frame: the finetuned learners without their gates
  vad oracle, other=j  a voice-activity oracle at the gates' measured compute: frames that
                    are not speech (silence, noise, frames straddling a word edge) run k = j,
                    speech frames share what is left of the gates' compute
  static            the static-width model (its own finetune) at k = N/2
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from acm_jax.wav2vec2 import ctc
from acm_jax.train import phases
from acm_jax.wav2vec2 import task as speech
from acm_jax import cli, registry

HERE = Path(__file__).resolve().parent
_GOLDEN = 0.6180339887498949


def group_allocation(inside: jax.Array, real: jax.Array, mean_k: float, k_other: int, num_learners: int) -> jax.Array:
  """(batch, tokens) int k: tokens outside `inside` run `k_other`; tokens inside run k_in =
  (mean_k - (1 - share) * k_other) / share on average, where share = the inside fraction of
  `real` tokens, so all real tokens average `mean_k` (k_in capped at N). A fractional k_in
  is floor(k_in) + 1 on a low-discrepancy subset of the inside tokens of that fraction."""
  real = real.astype(bool)
  inside = inside.astype(bool) & real
  share = jnp.sum(inside) / jnp.maximum(jnp.sum(real), 1)
  k_in = jnp.clip((mean_k - (1 - share) * k_other) / jnp.maximum(share, 1e-9), 0, num_learners)
  low = jnp.floor(k_in)
  rows, cols = jnp.meshgrid(jnp.arange(inside.shape[0]), jnp.arange(inside.shape[1]), indexing="ij")
  pattern = jnp.mod((cols + 1) * _GOLDEN + rows * (1 - _GOLDEN), 1.0)
  k = jnp.where(inside, low + (pattern < k_in - low), k_other)
  return jnp.where(real, k, 0).astype(jnp.int32)


def _row(name: str, record: dict) -> dict:
  groups = record.get("mean_k_per_group", {})
  return {"name": name, "wer": record["wer"], "cer": record["cer"], "compute_fraction": record["compute_fraction"],
          "mean_k_speech": groups.get("speech"), "mean_k_silence": groups.get("silence"),
          "utterance_word_errors": record["utterance_word_errors"], "utterance_words": record["utterance_words"]}


def main(argv: list[str]) -> int:
  results_dir = Path(next((a.split("=", 1)[1] for a in argv if a.startswith("--results_dir=")), HERE))
  workdir = next((a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")), "runs/speech_bench")
  extra = [a for a in argv if not a.startswith(("--workdir=", "--results_dir="))]
  args, cfg = cli.parse(registry.get("wav2vec2"), ["--phase=eval", f"--workdir={workdir}", *extra])
  exp = speech.build_speech(cfg)
  if not exp.group_masks:
    raise ValueError(f"--dataset={cfg.dataset} has no speech/silence frame labels; the oracle needs the synthesised set")
  init = phases.init_params(exp, "acm", 0)
  acm = phases.loop.load_params(exp.run_dir("finetune"), init, "finetune phase")
  static = phases.loop.load_params(exp.run_dir("static"), init, "static phase")
  n, half = cfg.num_learners, cfg.resolved_static_k
  task = exp.task

  rows = [_row("gates", speech.evaluate(exp, acm, "gates", "argmax"))]
  mean_k = rows[0]["compute_fraction"] * n  # every ACM gets the same map: the mean k that costs the gates' compute
  print(f"gates: WER {100 * rows[0]['wer']:.2f}, compute {rows[0]['compute_fraction']:.3f}", flush=True)
  arms = [("full", lambda b: jnp.full(b["speech_frames"].shape, n)),
          (f"fixed {half}/{n}", lambda b: jnp.full(b["speech_frames"].shape, half))]
  for other in (0, 1):
    arms.append((f"vad oracle, other={other}",
                 lambda b, other=other: group_allocation(b["speech_frames"], task.token_mask(b), mean_k, other, n)))
  for name, forced in arms:
    rows.append(_row(name, speech.evaluate(exp, acm, name, "argmax", forced_k=forced)))
    print(f"{name}: WER {100 * rows[-1]['wer']:.2f}, compute {rows[-1]['compute_fraction']:.3f}", flush=True)
  rows.append(_row("static", speech.evaluate(exp, static, "static", "fixed", fixed_k=half)))

  gates = rows[0]
  for row in rows[1:]:
    row["minus_gates_wer"] = ctc.wer_difference(row["utterance_word_errors"], gates["utterance_word_errors"],
                                                gates["utterance_words"])
  record = {"device": f"{platform.processor() or platform.machine()} CPU x{os.cpu_count()} ({jax.default_backend()})",
            "date": datetime.date.today().isoformat(), "workdir": str(workdir), "num_learners": n,
            "command": "python3 -m benchmarks.speech_allocation " + " ".join(a for a in argv
                                                                              if not a.startswith("--results_dir=")),
            "rows": [{k: v for k, v in row.items() if not k.startswith("utterance_")} for row in rows]}
  results_dir.mkdir(parents=True, exist_ok=True)
  (results_dir / "results").mkdir(exist_ok=True)
  (results_dir / "results" / "speech_allocation.json").write_text(json.dumps(record, indent=2) + "\n")
  lines = [f"\n### Speech: the ACM's learners under other allocations ({record['date']}, {record['device']})\n",
           f"Command: `{record['command']}` (workdir `{workdir}`). WER minus the gates' WER with a 95% paired "
           "bootstrap interval over the test utterances.\n",
           "| allocation | WER | compute | mean k speech / silence | minus gates |", "|---|---|---|---|---|"]
  for row in record["rows"]:
    diff = row.get("minus_gates_wer")
    interval = (f"{100 * diff['difference']:+.2f} ({100 * diff['low']:+.2f} to {100 * diff['high']:+.2f})"
                if diff else "-")
    lines.append(f"| {row['name']} | {100 * row['wer']:.2f} | {row['compute_fraction']:.3f} | "
                 f"{row['mean_k_speech']:.2f} / {row['mean_k_silence']:.2f} | {interval} |")
  with (results_dir / "RESULTS.md").open("a") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
