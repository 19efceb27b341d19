"""Speech pieces: CTC loss against brute force, greedy decoding, WER/CER, text
normalisation, the synthesiser (determinism, held-out voices), Common Voice reading
and its bad inputs."""

import dataclasses
import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from acm_jax.wav2vec2 import commonvoice, data as speech_data, synth as speech_synth
from acm_jax.wav2vec2 import ctc

GEOMETRY = speech_data.FrameGeometry(stride=320, field=400)


def test_ctc_loss_equals_sum_over_alignments():
  rng = np.random.default_rng(0)
  frames, vocab = 5, 3
  logits = rng.normal(size=(2, frames, vocab)).astype(np.float32)
  labels = np.array([[1, 2], [1, 1]], np.int32)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  for b in range(2):
    total = 0.0
    for path in itertools.product(range(vocab), repeat=frames):
      if ctc.greedy_collapse(np.array(path), frames) == labels[b].tolist():
        total += np.prod([probs[b, t, path[t]] for t in range(frames)])
    loss = ctc.ctc_losses(jnp.asarray(logits), jnp.array([frames] * 2), jnp.asarray(labels), jnp.array([2, 2]))
    np.testing.assert_allclose(float(loss[b]), -np.log(total), rtol=1e-5)
  # padding frames and label slots are ignored
  padded = ctc.ctc_losses(jnp.asarray(np.concatenate([logits, logits[:, :2]], 1)), jnp.array([frames] * 2),
                          jnp.asarray(np.pad(labels, ((0, 0), (0, 3)))), jnp.array([2, 2]))
  np.testing.assert_allclose(padded, loss, rtol=1e-5)


def test_greedy_decoding_on_hand_made_ids():
  vocab = ctc.Vocabulary(" ab")
  # ids: 0 blank, 1 space, 2 a, 3 b
  ids = np.array([[2, 2, 0, 2, 3, 3, 1, 0, 3, 0, 2, 2], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
  assert ctc.greedy_decode(vocab, ids, np.array([12, 12])) == ["aab ba", ""]
  assert ctc.greedy_decode(vocab, ids, np.array([5, 0])) == ["aab", ""]
  logits = np.full((1, 4, 4), -5.0)
  logits[0, [0, 1, 2, 3], [3, 3, 0, 3]] = 5.0
  assert ctc.greedy_decode(vocab, logits.argmax(-1), np.array([4])) == ["bb"]


def test_error_rates_on_hand_made_pairs():
  counts = ctc.error_counts(["el gato come pan", "hola"], ["el perro come", "hola amigo"])
  # sentence 1: one substitution and one deletion; sentence 2: one insertion; 5 reference words
  assert counts["word_errors"] == 3 and counts["words"] == 5
  assert ctc.error_counts(["abc"], ["abd"]) == {"word_errors": 1, "words": 1, "char_errors": 1, "chars": 3}
  with pytest.raises(ValueError, match="must contain a word"):
    ctc.error_counts([""], ["x"])
  with pytest.raises(ValueError, match="1 references but 2"):
    ctc.error_counts(["a"], ["a", "b"])


def _word_edits(ref: str, hyp: str) -> int:  # plain Levenshtein over words, the reference for jiwer's alignment
  r, h = ref.split(), hyp.split()
  row = list(range(len(h) + 1))
  for i, rw in enumerate(r, 1):
    prev, row[0] = row[0], i
    for j, hw in enumerate(h, 1):
      prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (rw != hw))
  return row[-1]


def _per_utterance(refs, hyps):
  counts = ctc.error_counts(refs, hyps, per_utterance=True)
  return counts["utterance_word_errors"], counts["utterance_words"]


def test_utterance_word_errors_against_levenshtein():
  errors, words = _per_utterance(["el gato come pan", "hola"], ["el perro come", "hola amigo"])
  assert errors.tolist() == [2, 1] and words.tolist() == [4, 1]
  rng = np.random.default_rng(0)
  lexicon = ["sol", "luna", "pan", "agua", "casa", "perro"]
  refs = [" ".join(rng.choice(lexicon, rng.integers(1, 6))) for _ in range(200)]
  hyps = [" ".join(rng.choice(lexicon, rng.integers(0, 7))) for _ in range(200)]
  errors, words = _per_utterance(refs, hyps)
  assert errors.tolist() == [_word_edits(r, h) for r, h in zip(refs, hyps)]
  assert words.tolist() == [len(r.split()) for r in refs]
  counts = ctc.error_counts(refs, hyps)
  assert (errors.sum(), words.sum()) == (counts["word_errors"], counts["words"])


def test_wer_difference_interval_against_a_numpy_bootstrap():
  rng = np.random.default_rng(1)
  words = rng.integers(1, 6, 400)
  a = rng.binomial(words, 0.12)
  b = rng.binomial(words, 0.08)
  out = ctc.wer_difference(a, b, words, resamples=4000)
  assert out["difference"] == pytest.approx((a.sum() - b.sum()) / words.sum(), abs=1e-12)
  picks = np.random.default_rng(2).integers(0, 400, (4000, 400))  # the same statistic, resampled by hand
  diffs = (a[picks].sum(1) - b[picks].sum(1)) / words[picks].sum(1)
  low, high = np.percentile(diffs, [2.5, 97.5])
  width = high - low
  assert abs(out["low"] - low) < 0.1 * width and abs(out["high"] - high) < 0.1 * width
  assert out["low"] < out["difference"] < out["high"]
  same = ctc.wer_difference(a, a, words, resamples=200)
  assert same["difference"] == same["low"] == same["high"] == 0.0
  with pytest.raises(ValueError, match="three equal 1-D arrays"):
    ctc.wer_difference(a, b[:-1], words)


def test_vocabulary_normalizes_maps_and_reports():
  es, en = ctc.Vocabulary.for_language("es"), ctc.Vocabulary.for_language("en")
  assert es.normalize("¡Hola,  Niño!  ¿Qué tal?")[0] == "hola niño qué tal"
  assert en.normalize("Niño's café")[0] == "nino's cafe"
  text, dropped = es.normalize("voilà 日本 ok")
  assert text == "voila ok" and dropped == {"日": 1, "本": 1}
  assert es.decode(es.encode("año")) == "año" and es.size == len(es.symbols) + 1
  with pytest.raises(ValueError, match="not in the vocabulary"):
    es.encode("x日")
  with pytest.raises(ValueError, match="no character vocabulary"):
    ctc.Vocabulary.for_language("tlh")


SMALL_SYNTH = speech_synth.SpeechSynthConfig(num_train=12, num_test=6, max_seconds=2.0, seed=3)


def test_synthesizer_is_deterministic_and_holds_out_voices(tmp_path):
  first = speech_synth.generate(SMALL_SYNTH, tmp_path / "a")
  # eSpeak NG state left by other calls in this process must not reach a build
  speech_synth.ESpeak.get().synthesize("hola luna", "es+f2", 200, 70, seed=11)
  second = speech_synth.generate(SMALL_SYNTH, tmp_path / "b")
  for split in ("train", "test"):  # every choice is the seed's, and so is every sample
    for key in ("text", "voice", "audio", "offsets", "speech_mask"):
      np.testing.assert_array_equal(first[split][key], second[split][key])
  cached = speech_synth.generate(SMALL_SYNTH, tmp_path / "a")  # from the cache file
  np.testing.assert_array_equal(cached["test"]["audio"], first["test"]["audio"])
  train_voices, test_voices = speech_synth.voice_split(SMALL_SYNTH)
  assert not set(train_voices) & set(test_voices) and len(test_voices) == SMALL_SYNTH.test_voices
  assert set(first["train"]["voice"]) <= set(train_voices) and set(first["test"]["voice"]) <= set(test_voices)
  assert not set(first["train"]["text"]) & set(first["test"]["text"])
  other = speech_synth.generate(speech_synth.SpeechSynthConfig(num_train=12, num_test=6, max_seconds=2.0, seed=4),
                                tmp_path / "a")
  assert not np.array_equal(other["test"]["text"], first["test"]["text"])
  wave, mask, text = speech_synth.utterance(first["test"], 0)
  assert len(wave) == len(mask) <= 2 * 16000 and 0 < mask.mean() < 1 and text == first["test"]["text"][0]


def test_synthesizer_vocabulary_size_and_silence_padding(tmp_path):
  for language in ("es", "en"):  # every built-in word is spelled in the CTC alphabet, and no word repeats
    vocab = ctc.Vocabulary.for_language(language)
    words = speech_synth.WORDS[language]
    assert len(set(words)) == len(words) > speech_synth.BASE_VOCABULARY
    for word in words:
      assert vocab.normalize(word) == (word, {})
  config = speech_synth.SpeechSynthConfig(num_train=40, num_test=6, max_seconds=2.5, num_words=100,
                                          pad_seconds=(0.4, 0.45), seed=5)
  arrays = speech_synth.generate(config, tmp_path)
  used = {w for split in arrays.values() for text in split["text"] for w in str(text).split()}
  assert used <= set(speech_synth.WORDS["es"][:100]) and used - set(speech_synth.WORDS["es"][:48])
  for i in range(len(arrays["train"]["text"])):
    wave, mask, _ = speech_synth.utterance(arrays["train"], i)
    speech = np.flatnonzero(mask)  # speech only after the leading pad and before the trailing one
    assert speech[0] > 0.4 * 16000 - 160 and len(wave) - speech[-1] > 0.4 * 16000 - 160
  small = speech_synth.generate(dataclasses.replace(SMALL_SYNTH, num_train=30), tmp_path)
  assert {w for t in small["train"]["text"] for w in str(t).split()} <= set(speech_synth.WORDS["es"][:48])
  for bad, match in ((dict(num_words=0), "num_words must be in 1..408"),
                     (dict(language="en", num_words=1000), "num_words must be in 1..338"),
                     (dict(pad_seconds=(0.5, 0.1)), "pad_seconds")):
    with pytest.raises(ValueError, match=match):
      speech_synth.SpeechSynthConfig(**bad).validate()


def test_synthesizer_noise_follows_the_snr(tmp_path):
  """With fixed 0.3 s pads and no gain, the leading pad is noise alone and the rest of the clip's power
  over the clean span is speech plus that noise: the SNR measured from them is the one asked for."""
  lead = int(0.3 * speech_synth.SAMPLE_RATE)
  for snr in (0.0, 20.0):
    config = dataclasses.replace(SMALL_SYNTH, num_train=8, snr_db=(snr, snr), gain_db=(0.0, 0.0), pad_seconds=(0.3, 0.3))
    arrays = speech_synth.generate(config, tmp_path)["train"]
    for i in range(8):
      wave, _, _ = speech_synth.utterance(arrays, i)
      noise = np.var(wave[:lead])
      speech = np.mean(np.square(wave[lead:-lead])) - noise
      assert abs(10 * np.log10(speech / noise) - snr) < 0.75, (snr, i)  # measured: within 0.43


def test_speech_batches_and_frame_groups(tmp_path):
  data = speech_data.load("speech_synth", language="es", data_dir=str(tmp_path), max_seconds=2.0,
                          geometry=GEOMETRY, synth=SMALL_SYNTH)
  batch = next(data.iterator("test", 4, with_masks=True))
  frames = GEOMETRY.num_frames(32000)
  assert batch["audio"].shape == (4, 32000) and batch["speech_frames"].shape == (4, frames)
  for row in range(4):
    n = batch["audio_length"][row]
    assert np.all(batch["audio"][row, n:] == 0) and abs(batch["audio"][row, :n].mean()) < 1e-3
    valid = GEOMETRY.num_frames(n)
    assert not (batch["speech_frames"][row] & batch["silence_frames"][row]).any()
    assert not batch["speech_frames"][row, valid:].any() and batch["speech_frames"][row].any()
    text = data.vocab.decode(batch["label"][row, :batch["label_length"][row]])
    assert text == data.splits["test"].text(row)
  # the train stream is a pure function of (seed, step)
  again = next(data.iterator("train", 4, start_step=3))
  third = list(zip(range(4), data.iterator("train", 4)))[3][1]
  np.testing.assert_array_equal(again["audio"], third["audio"])
  assert sum(len(b["label"]) for b in data.iterator("test", 4)) == SMALL_SYNTH.num_test
  with pytest.raises(ValueError, match="unknown speech dataset"):
    speech_data.load("librispeech", language="es", data_dir=None, max_seconds=2.0, geometry=GEOMETRY)
  with pytest.raises(ValueError, match="shorter than the encoder's receptive field"):
    speech_data.load("speech_synth", language="es", data_dir=None, max_seconds=0.01, geometry=GEOMETRY)


def _common_voice(root, rows, rate=48000):
  import soundfile
  (root / "clips").mkdir(parents=True)
  lines = ["client_id\tpath\tsentence\tup_votes"]
  rng = np.random.default_rng(0)
  for name, sentence, seconds in rows:
    lines.append(f"c\t{name}\t{sentence}\t2")
    if seconds is None:
      (root / "clips" / name).write_bytes(b"not audio at all")
    else:
      soundfile.write(root / "clips" / name, 0.1 * rng.normal(size=int(seconds * rate)), rate)
  for split in ("train", "test"):
    (root / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_common_voice_reader_skips_and_counts(tmp_path, capsys):
  _common_voice(tmp_path, [("a.wav", "¡Hola, señor!", 0.5), ("b.wav", "Buenos días", 1.0),
                           ("bad.wav", "roto", None), ("long.wav", "largo", 3.0), ("short.wav", "corto", 0.01),
                           ("c.wav", "日本", 0.5)])
  data = speech_data.load("commonvoice", language="es", data_dir=str(tmp_path), max_seconds=2.0, geometry=GEOMETRY)
  test = data.splits["test"]
  assert len(test) == 5 and test.skipped["empty transcript"] == 1
  assert "dropped characters outside the vocabulary" in capsys.readouterr().err
  batches = list(data.iterator("test", 8))
  assert len(batches) == 1 and len(batches[0]["label"]) == 2
  assert [data.vocab.decode(l[:n]) for l, n in zip(batches[0]["label"], batches[0]["label_length"])] == [
      "hola señor", "buenos días"]
  assert test.skipped["unreadable clip"] == 1 and test.skipped["longer than --max_audio_seconds"] == 1
  assert test.skipped["shorter than the encoder's receptive field"] == 1
  assert batches[0]["audio_length"][0] == 8000  # 0.5 s resampled from 48 kHz to 16 kHz
  train = next(data.iterator("train", 6))  # skipped clips are replaced by readable ones
  assert len(train["label"]) == 6 and (train["audio_length"] > 0).all()
  with pytest.raises(ValueError, match="with_masks=True needs speech_synth"):
    next(data.iterator("test", 2, with_masks=True))


def test_common_voice_bad_directories(tmp_path):
  load = lambda d: speech_data.load("commonvoice", language="es", data_dir=d, max_seconds=2.0, geometry=GEOMETRY)
  with pytest.raises(ValueError, match="needs --data_dir"):
    load(None)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load(str(tmp_path / "missing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="not a Common Voice language folder"):
    load(str(tmp_path / "empty"))
  root = tmp_path / "cv"
  (root / "clips").mkdir(parents=True)
  (root / "train.tsv").write_text("client_id\tpath\tsentence\nc\ta.wav\thola\n")
  with pytest.raises(FileNotFoundError, match="test.tsv does not exist"):
    load(str(root))
  (root / "test.tsv").write_text("client_id\tpath\tsentence\n")
  with pytest.raises(ValueError, match="has no usable rows"):
    load(str(root))
  (root / "train.tsv").write_text("client_id\tfile\ttext\nc\ta.wav\thola\n")
  with pytest.raises(ValueError, match=r"lacks the column\(s\) \['path', 'sentence'\]"):
    load(str(root))


def test_synth_flags_reach_the_synthesizer():
  from acm_jax.wav2vec2 import task as speech
  synth = speech.synth_config(speech.SpeechConfig(synth_min_snr_db=0.0, synth_words=70, synth_max_pad_seconds=0.8,
                                                  synth_train_utterances=50, synth_test_utterances=7, seed=4))
  assert (synth.snr_db, synth.num_words, synth.pad_seconds, synth.num_train, synth.num_test, synth.seed) == (
      (0.0, 40.0), 70, (0.05, 0.8), 50, 7, 4)
  assert speech.synth_config(speech.SpeechConfig()).cache_name() == dataclasses.replace(
      speech_synth.SpeechSynthConfig(), num_train=12000, num_test=600, num_words=100).cache_name()
