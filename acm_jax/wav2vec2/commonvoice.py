"""A local Common Voice release directory (no network): `<dir>/{train,dev,test}.tsv` and `<dir>/clips/`.

Point `data_dir` at one language's folder (e.g. cv-corpus-17.0/es). Rows come
from the tsv's `path` and `sentence` columns; clips are decoded with soundfile
(libsndfile reads Common Voice's MP3s), mixed to mono and resampled to 16 kHz.
Transcripts are normalised with the CTC vocabulary: characters it cannot hold
are dropped and reported once per split. A clip that cannot be read, that is
too long for the batch shape or too short for the feature encoder is skipped and
counted in `skipped`, never silently.
"""

from __future__ import annotations

import collections
import csv
import math
import sys
from pathlib import Path

import numpy as np

from acm_jax.wav2vec2.ctc import Vocabulary

SAMPLE_RATE = 16000
SPLIT_FILES = {"train": "train.tsv", "test": "test.tsv", "dev": "dev.tsv"}


def check_dir(data_dir: str | Path | None) -> Path:
  if data_dir is None:
    raise ValueError("--dataset=commonvoice needs --data_dir=<Common Voice language folder with *.tsv and clips/>")
  root = Path(data_dir)
  if not root.is_dir():
    raise FileNotFoundError(f"Common Voice directory {root} does not exist")
  if not any((root / f).is_file() for f in SPLIT_FILES.values()):
    raise FileNotFoundError(f"{root} holds none of {sorted(SPLIT_FILES.values())}: not a Common Voice language folder")
  if not (root / "clips").is_dir():
    raise FileNotFoundError(f"{root} has no clips/ folder")
  return root


def decode_clip(path: Path) -> np.ndarray:
  """float32 mono waveform at 16 kHz; raises on an unreadable file."""
  import soundfile
  from scipy.signal import resample_poly
  wave, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
  wave = wave.mean(axis=1)
  if rate != SAMPLE_RATE:
    g = math.gcd(rate, SAMPLE_RATE)
    wave = resample_poly(wave, SAMPLE_RATE // g, rate // g).astype(np.float32)
  return wave


class CommonVoiceSplit:
  """Rows of one tsv; `load(i)` -> (waveform, None, text) or None for a skipped clip."""

  def __init__(self, data_dir: str | Path, split: str, vocab: Vocabulary, max_samples: int, min_samples: int):
    root = check_dir(data_dir)
    if split not in SPLIT_FILES:
      raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_FILES)}")
    tsv = root / SPLIT_FILES[split]
    if not tsv.is_file():
      raise FileNotFoundError(f"Common Voice split file {tsv} does not exist")
    with tsv.open(newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
      missing = {"path", "sentence"} - set(reader.fieldnames or ())
      if missing:
        raise ValueError(f"{tsv} lacks the column(s) {sorted(missing)} (found {reader.fieldnames})")
      rows = list(reader)
    dropped: collections.Counter = collections.Counter()
    self.items: list[tuple[Path, str]] = []
    self.skipped = collections.Counter()
    for row in rows:
      text, lost = vocab.normalize(row["sentence"] or "")
      dropped.update(lost)
      if not text:
        self.skipped["empty transcript"] += 1
        continue
      self.items.append((root / "clips" / row["path"], text))
    if not self.items:
      raise ValueError(f"{tsv} has no usable rows ({len(rows)} rows, skipped: {dict(self.skipped) or 'none'})")
    if dropped:
      print(f"[commonvoice] {tsv.name}: dropped characters outside the vocabulary: "
            f"{dict(dropped.most_common(12))}", file=sys.stderr)
    self.name, self.max_samples, self.min_samples = tsv.name, max_samples, min_samples

  def __len__(self) -> int:
    return len(self.items)

  def text(self, i: int) -> str:
    return self.items[i][1]

  def load(self, i: int):
    path, text = self.items[i]
    try:
      wave = decode_clip(path)
    except Exception as e:  # soundfile raises several types for missing or corrupt files
      self._skip("unreadable clip", path, e)
      return None
    if len(wave) > self.max_samples:
      self._skip("longer than --max_audio_seconds", path, f"{len(wave) / SAMPLE_RATE:.1f} s")
      return None
    if len(wave) < self.min_samples:
      self._skip("shorter than the encoder's receptive field", path, f"{len(wave)} samples")
      return None
    return wave, None, text

  def _skip(self, reason: str, path: Path, detail) -> None:
    if not self.skipped[reason]:
      print(f"[commonvoice] {self.name}: skipping {path.name} ({reason}: {detail}); further ones are counted",
            file=sys.stderr)
    self.skipped[reason] += 1
