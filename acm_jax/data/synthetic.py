"""The embedded default: a generated image-classification set, no download.

Each image shows one object at a random position, scale and rotation (a circle,
square, triangle, cross or ring) on a textured background, and in half of the
images also a flat grey distractor object. Two tasks decide the class:

- "glyphs" (the default): the object is filled with one of `num_glyphs` (1000)
  random grey-level glyphs of `glyph_size` x `glyph_size` pixels (4: one ViT-tiny
  patch), tiled from the image's top-left corner, over a random colour; glyph i
  belongs to class i mod num_classes. Every patch inside the object shows the same
  glyph, and reading its class is a lookup among 1000 patterns, a job for the
  MLPs: from scratch, a ViT-tiny with MLP width 128 instead of 256 loses 14 points
  (66.9 vs 81.1 top-1 after 1000 steps). Background tokens (smooth gradients,
  low-contrast noise, dull colours) and the distractor carry no class information,
  so tokens differ in how much computation they need.
- "shapes": a flat coloured object; the class is (shape, colour family): 5 shapes
  times 2 colour families (warm, cool) by default, 3 or 4 families (adding green,
  purple) for 15 or 20 classes, 1 for 5. Neither shape nor colour alone gives the
  class. Here the MLPs' width hardly matters (width 128: 62.6, width 256: 63.0
  after 1000 steps): the set of the 2026-11-24..26 embedded results.

`generate` is deterministic given the config. Examples come in chunks of
`chunk_size`, each drawn from its own child seed (`generate_chunk`), so a set
can also be generated piece by piece on demand (`acm_jax.data.synthetic_stream`).
Images are stored as uint8 (30k 32x32 images: 92 MB) and turned into float32 in
[-1, 1] per batch by `normalize`. `object_mask` marks the pixels of the class object only; the
distractor is marked separately in `distractor_mask`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import math
import os
import statistics
import tempfile
import threading
from typing import Iterator

import numpy as np

try:  # a core dependency; optional here so that a machine without it (an offline GPU host) still generates
  import threadpoolctl
except ImportError:  # pragma: no cover
  threadpoolctl = None

TASKS = ("glyphs", "shapes")
SHAPES = ("circle", "square", "triangle", "cross", "ring")
# hue intervals (fractions of the colour wheel); the first two are far apart on the wheel
COLOUR_FAMILIES = {"warm": (-0.04, 0.12), "cool": (0.50, 0.68), "green": (0.24, 0.40), "purple": (0.76, 0.90)}
CHUNK = 1000  # examples generated from one child seed by default (the data depends on the chunk size)
BLOCK = 32  # images whose noise is drawn at once within a chunk (the data do not depend on it)
# a chunk's fine background noise of float32 normals up to this size is kept from its first draw (1,000 images
# at 32 px: 12 MB); larger chunks draw it twice rather than hold it (1,000 images at 224 px: 600 MB)
FINE_NOISE_KEPT_BYTES = 64 * 2**20
# Images larger than this many pixels a side take their fine background noise and shading noise as 16-bit
# draws mapped through a table of normal quantiles (`normal_quantiles`) instead of numpy's float32 normals:
# at 224 px those normals were two thirds of a chunk's cost (~11 ns each, 9.6 M of them per 64 images), the
# 16-bit draws and the lookup cost ~2 ns, and since their count is known each image's are drawn only when it
# is composited. Other numbers, so other images above this size; up to it (the embedded default's 32 px, every
# recorded result, every set held whole: data.STREAM_ABOVE_PIXELS) the normals of before, bit for bit.
QUANTILE_NOISE_ABOVE = 64
SPLIT_INDEX = {"train": 0, "test": 1}
# set ACM_JAX_CACHE to a folder to cache generated sets there as .npz, or to "" to keep them in memory only
CACHE_DIR = os.environ.get("ACM_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "acm_jax"))


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  image_size: int = 32
  num_train: int = 30000
  num_test: int = 5000
  num_classes: int = 10
  seed: int = 0
  distractor_probability: float = 0.5
  object_scale: tuple[float, float] = (0.22, 0.35)  # radius range of the class object, fraction of image_size
  task: str = "glyphs"  # see the module docstring
  num_glyphs: int = 1000
  glyph_size: int = 4  # pixels; the tiny ViT's patch size
  glyph_contrast: float = 0.3  # amplitude of the glyph over the object's colour, on the [0, 1] scale
  chunk_size: int = CHUNK  # examples drawn from one child seed

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"synthetic task must be one of {TASKS}, got {self.task!r}")
    if self.task == "shapes":
      valid_classes = tuple(len(SHAPES) * f for f in range(1, len(COLOUR_FAMILIES) + 1))
      if self.num_classes not in valid_classes:
        raise ValueError(f"synthetic num_classes must be one of {valid_classes} (5 shapes x colour families), "
                         f"got {self.num_classes}")
    else:
      if not 2 <= self.num_classes <= self.num_glyphs:
        raise ValueError(f"synthetic num_classes must be in 2..num_glyphs ({self.num_glyphs}) for the glyph task, "
                         f"got {self.num_classes}")
      if self.glyph_size < 2:
        raise ValueError(f"glyph_size must be at least 2 pixels, got {self.glyph_size}")
      if not 0.0 < self.glyph_contrast <= 0.5:
        raise ValueError(f"glyph_contrast must be in (0, 0.5], got {self.glyph_contrast}")
    if self.image_size < 16:
      raise ValueError(f"synthetic image_size must be at least 16 pixels, got {self.image_size}")
    if self.chunk_size < 1:
      raise ValueError(f"synthetic chunk_size must be >= 1, got {self.chunk_size}")
    if self.num_train < 1 or self.num_test < 1:
      raise ValueError(f"synthetic num_train and num_test must be >= 1, got {self.num_train} / {self.num_test}")
    if not 0.0 <= self.distractor_probability <= 1.0:
      raise ValueError(f"distractor_probability must be in [0, 1], got {self.distractor_probability}")

  @property
  def num_families(self) -> int:
    return self.num_classes // len(SHAPES)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Vectorised HSV -> RGB, all in [0, 1], hue taken modulo 1; returns (..., 3)."""
  k = (np.array([5.0, 3.0, 1.0], np.float32) + 6.0 * (h[..., None] % 1.0)) % 6.0
  return v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _ring(u: np.ndarray, w: np.ndarray) -> np.ndarray:
  r = np.hypot(u, w)
  return (r <= 1.0) & (r >= 0.5)


# (u, w): pixel coordinates in the object's rotated frame in units of its radius; |(u, w)| only where needed
# (hypot is the costliest operation of a mask)
_SHAPE_TESTS = (
    lambda u, w: np.hypot(u, w) <= 1.0,                                                     # circle
    lambda u, w: np.maximum(np.abs(u), np.abs(w)) <= 0.85,                                  # square
    lambda u, w: (w <= 0.7) & (w >= -1.0) & (np.abs(u) <= (w + 1.0) * 0.6),                 # triangle
    lambda u, w: (np.minimum(np.abs(u), np.abs(w)) <= 0.33) & (np.maximum(np.abs(u), np.abs(w)) <= 1.0),  # cross
    _ring,                                                                                  # ring
)
# no shape reaches further from its centre than this many radii (the triangle's corners: |(1.02, 0.7)| = 1.237)
SHAPE_REACH = 1.25


def shape_mask(shape: int, cx: np.float32, cy: np.float32, radius: np.float32, cos: np.float32, sin: np.float32,
               size: int) -> tuple[tuple[slice, slice], np.ndarray]:
  """Shape id `shape` in a size x size image (centre and radius in pixels, float32 like the rotation's
  cos and sin) -> its box, the rows and columns that can hold its pixels, and its (rows, cols) boolean
  mask over the box; the shape has no pixel outside it. Pixel x has its centre at x + 0.5: those left
  out lie more than SHAPE_REACH * radius + 0.5 pixels from the centre, a margin far above the float32
  rounding of the rotated coordinates. Each pixel's test is the float32 arithmetic of the whole-image
  masks before, so the box changes no bit."""
  reach = SHAPE_REACH * float(radius) + 1.0
  ends = [(max(0, math.floor(float(c) - reach)), min(size, math.ceil(float(c) + reach))) for c in (cy, cx)]
  box = tuple(slice(start, max(start, stop)) for start, stop in ends)  # empty, not negative, off the image
  rows, cols = (np.arange(b.start, b.stop, dtype=np.float32) + 0.5 for b in box)  # pixel centres
  dx = cols - cx
  dy = (rows - cy)[:, None]
  u = (cos * dx + sin * dy) / radius
  w = (cos * dy - sin * dx) / radius
  return box, _SHAPE_TESTS[shape](u, w)


@functools.lru_cache(maxsize=1)
def normal_quantiles() -> np.ndarray:
  """(65536,) float32: the standard normal's quantiles at (k + 0.5) / 65536, k = 0..65535, so that a
  uniform 16-bit draw k gives a normal number to 16 bits (cut off beyond 4.32 standard deviations; mean
  0 exactly, standard deviation 0.99999). The lower half computed, the upper half its mirror."""
  lower = [statistics.NormalDist().inv_cdf((k + 0.5) / 65536) for k in range(32768)]
  return np.concatenate([lower, np.negative(lower[::-1])]).astype(np.float32)


def _normal_noise(rng: np.random.Generator, shape: tuple[int, ...], quantiles: bool) -> np.ndarray:
  """Standard normal noise of `shape`: float32 normals, or with `quantiles` uint16 indices into
  `normal_quantiles()` (see QUANTILE_NOISE_ABOVE), four from each 64-bit output of the bit generator
  (half the time of `rng.integers`), low bits first on any machine."""
  if not quantiles:
    return rng.standard_normal(shape, dtype=np.float32)
  count = math.prod(shape)
  raw = rng.bit_generator.random_raw(_raw_outputs(count)).astype("<u8", copy=False)
  return raw.view("<u2")[:count].reshape(shape)


def _raw_outputs(count: int) -> int:
  """The bit generator's 64-bit outputs that `_normal_noise` takes for `count` quantile indices."""
  return -(-count // 4)


def _upsampler(cells: int, size: int) -> np.ndarray:
  """(size, cells) matrix of bilinear interpolation weights from a coarse grid to the image."""
  lo, w_lo, w_hi = _upsampler_rows(cells, size)
  weights = np.zeros((size, cells), np.float32)
  weights[np.arange(size), lo] = w_lo
  weights[np.arange(size), lo + 1] = w_hi
  return weights


def _upsampler_rows(cells: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The two nonzeros of each row of `_upsampler`: (first column (size,), its weight, the next column's
  weight), the weights float32."""
  pos = np.linspace(0, cells - 1, size)
  lo = np.minimum(pos.astype(np.int64), cells - 2)
  return lo, (1 - (pos - lo)).astype(np.float32), (pos - lo).astype(np.float32)


def _upsample(grid: np.ndarray, rows: tuple[np.ndarray, np.ndarray, np.ndarray], out: np.ndarray) -> None:
  """up @ grid @ up.T for grid (..., cells, cells) into out (..., size, size), as float32 products and
  sums of each output's two (then four) terms in a fixed order: the same bits on every CPU. A BLAS
  matmul rounds these sums in the order of whatever kernel OpenBLAS picks for the CPU: the 224 px
  images of the 2026-12-02 generator differed between an earlier session's machine and an AMD EPYC one."""
  lo, w_lo, w_hi = rows
  tall = grid[..., lo, :] * w_lo[:, None] + grid[..., lo + 1, :] * w_hi[:, None]  # (..., size, cells)
  np.multiply(tall[..., lo], w_lo, out=out)
  out += tall[..., lo + 1] * w_hi


def _background_params(rng: np.random.Generator, n: int, size: int) -> dict:
  """The background draws of n images, in the generator's order: dull random colours, linear
  gradients, a coarse noise grid (blobs a few patches wide) and the fine noise: (size, size, 3)
  float32 normals per image, or above QUANTILE_NOISE_ABOVE pixels (3, size, size) uint16 quantile
  indices ("quantiles": true), channels first as the images are composited. The normals are drawn
  block by block, and up to FINE_NOISE_KEPT_BYTES kept ("fine": one array per BLOCK of images); above,
  and always for the quantile indices, `rng` only moves past them (the indices' count of raw draws is
  known, the normals' only by drawing them), and each image's are drawn from the saved "fine_state"
  when it is composited (`_fine_noise_images`): the same numbers, without holding the chunk's noise."""
  f32 = np.float32
  base = _hsv_to_rgb(rng.uniform(0, 1, n).astype(f32), rng.uniform(0.0, 0.35, n).astype(f32),
                     rng.uniform(0.2, 0.8, n).astype(f32))
  angle = rng.uniform(0, 2 * np.pi, n).astype(f32)
  slope = rng.uniform(0.0, 0.25, n).astype(f32)
  amplitude = rng.uniform(0.02, 0.1, (2, n)).astype(f32)
  cells = -(-size // 8) + 1
  coarse = rng.standard_normal((n, 3, cells, cells), dtype=f32) * amplitude[0, :, None, None, None]
  fine_state = copy.deepcopy(rng.bit_generator.state)
  quantiles = size > QUANTILE_NOISE_ABOVE
  # above QUANTILE_NOISE_ABOVE the upsampling is elementwise (`_upsample`: the same bits on every CPU);
  # below, the BLAS matmuls of the embedded sets, whose results every machine seen so far agrees on
  up = _upsampler_rows(cells, size) if quantiles else _upsampler(cells, size)
  keep = not quantiles and n * size * size * 3 * 4 <= FINE_NOISE_KEPT_BYTES
  fine = []
  if quantiles:
    rng.bit_generator.advance(n * _raw_outputs(3 * size * size))
  else:
    for start in range(0, n, BLOCK):
      block = rng.standard_normal((min(BLOCK, n - start), size, size, 3), dtype=f32)
      if keep:
        fine.append(block)
  return {"base": base, "angle": angle, "slope": slope, "fine_amplitude": amplitude[1], "up": up, "coarse": coarse,
          "fine": fine if keep else None, "fine_state": fine_state, "quantiles": quantiles,
          "coords": np.linspace(-1, 1, size, dtype=f32)}


def _fine_noise_images(params: dict, n: int, size: int) -> Iterator[np.ndarray]:
  """The fine noise of each of the n images, in order: the kept arrays' images, or the same numbers
  drawn again from the saved generator state, one image at a time (a generator's normals come out the
  same whether drawn in blocks or one by one)."""
  if params["fine"] is not None:
    for block in params["fine"]:
      yield from block
    return
  fine = np.random.default_rng()
  fine.bit_generator.state = params["fine_state"]
  quantiles = params["quantiles"]
  for _ in range(n):
    yield _normal_noise(fine, (3, size, size) if quantiles else (size, size, 3), quantiles)


def _gradients(params: dict, block: slice) -> tuple[np.ndarray, np.ndarray]:
  """The horizontal and vertical slopes of the linear gradients of images `block`, (count,) each."""
  angle, slope = params["angle"][block], params["slope"][block]
  return slope * np.cos(angle), slope * np.sin(angle)


def _paint_background(canvas: np.ndarray, scratch: np.ndarray, params: dict, index: int, gradient: tuple,
                      fine_noise: np.ndarray) -> None:
  """Image `index`'s background into canvas (3, size, size), channels first as the upsampling matmuls give
  it: (smooth noise + fine noise) + (gradient + base colour). gradient: the image's two slopes
  (`_gradients`); fine_noise: the image's (`_background_params`); scratch: a second (3, size, size)
  float32 buffer. Each image on its own, so that its few float buffers stay in the cache."""
  up, coords, amplitude = params["up"], params["coords"], params["fine_amplitude"][index]
  if params["quantiles"]:
    _upsample(params["coarse"][index], up, canvas)
    # the table scaled, then looked up: the same numbers as the looked-up normals scaled; mode="wrap":
    # 16-bit indices are always in range, and numpy's bounds checks cost a third of the lookup
    canvas += np.take(normal_quantiles() * amplitude, fine_noise, out=scratch, mode="wrap")
  else:
    np.matmul(up @ params["coarse"][index], up.T, out=canvas)
    canvas += np.multiply(fine_noise.transpose(2, 0, 1), amplitude, out=scratch)
  ramp = gradient[0] * coords + (gradient[1] * coords)[:, None]
  canvas += np.add(ramp, params["base"][index, :, None, None], out=scratch)


def _place(rng: np.random.Generator, n: int, size: int, scale: tuple[float, float]):
  radius = (rng.uniform(*scale, n) * size).astype(np.float32)
  margin = radius + 1.0
  cx = rng.uniform(margin, size - margin).astype(np.float32)
  cy = rng.uniform(margin, size - margin).astype(np.float32)
  return cx, cy, radius, rng.uniform(0, 2 * np.pi, n).astype(np.float32)


def glyph_bank(config: SyntheticConfig) -> np.ndarray:
  """(num_glyphs, g, g) float32 grey-level glyphs with zero mean and largest |value| 1, fixed by the seed
  (shared by the train and test splits)."""
  rng = np.random.default_rng([config.seed, 20261126])
  bank = rng.standard_normal((config.num_glyphs, config.glyph_size, config.glyph_size)).astype(np.float32)
  bank -= bank.mean(axis=(1, 2), keepdims=True)
  return bank / np.abs(bank).max(axis=(1, 2), keepdims=True)


def _generate_chunk(config: SyntheticConfig, seed_sequence: np.random.SeedSequence, n: int) -> dict[str, np.ndarray]:
  """n examples from one seed. Every random draw is made for the whole chunk, in a fixed order (the
  data depend on it); the images are then composited one at a time into the uint8 output, channels
  first in two float32 buffers of one image that stay in the cache, each shape's mask computed over its
  box only. Each element sees the float operations of the generator before (whole blocks of images at
  a time; frozen in tests/test_synthetic.py) in the same order on the same dtypes: the same bits. Above
  QUANTILE_NOISE_ABOVE pixels the noise is drawn as quantile indices, and the same operations see the
  looked-up normals."""
  rng = np.random.default_rng(seed_sequence)
  size, f32 = config.image_size, np.float32
  background = _background_params(rng, n, size)
  shape = rng.integers(0, len(SHAPES), n)
  family = rng.integers(0, max(config.num_families, 1), n)  # unused by the glyph task

  # the distractor first, so that the class object is drawn over it where they overlap
  distract = rng.uniform(0, 1, n) < config.distractor_probability
  distractor_shape = rng.integers(0, len(SHAPES), n)
  distractor_place = _place(rng, n, size, (0.10, 0.17))
  grey = rng.uniform(0.3, 0.95, n).astype(f32)

  # the shapes branch draws its colour before placing the object, as the old generator did: same images
  if config.task == "shapes":
    lo, hi = np.array(list(COLOUR_FAMILIES.values()), f32)[family].T
    hue = lo + (hi - lo) * rng.uniform(0, 1, n).astype(f32)
    colour = _hsv_to_rgb(hue, rng.uniform(0.55, 1.0, n).astype(f32), rng.uniform(0.6, 1.0, n).astype(f32))
    place = _place(rng, n, size, config.object_scale)
    label = shape * config.num_families + family
  else:
    place = _place(rng, n, size, config.object_scale)
    glyph = rng.integers(0, config.num_glyphs, n)
    colour = _hsv_to_rgb(rng.uniform(0, 1, n).astype(f32), rng.uniform(0.3, 0.6, n).astype(f32),
                         rng.uniform(0.5, 0.7, n).astype(f32))
    # each object's fill, colour + contrast x glyph, over one glyph cell (n, 3, g, g), channels first
    tiles = colour[:, :, None, None] + config.glyph_contrast * glyph_bank(config)[glyph][:, None]
    rows = np.arange(size) % config.glyph_size  # tiled from the top-left corner: aligned with a g-pixel ViT's patches
    label = glyph % config.num_classes

  fine_noise = _fine_noise_images(background, n, size)
  out = {"image": np.empty((n, size, size, 3), np.uint8), "label": label.astype(np.int32),
         "object_mask": np.zeros((n, size, size), bool), "distractor_mask": np.zeros((n, size, size), bool)}
  canvas, scratch = np.empty((2, 3, size, size), f32)  # one image, channels first
  for start in range(0, n, BLOCK):
    block = slice(start, min(start + BLOCK, n))
    gradients = _gradients(background, block)
    d_rotation, rotation = ((np.cos(p[3][block]), np.sin(p[3][block])) for p in (distractor_place, place))
    if config.task == "shapes":  # the shading noise is the chunk's last draw: drawn block by block, in order
      shade_noise = _normal_noise(rng, (block.stop - start, size, size, 1), background["quantiles"])
    for j, i in enumerate(range(start, block.stop)):
      _paint_background(canvas, scratch, background, i, (gradients[0][j], gradients[1][j]), next(fine_noise))
      if distract[i]:
        d_box, d_mask = shape_mask(distractor_shape[i], *(p[i] for p in distractor_place[:3]),
                                   *(r[j] for r in d_rotation), size)
        np.copyto(canvas[:, d_box[0], d_box[1]], grey[i], where=d_mask)
      box, mask = shape_mask(shape[i], *(p[i] for p in place[:3]), *(r[j] for r in rotation), size)
      if config.task == "shapes":
        shade = shade_noise[j, box[0], box[1], 0]
        if background["quantiles"]:
          shade = normal_quantiles()[shade]
        fill = colour[i, :, None, None] * (1.0 + 0.05 * shade)
      else:
        fill = tiles[i][:, rows[box[0]]][:, :, rows[box[1]]]
      np.copyto(canvas[:, box[0], box[1]], fill, where=mask)
      out["object_mask"][i][box] = mask
      if distract[i]:
        out["distractor_mask"][i][d_box] = d_mask & ~out["object_mask"][i][d_box]
      np.clip(canvas, 0.0, 1.0, out=canvas)
      np.multiply(canvas, 255.0, out=canvas)
      np.rint(canvas, out=out["image"][i].transpose(2, 0, 1), casting="unsafe")  # np.round's rounding
  return out


def split_size(config: SyntheticConfig, split: str) -> int:
  return config.num_train if split == "train" else config.num_test


def num_chunks(config: SyntheticConfig, split: str) -> int:
  return -(-split_size(config, split) // config.chunk_size)


def generate_chunk(config: SyntheticConfig, split: str, index: int) -> dict[str, np.ndarray]:
  """Examples [index * chunk_size, (index + 1) * chunk_size) of `split`, as `generate` holds them.
  Train and test come from separate child seeds: the test set does not change with num_train."""
  seed = np.random.SeedSequence([config.seed, 20261124], spawn_key=(SPLIT_INDEX[split], index))
  start = index * config.chunk_size
  with single_threaded_blas():
    return _generate_chunk(config, seed, min(config.chunk_size, split_size(config, split) - start))


_blas_lock = threading.Lock()
_blas_users = [0, None]  # chunks being generated, the threadpoolctl limiter while any is


@contextlib.contextmanager
def single_threaded_blas():
  """numpy's BLAS on one thread while any chunk is generated (the limit is process-wide: set by the
  first generator thread in, lifted by the last one out). The background upsampling's matmuls are
  tiny, and a multi-threaded OpenBLAS called from several generator threads at once oversubscribes
  the cores: on a loaded 2-core machine one (32, 3, 224, 29) x (29, 224) product took 3.5 ms on one
  BLAS thread and up to 800 ms on two. Same results either way (one thread per product)."""
  if threadpoolctl is None:
    yield
    return
  with _blas_lock:
    if _blas_users[0] == 0:
      _blas_users[1] = threadpoolctl.threadpool_limits(limits=1, user_api="blas")
    _blas_users[0] += 1
  try:
    yield
  finally:
    with _blas_lock:
      _blas_users[0] -= 1
      if _blas_users[0] == 0:
        _blas_users[1].restore_original_limits()


def _generate(config: SyntheticConfig) -> dict[str, dict[str, np.ndarray]]:
  out = {}
  for split in ("train", "test"):
    chunks = [generate_chunk(config, split, i) for i in range(num_chunks(config, split))]
    out[split] = {key: np.concatenate([c[key] for c in chunks]) for key in chunks[0]}
  return out


def _cache_path(config: SyntheticConfig, cache_dir: str) -> str:
  # keyed by this file's source too, so a change to the generator never reads a stale cache
  with open(__file__, "rb") as f:
    key = hashlib.sha1(f.read() + repr(config).encode()).hexdigest()[:16]
  return os.path.join(cache_dir, f"synthetic-{key}.npz")


@functools.lru_cache(maxsize=4)
def generate(config: SyntheticConfig = SyntheticConfig()) -> dict[str, dict[str, np.ndarray]]:
  """{"train": {...}, "test": {...}}, each with "image" (n, H, W, 3) uint8, "label" (n,) int32 in
  [0, num_classes), "object_mask" and "distractor_mask" (n, H, W) bool. Cached in memory per process
  and, unless ACM_JAX_CACHE is "", as an .npz file under it."""
  path = _cache_path(config, CACHE_DIR) if CACHE_DIR else None
  if path and os.path.exists(path):
    try:
      with np.load(path) as f:
        return {split: {key.split("/", 1)[1]: f[key] for key in f.files if key.startswith(split + "/")}
                for split in ("train", "test")}
    except (OSError, ValueError, KeyError):
      pass  # a damaged cache file is regenerated and overwritten below
  out = _generate(config)
  if path:
    try:
      os.makedirs(CACHE_DIR, exist_ok=True)
      # written under a temporary name and renamed: concurrent processes never read half a file
      fd, tmp = tempfile.mkstemp(dir=CACHE_DIR, suffix=".npz")
      with os.fdopen(fd, "wb") as f:
        np.savez(f, **{f"{split}/{key}": v for split, arrays in out.items() for key, v in arrays.items()})
      os.replace(tmp, path)
    except OSError:
      pass  # a read-only home only costs regenerating next time
  return out


def normalize(images: np.ndarray) -> np.ndarray:
  """uint8 images -> float32 in [-1, 1] (the ViT convention, also used for TFDS data).
  In place on one new array: a third of the time of `astype(...) * s - 1`, which allocates three
  (22 against 65 ms for a batch of 128 at 224 px), with the same float32 values."""
  out = images.astype(np.float32)
  out *= np.float32(1 / 127.5)
  out -= np.float32(1.0)
  return out


# every value `normalize` gives, by uint8 input: a lookup on a device gives the same float32 values
# (computed there as x * s - 1, XLA may fuse the two roundings into one)
NORMALIZED = normalize(np.arange(256, dtype=np.uint8))


def normalize_jax(images):
  """`normalize` of a uint8 jax array, on its device (in a jitted step): the same values."""
  import jax.numpy as jnp
  return jnp.asarray(NORMALIZED)[images]


CORRUPTIONS = ("noise", "blur", "contrast")


def corrupt(images: np.ndarray, kind: str, severity: int = 3, seed: int = 0) -> np.ndarray:
  """ImageNet-C-style corruptions of float images in [-1, 1], shape (n, H, W, 3): "noise" (Gaussian,
  std 0.04 * severity of the [0, 1] range), "blur" (Gaussian, sigma 0.3 * severity pixels: scaled
  for 32x32 images), "contrast" (pulled towards each image's mean by 0.17 * severity); severity 1..5."""
  if kind not in CORRUPTIONS:
    raise ValueError(f"unknown corruption {kind!r}; expected one of {CORRUPTIONS}")
  if severity not in range(1, 6):
    raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")
  x = (np.asarray(images, np.float32) + 1.0) / 2.0
  if kind == "noise":
    x = x + np.random.default_rng(seed).normal(0, 0.04 * severity, x.shape)
  elif kind == "blur":
    from scipy.ndimage import gaussian_filter
    x = gaussian_filter(x, sigma=(0, 0.3 * severity, 0.3 * severity, 0))
  else:
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    x = mean + (x - mean) * (1.0 - 0.17 * severity)
  return (np.clip(x, 0, 1) * 2.0 - 1.0).astype(np.float32)
