"""The speech experiment end to end on a micro model: every phase, eval.json fields, bad input."""

import json

import pytest

from acm_jax.wav2vec2 import model as wav2vec2
from experiments import wav2vec2_commonvoice

MICRO = wav2vec2.Wav2Vec2Config(conv_dim=(8, 8, 16), conv_kernel=(10, 4, 4), conv_stride=(5, 4, 4), conv_bias=True,
                                feat_extract_norm="layer", stable_layer_norm=True, dim=32, depth=2, num_heads=2,
                                mlp_dim=64, num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4)
FLAGS = ["--model=micro", "--max_audio_seconds=2", "--synth_train_utterances=16", "--batch_size=4",
         "--eval_batch_size=8", "--eval_examples=8", "--pretrain_steps=2", "--distill_steps=2", "--gates_steps=2",
         "--finetune_steps=2", "--log_every=1", "--checkpoint_every=5", "--gate_hidden=8"]


@pytest.fixture(autouse=True)
def micro_preset(monkeypatch, tmp_path_factory):
  monkeypatch.setitem(wav2vec2.PRESETS, "micro", MICRO)
  monkeypatch.setenv("ACM_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "synth_cache"))


def test_every_phase_and_eval_fields(tmp_path, capsys):
  assert wav2vec2_commonvoice.main([f"--workdir={tmp_path}", "--phase=all", *FLAGS]) == 0
  out, err = capsys.readouterr()
  assert "acm_b0.50" in out
  acm = json.loads((tmp_path / "finetune_b0.50" / "eval.json").read_text())
  for key in ("model", "wer", "cer", "gflops_per_second_of_audio", "mean_k_per_layer", "k_share_per_layer"):
    assert key in acm
  assert set(acm["mean_k_per_group"]) == {"speech", "silence"}
  dense = json.loads((tmp_path / "pretrain" / "eval.json").read_text())
  static = json.loads((tmp_path / "static_k2" / "eval.json").read_text())
  assert static["gflops_per_second_of_audio"] < dense["gflops_per_second_of_audio"]
  assert 0.0 <= dense["wer"] and dense["examples"] == 8
  # two pretraining steps: whether the run warned follows the dense model's own WER
  assert ("has not learned to transcribe" in err) == (dense["wer"] >= 0.9)

  # the allocation benchmark on the finished run: its gate row is the eval phase's ACM
  from benchmarks import speech_allocation
  assert speech_allocation.main([f"--workdir={tmp_path}", f"--results_dir={tmp_path / 'bench'}", *FLAGS]) == 0
  rows = {r["name"]: r for r in json.loads((tmp_path / "bench" / "results" / "speech_allocation.json").read_text())["rows"]}
  assert rows["gates"]["wer"] == acm["wer"] and rows["gates"]["compute_fraction"] == acm["compute_fraction"]
  assert rows["static"]["wer"] == static["wer"]
  assert rows["full"]["compute_fraction"] == 1.0 and rows["fixed 2/4"]["compute_fraction"] == 0.5
  for other in (0, 1):
    oracle = rows[f"vad oracle, other={other}"]
    assert oracle["mean_k_silence"] == other and "minus_gates_wer" in oracle
    if oracle["mean_k_speech"] < 4:  # not capped at N: the gates' compute
      assert abs(oracle["compute_fraction"] - acm["compute_fraction"]) < 0.03
  assert "| vad oracle, other=1 |" in (tmp_path / "bench" / "RESULTS.md").read_text()


def test_sigterm_in_every_phase_resumes_exactly(tmp_path, monkeypatch, capsys):
  """As tests/test_preemption.py for the ViT: SIGTERM at a random step of each phase exits 75 after saving
  that step, each restart resumes there, and the final params equal an uninterrupted run's bit for bit."""
  import numpy as np
  import orbax.checkpoint as ocp
  import signal

  from acm_jax.acmize import flatten
  from acm_jax.train import loop
  from acm_jax.wav2vec2 import data as speech_data
  from test_preemption import complete_steps, logged_steps, signal_at

  steps = {"pretrain": 3, "distill": 3, "gates": 3, "finetune_b0.50": 3, "static_k2": 3}  # run dir: steps
  flags = [*FLAGS, "--phase=all", *(f"--{run.split('_')[0]}_steps={n}" for run, n in steps.items() if "_k" not in run)]
  main = lambda workdir: wav2vec2_commonvoice.main([f"--workdir={workdir}", *flags])
  assert main(tmp_path / "straight") == 0
  rng = np.random.default_rng()
  stops = {}
  clean = speech_data.SpeechData.iterator
  monkeypatch.setattr(loop, "PREFETCH_DEPTH", 0)  # batch `at` made while step `at` is prepared: exact stops
  for run, n in steps.items():  # each restart finishes the phase stopped before, then stops the next
    at = int(rng.integers(0, n - 1))  # the signal lands while step `at` is being prepared
    monkeypatch.setattr(speech_data.SpeechData, "iterator", signal_at(at, signal.SIGTERM, original=clean))
    assert main(tmp_path / "resumed") == loop.PREEMPTED_STATUS, (run, at)
    stops[run] = at + 1
    assert complete_steps(tmp_path / "resumed" / run) == [at + 1], (run, at)
    assert f"SIGTERM: saved step {at + 1}" in capsys.readouterr().err
  monkeypatch.setattr(speech_data.SpeechData, "iterator", clean)
  assert main(tmp_path / "resumed") == 0, stops
  for run, n in steps.items():
    a, b = (flatten(ocp.StandardCheckpointer().restore(loop.params_dir(tmp_path / work / run)))
            for work in ("straight", "resumed"))
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f"{run}: {key} (stops {stops})")
    assert logged_steps(tmp_path / "resumed" / run) == list(range(1, n + 1)), (run, stops)


def test_untrained_dense_model_warning():
  from acm_jax.wav2vec2 import task as speech
  cfg = speech.SpeechConfig(pretrain_steps=1500, seed=4)
  message = speech.untrained_warning({"wer": 1.0738}, cfg)
  assert message.startswith("warning: the dense model's test WER is 107.4% after 1500 pretraining steps (--seed=4)")
  assert "--pretrain_lr=0.004" in message
  assert speech.untrained_warning({"wer": 0.0869}, cfg) is None
  assert speech.untrained_warning({"wer": 0.8999}, cfg) is None
  assert "after --init=/ckpt" in speech.untrained_warning({"wer": 0.95}, speech.SpeechConfig(init="/ckpt"))


def test_group_allocation_spends_the_mean_k():
  import jax.numpy as jnp
  import numpy as np

  from benchmarks.speech_allocation import group_allocation
  rng = np.random.default_rng(3)
  real = np.arange(300)[None] < rng.integers(100, 300, size=(6, 1))
  inside = rng.random((6, 300)) < 0.6
  for mean_k, other in [(2.0, 1), (1.3, 0), (3.9, 1)]:
    k = np.asarray(group_allocation(jnp.asarray(inside), jnp.asarray(real), mean_k, other, 4))
    assert np.all(k[~real] == 0) and np.all(k[real & ~inside] == other) and k.min() >= 0 and k.max() <= 4
    share = (inside & real).sum() / real.sum()
    expected_inside = min((mean_k - (1 - share) * other) / share, 4)
    assert abs(k[inside & real].mean() - expected_inside) < 0.01  # a low-discrepancy pattern, not a random draw
    assert set(np.unique(k[inside & real])) <= {int(np.floor(expected_inside)), int(np.ceil(expected_inside))}


def test_bad_input(tmp_path, capsys):
  assert wav2vec2_commonvoice.main([f"--workdir={tmp_path}", "--language=tlh", *FLAGS]) == 2
  assert "argument --language: 'tlh' is not allowed; expected one of es, en" in capsys.readouterr().err
  assert wav2vec2_commonvoice.main([f"--workdir={tmp_path}", "--model=from_init", *FLAGS[1:]]) == 2
  assert "--model=from_init needs --init" in capsys.readouterr().err
  assert wav2vec2_commonvoice.main([f"--workdir={tmp_path}", "--dataset=commonvoice",
                                    f"--data_dir={tmp_path / 'none'}", *FLAGS]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert wav2vec2_commonvoice.main([f"--workdir={tmp_path}", "--synth_words=0", *FLAGS]) == 2
  assert "--synth_words must be in 1..408 for --language=es, got 0" in capsys.readouterr().err
  assert wav2vec2_commonvoice.main([f"--workdir={tmp_path}", "--synth_max_pad_seconds=1.0", *FLAGS]) == 2
  assert "--synth_max_pad_seconds must be in [0.05, max_audio_seconds / 2), got 1.0" in capsys.readouterr().err
  assert wav2vec2_commonvoice.main([f"--workdir={tmp_path}", "--synth_min_snr_db=45", *FLAGS]) == 2
  assert "--synth_min_snr_db must be in [-20, 40), got 45.0" in capsys.readouterr().err
  assert wav2vec2_commonvoice.main([f"--workdir={tmp_path}", "--phase=distill", *FLAGS]) == 2
  assert "run that phase first" in capsys.readouterr().err


def test_padding_frames_count_for_nothing():
  """Eval's k histogram and the finetuning compute fraction count the frames inside each
  utterance only: padding past an utterance's end runs no learner at inference."""
  import dataclasses

  import jax
  import jax.numpy as jnp
  import numpy as np

  from acm_jax import acm as acm_lib
  from acm_jax import losses
  from acm_jax.train import steps
  from acm_jax.wav2vec2 import task as speech

  acm_config = dataclasses.replace(MICRO, acm=acm_lib.ACMConfig(num_learners=4, gate_hidden=8)).validate()
  task = speech.speech_task(MICRO, acm_config, jnp.float32)
  rng = np.random.default_rng(0)
  samples, lengths = 8000, np.array([8000, 3000, 5200], np.int32)
  audio = (rng.normal(size=(3, samples)) * (np.arange(samples)[None] < lengths[:, None])).astype(np.float32)
  batch = {"audio": jnp.asarray(audio), "audio_length": jnp.asarray(lengths),
           "label": jnp.ones((3, 4), jnp.int32), "label_length": jnp.full((3,), 2, jnp.int32)}
  params = task.acm_model.init({"params": jax.random.key(0), "gumbel": jax.random.key(1)},
                               task.inputs(batch), mode="gumbel")["params"]
  out = steps.eval_step(task, "argmax", None, params, batch)
  real_frames = int(np.sum(MICRO.num_frames(lengths)))
  assert MICRO.num_frames(samples) * 3 > real_frames
  for hist in out["k_hist"].values():
    assert float(jnp.sum(hist)) == pytest.approx(real_frames)
  # the training budget sees the same frames: compute fraction from the gates' choices on real frames
  _, aux = task.acm_model.apply({"params": params}, task.inputs(batch), mode="argmax", mutable=["acm"])
  choices = steps.acm_choices(task, aux)
  mask = np.asarray(task.token_mask(batch))
  assert mask.sum() == real_frames
  k = [np.argmax(np.asarray(c), -1) for c in choices]
  costs = [s.learner_cost for s in task.acm_specs]
  expected = sum(cost * kk[mask].mean() for cost, kk in zip(costs, k)) / (4 * sum(costs))
  assert float(losses.compute_fraction(choices, costs, jnp.asarray(mask))) == pytest.approx(expected, rel=1e-5)
