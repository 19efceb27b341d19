"""The TensorFlow image pipeline (`tfds_data.preprocess`): the crop-first presets decode only their
window of a JPEG, with the pixels of a whole decode, for JPEGs of odd sizes, 4:2:0, 4:2:2 and 4:4:4,
progressive and grayscale; other formats still decode."""

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from acm_jax.data import augment, tfds_data

tf = pytest.importorskip("tensorflow")
ImageFile.MAXBLOCK = 1 << 22  # PIL's default buffer is too small for progressive JPEGs in memory


def encode(height, width, fmt="JPEG", mode="RGB", seed=0, **options):
  """Smooth colour fields with strong noise: chroma that varies at every pixel, as photos' edges do."""
  rng = np.random.default_rng(seed)
  coarse = Image.fromarray(rng.integers(0, 256, (max(height // 20, 2), max(width // 20, 2), 3), np.uint8))
  pixels = np.asarray(coarse.resize((width, height), Image.BICUBIC), np.float32) + rng.normal(0, 30, (height, width, 3))
  buffer = io.BytesIO()
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert(mode).save(buffer, fmt, **options)
  return buffer.getvalue()


# (height, width, mode, PIL options): odd sizes, 4:2:0 (PIL's default), 4:2:2, 4:4:4, progressive, grayscale
JPEGS = [(375, 500, "RGB", dict(quality=90)), (37, 53, "RGB", dict(quality=90, subsampling=2)),
         (53, 37, "RGB", dict(quality=75, subsampling=1)), (61, 45, "RGB", dict(quality=90, progressive=True)),
         (101, 203, "RGB", dict(quality=95, subsampling=0)), (37, 53, "L", dict(quality=90)),
         (4, 3, "RGB", dict(quality=90)), (75, 50, "RGB", dict(quality=85, subsampling=2, progressive=True))]


def windows(height, width, rng, count=40):
  """Random windows, plus those where a cropped decode goes wrong without the margin: left edges on the
  16-pixel iMCU grid, 1-4 pixel widths and heights, windows touching the image's edges, the whole image."""
  out = [(0, 0, height, width), (height - 1, width - 1, 1, 1), (0, width - 1, height, 1)]
  for i in range(count):
    top, left = int(rng.integers(height)), int(rng.integers(width))
    if i % 4 == 0:
      left = min(left // 16 * 16, width - 1)
    if i % 5 == 0:
      out.append((top, left, min(1 + i % 4, height - top), min(1 + i % 3, width - left)))
      continue
    out.append((top, left, int(rng.integers(1, height - top + 1)), int(rng.integers(1, width - left + 1))))
  return out


@pytest.mark.parametrize("height, width, mode, options", JPEGS)
def test_jpeg_window_decode_equals_the_whole_decode_cut(height, width, mode, options):
  encoded = encode(height, width, mode=mode, seed=height * width, **options)
  whole = tfds_data.decode(tf, encoded).numpy()
  assert whole.shape == (height, width, 3)
  for top, left, h, w in windows(height, width, np.random.default_rng(height + width)):
    got = tfds_data.decode_window(tf, tf.constant(encoded),
                                  lambda shape: (tf.constant([top, left, 0]), tf.constant([h, w, -1]))).numpy()
    np.testing.assert_array_equal(got, whole[top:top + h, left:left + w], err_msg=str((top, left, h, w)))


def test_margin_is_what_makes_the_window_decode_exact(monkeypatch):
  """Without the margin, libjpeg-turbo's cropped decode differs from the whole decode at the window's
  edge (chroma upsampled without its neighbours); this guards the test above against passing vacuously."""
  encoded = encode(375, 500, quality=90)
  whole = tfds_data.decode(tf, encoded).numpy()
  monkeypatch.setattr(tfds_data, "JPEG_MARGIN", 0)
  differ = 0
  for top, left, h, w in windows(375, 500, np.random.default_rng(0)):
    got = tfds_data.decode_window(tf, tf.constant(encoded),
                                  lambda shape: (tf.constant([top, left, 0]), tf.constant([h, w, -1]))).numpy()
    differ += not np.array_equal(got, whole[top:top + h, left:left + w])
  assert differ > 5


def old_preprocess(encoded, position, seed, size, preset):
  """The pipeline before window decoding: decode the whole image, then augment it."""
  key = tf.constant([seed, position], tf.int64)
  return augment.train_image(tf, tfds_data.decode(tf, encoded), key, size, preset) / 127.5 - 1.0


@pytest.mark.parametrize("preset", augment.CROP_FIRST)
def test_train_preprocess_equals_decode_then_augment(preset):
  images = [encode(h, w, mode=mode, seed=i, **options) for i, (h, w, mode, options) in enumerate(JPEGS)]
  images += [encode(41, 67, "PNG", seed=1), encode(30, 22, "BMP", seed=2), encode(20, 31, "GIF", seed=3)]
  for i, encoded in enumerate(images):
    for position in range(i, 40 * len(images), 9 * len(images)):
      got = tfds_data.preprocess(tf, tf.constant(encoded), position, 3, 24, True, preset).numpy()
      np.testing.assert_array_equal(got, old_preprocess(encoded, position, 3, 24, preset).numpy(),
                                    err_msg=f"image {i} at position {position}")
      np.testing.assert_array_equal(got, tfds_data.preprocess(tf, tf.constant(encoded), position, 3, 24, True,
                                                              preset).numpy())
    assert got.shape == (24, 24, 3) and -1 <= got.min() and got.max() <= 1
    assert not np.array_equal(got, tfds_data.preprocess(tf, tf.constant(encoded), position + 1, 3, 24, True,
                                                        preset).numpy())


def test_preprocess_in_a_tf_data_map_takes_jpeg_and_png():
  """The JPEG test is a tf.cond inside the traced map function; both branches run from one graph."""
  images = [encode(50, 70, seed=4, quality=90), encode(50, 70, "PNG", seed=4)]
  ds = tf.data.Dataset.from_tensor_slices(images).enumerate().map(
      lambda position, encoded: tfds_data.preprocess(tf, encoded, position, 0, 16, True, "inception"))
  for position, (got, encoded) in enumerate(zip(ds.as_numpy_iterator(), images)):
    np.testing.assert_array_equal(got, old_preprocess(encoded, position, 0, 16, "inception").numpy())
