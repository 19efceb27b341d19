"""Speech batches for CTC training, from the synthesised set or Common Voice.

A batch is a dict of numpy arrays with fixed shapes (so steps compile once):
  audio         float32 (batch, max_samples), each utterance zero-mean unit-variance, zero padded
  audio_length  int32 (batch,)
  label         int32 (batch, max_label) character ids (0-padded; see `speech.ctc`)
  label_length  int32 (batch,)
and with `with_masks=True` (synthesised set only), per encoder frame:
  speech_frames, silence_frames  bool (batch, frames): at least half of the
      frame's receptive field is clean speech / none of it is.
Train batches repeat forever and are a pure function of (seed, step); the test
split is one ordered pass.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from acm_jax.wav2vec2 import commonvoice, synth as speech_synth
from acm_jax.wav2vec2.ctc import Vocabulary

DATASETS = ("speech_synth", "commonvoice")


@dataclasses.dataclass(frozen=True)
class FrameGeometry:
  """Where encoder frames sit in the audio: frame t sees samples [t*stride, t*stride + field)."""
  stride: int
  field: int

  def num_frames(self, samples: int) -> int:
    return max((samples - self.field) // self.stride + 1, 0)


class SynthSplit:
  def __init__(self, arrays: dict[str, np.ndarray]):
    self.arrays = arrays

  def __len__(self) -> int:
    return len(self.arrays["text"])

  def text(self, i: int) -> str:
    return str(self.arrays["text"][i])

  def load(self, i: int):
    return speech_synth.utterance(self.arrays, i)


@dataclasses.dataclass(frozen=True)
class SpeechData:
  """One speech dataset: its splits, vocabulary and batch shapes."""
  name: str
  vocab: Vocabulary
  splits: dict
  max_samples: int
  max_label: int
  geometry: FrameGeometry

  @property
  def num_frames(self) -> int:
    return self.geometry.num_frames(self.max_samples)

  def assemble(self, items: list, with_masks: bool) -> dict[str, np.ndarray]:
    n, frames = len(items), self.num_frames
    batch = {"audio": np.zeros((n, self.max_samples), np.float32), "audio_length": np.zeros(n, np.int32),
             "label": np.zeros((n, self.max_label), np.int32), "label_length": np.zeros(n, np.int32)}
    if with_masks:
      batch["speech_frames"] = np.zeros((n, frames), bool)
      batch["silence_frames"] = np.zeros((n, frames), bool)
    for row, (wave, mask, text) in enumerate(items):
      ids = self.vocab.encode(text)[: self.max_label]
      wave = (wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)
      batch["audio"][row, :len(wave)] = wave
      batch["audio_length"][row] = len(wave)
      batch["label"][row, :len(ids)] = ids
      batch["label_length"][row] = len(ids)
      if with_masks:
        if mask is None:
          raise ValueError(f"{self.name} has no speech/silence annotation; with_masks=True needs speech_synth")
        valid = self.geometry.num_frames(len(wave))
        speech = np.concatenate([[0], np.cumsum(mask)])
        starts = np.arange(valid) * self.geometry.stride
        stops = np.minimum(starts + self.geometry.field, len(wave))
        fraction = (speech[stops] - speech[starts]) / (stops - starts)
        batch["speech_frames"][row, :valid] = fraction >= 0.5
        batch["silence_frames"][row, :valid] = fraction == 0
    return batch

  def iterator(self, split: str, batch_size: int, *, seed: int = 0, start_step: int = 0, with_masks: bool = False,
               drop_remainder: bool = False, **_) -> Iterator[dict]:
    """With `acm_jax.data.make_iterator`'s signature (image arguments ignored)."""
    if split not in self.splits:
      raise ValueError(f"unknown split {split!r}; expected one of {sorted(self.splits)}")
    if batch_size < 1 or start_step < 0:
      raise ValueError(f"need batch_size >= 1 and start_step >= 0, got {batch_size}, {start_step}")
    source = self.splits[split]
    n = len(source)
    if split == "train":
      step = start_step
      while True:
        items = []
        for i in _train_indices(n, batch_size, seed, step):
          item = source.load(i)
          tries = 0
          while item is None and tries < n:  # a skipped clip (counted by the source): the next one in order
            i, tries = (i + 1) % n, tries + 1
            item = source.load(i)
          if item is None:
            raise ValueError(f"{self.name}: no readable utterance in the train split")
          items.append(item)
        yield self.assemble(items, with_masks)
        step += 1
    items = []
    for i in range(n):
      item = source.load(i)
      if item is not None:
        items.append(item)
      if len(items) == batch_size:
        yield self.assemble(items, with_masks)
        items = []
    if items and not drop_remainder:
      yield self.assemble(items, with_masks)


def _train_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Indices of the train batch at `step`: consecutive slices of per-epoch permutations."""
  positions = step * batch_size + np.arange(batch_size)
  epochs, offsets = np.divmod(positions, num_examples)
  perms = {e: np.random.default_rng([seed, e]).permutation(num_examples) for e in np.unique(epochs)}
  return np.array([perms[e][o] for e, o in zip(epochs, offsets)])


def load(name: str, *, language: str, data_dir: str | None, max_seconds: float, geometry: FrameGeometry,
         seed: int = 0, synth: speech_synth.SpeechSynthConfig | None = None) -> SpeechData:
  """Validates the dataset and reads its index (synthesising the embedded set on first use)."""
  if name not in DATASETS:
    raise ValueError(f"unknown speech dataset {name!r}; expected one of {DATASETS}")
  vocab = Vocabulary.for_language(language)
  max_samples = int(round(max_seconds * speech_synth.SAMPLE_RATE))
  if max_samples < geometry.field:
    raise ValueError(f"--max_audio_seconds={max_seconds} is shorter than the encoder's receptive field "
                     f"({geometry.field} samples)")
  if name == "speech_synth":
    synth = synth or speech_synth.SpeechSynthConfig(language=language, max_seconds=max_seconds, seed=seed)
    if synth.max_seconds > max_seconds:
      raise ValueError(f"synthesised utterances of up to {synth.max_seconds} s exceed --max_audio_seconds={max_seconds}")
    arrays = speech_synth.generate(synth, data_dir)
    splits = {split: SynthSplit(a) for split, a in arrays.items()}
  else:
    splits = {split: commonvoice.CommonVoiceSplit(data_dir, split, vocab, max_samples, geometry.field)
              for split in ("train", "test")}
  max_label = max(len(s.text(i)) for s in splits.values() for i in range(len(s)))
  return SpeechData(name, vocab, splits, max_samples, max_label, geometry)
