"""The embedded default: a generated image-classification set, no download.

Each 32x32 image shows one coloured object on a textured, desaturated
background, sometimes with a grey distractor object. The class is
(shape, colour family): 5 shapes (circle, square, triangle, cross, ring), drawn
rotated at random positions and scales, times 2 colour families (warm, cool).
Background tokens carry no class information, object tokens carry all of it, so
an adaptive model can spend its compute where the object is. Everything is
deterministic given the seed; `object_mask` marks the object pixels.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross", "ring")
COLOUR_FAMILIES = ("warm", "cool")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  image_size: int = 32
  num_train: int = 20000
  num_test: int = 2000
  seed: int = 0
  distractor_probability: float = 0.5

  @property
  def num_classes(self) -> int:
    return len(SHAPES) * len(COLOUR_FAMILIES)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Vectorised HSV -> RGB, all in [0, 1]; returns (..., 3)."""
  i = np.floor(h * 6.0).astype(np.int32) % 6
  f = h * 6.0 - np.floor(h * 6.0)
  p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
  table = np.stack([np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
  return np.take_along_axis(np.moveaxis(table, 0, -2), i[..., None, None], axis=-2)[..., 0, :]


def _shape_masks(shape: np.ndarray, cx, cy, radius, angle, size: int) -> np.ndarray:
  """(n,) shape ids and geometry -> (n, size, size) boolean masks."""
  coords = np.arange(size, dtype=np.float32) + 0.5
  dx = coords[None, None, :] - cx[:, None, None]
  dy = coords[None, :, None] - cy[:, None, None]
  cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
  u, w = (cos * dx + sin * dy) / radius[:, None, None], (-sin * dx + cos * dy) / radius[:, None, None]
  r = np.sqrt(u * u + w * w)
  masks = np.stack([
      r <= 1.0,                                                        # circle
      np.maximum(np.abs(u), np.abs(w)) <= 0.8,                         # square
      (w <= 0.7) & (np.abs(u) <= (w + 1.0) * 0.6) & (w >= -1.0),       # triangle
      ((np.abs(u) <= 0.33) & (np.abs(w) <= 1.0)) | ((np.abs(w) <= 0.33) & (np.abs(u) <= 1.0)),  # cross
      (r <= 1.0) & (r >= 0.55),                                        # ring
  ])
  return masks[shape, np.arange(len(shape))]


def _backgrounds(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
  """Desaturated gradients plus smooth low-contrast noise: (n, size, size, 3)."""
  hue, sat = rng.uniform(0, 1, n), rng.uniform(0.0, 0.25, n)
  base = _hsv_to_rgb(hue, sat, rng.uniform(0.25, 0.75, n))
  coords = np.linspace(-1, 1, size, dtype=np.float32)
  angle = rng.uniform(0, 2 * np.pi, n)
  ramp = np.cos(angle)[:, None, None] * coords[None, None, :] + np.sin(angle)[:, None, None] * coords[None, :, None]
  ramp = ramp * rng.uniform(0.0, 0.2, n)[:, None, None]
  cells = -(-size // 4)
  coarse = rng.normal(0, 1, (n, cells, cells, 3)).repeat(4, 1).repeat(4, 2)[:, :size, :size]
  noise = 0.5 * coarse + 0.5 * rng.normal(0, 1, (n, size, size, 3))
  noise = noise * rng.uniform(0.02, 0.08, n)[:, None, None, None]
  return base[:, None, None, :] + ramp[..., None] + noise


def _generate_chunk(config: SyntheticConfig, seed_sequence: np.random.SeedSequence, n: int):
  rng = np.random.default_rng(seed_sequence)
  size = config.image_size
  images = _backgrounds(rng, n, size)
  shape = rng.integers(0, len(SHAPES), n)
  family = rng.integers(0, len(COLOUR_FAMILIES), n)
  labels = shape * len(COLOUR_FAMILIES) + family

  def place(scale_low, scale_high):
    radius = rng.uniform(scale_low, scale_high, n) * size
    margin = radius + 1
    cx, cy = rng.uniform(margin, size - margin), rng.uniform(margin, size - margin)
    return cx, cy, radius, rng.uniform(0, 2 * np.pi, n)

  # the distractor first, so the class object is drawn on top of it
  distract = rng.uniform(0, 1, n) < config.distractor_probability
  d_shape = rng.integers(0, len(SHAPES), n)
  d_mask = _shape_masks(d_shape, *place(0.1, 0.16), size) & distract[:, None, None]
  grey = rng.uniform(0.35, 0.9, n)[:, None, None, None]
  images = np.where(d_mask[..., None], grey, images)

  hue = np.where(family == 0, rng.uniform(-0.04, 0.14, n), rng.uniform(0.46, 0.68, n)) % 1.0
  colour = _hsv_to_rgb(hue, rng.uniform(0.55, 1.0, n), rng.uniform(0.6, 1.0, n))
  mask = _shape_masks(shape, *place(0.14, 0.24), size)
  shade = 1.0 + rng.normal(0, 0.05, (n, size, size, 1))
  images = np.where(mask[..., None], colour[:, None, None, :] * shade, images)
  images = np.clip(images, 0.0, 1.0)
  return ((images - 0.5) / 0.5).astype(np.float32), labels.astype(np.int32), mask | d_mask


@functools.lru_cache(maxsize=4)
def generate(config: SyntheticConfig) -> dict[str, dict[str, np.ndarray]]:
  """{"train": {...}, "test": {...}} with "image" (n, H, W, 3) in [-1, 1],
  "label" (n,) int32, "object_mask" (n, H, W) bool. Cached per process."""
  root = np.random.SeedSequence([config.seed, 20261124])
  out = {}
  for split, count, child in zip(("train", "test"), (config.num_train, config.num_test), root.spawn(2)):
    chunks = [_generate_chunk(config, seq, min(1000, count - start))
              for start, seq in zip(range(0, count, 1000), child.spawn((count + 999) // 1000))]
    out[split] = {"image": np.concatenate([c[0] for c in chunks]), "label": np.concatenate([c[1] for c in chunks]),
                  "object_mask": np.concatenate([c[2] for c in chunks])}
  return out


def corrupt(images: np.ndarray, kind: str, severity: int = 3, seed: int = 0) -> np.ndarray:
  """ImageNet-C-style corruptions of [-1, 1] images: "noise", "blur" or "contrast",
  severity 1..5."""
  if not 1 <= severity <= 5:
    raise ValueError(f"severity must be in 1..5, got {severity}")
  x = (images + 1.0) / 2.0
  if kind == "noise":
    x = x + np.random.default_rng(seed).normal(0, 0.04 * severity, x.shape)
  elif kind == "blur":
    from scipy.ndimage import gaussian_filter
    x = gaussian_filter(x, sigma=(0, 0.3 * severity, 0.3 * severity, 0))
  elif kind == "contrast":
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    x = mean + (x - mean) * (1.0 - 0.17 * severity)
  else:
    raise ValueError(f"unknown corruption {kind!r}; expected noise, blur or contrast")
  return (np.clip(x, 0, 1) * 2.0 - 1.0).astype(np.float32)
