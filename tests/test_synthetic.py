"""The generated set's compositing against a frozen copy of the generator it replaced (acm_jax/data/synthetic.py
at main 5bae19b, 2026-12-02: whole blocks of images, masks over the whole image): the same arrays, bit for bit,
on random configs. The random draws themselves (`_background_params`, `_place`, `_normal_noise`, ...) are shared,
and pinned by the golden digests in test_synthetic_stream.py; above QUANTILE_NOISE_ABOVE pixels the frozen copy
looks the noise up in `normal_quantiles()` where it took numpy's normals (marked "quantile noise")."""

import numpy as np
import pytest

from acm_jax.data import synthetic
from acm_jax.data.synthetic import BLOCK, COLOUR_FAMILIES, SHAPES, SyntheticConfig

# ---- the reference: copied unchanged but for the module prefix on the shared helpers ----

_SHAPE_TESTS = (  # (u, w): pixel coordinates in the object's rotated frame in units of its radius; r = |(u, w)|
    lambda u, w, r: r <= 1.0,                                                               # circle
    lambda u, w, r: np.maximum(np.abs(u), np.abs(w)) <= 0.85,                               # square
    lambda u, w, r: (w <= 0.7) & (w >= -1.0) & (np.abs(u) <= (w + 1.0) * 0.6),              # triangle
    lambda u, w, r: (np.minimum(np.abs(u), np.abs(w)) <= 0.33) & (np.maximum(np.abs(u), np.abs(w)) <= 1.0),  # cross
    lambda u, w, r: (r <= 1.0) & (r >= 0.5),                                                # ring
)


def shape_masks(shape: np.ndarray, cx: np.ndarray, cy: np.ndarray, radius: np.ndarray, angle: np.ndarray,
                size: int) -> np.ndarray:
  """(n,) shape ids, centres, radii (pixels) and angles -> (n, size, size) boolean masks."""
  coords = np.arange(size, dtype=np.float32) + 0.5
  cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
  dx = coords[None, None, :] - cx[:, None, None]
  dy = coords[None, :, None] - cy[:, None, None]
  u = (cos * dx + sin * dy) / radius[:, None, None]
  w = (cos * dy - sin * dx) / radius[:, None, None]
  masks = np.empty(u.shape, bool)
  for i, test in enumerate(_SHAPE_TESTS):
    sel = shape == i
    masks[sel] = test(u[sel], w[sel], np.hypot(u[sel], w[sel]))
  return masks


def _background_block(params: dict, block: slice, fine_noise: np.ndarray, size: int) -> np.ndarray:
  """Images `block` of the backgrounds (count, size, size, 3): gradient + base colour + smooth and fine
  low-contrast noise. `fine_noise` is the block's (count, size, size, 3), scaled here in place."""
  if params["quantiles"]:  # quantile noise: (count, 3, size, size) indices
    fine_noise = synthetic.normal_quantiles()[fine_noise].transpose(0, 2, 3, 1)
  f32 = np.float32
  coords = np.linspace(-1, 1, size, dtype=f32)
  angle, slope = params["angle"][block], params["slope"][block]
  ramp = ((slope * np.cos(angle))[:, None, None] * coords[None, None, :]
          + (slope * np.sin(angle))[:, None, None] * coords[None, :, None])
  grid = params["coarse"][block]
  if params["quantiles"]:  # above 64 px: two weighted grid rows, then two columns, per pixel, in that order
    lo, w_lo, w_hi = params["up"]
    rows = grid[:, :, lo] * w_lo[:, None] + grid[:, :, lo + 1] * w_hi[:, None]
    noise = (rows[..., lo] * w_lo + rows[..., lo + 1] * w_hi).transpose(0, 2, 3, 1)
  else:
    up = params["up"]
    noise = (up @ grid @ up.T).transpose(0, 2, 3, 1)  # channels first for the matmuls
  noise += np.multiply(fine_noise, params["fine_amplitude"][block, None, None, None], out=fine_noise)
  noise += (ramp[..., None] + params["base"][block, None, None, :])
  return noise


def _generate_chunk(config: SyntheticConfig, seed_sequence: np.random.SeedSequence, n: int) -> dict[str, np.ndarray]:
  """n examples from one seed. Every random draw is made for the whole chunk, in a fixed order (the
  data depend on it); the images are then composited BLOCK at a time into the uint8 output, which
  keeps the float32 intermediates to a few MB whatever the chunk and image size."""
  rng = np.random.default_rng(seed_sequence)
  size, f32 = config.image_size, np.float32
  background = synthetic._background_params(rng, n, size)
  shape = rng.integers(0, len(SHAPES), n)
  family = rng.integers(0, max(config.num_families, 1), n)  # unused by the glyph task

  # the distractor first, so that the class object is drawn over it where they overlap
  distract = rng.uniform(0, 1, n) < config.distractor_probability
  distractor_shape = rng.integers(0, len(SHAPES), n)
  distractor_place = synthetic._place(rng, n, size, (0.10, 0.17))
  grey = rng.uniform(0.3, 0.95, n).astype(f32)

  # the shapes branch draws its colour before placing the object, as the old generator did: same images
  if config.task == "shapes":
    lo, hi = np.array(list(COLOUR_FAMILIES.values()), f32)[family].T
    hue = lo + (hi - lo) * rng.uniform(0, 1, n).astype(f32)
    colour = synthetic._hsv_to_rgb(hue, rng.uniform(0.55, 1.0, n).astype(f32), rng.uniform(0.6, 1.0, n).astype(f32))
    place = synthetic._place(rng, n, size, config.object_scale)
    label = shape * config.num_families + family
  else:
    place = synthetic._place(rng, n, size, config.object_scale)
    glyph = rng.integers(0, config.num_glyphs, n)
    colour = synthetic._hsv_to_rgb(rng.uniform(0, 1, n).astype(f32), rng.uniform(0.3, 0.6, n).astype(f32),
                                   rng.uniform(0.5, 0.7, n).astype(f32))
    bank = synthetic.glyph_bank(config)
    rows = np.arange(size) % config.glyph_size  # tiled from the top-left corner: aligned with a g-pixel ViT's patches
    label = glyph % config.num_classes

  fine_noise = synthetic._fine_noise_images(background, n, size)  # one image at a time since 2026-12-02
  out = {"image": np.empty((n, size, size, 3), np.uint8), "label": label.astype(np.int32),
         "object_mask": np.empty((n, size, size), bool), "distractor_mask": np.empty((n, size, size), bool)}
  for start in range(0, n, BLOCK):
    block = slice(start, min(start + BLOCK, n))
    block_noise = np.stack([next(fine_noise) for _ in range(start, block.stop)])
    images = _background_block(background, block, block_noise, size)
    d_mask = shape_masks(distractor_shape[block], *(a[block] for a in distractor_place), size)
    d_mask &= distract[block, None, None]
    images = np.where(d_mask[..., None], grey[block, None, None, None], images)
    mask = shape_masks(shape[block], *(a[block] for a in place), size)
    if config.task == "shapes":  # the shading noise is the chunk's last draw: drawn block by block, in order
      shade = synthetic._normal_noise(rng, (len(grey[block]), size, size, 1), background["quantiles"])
      if background["quantiles"]:  # quantile noise
        shade = synthetic.normal_quantiles()[shade]
      shade = 1.0 + 0.05 * shade
      fill = colour[block, None, None, :] * shade
    else:
      texture = bank[glyph[block]][:, rows][:, :, rows]
      fill = colour[block, None, None, :] + config.glyph_contrast * texture[..., None]
    images = np.where(mask[..., None], fill, images)
    out["image"][block] = np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
    out["object_mask"][block] = mask
    out["distractor_mask"][block] = d_mask & ~mask
  return out

# ---- the tests ----


def random_config(rng: np.random.Generator, size: int) -> SyntheticConfig:
  task = str(rng.choice(synthetic.TASKS))
  low = float(rng.uniform(0.1, 0.3))
  fields = dict(image_size=size, task=task, seed=int(rng.integers(1000)), chunk_size=int(rng.integers(1, 2 * BLOCK + 9)),
                distractor_probability=float(rng.choice([0.0, 1.0, rng.uniform()])),
                object_scale=(low, low + float(rng.uniform(0.0, 0.1))))  # up to 0.4: corners cut by the border
  if task == "shapes":
    fields["num_classes"] = int(rng.choice([5, 10, 15, 20]))
  else:
    fields.update(num_classes=int(rng.integers(2, 50)), glyph_size=int(rng.integers(2, 9)),
                  glyph_contrast=float(rng.uniform(0.05, 0.5)))
  return SyntheticConfig(**fields)


@pytest.mark.parametrize("kept_bytes", [0, synthetic.FINE_NOISE_KEPT_BYTES], ids=["fine-noise-drawn-twice", "kept"])
def test_chunks_equal_the_reference_generator_bit_for_bit(kept_bytes, monkeypatch):
  monkeypatch.setattr(synthetic, "FINE_NOISE_KEPT_BYTES", kept_bytes)
  rng = np.random.default_rng(26 + kept_bytes)
  sizes = [16, 17, 23, 32, 40, 57, 64, 65, 96]  # quantile noise above 64
  configs = [random_config(rng, int(size)) for size in sizes]
  configs += [SyntheticConfig(image_size=224, task=task, chunk_size=BLOCK + 3) for task in synthetic.TASKS]
  for config in configs:
    for split, index in (("train", 0), ("test", 2)):
      seed = np.random.SeedSequence([config.seed, 20261124], spawn_key=(synthetic.SPLIT_INDEX[split], index))
      expect = _generate_chunk(config, seed, config.chunk_size)
      got = synthetic._generate_chunk(config, seed, config.chunk_size)
      assert sorted(got) == sorted(expect) == ["distractor_mask", "image", "label", "object_mask"]
      for key in expect:
        assert got[key].dtype == expect[key].dtype
        np.testing.assert_array_equal(got[key], expect[key], err_msg=f"{key} of {config}, {split} chunk {index}")


def test_shape_masks_equal_the_whole_image_masks_and_stay_in_their_box():
  """Many shapes of every kind, small to larger than the image, centred anywhere (also outside it)."""
  rng = np.random.default_rng(5)
  f32 = np.float32
  for size, n in ((16, 3000), (61, 1500), (224, 200)):
    shape = rng.integers(0, len(SHAPES), n)
    radius = (rng.uniform(0.02, 0.8, n) * size).astype(f32)
    cx, cy = (rng.uniform(-0.3, 1.3, n) * size).astype(f32), (rng.uniform(-0.3, 1.3, n) * size).astype(f32)
    angle = rng.uniform(0, 2 * np.pi, n).astype(f32)
    expect = shape_masks(shape, cx, cy, radius, angle, size)
    cos, sin = np.cos(angle), np.sin(angle)
    for i in range(n):
      box, mask = synthetic.shape_mask(shape[i], cx[i], cy[i], radius[i], cos[i], sin[i], size)
      got = np.zeros((size, size), bool)
      got[box] = mask
      np.testing.assert_array_equal(got, expect[i], err_msg=f"{SHAPES[shape[i]]} {cx[i]} {cy[i]} {radius[i]}")
    assert expect.any(axis=(1, 2)).mean() > 0.6  # most of them show in the image


def test_shape_boxes_are_tight_enough_to_pay():
  box, mask = synthetic.shape_mask(2, np.float32(112), np.float32(112), np.float32(50), np.float32(1), np.float32(0),
                                   224)
  assert box == (slice(48, 176), slice(48, 176)) and mask.shape == (128, 128)  # 112 -+ (1.25 x 50 + 1), of 224



def test_normal_quantiles_are_a_symmetric_16_bit_standard_normal():
  from statistics import NormalDist
  table = synthetic.normal_quantiles()
  assert table.shape == (65536,) and table.dtype == np.float32
  assert np.all(np.diff(table) > 0) and np.array_equal(table, -table[::-1])
  for k in (0, 1, 1000, 32767, 40000, 65535):
    assert table[k] == np.float32(NormalDist().inv_cdf((k + 0.5) / 65536))
  assert abs(float(table.astype(np.float64).std()) - 1.0) < 1e-4 and 4.3 < table[-1] < 4.35


@pytest.mark.parametrize("shape", [(1000, 1001), (3, 7, 1)], ids=["a-million", "count-not-a-multiple-of-four"])
def test_quantile_noise_is_standard_normal_and_a_prefix_of_the_raw_draws(shape):
  rng = np.random.default_rng(7)
  indices = synthetic._normal_noise(rng, shape, quantiles=True)
  assert indices.shape == shape and indices.dtype == np.uint16
  count = indices.size
  raw = np.random.default_rng(7).bit_generator.random_raw(-(-count // 4))
  expect = [(int(word) >> (16 * j)) & 0xFFFF for word in raw.tolist() for j in range(4)][:count]  # low bits first
  np.testing.assert_array_equal(indices.ravel(), expect)
  if count > 10**6:
    noise = synthetic.normal_quantiles()[indices].astype(np.float64)
    assert abs(noise.mean()) < 0.005 and abs(noise.std() - 1.0) < 0.005
    assert abs((np.abs(noise) > 2.0).mean() - 0.0455) < 0.002  # two-sided tail of N(0, 1) beyond 2 sd


@pytest.mark.parametrize("cells, size", [(29, 224), (14, 97), (3, 16)])
def test_elementwise_upsampling_equals_the_bilinear_matmuls(cells, size):
  """`synthetic._upsample` (the backgrounds above QUANTILE_NOISE_ABOVE pixels, the same bits on any CPU)
  against up @ grid @ up.T with the `_upsampler` matrix, in float64, on a random grid."""
  grid = np.random.default_rng(cells).standard_normal((3, cells, cells)).astype(np.float32)
  up = synthetic._upsampler(cells, size).astype(np.float64)
  assert np.count_nonzero(up, axis=1).max() <= 2
  out = np.full((3, size, size), np.nan, np.float32)
  synthetic._upsample(grid, synthetic._upsampler_rows(cells, size), out)
  want = up @ grid.astype(np.float64) @ up.T
  np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
  assert np.abs(want).max() > 0.5
