"""Train-time augmentation: per-image presets and batch-level mixup / cutmix.

Presets (`--augment`), applied to each train image:
- "inception": random resized crop (8-100% of the area, aspect 3/4-4/3) and a
  horizontal flip; the ImageNet default, the only train augmentation before.
  The crop window is drawn from the image's shape alone (`inception_window`), so
  the data pipeline decodes only that window of a JPEG (`tfds_data.decode_window`).
- "three_augment": DeiT-III's 3-augment, the official recipe's: the Inception
  crop and flip, then one of grayscale, solarize (pixels >= 128 inverted) or a
  Gaussian blur (sigma uniform in [0.1, 2] pixels), picked uniformly, then a
  colour jitter of brightness, contrast and saturation by factors in [0.7, 1.3]
  (torchvision's formulas, applied in that fixed order).
- "light": for small or non-photographic images: the short side resized to the
  image size, a reflect padding of size // 8 pixels (4 at 32 px), a random
  size x size crop and a horizontal flip.
- "none": resize the short side and centre-crop, as at evaluation.
Default per dataset: "none" for the generated sets (whose images are the task:
a crop can cut the class object away), "inception" for `tfds:` and `folder:`.
The generated sets take "none" or "light" (numpy, no TensorFlow).

Mixup / cutmix (`--mixup=ALPHA`, `--cutmix=ALPHA`, timm's batch mode): each
batch is mixed with itself reversed, with one lam ~ Beta(alpha, alpha) per
batch; with both on, each batch picks one of the two with probability 1/2
(timm's default switch). Cutmix pastes a box of area (1 - lam) H W from the
partner (its centre uniform over the image, clipped at the border) and sets lam
to the exact share of the image left. The batch then carries "mix_label" (the
partner's labels) and "mix_weight" (lam per example): the task loss is lam x
CE(label) + (1 - lam) x CE(mix_label), each with the label smoothing, which is
CE against the mixed, smoothed targets. The distillation and gate phases see the
mixed images through teacher and student alike.

Everything random is drawn from (seed, stream position): the per-image ops from
(seed, the example's position), the mixing from (seed, the batch's first
position), so a resumed run sees the same augmented batches.
"""

from __future__ import annotations

import numpy as np

from acm_jax.data.base import is_synthetic

PRESETS = ("inception", "three_augment", "light", "none")
NUMPY_PRESETS = ("light", "none")  # what the generated sets (numpy images) support
CROP_FIRST = ("inception", "three_augment")  # presets whose first step is a crop of the decoded image
MIX_SALT = 20261201  # keeps the mixing draws apart from other uses of the seed
LIGHT_SALT = 20261202


def default_preset(dataset: str) -> str:
  return "none" if is_synthetic(dataset) else "inception"


def check(augment: str | None, mixup: float, cutmix: float, dataset: str | None = None) -> None:
  """Raises a ValueError naming the offending flag, before any data is read."""
  if augment is not None and augment not in PRESETS:
    raise ValueError(f"unknown --augment preset {augment!r}; expected one of {PRESETS}")
  for name, alpha in (("mixup", mixup), ("cutmix", cutmix)):
    if not isinstance(alpha, (int, float)) or not np.isfinite(alpha) or alpha < 0:
      raise ValueError(f"--{name} must be an alpha >= 0 (0: off), got {alpha!r}")
  if dataset is not None and augment is not None and augment not in NUMPY_PRESETS:
    if is_synthetic(dataset):
      raise ValueError(f"--augment={augment} needs decoded photos (tfds: or folder: datasets); "
                       f"the generated set {dataset!r} takes one of {NUMPY_PRESETS}")


# --- batch mixing (numpy, on the host) ---------------------------------------------------------


def mix_params(seed: int, position: int, height: int, width: int, mixup: float, cutmix: float):
  """("mixup", lam, None) or ("cutmix", lam, (top, bottom, left, right)) for the batch whose first
  example sits at stream `position`; None when both alphas are 0."""
  if mixup <= 0 and cutmix <= 0:
    return None
  rng = np.random.default_rng([seed, MIX_SALT, position])
  use_cutmix = cutmix > 0 and (mixup <= 0 or rng.uniform() < 0.5)
  lam = float(rng.beta(cutmix, cutmix) if use_cutmix else rng.beta(mixup, mixup))
  if not use_cutmix:
    return "mixup", lam, None
  ratio = np.sqrt(1.0 - lam)
  cy, cx = rng.integers(height), rng.integers(width)
  half_h, half_w = int(height * ratio) // 2, int(width * ratio) // 2
  top, bottom = int(np.clip(cy - half_h, 0, height)), int(np.clip(cy + half_h, 0, height))
  left, right = int(np.clip(cx - half_w, 0, width)), int(np.clip(cx + half_w, 0, width))
  lam = 1.0 - (bottom - top) * (right - left) / (height * width)
  return "cutmix", lam, (top, bottom, left, right)


def apply_mix(batch: dict, params) -> dict:
  """Mixes the float "image" (batch, H, W, C) with its reverse by `params` (from `mix_params`) and adds
  "mix_label" and "mix_weight"; other keys pass through."""
  if params is None:
    return batch
  kind, lam, box = params
  images = batch["image"]
  partner = images[::-1]
  if kind == "mixup":  # in place after the first product: two passes over the batch fewer, same float32 values
    mixed = images * images.dtype.type(lam)
    mixed += images.dtype.type(1.0 - lam) * partner
  else:
    top, bottom, left, right = box
    mixed = images.copy()
    mixed[:, top:bottom, left:right] = partner[:, top:bottom, left:right]
  n = len(batch["label"])
  return {**batch, "image": mixed, "mix_label": batch["label"][::-1].copy(),
          "mix_weight": np.full(n, lam, np.float32)}


def mix_batches(batches, seed: int, start_position: int, batch_size: int, mixup: float, cutmix: float):
  """Applies `apply_mix` to a stream of full batches, the first at `start_position`."""
  for i, batch in enumerate(batches):
    _, height, width, _ = batch["image"].shape
    yield apply_mix(batch, mix_params(seed, start_position + i * batch_size, height, width, mixup, cutmix))


# --- the light preset on numpy images (the generated sets) --------------------------------------


def light_params(seed: int, position: int, count: int, size: int) -> tuple[np.ndarray, np.ndarray]:
  """(count, 2) crop offsets in [0, 2 * pad] and (count,) flips for the batch at `position`."""
  rng = np.random.default_rng([seed, LIGHT_SALT, position])
  pad = size // 8
  return rng.integers(0, 2 * pad + 1, (count, 2)), rng.uniform(size=count) < 0.5


def light_numpy(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray) -> np.ndarray:
  """(n, H, W, C) square images -> reflect-padded by H // 8, cropped at `offsets`, flipped where `flips`."""
  n, size = images.shape[0], images.shape[1]
  pad = size // 8
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
  rows = offsets[:, 0, None] + np.arange(size)  # (n, size)
  cols = offsets[:, 1, None] + np.arange(size)
  cols = np.where(flips[:, None], cols[:, ::-1], cols)
  return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


# --- the presets in TensorFlow (decoded photos of any size) -------------------------------------


def _resize_short_side_center_crop(tf, image, size: int, crop_fraction: float):
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = (size / crop_fraction) / tf.reduce_min(shape)
  resized = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
  image = tf.image.resize(image, resized, method="bilinear", antialias=True)
  top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
  return image[top:top + size, left:left + size]


def eval_image(tf, image, size: int, crop_fraction: float = 0.875):
  """uint8 (H, W, 3) -> float32 (size, size, 3) in [0, 255]: short side to size / crop_fraction, centre crop."""
  return tf.clip_by_value(_resize_short_side_center_crop(tf, image, size, crop_fraction), 0.0, 255.0)


def _seeds(tf, key):
  """(crop seed, flip seed) of an image's (seed, position) `key`; the 3-augment's draws split the crop seed."""
  return tf.unstack(tf.random.experimental.stateless_split(key, 2))


def inception_window(tf, shape, key):
  """(begin, crop size), int32 (3,) each as `tf.slice` takes them, of the Inception crop drawn for `key`
  in an image of `shape` (H, W, 3): 8-100% of the area, aspect 3/4-4/3."""
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, tf.zeros([0, 0, 4], tf.float32), seed=_seeds(tf, key)[0], min_object_covered=0.1,
      aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  return begin, crop_size


def gray(tf, image):
  """ITU-R 601 luma of float RGB (..., 3) -> (..., 1), as torchvision's and PIL's grayscale."""
  return tf.tensordot(image, tf.constant([0.299, 0.587, 0.114], image.dtype), axes=1)[..., None]


def solarize(tf, image):
  return tf.where(image >= 128.0, 255.0 - image, image)


def gaussian_blur(tf, image, sigma):
  """Separable Gaussian blur of a float (H, W, C) image, kernel radius 6 (3 x the largest sigma),
  edges reflected. Written by hand: TensorFlow has no Gaussian blur op."""
  radius = 6
  taps = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernel = tf.exp(-0.5 * tf.square(taps / sigma))
  kernel = kernel / tf.reduce_sum(kernel)
  channels = tf.shape(image)[-1]
  x = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
  vertical = tf.tile(tf.reshape(kernel, (-1, 1, 1, 1)), [1, 1, channels, 1])
  horizontal = tf.tile(tf.reshape(kernel, (1, -1, 1, 1)), [1, 1, channels, 1])
  x = tf.nn.depthwise_conv2d(x, vertical, [1, 1, 1, 1], "VALID")
  return tf.nn.depthwise_conv2d(x, horizontal, [1, 1, 1, 1], "VALID")[0]


def color_jitter(tf, image, factors):
  """torchvision's brightness, contrast, saturation adjustments by `factors` (3,), in that order."""
  image = tf.clip_by_value(image * factors[0], 0.0, 255.0)
  mean = tf.reduce_mean(gray(tf, image))
  image = tf.clip_by_value(mean + factors[1] * (image - mean), 0.0, 255.0)
  grey = gray(tf, image)
  return tf.clip_by_value(grey + factors[2] * (image - grey), 0.0, 255.0)


def three_augment_ops(tf, image, op, sigma, factors):
  """The 3-augment's colour part on a float (H, W, 3) image in [0, 255]: op 0 grayscale, 1 solarize,
  2 blur by `sigma`; then `color_jitter` by `factors`."""
  image = tf.switch_case(op, [lambda: tf.tile(gray(tf, image), [1, 1, 3]), lambda: solarize(tf, image),
                              lambda: gaussian_blur(tf, image, sigma)])
  return color_jitter(tf, image, factors)


def light_crop(tf, image, offsets, flip, size: int):
  """A (size, size, 3) float image reflect-padded by size // 8, cropped at `offsets`, flipped if `flip`."""
  pad = size // 8
  image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
  image = tf.slice(image, tf.concat([offsets, [0]], 0), [size, size, 3])
  return tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)


def train_image(tf, image, key, size: int, preset: str):
  """uint8 (H, W, 3) -> float32 (size, size, 3) in [0, 255], augmented by `preset`, every draw
  seeded by `key` (the (seed, position) int64 pair)."""
  if preset == "none":
    return eval_image(tf, image, size)
  if preset == "light":
    crop_seed, flip_seed = _seeds(tf, key)
    image = _resize_short_side_center_crop(tf, image, size, 1.0)
    offsets = tf.random.stateless_uniform([2], crop_seed, 0, 2 * (size // 8) + 1, tf.int32)
    flip = tf.random.stateless_uniform([], flip_seed) < 0.5
    return tf.clip_by_value(light_crop(tf, image, offsets, flip, size), 0.0, 255.0)
  begin, crop_size = inception_window(tf, tf.shape(image), key)
  return train_crop(tf, tf.slice(image, begin, crop_size), key, size, preset)


def train_crop(tf, crop, key, size: int, preset: str):
  """The rest of a crop-first preset (CROP_FIRST) after its crop: the uint8 window (h, w, 3) that
  `inception_window` drew for `key` -> float32 (size, size, 3) in [0, 255]. Apart so that the data
  pipeline can decode only the window."""
  crop_seed, flip_seed = _seeds(tf, key)
  image = tf.image.resize(crop, (size, size), method="bilinear", antialias=True)
  image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  image = tf.clip_by_value(image, 0.0, 255.0)  # antialiased resizing overshoots slightly
  if preset == "three_augment":
    op_seed, sigma_seed, jitter_seed = tf.unstack(tf.random.experimental.stateless_split(crop_seed, 3))
    op = tf.random.stateless_uniform([], op_seed, 0, 3, tf.int32)
    sigma = tf.random.stateless_uniform([], sigma_seed, 0.1, 2.0)
    factors = tf.random.stateless_uniform([3], jitter_seed, 0.7, 1.3)
    image = three_augment_ops(tf, image, op, sigma, factors)
  return image
