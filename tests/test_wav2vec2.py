"""Wav2Vec2: frame arithmetic, Hugging Face import against transformers' PyTorch model,
exact ACMization at k = N, FLOP count against XLA, and bad checkpoints."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from acm_jax import acm as acm_lib
from acm_jax.acmize import acmize
from acm_jax.wav2vec2 import hf as wav2vec2_hf
from acm_jax.checkpoint_io import CheckpointError
from acm_jax.wav2vec2 import model as wav2vec2
from acm_jax.wav2vec2 import flops as speech_flops

SMALL = wav2vec2.Wav2Vec2Config(conv_dim=(8, 8, 8), conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2), conv_bias=True,
                                feat_extract_norm="layer", stable_layer_norm=True, dim=16, depth=2, num_heads=2,
                                mlp_dim=32, num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4, vocab_size=7)


@pytest.mark.parametrize("samples", [30, 31, 33, 401, 777, 1603])
def test_frames_for_odd_lengths(samples):
  model = wav2vec2.Wav2Vec2(SMALL)
  audio = jnp.ones((1, samples))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), audio))
  out = jax.eval_shape(lambda p: model.apply(p, audio), params)
  # each VALID convolution maps L samples to floor((L - kernel) / stride) + 1
  expected = samples
  for k, s in zip(SMALL.conv_kernel, SMALL.conv_stride):
    expected = (expected - k) // s + 1
  assert out.shape == (1, expected, SMALL.vocab_size) == (1, SMALL.num_frames(samples), SMALL.vocab_size)
  assert int(wav2vec2.frame_lengths(SMALL, jnp.array([samples]))[0]) == expected


def test_receptive_field_and_too_short_audio():
  assert SMALL.receptive_field == 10 + 2 * 5 + 1 * 10  # 30 samples
  assert SMALL.num_frames(SMALL.receptive_field) == 1 and SMALL.num_frames(SMALL.receptive_field - 1) == 0
  assert wav2vec2.get_config("base").receptive_field == 400 and wav2vec2.get_config("base").frame_stride == 320
  model = wav2vec2.Wav2Vec2(SMALL)
  with pytest.raises(ValueError, match="shorter than the feature encoder's receptive field of 30"):
    model.init(jax.random.key(0), jnp.ones((1, 29)))


def test_bad_configs():
  with pytest.raises(ValueError, match="feat_extract_norm"):
    wav2vec2.get_config("tiny", feat_extract_norm="batch")
  with pytest.raises(ValueError, match="unknown model preset"):
    wav2vec2.get_config("huge")
  with pytest.raises(ValueError, match="one entry per layer"):
    wav2vec2.get_config("tiny", conv_kernel=(10, 3))


def _hf_checkpoint(tmp_path, stable: bool):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf_config = transformers.Wav2Vec2Config(
      vocab_size=11, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
      conv_dim=(16, 16, 16), conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2), conv_bias=stable,
      feat_extract_norm="layer" if stable else "group", do_stable_layer_norm=stable,
      num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
  torch.manual_seed(0)
  model = transformers.Wav2Vec2ForCTC(hf_config).eval()
  with torch.no_grad():  # move every weight off its initial value (norms are 1/0 at init)
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(tmp_path)
  return model


@pytest.mark.parametrize("stable", [False, True], ids=["post_ln_group_norm", "stable_layer_norm"])
def test_hf_import_matches_transformers(tmp_path, stable):
  import torch
  reference = _hf_checkpoint(tmp_path, stable)
  config = wav2vec2_hf.config_for_init(tmp_path, "from_init")
  assert config.stable_layer_norm == stable and config.feat_extract_norm == ("layer" if stable else "group")
  model = wav2vec2.Wav2Vec2(config)
  audio = np.random.default_rng(0).normal(size=(2, 1601)).astype(np.float32)
  expected = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.asarray(audio)))["params"]
  params = wav2vec2_hf.load(tmp_path, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), expected))
  logits = np.asarray(model.apply({"params": params}, jnp.asarray(audio)))
  with torch.no_grad():
    out = reference(torch.from_numpy(audio))
    hidden = reference.wav2vec2(torch.from_numpy(audio)).last_hidden_state.numpy()
  assert logits.shape == tuple(out.logits.shape)
  np.testing.assert_allclose(logits, out.logits.numpy(), atol=1e-4, rtol=0)
  # the encoder's output (the CTC head's input) agrees too
  head = params["head"]
  np.testing.assert_allclose(hidden @ head["kernel"] + head["bias"], logits, atol=1e-4, rtol=0)


def test_hf_checkpoint_that_does_not_match_the_preset(tmp_path):
  _hf_checkpoint(tmp_path, stable=True)
  with pytest.raises(CheckpointError, match=r"does not match --model=tiny \(conv_dim"):
    wav2vec2_hf.config_for_init(tmp_path, "tiny")
  (tmp_path / "config.json").unlink()
  with pytest.raises(CheckpointError, match="no config.json"):
    wav2vec2_hf.read(tmp_path)
  with pytest.raises(CheckpointError, match="is not a directory"):
    wav2vec2_hf.read(tmp_path / "missing")


def test_acmized_model_is_exact_at_full_k():
  acm_config = dataclasses.replace(SMALL, acm=acm_lib.ACMConfig(num_learners=4, gate_hidden=8))
  audio = jnp.asarray(np.random.default_rng(1).normal(size=(2, 400)), jnp.float32)
  lengths = jnp.array([400, 250])
  dense_model, acm_model = wav2vec2.Wav2Vec2(SMALL), wav2vec2.Wav2Vec2(acm_config)
  dense = dense_model.init(jax.random.key(0), audio)["params"]
  params = acmize(dense, acm_model.init(jax.random.key(1), audio)["params"], acm_config.acm_paths(), num_learners=4)
  np.testing.assert_allclose(acm_model.apply({"params": params}, (audio, lengths), mode="full"),
                             dense_model.apply({"params": dense}, audio, lengths), atol=1e-5)


def test_padding_does_not_change_valid_frames():
  model = wav2vec2.Wav2Vec2(SMALL)
  audio = jnp.asarray(np.random.default_rng(2).normal(size=(1, 300)), jnp.float32)
  params = model.init(jax.random.key(0), audio)["params"]
  alone = model.apply({"params": params}, audio)
  padded = model.apply({"params": params}, jnp.pad(audio, ((0, 0), (0, 200))), jnp.array([300]))
  np.testing.assert_allclose(padded[:, :alone.shape[1]], alone, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny"])
def test_flops_match_xla(preset):
  config = wav2vec2.get_config(preset)
  model = wav2vec2.Wav2Vec2(config)
  audio = jnp.zeros((1, config.sample_rate))
  params = model.init(jax.random.key(0), audio)
  xla = jax.jit(lambda p, a: model.apply(p, a)).lower(params, audio).compile().cost_analysis()["flops"]
  ours = speech_flops.wav2vec2_flops(config)["total"]
  assert abs(ours - xla) / xla < 0.05
  acm_config = dataclasses.replace(config, acm=acm_lib.ACMConfig())
  full = speech_flops.wav2vec2_flops(acm_config)
  half = speech_flops.wav2vec2_flops(acm_config, {p: 2.0 for p in acm_config.acm_paths()})
  assert half["total"] < full["total"] and full["gate"] == half["gate"] > 0
