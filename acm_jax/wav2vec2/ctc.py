"""Characters in, characters out: the CTC vocabulary, loss, greedy decoding and error rates.

Index 0 is the CTC blank; index i >= 1 is `Vocabulary.symbols[i - 1]`, and the
space separates words. Transcripts are normalised before encoding: lower case,
punctuation dropped, letters outside the vocabulary folded to their base letter
when that one is in it (Spanish keeps á, é, ñ, ...; English folds them), and any
other character dropped and counted, so a caller can report it.
"""

from __future__ import annotations

import collections
import dataclasses
import unicodedata

import jax
import jax.numpy as jnp
import numpy as np
import optax

BLANK = 0

ALPHABETS = {
    "es": " abcdefghijklmnopqrstuvwxyzáéíóúüñ",
    "en": " abcdefghijklmnopqrstuvwxyz'",
}


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  symbols: str

  @classmethod
  def for_language(cls, language: str) -> "Vocabulary":
    if language not in ALPHABETS:
      raise ValueError(f"no character vocabulary for language {language!r}; expected one of {sorted(ALPHABETS)}")
    return cls(ALPHABETS[language])

  @property
  def size(self) -> int:
    """Outputs of the CTC head: the blank and every symbol."""
    return len(self.symbols) + 1

  def normalize(self, text: str) -> tuple[str, collections.Counter]:
    """-> (normalised text, Counter of characters dropped because they have no symbol)."""
    dropped: collections.Counter = collections.Counter()
    out = []
    for char in unicodedata.normalize("NFC", text.lower()):
      if char in self.symbols:
        out.append(char)
      elif char.isspace() or char in "-–—_/":
        out.append(" ")
      else:
        base = unicodedata.normalize("NFKD", char)[0]
        if base in self.symbols and base != " ":
          out.append(base)
        elif not unicodedata.category(char).startswith(("P", "S")):
          dropped[char] += 1
    return " ".join("".join(out).split()), dropped

  def encode(self, text: str) -> np.ndarray:
    """Normalised text -> (chars,) int32 ids; raises on a character without a symbol."""
    index = {c: i + 1 for i, c in enumerate(self.symbols)}
    bad = sorted({c for c in text if c not in index})
    if bad:
      raise ValueError(f"characters {bad} of {text!r} are not in the vocabulary {self.symbols!r}; "
                       "normalize() the text first")
    return np.array([index[c] for c in text], np.int32)

  def decode(self, ids) -> str:
    return "".join(self.symbols[i - 1] for i in ids if i != BLANK)


def ctc_losses(logits: jax.Array, frame_lengths: jax.Array, labels: jax.Array,
               label_lengths: jax.Array) -> jax.Array:
  """Per utterance -log p(labels | audio): logits (batch, frames, vocab), labels (batch, chars) -> (batch,)."""
  logit_paddings = (jnp.arange(logits.shape[1])[None] >= frame_lengths[:, None]).astype(jnp.float32)
  label_paddings = (jnp.arange(labels.shape[1])[None] >= label_lengths[:, None]).astype(jnp.float32)
  return optax.ctc_loss(logits.astype(jnp.float32), logit_paddings, labels, label_paddings, blank_id=BLANK)


def greedy_collapse(frame_ids: np.ndarray, length: int) -> list[int]:
  """Best path -> labels: merge repeated ids, then drop blanks (frames past `length` ignored)."""
  out, previous = [], None
  for i in np.asarray(frame_ids)[:length].tolist():
    if i != previous and i != BLANK:
      out.append(i)
    previous = i
  return out


def greedy_decode(vocab: Vocabulary, frame_ids: np.ndarray, lengths: np.ndarray) -> list[str]:
  """(batch, frames) argmax ids and (batch,) valid frames -> transcripts."""
  return [vocab.decode(greedy_collapse(ids, n)) for ids, n in zip(frame_ids, lengths)]


def error_counts(references: list[str], hypotheses: list[str], per_utterance: bool = False) -> dict:
  """Word and character edit counts (substitutions + deletions + insertions) and
  reference lengths, summed over pairs: WER = word_errors / words. With
  `per_utterance`, also each pair's word edits and reference words (int arrays)."""
  import jiwer
  if len(references) != len(hypotheses):
    raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
  if any(not r.strip() for r in references):
    raise ValueError("every reference transcript must contain a word")
  if not references:
    out = {"word_errors": 0, "words": 0, "char_errors": 0, "chars": 0}
    empty = np.zeros(0, np.int64)
    return out | ({"utterance_word_errors": empty, "utterance_words": empty} if per_utterance else {})
  words = jiwer.process_words(references, hypotheses)
  chars = jiwer.process_characters(references, hypotheses)
  count = lambda o: o.substitutions + o.deletions + o.insertions
  out = {"word_errors": count(words), "words": words.hits + words.substitutions + words.deletions,
         "char_errors": count(chars), "chars": chars.hits + chars.substitutions + chars.deletions}
  if per_utterance:
    out["utterance_word_errors"], out["utterance_words"] = _pair_edits(words.alignments)
  return out


def _pair_edits(alignments) -> tuple[np.ndarray, np.ndarray]:
  """Edits and reference tokens per pair, from jiwer's alignment chunks."""
  errors, lengths = [], []
  for chunks in alignments:
    ref = sum(c.ref_end_idx - c.ref_start_idx for c in chunks)
    inserted = sum(c.hyp_end_idx - c.hyp_start_idx for c in chunks if c.type == "insert")
    matched = sum(c.ref_end_idx - c.ref_start_idx for c in chunks if c.type == "equal")
    errors.append(ref - matched + inserted)
    lengths.append(ref)
  return np.array(errors, np.int64), np.array(lengths, np.int64)


def wer_difference(errors_a, errors_b, words, confidence: float = 0.95, resamples: int = 10_000,
                   seed: int = 0) -> dict[str, float]:
  """WER(a) - WER(b) of two models on the same utterances, with a paired bootstrap
  interval over utterances (scipy.stats.bootstrap, percentile method).

  errors_a, errors_b: per-utterance word errors of each model; words: reference words.
  """
  import scipy.stats
  errors_a, errors_b, words = (np.asarray(x, np.float64) for x in (errors_a, errors_b, words))
  if not errors_a.shape == errors_b.shape == words.shape or errors_a.ndim != 1:
    raise ValueError(f"need three equal 1-D arrays, got shapes {errors_a.shape}, {errors_b.shape}, {words.shape}")
  if len(words) < 2 or words.sum() <= 0:
    raise ValueError("need at least two utterances with reference words")

  def difference(a, b, w, axis=-1):
    return (a.sum(axis) - b.sum(axis)) / np.maximum(w.sum(axis), 1.0)

  result = scipy.stats.bootstrap((errors_a, errors_b, words), difference, paired=True, vectorized=True,
                                 n_resamples=resamples, confidence_level=confidence, method="percentile",
                                 random_state=np.random.default_rng(seed))
  return {"difference": float(difference(errors_a, errors_b, words)), "low": float(result.confidence_interval.low),
          "high": float(result.confidence_interval.high), "confidence": confidence, "utterances": len(words)}
