"""ImageNet-C: the 15 corruptions of Hendrycks & Dietterich (2019) at severities 1..5.

Two sources, per (corruption, severity):
- prepared: TFDS's `<dataset>_corrupted/<corruption>_<severity>` in --data_dir (for
  tfds:imagenet2012, `imagenet2012_corrupted`, as `tfds build` writes it);
- on the fly: the clean evaluation images (already resized and centre-cropped,
  as ImageNet-C corrupts them) corrupted here in numpy/scipy/PIL, with the
  constants of the ImageNet-C code. Only ON_THE_FLY of the 15 are implemented:
  the others need OpenCV, ImageMagick or the frost pictures (the maintained
  `imagecorruptions` package pulls OpenCV and scikit-image, which the GPU
  machines lack), so they need the prepared sets. Two deviations: results are
  truncated to uint8 without ImageNet-C's final JPEG (quality 85) re-encoding,
  and brightness goes through matplotlib's HSV conversion instead of skimage's.

mCE: per corruption, the model's top-1 errors summed over severities divided by
the dense model's; mCE is the mean over corruptions (ImageNet-C normalises by
AlexNet; here the reference is the model before ACMization).
"""

from __future__ import annotations

import io

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
              "defocus_blur": _defocus_blur, "zoom_blur": _zoom_blur, "brightness": _brightness,
              "contrast": _contrast, "pixelate": _pixelate, "jpeg_compression": _jpeg_compression}


def corrupt(images: np.ndarray, corruption: str, severity: int, seed: int = 0) -> np.ndarray:
  """uint8 (n, H, W, 3) -> uint8 (n, H, W, 3), each image corrupted on its own (noise drawn from seed)."""
  if corruption not in ON_THE_FLY:
    raise ValueError(f"corruption {corruption!r} has no on-the-fly implementation here (it needs the prepared "
                     f"TFDS set in --data_dir); on the fly: {tuple(ON_THE_FLY)}")
  if severity not in SEVERITIES:
    raise ValueError(f"severity must be in 1..5, got {severity!r}")
  rng = np.random.default_rng([seed, NAMES.index(corruption), severity])
  fn = ON_THE_FLY[corruption]
  out = [np.uint8(np.clip(fn(image.astype(np.float32) / 255, severity, rng), 0, 1) * 255) for image in images]
  return np.stack(out) if out else np.asarray(images)


def mce(errors: dict[str, dict[int, float]], dense_errors: dict[str, dict[int, float]]) -> dict[str, float]:
  """{corruption: CE} and "mCE": a model's errors per corruption summed over severities, over the dense
  model's; the mean over corruptions."""
  ce = {c: sum(errors[c].values()) / max(sum(dense_errors[c].values()), 1e-12) for c in errors}
  return {**ce, "mCE": float(np.mean(list(ce.values())))}
