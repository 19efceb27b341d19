"""ImageNet-C: the 15 corruptions of Hendrycks & Dietterich (2019) at severities 1..5.

Two sources, per (corruption, severity):
- prepared: TFDS's `<dataset>_corrupted/<corruption>_<severity>` in --data_dir (for
  tfds:imagenet2012, `imagenet2012_corrupted`, as `tfds build` writes it);
- on the fly: the clean evaluation images (already resized and centre-cropped,
  as ImageNet-C corrupts them) corrupted here in numpy/scipy/PIL, with the
  constants of the ImageNet-C code. All 15 have an on-the-fly version; frost
  needs ImageNet-C's frost pictures (see `frost_pictures`). Where ImageNet-C
  calls OpenCV or ImageMagick, scipy does the same operation (Gaussian filters,
  affine warps, interpolation); ImageMagick's motion blur, glass blur's pixel
  shuffle and fog's plasma fractal have no library equivalent and are written
  here. Deviations: results are truncated to uint8 without ImageNet-C's final
  JPEG (quality 85) re-encoding; brightness goes through matplotlib's HSV
  conversion instead of skimage's; elastic_transform's constants, fractions of
  the image side in ImageNet-C, scale with the image (equal at 224 px); and
  the random draws differ from ImageNet-C's, so no single image matches theirs.

mCE: per corruption, the model's top-1 errors summed over severities divided by
the dense model's; mCE is the mean over corruptions (ImageNet-C normalises by
AlexNet; here the reference is the model before ACMization).
"""

from __future__ import annotations

import functools
import importlib.util
import io
import os

import numpy as np

NAMES = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
         "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
         "jpeg_compression")
SEVERITIES = (1, 2, 3, 4, 5)


def parse(corruptions: str, severities: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """`--corruptions=all|name,...` and `--severities=1,...` checked against the 15 names and 1..5."""
  names = NAMES if corruptions.strip() == "all" else tuple(c.strip() for c in corruptions.split(","))
  bad = [c for c in names if c not in NAMES]
  if bad or not names:
    raise ValueError(f"--corruptions: unknown {bad or corruptions!r}; expected 'all' or comma-separated names "
                     f"among {NAMES}")
  try:
    levels = tuple(int(s) for s in severities.split(","))
  except ValueError:
    levels = ()
  if not levels or any(s not in SEVERITIES for s in levels):
    raise ValueError(f"--severities must be comma-separated integers in 1..5, got {severities!r}")
  return names, levels


def prepared_name(dataset: str, corruption: str, severity: int) -> str | None:
  """The TFDS name of the prepared corrupted set of a `tfds:` dataset, or None for other datasets."""
  if not dataset.startswith("tfds:"):
    return None
  return f"{dataset[len('tfds:'):]}_corrupted/{corruption}_{severity}"


# --- on the fly: float images in [0, 1], (H, W, 3) ---------------------------------------------


def _gaussian_noise(x, s, rng):
  return x + rng.normal(size=x.shape, scale=(0.08, 0.12, 0.18, 0.26, 0.38)[s - 1])


def _shot_noise(x, s, rng):
  c = (60, 25, 12, 5, 3)[s - 1]
  return rng.poisson(x * c) / c


def _impulse_noise(x, s, rng):  # skimage's random_noise(mode="s&p"): half salt, half pepper
  amount = (0.03, 0.06, 0.09, 0.17, 0.27)[s - 1]
  flipped = rng.uniform(size=x.shape) <= amount
  salted = rng.uniform(size=x.shape) <= 0.5
  return np.where(flipped, salted.astype(x.dtype), x)


def _disk(radius: float, alias_blur: float) -> np.ndarray:
  """ImageNet-C's aliased disk, smoothed by a Gaussian of sigma `alias_blur` (cv2.GaussianBlur)."""
  from scipy import ndimage
  half = 8 if radius <= 8 else radius
  taps = 3 if radius <= 8 else 5
  grid = np.arange(-half, half + 1)
  disk = (grid[:, None] ** 2 + grid[None, :] ** 2 <= radius ** 2).astype(np.float32)
  disk /= disk.sum()
  offsets = np.arange(taps) - taps // 2
  gauss = np.exp(-offsets ** 2 / (2 * alias_blur ** 2))
  gauss /= gauss.sum()
  for axis in (0, 1):
    disk = ndimage.correlate1d(disk, gauss, axis=axis, mode="mirror")
  return disk


def _defocus_blur(x, s, rng):
  from scipy import ndimage
  kernel = _disk(*((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))[s - 1])
  return np.stack([ndimage.correlate(x[..., c], kernel, mode="mirror") for c in range(3)], -1)


def _clipped_zoom(x, factor):
  from scipy import ndimage
  h = x.shape[0]
  ch = int(np.ceil(h / factor))
  top = (h - ch) // 2
  zoomed = ndimage.zoom(x[top:top + ch, top:top + ch], (factor, factor, 1), order=1)
  trim = (zoomed.shape[0] - h) // 2
  return zoomed[trim:trim + h, trim:trim + h]


def _zoom_blur(x, s, rng):
  factors = (np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01), np.arange(1, 1.21, 0.02),
             np.arange(1, 1.26, 0.02), np.arange(1, 1.31, 0.03))[s - 1]
  x = x.astype(np.float32)
  out = np.zeros_like(x)
  for factor in factors:
    out += _clipped_zoom(x, factor)
  return (x + out) / (len(factors) + 1)


def _glass_blur(x, s, rng):
  from scipy import ndimage
  sigma, reach, rounds = ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))[s - 1]
  blurred = np.uint8(ndimage.gaussian_filter(x, (sigma, sigma, 0), mode="nearest") * 255)
  h, w = x.shape[:2]
  flat = blurred.reshape(h * w, -1)[_glass_shuffle(h, w, reach, rounds, rng)].reshape(blurred.shape)
  return ndimage.gaussian_filter(flat / 255.0, (sigma, sigma, 0), mode="nearest")


def _glass_shuffle(h: int, w: int, reach: int, rounds: int, rng) -> np.ndarray:
  """The flat source index of every pixel after ImageNet-C's local shuffle: rows from h - reach down to
  reach + 1, columns likewise, each pixel takes the value then at an offset drawn from [-reach, reach).
  ImageNet-C meant a swap, but its tuple assignment of numpy views copies one way; its published images
  have that copy, so it is reproduced. Tracked on indices, so the sequential loop touches no pixels."""
  rows = np.arange(h - reach, reach, -1)
  cols = np.arange(w - reach, reach, -1)
  targets = (rows[:, None] * w + cols[None, :]).ravel()
  source = list(range(h * w))
  for _ in range(rounds):
    offsets = rng.integers(-reach, reach, size=(targets.size, 2))
    for t, o in zip(targets.tolist(), (offsets[:, 0] * w + offsets[:, 1]).tolist()):
      source[t] = source[t + o]
  return np.asarray(source)


def _motion_blur_magick(x: np.ndarray, radius: int, sigma: float, angle: float) -> np.ndarray:
  """ImageMagick's motion blur (what ImageNet-C calls through Wand): each pixel becomes a weighted sum
  of the 2 * radius + 1 pixels on the ray from it at `angle` degrees (rows grow downwards), weights a
  one-sided Gaussian normalised to 1, pixels beyond the border repeating the edge. (H, W, ...) -> same."""
  taps = np.arange(2 * radius + 1)
  weights = np.exp(-taps ** 2 / (2 * sigma ** 2))
  weights /= weights.sum()
  drow = np.ceil(taps * np.sin(np.deg2rad(angle)) - 0.5).astype(int)
  dcol = np.ceil(taps * np.cos(np.deg2rad(angle)) - 0.5).astype(int)
  h, w = x.shape[:2]
  pad = len(taps)
  padded = np.pad(x, ((pad, pad), (pad, pad)) + ((0, 0),) * (x.ndim - 2), mode="edge")
  out = np.zeros(x.shape, np.float64)
  for weight, r, c in zip(weights, drow, dcol):
    out += weight * padded[pad + r:pad + r + h, pad + c:pad + c + w]
  return out


def _motion_blur(x, s, rng):
  radius, sigma = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))[s - 1]
  return _motion_blur_magick(x, radius, sigma, rng.uniform(-45, 45))


def _gray(x):  # OpenCV's RGB2GRAY weights
  return x @ np.array([0.299, 0.587, 0.114], x.dtype)


def _snow(x, s, rng):
  mean, std, zoom, threshold, radius, sigma, keep = (
      (0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
      (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55))[s - 1]
  flakes = _clipped_zoom(rng.normal(mean, std, size=x.shape[:2] + (1,)), zoom)[..., 0]
  flakes = np.where(flakes < threshold, 0.0, flakes)
  flakes = np.floor(np.clip(flakes, 0, 1) * 255)  # ImageNet-C hands ImageMagick an 8-bit picture
  flakes = np.round(_motion_blur_magick(flakes, radius, sigma, rng.uniform(-135, -45))) / 255
  flakes = flakes[..., None]
  x = keep * x + (1 - keep) * np.maximum(x, _gray(x)[..., None] * 1.5 + 0.5)
  return x + flakes + np.rot90(flakes, k=2)


def frost_pictures(directory: str | None = None) -> tuple[np.ndarray, ...]:
  """ImageNet-C's frost pictures (frost1.png ... frost6.jpg) as uint8 RGB arrays, from `directory`, or
  else from the `frost` folder of an installed `imagecorruptions` package (found, not imported: it
  imports OpenCV). A ValueError when there are none."""
  if directory is None:
    spec = importlib.util.find_spec("imagecorruptions")
    if spec is not None and spec.origin is not None:
      directory = os.path.join(os.path.dirname(spec.origin), "frost")
  return _load_frost(directory)


@functools.lru_cache(maxsize=4)
def _load_frost(directory: str | None) -> tuple[np.ndarray, ...]:
  from PIL import Image
  found = directory is not None and os.path.isdir(directory)
  names = sorted(f for f in os.listdir(directory) if f.startswith("frost")) if found else []
  if not names:
    raise ValueError(f"frost needs ImageNet-C's frost pictures (frost1.png ... frost6.jpg of the ImageNet-C "
                     f"code, also shipped in the imagecorruptions package): none in {directory!r}; pass their "
                     f"folder with --frost_pictures")
  return tuple(np.asarray(Image.open(os.path.join(directory, f)).convert("RGB")) for f in names)


def _frost(x, s, rng, pictures):
  image_weight, frost_weight = ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))[s - 1]
  picture = pictures[rng.integers(min(5, len(pictures)))]  # ImageNet-C's randint(5) never picks the sixth
  h, w = x.shape[:2]
  if picture.shape[0] <= h or picture.shape[1] <= w:
    from PIL import Image
    scale = max((h + 1) / picture.shape[0], (w + 1) / picture.shape[1])
    size = (int(np.ceil(picture.shape[1] * scale)), int(np.ceil(picture.shape[0] * scale)))
    picture = np.asarray(Image.fromarray(picture).resize(size, Image.BILINEAR))
  top, left = rng.integers(picture.shape[0] - h), rng.integers(picture.shape[1] - w)
  return image_weight * x + frost_weight * picture[top:top + h, left:left + w] / 255


def _plasma(size: int, decay: float, rng) -> np.ndarray:
  """ImageNet-C's plasma fractal: diamond-square on a (size, size) torus, size a power of two; each new
  point is the mean of its four neighbours plus wibble * U(-wibble, wibble), wibble starting at 100 and
  divided by `decay` per octave; rescaled to [0, 1]."""
  grid = np.zeros((size, size))
  step, wibble = size, 100.0
  while step >= 2:
    half = step // 2
    corners = grid[::step, ::step]
    around = corners + np.roll(corners, -1, 0) + np.roll(corners, -1, 1) + np.roll(corners, (-1, -1), (0, 1))
    grid[half::step, half::step] = around / 4 + wibble * rng.uniform(-wibble, wibble, around.shape)
    centres = grid[half::step, half::step]
    # edge midpoints: two corners along the edge, the centres on either side of it
    across_rows = corners + np.roll(corners, -1, 1) + centres + np.roll(centres, 1, 0)
    grid[::step, half::step] = across_rows / 4 + wibble * rng.uniform(-wibble, wibble, around.shape)
    across_cols = corners + np.roll(corners, -1, 0) + centres + np.roll(centres, 1, 1)
    grid[half::step, ::step] = across_cols / 4 + wibble * rng.uniform(-wibble, wibble, around.shape)
    step, wibble = half, wibble / decay
  grid -= grid.min()
  return grid / grid.max()


def _fog(x, s, rng):
  strength, decay = ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))[s - 1]
  h, w = x.shape[:2]
  size = 1 << int(np.ceil(np.log2(max(h, w, 2))))  # ImageNet-C: 256 for its 224 px images
  brightest = x.max()
  x = x + strength * _plasma(size, decay, rng)[:h, :w, None]
  return x * brightest / (brightest + strength)


def _affine_warp(x: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """OpenCV's warpAffine(getAffineTransform(src, dst)) with bilinear interpolation and mirrored borders:
  the affine map taking the three (x, y) points `src` to `dst` moves the image. (H, W, C) -> same."""
  from scipy import ndimage
  forward = np.linalg.solve(np.hstack([src, np.ones((3, 1))]), dst).T  # (2, 3) on (x, y, 1)
  inverse = np.linalg.inv(forward[:, :2])
  swap = np.array([[0, 1], [1, 0]])  # (x, y) <-> (row, col)
  matrix = np.eye(3)
  matrix[:2, :2] = swap @ inverse @ swap
  offset = np.zeros(3)
  offset[:2] = -swap @ inverse @ forward[:, 2]
  return ndimage.affine_transform(x, matrix, offset, order=1, mode="mirror")


def _elastic_transform(x, s, rng):
  from scipy import ndimage
  h, w = x.shape[:2]
  fractions = ((2, 0.7, 0.1), (2, 0.08, 0.2), (0.05, 0.01, 0.02), (0.07, 0.01, 0.02), (0.12, 0.01, 0.02))[s - 1]
  alpha, sigma, jitter = np.array(fractions) * 244 * min(h, w) / 224  # ImageNet-C's 244 (sic) at 224 px
  centre = np.array([h // 2, w // 2], np.float64)
  side = min(h, w) // 3
  src = np.array([centre + side, [centre[0] + side, centre[1] - side], centre - side])
  x = _affine_warp(x, src, src + rng.uniform(-jitter, jitter, size=src.shape))
  drow, dcol = (ndimage.gaussian_filter(rng.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3) * alpha
                for _ in range(2))
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  coords = np.stack([rows + drow, cols + dcol])
  return np.stack([ndimage.map_coordinates(x[..., c], coords, order=1, mode="reflect") for c in range(x.shape[-1])],
                  -1)


def _brightness(x, s, rng):
  from matplotlib import colors
  hsv = colors.rgb_to_hsv(np.clip(x, 0, 1))
  hsv[..., 2] = np.clip(hsv[..., 2] + (0.1, 0.2, 0.3, 0.4, 0.5)[s - 1], 0, 1)
  return colors.hsv_to_rgb(hsv)


def _contrast(x, s, rng):
  means = x.mean(axis=(0, 1), keepdims=True)
  return (x - means) * (0.4, 0.3, 0.2, 0.1, 0.05)[s - 1] + means


def _pil(x):
  from PIL import Image
  return Image.fromarray(np.uint8(np.clip(x, 0, 1) * 255))


def _pixelate(x, s, rng):
  from PIL import Image
  h, w = x.shape[:2]
  c = (0.6, 0.5, 0.4, 0.3, 0.25)[s - 1]
  small = _pil(x).resize((int(w * c), int(h * c)), Image.BOX)
  return np.asarray(small.resize((w, h), Image.BOX), np.float32) / 255


def _jpeg_compression(x, s, rng):
  from PIL import Image
  buf = io.BytesIO()
  _pil(x).save(buf, "JPEG", quality=(25, 18, 15, 10, 7)[s - 1])
  return np.asarray(Image.open(buf), np.float32) / 255


ON_THE_FLY = {"gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
              "defocus_blur": _defocus_blur, "glass_blur": _glass_blur, "motion_blur": _motion_blur,
              "zoom_blur": _zoom_blur, "snow": _snow, "frost": _frost, "fog": _fog, "brightness": _brightness,
              "contrast": _contrast, "elastic_transform": _elastic_transform, "pixelate": _pixelate,
              "jpeg_compression": _jpeg_compression}


def corrupt(images: np.ndarray, corruption: str, severity: int, seed: int = 0,
            frost_dir: str | None = None) -> np.ndarray:
  """uint8 (n, H, W, 3) -> uint8 (n, H, W, 3), each image corrupted on its own (noise drawn from seed);
  frost's pictures come from `frost_pictures(frost_dir)`."""
  if corruption not in ON_THE_FLY:
    raise ValueError(f"unknown corruption {corruption!r}; expected one of {NAMES}")
  if severity not in SEVERITIES:
    raise ValueError(f"severity must be in 1..5, got {severity!r}")
  rng = np.random.default_rng([seed, NAMES.index(corruption), severity])
  fn = ON_THE_FLY[corruption]
  if corruption == "frost":
    fn = functools.partial(fn, pictures=frost_pictures(frost_dir))
  out = [np.uint8(np.clip(fn(image.astype(np.float32) / 255, severity, rng), 0, 1) * 255) for image in images]
  return np.stack(out) if out else np.asarray(images)


def mce(errors: dict[str, dict[int, float]], dense_errors: dict[str, dict[int, float]]) -> dict[str, float]:
  """{corruption: CE} and "mCE": a model's errors per corruption summed over severities, over the dense
  model's; the mean over corruptions."""
  ce = {c: sum(errors[c].values()) / max(sum(dense_errors[c].values()), 1e-12) for c in errors}
  return {**ce, "mCE": float(np.mean(list(ce.values())))}
