"""ImageNet-C: flag parsing, the on-the-fly corruptions against direct formulas and properties, mCE by
hand, and the prepared TFDS sets read from a small set the test writes itself."""

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from acm_jax import data
from acm_jax.data import corruptions
from acm_jax.train import config as config_lib
from acm_jax.train import robustness


def smooth_images(n=3, size=32, seed=0, texture=15.0):
  """Blocks of random colours with some texture."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(40, 215, (n, 4, 4, 3))
  blocks = np.repeat(np.repeat(coarse, size // 4, 1), size // 4, 2)
  return np.clip(blocks + rng.normal(0, texture, blocks.shape), 0, 255).astype(np.uint8)


def test_parse_flags():
  assert corruptions.parse("all", "1,2,3,4,5") == (corruptions.NAMES, (1, 2, 3, 4, 5))
  assert corruptions.parse("contrast, fog", "3") == (("contrast", "fog"), (3,))
  with pytest.raises(ValueError, match=r"--corruptions: unknown \['glare'\]; expected 'all' or"):
    corruptions.parse("contrast,glare", "1")
  for bad in ("0,1", "6", "one", ""):
    with pytest.raises(ValueError, match=f"--severities must be comma-separated integers in 1..5, got '{bad}'"):
      corruptions.parse("all", bad)


@pytest.fixture(scope="module")
def frost_dir(tmp_path_factory):
  """Stand-ins for ImageNet-C's frost pictures: textured, larger than the test images, PNG and JPEG."""
  directory = tmp_path_factory.mktemp("frost")
  rng = np.random.default_rng(7)
  for i, ext in enumerate(("png", "png", "png", "jpg", "jpg", "jpg")):
    Image.fromarray(rng.integers(0, 256, (40 + i, 44, 3), dtype=np.uint8)).save(directory / f"frost{i + 1}.{ext}")
  return str(directory)


# pixelate: by hand below; elastic_transform's published severities 1-2 are large affine moves, 3-5 small
# local ones, so its distance grows within 3..5 only (below)
@pytest.mark.parametrize("name", sorted(set(corruptions.ON_THE_FLY) - {"pixelate", "elastic_transform"}))
def test_on_the_fly_corruptions_are_seeded_and_grow_with_severity(name, frost_dir):
  clean = smooth_images()
  out = {s: corruptions.corrupt(clean, name, s, seed=1, frost_dir=frost_dir) for s in (1, 5)}
  assert out[1].shape == clean.shape and out[1].dtype == np.uint8
  np.testing.assert_array_equal(out[1], corruptions.corrupt(clean, name, 1, seed=1, frost_dir=frost_dir))
  distance = {s: np.abs(o.astype(float) - clean).mean() for s, o in out.items()}
  assert 0 < distance[1] < distance[5], distance


def test_elastic_transform_grows_within_its_local_severities():
  clean = smooth_images(4, 32, seed=3)
  distance = [np.abs(corruptions.corrupt(clean, "elastic_transform", s, seed=2).astype(float) - clean).mean()
              for s in (3, 4, 5)]
  assert 0 < distance[0] < distance[1] < distance[2], distance
  assert not np.array_equal(corruptions.corrupt(clean, "elastic_transform", 3, seed=2),
                            corruptions.corrupt(clean, "elastic_transform", 3, seed=3))


def test_glass_blur_shuffle_is_imagenet_c_view_assignment():
  """ImageNet-C's loop run literally on pixels (its tuple 'swap' of numpy views copies one way) against the
  index bookkeeping, with the same draws."""
  from scipy import ndimage
  rng = np.random.default_rng(4)
  x = rng.uniform(size=(14, 17, 3)).astype(np.float32)
  sigma, reach, rounds = 1.1, 3, 2  # severity 4
  got = corruptions._glass_blur(x, 4, np.random.default_rng(5))
  draws = np.random.default_rng(5)
  pixels = np.uint8(ndimage.gaussian_filter(x, (sigma, sigma, 0), mode="nearest") * 255)
  for _ in range(rounds):
    positions = [(h, w) for h in range(14 - reach, reach, -1) for w in range(17 - reach, reach, -1)]
    offsets = draws.integers(-reach, reach, size=(len(positions), 2))
    for (h, w), (dh, dw) in zip(positions, offsets):
      pixels[h, w], pixels[h + dh, w + dw] = pixels[h + dh, w + dw], pixels[h, w]
  want = ndimage.gaussian_filter(pixels / 255.0, (sigma, sigma, 0), mode="nearest")
  np.testing.assert_allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("angle", [0.0, 17.0, -38.5, -120.0])
def test_motion_blur_is_a_correlation_with_a_ray_kernel(angle):
  from scipy import ndimage
  x = np.random.default_rng(6).uniform(size=(20, 23))
  radius, sigma = 5, 2.0
  kernel = np.zeros((4 * radius + 3,) * 2)
  centre = 2 * radius + 1
  for i in range(2 * radius + 1):
    row = int(np.ceil(i * np.sin(np.radians(angle)) - 0.5))
    col = int(np.ceil(i * np.cos(np.radians(angle)) - 0.5))
    kernel[centre + row, centre + col] += np.exp(-0.5 * (i / sigma) ** 2)
  want = ndimage.correlate(x, kernel / kernel.sum(), mode="nearest")
  np.testing.assert_allclose(corruptions._motion_blur_magick(x, radius, sigma, angle), want, atol=1e-12)


def test_affine_warp_against_the_inverse_map():
  from scipy import ndimage
  rng = np.random.default_rng(8)
  x = rng.uniform(size=(18, 18, 3))
  src = np.array([[12.0, 12.0], [12.0, 6.0], [6.0, 6.0]])  # (x, y), as elastic_transform builds them
  dst = src + rng.uniform(-2, 2, size=src.shape)
  # output pixel (row, col) reads the input where the map dst -> src sends it
  back = np.linalg.lstsq(np.hstack([dst[:, ::-1], np.ones((3, 1))]), src[:, ::-1], rcond=None)[0]
  rows, cols = np.meshgrid(np.arange(18.0), np.arange(18.0), indexing="ij")
  where = np.stack([rows, cols, np.ones_like(rows)], -1) @ back
  want = np.stack([ndimage.map_coordinates(x[..., c], [where[..., 0], where[..., 1]], order=1, mode="mirror")
                   for c in range(3)], -1)
  np.testing.assert_allclose(corruptions._affine_warp(x, src, dst), want, atol=1e-9)


def test_snow_only_brightens_and_fog_follows_its_formula():
  clean = smooth_images(2, 32, seed=5)
  assert np.all(corruptions.corrupt(clean, "snow", 3, seed=4).astype(int) >= clean.astype(int) - 1)
  x = clean[0].astype(np.float32) / 255
  plasma = corruptions._plasma(32, 1.7, np.random.default_rng(9))
  assert plasma.min() == 0 and plasma.max() == 1
  noise = np.random.default_rng(9).uniform(size=(32, 32))
  smoothness = np.abs(np.diff(plasma, axis=0)).mean() / np.abs(np.diff(noise, axis=0)).mean()
  assert smoothness < 0.5, smoothness  # a fractal with falling amplitude, not white noise
  want = (x + 2.5 * plasma[..., None]) * x.max() / (x.max() + 2.5)
  np.testing.assert_allclose(corruptions._fog(x, 3, np.random.default_rng(9)), want, rtol=1e-6)


def test_frost_blends_a_crop_of_one_of_the_first_five_pictures(frost_dir, tmp_path):
  clean = smooth_images(3, 16, seed=6)
  pictures = corruptions.frost_pictures(frost_dir)
  assert len(pictures) == 6
  for severity, (a, b) in ((2, (0.8, 0.6)), (5, (0.6, 0.75))):
    for image, got in zip(clean, corruptions.corrupt(clean, "frost", severity, seed=3, frost_dir=frost_dir)):
      best = min(np.abs(got.astype(float) - np.clip(a * image + b * p[t:t + 16, l:l + 16], 0, 255)).max()
                 for p in pictures[:5] for t in range(p.shape[0] - 16) for l in range(p.shape[1] - 16))
      assert best <= 1, best
  big = smooth_images(1, 48, seed=6)  # larger than the pictures: they are scaled up first
  assert corruptions.corrupt(big, "frost", 1, frost_dir=frost_dir).shape == big.shape
  with pytest.raises(ValueError, match="frost needs ImageNet-C's frost pictures .* none in .*--frost_pictures"):
    corruptions.frost_pictures(str(tmp_path))


def test_corruptions_against_direct_formulas():
  clean = smooth_images()
  x = clean / 255.0
  means = x.mean(axis=(1, 2), keepdims=True)
  np.testing.assert_array_equal(corruptions.corrupt(clean, "contrast", 2),
                                np.uint8(np.clip((x - means) * 0.3 + means, 0, 1) * 255))
  pixelated = corruptions.corrupt(clean, "pixelate", 5)  # 32 -> 8 -> 32 px: 4 x 4 blocks of one colour
  blocks = pixelated.reshape(3, 8, 4, 8, 4, 3)
  assert np.all(blocks == blocks[:, :, :1, :, :1])
  assert not np.array_equal(corruptions.corrupt(clean, "pixelate", 1), clean)
  buf = io.BytesIO()
  Image.fromarray(clean[0]).save(buf, "JPEG", quality=7)
  np.testing.assert_array_equal(corruptions.corrupt(clean[:1], "jpeg_compression", 5)[0],
                                np.asarray(Image.open(buf)))
  disk = corruptions._disk(6, 0.5)
  assert disk.sum() == pytest.approx(1.0, rel=1e-5) and np.allclose(disk, disk.T) and np.allclose(disk, disk[::-1])
  with pytest.raises(ValueError, match="unknown corruption 'glare'"):
    corruptions.corrupt(clean, "glare", 1)


def test_mce_by_hand():
  model = {"fog": {1: 0.2, 2: 0.4}, "snow": {1: 0.5, 2: 0.5}}
  dense = {"fog": {1: 0.3, 2: 0.3}, "snow": {1: 0.25, 2: 0.25}}
  result = corruptions.mce(model, dense)
  assert result["fog"] == pytest.approx(1.0) and result["snow"] == pytest.approx(2.0)
  assert result["mCE"] == pytest.approx(1.5)


@dataclasses.dataclass(frozen=True)
class FakeExperiment:  # what robustness.corrupted_experiment reads of a phases.Experiment
  config: config_lib.ExperimentConfig
  iterator: object = data.make_iterator
  group_masks: bool = True


def write_prepared(data_dir, corruption, severity, images, labels):
  tfds = pytest.importorskip("tensorflow_datasets")
  name = f"imagenet2012_corrupted/{corruption}_{severity}"
  builder = tfds.builder(name, data_dir=str(data_dir))
  examples = [(str(i), {"image": image, "label": int(label), "file_name": f"ILSVRC2012_val_{i + 1:08d}.JPEG"})
              for i, (image, label) in enumerate(zip(images, labels))]
  tfds.dataset_builders.store_as_tfds_dataset(
      name="imagenet2012_corrupted", version=str(builder.version), features=builder.info.features,
      split_datasets={"validation": examples}, config=f"{corruption}_{severity}", data_dir=str(data_dir),
      file_format="tfrecord", disable_shuffling=True)


def test_prepared_sets_are_read_as_they_are_and_missing_ones_are_named(tmp_path):
  # the TFDS feature: 224 x 224 JPEGs; flat blocks survive the JPEG coding nearly unchanged
  images, labels = smooth_images(5, 224, seed=2, texture=0.0), np.array([3, 1, 4, 1, 5])
  write_prepared(tmp_path, "frost", 2, images, labels)
  cfg = config_lib.ExperimentConfig(dataset="tfds:imagenet2012", data_dir=str(tmp_path), image_size=224)
  exp = robustness.corrupted_experiment(FakeExperiment(cfg), "frost", 2)
  assert exp.config.dataset == "tfds:imagenet2012_corrupted/frost_2" and not exp.group_masks
  batches = list(exp.iterator(exp.config.dataset, "test", 4, image_size=224, data_dir=str(tmp_path)))
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), labels)
  got = np.concatenate([b["image"] for b in batches])
  error = np.abs(got - (images / 127.5 - 1.0))  # already centre crops: not rescaled and cropped again
  assert error.mean() < 0.01 and np.median(error) < 0.005, (error.mean(), np.median(error))
  with pytest.raises(ValueError, match=r"'frost' at severity 3: imagenet2012_corrupted/frost_3 is not in --data_dir"):
    robustness.corrupted_experiment(FakeExperiment(cfg), "frost", 3)
  on_the_fly = robustness.corrupted_experiment(FakeExperiment(cfg), "contrast", 3)
  assert on_the_fly.config.dataset == "tfds:imagenet2012"


def test_on_the_fly_eval_batches_are_the_clean_ones_corrupted():
  cfg = config_lib.ExperimentConfig(image_size=16)
  exp = robustness.corrupted_experiment(FakeExperiment(cfg), "contrast", 5)
  got = next(exp.iterator("synthetic", "test", 8, image_size=16))
  clean = next(data.make_iterator("synthetic", "test", 8, image_size=16))
  np.testing.assert_array_equal(got["label"], clean["label"])
  uint8 = np.round((clean["image"] + 1) * 127.5).astype(np.uint8)
  np.testing.assert_allclose(got["image"], corruptions.corrupt(uint8, "contrast", 5) / 127.5 - 1, atol=1e-6)


def test_cli_refuses_bad_corruption_flags(tmp_path, capsys):
  from experiments import vit_imagenet
  assert vit_imagenet.main([f"--workdir={tmp_path}", "--phase=eval", "--corruptions=glare"]) == 2
  assert "unknown ['glare']" in capsys.readouterr().err
  assert vit_imagenet.main([f"--workdir={tmp_path}", "--phase=eval", "--corruptions=fog", "--severities=7"]) == 2
  assert "--severities must be" in capsys.readouterr().err
  assert vit_imagenet.main([f"--workdir={tmp_path}", "--phase=finetune", "--corruptions=fog"]) == 2
  assert "--corruptions goes with --phase=eval" in capsys.readouterr().err
